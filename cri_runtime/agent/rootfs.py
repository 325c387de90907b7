"""A container's root filesystem: an overlay of the image layers with a private upper dir, and
safe reads of files inside it (the image is untrusted: its /etc/passwd may be a symlink to
anywhere, or a FIFO that never ends)."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2
MS_RDONLY = 1
MAX_SYMLINKS = 40
_FORBIDDEN_IN_OVERLAY_OPTION = (":", ",", "\\")


def mount_overlay(layers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount ``layers`` (lowest first) with ``upper``/``work`` on ``target``.
    ValueError for unusable layer paths, OSError from mount(2)."""
    if not layers:
        raise ValueError("a container needs at least one rootfs layer")
    for path in (*layers, upper, work):
        if not path.is_absolute() or any(c in str(path) for c in _FORBIDDEN_IN_OVERLAY_OPTION):
            raise ValueError(f"layer path {str(path)!r} must be absolute without ':' ',' '\\'")
    for layer in layers:
        if not layer.is_dir():
            raise ValueError(f"rootfs layer {layer} is not a directory")
    # overlayfs lists lower dirs top first
    lower = ":".join(str(p) for p in reversed(layers))
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount overlay on {target}: {os.strerror(code)}")


def mount_readonly(device: Path, target: Path, fstype: str) -> None:
    """Mount the file system on ``device`` read-only on ``target``. OSError from mount(2)."""
    if _libc.mount(os.fsencode(device), os.fsencode(target), fstype.encode(), MS_RDONLY, None):
        code = ctypes.get_errno()
        raise OSError(
            code, f"mount {device} ({fstype}, read-only) on {target}: {os.strerror(code)}"
        )


def unmount(target: Path, *, lazy: bool = True) -> None:
    """Unmount ``target`` (``lazy``: detach it now, the file system goes with its last user);
    a path that is not mounted (or gone) is fine."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):
            raise OSError(code, f"umount {target}: {os.strerror(code)}")


def resolve_in_root(root: Path, path: str) -> Path:
    """``path`` inside ``root`` with every symlink resolved as if ``root`` were ``/`` (like
    filepath-securejoin): the result never leaves ``root``. Missing components resolve
    lexically."""
    pending = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except FileNotFoundError:
            is_link = False
        if not is_link:
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, f"too many symlinks resolving {path} in {root}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending = [p for p in target.split("/") if p not in ("", ".")] + pending
    return root.joinpath(*resolved)


def read_file_in_root(root: Path, path: str, *, limit: int = 1 << 20) -> str | None:
    """A regular file's text from inside ``root`` (at most ``limit`` bytes), or None if it is
    missing or not a regular file."""
    try:
        fd = os.open(resolve_in_root(root, path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


def usage(path: Path) -> tuple[int, int]:
    """(bytes, inodes) used under ``path``, as du counts them (blocks; hard links once)."""
    seen: set[tuple[int, int]] = set()
    size = inodes = 0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            size += st.st_blocks * 512
            inodes += 1
            if stat.S_ISDIR(st.st_mode):
                stack.append(Path(entry.path))
    return size, inodes
