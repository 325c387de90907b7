"""Pod sandboxes and their containers: the lifecycle behind the CRI RuntimeService.

Records are written before the world changes (a sandbox is CREATING before its zone boots) and
updated after, so a runtime killed at any point restarts into a state `recover()` can finish:
half-made sandboxes are torn down, zones nobody owns are stopped, and zones that died while the
runtime was away show up as NOTREADY with their containers exited.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import structlog

from cri_runtime.agent import protocol as p
from cri_runtime.agent.client import AgentClient, AgentError, AgentGone
from cri_runtime.config import RuntimeConfig
from cri_runtime.containers import container_spec, resources_from_cri
from cri_runtime.cri.gen import api_pb2
from cri_runtime.errors import (
    AlreadyExists,
    CriError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from cri_runtime.gpu import GpuProxyClient, parse_quantity
from cri_runtime.images.store import Image, ImageStore
from cri_runtime.logs import LogRelay
from cri_runtime.state import (
    ContainerRecord,
    ContainerState,
    RuntimeState,
    SandboxRecord,
    SandboxState,
)
from cri_runtime.zones.base import (
    GpuAccess,
    NetworkMode,
    ZoneBackend,
    ZoneError,
    ZoneSpec,
    ZoneState,
)

log = structlog.stdlib.get_logger(__name__)

BOOT_TIMEOUT_ANNOTATION = "vgpu-isolated.io/zone-boot-timeout"
# StopPodSandbox terminates forcibly: kubelet has already stopped each container with its own
# grace period (StopContainer), as containerd assumes too.
ZONE_STOP_GRACE_S = 0.0
RECOVERY_WORKERS = 16


def new_id() -> str:
    return secrets.token_hex(32)


def to_ns(when: datetime | None) -> int:
    return 0 if when is None else int(when.timestamp() * 1_000_000_000)


class ZoneFailed(CriError):
    """The zone backend failed (boot, stop); the message carries the backend's own words."""


