"""The agent is the zone's init (pid 1 of the process backend's pid namespace) and a child
subreaper: every container process is re-parented to it once the OCI runtime exits. One thread
reaps every child with waitpid(-1) and hands each exit status to whoever registered the pid, so
nothing else may wait for children (Popen.wait/communicate would race it for the status);
``run`` replaces subprocess.run for the agent's own short-lived commands.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PR_SET_CHILD_SUBREAPER = 36
UNCLAIMED_KEPT = 256
# After the command exits, its output pipes may still be held by something it left behind.
OUTPUT_GRACE_S = 0.5
# A timed-out command that on_timeout did not end is killed this much later.
KILL_AFTER_TIMEOUT_S = 5.0

ExitCallback = Callable[[int], None]


def exit_code(wait_status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


@dataclass(frozen=True, slots=True)
class Completed:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


class Child:
    """A process the agent started; its exit code arrives from the reaper."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.exit_code: int | None = None
        self._done = threading.Event()

    def _exited(self, wait_status: int) -> None:
        self.exit_code = exit_code(wait_status)
        # Tell Popen the pid is gone, so its own cleanup never waits on a reused pid.
        self.popen.returncode = self.exit_code
        self._done.set()

    def wait(self, timeout_s: float | None = None) -> int | None:
        self._done.wait(timeout_s)
        return self.exit_code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        # The pid cannot be reused before the reaper collected it, which sets _done first.
        if not self._done.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


class Reaper:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: dict[int, ExitCallback] = {}
        self._unclaimed: OrderedDict[int, int] = OrderedDict()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._reap, name="reaper", daemon=True)

    def start(self) -> None:
        """Become the subreaper of everything we start, then reap in the background."""
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(code)}")
        self._thread.start()

    def spawn(
        self,
        args: Sequence[str | Path],
        *,
        stdout: int = subprocess.DEVNULL,
        stderr: int = subprocess.DEVNULL,
    ) -> Child:
        # Register under the lock that the reaper takes before it looks a pid up, so an exit
        # that comes before registration still finds its Child.
        with self._lock:
            popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
            child = Child(popen)
            self._callbacks[child.pid] = child._exited
        self._wake.set()
        return child

    def watch(self, pid: int, on_exit: ExitCallback) -> int | None:
        """Call ``on_exit(wait_status)`` when ``pid`` (a re-parented child) exits; returns a
        pidfd to signal it without pid-reuse races, or None if it is already gone."""
        with self._lock:
            status = self._unclaimed.pop(pid, None)
            if status is None:
                self._callbacks[pid] = on_exit
                try:
                    return os.pidfd_open(pid)
                except ProcessLookupError:
                    return None  # reaped just now: the reaper calls on_exit once it has the lock
        on_exit(status)
        return None

    def run(
        self,
        args: Sequence[str | Path],
        *,
        timeout_s: float | None = None,
        output_limit: int = 1 << 20,
        on_timeout: Callable[[Child], None] | None = None,
    ) -> Completed:
        """Run a command to completion, capturing up to ``output_limit`` bytes of each stream.
        On timeout, ``on_timeout`` (default: SIGKILL the command) ends it and the result says
        timed_out; KILL_AFTER_TIMEOUT_S later the command itself is killed."""
        child = self.spawn(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert child.popen.stdout is not None and child.popen.stderr is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        outputs = {
            child.popen.stdout.fileno(): bytearray(),
            child.popen.stderr.fileno(): bytearray(),
        }
        timed_out = False
        with selectors.DefaultSelector() as selector:
            for fd in outputs:
                selector.register(fd, selectors.EVENT_READ)
            exited_at: float | None = None
            while selector.get_map():
                now = time.monotonic()
                if not timed_out and deadline is not None and now >= deadline:
                    timed_out = True
                    (on_timeout or Child.kill)(child)
                if timed_out and deadline is not None and now - deadline > KILL_AFTER_TIMEOUT_S:
                    child.kill()
                if exited_at is None and child.wait(0) is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > OUTPUT_GRACE_S:
                    break
                for key, _ in selector.select(0.05):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                    elif len(outputs[key.fd]) < output_limit:
                        outputs[key.fd] += chunk[: output_limit - len(outputs[key.fd])]
        child.popen.stdout.close()
        child.popen.stderr.close()
        code = child.wait()
        assert code is not None
        out, err = outputs.values()
        return Completed(code, bytes(out), bytes(err), timed_out)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # Nothing to wait for: sleep until we start something (orphans re-parented to
                # us meanwhile are collected within a second).
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            with self._lock:
                callback = self._callbacks.pop(pid, None)
                if callback is None:
                    self._unclaimed[pid] = status
                    while len(self._unclaimed) > UNCLAIMED_KEPT:
                        self._unclaimed.popitem(last=False)
            if callback is not None:
                try:
                    callback(status)
                except Exception:
                    log.exception("exit callback failed", pid=pid)
