"""The testbed's PV guest image builder (tests/xen/guest/build.py), on synthetic inputs.

Nothing here needs Xen or a Debian rootfs: the cpio writer, bzImage unpacking and module
resolution are checked on hand-made data, and build_guest on a fake rootfs.
"""

import gzip
import lzma
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.xen.guest.build import (
    APPLETS,
    INIT_SCRIPT,
    CpioEntry,
    GuestBuildError,
    build_guest,
    check_static,
    compile_guest_program,
    extract_vmlinux,
    newc_archive,
    resolve_modules,
)


@dataclass(frozen=True)
class Member:
    mode: int
    uid: int
    gid: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(archive: bytes) -> dict[str, Member]:
    """A strict newc reader: every header 4-byte aligned, trailer last, nothing after it."""
    members: dict[str, Member] = {}
    pos = 0
    while True:
        assert pos % 4 == 0
        assert archive[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_end = pos + 110 + namesize
        name = archive[pos + 110 : name_end - 1].decode()
        assert archive[name_end - 1] == 0
        data_start = name_end + (-name_end % 4)
        data = archive[data_start : data_start + filesize]
        pos = data_start + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return members
        members[name] = Member(f[1], f[2], f[3], f[5], (f[9], f[10]), data)


SAMPLE = [
    CpioEntry.directory("bin"),
    CpioEntry.file("bin/tool", b"#!/bin/sh\necho hi\n", executable=True),
    CpioEntry.symlink("bin/sh", "tool"),
    CpioEntry.file("odd", b"12345"),  # not a multiple of 4: exercises the padding
    CpioEntry.directory("dev"),
    CpioEntry.char_device("dev/console", 5, 1),
]


def test_newc_round_trip() -> None:
    members = read_newc(newc_archive(SAMPLE, mtime=1234))
    assert list(members) == [e.name for e in SAMPLE]
    assert members["bin"].mode == stat.S_IFDIR | 0o755
    assert members["bin/tool"].mode == stat.S_IFREG | 0o755
    assert members["bin/tool"].data == b"#!/bin/sh\necho hi\n"
    assert members["odd"].mode == stat.S_IFREG | 0o644
    assert members["odd"].data == b"12345"
    assert stat.S_ISLNK(members["bin/sh"].mode)
    assert members["bin/sh"].data == b"tool"
    assert stat.S_ISCHR(members["dev/console"].mode)
    assert members["dev/console"].rdev == (5, 1)
    assert {(m.uid, m.gid, m.mtime) for m in members.values()} == {(0, 0, 1234)}


def _host_cpio() -> list[str]:
    if shutil.which("cpio"):
        return ["cpio"]
    if shutil.which("busybox"):
        return ["busybox", "cpio"]
    pytest.skip("no cpio or busybox on this host")


def test_newc_is_read_by_the_host_cpio(tmp_path: Path) -> None:
    """A second opinion from a real implementation (device nodes only listed: mknod needs root)."""
    cpio = _host_cpio()
    listing = subprocess.run(
        [*cpio, "-t", "-v"], input=newc_archive(SAMPLE), capture_output=True, check=True
    ).stdout.decode()
    kinds = {ln.split(" -> ")[0].split()[-1]: ln[0] for ln in listing.splitlines()}
    assert kinds == {"bin": "d", "bin/tool": "-", "bin/sh": "l", "odd": "-", "dev": "d",
                     "dev/console": "c"}  # fmt: skip

    files = [e for e in SAMPLE if not stat.S_ISCHR(e.mode)]
    subprocess.run(
        [*cpio, "-i", "-d"], input=newc_archive(files), cwd=tmp_path, capture_output=True,
        check=True,
    )  # fmt: skip
    assert (tmp_path / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(tmp_path / "bin" / "tool", os.X_OK)
    assert os.readlink(tmp_path / "bin" / "sh") == "tool"
    assert (tmp_path / "odd").read_bytes() == b"12345"


@pytest.mark.parametrize(
    ("entries", "error"),
    [
        ([CpioEntry.file("bin/x", b"")], "before its directory"),
        ([CpioEntry.file("x", b""), CpioEntry.file("x", b"")], "repeated"),
        ([CpioEntry.file("/x", b"")], "absolute"),
        ([CpioEntry("x", stat.S_IFREG | 0o644, rdev=(1, 3))], "device numbers"),
    ],
)
def test_newc_rejects_what_the_kernel_would_mis_unpack(
    entries: list[CpioEntry], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        newc_archive(entries)


FAKE_ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def fake_bzimage(payload: bytes, prefix: bytes = b"\x00setup code" * 50) -> bytes:
    """Like the kernel's: x86 BCJ + LZMA2, CRC32, with code before and data after."""
    xz = lzma.compress(
        payload,
        format=lzma.FORMAT_XZ,
        check=lzma.CHECK_CRC32,
        filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}],
    )
    return prefix + xz + len(payload).to_bytes(4, "little") + b"trailing code" * 30


def test_extract_vmlinux_ignores_surrounding_bytes() -> None:
    assert extract_vmlinux(fake_bzimage(FAKE_ELF)) == FAKE_ELF


def test_extract_vmlinux_skips_a_false_magic() -> None:
    blob = fake_bzimage(FAKE_ELF, prefix=b"head\xfd7zXZ\x00not really xz" * 3)
    assert extract_vmlinux(blob) == FAKE_ELF


def test_extract_vmlinux_without_xz_payload_fails_clearly() -> None:
    with pytest.raises(GuestBuildError, match="no xz payload"):
        extract_vmlinux(b"MZ" + bytes(4096))


def test_extract_vmlinux_rejects_a_non_elf_payload() -> None:
    with pytest.raises(GuestBuildError, match="not an ELF"):
        extract_vmlinux(fake_bzimage(b"just text, no kernel" * 10))


MODULES_DEP = """\
kernel/drivers/xen/xen-gntalloc.ko:
kernel/drivers/xen/xenfs/xenfs.ko: kernel/drivers/xen/xen-privcmd.ko
kernel/drivers/xen/xen-privcmd.ko: kernel/lib/helper_a.ko.xz
kernel/lib/helper_a.ko.xz:
kernel/drivers/net/unrelated.ko: kernel/lib/helper_a.ko.xz
"""


def test_resolve_modules_puts_dependencies_first_once() -> None:
    order = resolve_modules(
        MODULES_DEP, "kernel/drivers/xen/xen-evtchn.ko\n", ["xenfs", "xen-privcmd", "xen_evtchn"]
    )
    assert order == [
        "kernel/lib/helper_a.ko.xz",
        "kernel/drivers/xen/xen-privcmd.ko",
        "kernel/drivers/xen/xenfs/xenfs.ko",
    ]


def test_resolve_modules_reports_missing_and_cyclic_modules() -> None:
    with pytest.raises(GuestBuildError, match="xen-evtchn is neither"):
        resolve_modules(MODULES_DEP, "", ["xen-evtchn"])
    with pytest.raises(GuestBuildError, match="cycle"):
        resolve_modules("a.ko: b.ko\nb.ko: a.ko\n", "", ["a"])


@pytest.fixture(scope="module")
def guest_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    return compile_guest_program(tmp_path_factory.mktemp("guest") / "guest_grant")


def test_guest_program_compiles_static(guest_program: Path) -> None:
    check_static(guest_program)  # raises for a dynamically linked binary
    assert guest_program.read_bytes().startswith(b"\x7fELF")


def test_check_static_refuses_a_dynamic_binary() -> None:
    true = shutil.which("true")
    assert true is not None
    with pytest.raises(GuestBuildError, match="dynamically linked"):
        check_static(Path(true))


@pytest.mark.skipif(Path("/dev/xen/xenbus").exists(), reason="this host runs on Xen")
def test_guest_program_reports_the_failed_step(guest_program: Path) -> None:
    proc = subprocess.run([guest_program], capture_output=True, text=True, timeout=10, check=False)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1
    assert lines[0].startswith("guest_grant: step xenbus-open failed: errno ")
    assert lines[-1] == "TESTBED-GUEST-RESULT bad:xenbus-open"


def test_init_script_parses() -> None:
    sh = shutil.which("sh")
    assert sh is not None
    subprocess.run([sh, "-n", str(INIT_SCRIPT)], check=True)


def fake_rootfs(root: Path) -> None:
    """The parts of a Debian rootfs build_guest reads: kernel, modules.dep, the modules."""
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "vmlinuz-9.9.9-test").write_bytes(fake_bzimage(FAKE_ELF))
    moddir = root / "lib" / "modules" / "9.9.9-test"
    (moddir / "kernel").mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/xen-evtchn.ko.xz: kernel/dep.ko\nkernel/dep.ko:\nkernel/xen-gntalloc.ko:\n"
    )
    (moddir / "modules.builtin").write_text("kernel/xenbus.ko\n")
    (moddir / "kernel" / "dep.ko").write_bytes(b"\x7fELF dep")
    (moddir / "kernel" / "xen-evtchn.ko.xz").write_bytes(lzma.compress(b"\x7fELF evtchn"))
    (moddir / "kernel" / "xen-gntalloc.ko").write_bytes(b"\x7fELF gntalloc")


