"""Build a zone's boot image: the kernel as an ELF vmlinux and the zone initramfs.

The initramfs holds a static busybox, the modules the zone needs before its root is mounted
(xen-blkfront, ext4 and its dependencies, overlay, xen-evtchn, xen-gntalloc) and two scripts:
``zone/init`` (stage 1: root disk /dev/xvda read-only under a tmpfs overlay, payload disk
/dev/xvdb read-only at /opt/vgpu-zone, switch_root) and ``zone/stage2`` (mounts, /dev/xen nodes,
``exec python3 -m cri_runtime.agent --xen``). Both print ``VGPU-ZONE-STAGE <name> <uptime>`` per
step and ``VGPU-ZONE-FAIL <why>`` before powering off. The kernel and modules come from one
Debian kernel tree (a root directory, or an ext4 image read with debugfs); busybox from the host,
as Debian's in the tree is dynamically linked. Same inputs, same bytes.

Usage: ``python -m kernel_builder.zone_initramfs SOURCE OUT_DIR [--no-kernel]``.
"""

import argparse
import gzip
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from kernel_builder import BootImageError, write_atomic
from kernel_builder.cpio import CpioEntry, newc_archive
from kernel_builder.elf import check_static, extract_vmlinux
from kernel_builder.kmod import (
    DirectoryTree,
    Ext4ImageTree,
    KernelTree,
    kernel_version,
    load_modules,
)

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "zone" / "init"
STAGE2_SCRIPT = HERE / "zone" / "stage2"
HOST_BUSYBOX = Path("/bin/busybox")

# crc32c_generic: ext4 and jbd2 ask the crypto API for "crc32c", which the initramfs cannot
# modprobe on demand; the rest bring their own dependencies through modules.dep.
ZONE_MODULES = ("xen-blkfront", "crc32c_generic", "ext4", "overlay", "xen-evtchn", "xen-gntalloc")
# The busybox applets stage 1 runs as commands (echo, read, [ are shell builtins); stage 2 calls
# busybox by path.
APPLETS = ("sh", "mount", "insmod", "mkdir", "cp", "sleep", "poweroff", "switch_root")
# Every stage line a successful boot prints, in order ("payload" only with a payload disk).
STAGES = (
    "init",
    "modules",
    "root",
    "payload",
    "switch-root",
    "stage2",
    "mounts",
    "devices",
    "python-ok",
    "agent-exec",
)
STAGE_PREFIX = "VGPU-ZONE-STAGE"
FAIL_PREFIX = "VGPU-ZONE-FAIL"


class ZoneImageManifest(BaseModel):
    """What was built from what: read by whoever boots the image (e.g. the testbed)."""

    model_config = ConfigDict(frozen=True)

    kernel_version: str
    kernel: str | None  # file name of the vmlinux next to the manifest, if one was built
    ramdisk: str
    ramdisk_sha256: str
    modules: list[str]  # insmod order
    stages: list[str]


@dataclass(frozen=True)
class ZoneBootImage:
    """The built files: ``kernel`` (ELF vmlinux, unless skipped), ``ramdisk`` (cpio.gz)."""

    kernel: Path | None
    ramdisk: Path
    manifest: ZoneImageManifest


def kernel_tree(source: Path) -> KernelTree:
    """A rootfs directory or an ext4 image holding one Debian kernel and its modules."""
    if source.is_dir():
        return DirectoryTree(source)
    if source.is_file():
        return Ext4ImageTree(source)
    raise BootImageError(f"{source}: neither a root directory nor an ext4 image")


def zone_initramfs(
    tree: KernelTree, version: str, busybox: Path = HOST_BUSYBOX
) -> tuple[bytes, list[str]]:
    """The gzipped newc archive of the zone initramfs for kernel ``version`` of ``tree``, and
    the modules it loads in order."""
    check_static(busybox)
    modules = load_modules(tree, version, ZONE_MODULES)
    entries = [
        CpioEntry.directory("bin"),
        CpioEntry.directory("dev"),
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.directory("proc"),
        CpioEntry.directory("sys"),
        CpioEntry.directory("modules"),
        CpioEntry.file("init", INIT_SCRIPT.read_bytes(), executable=True),
        CpioEntry.file("stage2", STAGE2_SCRIPT.read_bytes(), executable=True),
        CpioEntry.file("bin/busybox", busybox.read_bytes(), executable=True),
        *(CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in APPLETS),
        *(CpioEntry.file(f"modules/{name}", data) for name, data in modules),
        CpioEntry.file("modules/load.order", "".join(f"{n}\n" for n, _ in modules).encode()),
    ]
    return gzip.compress(newc_archive(entries), mtime=0), [name for name, _ in modules]


def build_zone_image(
    source: Path, out_dir: Path, *, busybox: Path = HOST_BUSYBOX, with_kernel: bool = True
) -> ZoneBootImage:
    """Write ``zone.cpio.gz``, ``vmlinux`` (unless ``with_kernel`` is false: the caller has
    the same kernel already) and ``zone.json`` into ``out_dir``."""
    tree = kernel_tree(source)
    version = kernel_version(tree)
    ramdisk_bytes, modules = zone_initramfs(tree, version, busybox)
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel = out_dir / "vmlinux" if with_kernel else None
    if kernel is not None:
        write_atomic(kernel, extract_vmlinux(tree.read(f"boot/vmlinuz-{version}")))
    ramdisk = out_dir / "zone.cpio.gz"
    write_atomic(ramdisk, ramdisk_bytes)
    manifest = ZoneImageManifest(
        kernel_version=version,
        kernel=kernel.name if kernel else None,
        ramdisk=ramdisk.name,
        ramdisk_sha256=hashlib.sha256(ramdisk_bytes).hexdigest(),
        modules=modules,
        stages=list(STAGES),
    )
    write_atomic(out_dir / "zone.json", manifest.model_dump_json(indent=2).encode() + b"\n")
    return ZoneBootImage(kernel=kernel, ramdisk=ramdisk, manifest=manifest)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("source", type=Path, help="Debian root directory or ext4 image")
    parser.add_argument("out_dir", type=Path, help="where vmlinux, zone.cpio.gz, zone.json go")
    parser.add_argument("--no-kernel", action="store_true", help="skip the vmlinux")
    parser.add_argument("--busybox", type=Path, default=HOST_BUSYBOX, help="a static busybox")
    args = parser.parse_args(argv)
    try:
        image = build_zone_image(
            args.source, args.out_dir, busybox=args.busybox, with_kernel=not args.no_kernel
        )
    except BootImageError as e:
        parser.exit(1, f"zone image build failed: {e}\n")
    print(image.manifest.model_dump_json(indent=2))


if __name__ == "__main__":
    main()
