"""Reading the image's files safely, and measuring the writable layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cri_runtime.agent import rootfs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    image = tmp_path / "rootfs"
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "real").write_text("inside\n")
    (tmp_path / "secret").write_text("outside\n")
    return image


def test_symlinks_resolve_inside_the_root(root: Path) -> None:
    (root / "etc" / "passwd").symlink_to("/etc/real")
    (root / "etc" / "up").symlink_to("../../../../secret")
    (root / "etc" / "abs").symlink_to(root.parent / "secret")
    assert rootfs.read_file_in_root(root, "/etc/passwd") == "inside\n"
    assert rootfs.resolve_in_root(root, "/etc/up") == root / "secret"
    assert rootfs.read_file_in_root(root, "/etc/up") is None
    assert rootfs.resolve_in_root(root, "etc/abs") == root / root.parent.relative_to("/") / "secret"
    assert rootfs.read_file_in_root(root, "/etc/abs") is None


def test_missing_fifo_and_loop(root: Path) -> None:
    assert rootfs.read_file_in_root(root, "/etc/group") is None
    os.mkfifo(root / "etc" / "fifo")
    assert rootfs.read_file_in_root(root, "/etc/fifo") is None  # never blocks
    assert rootfs.read_file_in_root(root, "/etc") is None
    (root / "etc" / "a").symlink_to("b")
    (root / "etc" / "b").symlink_to("a")
    with pytest.raises(OSError, match="too many symlinks"):
        rootfs.read_file_in_root(root, "/etc/a")


def test_reads_are_capped(root: Path) -> None:
    (root / "etc" / "big").write_text("x" * 5000)
    assert rootfs.read_file_in_root(root, "/etc/big", limit=10) == "x" * 10


def test_overlay_paths_are_checked(tmp_path: Path) -> None:
    target = tmp_path / "t"
    with pytest.raises(ValueError, match="at least one"):
        rootfs.mount_overlay([], tmp_path, tmp_path, target)
    with pytest.raises(ValueError, match="must be absolute"):
        rootfs.mount_overlay([tmp_path / "a:b"], tmp_path, tmp_path, target)
    with pytest.raises(ValueError, match="not a directory"):
        rootfs.mount_overlay([tmp_path / "absent"], tmp_path, tmp_path, target)


def test_unmounting_what_is_not_mounted_is_fine(tmp_path: Path) -> None:
    rootfs.unmount(tmp_path)
    rootfs.unmount(tmp_path / "absent")


def test_usage_counts_blocks_and_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 100_000)
    os.link(tmp_path / "d" / "f", tmp_path / "hard")
    (tmp_path / "link").symlink_to("d/f")
    size, inodes = rootfs.usage(tmp_path)
    assert inodes == 3  # d, f (once), link
    assert 100_000 <= size < 200_000
