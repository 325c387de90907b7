"""Layer unpacking: every tar entry kind lands with its metadata, whiteouts become overlayfs
whiteouts that really hide lower layers in an overlay mount, and hostile entries never write
outside the layer directory."""

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from cri_runtime.images.errors import CorruptImage, DigestMismatch
from cri_runtime.images.unpack import LayerStats, disk_usage, unpack_layer

Entry = tuple[tarfile.TarInfo, bytes | None]


def entry(
    name: str,
    data: bytes | None = None,
    *,
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
    mode: int = 0o644,
    owner: tuple[int, int] = (0, 0),
    mtime: int = 1_700_000_000,
    pax: dict[str, str] | None = None,
) -> Entry:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    info.uid, info.gid = owner
    info.mtime = mtime
    info.pax_headers = pax or {}
    if data is not None:
        info.size = len(data)
    return info, data


def directory(name: str, mode: int = 0o755, **kwargs: object) -> Entry:
    return entry(name, kind=tarfile.DIRTYPE, mode=mode, **kwargs)  # type: ignore[arg-type]


def symlink(name: str, target: str) -> Entry:
    return entry(name, kind=tarfile.SYMTYPE, link=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return entry(name, kind=tarfile.LNKTYPE, link=target)


def layer_tar(*entries: Entry) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def diff_id(tar: bytes) -> str:
    return f"sha256:{hashlib.sha256(tar).hexdigest()}"


def unpack(tar: bytes, dest: Path, compression: str = "none") -> LayerStats:
    if compression == "gzip":
        blob = gzip.compress(tar, mtime=0)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(tar)
    else:
        blob = tar
    dest.mkdir(parents=True, exist_ok=True)
    return unpack_layer(io.BytesIO(blob), dest, diff_id(tar))


def tree(root: Path) -> dict[str, str]:
    """Every path under root with its kind (and link target / content), for comparisons."""
    result = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            result[rel] = f"-> {os.readlink(path)}"
        elif stat.S_ISDIR(info.st_mode):
            result[rel] = "dir"
        elif stat.S_ISCHR(info.st_mode):
            result[rel] = f"chr {os.major(info.st_rdev)},{os.minor(info.st_rdev)}"
        else:
            result[rel] = path.read_bytes().decode(errors="replace")
    return result


def test_entries_land_with_their_metadata(tmp_path: Path) -> None:
    dest = tmp_path / "layer"
    tar = layer_tar(
        directory("./", mode=0o755),
        directory("etc", mode=0o750, owner=(0, 4)),
        entry("etc/app.conf", b"key=1\n", mode=0o640, owner=(1000, 1001), mtime=1_234_567_890),
        symlink("etc/link", "/etc/app.conf"),
        hardlink("etc/hard", "etc/app.conf"),
        entry("usr/bin/su", b"\x7fELF", mode=0o4755),  # parents without entries of their own
        entry("run/fifo", kind=tarfile.FIFOTYPE, mode=0o600),
        entry("notes", b"x", pax={"SCHILY.xattr.user.origin": "test"}),
        directory("etc", mode=0o750, owner=(0, 4), mtime=1_111_111_111),  # dir entry repeated
    )
    stats = unpack(tar, dest)
    conf = (dest / "etc/app.conf").lstat()
    assert (dest / "etc/app.conf").read_bytes() == b"key=1\n"
    assert (stat.S_IMODE(conf.st_mode), conf.st_uid, conf.st_gid) == (0o640, 1000, 1001)
    assert conf.st_mtime == 1_234_567_890
    assert os.readlink(dest / "etc/link") == "/etc/app.conf"  # stored verbatim, not followed
    assert (dest / "etc/hard").lstat().st_ino == conf.st_ino
    assert stat.S_IMODE((dest / "usr/bin/su").stat().st_mode) == 0o4755
    assert stat.S_IMODE((dest / "usr").stat().st_mode) == 0o755
    assert stat.S_ISFIFO((dest / "run/fifo").lstat().st_mode)
    assert os.getxattr(dest / "notes", "user.origin") == b"test"
    etc = (dest / "etc").stat()
    assert (stat.S_IMODE(etc.st_mode), etc.st_gid) == (0o750, 4)
    assert etc.st_mtime == 1_111_111_111  # set after its children were written
    assert stats.diff_id == diff_id(tar)
    assert (
        stats.inodes == 10
    )  # root, etc, app.conf (=hard), link, usr, usr/bin, su, run, fifo, notes
    assert stats.size == disk_usage(dest)[0] > 0


def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    dest = tmp_path / "layer"
    unpack(
        layer_tar(
            directory("a"),
            entry("a/.wh.gone", b""),
            directory("b"),
            entry("b/.wh..wh..opq", b""),
            entry("b/new", b"new"),
            entry("c/.wh.subdir", b""),  # a whiteout under a directory without an entry
        ),
        dest,
    )
    assert tree(dest) == {
        "a": "dir",
        "a/gone": "chr 0,0",
        "b": "dir",
        "b/new": "new",
        "c": "dir",
        "c/subdir": "chr 0,0",
    }
    assert os.getxattr(dest / "b", "trusted.overlay.opaque") == b"y"
    with pytest.raises(OSError):
        os.getxattr(dest / "a", "trusted.overlay.opaque")


def test_whiteouts_hide_lower_layers_in_an_overlay_mount(tmp_path: Path) -> None:
    lower, upper, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    unpack(
        layer_tar(
            entry("a/keep", b"k"),
            entry("a/gone", b"g"),
            entry("b/old", b"o"),
            entry("b/sub/deep", b"d"),
            entry("c/file", b"c"),
        ),
        lower,
    )
    unpack(
        layer_tar(
            entry("a/.wh.gone", b""),
            entry("b/.wh..wh..opq", b""),
            entry("b/new", b"n"),
            entry(".wh.c", b""),
        ),
        upper,
    )
    merged.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={upper}:{lower}", str(merged)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"overlay mount not permitted here: {mount.stderr.strip()}")
    try:
        assert tree(merged) == {"a": "dir", "a/keep": "k", "b": "dir", "b/new": "n"}
    finally:
        subprocess.run(["umount", str(merged)], check=True)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_compressions_unpack_the_same(tmp_path: Path, compression: str) -> None:
    tar = layer_tar(entry("bin/tool", b"#!/bin/sh\n", mode=0o755), symlink("bin/t", "tool"))
    stats = unpack(tar, tmp_path / "layer", compression)
    assert tree(tmp_path / "layer") == {"bin": "dir", "bin/t": "-> tool", "bin/tool": "#!/bin/sh\n"}
    assert stats.diff_id == diff_id(tar)


def test_same_layer_replaces_entries_without_following_them(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("host file")
    dest = tmp_path / "layer"
    unpack(
        layer_tar(
            symlink("victim", str(outside)),
            entry("victim", b"layer file"),
            entry("was-file", b"x"),
            directory("was-file"),
            directory("was-dir"),
            entry("was-dir/child", b"c"),
            symlink("was-dir", "elsewhere"),
        ),
        dest,
    )
    assert outside.read_text() == "host file"
    assert tree(dest) == {
        "victim": "layer file",
        "was-file": "dir",
        "was-dir": "-> elsewhere",
    }


def outside_of(box: Path) -> list[str]:
    return sorted(str(p.relative_to(box)) for p in box.rglob("*") if "layer" not in p.parts)


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([entry("../escaped", b"x")], "outside the layer"),
        ([entry("a/../../escaped", b"x")], "outside the layer"),
        ([entry("ok", b"x"), hardlink("h", "../escaped")], "outside the layer"),
        ([hardlink("h", "/etc/passwd")], "not a file in this layer"),
        ([entry("a/.wh..", b"")], "bad whiteout"),
        ([entry(".wh.", b"")], "bad whiteout"),
        ([symlink("l1", "l2"), symlink("l2", "l1"), entry("l1/x", b"x")], "too many symlinks"),
        ([entry("f", b"x"), entry("f/x", b"x")], "not a directory"),
        ([directory("d"), hardlink("h", "d")], "not a file in this layer"),
    ],
)
def test_hostile_entries_are_rejected(tmp_path: Path, entries: list[Entry], reason: str) -> None:
    box = tmp_path / "box"
    with pytest.raises(CorruptImage, match=reason):
        unpack(layer_tar(*entries), box / "layer")
    assert outside_of(box) == []


