"""The zone's containers: what each request does, and each container's lifecycle.

Per container: an overlay rootfs (image layers + an upper dir under the zone dir), a bundle with
the generated config.json, two pipes whose output becomes the CRI log, and the container's init
process, which the OCI runtime leaves to us (we are the subreaper): its exit status arrives from
the reaper. CREATE prepares the rootfs and the bundle; START runs the OCI runtime's create and
start, as containerd creates its task in StartContainer (a created container has no process). A
container whose OCI create or start fails has exited: reason ContainerCannotRun, exit code 128
(containerd's code for a start error), the runtime's message. Operations on one container are
serialized by its lock; different containers (and STATUS/LIST/STATS/EXEC) proceed in parallel.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import uuid
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import structlog

from cri_runtime.agent import cgroups, oci, rootfs
from cri_runtime.agent.cgroups import CgroupLayout
from cri_runtime.agent.client import AgentError
from cri_runtime.agent.config import AgentConfig
from cri_runtime.agent.crilog import CriLog, CriLogBuffer, LogSink, start_pump
from cri_runtime.agent.image_disks import ImageMounts
from cri_runtime.agent.oci_runtime import OciRuntime
from cri_runtime.agent.protocol import (
    AgentStatus,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    ExecResult,
    LogChunk,
    Resources,
    Stats,
)
from cri_runtime.agent.reaper import Reaper, exit_code

log = structlog.get_logger(__name__)

KILL_WAIT_S = 10.0  # how long a SIGKILLed container may take to be reaped
LOG_DRAIN_S = 2.0  # after the exit, how long its output may take to reach the log
CANNOT_RUN = "ContainerCannotRun"
CANNOT_RUN_EXIT_CODE = 128


def now() -> datetime:
    return datetime.now(UTC)


class Container:
    def __init__(self, spec: ContainerSpec, directory: Path, cgroups_path: str) -> None:
        self.spec = spec
        self.id = spec.container_id
        self.dir = directory
        self.bundle = directory / "bundle"
        self.rootfs = self.bundle / "rootfs"
        self.upper = directory / "upper"
        self.work = directory / "work"
        self.cgroups_path = cgroups_path
        self.created_at = now()
        self.state = ContainerState.CREATED
        self.pid = 0
        self.started_at: datetime | None = None
        self.finished_at: datetime | None = None
        self.exit_code: int | None = None
        self.reason = ""
        self.message = ""
        self.log_sink: LogSink | None = None
        self.pumps: list[threading.Thread] = []
        self.exited = threading.Event()  # set once the exit is recorded and the log drained
        self.op_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self._pidfd: int | None = None
        self.log = log.bind(container_id=self.id)

    def info(self) -> ContainerInfo:
        with self.state_lock:
            return ContainerInfo(
                container_id=self.id,
                state=self.state,
                pid=self.pid if self.state != ContainerState.EXITED else 0,
                created_at=self.created_at,
                started_at=self.started_at,
                finished_at=self.finished_at,
                exit_code=self.exit_code,
                reason=self.reason,
                message=self.message,
            )

    def watch(self, pid: int, pidfd: int | None) -> None:
        with self.state_lock:
            self.pid = pid
            self._pidfd = pidfd

    def signal(self, sig: int) -> None:
        """Signal the container's init through its pidfd (never a reused pid)."""
        with self.state_lock:
            if self._pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, sig)

    def record_exit(self, code: int, finished_at: datetime, reason: str, message: str = "") -> None:
        with self.state_lock:
            self.state = ContainerState.EXITED
            self.exit_code = code
            self.finished_at = finished_at
            self.reason = reason
            self.message = message
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        self.exited.set()


