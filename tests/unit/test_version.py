"""The Version RPC's runtime_version must come out with or without installed metadata."""

import tomllib
from importlib import metadata

import pytest

from vgpu_common import version


def test_installed_metadata_wins() -> None:
    version.project_version.cache_clear()
    assert version.project_version() == metadata.version("vgpu-isolated")


def test_a_checkout_without_metadata_reads_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    version.project_version.cache_clear()
    try:
        pinned = tomllib.loads(version.PYPROJECT.read_text())["project"]["version"]
        assert version.project_version() == f"{pinned}+checkout"
    finally:
        version.project_version.cache_clear()
