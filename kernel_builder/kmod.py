"""Kernel trees and modules: which modules to load, in which order, and their ELF bytes.

Dependencies are resolved at build time from modules.dep, so a zone's initramfs needs neither
modprobe nor depmod data: its /init loads a fixed list with busybox insmod.
"""

import lzma
import re
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kernel_builder import BootImageError
from kernel_builder.elf import ELF_MAGIC

DEBUGFS_TIMEOUT_S = 60
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.+/-]+$")


class KernelTree(Protocol):
    """A Debian root filesystem holding one kernel: boot/vmlinuz-<v> and lib/modules/<v>/."""

    def read(self, path: str) -> bytes:
        """The bytes of the regular file at ``path`` (relative to the tree's root)."""
        ...

    def names(self, directory: str) -> list[str]:
        """The entries of ``directory`` (relative), without . and .."""
        ...


@dataclass(frozen=True)
class DirectoryTree:
    """A kernel tree unpacked in a directory (e.g. an mmdebstrap root)."""

    root: Path

    def read(self, path: str) -> bytes:
        try:
            return (self.root / path).read_bytes()
        except OSError as e:
            raise BootImageError(f"cannot read {path} from {self.root}: {e}") from e

    def names(self, directory: str) -> list[str]:
        try:
            return sorted(p.name for p in (self.root / directory).iterdir())
        except OSError as e:
            raise BootImageError(f"cannot list {directory} in {self.root}: {e}") from e


@dataclass(frozen=True)
class Ext4ImageTree:
    """A kernel tree inside an ext4 image, read with debugfs: no mount, no root, no changes
    to the image (the testbed's cached Dom0 disk is one)."""

    image: Path

    def _debugfs(self, request: str) -> subprocess.CompletedProcess[bytes]:
        debugfs = shutil.which("debugfs") or shutil.which("debugfs", path="/usr/sbin:/sbin")
        if debugfs is None:
            raise BootImageError("debugfs not found (package e2fsprogs)")
        if not self.image.is_file():
            raise BootImageError(f"{self.image}: no such image file")
        return subprocess.run(
            [debugfs, "-R", request, str(self.image)],
            capture_output=True,
            timeout=DEBUGFS_TIMEOUT_S,
            check=False,
        )

    def _entries(self, directory: str) -> dict[str, tuple[int, int]]:
        """name -> (mode, size) of a directory's entries, from ``ls -p``."""
        path = _checked(directory)
        done = self._debugfs(f"ls -p /{path}")
        entries: dict[str, tuple[int, int]] = {}
        for line in done.stdout.decode(errors="replace").splitlines():
            # /inode/mode/uid/gid/name/size/
            parts = line.split("/")
            if len(parts) == 8 and parts[5] not in (".", ".."):
                entries[parts[5]] = (int(parts[2], 8), int(parts[6] or 0))
        if done.returncode != 0 or not done.stdout.strip():
            why = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise BootImageError(f"cannot list /{path} in {self.image}: {' '.join(why)}")
        return entries

    def names(self, directory: str) -> list[str]:
        return sorted(self._entries(directory))

    def read(self, path: str) -> bytes:
        path = _checked(path)
        parent, _, name = path.rpartition("/")
        entry = self._entries(parent).get(name)
        if entry is None or not stat.S_ISREG(entry[0]):
            raise BootImageError(f"/{path} in {self.image} is missing or not a regular file")
        done = self._debugfs(f"cat /{path}")
        if done.returncode != 0 or len(done.stdout) != entry[1]:
            why = done.stderr.decode(errors="replace").strip()
            raise BootImageError(
                f"reading /{path} from {self.image} gave {len(done.stdout)} of {entry[1]} "
                f"bytes: {why}"
            )
        return done.stdout


def _checked(path: str) -> str:
    path = path.strip("/")
    if not _SAFE_PATH.match(path) or ".." in path.split("/"):
        raise BootImageError(f"unsupported path {path!r} in a kernel tree")
    return path


def kernel_version(tree: KernelTree) -> str:
    """The version of the tree's one kernel (``boot/vmlinuz-<version>``)."""
    kernels = [n for n in tree.names("boot") if n.startswith("vmlinuz-")]
    if len(kernels) != 1:
        raise BootImageError(f"expected one boot/vmlinuz-*, found {', '.join(kernels) or 'none'}")
    return kernels[0].removeprefix("vmlinuz-")


def module_name(path: str) -> str:
    """Kernel module name of a modules.dep path: basename without .ko*, '-' read as '_'."""
    base = path.rpartition("/")[2]
    return base.partition(".ko")[0].replace("-", "_")


def resolve_modules(modules_dep: str, modules_builtin: str, wanted: Sequence[str]) -> list[str]:
    """modules.dep paths to insmod, dependencies first, for ``wanted`` (built-ins skipped)."""
    deps: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if not line.strip():
            continue
        mod, sep, rest = line.partition(":")
        if not sep:
            raise BootImageError(f"bad modules.dep line: {line!r}")
        deps[mod] = rest.split()
        path_of[module_name(mod)] = mod
    builtin = {module_name(p) for p in modules_builtin.split()}

    order: list[str] = []
    visiting: set[str] = set()

    def visit(path: str) -> None:
        if path in order:
            return
        if path in visiting:
            raise BootImageError(f"dependency cycle through {path}")
        if path not in deps:
            raise BootImageError(f"{path} is a dependency but has no modules.dep entry")
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
            raise BootImageError(f"module {name} is neither in modules.dep nor built in")
        visit(path_of[key])
    return order


def decode_module(path: str, data: bytes) -> bytes:
    """A module's ELF bytes; busybox insmod cannot load compressed modules."""
    if path.endswith(".ko.xz"):
        data = lzma.decompress(data)
    elif not path.endswith(".ko"):
        raise BootImageError(f"{path}: unsupported module compression")
    if not data.startswith(ELF_MAGIC):
        raise BootImageError(f"{path}: not an ELF module")
    return data


def load_modules(tree: KernelTree, version: str, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """(file name, ELF bytes) of ``wanted`` and their dependencies, in insmod order."""
    moddir = f"lib/modules/{version}"
    order = resolve_modules(
        tree.read(f"{moddir}/modules.dep").decode(),
        tree.read(f"{moddir}/modules.builtin").decode(),
        wanted,
    )
    return [
        (
            path.rpartition("/")[2].removesuffix(".xz"),
            decode_module(path, tree.read(f"{moddir}/{path}")),
        )
        for path in order
    ]
