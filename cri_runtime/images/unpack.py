"""Unpack one layer tar (plain, gzip or zstd) into its own directory, in overlayfs's format so the
layer directories stack as lowerdirs: a whiteout `.wh.<name>` becomes a 0/0 character device
<name>, an opaque marker `.wh..wh..opq` becomes `trusted.overlay.opaque=y` on its directory.

A layer is untrusted input. Entry names are made relative ("/etc" is "etc"), names that climb
out with ".." are rejected, and every parent directory is resolved inside the layer directory,
symlinks included (an absolute symlink means the layer's root, as it will inside the
container), so no entry is ever written outside `dest`. Link targets are stored verbatim and
never followed while writing.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog
import zstandard

from cri_runtime.images.digest import Hasher
from cri_runtime.images.errors import CorruptImage, ImageError

log = structlog.get_logger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
XATTR_PAX_PREFIX = "SCHILY.xattr."
XATTR_NAMESPACES = ("user.", "security.")  # never trusted.*: that is overlayfs's own namespace
MAX_SYMLINK_HOPS = 40  # as the kernel's path walk
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20


@dataclass(frozen=True)
class LayerStats:
    diff_id: str  # digest of the uncompressed tar
    size: int  # bytes the unpacked layer takes on disk
    inodes: int


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _HashingReader:
    """Hashes what tarfile reads, so the diff id is checked without a second pass."""

    def __init__(self, stream: _Readable, hasher: Hasher) -> None:
        self._stream = stream
        self.hasher = hasher

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.hasher.update(data)
        return data


def unpack_layer(blob: BinaryIO, dest: Path, diff_id: str) -> LayerStats:
    """Unpack the (seekable) layer blob into the empty directory `dest` and check that the
    uncompressed tar hashes to `diff_id` (from the verified image config)."""
    magic = blob.read(4)
    blob.seek(0)
    stream: _Readable
    if magic.startswith(GZIP_MAGIC):
        stream = gzip.GzipFile(fileobj=blob, mode="rb")
    elif magic == ZSTD_MAGIC:
        stream = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
    else:
        stream = blob
    reader = _HashingReader(stream, Hasher.for_digest(diff_id))
    try:
        with tarfile.open(fileobj=reader, mode="r|") as archive:  # type: ignore[call-overload]
            _Unpacker(dest).apply(archive)
        while reader.read(CHUNK):  # the tar's trailing padding is part of the diff id too
            pass
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
        raise CorruptImage(f"layer {diff_id} is not a valid tar stream: {exc}") from exc
    reader.hasher.verify(f"uncompressed layer {diff_id}", diff_id)
    size, inodes = disk_usage(dest)
    return LayerStats(diff_id=diff_id, size=size, inodes=inodes)


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under root, each hard-linked inode counted once."""
    seen: set[int] = set()
    size = 0
    for path in _walk(root):
        info = path.lstat()
        if info.st_ino in seen:
            continue
        seen.add(info.st_ino)
        size += info.st_blocks * 512
    return size, len(seen)


def _walk(root: Path) -> Iterator[Path]:
    yield root
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath, name)


