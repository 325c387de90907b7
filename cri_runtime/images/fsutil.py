"""Crash-safe file operations for the store: every change becomes visible by one rename, so a
kill -9 or power loss leaves either the old or the new state, never a half-written one."""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write tmp, fsync, rename over `path`, fsync the directory (tmp_dir on path's fs)."""
    tmp = tmp_dir / unique_name(path.name)
    with tmp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding `path`: one call instead of an fsync per unpacked
    file, before metadata starts to reference them."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(path))
    finally:
        os.close(fd)


def discard(path: Path, tmp_dir: Path) -> Path:
    """Move `path` into tmp_dir (atomic: it is there or gone) and return where it went; the
    caller deletes it, possibly later and outside its locks. Leftovers die on the next open."""
    doomed = tmp_dir / unique_name(f"removing-{path.name}")
    os.rename(path, doomed)
    return doomed


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