class ContainerManager:
    def __init__(
        self, config: AgentConfig, runtime: OciRuntime, reaper: Reaper, layout: CgroupLayout
    ) -> None:
        self._config = config
        self._runtime = runtime
        self._reaper = reaper
        self._layout = layout
        self._dir = config.zone_dir / "containers"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._bounding_caps = _bounding_capabilities()
        self._gpu = (
            oci.GpuMounts(config.gpu_proxy_socket, config.libvgpu, config.gpu_link)
            if config.gpu_proxy_socket is not None
            else None
        )
        self._libvgpu_absence_logged = False
        self._image_mounts = ImageMounts()
        self._lock = threading.Lock()
        self._containers: dict[str, Container] = {}
        self._creating: set[str] = set()

    # -- requests ---------------------------------------------------------------------------

    def create(self, spec: ContainerSpec) -> ContainerInfo:
        cid = spec.container_id
        with self._lock:
            if cid in self._containers or cid in self._creating:
                raise AgentError(AgentStatus.ALREADY_EXISTS, f"container {cid} already exists")
            self._creating.add(cid)
        try:
            container = self._create(spec)
        except BaseException:
            with self._lock:
                self._creating.discard(cid)
            raise
        with self._lock:
            self._creating.discard(cid)
            self._containers[cid] = container
        container.log.info("container created", name=spec.name)
        return container.info()

    def start(self, container_id: str) -> ContainerInfo:
        c = self._get(container_id)
        with c.op_lock:
            with c.state_lock:
                if c.state != ContainerState.CREATED:
                    raise AgentError(AgentStatus.INVALID, f"container is {c.state}, not created")
                # before the start, so that started_at <= finished_at even for instant exits
                c.started_at = now()
            try:
                self._launch(c)
            except AgentError as exc:
                self._cannot_run(c, str(exc))
                raise
            with c.state_lock:
                if c.state == ContainerState.CREATED:
                    c.state = ContainerState.RUNNING
        c.log.info("container started", pid=c.pid)
        return c.info()

    def stop(self, container_id: str, timeout_s: float) -> ContainerInfo:
        """The image's stop signal, then SIGKILL after ``timeout_s``; waits for the exit."""
        c = self._get(container_id)
        with c.op_lock:
            self._stop(c, timeout_s)
        return c.info()

    def remove(self, container_id: str) -> None:
        c = self._get(container_id)
        with c.op_lock:
            self._stop(c, 0)
            self._runtime.delete(container_id)
            self._discard(c)
        with self._lock:
            self._containers.pop(container_id, None)
        c.log.info("container removed")

    def status(self, container_id: str) -> ContainerInfo:
        return self._get(container_id).info()

    def list(self) -> list[ContainerInfo]:
        with self._lock:
            containers = list(self._containers.values())
        return [c.info() for c in containers]

    def exec_sync(self, container_id: str, cmd: tuple[str, ...], timeout_s: float) -> ExecResult:
        c = self._get(container_id)
        if c.info().state != ContainerState.RUNNING:
            raise AgentError(AgentStatus.INVALID, f"container is {c.info().state}, not running")
        pid_file = c.dir / f"exec-{uuid.uuid4().hex}.pid"
        return self._runtime.exec(container_id, cmd, pid_file, timeout_s)

    def reopen_log(self, container_id: str) -> None:
        c = self._get(container_id)
        if c.log_sink is not None:
            try:
                c.log_sink.reopen()
            except OSError as exc:
                raise AgentError(AgentStatus.FAILED, f"reopen {c.spec.log_path}: {exc}") from exc

    def read_log(self, container_id: str, offset: int | None, max_bytes: int) -> LogChunk:
        """The next piece of a relayed container's log; ``complete`` once it exited and its
        output is all read."""
        c = self._get(container_id)
        sink = c.log_sink
        if not isinstance(sink, CriLogBuffer):
            raise AgentError(AgentStatus.INVALID, "the container's log is a file, not relayed")
        # exited and every pump done: nothing more can be written (checked before the read)
        finished = c.exited.is_set() and not any(p.is_alive() for p in c.pumps)
        try:
            start, data = sink.read(offset, max_bytes)
        except ValueError as exc:
            raise AgentError(AgentStatus.INVALID, str(exc)) from exc
        return LogChunk(
            offset=start, data=data, complete=finished and start + len(data) == sink.end
        )

    def stats(self, container_id: str) -> Stats:
        c = self._get(container_id)
        use = cgroups.usage(self._layout, c.cgroups_path)
        size, inodes = rootfs.usage(c.upper)
        return Stats(
            container_id=container_id,
            timestamp=now(),
            cpu_usage_ns=use.cpu_usage_ns,
            memory_working_set_bytes=use.memory_working_set_bytes,
            writable_layer_bytes=size,
            writable_layer_inodes=inodes,
        )

    def update_resources(self, container_id: str, resources: Resources) -> ContainerInfo:
        c = self._get(container_id)
        with c.op_lock:
            if c.exited.is_set():
                raise AgentError(AgentStatus.INVALID, "container has exited")
            if c.info().state == ContainerState.CREATED:  # no process yet: START uses the spec
                c.spec = c.spec.model_copy(update={"resources": resources})
                (c.bundle / "config.json").write_text(json.dumps(self._runtime_spec(c)))
                return c.info()
            self._runtime.update(container_id, oci.resources_json(resources))
            if resources.oom_score_adj != c.spec.resources.oom_score_adj:
                try:
                    Path(f"/proc/{c.pid}/oom_score_adj").write_text(str(resources.oom_score_adj))
                except OSError as exc:
                    raise AgentError(AgentStatus.FAILED, f"oom_score_adj: {exc}") from exc
            c.spec = c.spec.model_copy(update={"resources": resources})
        return c.info()

    def shutdown(self, grace_s: float) -> None:
        """Stop every container (all at once, each with ``grace_s``) and remove them."""
        with self._lock:
            ids = list(self._containers)

        def stop_and_remove(container_id: str) -> None:
            try:
                self.stop(container_id, grace_s)
                self.remove(container_id)
            except AgentError as exc:
                log.warning(
                    "shutdown: container not removed", container_id=container_id, error=str(exc)
                )

        threads = [threading.Thread(target=stop_and_remove, args=(cid,)) for cid in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # -- internals --------------------------------------------------------------------------

    def _get(self, container_id: str) -> Container:
        with self._lock:
            c = self._containers.get(container_id)
        if c is None:
            raise AgentError(AgentStatus.NOT_FOUND, f"no container {container_id}")
        return c

    def _create(self, spec: ContainerSpec) -> Container:
        c = Container(
            spec,
            self._dir / spec.container_id,
            f"{self._config.containers_cgroup}/{spec.container_id}",
        )
        for directory in (c.rootfs, c.upper, c.work):
            directory.mkdir(parents=True)
        try:
            if spec.image_disk is not None:
                self._image_mounts.acquire(spec.image_disk, c.id)
            try:
                rootfs.mount_overlay(spec.rootfs_layers, c.upper, c.work, c.rootfs)
            except ValueError as exc:
                raise AgentError(AgentStatus.INVALID, str(exc)) from exc
            except OSError as exc:
                raise AgentError(AgentStatus.FAILED, str(exc)) from exc
            (c.bundle / "config.json").write_text(json.dumps(self._runtime_spec(c)))
            try:
                c.log_sink = CriLogBuffer() if spec.log_relay else CriLog(spec.log_path)
            except OSError as exc:
                raise AgentError(AgentStatus.FAILED, f"open log {spec.log_path}: {exc}") from exc
            return c
        except BaseException:
            self._discard(c)
            raise

    def _launch(self, c: Container) -> None:
        """The OCI runtime's create, with our pipes as the container's stdout/stderr, then its
        start. The container's init is watched from its create on."""
        assert c.log_sink is not None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        c.pumps = [
            start_pump(out_r, "stdout", c.log_sink, f"stdout-{c.id[:12]}"),
            start_pump(err_r, "stderr", c.log_sink, f"stderr-{c.id[:12]}"),
        ]
        try:
            pid = self._runtime.create(c.id, c.bundle, c.dir / "pid", stdout=out_w, stderr=err_w)
        finally:
            os.close(out_w)
            os.close(err_w)
        c.watch(pid, self._reaper.watch(pid, partial(self._exited, c)))
        self._runtime.start(c.id)

    def _cannot_run(self, c: Container, message: str) -> None:
        """The OCI runtime failed to create or start the container: it has exited, whatever
        the reaper recorded for an init the runtime's create left behind (killed here)."""
        with c.state_lock:
            launched = c.pid != 0
        if launched:
            c.signal(signal.SIGKILL)
            if not c.exited.wait(KILL_WAIT_S):
                c.log.warning("a container that could not run did not exit after SIGKILL")
        for pump in c.pumps:
            pump.join(LOG_DRAIN_S)
        c.record_exit(CANNOT_RUN_EXIT_CODE, now(), CANNOT_RUN, message)
        c.log.warning("container cannot run", error=message)

    def _runtime_spec(self, c: Container) -> dict[str, object]:
        spec = c.spec
        try:
            passwd = rootfs.read_file_in_root(c.rootfs, "/etc/passwd") or ""
            group = rootfs.read_file_in_root(c.rootfs, "/etc/group") or ""
        except OSError as exc:
            raise AgentError(AgentStatus.INVALID, f"image's /etc/passwd or group: {exc}") from exc
        gpu = self._gpu
        if spec.gpu and gpu is not None and (gpu.libvgpu is None or not gpu.libvgpu.is_file()):
            self._log_libvgpu_absent()
            gpu = oci.GpuMounts(gpu.proxy_socket, None, gpu.link)
        try:
            user = oci.resolve_user(spec.user, passwd, group)
            return oci.runtime_spec(
                spec,
                user=user,
                zone_hostname=socket.gethostname(),
                cgroups_path=c.cgroups_path,
                bounding_caps=self._bounding_caps,
                gpu=gpu,
            )
        except ValueError as exc:
            raise AgentError(AgentStatus.INVALID, str(exc)) from exc

    def _log_libvgpu_absent(self) -> None:
        if not self._libvgpu_absence_logged:
            self._libvgpu_absence_logged = True
            log.warning(
                "libvgpu is not installed: gpu containers get the gpu-proxy socket only",
                libvgpu=str(self._config.libvgpu or ""),
            )

    def _stop(self, c: Container, timeout_s: float) -> None:
        if c.exited.is_set():
            return
        if c.info().state == ContainerState.CREATED:  # never started: there is no process
            c.record_exit(0, now(), "", "stopped before it was started")
            return
        if timeout_s > 0 and c.info().state == ContainerState.RUNNING:
            c.signal(c.spec.stop_signal)
            if c.exited.wait(timeout_s):
                return
            c.log.info("container ignored its stop signal; killing", timeout_s=timeout_s)
        c.signal(signal.SIGKILL)
        if not c.exited.wait(KILL_WAIT_S):
            raise AgentError(AgentStatus.FAILED, "container did not exit after SIGKILL")

    def _exited(self, c: Container, wait_status: int) -> None:
        """Reaper thread: note the time, then finish off the reaper's thread."""
        finished_at = now()
        code = exit_code(wait_status)
        threading.Thread(
            target=self._record_exit,
            args=(c, code, finished_at),
            name=f"exit-{c.id[:12]}",
            daemon=True,
        ).start()

    def _record_exit(self, c: Container, code: int, finished_at: datetime) -> None:
        for pump in c.pumps:
            pump.join(LOG_DRAIN_S)
        if cgroups.oom_killed(self._layout, c.cgroups_path):
            reason = "OOMKilled"
        else:
            reason = "Completed" if code == 0 else "Error"
        c.record_exit(code, finished_at, reason)
        c.log.info("container exited", exit_code=code, reason=reason)

    def _discard(self, c: Container) -> None:
        """Undo a container on the zone's side: rootfs, log, directories."""
        try:
            rootfs.unmount(c.rootfs)
        except OSError as exc:
            c.log.warning("rootfs not unmounted", error=str(exc))
        try:
            self._image_mounts.release(c.id)
        except AgentError as exc:
            c.log.warning("image disk not unmounted", error=str(exc))
        if isinstance(c.log_sink, CriLogBuffer):
            c.log_sink.close()  # a relayed log nobody reads any more must not block the pumps
        for pump in c.pumps:
            pump.join(LOG_DRAIN_S)
        if c.log_sink is not None:
            c.log_sink.close()
        shutil.rmtree(c.dir, ignore_errors=True)


def _bounding_capabilities() -> int:
    """The agent's capability bounding set: what its containers can be given at most."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise OSError("no CapBnd in /proc/self/status")