class PodManager:
    def __init__(
        self,
        config: RuntimeConfig,
        state: RuntimeState,
        backend: ZoneBackend,
        images: ImageStore,
        gpu: GpuProxyClient | None,
    ) -> None:
        self.config = config
        self.state = state
        self.backend = backend
        self.images = images
        self.gpu = gpu
        self._names = threading.Lock()
        self._pod_locks: dict[str, threading.Lock] = {}
        # Logs the agent cannot write on this host (Xen) are pulled from it (cri_runtime/logs.py)
        self.logs = (
            LogRelay(config.state_dir / "log-offsets", backend.agent, self._is_running)
            if backend.relays_logs
            else None
        )

    def close(self) -> None:
        """Stop relaying logs; zones and their containers keep running."""
        if self.logs is not None:
            self.logs.close()

    def _is_running(self, container_id: str) -> bool:
        record = self.state.containers.get(container_id)
        return record is not None and record.state == ContainerState.RUNNING

    @contextlib.contextmanager
    def _pod(self, sandbox_id: str) -> Iterator[None]:
        with self._names:
            lock = self._pod_locks.setdefault(sandbox_id, threading.Lock())
        with lock:
            yield

    # -- sandboxes --------------------------------------------------------------------------

    def run_sandbox(self, config: api_pb2.PodSandboxConfig, handler: str) -> SandboxRecord:
        md = config.metadata
        if not (md.name and md.uid and md.namespace):
            raise InvalidArgument("sandbox metadata needs name, uid and namespace")
        if handler not in self.config.handlers:
            raise InvalidArgument(
                f"unknown runtime handler {handler!r}; this runtime serves {self.config.handlers}"
            )
        sandbox_id = new_id()
        spec = self._zone_spec(sandbox_id, config)
        record = SandboxRecord(
            id=sandbox_id,
            created_at_ns=time.time_ns(),
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            config=config.SerializeToString(),
            name=md.name,
            uid=md.uid,
            namespace=md.namespace,
            attempt=md.attempt,
            runtime_handler=handler,
            state=SandboxState.CREATING,
            zone=spec,
            log_directory=config.log_directory,
        )
        with self._names:
            taken = [
                s for s in self.state.sandboxes.all() if s.reserved_name == record.reserved_name
            ]
            if taken:
                raise AlreadyExists(
                    f"sandbox name {record.reserved_name} is already used by {taken[0].id}"
                )
            self.state.sandboxes.put(record)
        bound = log.bind(sandbox=sandbox_id, pod=md.name, namespace=md.namespace)
        with self._pod(sandbox_id):
            try:
                if config.log_directory:
                    Path(config.log_directory).mkdir(parents=True, exist_ok=True)
                record = self._register_gpu(record, config, handler)
                zone = self.backend.boot(record.zone)
            except BaseException as exc:
                self._discard_sandbox(record)
                if isinstance(exc, ZoneError):
                    raise ZoneFailed(f"zone for pod {md.namespace}/{md.name}: {exc}") from exc
                raise
            record = record.model_copy(
                update={"state": SandboxState.READY, "address": zone.address}
            )
            self.state.sandboxes.put(record)
        bound.info(
            "sandbox ready", zone_pid=zone.pid, domid=zone.domid, gpu=record.zone.gpu is not None
        )
        return record

    def _zone_spec(self, sandbox_id: str, config: api_pb2.PodSandboxConfig) -> ZoneSpec:
        linux = config.linux
        res = linux.resources
        vcpus = 1
        if res.cpu_quota > 0 and res.cpu_period > 0:
            vcpus = max(1, math.ceil(res.cpu_quota / res.cpu_period))
        memory_mib = 512
        if res.memory_limit_in_bytes > 0:
            memory_mib = max(64, math.ceil(res.memory_limit_in_bytes / (1 << 20)))
        timeout = self.config.zone_boot_timeout_s
        if raw := config.annotations.get(BOOT_TIMEOUT_ANNOTATION):
            try:
                timeout = float(raw.removesuffix("s"))
            except ValueError:
                raise InvalidArgument(
                    f"annotation {BOOT_TIMEOUT_ANNOTATION}={raw!r}: expected seconds, e.g. 90s"
                ) from None
        host_net = linux.security_context.namespace_options.network == api_pb2.NODE
        return ZoneSpec(
            zone_id=sandbox_id,
            hostname=config.hostname,
            network=NetworkMode.NODE if host_net else NetworkMode.POD,
            vcpus=vcpus,
            memory_mib=memory_mib,
            boot_timeout_s=timeout,
        )

    def _register_gpu(
        self, record: SandboxRecord, config: api_pb2.PodSandboxConfig, handler: str
    ) -> SandboxRecord:
        if handler not in self.config.gpu_handlers:
            return record
        if self.backend.gpu_proxy_finds_zones:
            # gpu-proxy discovers the zone (Xen: its channel offers) and reads the quota the
            # backend writes for it; 0 leaves gpu-proxy's default
            raw = config.annotations.get(self.config.gpu_memory_annotation, "")
            gpu = GpuAccess(memory_limit=parse_quantity(raw) if raw else 0)
            zone = record.zone.model_copy(update={"gpu": gpu})
            record = record.model_copy(update={"zone": zone, "gpu_memory_limit": gpu.memory_limit})
            self.state.sandboxes.put(record)
            return record
        if self.gpu is None:
            log.warning("GPU pod without gpu-proxy (gpu_proxy_control is empty)", sandbox=record.id)
            return record
        raw = config.annotations.get(self.config.gpu_memory_annotation, "")
        limit = parse_quantity(raw) if raw else 0
        socket, limit = self.gpu.register(
            record.id,
            pod=record.name,
            namespace=record.namespace,
            pod_uid=record.uid,
            memory_limit=limit,
        )
        zone = record.zone.model_copy(
            update={"gpu": GpuAccess(proxy_socket=Path(socket), memory_limit=limit)}
        )
        record = record.model_copy(
            update={"zone": zone, "gpu_socket": socket, "gpu_memory_limit": limit}
        )
        self.state.sandboxes.put(record)
        return record

    def _discard_sandbox(self, record: SandboxRecord) -> None:
        """Undo a sandbox that never became ready: zone, GPU registration, record."""
        self._stop_zone_logged(record.id)
        self._unregister_gpu(record)
        self.state.sandboxes.delete(record.id)

    def _stop_zone_logged(self, zone_id: str) -> None:
        """Stop a zone where a failure must not stop the caller (clean-up, recovery): logged,
        and the zone is stopped again as an orphan by the next recovery."""
        try:
            self.backend.stop(zone_id, grace_s=0)
        except ZoneError as exc:
            log.error("could not stop a zone", zone=zone_id, error=str(exc))

    def _unregister_gpu(self, record: SandboxRecord) -> None:
        if not record.gpu_socket or self.gpu is None:
            return
        try:
            reclaimed = self.gpu.remove(record.id)
        except CriError as exc:
            log.error("gpu-proxy removal failed; retried on recovery", error=str(exc))
            return
        log.info("zone removed from gpu-proxy", sandbox=record.id, reclaimed=reclaimed)

    def sandbox(self, sandbox_id: str) -> SandboxRecord:
        record = self.state.sandboxes.get(sandbox_id)
        if record is None:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return record

    def stop_sandbox(self, sandbox_id: str) -> None:
        record = self.state.sandboxes.get(sandbox_id)
        if record is None:
            return
        with self._pod(sandbox_id):
            record = self.state.sandboxes.get(sandbox_id)
            if record is None:  # removed while we waited for the lock
                return
            # A NOTREADY sandbox may be one whose zone was found dead (_mark_dead), which
            # neither stopped the zone (directory, cgroups) nor removed it from gpu-proxy:
            # both steps are idempotent, so they run for it as well.
            self.refresh_containers(record)
            try:
                self.backend.stop(record.id, grace_s=ZONE_STOP_GRACE_S)
            except ZoneError as exc:
                raise ZoneFailed(f"stopping zone {record.id}: {exc}") from exc
            self._zone_gone(record, "the pod sandbox was stopped")
            self._unregister_gpu(record)
            if record.state != SandboxState.NOTREADY:
                self.state.sandboxes.put(record.model_copy(update={"state": SandboxState.NOTREADY}))
        log.info("sandbox stopped", sandbox=sandbox_id)

    def remove_sandbox(self, sandbox_id: str) -> None:
        if self.state.sandboxes.get(sandbox_id) is None:
            return
        self.stop_sandbox(sandbox_id)
        with self._pod(sandbox_id):
            for c in self.containers_of(sandbox_id):
                self._forget_log(c.id)
                self.images.release(c.id)
                self.state.containers.delete(c.id)
            self.state.sandboxes.delete(sandbox_id)
        with self._names:
            self._pod_locks.pop(sandbox_id, None)
        log.info("sandbox removed", sandbox=sandbox_id)

    def _zone_gone(self, record: SandboxRecord, why: str) -> None:
        """The zone no longer runs: every container in it that was not exited now is."""
        now = time.time_ns()
        for c in self.containers_of(record.id):
            if c.state in (ContainerState.CREATED, ContainerState.RUNNING):
                self.state.containers.replace(
                    c.model_copy(
                        update={
                            "state": ContainerState.EXITED,
                            "finished_at_ns": now,
                            "exit_code": 137 if c.state == ContainerState.RUNNING else 0,
                            "reason": "Error" if c.state == ContainerState.RUNNING else "",
                            "message": why,
                        }
                    )
                )

    def containers_of(self, sandbox_id: str) -> list[ContainerRecord]:
        return [c for c in self.state.containers.all() if c.sandbox_id == sandbox_id]

    # -- the agent --------------------------------------------------------------------------

    def _agent(self, record: SandboxRecord) -> AgentClient:
        if record.state != SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {record.id} is not ready")
        try:
            return self.backend.agent(record.id)
        except ZoneError as exc:
            if self._zone_running(record.id):
                raise Unavailable(
                    f"pod sandbox {record.id}: its zone runs but its agent does not answer: {exc}"
                ) from exc
            self._mark_dead(record, str(exc))
            raise FailedPrecondition(
                f"pod sandbox {record.id}: zone is not running: {exc}"
            ) from exc

    def _zone_running(self, zone_id: str) -> bool:
        """What the backend sees from the host: a slow agent is not a dead zone."""
        return any(
            z.zone_id == zone_id and z.state == ZoneState.RUNNING for z in self.backend.list()
        )

    def _mark_dead(self, record: SandboxRecord, why: str) -> None:
        log.warning("zone died", sandbox=record.id, reason=why)
        self._zone_gone(record, f"zone exited: {why}")
        # replace, not put: callers without the pod lock (List/Status refreshes) must not bring
        # back a sandbox RemovePodSandbox deleted meanwhile
        self.state.sandboxes.replace(record.model_copy(update={"state": SandboxState.NOTREADY}))

    def _apply(self, record: ContainerRecord, info: p.ContainerInfo) -> ContainerRecord:
        state = {
            p.ContainerState.CREATED: ContainerState.CREATED,
            p.ContainerState.RUNNING: ContainerState.RUNNING,
            p.ContainerState.EXITED: ContainerState.EXITED,
        }[info.state]
        if state == ContainerState.EXITED and record.state != ContainerState.EXITED:
            self._drain_log(record.id)  # the log is whole before the status says EXITED
        updated = record.model_copy(
            update={
                "state": state,
                "started_at_ns": to_ns(info.started_at),
                "finished_at_ns": to_ns(info.finished_at),
                "exit_code": info.exit_code or 0,
                "reason": info.reason,
                "message": info.message,
            }
        )
        if updated != record:
            # replace, not put: a refresh runs without the pod lock, and must not bring back a
            # container RemoveContainer deleted while the agent answered
            self.state.containers.replace(updated)
        return updated

    def _drain_log(self, container_id: str) -> None:
        if self.logs is not None and self.logs.tracked(container_id):
            self.logs.drain(container_id)

    def _forget_log(self, container_id: str) -> None:
        if self.logs is not None:
            self.logs.forget(container_id)

    def _relay_log(self, record: ContainerRecord) -> None:
        """Pull the container's log to its host file (backends whose agent cannot write it)."""
        if self.logs is not None and record.log_path:
            self.logs.track(record.id, record.sandbox_id, Path(record.log_path))

    def refresh_containers(self, record: SandboxRecord, *, forget_unknown: bool = False) -> None:
        """Bring the sandbox's live container records up to date with its agent. With
        ``forget_unknown`` (recovery, before serving: no CreateContainer can be in flight),
        records the agent does not know — a runtime killed between writing the record and the
        agent's CREATE — become EXITED instead of holding their name and image forever."""
        live = [
            c
            for c in self.containers_of(record.id)
            if c.state in (ContainerState.CREATED, ContainerState.RUNNING)
        ]
        if not live or record.state != SandboxState.READY:
            return
        try:
            infos = {i.container_id: i for i in self.backend.agent(record.id).list()}
        except (ZoneError, AgentGone) as exc:
            if self._zone_running(record.id):
                log.warning("zone agent not answering", sandbox=record.id, error=str(exc))
            else:
                self._mark_dead(record, str(exc))
            return
        for c in live:
            info = infos.get(c.id)
            if info is not None:
                self._apply(c, info)
            elif forget_unknown:
                self.state.containers.replace(
                    c.model_copy(
                        update={
                            "state": ContainerState.EXITED,
                            "finished_at_ns": time.time_ns(),
                            "exit_code": 255,
                            "reason": "Error",
                            "message": "unknown to the zone agent (the runtime stopped mid-create)",
                        }
                    )
                )

    # -- containers -------------------------------------------------------------------------

    def create_container(
        self,
        sandbox_id: str,
        config: api_pb2.ContainerConfig,
        sandbox_config: api_pb2.PodSandboxConfig,
    ) -> ContainerRecord:
        if not config.metadata.name:
            raise InvalidArgument("container metadata needs a name")
        if not config.image.image:
            raise InvalidArgument(f"container {config.metadata.name!r}: no image given")
        if config.mounts and not self.backend.shares_host_paths:
            paths = ", ".join(m.host_path for m in config.mounts)
            raise FailedPrecondition(
                f"container {config.metadata.name!r}: the {self.backend.name} zone backend "
                f"cannot mount host paths into a zone yet ({paths})"
            )
        with self._pod(sandbox_id):
            sandbox = self.sandbox(sandbox_id)
            agent = self._agent(sandbox)
            image = self.images.resolve(config.image.image)
            if image is None:
                raise NotFound(f"image {config.image.image!r} is not present: pull it first")
            container_id = new_id()
            self.images.hold(image.id, container_id)  # before layer_dirs: no removal in between
            try:
                record, spec = self._new_container(container_id, sandbox, config, image)
                self.state.containers.put(record)
                info = agent.create(spec)
            except BaseException as exc:
                self._undo_rootfs(sandbox_id, container_id)
                self.state.containers.delete(container_id)
                self.images.release(container_id)
                if isinstance(exc, ZoneError):
                    raise ZoneFailed(f"container {config.metadata.name!r}: {exc}") from exc
                raise
            self._relay_log(record)
            record = self._apply(record, info)
        log.info("container created", sandbox=sandbox_id, container=container_id, name=record.name)
        return record

    def _undo_rootfs(self, sandbox_id: str, container_id: str) -> None:
        """Release what the backend gave the zone for a container that was not created."""
        try:
            self.backend.release_rootfs(sandbox_id, container_id)
        except ZoneError as exc:
            log.error("container rootfs not released", container=container_id, error=str(exc))

    def _new_container(
        self,
        container_id: str,
        sandbox: SandboxRecord,
        config: api_pb2.ContainerConfig,
        image: Image,
    ) -> tuple[ContainerRecord, p.ContainerSpec]:
        log_path = None
        if sandbox.log_directory and config.log_path:
            log_path = Path(sandbox.log_directory) / config.log_path
            log_path.parent.mkdir(parents=True, exist_ok=True)
        record = ContainerRecord(
            id=container_id,
            created_at_ns=time.time_ns(),
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            config=config.SerializeToString(),
            sandbox_id=sandbox.id,
            name=config.metadata.name,
            attempt=config.metadata.attempt,
            image=config.image.image,
            image_id=image.id,
            image_ref=image.repo_digests[0] if image.repo_digests else image.id,
            log_path=str(log_path or ""),
        )
        name = record.reserved_name
        taken = [c for c in self.containers_of(sandbox.id) if c.reserved_name == name]
        if taken:  # before the rootfs: a Xen zone would get the image's disk for nothing
            raise AlreadyExists(f"container name {name} is already used by {taken[0].id}")
        layers, image_disk = self.backend.container_rootfs(
            sandbox.id, container_id, image.id, self.images.layer_dirs(image)
        )
        spec = container_spec(
            container_id,
            config,
            image.config,
            list(layers),
            hostname=sandbox.zone.hostname,
            log_path=log_path,
            gpu=sandbox.zone.gpu is not None,
        )
        if image_disk is not None:
            spec = spec.model_copy(update={"image_disk": image_disk})
        if self.logs is not None and log_path is not None:  # the host's file is not the zone's
            spec = spec.model_copy(update={"log_path": None, "log_relay": True})
        return record, spec

    def container(self, container_id: str) -> ContainerRecord:
        record = self.state.containers.get(container_id)
        if record is None:
            raise NotFound(f"container {container_id!r} not found")
        return record

    def start_container(self, container_id: str) -> None:
        record = self.container(container_id)
        with self._pod(record.sandbox_id):
            record = self.container(container_id)
            if record.state != ContainerState.CREATED:
                raise FailedPrecondition(
                    f"container {container_id} is {record.state.value}, not created"
                )
            agent = self._agent(self.sandbox(record.sandbox_id))
            try:
                info = agent.start(container_id)
            except AgentError:
                # the OCI runtime could not run it: the agent has it EXITED (ContainerCannotRun)
                with contextlib.suppress(AgentError, AgentGone):
                    self._apply(record, agent.status(container_id))
                raise
            self._apply(record, info)
        log.info("container started", container=container_id)

    def stop_container(self, container_id: str, timeout_s: float) -> None:
        record = self.state.containers.get(container_id)
        if record is None:
            return
        with self._pod(record.sandbox_id):
            current = self.state.containers.get(container_id)
            if current is None or current.state == ContainerState.EXITED:
                return  # removed while we waited for the lock, or already stopped
            record = current
            sandbox = self.state.sandboxes.get(record.sandbox_id)
            if sandbox is None or sandbox.state != SandboxState.READY:
                return
            try:
                agent = self._agent(sandbox)
            except FailedPrecondition:
                return  # the zone is gone (_agent marked it dead): the container has exited
        # The grace period runs without the pod lock, so kubelet's parallel stops of one pod's
        # containers overlap; the agent orders operations on one container, and _apply only
        # updates a record that still exists.
        try:
            info = agent.stop(container_id, timeout_s)
        except AgentGone as exc:
            self._mark_dead(sandbox, str(exc))
            return
        self._apply(record, info)
        log.info("container stopped", container=container_id, exit_code=info.exit_code)

    def remove_container(self, container_id: str) -> None:
        record = self.state.containers.get(container_id)
        if record is None:
            return
        with self._pod(record.sandbox_id):
            sandbox = self.state.sandboxes.get(record.sandbox_id)
            if sandbox is not None and sandbox.state == SandboxState.READY:
                try:
                    self._agent(sandbox).remove(container_id)  # kills it first if it runs
                except AgentError as exc:
                    if exc.status != p.AgentStatus.NOT_FOUND:
                        raise
                except (AgentGone, FailedPrecondition) as exc:
                    log.warning("zone gone while removing a container", error=str(exc))
                try:
                    self.backend.release_rootfs(record.sandbox_id, container_id)
                except ZoneError as exc:
                    raise ZoneFailed(f"removing container {container_id}: {exc}") from exc
            self._forget_log(container_id)
            self.images.release(container_id)
            self.state.containers.delete(container_id)
        log.info("container removed", container=container_id)

    def container_status(self, container_id: str) -> ContainerRecord:
        record = self.container(container_id)
        if record.state in (ContainerState.CREATED, ContainerState.RUNNING):
            self.refresh_containers(self.sandbox(record.sandbox_id))
        return self.container(container_id)

    def list_containers(self) -> list[ContainerRecord]:
        for sandbox in self.state.sandboxes.all():
            if sandbox.state == SandboxState.READY:
                self.refresh_containers(sandbox)
        return self.state.containers.all()

    def _running_agent(self, container_id: str, what: str) -> tuple[ContainerRecord, AgentClient]:
        record = self.container_status(container_id)
        if record.state != ContainerState.RUNNING:
            raise FailedPrecondition(
                f"cannot {what} container {container_id}: it is {record.state.value}"
            )
        return record, self._agent(self.sandbox(record.sandbox_id))

    def exec_sync(self, container_id: str, cmd: list[str], timeout_s: float) -> p.ExecResult:
        if not cmd:
            raise InvalidArgument("exec needs a command")
        _, agent = self._running_agent(container_id, "exec in")
        result = agent.exec_sync(container_id, cmd, timeout_s)
        if result.timed_out:
            raise DeadlineExceeded(
                f"command {cmd!r} in container {container_id} timed out after {timeout_s:g} s"
            )
        return result

    def reopen_log(self, container_id: str) -> None:
        _, agent = self._running_agent(container_id, "reopen the log of")
        if self.logs is not None and self.logs.tracked(container_id):
            self.logs.reopen(container_id)  # the file is the runtime's, not the agent's
        else:
            agent.reopen_log(container_id)

    def update_resources(self, container_id: str, res: api_pb2.LinuxContainerResources) -> None:
        record, agent = self._running_agent(container_id, "update")
        self._apply(record, agent.update_resources(container_id, resources_from_cri(res)))

    def stats(self, record: ContainerRecord) -> p.Stats | None:
        """Stats of a container its caller has just refreshed; None unless it runs."""
        if record.state != ContainerState.RUNNING:
            return None
        try:
            return self._agent(self.sandbox(record.sandbox_id)).stats(record.id)
        except (AgentError, AgentGone) as exc:
            log.warning("no stats", container=record.id, error=str(exc))
            return None

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> None:
        """Reconcile records with the zones that exist after a restart."""
        zones = {z.zone_id: z for z in self.backend.list()}
        running: list[SandboxRecord] = []
        for record in self.state.sandboxes.all():
            zone = zones.pop(record.id, None)
            if record.state == SandboxState.CREATING:
                log.warning("finishing a sandbox a crash left half-made", sandbox=record.id)
                for c in self.containers_of(record.id):
                    self.images.release(c.id)
                    self.state.containers.delete(c.id)
                self._discard_sandbox(record)
            elif record.state == SandboxState.READY:
                if zone is None or zone.state != ZoneState.RUNNING:
                    self._mark_dead(record, "found stopped when the runtime started")
                    if zone is not None:
                        self._stop_zone_logged(record.id)
                    self._unregister_gpu(record)
                else:
                    running.append(record)
            elif zone is not None:
                self._stop_zone_logged(record.id)
        for sandbox in running:  # before the refresh, which drains the logs of exited ones
            for c in self.containers_of(sandbox.id):
                if c.state != ContainerState.EXITED:
                    self._relay_log(c)  # from the offset the last runtime recorded
        # Each zone's agent reconnects on its own schedule (up to a second apart): wait for them
        # side by side, not one after another, before the runtime listens.
        with ThreadPoolExecutor(RECOVERY_WORKERS, thread_name_prefix="recover") as pool:
            list(pool.map(lambda r: self.refresh_containers(r, forget_unknown=True), running))
        for orphan in zones.values():
            log.warning("stopping a zone no sandbox owns", zone=orphan.zone_id, pid=orphan.pid)
            self._stop_zone_logged(orphan.zone_id)
        if self.gpu is not None:
            self._reconcile_gpu()
        for c in self.state.containers.all():
            if self.state.sandboxes.get(c.sandbox_id) is None:
                self.images.release(c.id)
                self.state.containers.delete(c.id)
        log.info(
            "state recovered",
            sandboxes=len(self.state.sandboxes.all()),
            containers=len(self.state.containers.all()),
        )

    def _reconcile_gpu(self) -> None:
        assert self.gpu is not None
        try:
            registered = self.gpu.zones()
        except CriError as exc:
            log.warning("gpu-proxy not reachable during recovery", error=str(exc))
            return
        ours = {
            s.id
            for s in self.state.sandboxes.all()
            if s.gpu_socket and s.state == SandboxState.READY
        }
        for zone in registered:
            is_sandbox_id = len(zone) == 64 and all(ch in "0123456789abcdef" for ch in zone)
            if is_sandbox_id and zone not in ours:
                log.warning("removing a gpu-proxy zone no running sandbox owns", zone=zone)
                with contextlib.suppress(CriError):
                    self.gpu.remove(zone)
