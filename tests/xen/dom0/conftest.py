"""Fixtures shared by the dom0 suite (collected only inside the testbed's Dom0)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.xen.dom0.zone_image import build_payload_disk


@pytest.fixture(scope="session")
def payload_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The zones' payload disk image (read-only ext4 of the checkout's runtime parts), built
    once per session; each zone attaches a loop device of its own to it."""
    image, seconds = build_payload_disk(tmp_path_factory.mktemp("payload"))
    print(f"payload disk {image}: {image.stat().st_size >> 20} MiB in {seconds:.1f} s")
    yield image
