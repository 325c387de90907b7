"""PodManager against fake collaborators: teardown of zones found dead, idempotent stops, and
refreshes (which run without the pod lock) that must not bring removed records back."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from cri_runtime.agent import protocol as p
from cri_runtime.config import RuntimeConfig
from cri_runtime.errors import Unavailable
from cri_runtime.gpu import GpuProxyClient
from cri_runtime.images.store import ImageStore
from cri_runtime.pods import PodManager
from cri_runtime.state import (
    ContainerRecord,
    ContainerState,
    RuntimeState,
    SandboxRecord,
    SandboxState,
)
from cri_runtime.zones.base import ZoneBackend, ZoneError, ZoneInfo, ZoneSpec, ZoneState

SID = "a" * 64
CID = "b" * 64


class FakeBackend:
    name = "fake"
    relays_logs = False
    shares_host_paths = True

    def __init__(self) -> None:
        self.stopped: list[str] = []

    def stop(self, zone_id: str, *, grace_s: float) -> None:
        self.stopped.append(zone_id)

    def agent(self, zone_id: str) -> Any:
        raise ZoneError(f"zone {zone_id} is not running")

    def list(self) -> list[Any]:
        return []

    def release_rootfs(self, zone_id: str, container_id: str) -> None:
        pass


class FakeGpu:
    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove(self, zone: str) -> dict[str, int]:
        self.removed.append(zone)
        return {}


class FakeImages:
    def release(self, holder: str) -> None:
        pass


def manager(tmp_path: Path) -> tuple[PodManager, FakeBackend, FakeGpu]:
    backend, gpu = FakeBackend(), FakeGpu()
    pods = PodManager(
        RuntimeConfig(state_dir=tmp_path),
        RuntimeState(tmp_path),
        cast(ZoneBackend, backend),
        cast(ImageStore, FakeImages()),
        cast(GpuProxyClient, gpu),
    )
    return pods, backend, gpu


def sandbox(state: SandboxState = SandboxState.READY) -> SandboxRecord:
    return SandboxRecord(
        id=SID, created_at_ns=1, config=b"", name="p", uid="u", namespace="n", attempt=0,
        runtime_handler="vgpu-isolated", state=state, zone=ZoneSpec(zone_id=SID),
        gpu_socket="/run/gpu-proxy/zone.sock",
    )  # fmt: skip


def container(state: ContainerState = ContainerState.RUNNING) -> ContainerRecord:
    return ContainerRecord(
        id=CID, created_at_ns=1, config=b"", sandbox_id=SID, name="c", attempt=0,
        image="busybox", image_id="sha256:" + "c" * 64, image_ref="busybox", state=state,
    )  # fmt: skip


def test_stopping_a_sandbox_found_dead_stops_its_zone_and_gpu_registration(
    tmp_path: Path,
) -> None:
    pods, backend, gpu = manager(tmp_path)
    pods.state.sandboxes.put(sandbox())
    pods.state.containers.put(container())
    # a List/Status call finds the zone dead: NOTREADY, containers EXITED
    pods.refresh_containers(pods.sandbox(SID))
    assert pods.sandbox(SID).state == SandboxState.NOTREADY
    assert pods.container(CID).state == ContainerState.EXITED
    assert backend.stopped == [] and gpu.removed == []
    pods.stop_sandbox(SID)  # kubelet's StopPodSandbox must still release zone and GPU
    assert backend.stopped == [SID]
    assert gpu.removed == [SID]
    pods.remove_sandbox(SID)
    assert pods.state.sandboxes.get(SID) is None


def test_a_refresh_does_not_bring_back_removed_records(tmp_path: Path) -> None:
    pods, _, _ = manager(tmp_path)
    pods.state.sandboxes.put(sandbox())
    pods.state.containers.put(container())
    stale_sandbox, stale_container = pods.sandbox(SID), pods.container(CID)
    pods.remove_container(CID)  # the zone agent is unreachable: the record goes anyway
    exited = p.ContainerInfo(
        container_id=CID,
        state=p.ContainerState.EXITED,
        created_at=datetime.now(UTC),
        started_at=datetime.now(UTC),
        finished_at=datetime.now(UTC),
        exit_code=0,
    )
    pods._apply(stale_container, exited)  # a refresh that read the record before the removal
    assert pods.state.containers.get(CID) is None
    assert RuntimeState(tmp_path).containers.get(CID) is None
    pods.state.sandboxes.delete(SID)
    pods._mark_dead(stale_sandbox, "gone")  # a refresh racing RemovePodSandbox
    assert pods.state.sandboxes.get(SID) is None


def test_stops_of_records_removed_meanwhile_succeed(tmp_path: Path) -> None:
    pods, _, _ = manager(tmp_path)
    pods.stop_sandbox(SID)
    pods.stop_container(CID, 0)
    pods.state.sandboxes.put(sandbox())
    pods.state.containers.put(container())
    pods.stop_container(CID, 0)  # the zone turns out dead: success, the container exited
    assert pods.container(CID).state == ContainerState.EXITED


class LiveZone(FakeBackend):
    """A zone the host sees running, whose agent answers slowly (None) or with no containers."""

    def __init__(self, agent: Any) -> None:
        super().__init__()
        self._agent = agent

    def list(self) -> list[Any]:
        return [ZoneInfo(zone_id=SID, state=ZoneState.RUNNING, started_at=datetime.now(UTC))]

    def agent(self, zone_id: str) -> Any:
        if self._agent is None:
            raise ZoneError("the agent did not reconnect within 10 s")
        return self._agent


class EmptyAgent:
    def list(self) -> list[p.ContainerInfo]:
        return []


def with_backend(tmp_path: Path, backend: FakeBackend) -> PodManager:
    return PodManager(
        RuntimeConfig(state_dir=tmp_path),
        RuntimeState(tmp_path),
        cast(ZoneBackend, backend),
        cast(ImageStore, FakeImages()),
        None,
    )


def test_a_slow_agent_is_not_a_dead_zone(tmp_path: Path) -> None:
    pods = with_backend(tmp_path, LiveZone(agent=None))
    pods.state.sandboxes.put(sandbox())
    pods.state.containers.put(container())
    pods.refresh_containers(pods.sandbox(SID))
    assert pods.sandbox(SID).state == SandboxState.READY
    assert pods.container(CID).state == ContainerState.RUNNING
    with pytest.raises(Unavailable, match="does not answer"):
        pods.exec_sync(CID, ["true"], 1)


def test_recovery_retires_containers_the_agent_never_created(tmp_path: Path) -> None:
    pods = with_backend(tmp_path, LiveZone(agent=EmptyAgent()))
    pods.state.sandboxes.put(sandbox())
    pods.state.containers.put(container(ContainerState.CREATED))
    pods.refresh_containers(pods.sandbox(SID))  # a live call leaves it: a create may be in flight
    assert pods.container(CID).state == ContainerState.CREATED
    pods.recover()
    retired = pods.container(CID)
    assert retired.state == ContainerState.EXITED and "unknown to the zone agent" in retired.message
    assert pods.sandbox(SID).state == SandboxState.READY
