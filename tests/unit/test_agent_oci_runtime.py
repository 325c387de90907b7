"""Which OCI runtime the agent picks and why, and how runtime failures read."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from cri_runtime.agent.cgroups import CgroupLayout
from cri_runtime.agent.oci_runtime import RuntimeChoice, choose_runtime, runtime_errors
from cri_runtime.agent.reaper import exit_code

V2 = CgroupLayout(unified=Path("/sys/fs/cgroup"))
HYBRID = CgroupLayout(unified=Path("/sys/fs/cgroup/unified"), v1={"memory": Path("/m")})


def installed(*names: str) -> Callable[[str], str | None]:
    return lambda name: f"/usr/bin/{name}" if name in names else None


BOTH = installed("crun", "runc")


def works(_: str) -> str | None:
    return None


def broken(_: str) -> str | None:
    return "cgroups in hybrid mode not supported"


def choose(
    requested: str = "auto",
    which: Callable[[str], str | None] = BOTH,
    layout: CgroupLayout = V2,
    probe: Callable[[str], str | None] = works,
) -> RuntimeChoice:
    return choose_runtime(requested, which=which, layout=layout, probe_crun=probe)


def test_crun_is_preferred_where_it_works() -> None:
    assert choose().name == "crun" and choose().binary == "/usr/bin/crun"


def test_hybrid_cgroups_mean_runc_without_probing() -> None:
    def never(_: str) -> str | None:
        raise AssertionError("probed")

    choice = choose(layout=HYBRID, probe=never)
    assert choice.name == "runc" and "hybrid" in choice.reason


def test_a_failed_probe_falls_back_to_runc_with_the_reason() -> None:
    choice = choose(probe=broken)
    assert choice.name == "runc" and "cgroups in hybrid mode not supported" in choice.reason


def test_whatever_is_installed() -> None:
    assert choose(which=installed("runc")).name == "runc"
    assert choose(which=installed("crun"), probe=broken).name == "crun"  # nothing better
    with pytest.raises(ValueError, match="neither crun nor runc"):
        choose(which=installed())


def test_a_configured_runtime_is_used_as_is() -> None:
    assert choose("runc") == RuntimeChoice("runc", "/usr/bin/runc", "configured")
    assert choose("crun", layout=HYBRID).name == "crun"
    with pytest.raises(ValueError, match="crun is configured but not installed"):
        choose("crun", which=installed("runc"))


def test_runtime_errors_come_from_the_json_log() -> None:
    log = "\n".join(
        [
            json.dumps({"level": "warning", "msg": "noise"}),
            json.dumps({"level": "error", "msg": "runc create failed: no such file"}),
            "not json",
        ]
    )
    assert runtime_errors(log) == "runc create failed: no such file"
    assert runtime_errors("plain\ntext") == "plain\ntext"


def test_exit_codes_as_a_shell_reports_them() -> None:
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGKILL) == 137
    status = os.system("exit 5")  # a real wait status
    assert exit_code(status) == 5
