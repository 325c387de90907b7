"""The process zone backend: a zone is the zone agent on this host, in fresh namespaces.

FOR DEV AND CI ONLY: THIS IS NOT AN ISOLATION BOUNDARY. The zone's processes run on the host's
kernel as host root, see the host's filesystem, devices and (with NetworkMode.NODE) network,
and its containers are only as isolated as runc/crun make them. It exists so the runtime, the
agent and the control channel can be developed and tested without Xen; production zones are Xen
domUs (zones/xen.py).

A zone is ``unshare --mount --pid --fork --mount-proc --uts --ipc python -m cri_runtime.agent
…``: the agent is pid 1 of the new pid namespace, so killing it kills every process of the zone,
and its mounts (container overlays) live and die with its mount namespace; a pod network is a
network namespace the agent unshares itself. It runs in a session of its own, so it outlives the
runtime. Everything about a zone is under ``<root>/<zone_id>/``: ``zone.json`` (the record:
spec, pids with start times, boot time), ``control.sock`` (the runtime listens, the agent
connects), ``agent.log``, and the agent's own ``containers/``, ``oci/`` and ``tmp/``.

Booting a zone must not wait for an interpreter to start and import the agent (0.4 s), so the
backend keeps ``standby`` agents started ahead, each in ``<root>/.standby/<token>/``, having
done everything no zone decides (agent/standby.py). A boot writes the zone's record into a
standby's directory, renames that directory to the zone's, and hands the agent the zone's flags
on its stdin; the pool is refilled once the zone is up. A standby's stdin is a pipe from the
runtime, so a standby whose runtime died gets end of file and exits; the next backend on the
root kills any left over. Kata's VM templating is the same idea for VMs.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import BaseModel

import cri_runtime
from cri_runtime.agent import cgroups
from cri_runtime.agent.client import AgentClient, AgentError, AgentGone
from cri_runtime.agent.protocol import ImageDisk
from cri_runtime.agent.rootfs import unmount
from cri_runtime.agent.standby import STANDBY_FLAG
from cri_runtime.zones import pids, records
from cri_runtime.zones.base import NetworkMode, ZoneError, ZoneInfo, ZoneSpec, ZoneState
from cri_runtime.zones.pids import ProcessIdentity
from idm.channel import ChannelError
from idm.links.local import LocalListener

log = structlog.get_logger(__name__)

ZONE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONTROL_SOCKET = "control.sock"
AGENT_LOG = "agent.log"
STANDBY_DIR = ".standby"  # not a zone id: list() never sees standbys
STANDBY_NICE = 19  # a standby starts on idle CPU, not the boots and calls it is there to speed up
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
EXIT_WAIT_S = 10.0  # for a SIGKILLed zone's processes to be gone
CGROUP_BUSY_S = 2.0  # an emptied cgroup can be busy for a moment after its last task exits
LOG_TAIL_BYTES = 4096


class ZoneRecord(BaseModel):
    """What the runtime must know about a zone after it restarted (written atomically)."""

    spec: ZoneSpec
    unshare: ProcessIdentity
    agent: ProcessIdentity | None = None  # known once the agent connected
    started_at: datetime


@dataclass(frozen=True, slots=True)
class _Standby:
    """A started agent not yet given a zone: unshare (the agent's parent) and its directory."""

    directory: Path
    process: subprocess.Popen[bytes]
    unshare: ProcessIdentity


class _Connection:
    """The runtime's listener on one zone's control socket, and the agent client it produced.
    Accepting runs on a thread of its own: a silent peer can hold an accept for seconds."""

    def __init__(self, zone_id: str, path: Path) -> None:
        self.zone_id = zone_id
        self.listener = LocalListener(path)
        self.client: AgentClient | None = None
        self.agent_pid = 0
        self._changed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self, accept_peer: Callable[[int], bool]) -> None:
        """Accept agents whose host pid ``accept_peer`` approves (SO_PEERCRED)."""
        self._thread = threading.Thread(
            target=self._accept, args=(accept_peer,), name=f"zone-{self.zone_id}", daemon=True
        )
        self._thread.start()

    def _accept(self, accept_peer: Callable[[int], bool]) -> None:
        while not self._closed:
            try:
                if not self._accept_one(accept_peer):
                    return
            except Exception:  # this thread must outlive any one bad connection
                log.exception("control socket: accepting an agent failed", zone_id=self.zone_id)

    def _accept_one(self, accept_peer: Callable[[int], bool]) -> bool:
        """Accept one connection; False once the listener is closed."""
        try:
            link = self.listener.accept()
        except ChannelError:
            return True  # a bad offer; logged by the listener
        except OSError:
            return False  # the listener was closed
        try:
            pid = link.peer_credentials()[0]
        except OSError:
            link.close()
            return True
        if not accept_peer(pid):
            log.warning(
                "control socket: refused a process that is not the zone's agent",
                zone_id=self.zone_id,
                pid=pid,
            )
            link.close()
            return True
        try:
            channel = link.open_channel()
        except ChannelError as exc:
            log.warning("control channel refused", zone_id=self.zone_id, reason=exc.reason)
            link.close()
            return True
        try:
            client = AgentClient.handshake(channel, peer_alive=link.peer_alive)
        except AgentGone as exc:
            log.warning("agent handshake failed", zone_id=self.zone_id, reason=str(exc))
            return True
        with self._changed:
            old, self.client, self.agent_pid = self.client, client, pid
            closed = self._closed
            self._changed.notify_all()
        if old is not None:
            old.close()
        if closed:
            client.close()
            return False
        log.info(
            "zone agent connected",
            zone_id=self.zone_id,
            agent_pid=pid,
            oci_runtime=client.ready.oci_runtime,
            containers=len(client.ready.containers),
        )
        return True

    def wait_client(self, timeout_s: float, still_worth_it: Callable[[], bool]) -> AgentClient:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if self.client is not None and not self.client.closed:
                    return self.client
                left = deadline - time.monotonic()
                if left <= 0 or self._closed or not still_worth_it():
                    raise ZoneError(
                        f"zone {self.zone_id}: its agent did not connect within {timeout_s:.0f} s"
                    )
                self._changed.wait(min(left, 0.1))

    def close(self) -> None:
        with self._changed:
            self._closed = True
            client, self.client = self.client, None
            self._changed.notify_all()
        self.listener.close()
        if self._thread is not None:
            self._thread.join()
        if client is not None:
            client.close()


