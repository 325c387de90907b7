"""Build the testbed's PV guest: an uncompressed vmlinux and a tiny busybox initramfs.

The guest runs ``guest_grant`` (a static C program) from a hand-written ``/init``. Everything is
assembled in Python (newc cpio writer, module dependency resolution, bzImage unpacking) so the
build needs neither root, fakeroot nor cpio, and gives byte-identical output for the same inputs
(fixed mtimes, root ownership, normalised modes), which lets callers cache it by content hash.

Usage: ``python -m tests.xen.guest.build ROOTFS OUTDIR``.
"""

import argparse
import gzip
import lzma
import os
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST_SOURCE = HERE / "guest_grant.c"
INIT_SCRIPT = HERE / "init"
HOST_BUSYBOX = Path("/bin/busybox")
CFLAGS = ("-std=c11", "-static", "-O2", "-Wall", "-Wextra", "-Werror")

# Modules guest_grant needs; xenbus (/dev/xen/xenbus) is built into Debian's kernel.
GUEST_MODULES = ("xen-evtchn", "xen-gntalloc")
# The busybox applets /init runs as commands (echo, read and [ are shell builtins).
APPLETS = ("sh", "mount", "insmod", "mkdir", "mknod", "poweroff")

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
PT_INTERP = 3
NEWC_MAGIC = b"070701"
NEWC_TRAILER = "TRAILER!!!"


class GuestBuildError(Exception):
    """The inputs cannot make a bootable guest image (the message says which and why)."""


@dataclass(frozen=True)
class GuestImage:
    """What ``xl create`` needs: ``kernel`` (an ELF vmlinux) and ``ramdisk`` (cpio.gz)."""

    kernel: Path
    ramdisk: Path


@dataclass(frozen=True)
class CpioEntry:
    """One archive member; ``mode`` includes the file type bits (``stat.S_IF*``)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def directory(cls, name: str) -> "CpioEntry":
        return cls(name, stat.S_IFDIR | 0o755)

    @classmethod
    def file(cls, name: str, data: bytes, executable: bool = False) -> "CpioEntry":
        return cls(name, stat.S_IFREG | (0o755 if executable else 0o644), data)

    @classmethod
    def symlink(cls, name: str, target: str) -> "CpioEntry":
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def char_device(cls, name: str, major: int, minor: int) -> "CpioEntry":
        return cls(name, stat.S_IFCHR | 0o600, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_archive(entries: Iterable[CpioEntry], mtime: int = 0) -> bytes:
    """Serialise ``entries`` as an SVR4 "newc" cpio archive, all owned by root.

    Names are relative ("bin/busybox"). The kernel's initramfs unpacker does not create missing
    parent directories, so each entry's parent must come earlier in ``entries``.
    """
    out = bytearray()
    seen = {""}

    def member(ino: int, e: CpioEntry) -> None:
        name = e.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (ino, e.mode, 0, 0, nlink, mtime, len(e.data), 0, 0, *e.rdev, len(name), 0)
        out.extend(NEWC_MAGIC + b"".join(b"%08x" % f for f in fields) + name)
        out.extend(_pad4(110 + len(name)))
        out.extend(e.data + _pad4(len(e.data)))

    for ino, e in enumerate(entries, start=1):
        if not e.name or e.name.startswith("/") or e.name in seen:
            raise ValueError(f"cpio entry name {e.name!r} is empty, absolute or repeated")
        parent = e.name.rpartition("/")[0]
        if parent not in seen:
            raise ValueError(f"cpio entry {e.name!r} comes before its directory {parent!r}")
        if e.rdev != (0, 0) and not (stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode)):
            raise ValueError(f"cpio entry {e.name!r}: device numbers only for device nodes")
        seen.add(e.name)
        member(ino, e)
    member(0, CpioEntry(NEWC_TRAILER, 0))
    return bytes(out)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Unpack the ELF kernel from an xz-compressed x86 bzImage.

    Xen's PV domain builder loads an ELF directly; handing it the bzImage makes Dom0 decompress
    it on every ``xl create`` (~10 s under emulation). The payload sits between setup code and
    trailing data, so each xz magic is tried until one decompresses to an ELF.
    """
    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        raise GuestBuildError("no xz payload in the kernel image (CONFIG_KERNEL_XZ expected)")
    errors = []
    while start >= 0:
        decomp = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = decomp.decompress(bzimage[start:])
        except lzma.LZMAError as e:
            errors.append(f"offset {start}: {e}")
        else:
            if decomp.eof and elf.startswith(ELF_MAGIC):
                return elf
            errors.append(f"offset {start}: {'not an ELF' if decomp.eof else 'truncated'}")
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise GuestBuildError("no xz payload decompresses to an ELF kernel: " + "; ".join(errors))


