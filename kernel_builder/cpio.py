"""A writer for SVR4 "newc" cpio archives, the format the kernel unpacks as an initramfs.

Every member is owned by root with one fixed mtime, so an archive depends only on its entries.
"""

import stat
from collections.abc import Iterable
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
NEWC_TRAILER = "TRAILER!!!"


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
