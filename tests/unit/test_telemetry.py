"""gpu-proxy telemetry: the exposition Prometheus scrapes, the endpoint, and the log format."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpu_proxy.telemetry import (
    LATENCY_BUCKETS,
    MemcpyDirection,
    ProxyCollector,
    ProxyStats,
    TelemetryServer,
    ZoneIdentity,
    ZoneStats,
    ZoneView,
    bind_zone,
)
from gpu_proxy.telemetry.zone_stats import ZoneStatsSnapshot
from vgpu_common.logs import configure_logging

# The `le` labels Prometheus must see, spelled out rather than derived from LATENCY_BUCKETS.
EXPECTED_LE = (
    "1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005", "0.001",
    "0.0025", "0.005", "0.01", "0.05", "0.1", "1.0", "+Inf",
)  # fmt: skip

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class FakeZone:
    identity: ZoneIdentity
    stats: ZoneStats = field(default_factory=ZoneStats)
    used: int = 0
    limit: int = 0
    handles: dict[str, int] = field(default_factory=dict)
    broken: bool = False

    def memory(self) -> tuple[int, int]:
        if self.broken:
            raise LookupError("zone torn down")
        return self.used, self.limit

    def handle_counts(self) -> Mapping[str, int]:
        return self.handles


def _identity(zone: str, domid: int, pod: str) -> ZoneIdentity:
    return ZoneIdentity(
        zone=zone,
        domid=domid,
        pod=pod,
        namespace="ml",
        container="trainer",
        pod_uid=f"uid-{pod}",
        gpu_index=domid % 2,
        gpu_uuid=f"GPU-{domid}",
    )


def _two_zones() -> tuple[FakeZone, FakeZone]:
    a = FakeZone(_identity("zone-a", 3, "pod-a"), used=1 << 20, limit=1 << 30)
    a.handles = {"stream": 2, "context": 1}
    a.stats.record_call("cuLaunchKernel", "CUDA_SUCCESS", 0.00002)
    a.stats.record_call("cuLaunchKernel", "CUDA_SUCCESS", 0.001)
    a.stats.record_call("cuLaunchKernel", "CUDA_ERROR_INVALID_VALUE", 2.0)
    a.stats.record_launch(when=1_700_000_000.5)
    a.stats.record_launch(when=1_700_000_001.5)
    a.stats.record_memcpy(MemcpyDirection.HTOD, 4096)
    a.stats.record_memcpy(MemcpyDirection.DTOH, 100)
    a.stats.record_allocation()
    a.stats.record_allocation()
    a.stats.record_free()
    a.stats.record_reclaimed({"stream": 3})
    b = FakeZone(_identity("zone-b", 4, "pod-b"), used=0, limit=2 << 30)
    b.stats.record_call("cuMemAlloc_v2", "CUDA_ERROR_OUT_OF_MEMORY", 0.0005)
    return a, b


def _registry(zones: list[FakeZone], proxy: ProxyStats) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ProxyCollector(lambda: list(zones), proxy))
    return registry


def _series(text: str) -> Series:
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def _s(
    name: str, value: float, **labels: str
) -> tuple[tuple[str, frozenset[tuple[str, str]]], float]:
    return (name, frozenset(labels.items())), value


def _histogram(zone: str, api: str, per_bucket: Mapping[str, int], total: float) -> Series:
    """Expected samples of one histogram, given how many observations fell in each bucket."""
    out: Series = {}
    running = 0
    for le in EXPECTED_LE:
        running += per_bucket.get(le, 0)
        out.update([_s("vgpu_call_duration_seconds_bucket", running, zone=zone, api=api, le=le)])
    out.update(
        [
            _s("vgpu_call_duration_seconds_count", running, zone=zone, api=api),
            _s("vgpu_call_duration_seconds_sum", total, zone=zone, api=api),
        ]
    )
    return out


def _zone_series(zone: FakeZone) -> Series:
    """Series every zone has regardless of activity (the fixed-label ones)."""
    ident = zone.identity
    z = ident.zone
    snap = zone.stats.snapshot()
    return dict(
        [
            _s(
                "vgpu_zone_info",
                1,
                zone=z,
                domid=str(ident.domid),
                pod=ident.pod,
                namespace=ident.namespace,
                container=ident.container,
                pod_uid=ident.pod_uid,
                gpu=str(ident.gpu_index),
                gpu_uuid=ident.gpu_uuid,
            ),
            _s("vgpu_device_memory_used_bytes", zone.used, zone=z),
            _s("vgpu_device_memory_limit_bytes", zone.limit, zone=z),
            _s("vgpu_kernel_launches_total", snap.kernel_launches, zone=z),
            _s("vgpu_memory_allocations_total", snap.allocations, zone=z),
            _s("vgpu_memory_frees_total", snap.frees, zone=z),
            *(
                _s("vgpu_memcpy_bytes_total", snap.memcpy_bytes[d], zone=z, direction=d.value)
                for d in MemcpyDirection
            ),
        ]
    )


def test_collector_emits_exactly_the_expected_series() -> None:
    a, b = _two_zones()
    proxy = ProxyStats()
    proxy.record_teardown({"event": 5})
    got = _series(generate_latest(_registry([a, b], proxy)).decode())

    expected: Series = dict(
        [
            _s("vgpu_zones", 2),
            _s("vgpu_calls_total", 2, zone="zone-a", api="cuLaunchKernel", result="CUDA_SUCCESS"),
            _s(
                "vgpu_calls_total",
                1,
                zone="zone-a",
                api="cuLaunchKernel",
                result="CUDA_ERROR_INVALID_VALUE",
            ),
            _s(
                "vgpu_calls_total",
                1,
                zone="zone-b",
                api="cuMemAlloc_v2",
                result="CUDA_ERROR_OUT_OF_MEMORY",
            ),
            _s("vgpu_last_kernel_launch_timestamp_seconds", 1_700_000_001.5, zone="zone-a"),
            _s("vgpu_handles", 2, zone="zone-a", kind="stream"),
            _s("vgpu_handles", 1, zone="zone-a", kind="context"),
            _s("vgpu_handles_reclaimed_total", 3, zone="zone-a", kind="stream"),
            _s("vgpu_proxy_handles_reclaimed_total", 5, kind="event"),
            _s("vgpu_proxy_zone_teardowns_total", 1),
        ]
    )
    expected |= _zone_series(a) | _zone_series(b)
    expected |= _histogram(
        "zone-a", "cuLaunchKernel", {"2.5e-05": 1, "0.001": 1, "+Inf": 1}, 0.00002 + 0.001 + 2.0
    )
    expected |= _histogram("zone-b", "cuMemAlloc_v2", {"0.0005": 1}, 0.0005)
    # Spot-check the helper saw the activity, so `expected` is not trivially built from zeros.
    assert expected[_s("vgpu_memcpy_bytes_total", 0, zone="zone-a", direction="htod")[0]] == 4096
    assert expected[_s("vgpu_memory_frees_total", 0, zone="zone-a")[0]] == 1

    assert got.keys() == expected.keys(), (
        f"missing {expected.keys() - got.keys()}, extra {got.keys() - expected.keys()}"
    )
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_removed_zone_vanishes_but_proxy_reclaimed_count_stays() -> None:
    a, b = _two_zones()
    zones = [a, b]
    proxy = ProxyStats()
    registry = _registry(zones, proxy)

    # Teardown as the registry would do it: account reclaimed handles, then drop the zone.
    a.stats.record_reclaimed({"event": 4})
    proxy.record_teardown({"stream": 3, "event": 4})
    zones.remove(a)

    got = _series(generate_latest(registry).decode())
    zone_labels = {dict(labels).get("zone") for _, labels in got}
    assert "zone-a" not in zone_labels
    assert "zone-b" in zone_labels
    assert got[_s("vgpu_zones", 0)[0]] == 1
    assert got[_s("vgpu_proxy_handles_reclaimed_total", 0, kind="stream")[0]] == 3
    assert got[_s("vgpu_proxy_handles_reclaimed_total", 0, kind="event")[0]] == 4
    assert got[_s("vgpu_proxy_zone_teardowns_total", 0)[0]] == 1


def test_histogram_has_exact_1ms_edge_and_le_is_inclusive() -> None:
    assert 0.001 in LATENCY_BUCKETS
    stats = ZoneStats()
    stats.record_call("cuCtxSynchronize", "CUDA_SUCCESS", 0.001)
    stats.record_call("cuCtxSynchronize", "CUDA_SUCCESS", 0.0010001)
    zone = FakeZone(_identity("z", 1, "p"), stats=stats)
    got = _series(generate_latest(_registry([zone], ProxyStats())).decode())
    bucket = "vgpu_call_duration_seconds_bucket"
    labels = {"zone": "z", "api": "cuCtxSynchronize"}
    assert got[_s(bucket, 0, le="0.0005", **labels)[0]] == 0
    assert got[_s(bucket, 0, le="0.001", **labels)[0]] == 1
    assert got[_s(bucket, 0, le="0.0025", **labels)[0]] == 2


def test_a_failing_zone_is_skipped_and_the_rest_still_reported() -> None:
    a, b = _two_zones()
    a.broken = True
    got = _series(generate_latest(_registry([a, b], ProxyStats())).decode())
    assert {dict(labels).get("zone") for _, labels in got} == {None, "zone-b"}
    assert got[_s("vgpu_zones", 0)[0]] == 2


def test_registering_the_collector_does_not_read_zones() -> None:
    reads: list[int] = []

    def zones() -> list[ZoneView]:
        reads.append(1)
        return []

    registry = CollectorRegistry()
    registry.register(ProxyCollector(zones, ProxyStats()))
    assert reads == []
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(ProxyCollector(zones, ProxyStats()))


def test_promtool_accepts_the_exposition_without_lint_warnings() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (scripts/setup.sh)")
    a, b = _two_zones()
    proxy = ProxyStats()
    proxy.record_teardown({"stream": 1})
    text = generate_latest(_registry([a, b], proxy))
    assert b"vgpu_call_duration_seconds_bucket" in text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False
    )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert report.strip() == "", f"promtool lint: {report}"


def test_invalid_updates_are_rejected_without_partial_effect() -> None:
    stats = ZoneStats()
    with pytest.raises(ValueError):
        stats.record_memcpy(MemcpyDirection.DTOD, -1)
    with pytest.raises(ValueError):
        stats.record_reclaimed({"stream": 2, "event": -1})
    proxy = ProxyStats()
    with pytest.raises(ValueError):
        proxy.record_teardown({"stream": 2, "event": -1})
    snap = stats.snapshot()
    assert snap.memcpy_bytes[MemcpyDirection.DTOD] == 0
    assert snap.reclaimed == {}
    assert proxy.snapshot().reclaimed == {}


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_http_server_serves_metrics_and_health() -> None:
    a, b = _two_zones()
    health: list[tuple[bool, str] | Exception] = [(True, "")]

    def check() -> tuple[bool, str]:
        if isinstance(health[0], Exception):
            raise health[0]
        return health[0]

    with TelemetryServer(
        _registry([a, b], ProxyStats()), health=check, host="127.0.0.1", port=0
    ) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert server.port != 0

        status, ctype, body = _get(f"{base}/metrics")
        assert status == 200
        assert ctype == "text/plain; version=0.0.4; charset=utf-8"
        assert _series(body)[_s("vgpu_zones", 0)[0]] == 2

        assert _get(f"{base}/healthz")[::2] == (200, "ok\n")
        health[0] = (False, "GPU 0 lost")
        assert _get(f"{base}/healthz")[::2] == (503, "GPU 0 lost\n")
        health[0] = RuntimeError("nvml gone")
        status, _, body = _get(f"{base}/healthz")
        assert status == 503
        assert "nvml gone" in body

        assert _get(f"{base}/nope")[0] == 404
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/healthz", timeout=2)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_carry_bound_zone_and_request_id() -> None:
    out = io.StringIO()
    configure_logging(json=True, level="info", stream=out)
    log = bind_zone(structlog.stdlib.get_logger("gpu_proxy.dispatch"), _identity("z7", 7, "p7"))
    log.bind(request_id=42).info("call done", api="cuMemAlloc_v2")
    log.debug("below the level")
    logging.getLogger("grpc").warning("from stdlib %s", "too")

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2, out.getvalue()
    first, second = lines
    assert first["event"] == "call done"
    assert first["level"] == "info"
    assert first["logger"] == "gpu_proxy.dispatch"
    assert (first["zone"], first["domid"], first["pod"], first["request_id"]) == ("z7", 7, "p7", 42)
    stamp = datetime.fromisoformat(first["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert (second["event"], second["logger"], second["level"]) == (
        "from stdlib too",
        "grpc",
        "warning",
    )


@pytest.mark.usefixtures("restore_logging")
def test_console_logs_are_for_humans() -> None:
    out = io.StringIO()
    configure_logging(json=False, level="debug", stream=out)
    structlog.stdlib.get_logger("gpu_proxy").debug("zone up", zone="z1")
    text = out.getvalue()
    assert "zone up" in text and "zone=z1" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


_ops = st.one_of(
    st.tuples(
        st.just("call"),
        st.sampled_from(["cuLaunchKernel", "cuMemcpyHtoD_v2"]),
        st.sampled_from(["CUDA_SUCCESS", "CUDA_ERROR_INVALID_VALUE"]),
        st.one_of(st.sampled_from(LATENCY_BUCKETS), st.floats(-1.0, 10.0, allow_nan=False)),
    ),
    st.tuples(st.just("launch")),
    st.tuples(st.just("memcpy"), st.sampled_from(MemcpyDirection), st.integers(0, 1 << 40)),
    st.tuples(st.just("alloc")),
    st.tuples(st.just("free")),
    st.tuples(
        st.just("reclaim"), st.dictionaries(st.sampled_from(["stream", "event"]), st.integers(0, 9))
    ),
)


def _counters(snap: ZoneStatsSnapshot) -> dict[object, float]:
    """Every monotonic quantity in a snapshot, keyed so two snapshots can be compared."""
    flat: dict[object, float] = {
        "launches": snap.kernel_launches,
        "allocs": snap.allocations,
        "frees": snap.frees,
    }
    flat.update({("calls", k): v for k, v in snap.calls.items()})
    flat.update({("memcpy", k): v for k, v in snap.memcpy_bytes.items()})
    flat.update({("reclaimed", k): v for k, v in snap.reclaimed.items()})
    for api, hist in snap.latency.items():
        flat[("sum", api)] = hist.sum
        flat.update({("bucket", api, le): n for le, n in hist.buckets})
    return flat


@settings(max_examples=150, deadline=None)
@given(st.lists(_ops, max_size=40))
def test_stats_stay_monotonic_and_histograms_consistent(ops: list[tuple[object, ...]]) -> None:
    stats = ZoneStats()
    observed: dict[str, list[float]] = {}
    previous = _counters(stats.snapshot())
    for op in ops:
        match op:
            case ("call", str(api), str(result), float(seconds)):
                stats.record_call(api, result, seconds)
                observed.setdefault(api, []).append(max(seconds, 0.0))
            case ("launch",):
                stats.record_launch()
            case ("memcpy", MemcpyDirection() as direction, int(nbytes)):
                stats.record_memcpy(direction, nbytes)
            case ("alloc",):
                stats.record_allocation()
            case ("free",):
                stats.record_free()
            case ("reclaim", dict() as counts):
                stats.record_reclaimed(counts)
            case _:
                pytest.fail(f"unhandled op {op}")
        snap = stats.snapshot()
        current = _counters(snap)
        for key, before in previous.items():
            assert current[key] >= before, key
        previous = current

        for api, hist in snap.latency.items():
            cumulative = [n for _, n in hist.buckets]
            assert cumulative == sorted(cumulative)
            assert hist.buckets[-1] == (float("inf"), hist.count)
            assert hist.count == sum(n for (a, _), n in snap.calls.items() if a == api)

    snap = stats.snapshot()
    assert snap.latency.keys() == observed.keys()
    for api, values in observed.items():
        for le, n in snap.latency[api].buckets:
            assert n == sum(1 for v in values if v <= le), (api, le)
        assert snap.latency[api].sum == pytest.approx(sum(values))
