"""Runs the Xen zones benchmark in the nested Xen testbed (markers xen and bench): grant vs local
channel, a zone's start by stage. Figures are reported, never asserted: under emulation they are
no prediction of real hardware."""

import json
import math

import pytest

from tests.bench.xen_zones import RESULTS, main


@pytest.mark.xen
@pytest.mark.bench
@pytest.mark.timeout(1800)  # may build the testbed image first (~2-5 min)
def test_channels_and_zone_start_stages_measured_in_the_testbed() -> None:
    assert main(["--quick", "--out", str(RESULTS)]) == 0
    result = json.loads(RESULTS.read_text())
    raw = result["raw"]
    for link in ("local", "grant"):
        assert raw[link]["null"]["calls"] == result["calls"]
    assert len(raw["zone_starts"]) == result["zones"]
    for name, value in result["figures"].items():
        assert math.isfinite(value) and value > 0, name
