"""The agent's image disks (cri_runtime/agent/image_disks.py): mounted once per image while
containers use it, after the hotplugged disk appears, only if its label names the image. The
mount calls are recorded here (they need a Xen disk); sysfs and /dev are directories."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cri_runtime.agent import rootfs
from cri_runtime.agent.client import AgentError
from cri_runtime.agent.image_disks import ImageMounts, ext4_label
from cri_runtime.agent.protocol import ImageDisk
from cri_runtime.zones.xen_disks import build_ext4

HEX = "c3" * 32


def disk(vdev: str = "xvdc", image_hex: str = HEX) -> ImageDisk:
    return ImageDisk(device=Path("/dev") / vdev, mount_point=Path("/run/vgpu/images") / image_hex)


@pytest.fixture
def ext4(tmp_path: Path) -> Path:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "file").write_text("x")
    return build_ext4(tmp_path / "tree", tmp_path / "disk.ext4", label=HEX[:16])


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(
        rootfs, "mount_readonly", lambda d, t, f: seen.append(("mount", str(d), str(t), f))
    )
    monkeypatch.setattr(
        rootfs, "unmount", lambda t, lazy=True: seen.append(("umount", str(t), str(lazy)))
    )
    return seen


def mounts(tmp_path: Path, timeout_s: float = 5.0) -> ImageMounts:
    (tmp_path / "sys").mkdir(exist_ok=True)
    (tmp_path / "dev").mkdir(exist_ok=True)
    return ImageMounts(sys_block=tmp_path / "sys", dev=tmp_path / "dev", appear_timeout_s=timeout_s)


def plug(tmp_path: Path, vdev: str, image: Path) -> None:
    """What hotplug does: the disk in sysfs, its node in /dev (here: the image file)."""
    (tmp_path / "dev" / vdev).symlink_to(image)
    (tmp_path / "sys" / vdev).mkdir()
    (tmp_path / "sys" / vdev / "dev").write_text("202:32\n")


def test_the_label_is_read_from_the_superblock(ext4: Path, tmp_path: Path) -> None:
    assert ext4_label(ext4) == HEX[:16]
    (tmp_path / "zeros").write_bytes(bytes(4096))
    assert ext4_label(tmp_path / "zeros") is None


def test_one_mount_per_image_while_containers_use_it(
    ext4: Path, tmp_path: Path, calls: list[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    images = mounts(tmp_path)
    plug(tmp_path, "xvdc", ext4)
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: None)  # no /run/vgpu here
    images.acquire(disk(), "c1")
    images.acquire(disk(), "c2")
    target = f"/run/vgpu/images/{HEX}"
    assert calls == [("mount", str(tmp_path / "dev" / "xvdc"), target, "ext4")]
    images.release("c1")
    images.release("unknown")
    assert len(calls) == 1
    images.release("c2")
    assert calls[-1] == ("umount", target, "False")  # not lazy: the runtime detaches next
    assert images.mounted() == {}


def test_the_disk_is_waited_for_then_refused_if_it_is_another_image(
    ext4: Path, tmp_path: Path, calls: list[tuple[str, ...]]
) -> None:
    images = mounts(tmp_path)
    timer = threading.Timer(0.3, plug, (tmp_path, "xvdd", ext4))
    timer.start()
    started = time.monotonic()
    with pytest.raises(AgentError, match=f"holds '{HEX[:16]}', not image {'d4' * 8}"):
        images.acquire(disk("xvdd", "d4" * 32), "c1")
    assert time.monotonic() - started >= 0.25
    assert calls == [] and images.mounted() == {}


def test_a_disk_that_never_appears_fails_in_bounded_time(
    tmp_path: Path, calls: list[tuple[str, ...]]
) -> None:
    images = mounts(tmp_path, timeout_s=0.3)
    with pytest.raises(AgentError, match="xvde did not appear within"):
        images.acquire(disk("xvde"), "c1")
    assert calls == []


def test_a_missing_device_node_is_made_from_sysfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[tuple[str, int]] = []
    monkeypatch.setattr(os, "mknod", lambda p, m, d: made.append((str(p), d)))
    images = mounts(tmp_path)
    (tmp_path / "sys" / "xvdc").mkdir()
    (tmp_path / "sys" / "xvdc" / "dev").write_text("202:32\n")
    assert images._device(disk()) == tmp_path / "dev" / "xvdc"
    assert made == [(str(tmp_path / "dev" / "xvdc"), os.makedev(202, 32))]