def test_build_guest_on_a_fake_rootfs_is_deterministic(tmp_path: Path, guest_program: Path) -> None:
    fake_rootfs(tmp_path / "rootfs")
    # The compiled guest program stands in for busybox: any static executable will do.
    first = build_guest(tmp_path / "rootfs", tmp_path / "a", busybox=guest_program)
    second = build_guest(tmp_path / "rootfs", tmp_path / "b", busybox=guest_program)

    assert first.kernel.read_bytes() == FAKE_ELF
    assert first.ramdisk.read_bytes() == second.ramdisk.read_bytes()
    members = read_newc(gzip.decompress(first.ramdisk.read_bytes()))
    assert members["modules/load.order"].data == b"dep.ko\nxen-evtchn.ko\nxen-gntalloc.ko\n"
    assert members["modules/xen-evtchn.ko"].data == b"\x7fELF evtchn"
    assert members["init"].data == INIT_SCRIPT.read_bytes()
    assert members["init"].mode == stat.S_IFREG | 0o755
    assert members["bin/busybox"].data == guest_program.read_bytes()
    assert {f"bin/{a}" for a in APPLETS} <= set(members)
    assert members["dev/console"].rdev == (5, 1)
    assert {"proc", "sys", "guest_grant"} <= set(members)


def test_build_guest_needs_exactly_one_kernel(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    with pytest.raises(GuestBuildError, match="found none"):
        build_guest(tmp_path, tmp_path / "out")
