"""The busybox userland containers run in when no real image is at hand: the host's static
/bin/busybox (Debian's busybox-static) with its applets as symlinks, a printenv script, users and
groups, and the directories a container expects.

It is defined once (`busybox_userland`) and built two ways: as an image layer (a tar, pushed to
a registry and pulled like any image) and as a directory (a rootfs layer for tests that start
containers without an image store)."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from devkit.images import PATH_ENV, push_image
from devkit.registry import LocalRegistry

BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "[", "cat", "chmod", "cp", "cut", "date", "dd", "df", "echo", "env", "false", "find", "grep",
    "head", "hostname", "id", "kill", "ln", "ls", "mkdir", "mkfifo", "mount", "mv", "nproc",
    "printf", "ps", "pwd", "readlink", "rm", "sed", "seq", "sh", "sleep", "sort", "stat", "tail",
    "tee", "test", "timeout", "touch", "tr", "true", "uname", "wc", "whoami", "yes",
)  # fmt: skip
# root, nobody (65534) and an unprivileged app user (1000, also in group video) to run as.
PASSWD = """\
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
app:x:1000:1000:app:/home/app:/bin/sh
"""
GROUP = """\
root:x:0:
nogroup:x:65534:
app:x:1000:
video:x:44:app
"""
# Debian's busybox-static has no printenv applet; this script behaves like coreutils' printenv.
PRINTENV = """\
#!/bin/sh
[ $# -eq 0 ] && exec env
status=0
for name in "$@"; do
  if eval "[ -n \\"\\${$name+set}\\" ]"
  then eval "printf '%s\\n' \\"\\$$name\\""
  else status=1
  fi
done
exit $status
"""
# The mount points a container needs, app's home, and /work to run in.
DIRECTORIES = {
    "bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "home/app": 0o755, "proc": 0o555,
    "root": 0o700, "sys": 0o555, "tmp": 0o1777, "work": 0o755,
}  # fmt: skip


@dataclass(frozen=True)
class File:
    path: str
    content: bytes
    mode: int


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Userland:
    """Everything in the root filesystem, paths relative to it; directories before what they
    hold."""

    directories: list[tuple[str, int]]
    files: list[File]
    symlinks: list[Symlink]


def busybox_userland() -> Userland:
    return Userland(
        directories=sorted(DIRECTORIES.items()),
        files=[
            File("bin/busybox", BUSYBOX.read_bytes(), 0o755),
            File("bin/printenv", PRINTENV.encode(), 0o755),
            File("etc/passwd", PASSWD.encode(), 0o644),
            File("etc/group", GROUP.encode(), 0o644),
        ],
        symlinks=[Symlink(f"bin/{applet}", "busybox") for applet in APPLETS],
    )


def busybox_layer_tar() -> bytes:
    return layer_tar(busybox_userland())


def layer_tar(userland: Userland) -> bytes:
    """A userland as an uncompressed image layer (root-owned, mtime 0: the same bytes, so the
    same digest, every time)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path, mode in userland.directories:
            info = tarfile.TarInfo(path)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            archive.addfile(info)
        for file in userland.files:
            info = tarfile.TarInfo(file.path)
            info.size = len(file.content)
            info.mode = file.mode
            archive.addfile(info, io.BytesIO(file.content))
        for symlink in userland.symlinks:
            info = tarfile.TarInfo(symlink.path)
            info.type = tarfile.SYMTYPE
            info.linkname = symlink.target
            info.mode = 0o777
            archive.addfile(info)
    return buffer.getvalue()


def write_busybox_rootfs(directory: Path) -> Path:
    """Write the userland into ``directory`` (created) and return it."""
    userland = busybox_userland()
    directory.mkdir(parents=True)
    for path, mode in userland.directories:
        (directory / path).mkdir()
        os.chmod(directory / path, mode)  # mkdir's mode is filtered by the umask
    for file in userland.files:
        (directory / file.path).write_bytes(file.content)
        os.chmod(directory / file.path, file.mode)
    for symlink in userland.symlinks:
        (directory / symlink.path).symlink_to(symlink.target)
    return directory


def push_busybox_image(registry: LocalRegistry, repo: str = "busybox", tag: str = "latest") -> str:
    """Push the userland as a one-layer image whose default command is ``sh``; returns its
    reference ("127.0.0.1:PORT/REPO:TAG")."""
    push_image(registry, repo, tag, [busybox_layer_tar()], {"Env": [PATH_ENV], "Cmd": ["sh"]})
    return f"{registry.host}/{repo}:{tag}"
