"""Boots the nested Xen testbed and runs the dom0 suite inside it (marker xen; CI runs it).

One boot runs every dom0 test; the JUnit report it writes to the share is checked here, so a
suite that collected nothing, or skipped something, fails instead of passing quietly.
"""

import time
import xml.etree.ElementTree as ET

import pytest

from tests.xen.dom0_programs import build_dom0_programs
from tests.xen.pod_image import build_pod_image
from tests.xen.testbed import ROOT, build_image, run

DOM0_SUITE = ["tests/xen/dom0", "tests/unit/test_grant_link.py"]
EXPECTED = {
    "test_xl_info_reports_xen_4_17_with_pv",
    "test_xenstore_read_write_watch_with_pyxs",
    "test_pv_guest_boots_and_is_destroyed",
    "test_guest_grants_dom0_a_page_and_signals_it",
    "test_loopback_in_dom0_carries_a_message",
    "test_xl_list_output_parses",
    "test_paused_zone_has_a_home_it_may_read_and_not_write",
    "test_a_boot_whose_agent_never_comes_fails_and_leaves_nothing",
    "test_xl_failure_is_a_zone_error_with_xls_words",
    "test_recovery_destroys_vgpu_domains_nobody_tracks",
    "test_a_cuda_program_round_trips_over_the_brokers_grant_link",
    "test_pinned_memory_is_granted_to_gpu_proxy_and_copies_carry_no_data",
    "test_the_process_loses_its_gpu_when_gpu_proxys_side_goes",
    "test_two_zones_boot_the_agent_from_shared_read_only_disks",
    "test_a_gpu_pod_is_a_domu_whose_cuda_calls_cross_grant_pages",
    "test_two_zones_keep_their_quotas_and_one_destroyed_mid_call_spares_the_other",
    "test_a_runtime_killed_mid_pod_finds_it_again",
}


@pytest.mark.xen
@pytest.mark.timeout(3600)  # a cold image build (~4 min) plus boot and suite under emulation
def test_dom0_suite_passes_on_real_xen() -> None:
    t0 = time.monotonic()
    image = build_image()
    build_dom0_programs()  # Dom0 has no compiler: its C programs travel in the payload
    build_pod_image()  # nor nvcc: the Xen pods' CUDA image too
    build_s = time.monotonic() - t0
    command = (
        "python3 -m pytest -m dom0 -p no:cacheprovider -v --junitxml=$TESTBED_SHARE/junit.xml "
        + " ".join(DOM0_SUITE)
    )
    result = run(command, image=image, out_dir=ROOT / "results" / "xen" / "smoke", timeout_s=3000)
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
