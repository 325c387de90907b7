"""The testbed's PV guest image builder (tests/xen/guest/build.py), on synthetic inputs.

Nothing here needs Xen or a Debian rootfs: build_guest runs on a fake rootfs. The shared pieces
(cpio writer, bzImage unpacking, module resolution) are tested in test_kernel_builder.py.
"""

import gzip
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kernel_builder import BootImageError
from kernel_builder.elf import check_static
from tests.unit.test_kernel_builder import FAKE_ELF, fake_bzimage, read_newc
from tests.xen.guest.build import (
    APPLETS,
    INIT_SCRIPT,
    build_guest,
    compile_guest_program,
)


@pytest.fixture(scope="module")
def guest_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    return compile_guest_program(tmp_path_factory.mktemp("guest") / "guest_grant")


def test_guest_program_compiles_static(guest_program: Path) -> None:
    check_static(guest_program)  # raises for a dynamically linked binary
    assert guest_program.read_bytes().startswith(b"\x7fELF")


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
    with pytest.raises(BootImageError, match="found none"):
        build_guest(tmp_path, tmp_path / "out")
