"""Build the testbed's PV guest: an uncompressed vmlinux and a tiny busybox initramfs.

The guest runs ``guest_grant`` (a static C program) from a hand-written ``/init``. The archive,
module and kernel pieces are kernel_builder's (shared with the zone initramfs): no root, fakeroot
or cpio needed, and byte-identical output for the same inputs, which callers cache by hash.

Usage: ``python -m tests.xen.guest.build ROOTFS OUTDIR``.
"""

import argparse
import gzip
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kernel_builder import BootImageError, write_atomic
from kernel_builder.cpio import CpioEntry, newc_archive
from kernel_builder.elf import check_static, extract_vmlinux
from kernel_builder.kmod import DirectoryTree, kernel_version, load_modules

HERE = Path(__file__).resolve().parent
GUEST_SOURCE = HERE / "guest_grant.c"
INIT_SCRIPT = HERE / "init"
HOST_BUSYBOX = Path("/bin/busybox")
CFLAGS = ("-std=c11", "-static", "-O2", "-Wall", "-Wextra", "-Werror")

# Modules guest_grant needs; xenbus (/dev/xen/xenbus) is built into Debian's kernel.
GUEST_MODULES = ("xen-evtchn", "xen-gntalloc")
# The busybox applets /init runs as commands (echo, read and [ are shell builtins).
APPLETS = ("sh", "mount", "insmod", "mkdir", "mknod", "poweroff")


@dataclass(frozen=True)
class GuestImage:
    """What ``xl create`` needs: ``kernel`` (an ELF vmlinux) and ``ramdisk`` (cpio.gz)."""

    kernel: Path
    ramdisk: Path


def compile_guest_program(out: Path) -> Path:
    """Compile guest_grant.c statically to ``out`` (the guest has no libc)."""
    cmd = ["gcc", *CFLAGS, "-o", str(out), str(GUEST_SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BootImageError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return out


def build_guest(rootfs: Path, out_dir: Path, busybox: Path = HOST_BUSYBOX) -> GuestImage:
    """Build ``out_dir/vmlinux`` and ``out_dir/guest.cpio.gz`` from the Dom0 ``rootfs``.

    The guest runs the rootfs's kernel and modules; busybox comes from the host because the
    rootfs's is dynamically linked.
    """
    tree = DirectoryTree(rootfs)
    version = kernel_version(tree)
    modules = load_modules(tree, version, GUEST_MODULES)
    check_static(busybox)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        program = compile_guest_program(Path(tmp) / "guest_grant").read_bytes()

    entries = [
        CpioEntry.directory("bin"),
        CpioEntry.directory("dev"),
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.directory("proc"),
        CpioEntry.directory("sys"),
        CpioEntry.directory("modules"),
        CpioEntry.file("init", INIT_SCRIPT.read_bytes(), executable=True),
        CpioEntry.file("guest_grant", program, executable=True),
        CpioEntry.file("bin/busybox", busybox.read_bytes(), executable=True),
        *(CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in APPLETS),
        *(CpioEntry.file(f"modules/{name}", data) for name, data in modules),
        CpioEntry.file("modules/load.order", "".join(f"{n}\n" for n, _ in modules).encode()),
    ]
    image = GuestImage(kernel=out_dir / "vmlinux", ramdisk=out_dir / "guest.cpio.gz")
    write_atomic(image.kernel, extract_vmlinux(tree.read(f"boot/vmlinuz-{version}")))
    write_atomic(image.ramdisk, gzip.compress(newc_archive(entries), mtime=0))
    return image


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("rootfs", type=Path, help="Dom0 rootfs tree (kernel and modules)")
    parser.add_argument("out_dir", type=Path, help="where vmlinux and guest.cpio.gz go")
    args = parser.parse_args(argv)
    try:
        image = build_guest(args.rootfs, args.out_dir)
    except BootImageError as e:
        parser.exit(1, f"guest build failed: {e}\n")
    print(image.kernel)
    print(image.ramdisk)


if __name__ == "__main__":
    main()
