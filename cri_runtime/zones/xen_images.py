"""Container images in Xen zones: an image's unpacked layers as one read-only ext4 disk, given
to each zone that runs a container of it.

A domU cannot see the host's layer directories, so each image becomes a disk
(``<cache>/<image hex>.ext4``) holding one directory per layer, named like the store's layer
directories (the diff id's hex). The layers stay separate, in overlayfs's format: mke2fs copies
whiteouts (0/0 character devices) and ``trusted.overlay.opaque`` as they are, and the zone's
agent stacks the directories exactly as the process backend stacks the host's. The disk is
built once per image (zones/xen_disks.py: ``mke2fs -d``, temp file + rename) from a staging tree
of hard links to the store's files (no data copied), under a per-image lock, so concurrent
CreateContainers of one image build it once. It stays while the store has the image or a
container holds it, and goes (``prune``) once neither does and no loop device uses it.

Per zone, an image is attached once, whatever number of its containers run there: a fresh
read-only loop device, ``xl block-attach`` as the zone's next free ``xvd`` device, a bounded
wait for blkback to connect it (the zone's blkfront picks the hotplugged disk up), then the loop
device is released to the kernel, which frees it when the domain lets go of it (block-detach,
or the domain's death). ``<zone dir>/image-disks.json`` records which image is which device and
which containers use it; the last container's removal detaches the disk. Every failure is a
ZoneError carrying the tool's words.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from cri_runtime.agent.protocol import ImageDisk
from cri_runtime.zones import records, xen_disks
from cri_runtime.zones.base import ZoneError
from cri_runtime.zones.xl import Xl
from idm.xen.xenstore import Xenstore, XenstoreError

log = structlog.get_logger(__name__)

IMAGE_MOUNTS = Path("/run/vgpu/images")  # where the zone's agent mounts image disks
STATE_FILE = "image-disks.json"
STAGE_PREFIX = ".stage-"
DIGEST_PREFIX = "sha256:"
LABEL_LENGTH = 16  # ext4's volume label: the image id's first 16 hex digits
CONNECT_TIMEOUT_S = 60.0  # hotplug in an emulated zone takes seconds
CONNECT_POLL_S = 0.1
XENBUS_CONNECTED = "4"
MAX_VDEVS = 26 * 27  # xvda .. xvdzz


def image_hex(image_id: str) -> str:
    """The 64 hex digits of an image id (``sha256:<hex>``); ZoneError for anything else."""
    digest = image_id.removeprefix(DIGEST_PREFIX)
    if digest == image_id or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ZoneError(f"image id {image_id!r} is not a sha256 digest")
    return digest


def disk_label(image_id: str) -> str:
    """The ext4 label of an image's disk, by which the agent checks it mounts the right one."""
    return image_hex(image_id)[:LABEL_LENGTH]


def mount_point(image_id: str) -> Path:
    return IMAGE_MOUNTS / image_hex(image_id)


def zone_layers(image_id: str, layers: Sequence[Path]) -> tuple[Path, ...]:
    """Where the zone sees the host's layer directories ``layers``: under the disk's mount."""
    return tuple(mount_point(image_id) / layer.name for layer in layers)


