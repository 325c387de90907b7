"""Runs the IDM benchmark (``-m bench``; see scripts/bench.sh). Figures are reported against
their goals, never asserted: these machines are too noisy for timing thresholds."""

import json
import math

import pytest

from tests.bench.idm_channel import GOALS, RESULTS, main


@pytest.mark.bench
def test_idm_channel_benchmark() -> None:
    assert main(["--out", str(RESULTS)]) == 0
    result = json.loads(RESULTS.read_text())
    assert set(result["goals"]) == set(GOALS)
    for name, value in result["figures"].items():
        assert math.isfinite(value) and value > 0, name
