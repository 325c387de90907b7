"""vgpu-runtime's configuration: defaults, then a TOML file, then VGPU_RUNTIME_* environment
variables, then command-line options. Validated once at start-up so a typo stops the daemon
with a clear message rather than failing the first pod."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from vgpu_common.settings import TomlSettings, load_settings

DEFAULT_CONFIG = Path("/etc/vgpu-isolated/vgpu-runtime.toml")
GPU_HANDLER = "vgpu-isolated"


class XenSettings(BaseModel):
    """The Xen zone backend ([xen] in the TOML file): what every zone domain boots."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: Path = Field(
        Path("/usr/lib/vgpu-isolated/zone/vmlinux"),
        description="zone kernel (an uncompressed ELF vmlinux boots fastest)",
    )
    ramdisk: Path | None = Field(
        Path("/usr/lib/vgpu-isolated/zone/initrd.cpio.gz"),
        description="zone initramfs: mounts the root disk and execs the agent",
    )
    root_disk: Path = Field(
        Path("/dev/vgpu/zone-root"),
        description="block device with the zone userland, shared read-only by all zones (xvda)",
    )
    system_disk: Path | None = Field(
        None, description="block device or ext4 image with the project payload (xvdb), read-only"
    )
    type: Literal["pv", "pvh"] = Field("pv", description="domain type")
    extra: str = Field("console=hvc0 quiet", description="extra kernel command line")
    on_crash: Literal["destroy", "preserve", "coredump-destroy"] = Field(
        "destroy", description="what Xen does with a crashed zone (preserve: keep it to debug)"
    )
    min_memory_mib: int = Field(
        256, ge=64, description="floor for a zone's memory (kernel, agent and tmpfs live in it)"
    )
    libvgpu: Path | None = Field(
        None, description="libvgpu.so as the zone sees it, mounted into GPU containers"
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="after asking a zone to power off, wait this long, then destroy"
    )
    reconnect_timeout_s: float = Field(
        30.0, gt=0, description="wait for a running zone's agent to offer its control channel"
    )
    console_log_dir: Path = Field(
        Path("/var/log/xen/console"),
        description="xenconsoled's guest logs (quoted in boot errors when present)",
    )


class RuntimeConfig(TomlSettings):
    model_config = SettingsConfigDict(env_prefix="VGPU_RUNTIME_", extra="forbid")

    listen: Path = Field(
        Path("/run/vgpu-isolated/vgpu-runtime.sock"),
        description="unix socket kubelet's --container-runtime-endpoint points at",
    )
    state_dir: Path = Field(
        Path("/var/lib/vgpu-runtime"), description="sandbox/container records and images"
    )
    zones_dir: Path = Field(
        Path("/run/vgpu-runtime/zones"), description="per-zone working files (sockets, rootfs)"
    )
    zone_backend: Literal["process", "xen"] = Field(
        "process", description="process: host namespaces (dev/CI, not isolation); xen: domUs"
    )
    registry_config_dir: Path = Field(
        Path("/etc/vgpu-isolated/certs.d"),
        description="per-registry mirrors: <dir>/<host>/hosts.toml (containerd's format)",
    )
    gpu_handlers: list[str] = Field(
        [GPU_HANDLER], description="runtime handlers whose pods get a GPU channel"
    )
    plain_handlers: list[str] = Field(
        [""], description="runtime handlers served without a GPU ('' is the default handler)"
    )
    gpu_proxy_control: str = Field(
        "unix:///run/vgpu-isolated/gpu-proxy.sock",
        description="gpu-proxy's ZoneControl gRPC address; '' runs GPU pods without a proxy",
    )
    gpu_memory_annotation: str = Field(
        "vgpu-isolated.io/gpu-memory",
        description="pod annotation with the zone's device memory quota (e.g. 4Gi); else "
        "gpu-proxy's default",
    )
    libvgpu: Path | None = Field(
        None, description="libvgpu.so, mounted into GPU containers as libcuda.so.1"
    )
    oci_runtime: Literal["auto", "crun", "runc"] = Field(
        "auto", description="OCI runtime the zone agent uses; auto prefers crun"
    )
    zone_boot_timeout_s: float = Field(60.0, gt=0, description="default wait for a zone's agent")
    xen: XenSettings = Field(XenSettings(), description="the Xen zone backend's settings")
    standby_agents: int = Field(
        1, ge=0, description="process backend: zone agents kept started ahead of boots"
    )
    log_json: bool = Field(True, description="JSON lines (services) or console (humans)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def handlers(self) -> list[str]:
        return [*self.gpu_handlers, *self.plain_handlers]


def load_config(path: Path | None, **overrides: Any) -> RuntimeConfig:
    """The configuration from ``path`` or DEFAULT_CONFIG (see vgpu_common.settings)."""
    return load_settings(RuntimeConfig, path, DEFAULT_CONFIG, **overrides)
