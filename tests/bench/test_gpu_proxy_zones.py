"""Runs the gpu-proxy zone benchmark (``-m bench``; see scripts/bench.sh). Figures are reported
against their goals, never asserted: these machines are too noisy for timing thresholds."""

import json
import math

import pytest

from tests.bench.gpu_proxy_zones import GOALS, RESULTS, ZONE_COUNTS, main


@pytest.mark.bench
def test_gpu_proxy_zones_benchmark() -> None:
    assert main(["--out", str(RESULTS)]) == 0
    result = json.loads(RESULTS.read_text())
    assert set(result["goals"]) == set(GOALS)
    assert [row["zones"] for row in result["raw"]["scaling"]] == list(ZONE_COUNTS)
    for n in ZONE_COUNTS:
        for key in ("calls_per_s", "zone_p50_us", "zone_p99_us", "p50_vs_1_zone"):
            assert f"zones_{n}_{key}" in result["figures"]
    for name in ("memory_per_idle_zone_mib", "python_heap_per_idle_zone_kib"):
        assert name in result["figures"]
    for name, value in result["figures"].items():
        assert math.isfinite(value), name
        if name.startswith("zones_"):
            assert value > 0, name