class ProcessZoneBackend:
    """Zones as namespaced host processes, for dev/CI. NOT an isolation boundary: see the
    module docstring. One backend per ``root`` at a time (an exclusive lock says so)."""

    name = "process"
    gpu_proxy_finds_zones = False
    relays_logs = False  # the agent writes the CRI log files on this host itself
    shares_host_paths = True  # zones are host processes: mounts are plain bind mounts

    def __init__(
        self,
        root: Path,
        *,
        python: str = sys.executable,
        oci_runtime: str = "auto",
        libvgpu: Path | None = None,
        cgroup_root: str = "/vgpu-zones",
        reconnect_timeout_s: float = 10.0,
        agent_log_level: str = "info",
        standby: int = 1,
    ) -> None:
        """``standby``: how many agents to keep started ahead of boots (0: every boot starts
        its agent)."""
        self.root = root
        self._python = python
        self._oci_runtime = oci_runtime
        self._libvgpu = libvgpu
        self._cgroup_root = cgroup_root
        self._reconnect_timeout_s = reconnect_timeout_s
        self._agent_log_level = agent_log_level
        unshare = shutil.which("unshare")
        if unshare is None:
            raise ZoneError("the process zone backend needs unshare(1) (util-linux)")
        self._unshare = unshare
        root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(
            root / ".backend.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ZoneError(f"another process zone backend is using {root}") from None
        self._lock = threading.Lock()
        self._zone_locks = records.KeyedLocks(threading.RLock)
        self._connections: dict[str, _Connection] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._standby_target = standby
        self._nice = os.getpriority(os.PRIO_PROCESS, 0)  # what zones run at
        self._pool_lock = threading.Lock()  # _standbys, _closed; held while one is started
        self._standbys: builtins.list[_Standby] = []
        self._closed = False
        log.warning(
            "process zone backend: NOT an isolation boundary (zones are host processes in "
            "namespaces, as host root); for dev/CI only",
            root=str(root),
        )
        self._kill_old_standbys()
        self._refill()

    # -- ZoneBackend --------------------------------------------------------------------------

    def boot(self, spec: ZoneSpec) -> ZoneInfo:
        with self._zone_locks.hold(spec.zone_id):
            record = self._read_record(spec.zone_id)
            if (
                record is not None
                and record.agent is not None
                and self._state(record) == ZoneState.RUNNING
            ):
                self._client(spec.zone_id, record, spec.boot_timeout_s)
                return self._info(spec.zone_id, record)
            if self.zone_dir(spec.zone_id).exists():
                self._teardown(spec.zone_id, record, grace_s=0)
            return self._boot(spec)

    def stop(self, zone_id: str, *, grace_s: float) -> None:
        if not ZONE_ID.match(zone_id):
            return
        with self._zone_locks.hold(zone_id):
            if not self.zone_dir(zone_id).exists():
                self._forget(zone_id)
                return
            record = self._read_record(zone_id)
            self._teardown(zone_id, record, grace_s=grace_s)
            log.info("zone stopped", zone_id=zone_id)

    def list(self) -> list[ZoneInfo]:
        with self._lock:
            for child in self._children.values():
                child.poll()  # collect zones that ended on their own
        zones = []
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if not ZONE_ID.match(directory.name):
                continue
            record = self._read_record(directory.name)
            if record is None:  # a boot that died before its record: stop() cleans it
                started = datetime.fromtimestamp(directory.stat().st_mtime, UTC)
                zones.append(
                    ZoneInfo(zone_id=directory.name, state=ZoneState.EXITED, started_at=started)
                )
            else:
                zones.append(self._info(directory.name, record))
        return zones

    def agent(self, zone_id: str) -> AgentClient:
        with self._zone_locks.hold(zone_id):
            record = self._read_record(zone_id)
            if record is None or self._state(record) != ZoneState.RUNNING:
                raise ZoneError(f"zone {zone_id} is not running")
            return self._client(zone_id, record, self._reconnect_timeout_s)

    def container_rootfs(
        self, zone_id: str, container_id: str, image_id: str, layers: Sequence[Path]
    ) -> tuple[tuple[Path, ...], ImageDisk | None]:
        """The zone is on this host: it sees the image store's layer directories as they are."""
        return tuple(layers), None

    def release_rootfs(self, zone_id: str, container_id: str) -> None:
        """Nothing was given to the zone for a container's rootfs."""

    def prune_images(self, live: Collection[str]) -> None:
        """Nothing is derived from images here."""

    def zone_dir(self, zone_id: str) -> Path:
        if not ZONE_ID.match(zone_id):
            raise ZoneError(f"invalid zone id {zone_id!r}")
        return self.root / zone_id

    def close(self) -> None:
        """Zones keep running; standbys are stopped."""
        with self._pool_lock:
            self._closed = True
            standbys, self._standbys = self._standbys, []
        for standby in standbys:
            self._discard_standby(standby)
        with contextlib.suppress(OSError):
            (self.root / STANDBY_DIR).rmdir()
        with self._lock:
            connections, self._connections = list(self._connections.values()), {}
            self._children = {}
        for connection in connections:
            connection.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # -- booting ------------------------------------------------------------------------------

    def _boot(self, spec: ZoneSpec) -> ZoneInfo:
        zone_id = spec.zone_id
        directory = self.zone_dir(zone_id)
        socket_path = directory / CONTROL_SOCKET
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            raise ZoneError(f"control socket path {socket_path} is too long for a unix socket")
        standby = self._take_standby()
        child = None if standby is None else standby.process
        connection: _Connection | None = None
        try:
            if standby is None:
                directory.mkdir(mode=0o700, parents=True)
                child = self._spawn(self._command(spec), directory, stdin=subprocess.DEVNULL)
                unshare = pids.identify(child.pid)
                if unshare is None:
                    raise ZoneError(f"unshare exited at once: {self._agent_log_tail(zone_id)}")
            else:
                unshare = standby.unshare
            booting = ZoneRecord(spec=spec, unshare=unshare, started_at=datetime.now(UTC))
            if standby is None:
                self._write_record(booting, directory)
            else:  # the record goes first: a zone directory never exists without one
                self._write_record(booting, standby.directory)
                standby.directory.rename(directory)
            connection = _Connection(zone_id, socket_path)
            connection.start(_agent_of(booting))
            if standby is not None:
                _assign(standby.process, self._agent_flags(spec))
            assert child is not None
            boot_child = child
            client = connection.wait_client(
                spec.boot_timeout_s, still_worth_it=lambda: boot_child.poll() is None
            )
            agent = pids.identify(connection.agent_pid)
            if agent is None:
                raise ZoneError("the agent exited right after it connected")
            record = booting.model_copy(update={"agent": agent})
            self._write_record(record, directory)
        except (ZoneError, OSError) as exc:
            why = (
                f"agent exited with status {child.returncode}"
                if child is not None and child.poll() is not None
                else str(exc)
            )
            tail = self._agent_log_tail(zone_id)
            if connection is not None:
                connection.close()
            if child is not None:
                _kill_session(child)
            if standby is not None:
                shutil.rmtree(standby.directory, ignore_errors=True)  # if not yet the zone's
            self._cleanup(zone_id)
            raise ZoneError(f"zone {zone_id} did not boot: {why}\nagent.log:\n{tail}") from exc
        with self._lock:
            self._connections[zone_id] = connection
            self._children[zone_id] = child
        log.info(
            "zone booted",
            zone_id=zone_id,
            agent_pid=agent.pid,
            standby=standby is not None,
            oci_runtime=client.ready.oci_runtime,
            network=spec.network.value,
        )
        if self._standby_target:
            threading.Thread(target=self._refill, name="standby-refill", daemon=True).start()
        return self._info(zone_id, record)

    def _spawn(
        self, command: builtins.list[str], directory: Path, *, stdin: int
    ) -> subprocess.Popen[bytes]:
        """unshare and its agent, in a session of their own, logging to ``directory``."""
        with open(directory / AGENT_LOG, "ab") as agent_log:
            return subprocess.Popen(
                command,
                stdin=stdin,
                stdout=agent_log,
                stderr=agent_log,
                cwd=directory,
                env=self._agent_environment(),
                start_new_session=True,
            )

    def _unshare_command(self) -> builtins.list[str]:
        # --kill-child: killing unshare takes the zone's init (and so the zone) with it
        namespaces = ["--mount", "--propagation", "private", "--pid", "--kill-child"]
        namespaces += ["--mount-proc"]
        namespaces += ["--uts", "--ipc"]
        return [self._unshare, *namespaces, "--", self._python, "-m", "cri_runtime.agent"]

    def _command(self, spec: ZoneSpec) -> builtins.list[str]:
        return [*self._unshare_command(), *self._agent_flags(spec)]

    def _agent_flags(self, spec: ZoneSpec) -> builtins.list[str]:
        """A zone's agent command line: a cold agent's arguments, and a standby's zone. The
        first three say which zone (a standby shows them in its command line)."""
        directory = self.zone_dir(spec.zone_id)
        flags = [
            f"--zone-id={spec.zone_id}",
            f"--zone-dir={directory}",
            f"--control-socket={directory / CONTROL_SOCKET}",
            f"--oci-runtime={self._oci_runtime}",
            f"--cgroup-parent={self._cgroup_root}/{spec.zone_id}",
            f"--log-level={self._agent_log_level}",
        ]
        if spec.network == NetworkMode.POD:
            flags += ["--new-netns", "--loopback"]
        if spec.hostname:
            flags.append(f"--hostname={spec.hostname}")
        if spec.gpu is not None and spec.gpu.proxy_socket is not None:
            flags.append(f"--gpu-proxy-socket={spec.gpu.proxy_socket}")
        if self._libvgpu is not None:
            flags.append(f"--libvgpu={self._libvgpu}")
        return flags

    # -- standby agents -----------------------------------------------------------------------

    def _take_standby(self) -> _Standby | None:
        """A started standby, or None (boot cold). One still importing is taken too: it is
        ahead of an agent started now."""
        dead = []
        taken = None
        with self._pool_lock:
            while self._standbys and taken is None:
                standby = self._standbys.pop(0)
                if standby.process.poll() is None:
                    taken = standby
                else:
                    dead.append(standby)
        for standby in dead:
            log.warning(
                "standby agent exited before it was used",
                status=standby.process.returncode,
                log_tail=_tail(standby.directory / AGENT_LOG),
            )
            self._discard_standby(standby)
        if taken is not None:
            try:  # the zone runs at the runtime's priority, as a cold one does
                os.setpriority(os.PRIO_PGRP, taken.process.pid, self._nice)
            except OSError as exc:
                log.warning("standby agent keeps its low priority", error=str(exc))
        return taken

    def _refill(self) -> None:
        """Start standbys until the pool is full (after a boot on a thread of its own: the boot
        does not wait for it). A boot that failed does not refill: its standby may have been
        what failed."""
        with self._pool_lock:
            while not self._closed and len(self._standbys) < self._standby_target:
                try:
                    self._standbys.append(self._start_standby())
                except OSError as exc:
                    log.warning("could not start a standby agent", error=str(exc))
                    return

    def _start_standby(self) -> _Standby:
        token = secrets.token_hex(8)
        directory = self.root / STANDBY_DIR / token
        directory.mkdir(mode=0o700, parents=True)
        # Started at STANDBY_NICE (nice's increment clamps at 19) rather than reniced after the
        # spawn: a renice races the agent's start and could miss it.
        command = [
            "nice",
            f"-n{STANDBY_NICE}",
            *self._unshare_command(),
            f"{STANDBY_FLAG}={token}",
            f"--oci-runtime={self._oci_runtime}",
            f"--log-level={self._agent_log_level}",
        ]
        try:
            process = self._spawn(command, directory, stdin=subprocess.PIPE)
        except OSError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        _wait_past_nice(process.pid)
        unshare = pids.identify(process.pid)
        if unshare is None:
            tail = _tail(directory / AGENT_LOG)
            _kill_session(process)
            shutil.rmtree(directory, ignore_errors=True)
            raise OSError(f"unshare exited at once: {tail}")
        return _Standby(directory, process, unshare)

    @staticmethod
    def _discard_standby(standby: _Standby) -> None:
        _kill_session(standby.process)
        _kill_with_argument(f"{STANDBY_FLAG}={standby.directory.name}")  # and wait for the agent
        shutil.rmtree(standby.directory, ignore_errors=True)

    def _kill_old_standbys(self) -> None:
        """Standbys a previous backend on this root left (they exit at the end of their stdin,
        but one may hang): found by the token their directory and command line share."""
        parent = self.root / STANDBY_DIR
        if parent.is_dir():
            for directory in parent.iterdir():
                _kill_with_argument(f"{STANDBY_FLAG}={directory.name}")
                shutil.rmtree(directory, ignore_errors=True)

    @staticmethod
    def _agent_environment() -> dict[str, str]:
        """The agent imports this very checkout, wherever the runtime was started from."""
        source = str(Path(cri_runtime.__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH", "")
        return {**os.environ, "PYTHONPATH": f"{source}:{path}" if path else source}

    # -- the agent connection -----------------------------------------------------------------

    def _client(self, zone_id: str, record: ZoneRecord, timeout_s: float) -> AgentClient:
        with self._lock:
            connection = self._connections.get(zone_id)
        if connection is None:
            # A runtime restart: listen again; the agent keeps knocking (at least once a second).
            connection = _Connection(zone_id, self.zone_dir(zone_id) / CONTROL_SOCKET)
            connection.start(_agent_of(record))
            with self._lock:
                self._connections[zone_id] = connection
        return connection.wait_client(timeout_s, still_worth_it=lambda: self._alive(record))

    # -- stopping -----------------------------------------------------------------------------

    def _teardown(self, zone_id: str, record: ZoneRecord | None, *, grace_s: float) -> None:
        if record is not None and self._state(record) == ZoneState.RUNNING:
            try:
                client = self._client(zone_id, record, min(self._reconnect_timeout_s, 5.0))
                client.shutdown(grace_s)
            except (ZoneError, AgentError, AgentGone) as exc:
                log.warning("zone: no clean shutdown, killing it", zone_id=zone_id, reason=str(exc))
        with self._lock:
            connection = self._connections.pop(zone_id, None)
            child = self._children.pop(zone_id, None)
        if connection is not None:
            connection.close()
        if record is not None:
            self._kill(record, child)
        self._kill_unrecorded(zone_id)
        self._cleanup(zone_id)

    def _kill_unrecorded(self, zone_id: str) -> None:
        """Processes of this zone no record names (a runtime killed between spawning the zone
        and recording its pids), found by the --zone-dir argument they all carry."""
        _kill_with_argument(f"--zone-dir={self.zone_dir(zone_id)}")

    def _kill(self, record: ZoneRecord, child: subprocess.Popen[bytes] | None) -> None:
        """SIGKILL the zone's init (the kernel then kills its whole pid namespace) and wait
        until unshare, which reaps it, exits too; unshare is killed only if it lingers (killed
        first, it would leave the init's zombie to the host's init)."""
        zone_id = record.spec.zone_id
        if record.agent is not None and pids.alive(record.agent):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.agent.pid, signal.SIGKILL)
        if not _wait_gone(record.unshare, child, EXIT_WAIT_S / 2):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.unshare.pid, signal.SIGKILL)
            if not _wait_gone(record.unshare, child, EXIT_WAIT_S / 2):
                raise ZoneError(f"zone {zone_id}: unshare {record.unshare.pid} survived SIGKILL")
        if record.agent is not None and not _wait_gone(record.agent, None, EXIT_WAIT_S):
            raise ZoneError(f"zone {zone_id}: agent {record.agent.pid} survived SIGKILL")

    def _cleanup(self, zone_id: str) -> None:
        """Whatever a dead zone can leave on the host: mounts under its dir (none with a
        private mount namespace, but a crashed setup may differ), its cgroups, its dir."""
        directory = self.zone_dir(zone_id)
        for mount_point in _mounts_under(directory):
            with contextlib.suppress(OSError):
                unmount(mount_point)
        cgroup = f"{self._cgroup_root}/{zone_id}"
        for top in cgroups.read_layout().directories(cgroup):
            _remove_cgroup_tree(top)
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            raise ZoneError(f"zone {zone_id}: could not remove {directory}")

    # -- records ------------------------------------------------------------------------------

    def _read_record(self, zone_id: str) -> ZoneRecord | None:
        return records.read_record(self.zone_dir(zone_id), ZoneRecord)

    def _write_record(self, record: ZoneRecord, directory: Path) -> None:
        records.write_record(directory, record)

    def _alive(self, record: ZoneRecord) -> bool:
        return pids.alive(record.agent or record.unshare)

    def _state(self, record: ZoneRecord) -> ZoneState:
        return ZoneState.RUNNING if self._alive(record) else ZoneState.EXITED

    def _info(self, zone_id: str, record: ZoneRecord) -> ZoneInfo:
        return ZoneInfo(
            zone_id=zone_id,
            state=self._state(record),
            started_at=record.started_at,
            pid=record.agent.pid if record.agent is not None else None,
        )

    def _agent_log_tail(self, zone_id: str) -> str:
        return _tail(self.zone_dir(zone_id) / AGENT_LOG)

    def _forget(self, zone_id: str) -> None:
        with self._lock:
            connection = self._connections.pop(zone_id, None)
            self._children.pop(zone_id, None)
        if connection is not None:
            connection.close()


def _wait_past_nice(pid: int) -> None:
    """Until ``nice`` has set the standby's priority and exec'd unshare (at once, normally):
    a standby taken earlier would get its zone priority back before nice lowered it."""
    deadline = time.monotonic() + EXIT_WAIT_S
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "nice":
                return
        except OSError:
            return  # exited: the caller finds out
        time.sleep(0.001)


def _assign(standby: subprocess.Popen[bytes], flags: builtins.list[str]) -> None:
    """Hand a standby agent its zone: the flags a cold agent would get, as one JSON line."""
    assert standby.stdin is not None
    standby.stdin.write(json.dumps(flags).encode() + b"\n")
    standby.stdin.close()


def _kill_session(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL unshare and its agent (unshare's process group) and reap unshare."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(EXIT_WAIT_S)
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()


def _kill_with_argument(marker: str) -> None:
    """SIGKILL the processes whose command line has ``marker`` (and any that shows up meanwhile,
    e.g. forked by one of them) and wait until they are gone."""
    doomed: set[ProcessIdentity] = set()
    deadline = time.monotonic() + EXIT_WAIT_S
    while True:
        for pid in pids.with_argument(marker):
            identity = pids.identify(pid)
            if identity is not None and identity not in doomed:
                log.warning("killing a process no record names", marker=marker, pid=pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                doomed.add(identity)
        if not any(pids.alive(identity) for identity in doomed) or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return f"(no {path.name})"


def _wait_gone(
    identity: ProcessIdentity, child: subprocess.Popen[bytes] | None, timeout_s: float
) -> bool:
    """Wait until the process has exited (reaping it when it is our child)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if child is not None:
            child.poll()
        if not pids.alive(identity):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _agent_of(record: ZoneRecord) -> Callable[[int], bool]:
    """Who may serve as the zone's agent on its control socket: the child of the zone's
    unshare (the pid namespace's init), and only while that unshare is the one recorded."""

    def is_agent(pid: int) -> bool:
        current = pids.stat(pid)
        return (
            current is not None
            and current.ppid == record.unshare.pid
            and pids.alive(record.unshare)
        )

    return is_agent


def _mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory`` in our mount namespace, deepest first."""
    prefix = f"{directory.resolve()}/"
    found = []
    for line in cgroups.MOUNTINFO.read_text().splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = cgroups.unescape_mountinfo(fields[4])
            if f"{point}/".startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _remove_cgroup_tree(top: Path) -> None:
    """rmdir a cgroup and its children, bottom up (cgroupfs dirs cannot be removed with their
    control files); retry briefly while the kernel still counts exited tasks."""
    if not top.is_dir():
        return
    deadline = time.monotonic() + CGROUP_BUSY_S
    directories = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
    for directory in [*reversed(directories), top]:
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.warning("cgroup left behind", path=str(directory), error=str(exc))
                    break
                time.sleep(0.05)
