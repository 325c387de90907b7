"""gpu-proxy's configuration: defaults, then a TOML file, then VGPU_PROXY_* environment variables
(highest). Validated once at start-up, so a bad value stops the daemon with a clear message
instead of failing later on a zone's call."""

from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from gpu_proxy.module_cache import DEFAULT_MODULE_CACHE_BYTES
from vgpu_common.settings import TomlSettings, load_settings

DEFAULT_CONFIG = Path("/etc/vgpu-isolated/gpu-proxy.toml")


class ProxyConfig(TomlSettings):
    model_config = SettingsConfigDict(env_prefix="VGPU_PROXY_", extra="forbid")

    backend: Literal["auto", "cuda", "sim"] = Field(
        "auto", description="cuda: the real GPU; sim: host-memory device; auto: cuda if usable"
    )
    sim_model: str = Field("H100-SXM5-80GB", description="device the sim backend presents")
    gpu: int = Field(0, ge=0, description="device ordinal this proxy serves")
    socket_dir: Path = Field(
        Path("/run/vgpu-isolated/zones"), description="one unix socket per zone (process backend)"
    )
    default_memory_limit: int = Field(
        8 << 30, gt=0, description="device memory quota of a zone registered without one (bytes)"
    )
    metrics_host: str = Field("0.0.0.0", description="address of /metrics and /healthz")
    metrics_port: int = Field(9400, ge=0, le=65535, description="0 picks a free port")
    control_address: str = Field(
        "unix:///run/vgpu-isolated/gpu-proxy.sock",
        description="gRPC address where vgpu-runtime registers and removes zones",
    )
    events_address: str = Field(
        "unix:///run/vgpu-isolated/gpu-proxy-events.sock",
        description="gRPC address of the zone event stream (unix:///path or host:port)",
    )
    module_cache_bytes: int = Field(
        DEFAULT_MODULE_CACHE_BYTES,
        ge=0,
        description=(
            "module images kept for all zones together, so a zone sends each image once "
            "(a zone is only answered from images it sent itself); 0 turns the cache off"
        ),
    )
    xen_zones: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "serve Xen zones' grant channels (found through a xenstore watch); "
            "auto: when this is Dom0 (/proc/xen/capabilities says control_d)"
        ),
    )
    log_json: bool = Field(True, description="JSON lines (services) or console (humans)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"


def load_config(path: Path | None, **overrides: Any) -> ProxyConfig:
    """The configuration from ``path`` or DEFAULT_CONFIG (see vgpu_common.settings)."""
    return load_settings(ProxyConfig, path, DEFAULT_CONFIG, **overrides)
