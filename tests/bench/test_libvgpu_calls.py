"""Runs the libvgpu benchmark (``-m bench``; see scripts/bench.sh). Figures are reported against
their goals, never asserted: these machines are too noisy for timing thresholds."""

import json
import math

import pytest

from tests.bench.libvgpu_calls import GOALS, RESULTS, main


@pytest.mark.bench
def test_libvgpu_calls_benchmark() -> None:
    assert main(["--out", str(RESULTS)]) == 0
    result = json.loads(RESULTS.read_text())
    assert set(result["goals"]) == set(GOALS)
    for name, value in result["figures"].items():
        assert math.isfinite(value), name
