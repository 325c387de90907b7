"""gpu-proxy telemetry: per-zone counters, the Prometheus collector and endpoint, logging."""

from gpu_proxy.telemetry.http import TelemetryServer
from gpu_proxy.telemetry.logging import bind_zone
from gpu_proxy.telemetry.metrics import ProxyCollector, ZoneView
from gpu_proxy.telemetry.zone_stats import (
    LATENCY_BUCKETS,
    MemcpyDirection,
    ProxyStats,
    ZoneIdentity,
    ZoneStats,
)

__all__ = [
    "LATENCY_BUCKETS",
    "MemcpyDirection",
    "ProxyCollector",
    "ProxyStats",
    "TelemetryServer",
    "ZoneIdentity",
    "ZoneStats",
    "ZoneView",
    "bind_zone",
]