def vdev_name(index: int) -> str:
    """The index-th Xen virtual disk name: xvda .. xvdz, then xvdaa .. xvdzz (Linux's order)."""
    if not 0 <= index < MAX_VDEVS:
        raise ValueError(f"no virtual disk number {index}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    if index < 26:
        return f"xvd{letters[index]}"
    first, second = divmod(index - 26, 26)
    return f"xvd{letters[first]}{letters[second]}"


def next_vdev(used: Collection[str]) -> str:
    """The first virtual disk name not in ``used``."""
    for index in range(MAX_VDEVS):
        name = vdev_name(index)
        if name not in used:
            return name
    raise ZoneError(f"the zone has no free virtual disk name left ({MAX_VDEVS} in use)")


# -- the disk of an image ----------------------------------------------------------------------


def link_tree(source: Path, dest: Path) -> None:
    """Make ``dest`` a copy of the directory ``source`` whose non-directories are hard links to
    ``source``'s (copied where the file system refuses a link); directories get the source's
    owner, mode, extended attributes (overlayfs's opaque marker) and times."""
    directories: list[tuple[str, str]] = []
    stack = [(str(source), str(dest))]
    while stack:
        src, dst = stack.pop()
        os.mkdir(dst, 0o700)
        directories.append((src, dst))
        with os.scandir(src) as entries:
            for entry in entries:
                target = os.path.join(dst, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, target))
                    continue
                try:
                    os.link(entry.path, target, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                        raise
                    _copy_entry(entry.path, target)
    for src, dst in reversed(directories):  # children first: their times are set last
        st = os.lstat(src)
        os.chown(dst, st.st_uid, st.st_gid)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        for name in _xattrs(src):
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _xattrs(path: str) -> list[str]:
    """The extended attributes' names; none where the file system has no such thing."""
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise


def _copy_entry(src: str, dst: str) -> None:
    """One non-directory copied as it is (owner, mode, times, the device a node names)."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dst, follow_symlinks=False)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        os.mknod(dst, st.st_mode, st.st_rdev)
    else:
        return  # sockets are no image content
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- per-zone bookkeeping ----------------------------------------------------------------------


class ZoneImageDisk(BaseModel):
    model_config = ConfigDict(frozen=True)

    image_id: str
    vdev: str
    loop: Path | None  # ours until the domain holds it; then the kernel's (released)
    containers: tuple[str, ...]


class ZoneImageDisks(BaseModel):
    """``<zone dir>/image-disks.json``: the zone's image disks by image hex."""

    disks: dict[str, ZoneImageDisk] = {}


class XenImageDisks:
    """Image disks for every zone of one backend. The caller serializes calls per zone (the
    backend's zone lock); images are locked here, so zones attach side by side."""

    def __init__(
        self,
        cache_root: Path,
        xl: Xl,
        xs: Xenstore,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.cache = xen_disks.Ext4Cache(cache_root)
        self._xl = xl
        self._xs = xs
        self._connect_timeout_s = connect_timeout_s
        self._image_locks = records.KeyedLocks(threading.Lock)
        self._script = xen_disks.read_only_script()
        self.remove_staging()

    # -- disks ---------------------------------------------------------------------------------

    def disk(self, image_id: str, layers: Sequence[Path]) -> Path:
        """The image's disk, built from ``layers`` (host directories, lowest first) if there is
        none yet. Call with the image locked (``locked``)."""
        key = image_hex(image_id)
        image = self.cache.path(key)
        if image.is_file():
            return image
        names = [layer.name for layer in layers]
        if not layers or len(set(names)) != len(names):
            raise ZoneError(f"image {image_id}: layer directories {names} are not distinct")
        stage = self.cache.root / f"{STAGE_PREFIX}{key}-{secrets.token_hex(4)}"
        started = time.monotonic()
        try:
            self.cache.root.mkdir(parents=True, exist_ok=True)
            stage.mkdir(mode=0o755)
            for layer in layers:
                link_tree(layer, stage / layer.name)
            self.cache.get(key, stage, label=disk_label(image_id))
        except OSError as exc:
            raise ZoneError(f"image {image_id}: staging its layers for a disk: {exc}") from exc
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        log.info("image disk built", image=image_id, layers=len(layers),
                 seconds=round(time.monotonic() - started, 2))  # fmt: skip
        return image

    @contextlib.contextmanager
    def locked(self, image_id: str) -> Iterator[None]:
        """Holds off ``prune`` and other builds of the image (one runtime per root)."""
        with self._image_locks.hold(image_hex(image_id)):
            yield

    def prune(self, live: Collection[str]) -> list[str]:
        """Delete the disks of images not in ``live`` (ids) that no loop device uses; returns
        the image hexes deleted."""
        keep = {image_hex(i) for i in live if i.startswith(DIGEST_PREFIX)}
        try:
            files = sorted(self.cache.root.glob("*.ext4"))
        except OSError:
            return []
        deleted = []
        for path in files:
            key = path.name.removesuffix(".ext4")
            image_id = DIGEST_PREFIX + key
            try:
                image_hex(image_id)
            except ZoneError:
                continue  # not an image's disk
            if key in keep:
                continue
            with self.locked(image_id):
                if self.cache.discard(key):
                    deleted.append(key)
                    log.info("image disk deleted", image=f"{DIGEST_PREFIX}{key}")
        return deleted

    def remove_staging(self) -> None:
        """Staging trees a killed runtime left."""
        with contextlib.suppress(OSError):
            for stage in self.cache.root.glob(f"{STAGE_PREFIX}*"):
                shutil.rmtree(stage, ignore_errors=True)

    # -- zones ---------------------------------------------------------------------------------

    def attach(
        self,
        zone_dir: Path,
        domain: str,
        domid: int,
        container_id: str,
        image_id: str,
        layers: Sequence[Path],
        *,
        reserved: Collection[str],
        alive: Callable[[], bool],
    ) -> ImageDisk:
        """Give the zone the image's disk for ``container_id`` (attached once per zone) and
        say where the agent finds it. ``reserved``: the zone's other virtual disks."""
        key = image_hex(image_id)
        state = read_state(zone_dir)
        known = state.disks.get(key)
        if known is not None:
            users = tuple(dict.fromkeys((*known.containers, container_id)))
            state.disks[key] = known.model_copy(update={"containers": users})
            write_state(zone_dir, state)
            return ImageDisk(device=Path("/dev") / known.vdev, mount_point=mount_point(image_id))
        used = {*reserved, *(d.vdev for d in state.disks.values()), *self._attached_vdevs(domid)}
        vdev = next_vdev(used)
        with self.locked(image_id):
            image = self.disk(image_id, layers)
            loop = xen_disks.attach_loop(image)
        entry = ZoneImageDisk(image_id=image_id, vdev=vdev, loop=loop, containers=(container_id,))
        state.disks[key] = entry
        write_state(zone_dir, state)  # before the attach: a teardown after a crash frees the loop
        try:
            xen_disks.block_attach(self._xl, domain, loop, vdev, script=self._script)
            self._wait_connected(domain, domid, vdev, alive)
        except BaseException:
            with contextlib.suppress(ZoneError):
                xen_disks.block_detach(self._xl, domain, vdev)
            with contextlib.suppress(ZoneError):
                xen_disks.release_loop(loop)
            del state.disks[key]
            write_state(zone_dir, state)
            raise
        xen_disks.release_loop(loop)  # the domain holds it now: the kernel frees it after
        state.disks[key] = entry.model_copy(update={"loop": None})
        write_state(zone_dir, state)
        log.info("image disk attached", domain=domain, image=image_id, vdev=vdev, loop=str(loop))
        return ImageDisk(device=Path("/dev") / vdev, mount_point=mount_point(image_id))

    def detach(self, zone_dir: Path, domain: str, container_id: str) -> None:
        """``container_id`` no longer uses its image's disk: detach it when no other container
        of the zone does (the agent unmounted it when it removed the container)."""
        state = read_state(zone_dir)
        for key, disk in list(state.disks.items()):
            if container_id not in disk.containers:
                continue
            users = tuple(c for c in disk.containers if c != container_id)
            if users:
                state.disks[key] = disk.model_copy(update={"containers": users})
                write_state(zone_dir, state)
                continue
            xen_disks.block_detach(self._xl, domain, disk.vdev)
            if disk.loop is not None:
                xen_disks.release_loop(disk.loop)
            del state.disks[key]
            write_state(zone_dir, state)
            log.info("image disk detached", domain=domain, image=disk.image_id, vdev=disk.vdev)

    def zone_gone(self, zone_dir: Path) -> None:
        """The zone's domain is gone (it took its disks along): free the loop devices an
        interrupted attach left recorded."""
        for disk in read_state(zone_dir).disks.values():
            if disk.loop is not None:
                with contextlib.suppress(ZoneError):
                    xen_disks.release_loop(disk.loop)

    def _attached_vdevs(self, domid: int) -> set[str]:
        """The domain's disks as its backends list them (those still detaching included)."""
        base = f"/local/domain/0/backend/vbd/{domid}"
        try:
            return {
                vdev
                for devid in self._xs.directory(base)
                if (vdev := self._xs.read(f"{base}/{devid}/dev")) is not None
            }
        except XenstoreError as exc:
            raise ZoneError(f"domain {domid}: reading its disks in xenstore: {exc}") from exc

    def _backend_path(self, domid: int, vdev: str) -> str | None:
        base = f"/local/domain/0/backend/vbd/{domid}"
        for devid in self._xs.directory(base):
            if self._xs.read(f"{base}/{devid}/dev") == vdev:
                return f"{base}/{devid}"
        return None

    def _wait_connected(
        self, domain: str, domid: int, vdev: str, alive: Callable[[], bool]
    ) -> None:
        """Until blkback serves ``vdev`` to the zone's blkfront (then it holds the device
        open, and the loop device may be released); ZoneError with what blocked it."""
        deadline = time.monotonic() + self._connect_timeout_s
        state: str | None = None
        try:
            while True:
                path = self._backend_path(domid, vdev)
                if path is not None:
                    state = self._xs.read(f"{path}/state")
                    if state == XENBUS_CONNECTED:
                        return
                    error = self._xs.read(f"{path}/hotplug-error")
                    if error:
                        raise ZoneError(f"{domain}: disk {vdev}: hotplug failed: {error}")
                if not alive():
                    raise ZoneError(f"{domain}: the domain ended while disk {vdev} was attached")
                if time.monotonic() >= deadline:
                    raise ZoneError(
                        f"{domain}: disk {vdev} not connected within "
                        f"{self._connect_timeout_s:.0f} s (backend state {state or 'absent'}; "
                        "does the zone's kernel have xen-blkfront?)"
                    )
                time.sleep(CONNECT_POLL_S)
        except XenstoreError as exc:
            raise ZoneError(f"{domain}: disk {vdev}: reading its backend state: {exc}") from exc


def read_state(zone_dir: Path) -> ZoneImageDisks:
    try:
        return ZoneImageDisks.model_validate_json((zone_dir / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return ZoneImageDisks()
    except (OSError, ValidationError) as exc:
        raise ZoneError(f"unreadable {zone_dir / STATE_FILE}: {exc}") from exc


def write_state(zone_dir: Path, state: ZoneImageDisks) -> None:
    records.write_json(zone_dir / STATE_FILE, state)
