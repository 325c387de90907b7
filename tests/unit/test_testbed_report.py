"""The testbed's host side without booting anything: which layer a failed run blames, stage
timings, what goes into the payload, and the QEMU/Xen settings the testbed depends on."""

from pathlib import Path

import pytest

from tests.xen.testbed import (
    DOM0_PYTHON,
    Image,
    RunResult,
    parse_stages,
    payload_files,
    python_pins,
    qemu_command,
)

XEN_BOOT = "(XEN) Xen version 4.17\n(XEN) Hardware Dom0 shutdown: rebooting machine\n"


def result(
    tmp_path: Path, serial: str, dom0: str | None, rc: int | None, timed_out: bool = False
) -> RunResult:
    (tmp_path / "share").mkdir(exist_ok=True)
    (tmp_path / "serial.log").write_text(serial)
    if dom0 is not None:
        (tmp_path / "share" / "dom0.log").write_text(dom0)
    return RunResult(rc=rc, timed_out=timed_out, wall_s=1.0, out_dir=tmp_path)


@pytest.mark.parametrize(
    ("serial", "dom0", "rc", "timed_out", "verdict"),
    [
        ("", None, None, False, "the emulator failed"),
        ("SeaBIOS\nBooting from ROM\n", None, None, False, "Xen did not start"),
        (XEN_BOOT, None, None, False, "Dom0 did not reach the testbed init"),
        (XEN_BOOT, "TESTBED-FAIL dom0: Xen daemons did not start\n", 125, False, "Xen daemons"),
        (XEN_BOOT, "TESTBED-STAGE dom0-init 20.0\n", None, True, "timed out"),
        (XEN_BOOT, "TESTBED-STAGE dom0-init 20.0\n", None, False, "stopped before the command"),
        (XEN_BOOT, "TESTBED-STAGE command-done 90.0\n", 3, False, "exit code 3"),
        (XEN_BOOT, "TESTBED-STAGE command-done 90.0\n", 0, False, "passed"),
    ],
)
def test_diagnosis_names_the_layer_that_failed(
    tmp_path: Path, serial: str, dom0: str | None, rc: int | None, timed_out: bool, verdict: str
) -> None:
    report = result(tmp_path, serial, dom0, rc, timed_out).diagnosis()
    assert report.splitlines()[0].startswith("testbed: ")
    assert verdict in report.splitlines()[0]
    assert "--- serial" in report and "--- Dom0 log" in report


def test_stage_timings_come_from_dom0_uptime(tmp_path: Path) -> None:
    log = tmp_path / "dom0.log"
    log.write_text("noise\nTESTBED-STAGE dom0-init 26.7\nTESTBED-STAGE xen-ready 30.85\n")
    assert parse_stages(log) == {"dom0-init": 26.7, "xen-ready": 30.85}
    assert parse_stages(tmp_path / "missing.log") == {}


def test_payload_is_the_checkout_plus_built_extensions() -> None:
    files = payload_files()
    assert "pyproject.toml" in files and "idm/csrc/ring.c" in files
    assert any(f.startswith("idm/_ring") and f.endswith(".so") for f in files)
    assert not any(f.startswith((".venv/", "results/", ".git/")) for f in files)


def test_qemu_and_xen_settings_the_testbed_relies_on(tmp_path: Path) -> None:
    cmd = " ".join(qemu_command(Image(tmp_path), tmp_path))
    assert "-accel tcg" in cmd and "max,-smap,-smep" in cmd  # Dom0 faults without them
    assert "-no-reboot" in cmd  # Dom0's final reboot ends QEMU
    assert "spec-ctrl=eager-fpu" in cmd  # lazy FPU corrupts Dom0 programs under TCG
    assert "snapshot=on" in cmd  # the cached image never changes
    # the zones' root disk: the same image again, read-only (Dom0's /dev/vdb)
    drives = [a for a in qemu_command(Image(tmp_path), tmp_path) if a.startswith("file=")]
    assert drives == [
        f"file={tmp_path / 'dom0.ext4'},format=raw,if=virtio,snapshot=on",
        f"file={tmp_path / 'dom0.ext4'},format=raw,if=virtio,readonly=on",
    ]


def test_dom0_python_uses_the_project_pins() -> None:
    pins = python_pins()
    assert [p.split("==")[0].lower() for p in pins] == DOM0_PYTHON
    assert all("==" in p for p in pins)
