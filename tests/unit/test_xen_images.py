"""Container images as zone disks on the host (cri_runtime/zones/xen_images.py): real mke2fs,
debugfs and loop devices (skipped without root or loop devices), xl a script that logs its
arguments, and blkback a thread that connects each attached disk in the xenstored stand-in the
way the real one does (the real path runs in the nested Xen testbed)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_runtime.agent.protocol import ImageDisk
from cri_runtime.zones import xen_disks, xen_images
from cri_runtime.zones.base import ZoneError
from cri_runtime.zones.xen_images import (
    XenImageDisks,
    link_tree,
    next_vdev,
    read_state,
    vdev_name,
    zone_layers,
)
from cri_runtime.zones.xl import Xl
from idm.xen.xenstore import Xenstore
from tests.unit.conftest import XS_ZONE

IMAGE_A = "sha256:" + "a1" * 32
IMAGE_B = "sha256:" + "b2" * 32
DOMAIN = "vgpu-z1"
DEBUGFS = shutil.which("debugfs") or shutil.which("debugfs", path="/usr/sbin:/sbin")
ROOT = os.geteuid() == 0


def test_vdev_names_follow_linux_and_the_first_free_one_is_taken() -> None:
    assert [vdev_name(i) for i in (0, 1, 25, 26, 27, 51, 52)] == [
        "xvda", "xvdb", "xvdz", "xvdaa", "xvdab", "xvdaz", "xvdba",
    ]  # fmt: skip
    assert next_vdev({"xvda", "xvdb"}) == "xvdc"
    assert next_vdev({"xvda", "xvdb", "xvdd"}) == "xvdc"  # a detached disk's name is reused
    assert next_vdev({vdev_name(i) for i in range(30)}) == vdev_name(30)
    with pytest.raises(ZoneError, match="no free virtual disk"):
        next_vdev({vdev_name(i) for i in range(xen_images.MAX_VDEVS)})


def test_image_ids_are_checked_and_layers_map_under_the_mount() -> None:
    layers = [Path("/store/layers") / ("1" * 64), Path("/store/layers") / ("2" * 64)]
    mount = Path("/run/vgpu/images") / ("a1" * 32)
    assert zone_layers(IMAGE_A, layers) == (mount / ("1" * 64), mount / ("2" * 64))
    assert xen_images.disk_label(IMAGE_A) == "a1" * 8
    for bad in ("a1" * 32, "sha256:" + "A1" * 32, "sha256:../x", "sha512:" + "a1" * 32):
        with pytest.raises(ZoneError, match="not a sha256 digest"):
            xen_images.mount_point(bad)


def test_link_tree_links_files_and_copies_directories(tmp_path: Path) -> None:
    src = tmp_path / "layer"
    (src / "etc" / "deep").mkdir(parents=True)
    (src / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (src / "bin").symlink_to("usr/bin")
    (src / "etc" / "deep").chmod(0o710)
    os.utime(src / "etc", ns=(1_000_000_000, 2_000_000_000))
    if ROOT:
        os.mknod(src / "gone", stat.S_IFCHR, os.makedev(0, 0))  # an overlay whiteout
        os.chown(src / "etc" / "deep", 1234, 4321)
        with contextlib.suppress(OSError):  # not every file system takes trusted.*
            os.setxattr(src / "etc", "trusted.overlay.opaque", b"y")
    link_tree(src, tmp_path / "copy")
    copy = tmp_path / "copy"
    assert os.stat(copy / "etc" / "passwd").st_ino == os.stat(src / "etc" / "passwd").st_ino
    assert os.readlink(copy / "bin") == "usr/bin"
    assert stat.S_IMODE(os.stat(copy / "etc" / "deep").st_mode) == 0o710
    assert os.stat(copy / "etc").st_mtime_ns == 2_000_000_000
    if ROOT:
        assert os.lstat(copy / "gone").st_rdev == os.makedev(0, 0)
        assert (os.stat(copy / "etc" / "deep").st_uid, os.stat(copy / "etc" / "deep").st_gid) == (
            1234,
            4321,
        )
        if "trusted.overlay.opaque" in os.listxattr(src / "etc"):
            assert os.getxattr(copy / "etc", "trusted.overlay.opaque") == b"y"


# -- disks and zones (real mke2fs and loop devices) ----------------------------------------


class FakeBlkback:
    """Connects every disk xl block-attaches, as blkback + blkfront do: the backend directory
    with ``dev`` and state 4 (Connected); a detach removes it."""

    def __init__(self, xs: Xenstore, args: Path, domid: int) -> None:
        self.xs, self.args, self.domid = xs, args, domid
        self.connect = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen = 0
        while not self._stop.wait(0.02):
            lines = self.args.read_text().splitlines() if self.args.exists() else []
            for line in lines[seen:]:
                words = line.split()
                base = f"/local/domain/0/backend/vbd/{self.domid}"
                if words[0] == "block-attach" and self.connect:
                    vdev = re.search(r"vdev=(xvd[a-z]+)|,(xvd[a-z]+),", words[2])
                    assert vdev is not None, line
                    name = vdev[1] or vdev[2]
                    number = 51712 + 16 * (ord(name[-1]) - ord("a"))
                    self.xs.write(f"{base}/{number}/dev", name)
                    self.xs.write(f"{base}/{number}/state", "4")
                elif words[0] == "block-detach":
                    for devid in self.xs.directory(base):
                        if self.xs.read(f"{base}/{devid}/dev") == words[2]:
                            self.xs.remove(f"{base}/{devid}")
            seen = len(lines)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def fake_xl(tmp_path: Path, fail: str = "") -> Xl:
    script = tmp_path / "xl"
    failing = f"echo 'libxl: error: {fail}' >&2; exit 1" if fail else "exit 0"
    script.write_text(
        f'#!/bin/sh\necho "$@" >>{tmp_path}/xl.args\ncase "$1" in block-attach) {failing};; esac\n'
    )
    script.chmod(0o755)
    return Xl(binary=str(script))


def xl_calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "xl.args"
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    store = tmp_path / "store" / "layers"
    lower, upper = store / ("1" * 64), store / ("2" * 64)
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "os-release").write_text("ID=test\n")
    (lower / "old").write_text("removed by the upper layer\n")
    (upper / "app").mkdir(parents=True)
    (upper / "app" / "run").write_text("#!/bin/sh\necho hi\n")
    if ROOT:
        os.mknod(upper / "old", stat.S_IFCHR, os.makedev(0, 0))
    return [lower, upper]


@pytest.fixture
def disks(tmp_path: Path, host_xs: Xenstore) -> Iterator[tuple[XenImageDisks, FakeBlkback]]:
    if shutil.which("mke2fs") is None:
        pytest.skip("e2fsprogs not installed")
    if not ROOT or not Path("/dev/loop-control").exists():
        pytest.skip("needs root and loop devices")
    # the domain's home, as the toolstack made it
    host_xs.write(f"/local/domain/{XS_ZONE}/name", DOMAIN)
    blkback = FakeBlkback(host_xs, tmp_path / "xl.args", XS_ZONE)
    images = XenImageDisks(tmp_path / "cache", fake_xl(tmp_path), host_xs, connect_timeout_s=10)
    yield images, blkback
    blkback.close()


def attach(
    images: XenImageDisks, zone_dir: Path, container: str, image: str, layers: list[Path]
) -> ImageDisk:
    return images.attach(
        zone_dir, DOMAIN, XS_ZONE, container, image, layers,
        reserved={"xvda", "xvdb"}, alive=lambda: True,
    )  # fmt: skip


@pytest.fixture
def zone_dir(tmp_path: Path) -> Path:
    """A zone's directory, where XenImageDisks keeps the zone's disk state."""
    path = tmp_path / "zone"
    path.mkdir()
    return path


def test_an_image_is_built_once_and_attached_once_per_zone(
    disks: tuple[XenImageDisks, FakeBlkback],
    layers: list[Path],
    zone_dir: Path,
    tmp_path: Path,
    host_xs: Xenstore,
) -> None:
    images, _ = disks
    first = attach(images, zone_dir, "c1", IMAGE_A, layers)
    disk = images.cache.path("a1" * 32)
    built_at = disk.stat().st_mtime_ns
    second = attach(images, zone_dir, "c2", IMAGE_A, layers)
    assert first == second
    assert str(first.device) == "/dev/xvdc"
    assert first.mount_point == Path("/run/vgpu/images") / ("a1" * 32)
    assert disk.stat().st_mtime_ns == built_at
    assert [c.split()[0] for c in xl_calls(tmp_path)] == ["block-attach"]
    assert re.search(r"(target=|phy:)/dev/loop\d+", xl_calls(tmp_path)[0])
    # the loop device went to the kernel once connected: with no real blkback holding it,
    # it is free already
    assert xen_disks.loops_of(disk) == []
    state = read_state(zone_dir).disks["a1" * 32]
    assert (state.vdev, state.loop, state.containers) == ("xvdc", None, ("c1", "c2"))

    # the disk: one directory per layer, with the whiteout and the label the agent checks
    if DEBUGFS is not None:
        listing = subprocess.run(
            [DEBUGFS, "-R", "ls -l /", str(disk)], capture_output=True, text=True, check=True
        ).stdout
        assert "1" * 64 in listing and "2" * 64 in listing
        label = subprocess.run(
            ["dumpe2fs", "-h", str(disk)], capture_output=True, text=True, check=False
        ).stdout
        assert "a1" * 8 in label
        whiteout = subprocess.run(
            [DEBUGFS, "-R", f"stat /{'2' * 64}/old", str(disk)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "Type: character special" in whiteout

    other = attach(images, zone_dir, "c3", IMAGE_B, layers[:1])
    assert str(other.device) == "/dev/xvdd"

    images.detach(zone_dir, DOMAIN, "c1")
    assert [c.split()[0] for c in xl_calls(tmp_path)] == ["block-attach"] * 2
    images.detach(zone_dir, DOMAIN, "c2")
    assert xl_calls(tmp_path)[-1] == f"block-detach {DOMAIN} xvdc"
    assert list(read_state(zone_dir).disks) == ["b2" * 32]
    images.detach(zone_dir, DOMAIN, "unknown")  # no error, nothing detached
    assert len(xl_calls(tmp_path)) == 3
    # xvdc is free again once its backend is gone (xl block-detach returns after that)
    base = f"/local/domain/0/backend/vbd/{XS_ZONE}"
    deadline = time.monotonic() + 5
    while any(host_xs.read(f"{base}/{d}/dev") == "xvdc" for d in host_xs.directory(base)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert str(attach(images, zone_dir, "c4", IMAGE_A, layers).device) == "/dev/xvdc"


def test_a_failed_attach_says_what_xl_said_and_leaves_no_loop(
    disks: tuple[XenImageDisks, FakeBlkback],
    layers: list[Path],
    zone_dir: Path,
    tmp_path: Path,
    host_xs: Xenstore,
) -> None:
    failing = XenImageDisks(
        tmp_path / "cache", fake_xl(tmp_path, "device model not ready"), host_xs
    )
    with pytest.raises(ZoneError, match=r"block-attach.*device model not ready"):
        attach(failing, zone_dir, "c1", IMAGE_A, layers)
    assert xen_disks.loops_of(failing.cache.path("a1" * 32)) == []
    assert read_state(zone_dir).disks == {}


def test_a_disk_the_zone_never_connects_times_out_and_is_undone(
    disks: tuple[XenImageDisks, FakeBlkback],
    layers: list[Path],
    zone_dir: Path,
    tmp_path: Path,
    host_xs: Xenstore,
) -> None:
    _, blkback = disks
    blkback.connect = False
    slow = XenImageDisks(tmp_path / "cache", fake_xl(tmp_path), host_xs, connect_timeout_s=0.5)
    with pytest.raises(ZoneError, match="xvdc not connected within"):
        attach(slow, zone_dir, "c1", IMAGE_A, layers)
    assert xl_calls(tmp_path)[-1] == f"block-detach {DOMAIN} xvdc"
    assert xen_disks.loops_of(slow.cache.path("a1" * 32)) == []
    assert read_state(zone_dir).disks == {}


def test_prune_keeps_live_and_used_disks(
    disks: tuple[XenImageDisks, FakeBlkback], layers: list[Path], tmp_path: Path
) -> None:
    images, _ = disks
    for image in (IMAGE_A, IMAGE_B):
        with images.locked(image):
            images.disk(image, layers)
    path_a, path_b = images.cache.path("a1" * 32), images.cache.path("b2" * 32)
    (images.cache.root / "not-an-image.ext4").write_text("")
    loop = xen_disks.attach_loop(path_b)  # a zone still has B
    try:
        assert images.prune({IMAGE_A}) == []
        assert path_a.exists() and path_b.exists()
    finally:
        xen_disks.release_loop(loop)
    assert images.prune({IMAGE_A}) == ["b2" * 32]
    assert path_a.exists() and not path_b.exists()
    assert images.prune(set()) == ["a1" * 32]
    assert (images.cache.root / "not-an-image.ext4").exists()
    assert [p.name for p in images.cache.root.iterdir() if p.name.startswith(".stage")] == []


def test_concurrent_creates_of_one_image_build_it_once(
    disks: tuple[XenImageDisks, FakeBlkback],
    layers: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images, _ = disks
    builds: list[Path] = []
    real = xen_disks.build_ext4

    def counting(source: Path, dest: Path, *, label: str = "") -> Path:
        builds.append(dest)
        return real(source, dest, label=label)

    monkeypatch.setattr(xen_disks, "build_ext4", counting)

    def build() -> None:
        with images.locked(IMAGE_A):
            images.disk(IMAGE_A, layers)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [images.cache.path("a1" * 32)]


def test_layers_with_one_name_twice_are_refused(
    disks: tuple[XenImageDisks, FakeBlkback], layers: list[Path]
) -> None:
    images, _ = disks
    with images.locked(IMAGE_A), pytest.raises(ZoneError, match="not distinct"):
        images.disk(IMAGE_A, [layers[0], layers[0]])
