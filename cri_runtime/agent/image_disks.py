"""Image disks in a Xen zone: the runtime attaches an image's layers as a read-only ext4 disk
(zones/xen_images.py) and names it in the container's spec; the agent mounts it read-only at
its mount point when the first container of the image needs it and unmounts it when the last
one is removed, before the runtime detaches it.

The disk is hotplugged just before CREATE: the agent waits (bounded) for the kernel to show it
in /sys/block, and checks its ext4 label (the image id's first 16 hex digits, the mount point's
name) so a disk mix-up fails CREATE instead of running the wrong image.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from pathlib import Path

import structlog

from cri_runtime.agent import rootfs
from cri_runtime.agent.client import AgentError
from cri_runtime.agent.protocol import AgentStatus, ImageDisk

log = structlog.get_logger(__name__)

APPEAR_TIMEOUT_S = 30.0
APPEAR_POLL_S = 0.05
EXT4_SUPERBLOCK = 1024
EXT4_MAGIC_AT = EXT4_SUPERBLOCK + 0x38
EXT4_MAGIC = b"\x53\xef"
EXT4_LABEL_AT = EXT4_SUPERBLOCK + 0x78
EXT4_LABEL_SIZE = 16


def expected_label(disk: ImageDisk) -> str:
    return disk.mount_point.name[:EXT4_LABEL_SIZE]


def ext4_label(device: Path) -> str | None:
    """The volume label of the ext4 file system on ``device``; None if it holds none."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.pread(fd, 2, EXT4_MAGIC_AT) != EXT4_MAGIC:
            return None
        raw = os.pread(fd, EXT4_LABEL_SIZE, EXT4_LABEL_AT)
    finally:
        os.close(fd)
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class ImageMounts:
    """The zone's mounted image disks and the containers using each. Thread-safe."""

    def __init__(
        self,
        *,
        sys_block: Path = Path("/sys/block"),
        dev: Path = Path("/dev"),
        appear_timeout_s: float = APPEAR_TIMEOUT_S,
    ) -> None:
        self._sys_block = sys_block
        self._dev = dev
        self._appear_timeout_s = appear_timeout_s
        self._lock = threading.Lock()
        self._users: dict[Path, set[str]] = {}  # mount point -> container ids
        self._of: dict[str, Path] = {}  # container id -> mount point

    def acquire(self, disk: ImageDisk, container_id: str) -> None:
        """Mount ``disk`` for ``container_id`` unless another container has it mounted."""
        with self._lock:
            users = self._users.get(disk.mount_point)
            if users is None:
                self._mount(disk)
                users = self._users[disk.mount_point] = set()
            users.add(container_id)
            self._of[container_id] = disk.mount_point

    def release(self, container_id: str) -> None:
        """``container_id`` is gone: unmount its image disk if no other container uses it."""
        with self._lock:
            target = self._of.pop(container_id, None)
            if target is None:
                return
            users = self._users[target]
            users.discard(container_id)
            if users:
                return
            del self._users[target]
            try:
                rootfs.unmount(target, lazy=False)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise AgentError(AgentStatus.FAILED, str(exc)) from exc
                log.warning("image disk busy; detached lazily", mount_point=str(target))
                rootfs.unmount(target)
            log.info("image disk unmounted", mount_point=str(target))

    def mounted(self) -> dict[Path, set[str]]:
        with self._lock:
            return {target: set(users) for target, users in self._users.items()}

    def _mount(self, disk: ImageDisk) -> None:
        device = self._device(disk)
        try:
            label = ext4_label(device)
        except OSError as exc:
            raise AgentError(AgentStatus.FAILED, f"image disk {device}: {exc}") from exc
        if label != expected_label(disk):
            raise AgentError(
                AgentStatus.FAILED,
                f"image disk {device} holds {label or 'no ext4 file system'!r}, "
                f"not image {expected_label(disk)}",
            )
        try:
            disk.mount_point.mkdir(parents=True, exist_ok=True)
            rootfs.mount_readonly(device, disk.mount_point, "ext4")
        except OSError as exc:
            raise AgentError(AgentStatus.FAILED, f"image disk {device}: {exc}") from exc
        log.info("image disk mounted", device=str(device), mount_point=str(disk.mount_point))

    def _device(self, disk: ImageDisk) -> Path:
        """The disk's device node, once the kernel has the hotplugged disk (bounded wait)."""
        name = disk.device.name
        sysfs = self._sys_block / name
        deadline = time.monotonic() + self._appear_timeout_s
        while not (sysfs / "dev").exists():
            if time.monotonic() >= deadline:
                raise AgentError(
                    AgentStatus.FAILED,
                    f"image disk {disk.device} did not appear within "
                    f"{self._appear_timeout_s:.0f} s",
                )
            time.sleep(APPEAR_POLL_S)
        device = self._dev / name
        if not device.exists():  # devtmpfs makes it; a /dev without it needs the node made
            major, minor = (sysfs / "dev").read_text().strip().split(":")
            try:
                os.mknod(device, 0o600 | stat.S_IFBLK, os.makedev(int(major), int(minor)))
            except FileExistsError:
                pass
            except OSError as exc:
                raise AgentError(AgentStatus.FAILED, f"making {device}: {exc}") from exc
        return device
