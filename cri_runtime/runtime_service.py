"""The CRI v1 RuntimeService: protobuf in and out, lifecycle in PodManager.

Every handler goes through `cri_call`, which turns our exceptions into the gRPC status kubelet
acts on (NotFound, InvalidArgument, ...) with a message an operator can act on, and logs it.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import structlog

from cri_runtime.agent import protocol as p
from cri_runtime.agent.client import AgentError, AgentGone
from cri_runtime.cri.gen import api_pb2, api_pb2_grpc
from cri_runtime.cri.gen.api_pb2 import UInt64Value
from cri_runtime.errors import CriError
from cri_runtime.images import errors as image_errors
from cri_runtime.pods import PodManager
from cri_runtime.state import ContainerRecord, ContainerState, SandboxRecord, SandboxState
from cri_runtime.zones.base import ZoneError
from vgpu_common.version import project_version

log = structlog.stdlib.get_logger(__name__)

RUNTIME_NAME = "vgpu-runtime"
API_VERSION = "v1"

_AGENT_CODES = {
    p.AgentStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    p.AgentStatus.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    p.AgentStatus.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    p.AgentStatus.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    p.AgentStatus.FAILED: grpc.StatusCode.UNKNOWN,
}
_IMAGE_CODES: dict[type[Exception], grpc.StatusCode] = {
    image_errors.InvalidReference: grpc.StatusCode.INVALID_ARGUMENT,
    image_errors.ImageNotFound: grpc.StatusCode.NOT_FOUND,
    image_errors.AuthenticationFailed: grpc.StatusCode.UNAUTHENTICATED,
    image_errors.RegistryUnavailable: grpc.StatusCode.UNAVAILABLE,
    image_errors.DigestMismatch: grpc.StatusCode.DATA_LOSS,
    image_errors.CorruptImage: grpc.StatusCode.DATA_LOSS,
}

F = TypeVar("F", bound=Callable[..., Any])


def status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, CriError):
        return exc.code
    if isinstance(exc, AgentError):
        return _AGENT_CODES.get(exc.status, grpc.StatusCode.UNKNOWN)
    if isinstance(exc, AgentGone | ZoneError):
        return grpc.StatusCode.UNAVAILABLE
    for kind, code in _IMAGE_CODES.items():
        if isinstance(exc, kind):
            return code
    if isinstance(exc, image_errors.ImageError):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL


def cri_call(fn: F) -> F:
    """Map exceptions to gRPC statuses; unexpected ones are logged with their traceback."""

    @functools.wraps(fn)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            return fn(self, request, context)
        except Exception as exc:
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error", call=fn.__name__)
                message = f"internal error in {fn.__name__}: {type(exc).__name__}: {exc}"
            else:
                log.info("call failed", call=fn.__name__, code=code.name, error=str(exc))
                message = str(exc)
            context.abort(code, message)
        finally:
            log.debug("call", call=fn.__name__, ms=round((time.perf_counter() - started) * 1e3, 3))

    return handler  # type: ignore[return-value]


def _matches(labels: dict[str, str], selector: Any) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def sandbox_state(record: SandboxRecord) -> api_pb2.PodSandboxState:
    return api_pb2.SANDBOX_READY if record.state == SandboxState.READY else api_pb2.SANDBOX_NOTREADY


_CONTAINER_STATES = {
    ContainerState.CREATED: api_pb2.CONTAINER_CREATED,
    ContainerState.RUNNING: api_pb2.CONTAINER_RUNNING,
    ContainerState.EXITED: api_pb2.CONTAINER_EXITED,
    ContainerState.UNKNOWN: api_pb2.CONTAINER_UNKNOWN,
}


def sandbox_metadata(record: SandboxRecord) -> api_pb2.PodSandboxMetadata:
    return api_pb2.PodSandboxMetadata(
        name=record.name, uid=record.uid, namespace=record.namespace, attempt=record.attempt
    )


def container_metadata(record: ContainerRecord) -> api_pb2.ContainerMetadata:
    return api_pb2.ContainerMetadata(name=record.name, attempt=record.attempt)


def container_stats(record: ContainerRecord, stats: p.Stats | None) -> api_pb2.ContainerStats:
    out = api_pb2.ContainerStats(
        attributes=api_pb2.ContainerAttributes(
            id=record.id,
            metadata=container_metadata(record),
            labels=record.labels,
            annotations=record.annotations,
        )
    )
    if stats is not None:
        ts = int(stats.timestamp.timestamp() * 1e9)
        out.cpu.CopyFrom(
            api_pb2.CpuUsage(
                timestamp=ts, usage_core_nano_seconds=UInt64Value(value=stats.cpu_usage_ns)
            )
        )
        out.memory.CopyFrom(
            api_pb2.MemoryUsage(
                timestamp=ts,
                working_set_bytes=UInt64Value(value=stats.memory_working_set_bytes),
            )
        )
        out.writable_layer.CopyFrom(
            api_pb2.FilesystemUsage(
                timestamp=ts,
                used_bytes=UInt64Value(value=stats.writable_layer_bytes),
                inodes_used=UInt64Value(value=stats.writable_layer_inodes),
            )
        )
    return out


class RuntimeService(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, pods: PodManager) -> None:
        self.pods = pods

    # -- runtime ----------------------------------------------------------------------------

    @cri_call
    def Version(self, request: api_pb2.VersionRequest, context: Any) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(
            version="0.1.0",
            runtime_name=RUNTIME_NAME,
            runtime_version=project_version(),
            runtime_api_version=API_VERSION,
        )

    @cri_call
    def Status(self, request: api_pb2.StatusRequest, context: Any) -> api_pb2.StatusResponse:
        cfg = self.pods.config
        conditions = [
            api_pb2.RuntimeCondition(type="RuntimeReady", status=True),
            api_pb2.RuntimeCondition(type="NetworkReady", status=True),
        ]
        info = {}
        if request.verbose:
            info["config"] = json.dumps(
                {"zone_backend": self.pods.backend.name, "gpu_proxy": cfg.gpu_proxy_control}
            )
        return api_pb2.StatusResponse(
            status=api_pb2.RuntimeStatus(conditions=conditions),
            info=info,
            runtime_handlers=[api_pb2.RuntimeHandler(name=h) for h in cfg.handlers],
        )

    @cri_call
    def RuntimeConfig(
        self, request: api_pb2.RuntimeConfigRequest, context: Any
    ) -> api_pb2.RuntimeConfigResponse:
        return api_pb2.RuntimeConfigResponse(
            linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=api_pb2.CGROUPFS)
        )

    @cri_call
    def UpdateRuntimeConfig(
        self, request: api_pb2.UpdateRuntimeConfigRequest, context: Any
    ) -> api_pb2.UpdateRuntimeConfigResponse:
        log.info("runtime config update", pod_cidr=request.runtime_config.network_config.pod_cidr)
        return api_pb2.UpdateRuntimeConfigResponse()

    # -- sandboxes --------------------------------------------------------------------------

    @cri_call
    def RunPodSandbox(
        self, request: api_pb2.RunPodSandboxRequest, context: Any
    ) -> api_pb2.RunPodSandboxResponse:
        record = self.pods.run_sandbox(request.config, request.runtime_handler)
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id=record.id)

    @cri_call
    def StopPodSandbox(
        self, request: api_pb2.StopPodSandboxRequest, context: Any
    ) -> api_pb2.StopPodSandboxResponse:
        self.pods.stop_sandbox(request.pod_sandbox_id)
        return api_pb2.StopPodSandboxResponse()

    @cri_call
    def RemovePodSandbox(
        self, request: api_pb2.RemovePodSandboxRequest, context: Any
    ) -> api_pb2.RemovePodSandboxResponse:
        self.pods.remove_sandbox(request.pod_sandbox_id)
        return api_pb2.RemovePodSandboxResponse()

    @cri_call
    def PodSandboxStatus(
        self, request: api_pb2.PodSandboxStatusRequest, context: Any
    ) -> api_pb2.PodSandboxStatusResponse:
        record = self.pods.sandbox(request.pod_sandbox_id)
        config = api_pb2.PodSandboxConfig.FromString(record.config)
        status = api_pb2.PodSandboxStatus(
            id=record.id,
            metadata=sandbox_metadata(record),
            state=sandbox_state(record),
            created_at=record.created_at_ns,
            network=api_pb2.PodSandboxNetworkStatus(ip=record.address),
            linux=api_pb2.LinuxPodSandboxStatus(
                namespaces=api_pb2.Namespace(
                    options=config.linux.security_context.namespace_options
                )
            ),
            labels=record.labels,
            annotations=record.annotations,
            runtime_handler=record.runtime_handler,
        )
        info = {}
        if request.verbose:
            info["info"] = json.dumps(
                {
                    "zone": record.zone.model_dump(mode="json"),
                    "gpu_socket": record.gpu_socket,
                    "gpu_memory_limit": record.gpu_memory_limit,
                }
            )
        containers = [
            api_pb2.ContainerStatus(id=c.id, state=_CONTAINER_STATES[c.state])
            for c in self.pods.containers_of(record.id)
        ]
        return api_pb2.PodSandboxStatusResponse(
            status=status, info=info, containers_statuses=containers, timestamp=time.time_ns()
        )

    @cri_call
    def ListPodSandbox(
        self, request: api_pb2.ListPodSandboxRequest, context: Any
    ) -> api_pb2.ListPodSandboxResponse:
        f = request.filter
        items = []
        for r in sorted(self.pods.state.sandboxes.all(), key=lambda r: r.created_at_ns):
            if r.state == SandboxState.CREATING:
                continue
            if f.id and not r.id.startswith(f.id):
                continue
            if f.HasField("state") and sandbox_state(r) != f.state.state:
                continue
            if not _matches(r.labels, f.label_selector):
                continue
            items.append(
                api_pb2.PodSandbox(
                    id=r.id,
                    metadata=sandbox_metadata(r),
                    state=sandbox_state(r),
                    created_at=r.created_at_ns,
                    labels=r.labels,
                    annotations=r.annotations,
                    runtime_handler=r.runtime_handler,
                )
            )
        return api_pb2.ListPodSandboxResponse(items=items)

    # -- containers -------------------------------------------------------------------------

    @cri_call
    def CreateContainer(
        self, request: api_pb2.CreateContainerRequest, context: Any
    ) -> api_pb2.CreateContainerResponse:
        record = self.pods.create_container(
            request.pod_sandbox_id, request.config, request.sandbox_config
        )
        return api_pb2.CreateContainerResponse(container_id=record.id)

    @cri_call
    def StartContainer(
        self, request: api_pb2.StartContainerRequest, context: Any
    ) -> api_pb2.StartContainerResponse:
        self.pods.start_container(request.container_id)
        return api_pb2.StartContainerResponse()

    @cri_call
    def StopContainer(
        self, request: api_pb2.StopContainerRequest, context: Any
    ) -> api_pb2.StopContainerResponse:
        self.pods.stop_container(request.container_id, float(max(request.timeout, 0)))
        return api_pb2.StopContainerResponse()

    @cri_call
    def RemoveContainer(
        self, request: api_pb2.RemoveContainerRequest, context: Any
    ) -> api_pb2.RemoveContainerResponse:
        self.pods.remove_container(request.container_id)
        return api_pb2.RemoveContainerResponse()

    @cri_call
    def ListContainers(
        self, request: api_pb2.ListContainersRequest, context: Any
    ) -> api_pb2.ListContainersResponse:
        f = request.filter
        out = []
        for r in sorted(self.pods.list_containers(), key=lambda r: r.created_at_ns):
            if f.id and not r.id.startswith(f.id):
                continue
            if f.pod_sandbox_id and not r.sandbox_id.startswith(f.pod_sandbox_id):
                continue
            if f.HasField("state") and _CONTAINER_STATES[r.state] != f.state.state:
                continue
            if not _matches(r.labels, f.label_selector):
                continue
            out.append(
                api_pb2.Container(
                    id=r.id,
                    pod_sandbox_id=r.sandbox_id,
                    metadata=container_metadata(r),
                    image=api_pb2.ImageSpec(image=r.image),
                    image_ref=r.image_ref,
                    image_id=r.image_id,
                    state=_CONTAINER_STATES[r.state],
                    created_at=r.created_at_ns,
                    labels=r.labels,
                    annotations=r.annotations,
                )
            )
        return api_pb2.ListContainersResponse(containers=out)

    @cri_call
    def ContainerStatus(
        self, request: api_pb2.ContainerStatusRequest, context: Any
    ) -> api_pb2.ContainerStatusResponse:
        r = self.pods.container_status(request.container_id)
        config = api_pb2.ContainerConfig.FromString(r.config)
        status = api_pb2.ContainerStatus(
            id=r.id,
            metadata=container_metadata(r),
            state=_CONTAINER_STATES[r.state],
            created_at=r.created_at_ns,
            started_at=r.started_at_ns,
            finished_at=r.finished_at_ns,
            exit_code=r.exit_code,
            image=api_pb2.ImageSpec(image=r.image),
            image_ref=r.image_ref,
            image_id=r.image_id,
            reason=r.reason,
            message=r.message,
            labels=r.labels,
            annotations=r.annotations,
            mounts=config.mounts,
            log_path=r.log_path,
        )
        info = {}
        if request.verbose:
            info["info"] = json.dumps({"sandbox_id": r.sandbox_id, "args": list(config.command)})
        return api_pb2.ContainerStatusResponse(status=status, info=info)

    @cri_call
    def UpdateContainerResources(
        self, request: api_pb2.UpdateContainerResourcesRequest, context: Any
    ) -> api_pb2.UpdateContainerResourcesResponse:
        self.pods.update_resources(request.container_id, request.linux)
        return api_pb2.UpdateContainerResourcesResponse()

    @cri_call
    def ReopenContainerLog(
        self, request: api_pb2.ReopenContainerLogRequest, context: Any
    ) -> api_pb2.ReopenContainerLogResponse:
        self.pods.reopen_log(request.container_id)
        return api_pb2.ReopenContainerLogResponse()

    @cri_call
    def ExecSync(self, request: api_pb2.ExecSyncRequest, context: Any) -> api_pb2.ExecSyncResponse:
        result = self.pods.exec_sync(
            request.container_id, list(request.cmd), float(max(request.timeout, 0))
        )
        return api_pb2.ExecSyncResponse(
            stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code
        )

    @cri_call
    def ContainerStats(
        self, request: api_pb2.ContainerStatsRequest, context: Any
    ) -> api_pb2.ContainerStatsResponse:
        record = self.pods.container_status(request.container_id)
        stats = self.pods.stats(record)
        return api_pb2.ContainerStatsResponse(stats=container_stats(record, stats))

    @cri_call
    def ListContainerStats(
        self, request: api_pb2.ListContainerStatsRequest, context: Any
    ) -> api_pb2.ListContainerStatsResponse:
        f = request.filter
        out = []
        for r in self.pods.list_containers():
            if r.state != ContainerState.RUNNING:
                continue
            if f.id and not r.id.startswith(f.id):
                continue
            if f.pod_sandbox_id and not r.sandbox_id.startswith(f.pod_sandbox_id):
                continue
            if not _matches(r.labels, f.label_selector):
                continue
            out.append(container_stats(r, self.pods.stats(r)))
        return api_pb2.ListContainerStatsResponse(stats=out)

    def _sandbox_stats(self, record: SandboxRecord) -> api_pb2.PodSandboxStats:
        containers = [
            container_stats(c, self.pods.stats(c))
            for c in self.pods.containers_of(record.id)
            if c.state == ContainerState.RUNNING
        ]
        now = time.time_ns()
        cpu = sum(c.cpu.usage_core_nano_seconds.value for c in containers)
        mem = sum(c.memory.working_set_bytes.value for c in containers)
        return api_pb2.PodSandboxStats(
            attributes=api_pb2.PodSandboxAttributes(
                id=record.id,
                metadata=sandbox_metadata(record),
                labels=record.labels,
                annotations=record.annotations,
            ),
            linux=api_pb2.LinuxPodSandboxStats(
                cpu=api_pb2.CpuUsage(timestamp=now, usage_core_nano_seconds=UInt64Value(value=cpu)),
                memory=api_pb2.MemoryUsage(timestamp=now, working_set_bytes=UInt64Value(value=mem)),
                containers=containers,
            ),
        )

    @cri_call
    def PodSandboxStats(
        self, request: api_pb2.PodSandboxStatsRequest, context: Any
    ) -> api_pb2.PodSandboxStatsResponse:
        record = self.pods.sandbox(request.pod_sandbox_id)
        self.pods.refresh_containers(record)
        return api_pb2.PodSandboxStatsResponse(stats=self._sandbox_stats(record))

    @cri_call
    def ListPodSandboxStats(
        self, request: api_pb2.ListPodSandboxStatsRequest, context: Any
    ) -> api_pb2.ListPodSandboxStatsResponse:
        f = request.filter
        out = []
        for r in self.pods.state.sandboxes.all():
            if r.state != SandboxState.READY:
                continue
            if f.id and not r.id.startswith(f.id):
                continue
            if not _matches(r.labels, f.label_selector):
                continue
            self.pods.refresh_containers(r)
            out.append(self._sandbox_stats(r))
        return api_pb2.ListPodSandboxStatsResponse(stats=out)

    # -- streaming: not offered yet ---------------------------------------------------------

    def _unsupported(self, what: str, context: Any) -> Any:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{RUNTIME_NAME} does not support {what} yet; ExecSync and logs are available",
        )

    def Exec(self, request: Any, context: Any) -> Any:
        return self._unsupported("streaming exec (kubectl exec -it)", context)

    def Attach(self, request: Any, context: Any) -> Any:
        return self._unsupported("attach", context)

    def PortForward(self, request: Any, context: Any) -> Any:
        return self._unsupported("port forwarding", context)
