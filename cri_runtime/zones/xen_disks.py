"""Read-only disks for Xen zones: a directory as an ext4 image, the image on a loop device, the
loop device given to a domain.

A zone sees host files only through disks: the project payload (agent, idm, libvgpu) and each
container image's unpacked layers become ext4 images, built once per key (``mke2fs -d``, no
mount, no root), and reach a domain as ``phy:/dev/loopN,<vdev>,r`` in its config or through
``xl block-attach``. Every domain gets a loop device of its own, attached read-only; once the
domain's blkback holds it open (``backend_holds``; ``release_loop_when_held`` waits for it),
``release_loop`` hands it to the kernel, which frees it when the last holder closes it (loop
autoclear): a destroyed or crashed zone, or a runtime that died, never leaks a loop device.
Disks may name ``BLOCK_RO_SCRIPT`` as their hotplug script (``block-ro`` next to this file):
Xen's generic ``block`` script scans every mount and every domain's disks for sharing on each
attach, costing seconds per disk in a busy Dom0; a read-only disk needs none of it.

Every failure is a ZoneError carrying the tool's own stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import structlog
from pydantic import ValidationError

from cri_runtime.zones.base import ZoneError
from cri_runtime.zones.tools import run_tool
from cri_runtime.zones.xl import Xl
from cri_runtime.zones.xl_config import XlDisk

log = structlog.get_logger(__name__)

VDEV = re.compile(r"^xvd[a-z]{1,2}$")
CACHE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LOOP_DEVICE = re.compile(r"^/dev/loop[0-9]+$")
BLOCK_SIZE = 4096
INODE_SIZE = 256
# Room for what the estimate below does not count (extent trees, group descriptors, bitmaps).
SIZE_MARGIN = 1.15
MIN_SIZE_MIB = 8
MKE2FS_TIMEOUT_S = 1800.0
LOSETUP_TIMEOUT_S = 60.0
SYS_BLOCK = Path("/sys/block")
XEN_BACKEND = Path("/sys/bus/xen-backend/devices")
HELD_TIMEOUT_S = 30.0
# libxl hotplug script for read-only disks: what Xen's "block" does for a block device, minus
# its sharing scan (dozens of processes per disk: it overran libxl's 10 s hotplug timeout in
# the emulated testbed Dom0).
BLOCK_RO_SCRIPT = Path(__file__).resolve().parent / "block-ro"


# -- ext4 images -------------------------------------------------------------------------------


def estimate_ext4(source: Path) -> tuple[int, int]:
    """(bytes, inodes) an ext4 holding ``source`` needs, with a margin; hard links once."""
    blocks = 0
    inodes = 16  # ext4's reserved inodes
    seen: set[tuple[int, int]] = set()
    for directory, dirnames, filenames in os.walk(source):
        names = dirnames + filenames
        blocks += 1 + sum(len(n) + 12 for n in names) // BLOCK_SIZE
        inodes += 1
        for name in names:
            st = os.lstat(os.path.join(directory, name))
            if stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue  # directories are counted when walked
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode) or (stat.S_ISLNK(st.st_mode) and st.st_size > 59):
                blocks += -(-st.st_size // BLOCK_SIZE)
    inodes = int(inodes * SIZE_MARGIN) + 64
    size = int((blocks * BLOCK_SIZE + inodes * INODE_SIZE) * SIZE_MARGIN)
    mib = max(MIN_SIZE_MIB, -(-size // (1 << 20)) + 4)
    return mib << 20, inodes


def build_ext4(source: Path, dest: Path, *, label: str = "") -> Path:
    """Make ``dest`` an ext4 image holding ``source`` (owners, modes, links as they are there),
    for read-only use: no journal, no reserved blocks, sized to fit. Written to a temporary file
    in ``dest``'s directory and renamed, so ``dest`` is complete or absent."""
    if not source.is_dir():
        raise ZoneError(f"cannot make a disk of {source}: not a directory")
    if len(label) > 16:
        raise ZoneError(f"ext4 label {label!r} is longer than 16 bytes")
    try:
        size, inodes = estimate_ext4(source)
    except OSError as exc:
        raise ZoneError(f"cannot make a disk of {source}: {exc}") from None
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")
    if mke2fs is None:
        raise ZoneError("mke2fs not found (package e2fsprogs)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.tmp"
    try:
        for attempt in (1, 2):
            tmp.unlink(missing_ok=True)
            command = [
                mke2fs, "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-I", str(INODE_SIZE),
                "-N", str(inodes), "-m", "0", "-O", "^has_journal,^resize_inode",
                *(["-L", label] if label else []), "-d", str(source), str(tmp),
                f"{size >> 10}k",
            ]  # fmt: skip
            try:
                run_tool(command, MKE2FS_TIMEOUT_S, what=f"making an ext4 image of {source}")
                break
            except ZoneError as exc:
                # The estimate is generous; a tree it misjudges gets one try at twice the size.
                if attempt == 2 or ("allocat" not in str(exc) and "space" not in str(exc)):
                    raise
                size, inodes = size * 2, inodes * 2
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("ext4 image built", source=str(source), image=str(dest), size=size)
    return dest


class Ext4Cache:
    """ext4 images of directories under ``root``, one per key (an image id, a payload hash):
    built once, reused while the file exists. Safe across threads and processes (a lock file
    per key); what the key stands for is the caller's to keep stable."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        if not CACHE_KEY.match(key):
            raise ZoneError(f"invalid disk cache key {key!r}")
        return self.root / f"{key}.ext4"

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f".{key}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def get(self, key: str, source: Path, *, label: str = "") -> Path:
        """The image for ``key``, built from ``source`` if there is none yet."""
        image = self.path(key)
        if image.is_file():
            return image
        with self._locked(key):
            if not image.is_file():
                build_ext4(source, image, label=label)
        return image

    def discard(self, key: str) -> bool:
        """Remove ``key``'s image unless a loop device still uses it; True if it is gone."""
        image = self.path(key)
        with self._locked(key):
            if loops_of(image):
                return False
            image.unlink(missing_ok=True)
        return True


# -- loop devices ------------------------------------------------------------------------------


def _loop_sysfs(device: Path) -> Path:
    if not LOOP_DEVICE.match(str(device)):
        raise ZoneError(f"{device} is not a loop device")
    return SYS_BLOCK / device.name / "loop"


def loop_backing_file(device: Path) -> Path | None:
    """The file ``device`` reads, or None if it is not bound to one."""
    try:
        text = (_loop_sysfs(device) / "backing_file").read_text().strip()
    except FileNotFoundError:
        return None
    return Path(text) if text else None


def loops_of(image: Path) -> list[Path]:
    """The loop devices bound to ``image`` now."""
    target = image.resolve()
    found = []
    for entry in sorted(SYS_BLOCK.glob("loop*")):
        device = Path("/dev") / entry.name
        if LOOP_DEVICE.match(str(device)) and loop_backing_file(device) == target:
            found.append(device)
    return found


BLKBACK = Path("/sys/module/xen_blkback")


def load_block_backend() -> None:
    """Load Dom0's block backend if it is not: without udev (a minimal Dom0) nothing loads it
    when a domain's first disk appears, and every ``xl create`` with a disk then fails with
    libxl's "unable to add device"."""
    if not BLKBACK.exists():
        run_tool(["modprobe", "xen-blkback"], LOSETUP_TIMEOUT_S, what="loading xen-blkback")


def attach_loop(image: Path) -> Path:
    """A fresh read-only loop device for ``image`` (``losetup -r --find --show``)."""
    if not image.is_file():
        raise ZoneError(f"cannot attach {image}: no such image file")
    if not Path("/dev/loop-control").exists():
        # Without udev (a minimal Dom0) nothing loads the loop driver on demand.
        run_tool(["modprobe", "loop"], LOSETUP_TIMEOUT_S, what="loading the loop driver")
    out = run_tool(
        ["losetup", "-r", "--find", "--show", str(image)],
        LOSETUP_TIMEOUT_S,
        what=f"attaching {image} to a loop device",
    )
    device = Path(out.strip())
    if not LOOP_DEVICE.match(str(device)):
        raise ZoneError(f"losetup gave {out.strip()!r} for {image}, not a loop device")
    log.info("loop device attached", image=str(image), device=str(device))
    return device


def vbd_number(vdev: str) -> int:
    """Xen's device number for ``vdev`` (xvda 51712, xvdb 51728, ...; xvdq on extended)."""
    if not VDEV.match(vdev):
        raise ZoneError(f"invalid virtual device {vdev!r} (expected xvd<letters>)")
    index = 0
    for letter in vdev[3:]:
        index = index * 26 + ord(letter) - ord("a") + 1
    index -= 1
    return (202 << 8) | (index << 4) if index < 16 else (1 << 28) | (index << 8)


def backend_holds(domid: int, vdev: str) -> bool:
    """Whether Dom0's blkback has opened the device behind ``domid``'s ``vdev``: it adds the
    backend's ``physical_device`` attribute only once it holds the device, which may be a
    moment after ``xl create``/``block-attach`` return (it reacts to a xenstore watch)."""
    return (XEN_BACKEND / f"vbd-{domid}-{vbd_number(vdev)}" / "physical_device").exists()


def release_loop_when_held(
    device: Path, domid: int, vdev: str, *, timeout_s: float = HELD_TIMEOUT_S
) -> None:
    """``release_loop`` once ``domid``'s blkback holds ``device`` as ``vdev``; releasing it
    earlier would free it under the domain. ZoneError (and nothing released) on timeout."""
    deadline = time.monotonic() + timeout_s
    while not backend_holds(domid, vdev):
        if time.monotonic() > deadline:
            raise ZoneError(
                f"domain {domid}'s blkback did not open {device} as {vdev} within {timeout_s} s"
            )
        time.sleep(0.05)
    if release_loop(device):
        raise ZoneError(f"{device} was freed on release: domain {domid} no longer holds it")


def release_loop(device: Path) -> bool:
    """``losetup -d``: frees ``device`` now if nothing holds it open (True), or marks it to be
    freed by the kernel when its last holder (a domain's blkback) closes it (False)."""
    _loop_sysfs(device)
    if loop_backing_file(device) is None:
        return True
    run_tool(["losetup", "-d", str(device)], LOSETUP_TIMEOUT_S, what=f"releasing {device}")
    freed = loop_backing_file(device) is None
    log.info("loop device released", device=str(device), freed_now=freed)
    return freed


# -- domains -----------------------------------------------------------------------------------


def read_only_script() -> Path | None:
    """BLOCK_RO_SCRIPT where it can run (an installed package keeps its mode), else None: xl's
    default ``block`` script, correct but slow (its sharing scan forks dozens of processes)."""
    return BLOCK_RO_SCRIPT if os.access(BLOCK_RO_SCRIPT, os.X_OK) else None


def disk_spec(device: Path, vdev: str, *, script: Path | None = None) -> str:
    """The xl disk spec of a read-only block device: ``phy:/dev/loopN,<vdev>,r``, or with
    ``script`` (e.g. BLOCK_RO_SCRIPT) the keyword form xl needs to name a hotplug script."""
    if not str(device).startswith("/dev/"):
        raise ZoneError(f"invalid block device {str(device)!r} for a disk spec")
    try:
        disk = XlDisk(target=PurePosixPath(device), vdev=vdev, script=script)
    except ValidationError as exc:
        raise ZoneError(f"invalid disk {device} as {vdev}: {exc.errors()[0]['msg']}") from exc
    return disk.render()


def block_attach(
    xl: Xl, domain: str, device: Path, vdev: str, *, script: Path | None = None
) -> None:
    """Give running (or paused) ``domain`` ``device`` read-only as ``vdev``."""
    xl.block_attach(domain, disk_spec(device, vdev, script=script))


def block_detach(xl: Xl, domain: str, vdev: str) -> None:
    """Take ``vdev`` away from ``domain`` (the zone must have unmounted it)."""
    if not VDEV.match(vdev):
        raise ZoneError(f"invalid virtual device {vdev!r} (expected xvd<letters>)")
    xl.block_detach(domain, vdev)
