"""A small CRI v1 client over the runtime's unix socket, for the demo, the conformance suite and
the benchmarks (which drive containerd through the same class). Calls are the generated stubs';
the helpers build the configs kubelet would send for a simple pod."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from cri_runtime.cri.gen import api_pb2, api_pb2_grpc


class CriClient:
    def __init__(self, socket: Path | str, timeout_s: float = 120.0) -> None:
        self.address = f"unix://{socket}"
        self.timeout = timeout_s
        self.channel = grpc.insecure_channel(self.address)
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def wait_ready(self, timeout_s: float = 30.0) -> api_pb2.VersionResponse:
        grpc.channel_ready_future(self.channel).result(timeout=timeout_s)
        reply: api_pb2.VersionResponse = self.runtime.Version(
            api_pb2.VersionRequest(version="v1"), timeout=timeout_s
        )
        return reply

    def pull(self, image: str) -> str:
        reply = self.images.PullImage(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=self.timeout
        )
        return str(reply.image_ref)

    def run_pod(self, config: api_pb2.PodSandboxConfig, handler: str = "") -> str:
        reply = self.runtime.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler),
            timeout=self.timeout,
        )
        return str(reply.pod_sandbox_id)

    def create(
        self, pod_id: str, config: api_pb2.ContainerConfig, pod_config: api_pb2.PodSandboxConfig
    ) -> str:
        reply = self.runtime.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config
            ),
            timeout=self.timeout,
        )
        return str(reply.container_id)

    def start(self, container_id: str) -> None:
        self.runtime.StartContainer(
            api_pb2.StartContainerRequest(container_id=container_id), timeout=self.timeout
        )

    def status(self, container_id: str) -> api_pb2.ContainerStatus:
        reply: api_pb2.ContainerStatusResponse = self.runtime.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=container_id), timeout=self.timeout
        )
        return reply.status

    def wait_exit(self, container_id: str, timeout_s: float = 60.0) -> api_pb2.ContainerStatus:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(container_id)
            if status.state == api_pb2.CONTAINER_EXITED or time.monotonic() > deadline:
                return status
            time.sleep(0.05)

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(
            api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout
        )

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(
            api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout
        )

    def close(self) -> None:
        self.channel.close()


def pod_config(
    name: str,
    *,
    namespace: str = "default",
    uid: str | None = None,
    log_directory: Path | None = None,
    host_network: bool = False,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> api_pb2.PodSandboxConfig:
    """The sandbox config kubelet sends for a minimal pod."""
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(
            name=name, namespace=namespace, uid=uid or f"uid-{name}", attempt=0
        ),
        hostname="" if host_network else name,  # the node's UTS namespace: no hostname
        log_directory=str(log_directory or ""),
        labels=labels or {},
        annotations=annotations or {},
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(
                    network=api_pb2.NODE if host_network else api_pb2.POD
                )
            )
        ),
    )


def container_config(
    name: str,
    image: str,
    command: list[str],
    *,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    log_path: str = "",
    labels: dict[str, str] | None = None,
) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name, attempt=0),
        image=api_pb2.ImageSpec(image=image),
        command=command,
        args=args or [],
        envs=[api_pb2.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
        log_path=log_path,
        labels=labels or {},
    )