def _entry_parts(name: str, layer: str) -> list[str]:
    """The entry's path components relative to the layer root; ".." may not climb out."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise CorruptImage(f"layer {layer}: entry {name!r} points outside the layer")
            parts.pop()
        else:
            parts.append(part)
    return parts


@dataclass
class _DirAttrs:
    path: Path
    member: tarfile.TarInfo


class _Unpacker:
    """Applies one archive's entries under `root`; only ever writes below it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.is_root = os.geteuid() == 0
        self.dirs: list[_DirAttrs] = []

    def apply(self, archive: tarfile.TarFile) -> None:
        for member in archive:
            parts = _entry_parts(member.name, str(self.root))
            if not parts:
                if member.isdir():  # "./": the layer root's own mode and owner
                    self.dirs.append(_DirAttrs(self.root, member))
                continue
            parent = self._resolve_dir(parts[:-1])
            name = parts[-1]
            if name == OPAQUE_MARKER:
                self._overlay_marker(parent, opaque=True)
            elif name.startswith(WHITEOUT_PREFIX):
                hidden = name.removeprefix(WHITEOUT_PREFIX)
                if hidden in ("", ".", ".."):
                    raise CorruptImage(f"layer {self.root}: bad whiteout {member.name!r}")
                self._clear(parent / hidden)
                self._overlay_marker(parent / hidden, opaque=False)
            else:
                self._create(archive, member, parent / name)
        # Directory modes and times last (children written later would change the mtime), in
        # archive order so a repeated entry wins as in tar.
        for entry in self.dirs:
            if entry.path.is_dir() and not entry.path.is_symlink():
                self._set_attrs(entry.path, entry.member)

    def _resolve_dir(self, parts: list[str]) -> Path:
        """The directory `parts` names, resolved as if `self.root` were "/" (symlinks followed
        inside the layer, ".." stops at the root); missing directories are created."""
        resolved: list[str] = []
        pending = list(parts)
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            path = self.root.joinpath(*resolved, part)
            try:
                info = path.lstat()
            except FileNotFoundError:
                path.mkdir(mode=0o755)
                resolved.append(part)
                continue
            if stat.S_ISLNK(info.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise CorruptImage(f"layer {self.root}: too many symlinks under {parts}")
                target = os.readlink(path)
                if target.startswith("/"):
                    resolved = []
                pending[:0] = target.split("/")
            elif stat.S_ISDIR(info.st_mode):
                resolved.append(part)
            else:
                raise CorruptImage(
                    f"layer {self.root}: {'/'.join(parts)} is not a directory in the layer"
                )
        return self.root.joinpath(*resolved)

    def _clear(self, path: Path, keep_dir: bool = False) -> None:
        """Remove what is at `path` (never following it) so a new entry can take its place."""
        try:
            info = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(info.st_mode):
            path.unlink()
        elif not keep_dir:
            shutil.rmtree(path)

    def _overlay_marker(self, path: Path, *, opaque: bool) -> None:
        """Mark a directory opaque or write a whiteout device; both need root (CAP_SYS_ADMIN for
        trusted.* xattrs, CAP_MKNOD)."""
        try:
            if opaque:
                os.setxattr(path, OPAQUE_XATTR, b"y")
            else:
                os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
        except PermissionError as exc:
            raise ImageError(
                f"cannot record an overlay whiteout at {path}: {exc} (unpacking needs root)"
            ) from exc

    def _create(self, archive: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
        if member.isdir():
            self._clear(path, keep_dir=True)
            if not path.is_dir():
                path.mkdir(mode=0o755)
            self.dirs.append(_DirAttrs(path, member))
            return
        self._clear(path)
        if member.isreg():
            source = archive.extractfile(member)
            assert source is not None  # a regular member always has data
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as file:
                while chunk := source.read(CHUNK):
                    file.write(chunk)
        elif member.issym():
            os.symlink(member.linkname, path)
        elif member.islnk():
            link_parts = _entry_parts(member.linkname, str(self.root))
            if not link_parts:
                raise CorruptImage(f"layer {self.root}: hardlink {member.name!r} to the root")
            source_path = self._resolve_dir(link_parts[:-1]) / link_parts[-1]
            if not os.path.lexists(source_path) or stat.S_ISDIR(source_path.lstat().st_mode):
                raise CorruptImage(
                    f"layer {self.root}: hardlink {member.name!r} to {member.linkname!r}, "
                    "which is not a file in this layer"
                )
            os.link(source_path, path, follow_symlinks=False)
            return  # a hard link shares its target's inode and attributes
        elif member.ischr() or member.isblk() or member.isfifo():
            kind = (
                stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
            )
            try:
                os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            except PermissionError:
                log.warning("device node skipped", layer=str(self.root), entry=member.name)
                return
        else:
            log.warning("unsupported tar entry skipped", layer=str(self.root), entry=member.name)
            return
        self._set_attrs(path, member)

    def _set_attrs(self, path: Path, member: tarfile.TarInfo) -> None:
        symlink = member.issym()
        if self.is_root:
            os.lchown(path, member.uid, member.gid)
        for key, value in member.pax_headers.items():
            name = key.removeprefix(XATTR_PAX_PREFIX)
            if key.startswith(XATTR_PAX_PREFIX) and name.startswith(XATTR_NAMESPACES):
                self._set_xattr(path, name, value.encode("utf-8", "surrogateescape"), member)
        if not symlink:
            os.chmod(path, member.mode & 0o7777)  # after chown, which clears set-id bits
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def _set_xattr(self, path: Path, name: str, value: bytes, member: tarfile.TarInfo) -> None:
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            log.warning("xattr skipped", entry=member.name, xattr=name, error=str(exc))
