"""A runnable container rootfs layer built from the host's static busybox, for tests that
start real containers without pulling an image."""

from __future__ import annotations

import shutil
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh",
    "echo",
    "cat",
    "sleep",
    "ls",
    "id",
    "env",
    "true",
    "false",
    "pwd",
    "touch",
    "mkdir",
    "rm",
    "dd",
    "head",
    "tail",
    "kill",
    "hostname",
    "grep",
    "wc",
    "seq",
    "yes",
    "ps",
    "sed",
    "tr",
    "test",
    "[",
)
PASSWD = """\
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
"""
GROUP = """\
root:x:0:
nogroup:x:65534:
app:x:1000:
video:x:44:app
"""
# Debian's busybox-static has no printenv applet
PRINTENV = """\
#!/bin/sh
[ $# -eq 0 ] && exec env
status=0
for name; do
  if env | grep -q "^$name="; then env | sed -n "s/^$name=//p"; else status=1; fi
done
exit $status
"""


def busybox_layer(directory: Path) -> Path:
    """Write the layer into ``directory`` (created) and return it: bin/busybox with its applets
    as symlinks (and a printenv script), an /etc/passwd with root, nobody (65534) and app
    (1000, also in group video), and the directories a container expects."""
    (directory / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, directory / "bin" / "busybox")
    for applet in APPLETS:
        (directory / "bin" / applet).symlink_to("busybox")
    (directory / "bin" / "printenv").write_text(PRINTENV)
    (directory / "bin" / "printenv").chmod(0o755)
    etc = directory / "etc"
    etc.mkdir()
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    for name in ("proc", "sys", "dev", "tmp", "root", "home/app", "work"):
        (directory / name).mkdir(parents=True)
    (directory / "tmp").chmod(0o1777)
    return directory