def test_symlinked_parents_resolve_inside_the_layer(tmp_path: Path) -> None:
    box = tmp_path / "box"
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    dest = box / "layer"
    unpack(
        layer_tar(
            entry("/abs/file", b"a"),  # absolute names are relative to the layer
            symlink("root", "/"),
            entry("root/etc/evil", b"e"),
            symlink("up", "../../../.."),
            entry("up/climbed", b"c"),
            symlink("host", str(host_dir)),
            entry("host/planted", b"p"),
            directory("etc"),
            entry("etc/secret", b"s"),
            symlink("s", "/etc"),
            hardlink("linked", "s/secret"),
        ),
        dest,
    )
    assert list(host_dir.iterdir()) == []
    assert outside_of(box) == []
    assert (dest / "abs/file").read_bytes() == b"a"
    assert (dest / "etc/evil").read_bytes() == b"e"
    assert (dest / "climbed").read_bytes() == b"c"
    assert (dest / str(host_dir).lstrip("/") / "planted").read_bytes() == b"p"
    assert (dest / "linked").lstat().st_ino == (dest / "etc/secret").lstat().st_ino


def test_wrong_diff_id_is_a_digest_mismatch(tmp_path: Path) -> None:
    tar = layer_tar(entry("f", b"x"))
    wrong = diff_id(b"something else")
    (tmp_path / "layer").mkdir()
    with pytest.raises(DigestMismatch) as info:
        unpack_layer(io.BytesIO(gzip.compress(tar)), tmp_path / "layer", wrong)
    assert (info.value.expected, info.value.actual) == (wrong, diff_id(tar))
    assert wrong in str(info.value) and diff_id(tar) in str(info.value)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda tar: gzip.compress(tar)[:-20],  # truncated gzip
        lambda tar: gzip.compress(tar)[:40],
        lambda tar: tar[:700],  # truncated tar: the file's data is cut short
        lambda tar: b"\x1f\x8b" + b"\x00" * 200,  # gzip magic, garbage after
        lambda tar: zstandard.ZstdCompressor().compress(tar)[:-10],
        lambda tar: b"\x01" * 1024,  # not a tar at all
    ],
)
def test_corrupt_streams_are_corrupt_image(tmp_path: Path, corrupt: object) -> None:
    tar = layer_tar(entry("f", os.urandom(3000)))
    (tmp_path / "layer").mkdir()
    with pytest.raises(CorruptImage, match="not a valid tar stream"):
        unpack_layer(io.BytesIO(corrupt(tar)), tmp_path / "layer", diff_id(tar))  # type: ignore[operator]


def test_disk_usage_counts_hard_links_once(tmp_path: Path) -> None:
    data = os.urandom(64 << 10)
    unpack(layer_tar(entry("big", data), hardlink("big2", "big")), tmp_path / "one")
    unpack(layer_tar(entry("big", data)), tmp_path / "two")
    assert disk_usage(tmp_path / "one") == disk_usage(tmp_path / "two")
    assert disk_usage(tmp_path / "one")[0] >= len(data)