def _module_name(path: str) -> str:
    """Kernel module name of a modules.dep path: basename without .ko*, '-' read as '_'."""
    base = path.rpartition("/")[2]
    return base.partition(".ko")[0].replace("-", "_")


def resolve_modules(modules_dep: str, modules_builtin: str, wanted: Sequence[str]) -> list[str]:
    """modules.dep paths to insmod, dependencies first, for ``wanted`` (built-ins skipped).

    Resolved at build time so the guest needs no modprobe or depmod data.
    """
    deps: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if not line.strip():
            continue
        mod, sep, rest = line.partition(":")
        if not sep:
            raise GuestBuildError(f"bad modules.dep line: {line!r}")
        deps[mod] = rest.split()
        path_of[_module_name(mod)] = mod
    builtin = {_module_name(p) for p in modules_builtin.split()}

    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise GuestBuildError(f"dependency cycle through {path}")
        if path not in deps:
            raise GuestBuildError(f"{path} is a dependency but has no modules.dep entry")
        visiting.add(path)
        for dep in deps[path]:
            visit(dep)
        visiting.discard(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in path_of:
            raise GuestBuildError(f"module {name} is neither in modules.dep nor built in")
        visit(path_of[key])
    return order


def read_module(path: Path) -> bytes:
    """A module's ELF bytes; busybox insmod cannot load compressed modules."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        data = lzma.decompress(data)
    elif not path.name.endswith(".ko"):
        raise GuestBuildError(f"{path}: unsupported module compression")
    if not data.startswith(ELF_MAGIC):
        raise GuestBuildError(f"{path}: not an ELF module")
    return data


def check_static(path: Path) -> None:
    """Refuse a dynamically linked executable: the initramfs has no libc or loader."""
    data = path.read_bytes()
    if data[:6] != ELF_MAGIC + b"\x02\x01":
        raise GuestBuildError(f"{path}: not a little-endian 64-bit ELF")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == PT_INTERP:
            raise GuestBuildError(f"{path} is dynamically linked; a static busybox is needed")


def compile_guest_program(out: Path) -> Path:
    """Compile guest_grant.c statically to ``out`` (the guest has no libc)."""
    cmd = ["gcc", *CFLAGS, "-o", str(out), str(GUEST_SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return out


def _kernel_version(rootfs: Path) -> str:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        found = ", ".join(k.name for k in kernels) or "none"
        raise GuestBuildError(f"expected one {rootfs}/boot/vmlinuz-*, found {found}")
    return kernels[0].name.removeprefix("vmlinuz-")


def _write_atomic(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def build_guest(rootfs: Path, out_dir: Path, busybox: Path = HOST_BUSYBOX) -> GuestImage:
    """Build ``out_dir/vmlinux`` and ``out_dir/guest.cpio.gz`` from the Dom0 ``rootfs``.

    The guest runs the rootfs's kernel and modules; busybox comes from the host because the
    rootfs's is dynamically linked.
    """
    version = _kernel_version(rootfs)
    moddir = rootfs / "lib/modules" / version
    try:
        modules = resolve_modules(
            (moddir / "modules.dep").read_text(),
            (moddir / "modules.builtin").read_text(),
            GUEST_MODULES,
        )
    except OSError as e:
        raise GuestBuildError(f"cannot read module data for {version}: {e}") from e
    check_static(busybox)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        program = compile_guest_program(Path(tmp) / "guest_grant").read_bytes()

    loaded = [m.rpartition("/")[2].removesuffix(".xz") for m in modules]
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
        *(
            CpioEntry.file(f"modules/{name}", read_module(moddir / path))
            for name, path in zip(loaded, modules, strict=True)
        ),
        CpioEntry.file("modules/load.order", "".join(f"{n}\n" for n in loaded).encode()),
    ]
    image = GuestImage(kernel=out_dir / "vmlinux", ramdisk=out_dir / "guest.cpio.gz")
    bzimage = (rootfs / "boot" / f"vmlinuz-{version}").read_bytes()
    _write_atomic(image.kernel, extract_vmlinux(bzimage))
    _write_atomic(image.ramdisk, gzip.compress(newc_archive(entries), mtime=0))
    return image


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("rootfs", type=Path, help="Dom0 rootfs tree (kernel and modules)")
    parser.add_argument("out_dir", type=Path, help="where vmlinux and guest.cpio.gz go")
    args = parser.parse_args(argv)
    try:
        image = build_guest(args.rootfs, args.out_dir)
    except GuestBuildError as e:
        parser.exit(1, f"guest build failed: {e}\n")
    print(image.kernel)
    print(image.ramdisk)


if __name__ == "__main__":
    main()
