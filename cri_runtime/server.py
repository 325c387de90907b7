"""Assemble vgpu-runtime: state, images, zone backend, gpu-proxy client, the two CRI services,
and the gRPC server on the unix socket kubelet connects to."""

from __future__ import annotations

import os
from concurrent import futures

import grpc
import structlog

from cri_runtime.config import RuntimeConfig
from cri_runtime.cri.gen import api_pb2_grpc
from cri_runtime.gpu import GpuProxyClient
from cri_runtime.image_service import ImageService
from cri_runtime.images.hosts import RegistryHosts
from cri_runtime.images.store import ImageStore
from cri_runtime.pods import PodManager
from cri_runtime.runtime_service import RuntimeService
from cri_runtime.state import RuntimeState
from cri_runtime.zones.base import ZoneBackend

log = structlog.stdlib.get_logger(__name__)


def make_backend(config: RuntimeConfig) -> ZoneBackend:
    if config.zone_backend == "process":
        from cri_runtime.zones.process import ProcessZoneBackend

        return ProcessZoneBackend(
            config.zones_dir,
            oci_runtime=config.oci_runtime,
            libvgpu=config.libvgpu,
            standby=config.standby_agents,
        )
    from cri_runtime.zones.xen import XenZoneBackend

    return XenZoneBackend(
        config.zones_dir,
        config.xen,
        oci_runtime=config.oci_runtime,
        agent_log_level=config.log_level,
    )


class RuntimeServer:
    """Everything vgpu-runtime runs, started and stopped as one."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        hosts_dir = config.registry_config_dir if config.registry_config_dir.is_dir() else None
        self.images = ImageStore(config.state_dir / "images", RegistryHosts.load(hosts_dir))
        self.backend = make_backend(config)
        self.gpu = GpuProxyClient(config.gpu_proxy_control) if config.gpu_proxy_control else None
        self.pods = PodManager(
            config, RuntimeState(config.state_dir), self.backend, self.images, self.gpu
        )
        self.images.on_removal(self.backend.prune_images)  # e.g. Xen image disks
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="cri"),
            options=[("grpc.max_receive_message_length", 16 << 20)],
        )
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(RuntimeService(self.pods), self._server)
        api_pb2_grpc.add_ImageServiceServicer_to_server(ImageService(self.images), self._server)

    def start(self) -> None:
        """Reconcile state with the zones that exist, then listen."""
        self.pods.recover()
        self.backend.prune_images(self.images.live_ids())
        path = self.config.listen
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left by a previous run; bind would fail
        self._server.add_insecure_port(f"unix://{path}")
        self._server.start()
        os.chmod(path, 0o660)
        log.info(
            "vgpu-runtime listening",
            socket=str(path),
            zone_backend=self.backend.name,
            state_dir=str(self.config.state_dir),
            gpu_proxy=self.config.gpu_proxy_control or None,
        )

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving; zones keep running and are picked up by the next start."""
        self._server.stop(grace_s).wait()
        self.pods.close()
        self.backend.close()
        if self.gpu is not None:
            self.gpu.close()
        log.info("vgpu-runtime stopped")
