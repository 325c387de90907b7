"""GPU pods on a backend whose zones gpu-proxy finds itself (Xen): the quota travels to the zone
(the backend writes it to xenstore), and nothing is registered with or removed from ZoneControl."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from cri_runtime.config import RuntimeConfig
from cri_runtime.cri.gen import api_pb2
from cri_runtime.errors import FailedPrecondition
from cri_runtime.gpu import GpuProxyClient
from cri_runtime.images.store import ImageStore
from cri_runtime.pods import PodManager
from cri_runtime.state import RuntimeState, SandboxState
from cri_runtime.zones.base import ZoneBackend, ZoneError, ZoneInfo, ZoneSpec, ZoneState


class DiscoveredZones:
    """Stands in for XenZoneBackend's boot/stop bookkeeping; records what the pods asked."""

    name = "xen-like"
    gpu_proxy_finds_zones = True
    relays_logs = True
    shares_host_paths = False

    def __init__(self) -> None:
        self.booted: list[ZoneSpec] = []
        self.stopped: list[str] = []

    def boot(self, spec: ZoneSpec) -> ZoneInfo:
        self.booted.append(spec)
        return ZoneInfo(
            zone_id=spec.zone_id, state=ZoneState.RUNNING, started_at=datetime.now(UTC), domid=7
        )

    def stop(self, zone_id: str, *, grace_s: float) -> None:
        self.stopped.append(zone_id)

    def agent(self, zone_id: str) -> Any:
        raise ZoneError("no agent here")

    def list(self) -> list[ZoneInfo]:
        return []


class RefusingGpu:
    """Any ZoneControl call fails the test: Xen zones are gpu-proxy's to discover."""

    def register(self, *args: Any, **kwargs: Any) -> tuple[str, int]:
        raise AssertionError("a Xen zone was registered with ZoneControl")

    def remove(self, zone: str) -> dict[str, int]:
        raise AssertionError("a Xen zone was removed through ZoneControl")


def pod_config(annotations: dict[str, str], uid: str = "u") -> api_pb2.PodSandboxConfig:
    config = api_pb2.PodSandboxConfig()
    config.metadata.name, config.metadata.uid, config.metadata.namespace = "p", uid, "n"
    config.annotations.update(annotations)
    return config


def test_gpu_quota_goes_to_the_zone_not_to_zone_control(tmp_path: Path) -> None:
    backend = DiscoveredZones()
    pods = PodManager(
        RuntimeConfig(state_dir=tmp_path),
        RuntimeState(tmp_path),
        cast(ZoneBackend, backend),
        cast(ImageStore, None),
        cast(GpuProxyClient, RefusingGpu()),
    )
    record = pods.run_sandbox(pod_config({"vgpu-isolated.io/gpu-memory": "512Mi"}), "vgpu-isolated")
    [spec] = backend.booted
    assert spec.gpu is not None and spec.gpu.memory_limit == 512 << 20
    assert spec.gpu.proxy_socket is None
    assert record.state == SandboxState.READY and record.gpu_memory_limit == 512 << 20
    pods.stop_sandbox(record.id)
    assert backend.stopped == [record.id]

    plain = pods.run_sandbox(pod_config({}, "u2"), "")
    assert backend.booted[-1].gpu is None and plain.gpu_memory_limit == 0
    default = pods.run_sandbox(pod_config({}, "u3"), "vgpu-isolated")
    gpu = backend.booted[-1].gpu
    assert gpu is not None and gpu.memory_limit == 0 and default.state == SandboxState.READY


def test_host_mounts_are_refused_before_anything_is_made(tmp_path: Path) -> None:
    """kubelet's host paths do not exist in a domU: a clear FailedPrecondition naming them, not a
    runc failure inside the zone."""
    backend = DiscoveredZones()
    pods = PodManager(
        RuntimeConfig(state_dir=tmp_path),
        RuntimeState(tmp_path),
        cast(ZoneBackend, backend),
        cast(ImageStore, None),  # never reached
        cast(GpuProxyClient, RefusingGpu()),
    )
    config = api_pb2.ContainerConfig()
    config.metadata.name = "c"
    config.image.image = "busybox"
    config.mounts.add(host_path="/etc/hosts", container_path="/etc/hosts")
    with pytest.raises(FailedPrecondition, match=r"cannot mount host paths.*\(/etc/hosts\)"):
        pods.create_container("no-such-pod", config, pod_config({}))
    assert list(RuntimeState(tmp_path).containers.all()) == []
