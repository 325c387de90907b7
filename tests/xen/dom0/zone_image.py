"""What a Xen zone boots from inside the testbed's Dom0: kernel, zone initramfs, the shared root
disk, and the payload disk built from the checkout.

The host builds the zone initramfs for every run from the image's own kernel modules and puts it
in the share (tests/xen/testbed.py, share/zone/); the kernel is the image's guest vmlinux (the
same Debian kernel, already an ELF); the root disk is QEMU's second drive (/dev/vdb: the Dom0
image again, read-only, never mounted here). The payload disk (cri_runtime, idm with its built
extensions, vgpu_common, libvgpu's build) is an ext4 made here from the unpacked checkout, with
bytecode compiled once so that no zone compiles it at boot.
"""

import compileall
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cri_runtime.zones.xen_disks import BLKBACK, build_ext4, load_block_backend
from kernel_builder.zone_initramfs import ZoneImageManifest

CHECKOUT = Path(__file__).resolve().parents[3]
SHARE = Path(os.environ.get("TESTBED_SHARE", "/share"))
ZONE_KERNEL = Path("/opt/testbed/guest/vmlinux")
ROOT_DISK = Path("/dev/vdb")
# What the zone's PYTHONPATH (/opt/vgpu-zone) needs from the checkout; missing parts are skipped
# (libvgpu/build exists only where libvgpu was built).
PAYLOAD_PARTS = ("cri_runtime", "idm", "vgpu_common", "libvgpu/build")
PAYLOAD_LABEL = "vgpu-payload"


@dataclass(frozen=True)
class ZoneBoot:
    """Paths for an xl config: ``kernel``, ``ramdisk``, and ``root_disk`` (a block device)."""

    kernel: Path
    ramdisk: Path
    root_disk: Path
    manifest: ZoneImageManifest


def zone_boot(share: Path = SHARE) -> ZoneBoot:
    """The zone boot pieces of this run; AssertionError naming what is missing or mismatched."""
    manifest_path = share / "zone" / "zone.json"
    assert manifest_path.is_file(), f"no {manifest_path}: the host did not build the zone image"
    manifest = ZoneImageManifest.model_validate_json(manifest_path.read_text())
    boot = ZoneBoot(
        kernel=ZONE_KERNEL,
        ramdisk=manifest_path.parent / manifest.ramdisk,
        root_disk=ROOT_DISK,
        manifest=manifest,
    )
    for path in (boot.kernel, boot.ramdisk):
        assert path.is_file(), f"zone boot file {path} is missing"
    assert ROOT_DISK.is_block_device(), f"{ROOT_DISK} (the zones' root disk) is missing"
    load_blkback()
    # Dom0 runs the image's kernel: the modules in the initramfs must be for that version.
    assert manifest.kernel_version == os.uname().release, (
        f"zone initramfs is for {manifest.kernel_version}, the image's kernel is "
        f"{os.uname().release}"
    )
    return boot


def load_blkback() -> None:
    """Dom0's block backend, as the Xen zone backend loads it at start (no udev here)."""
    load_block_backend()
    assert BLKBACK.exists(), f"xen-blkback loaded but {BLKBACK} is missing"


def stage_payload(dest: Path, checkout: Path = CHECKOUT) -> Path:
    """Copy the payload parts of ``checkout`` to ``dest`` and compile their bytecode there
    (copies keep mtimes, so the .pyc files stay valid on the disk)."""
    for part in PAYLOAD_PARTS:
        source = checkout / part
        if source.is_dir():
            shutil.copytree(
                source, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
    assert (dest / "cri_runtime").is_dir(), f"no cri_runtime in {checkout}"
    assert compileall.compile_dir(dest, quiet=1, workers=1), "compiling the payload failed"
    return dest


def build_payload_disk(work: Path, checkout: Path = CHECKOUT) -> tuple[Path, float]:
    """The payload ext4 image under ``work`` and the seconds it took to build."""
    started = time.monotonic()
    tree = stage_payload(work / "tree", checkout)
    image = build_ext4(tree, work / "payload.ext4", label=PAYLOAD_LABEL)
    shutil.rmtree(tree)
    return image, time.monotonic() - started
