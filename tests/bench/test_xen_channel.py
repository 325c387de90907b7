"""Runs the grant-vs-local channel benchmark in the nested Xen testbed (markers xen and bench).
The ratio is reported, never asserted: under emulation it is no prediction of real hardware."""

import json
import math

import pytest

from tests.bench.xen_channel import RESULTS, main


@pytest.mark.xen
@pytest.mark.bench
@pytest.mark.timeout(1800)  # may build the testbed image first (~2-5 min)
def test_grant_and_local_channels_measured_in_the_same_dom0() -> None:
    assert main(["--quick", "--out", str(RESULTS)]) == 0
    result = json.loads(RESULTS.read_text())
    raw = result["raw"]
    for link in ("local", "grant"):
        assert raw[link]["null"]["calls"] == result["calls"]
    for name, value in result["figures"].items():
        assert math.isfinite(value) and value > 0, name
