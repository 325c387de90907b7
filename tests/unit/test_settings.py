"""Both daemons load settings the same way: defaults < TOML file < environment < options."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cri_runtime.config import RuntimeConfig, load_config
from gpu_proxy.config import load_config as load_proxy_config


def test_precedence_file_env_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "vgpu-runtime.toml"
    toml.write_text('zone_boot_timeout_s = 30\nlog_level = "debug"\noci_runtime = "crun"\n')
    assert load_config(toml).zone_boot_timeout_s == 30
    monkeypatch.setenv("VGPU_RUNTIME_LOG_LEVEL", "warning")
    config = load_config(toml, oci_runtime="runc")
    assert (config.zone_boot_timeout_s, config.log_level, config.oci_runtime) == (
        30,
        "warning",
        "runc",
    )
    assert load_config(None).zone_boot_timeout_s == RuntimeConfig().zone_boot_timeout_s


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml")
    typo = tmp_path / "typo.toml"
    typo.write_text("zone_bakend = 'xen'\n")
    with pytest.raises(ValidationError, match="zone_bakend"):
        load_config(typo)
    proxy = tmp_path / "gpu-proxy.toml"
    proxy.write_text("metrics_port = 70000\n")
    with pytest.raises(ValidationError, match="metrics_port"):
        load_proxy_config(proxy)
