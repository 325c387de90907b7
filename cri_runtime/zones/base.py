"""What vgpu-runtime asks of a zone backend: boot a zone with its agent, stop it, list zones.

A zone is a pod sandbox. The backend owns how the zone exists (a Xen domU, or host processes in
fresh namespaces) and how the runtime reaches the zone agent in it (the IDM control channel);
everything above it (containers, images, CRI semantics) is backend-independent.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from cri_runtime.agent.client import AgentClient
from cri_runtime.agent.protocol import ImageDisk


class ZoneError(Exception):
    """A backend operation failed; the message is what an operator needs (the tool's own
    stderr where there is one). The runtime turns it into a CRI error."""


class NetworkMode(StrEnum):
    NODE = "node"  # share the node's network namespace (hostNetwork pods)
    POD = "pod"  # a private network namespace with loopback only (no CNI yet)


class GpuAccess(BaseModel):
    """The zone's channel to gpu-proxy: registered by the runtime before boot (process
    backend), or found by gpu-proxy itself (Xen: the quota goes to the zone's xenstore home)."""

    model_config = ConfigDict(frozen=True)

    # gpu-proxy's LocalLink socket for this zone (process backend); None under Xen
    proxy_socket: Path | None = None
    memory_limit: int = Field(ge=0)  # bytes of device memory, enforced by gpu-proxy (0: default)


class ZoneSpec(BaseModel):
    """Everything a backend needs to boot one zone; persisted with the sandbox record."""

    model_config = ConfigDict(frozen=True)

    zone_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    hostname: str = ""
    network: NetworkMode = NetworkMode.POD
    vcpus: int = Field(default=1, ge=1)
    memory_mib: int = Field(default=512, ge=64)
    gpu: GpuAccess | None = None
    boot_timeout_s: float = Field(default=60.0, gt=0)


class ZoneState(StrEnum):
    RUNNING = "running"
    EXITED = "exited"


class ZoneInfo(BaseModel):
    """A zone as the backend sees it now (from the host: pids / `xl list`, never the guest)."""

    zone_id: str
    state: ZoneState
    started_at: datetime
    pid: int | None = None  # process backend: the zone's init on the host
    domid: int | None = None  # xen backend
    address: str = ""  # the zone's IP, if it has one of its own


class ZoneBackend(Protocol):
    """Boot/stop/list zones. Implementations must be safe to call from several threads, and
    boot/stop must be idempotent per zone id so a restarted runtime can finish what a killed
    one started."""

    name: str
    # True: gpu-proxy discovers this backend's zones itself (Xen: a xenstore watch), so the
    # runtime registers none with ZoneControl; the quota travels in ZoneSpec.gpu.
    gpu_proxy_finds_zones: bool
    # True: the agent cannot write the host's CRI log files (Xen: they would be in the domU);
    # it buffers each container's log and the runtime pulls it (READ_LOG, cri_runtime/logs.py).
    relays_logs: bool
    # True: the zone sees the host's files, so CRI mounts (host_path) can be bind-mounted into
    # containers. Xen zones cannot: kubelet's host paths do not exist in a domU.
    shares_host_paths: bool

    def boot(self, spec: ZoneSpec) -> ZoneInfo:
        """Start the zone and wait (up to spec.boot_timeout_s) until its agent is ready.
        On failure nothing of the zone is left behind and ZoneError says why."""
        ...

    def stop(self, zone_id: str, *, grace_s: float) -> None:
        """Stop every container (SIGTERM, SIGKILL after grace_s), then the zone; release its
        resources. Unknown or already stopped zones are not an error."""
        ...

    def list(self) -> list[ZoneInfo]:
        """Every zone this backend owns on this node, including ones the runtime forgot."""
        ...

    def agent(self, zone_id: str) -> AgentClient:
        """The control channel to a running zone's agent (reconnected after a runtime restart);
        ZoneError if the zone is not running."""
        ...

    def container_rootfs(
        self, zone_id: str, container_id: str, image_id: str, layers: Sequence[Path]
    ) -> tuple[tuple[Path, ...], ImageDisk | None]:
        """An image's unpacked ``layers`` (host paths, lowest first) as the zone's agent will
        see them for ``container_id``, and the read-only disk the agent must mount first, if
        any (Xen: attached to the zone once per image); the process backend's zones see the
        host's paths as they are."""
        ...

    def release_rootfs(self, zone_id: str, container_id: str) -> None:
        """The container is removed: release what ``container_rootfs`` gave the zone for it
        (Xen: detach the image disk no other container of the zone uses). Unknown ids and
        stopped zones are no error."""
        ...

    def prune_images(self, live: Collection[str]) -> None:
        """Drop what the backend derived from images (Xen: their disks) for every image whose
        id is not in ``live`` (the store's images and those containers hold), except what a
        zone still uses."""
        ...

    def zone_dir(self, zone_id: str) -> Path:
        """Where the zone's files live on the host (agent log, channel sockets)."""
        ...

    def close(self) -> None:
        """Drop channels and listeners; zones keep running (they outlive the runtime)."""
        ...
