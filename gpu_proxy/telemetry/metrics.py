"""Prometheus collector over the proxy's live zones.

The collector owns no metric objects: each scrape reads the zone registry and each zone's
`ZoneStats`, so a removed zone's series disappear with it and nothing per-zone ever has to be
unregistered. Per-zone series carry only the `zone` label; `vgpu_zone_info` carries the pod
identity, to be joined on `zone` in PromQL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

import structlog
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gpu_proxy.telemetry.zone_stats import (
    LATENCY_BUCKETS,
    MemcpyDirection,
    ProxyStats,
    ZoneIdentity,
    ZoneStats,
)

_log = structlog.get_logger(__name__)

# `le` label text for each bucket bound, formatted once the way Prometheus' Go client does.
_LE_TEXT: dict[float, str] = {
    le: floatToGoString(le)  # type: ignore[no-untyped-call]
    for le in (*LATENCY_BUCKETS, float("inf"))
}

INFO_LABELS: tuple[str, ...] = (
    "zone",
    "domid",
    "pod",
    "namespace",
    "container",
    "pod_uid",
    "gpu",
    "gpu_uuid",
)


class ZoneView(Protocol):
    """What the collector needs from a live zone."""

    @property
    def identity(self) -> ZoneIdentity: ...

    @property
    def stats(self) -> ZoneStats: ...

    def memory(self) -> tuple[int, int]:
        """(used, limit) device memory in bytes, from the quota ledger."""
        ...

    def handle_counts(self) -> Mapping[str, int]:
        """Live handles by kind, from the zone's handle table."""
        ...


class _Families:
    """One scrape's metric families, created empty so `describe` and `collect` share names."""

    def __init__(self) -> None:
        self.zones = GaugeMetricFamily("vgpu_zones", "Zones the proxy is serving.")
        self.info = GaugeMetricFamily(
            "vgpu_zone_info", "Identity of a zone (always 1).", labels=INFO_LABELS
        )
        self.calls = CounterMetricFamily(
            "vgpu_calls_total",
            "Forwarded CUDA calls by API and CUresult.",
            labels=("zone", "api", "result"),
        )
        self.duration = HistogramMetricFamily(
            "vgpu_call_duration_seconds",
            "Time the proxy spent executing a forwarded call.",
            labels=("zone", "api"),
        )
        self.launches = CounterMetricFamily(
            "vgpu_kernel_launches_total", "Kernel launches.", labels=("zone",)
        )
        self.last_launch = GaugeMetricFamily(
            "vgpu_last_kernel_launch_timestamp_seconds",
            "Unix time of the zone's latest kernel launch (absent until its first).",
            labels=("zone",),
        )
        self.memcpy = CounterMetricFamily(
            "vgpu_memcpy_bytes_total", "Bytes copied, by direction.", labels=("zone", "direction")
        )
        self.mem_used = GaugeMetricFamily(
            "vgpu_device_memory_used_bytes", "Device memory charged to the zone.", labels=("zone",)
        )
        self.mem_limit = GaugeMetricFamily(
            "vgpu_device_memory_limit_bytes", "The zone's device memory quota.", labels=("zone",)
        )
        self.allocs = CounterMetricFamily(
            "vgpu_memory_allocations_total", "Device memory allocations.", labels=("zone",)
        )
        self.frees = CounterMetricFamily(
            "vgpu_memory_frees_total", "Device memory frees.", labels=("zone",)
        )
        self.handles = GaugeMetricFamily(
            "vgpu_handles", "Live handles, by kind.", labels=("zone", "kind")
        )
        self.reclaimed = CounterMetricFamily(
            "vgpu_handles_reclaimed_total",
            "Handles the zone leaked and the proxy freed at teardown, by kind.",
            labels=("zone", "kind"),
        )
        self.proxy_reclaimed = CounterMetricFamily(
            "vgpu_proxy_handles_reclaimed_total",
            "Handles freed at teardown across all zones, past and present, by kind.",
            labels=("kind",),
        )
        self.proxy_teardowns = CounterMetricFamily(
            "vgpu_proxy_zone_teardowns_total", "Zones torn down since the proxy started."
        )

    def all(self) -> list[Metric]:
        return list(vars(self).values())


class ProxyCollector(Collector):
    """Exposes every live zone's counters and gauges, plus proxy-wide counters.

    `zones` must return a stable collection (e.g. a list copied under the registry's lock):
    it is iterated once per scrape from the HTTP server's thread.
    """

    def __init__(self, zones: Callable[[], Iterable[ZoneView]], proxy: ProxyStats) -> None:
        self._zones = zones
        self._proxy = proxy

    def describe(self) -> Iterable[Metric]:
        """Names only, so registering checks for clashes without touching the zone tables."""
        return _Families().all()

    def collect(self) -> Iterator[Metric]:
        fam = _Families()
        count = 0
        for view in self._zones():
            count += 1
            try:
                _add_zone(fam, view)
            except Exception:
                # A zone being torn down mid-scrape must not cost every other zone its series.
                _log.warning("zone skipped in scrape", zone=view.identity.zone, exc_info=True)
        fam.zones.add_metric((), count)
        proxy = self._proxy.snapshot()
        for kind, n in sorted(proxy.reclaimed.items()):
            fam.proxy_reclaimed.add_metric((kind,), n)
        fam.proxy_teardowns.add_metric((), proxy.teardowns)
        yield from fam.all()


def _add_zone(fam: _Families, view: ZoneView) -> None:
    """Add one zone's series; every read happens first so a failing zone adds nothing."""
    ident = view.identity
    snap = view.stats.snapshot()
    used, limit = view.memory()
    handles = sorted(view.handle_counts().items())
    zone = ident.zone
    fam.info.add_metric(
        (
            zone,
            str(ident.domid),
            ident.pod,
            ident.namespace,
            ident.container,
            ident.pod_uid,
            str(ident.gpu_index),
            ident.gpu_uuid,
        ),
        1,
    )
    for (api, result), n in sorted(snap.calls.items()):
        fam.calls.add_metric((zone, api, result), n)
    for api, hist in sorted(snap.latency.items()):
        fam.duration.add_metric(
            (zone, api),
            buckets=[(_LE_TEXT[le], n) for le, n in hist.buckets],
            sum_value=hist.sum,
        )
    fam.launches.add_metric((zone,), snap.kernel_launches)
    if snap.last_launch is not None:
        fam.last_launch.add_metric((zone,), snap.last_launch)
    for direction in MemcpyDirection:
        fam.memcpy.add_metric((zone, direction.value), snap.memcpy_bytes[direction])
    fam.mem_used.add_metric((zone,), used)
    fam.mem_limit.add_metric((zone,), limit)
    fam.allocs.add_metric((zone,), snap.allocations)
    fam.frees.add_metric((zone,), snap.frees)
    for kind, n in handles:
        fam.handles.add_metric((zone, str(kind)), n)
    for kind, n in sorted(snap.reclaimed.items()):
        fam.reclaimed.add_metric((zone, kind), n)
