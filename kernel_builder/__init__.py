"""Builds what a zone boots: the kernel as an ELF vmlinux and a small initramfs.

The pieces (newc cpio writer, kernel module resolution, bzImage unpacking) are shared with the
nested Xen testbed's own guest (tests/xen/guest/build.py). Everything is assembled in Python, so
a build needs neither root, fakeroot nor cpio, and the same inputs give byte-identical outputs.
"""

import os
import tempfile
from pathlib import Path


class BootImageError(Exception):
    """The inputs cannot make a bootable image; the message says which input and why."""


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` through a temporary file and a rename: readers never see half a file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
    os.chmod(f.name, mode)
    os.replace(f.name, path)
