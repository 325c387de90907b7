"""kernel_builder on synthetic inputs: the newc cpio writer, bzImage unpacking, module
resolution, the kernel trees (a directory, an ext4 image read with debugfs) and the zone
initramfs built from them.
"""

import contextlib
import gzip
import lzma
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kernel_builder import BootImageError
from kernel_builder.cpio import CpioEntry, newc_archive
from kernel_builder.elf import check_static, extract_vmlinux
from kernel_builder.kmod import (
    DirectoryTree,
    Ext4ImageTree,
    kernel_version,
    load_modules,
    resolve_modules,
)
from kernel_builder.zone_initramfs import (
    APPLETS,
    FAIL_PREFIX,
    INIT_SCRIPT,
    STAGE2_SCRIPT,
    STAGES,
    ZoneImageManifest,
    build_zone_image,
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
    with pytest.raises(BootImageError, match="no xz payload"):
        extract_vmlinux(b"MZ" + bytes(4096))


def test_extract_vmlinux_rejects_a_non_elf_payload() -> None:
    with pytest.raises(BootImageError, match="not an ELF"):
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
    with pytest.raises(BootImageError, match="xen-evtchn is neither"):
        resolve_modules(MODULES_DEP, "", ["xen-evtchn"])
    with pytest.raises(BootImageError, match="cycle"):
        resolve_modules("a.ko: b.ko\nb.ko: a.ko\n", "", ["a"])


def test_check_static_refuses_a_dynamic_binary() -> None:
    true = shutil.which("true")
    assert true is not None
    with pytest.raises(BootImageError, match="dynamically linked"):
        check_static(Path(true))


# -- kernel trees and the zone initramfs ----------------------------------------------------

VERSION = "9.9.9-zone"
ZONE_DEP = """\
kernel/drivers/block/xen-blkfront.ko:
kernel/crypto/crc32c_generic.ko:
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/xen/xen-evtchn.ko:
kernel/drivers/xen/xen-gntalloc.ko:
kernel/drivers/net/unrelated.ko:
"""


def fake_zone_rootfs(root: Path) -> None:
    """A Debian-like root with one kernel and the modules the zone initramfs loads."""
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{VERSION}").write_bytes(fake_bzimage(FAKE_ELF))
    moddir = root / "lib" / "modules" / VERSION
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(ZONE_DEP)
    (moddir / "modules.builtin").write_text("kernel/drivers/xen/xenbus.ko\n")
    for line in ZONE_DEP.splitlines():
        path = moddir / line.partition(":")[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        elf = b"\x7fELF " + path.name.encode()
        path.write_bytes(lzma.compress(elf) if path.name.endswith(".xz") else elf)


@pytest.fixture(scope="module")
def static_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static executable standing in for busybox (the host's, or a tiny compiled one)."""
    busybox = Path("/bin/busybox")
    with contextlib.suppress(BootImageError, OSError):
        check_static(busybox)
        return busybox
    if shutil.which("gcc") is None:
        pytest.skip("neither a static /bin/busybox nor gcc")
    out = tmp_path_factory.mktemp("static")
    (out / "main.c").write_text("int main(void) { return 0; }\n")
    subprocess.run(["gcc", "-static", "-o", str(out / "exe"), str(out / "main.c")], check=True)
    return out / "exe"


def test_directory_and_ext4_trees_read_the_same(tmp_path: Path) -> None:
    if shutil.which("mke2fs") is None or shutil.which("debugfs", path="/usr/sbin:/sbin") is None:
        pytest.skip("e2fsprogs not installed")
    fake_zone_rootfs(tmp_path / "root")
    image = tmp_path / "root.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tmp_path / "root"),
                    str(image), "8M"], check=True, capture_output=True)  # fmt: skip
    directory, ext4 = DirectoryTree(tmp_path / "root"), Ext4ImageTree(image)
    assert kernel_version(directory) == kernel_version(ext4) == VERSION
    names = ["xen-blkfront", "ext4", "xen_gntalloc"]
    assert load_modules(ext4, VERSION, names) == load_modules(directory, VERSION, names)
    assert [n for n, _ in load_modules(ext4, VERSION, names)] == [
        "xen-blkfront.ko", "crc16.ko", "mbcache.ko", "jbd2.ko", "ext4.ko", "xen-gntalloc.ko",
    ]  # fmt: skip
    assert dict(load_modules(ext4, VERSION, ["ext4"]))["ext4.ko"] == b"\x7fELF ext4.ko.xz"
    with pytest.raises(BootImageError, match="missing or not a regular file"):
        ext4.read("boot/vmlinuz-other")
    with pytest.raises(BootImageError, match="cannot list /nowhere"):
        ext4.names("nowhere")
    with pytest.raises(BootImageError, match="unsupported path"):
        ext4.read("boot/../etc/passwd")


def test_zone_image_is_deterministic_and_complete(tmp_path: Path, static_exe: Path) -> None:
    fake_zone_rootfs(tmp_path / "root")
    first = build_zone_image(tmp_path / "root", tmp_path / "a", busybox=static_exe)
    second = build_zone_image(
        tmp_path / "root", tmp_path / "b", busybox=static_exe, with_kernel=False
    )
    assert first.ramdisk.read_bytes() == second.ramdisk.read_bytes()
    assert first.kernel is not None and first.kernel.read_bytes() == FAKE_ELF
    assert second.kernel is None and not (tmp_path / "b" / "vmlinux").exists()
    manifest = ZoneImageManifest.model_validate_json((tmp_path / "a" / "zone.json").read_text())
    assert manifest == first.manifest
    assert manifest.kernel_version == VERSION and manifest.stages == list(STAGES)

    members = read_newc(gzip.decompress(first.ramdisk.read_bytes()))
    order = members["modules/load.order"].data.decode().split()
    assert order == manifest.modules
    # Dependencies first; every module the zone needs is there, nothing else.
    assert order.index("jbd2.ko") < order.index("ext4.ko")
    assert {m.removesuffix(".ko").replace("_", "-") for m in order} == {
        "xen-blkfront", "crc32c-generic", "crc16", "mbcache", "jbd2", "ext4", "overlay",
        "xen-evtchn", "xen-gntalloc",
    }  # fmt: skip
    assert members["modules/ext4.ko"].data == b"\x7fELF ext4.ko.xz"
    assert members["init"].data == INIT_SCRIPT.read_bytes()
    assert members["stage2"].data == STAGE2_SCRIPT.read_bytes()
    assert members["init"].mode == members["stage2"].mode == stat.S_IFREG | 0o755
    assert members["bin/busybox"].data == static_exe.read_bytes()
    assert {f"bin/{a}" for a in APPLETS} <= set(members)
    assert members["dev/console"].rdev == (5, 1)


def test_zone_image_refuses_bad_inputs(tmp_path: Path) -> None:
    fake_zone_rootfs(tmp_path / "root")
    true = shutil.which("true")
    assert true is not None
    with pytest.raises(BootImageError, match="dynamically linked"):
        build_zone_image(tmp_path / "root", tmp_path / "out", busybox=Path(true))
    with pytest.raises(BootImageError, match="neither a root directory nor an ext4 image"):
        build_zone_image(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "root" / "lib" / "modules" / VERSION / "modules.dep").write_text(
        ZONE_DEP.replace("kernel/fs/overlayfs/overlay.ko:\n", "")
    )
    with pytest.raises(BootImageError, match="overlay is neither"):
        build_zone_image(tmp_path / "root", tmp_path / "out")


@pytest.mark.parametrize("script", [INIT_SCRIPT, STAGE2_SCRIPT])
def test_zone_scripts_parse_and_print_every_stage(script: Path) -> None:
    subprocess.run(["sh", "-n", str(script)], check=True)
    both = INIT_SCRIPT.read_text() + STAGE2_SCRIPT.read_text()
    for name in STAGES:
        assert re.search(rf"^\s*stage {re.escape(name)}$", both, re.MULTILINE), name
    assert f'echo "{FAIL_PREFIX} $*"' in script.read_text()
    assert script.read_text().count("poweroff -f") == 1
