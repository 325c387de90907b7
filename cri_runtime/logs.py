"""CRI log files of containers whose agent cannot write them (Xen zones: the agent runs in the
domU, kubelet reads ``<log_directory>/<log_path>`` on the host).

The agent keeps such a container's log, already in the CRI format, in a bounded buffer
(agent/crilog.py, CriLogBuffer); the runtime pulls it with READ_LOG and appends it to the host's
file. One thread pulls every running container's log each ``interval_s``; ``drain`` pulls until
the agent says the log is complete (the container exited and its output is all read), which
PodManager does before it records a container as EXITED, so a finished container's log is whole
when its status says so. ``reopen`` (ReopenContainerLog) opens the host's file afresh after
kubelet rotated it; what arrives later goes to the new file.

Offsets count the bytes of a container's log since its creation. Each READ_LOG at offset N
acknowledges the bytes before N (the agent drops them), and the runtime records N in
``<offsets_dir>/<container id>`` after it wrote them, so a restarted runtime goes on where it
stopped: a kill between the write and the record repeats at most that one chunk.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from cri_runtime.agent.client import AgentClient, AgentError, AgentGone
from cri_runtime.agent.protocol import AgentStatus
from cri_runtime.zones.base import ZoneError

log = structlog.stdlib.get_logger(__name__)

PULL_INTERVAL_S = 0.5
DRAIN_TIMEOUT_S = 10.0
DRAIN_POLL_S = 0.05
CHUNK_BYTES = 256 << 10
MAX_CHUNKS_PER_PULL = 16  # one busy container must not starve the others of a tick


class _Tail:
    """One container's relayed log: the host file it goes to and how far it got."""

    def __init__(self, container_id: str, zone_id: str, path: Path, offset: int | None) -> None:
        self.container_id = container_id
        self.zone_id = zone_id
        self.path = path
        self.offset = offset
        self.complete = False
        self.failing = False  # the last pull failed (logged once until one succeeds)
        self.lock = threading.Lock()
        self.fd: int | None = open_log(path)


def open_log(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


class LogRelay:
    """Thread-safe. ``agent(zone_id)`` gives the zone's control channel; ``running(container
    id)`` says whether the periodic pull should ask for that container's log."""

    def __init__(
        self,
        offsets_dir: Path,
        agent: Callable[[str], AgentClient],
        running: Callable[[str], bool],
        *,
        interval_s: float = PULL_INTERVAL_S,
    ) -> None:
        self.offsets_dir = offsets_dir
        self._agent = agent
        self._running = running
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._tails: dict[str, _Tail] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        offsets_dir.mkdir(parents=True, exist_ok=True)

    # -- containers ----------------------------------------------------------------------------

    def track(self, container_id: str, zone_id: str, path: Path) -> None:
        """Relay ``container_id``'s log to ``path`` (created now; kubelet may look at once).
        Tracking a container again (recovery) keeps its state."""
        with self._lock:
            if container_id in self._tails:
                return
            self._tails[container_id] = _Tail(
                container_id, zone_id, path, self._read_offset(container_id)
            )
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="log-relay", daemon=True)
                self._thread.start()

    def tracked(self, container_id: str) -> bool:
        with self._lock:
            return container_id in self._tails

    def pull(self, container_id: str) -> bool:
        """Fetch what the agent has of the log and append it to the file; True once the log
        is complete. AgentError, AgentGone, ZoneError or OSError when it could not."""
        tail = self._tail(container_id)
        if tail is None:
            return True
        with tail.lock:
            if tail.complete:
                return True
            agent = self._agent(tail.zone_id)
            for _ in range(MAX_CHUNKS_PER_PULL):
                chunk = agent.read_log(container_id, tail.offset, CHUNK_BYTES)
                if chunk.data and tail.fd is not None:
                    write_all(tail.fd, chunk.data)
                if tail.offset != chunk.offset + len(chunk.data):
                    tail.offset = chunk.offset + len(chunk.data)
                    self._write_offset(container_id, tail.offset)
                if chunk.complete:
                    tail.complete = True
                    break
                if len(chunk.data) < CHUNK_BYTES:
                    break
            return tail.complete

    def drain(self, container_id: str, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Pull until the log is complete (the container has exited), at most ``timeout_s``;
        True if it is. Failures are logged, not raised: the status must still be told."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.pull(container_id):
                    return True
            except (AgentError, AgentGone, ZoneError, OSError) as exc:
                log.warning("container log not complete", container=container_id, error=str(exc))
                return False
            if time.monotonic() >= deadline:
                log.warning("container log still incomplete", container=container_id,
                            timeout_s=timeout_s)  # fmt: skip
                return False
            time.sleep(DRAIN_POLL_S)

    def reopen(self, container_id: str) -> None:
        """Write to a new file at the log's path from now on (kubelet rotated the old one)."""
        tail = self._tail(container_id)
        if tail is None:
            return
        with tail.lock:
            fresh = open_log(tail.path)
            if tail.fd is not None:
                os.close(tail.fd)
            tail.fd = fresh

    def forget(self, container_id: str) -> None:
        """Stop relaying (the container or its zone is gone); the host file stays."""
        with self._lock:
            tail = self._tails.pop(container_id, None)
        if tail is not None:
            with tail.lock:
                tail.complete = True
                if tail.fd is not None:
                    os.close(tail.fd)
                    tail.fd = None
        (self.offsets_dir / container_id).unlink(missing_ok=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            tails, self._tails = list(self._tails.values()), {}
        for tail in tails:
            with tail.lock:
                if tail.fd is not None:
                    os.close(tail.fd)
                    tail.fd = None

    # -- internals -----------------------------------------------------------------------------

    def _tail(self, container_id: str) -> _Tail | None:
        with self._lock:
            return self._tails.get(container_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            with self._lock:
                tails = [t for t in self._tails.values() if not t.complete]
            for tail in tails:
                if self._stop.is_set():
                    return
                if not self._running(tail.container_id):
                    continue
                try:
                    self.pull(tail.container_id)
                    tail.failing = False
                except AgentError as exc:
                    if exc.status == AgentStatus.NOT_FOUND:  # the agent no longer has it
                        with tail.lock:
                            tail.complete = True
                    self._failed(tail, exc)
                except (AgentGone, ZoneError, OSError) as exc:
                    self._failed(tail, exc)

    def _failed(self, tail: _Tail, exc: Exception) -> None:
        if not tail.failing:
            log.warning("container log pull failed", container=tail.container_id, error=str(exc))
        tail.failing = True

    def _read_offset(self, container_id: str) -> int | None:
        try:
            return int((self.offsets_dir / container_id).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _write_offset(self, container_id: str, offset: int) -> None:
        path = self.offsets_dir / container_id
        temporary = path.with_suffix(".tmp")
        temporary.write_text(str(offset))
        os.replace(temporary, path)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
