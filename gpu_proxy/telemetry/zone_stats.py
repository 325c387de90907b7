"""Per-zone counters the dispatcher bumps on its hot path, and the proxy-wide counters that
outlive any one zone.

Updates are plain int/float arithmetic under one small lock per object so the dispatcher pays
almost nothing per call; the metrics collector takes a consistent `snapshot()` at scrape time.
Gauges that mirror live tables (device memory, live handles) are deliberately absent: the
collector reads them from the zone itself so they can never drift from the truth.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

# Upper bounds (seconds) of the call-latency histogram. Forwarded CUDA calls cost from tens of
# microseconds (ring round trip) to seconds (synchronise, module load); 0.001 is an exact edge
# so "calls slower than 1 ms" is a single bucket lookup in PromQL.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.05,
    0.1,
    1.0,
)


class ZoneIdentity(BaseModel):
    """Who a zone is, for the `vgpu_zone_info` series that joins metrics to pods."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    zone: str
    domid: int
    pod: str = ""
    namespace: str = ""
    container: str = ""
    pod_uid: str = ""
    gpu_index: int
    gpu_uuid: str = ""


class MemcpyDirection(StrEnum):
    """Direction of a copy, as the `direction` label of `vgpu_memcpy_bytes_total`."""

    HTOD = "htod"
    DTOH = "dtoh"
    DTOD = "dtod"


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A latency histogram at one instant: cumulative counts per upper bound, ending at +Inf."""

    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int


@dataclass(frozen=True, slots=True)
class ZoneStatsSnapshot:
    """A consistent copy of one zone's counters, taken under its lock."""

    calls: Mapping[tuple[str, str], int]
    latency: Mapping[str, HistogramSnapshot]
    kernel_launches: int
    memcpy_bytes: Mapping[MemcpyDirection, int]
    allocations: int
    frees: int
    last_launch: float | None
    reclaimed: Mapping[str, int]


class _Histogram:
    """Non-cumulative bucket counts (last slot is +Inf); cumulated only when snapshotted."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to an edge belongs to that edge's bucket (le is inclusive).
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> HistogramSnapshot:
        running = 0
        buckets = []
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += n
            buckets.append((bound, running))
        return HistogramSnapshot(buckets=tuple(buckets), sum=self.sum, count=running)


class ZoneStats:
    """Counters for one zone; every `record_*` is O(1) (the histogram is O(log buckets))."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], int] = {}
        self._latency: dict[str, _Histogram] = {}
        self._launches = 0
        self._memcpy = dict.fromkeys(MemcpyDirection, 0)
        self._allocations = 0
        self._frees = 0
        self._last_launch: float | None = None
        self._reclaimed: dict[str, int] = {}

    def record_call(self, api: str, result: str, seconds: float) -> None:
        """Count one forwarded call by its outcome and observe how long it took."""
        seconds = max(seconds, 0.0)  # a clock step must not make a negative observation
        with self._lock:
            key = (api, result)
            self._calls[key] = self._calls.get(key, 0) + 1
            hist = self._latency.get(api)
            if hist is None:
                hist = self._latency[api] = _Histogram()
            hist.observe(seconds)

    def record_launch(self, when: float | None = None) -> None:
        """Count a kernel launch; `when` is Unix time (defaults to now)."""
        stamp = time.time() if when is None else when
        with self._lock:
            self._launches += 1
            self._last_launch = stamp

    def record_memcpy(self, direction: MemcpyDirection, nbytes: int) -> None:
        """Add the bytes of one copy; negative sizes are a caller bug, not a decrement."""
        if nbytes < 0:
            raise ValueError(f"memcpy size must be >= 0, got {nbytes}")
        with self._lock:
            self._memcpy[direction] += nbytes

    def record_allocation(self) -> None:
        with self._lock:
            self._allocations += 1

    def record_free(self) -> None:
        with self._lock:
            self._frees += 1

    def record_reclaimed(self, kind_counts: Mapping[str, int]) -> None:
        """Add handles the proxy had to free at teardown because the zone leaked them."""
        with self._lock:
            _add_counts(self._reclaimed, kind_counts)

    def snapshot(self) -> ZoneStatsSnapshot:
        with self._lock:
            return ZoneStatsSnapshot(
                calls=dict(self._calls),
                latency={api: h.snapshot() for api, h in self._latency.items()},
                kernel_launches=self._launches,
                memcpy_bytes=dict(self._memcpy),
                allocations=self._allocations,
                frees=self._frees,
                last_launch=self._last_launch,
                reclaimed=dict(self._reclaimed),
            )


@dataclass(frozen=True, slots=True)
class ProxyStatsSnapshot:
    teardowns: int
    reclaimed: Mapping[str, int]


class ProxyStats:
    """Proxy-wide counters: unlike `ZoneStats` these survive the zones they count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._teardowns = 0
        self._reclaimed: dict[str, int] = {}

    def record_teardown(self, kind_counts: Mapping[str, int]) -> None:
        """Count one zone teardown and the handles it reclaimed, by kind."""
        with self._lock:
            self._teardowns += 1
            _add_counts(self._reclaimed, kind_counts)

    def snapshot(self) -> ProxyStatsSnapshot:
        with self._lock:
            return ProxyStatsSnapshot(teardowns=self._teardowns, reclaimed=dict(self._reclaimed))


def _add_counts(into: dict[str, int], kind_counts: Mapping[str, int]) -> None:
    """Add per-kind counts, rejecting the whole batch (before any change) if one is negative."""
    bad = {kind: n for kind, n in kind_counts.items() if n < 0}
    if bad:
        raise ValueError(f"reclaimed counts must be >= 0, got {bad}")
    for kind, n in kind_counts.items():
        into[str(kind)] = into.get(str(kind), 0) + n
