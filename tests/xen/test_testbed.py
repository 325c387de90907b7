"""Boots the nested Xen testbed and runs the dom0 suite inside it (marker xen; CI runs it).

One boot runs every dom0 test; the JUnit report it writes to the share is checked here, so a
suite that collected nothing, or skipped something, fails instead of passing quietly.
"""

import time
import xml.etree.ElementTree as ET

import pytest

from tests.xen.testbed import ROOT, build_image, run

DOM0_SUITE = ["tests/xen/dom0", "tests/unit/test_grant_link.py"]
EXPECTED = {
    "test_xl_info_reports_xen_4_17_with_pv",
    "test_xenstore_read_write_watch_with_pyxs",
    "test_pv_guest_boots_and_is_destroyed",
    "test_guest_grants_dom0_a_page_and_signals_it",
    "test_loopback_in_dom0_carries_a_message",
}


@pytest.mark.xen
@pytest.mark.timeout(2700)  # a cold image build (~2 min) plus boot and suite under emulation
def test_dom0_suite_passes_on_real_xen() -> None:
    t0 = time.monotonic()
    image = build_image()
    build_s = time.monotonic() - t0
    command = (
        "python3 -m pytest -m dom0 -p no:cacheprovider -v --junitxml=$TESTBED_SHARE/junit.xml "
        + " ".join(DOM0_SUITE)
    )
    result = run(command, image=image, out_dir=ROOT / "results" / "xen" / "smoke", timeout_s=1500)
    print(
        f"\ntestbed: image {build_s:.1f} s ({(image.dir / 'ready').read_text().strip()}), "
        f"boot + suite {result.wall_s:.1f} s, stages {result.stages}"
    )
    junit = result.share / "junit.xml"
    assert result.rc == 0 and junit.exists(), result.diagnosis()
    cases = ET.parse(junit).getroot().iter("testcase")
    problems = {"failure", "error", "skipped"}
    outcomes = {
        case.get("name", ""): [c.tag for c in case if c.tag in problems] or ["passed"]
        for case in cases
    }
    assert set(outcomes) == EXPECTED, outcomes
    assert all(tags == ["passed"] for tags in outcomes.values()), outcomes
