"""Pinned host memory a guest process shares with gpu-proxy.

On a LocalLink, libvgpu backs each pinned allocation (cuMemHostAlloc) with a memfd sealed against
shrinking and growing, and passes it over the link's unix socket (SCM_RIGHTS) just before the
``vgpuHostShare`` call that names it. gpu-proxy validates it as ``idm_local_accept`` validates the
ring (seals, exact size) and maps it for that channel only. On a Xen GrantLink, libvgpu grants the
allocation's pages to gpu-proxy's domain and names their grant refs in ``vgpuHostShareGrants``;
gpu-proxy maps them from the channel's own zone (gntdev), so a zone can only ever name its own
pages. Either way copies then name (arena, offset, length) and move bytes straight between those
pages and device memory. Every range is checked against the arena it names, so a hostile process
can neither read nor write outside memory it shared itself; the seals (memfd) and the grant
mapping (Xen keeps a mapped page until it is unmapped) mean its pages can never vanish under
gpu-proxy (no SIGBUS).
"""

import array
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Sequence

import structlog

from gpu_proxy.errors import InvalidValue, NotSupported
from idm.xen._device import XenDeviceError
from idm.xen.gntdev import MappedGrants

log = structlog.get_logger(__name__)

# The message that carries the fd: magic "VPIN", reserved, arena id, size (little-endian).
SHARE_MESSAGE = struct.Struct("<IIQQ")
SHARE_MAGIC = 0x4E495056
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
# Arenas one process may have shared at once: each holds an fd's worth of mapping.
MAX_ARENAS = 4096
# Pages one granted arena may have (1 GiB): bounds what a zone can make gpu-proxy map at once.
MAX_GRANT_PAGES = 1 << 18
# At most this many fds are taken from one message; extras are closed.
_MAX_FDS = 8
_FD = array.array("i")


class _Arena:
    """One shared allocation: ``size`` bytes at the start of ``memory``; ``grants`` when the
    mapping is of a zone's granted pages (unmapped through gntdev)."""

    __slots__ = ("grants", "memory", "size")

    def __init__(self, memory: mmap.mmap, size: int, grants: MappedGrants | None = None) -> None:
        self.memory = memory
        self.size = size
        self.grants = grants

    def release(self) -> None:
        """Unmap; a view still held by a backend queue raises BufferError (nothing released)."""
        if self.grants is not None:
            self.grants.close()
        else:
            self.memory.close()


class SharedHostMemory:
    """One channel's shared arenas: arena id -> the mapping of the process's memfd or granted
    pages. ``socket_fd``: a LocalLink's socket (memfds); ``grant_domid``: a GrantLink's zone."""

    def __init__(self, socket_fd: int | None, grant_domid: int | None = None) -> None:
        self._socket_fd = socket_fd
        self._grant_domid = grant_domid
        self._arenas: dict[int, _Arena] = {}
        self._unreleased: list[_Arena] = []

    def __len__(self) -> int:
        return len(self._arenas)

    def share(self, arena: int, size: int) -> None:
        """Take the fd the process sent for ``arena`` and map it; raises InvalidValue (nothing
        kept, every received fd closed) if the message or the memory is not what was announced."""
        if self._socket_fd is None:
            raise NotSupported("this channel has no socket to pass shared memory over")
        announced, fds = self._receive()
        try:
            if announced != (arena, size):
                raise InvalidValue(
                    "shared-memory message names another arena or size than the call"
                )
            mapping = self._validate_and_map(fds, arena, size)
        finally:
            for fd in fds:
                os.close(fd)
        self._arenas[arena] = _Arena(mapping, size)
        log.debug("host memory shared", arena=arena, size=size)

    def share_grants(self, arena: int, size: int, refs: Sequence[int]) -> None:
        """Map the pages the zone granted us for ``arena`` (one ref per page of ``size``);
        raises InvalidValue (nothing kept) if they are not that, or not the zone's to give."""
        if self._grant_domid is None:
            raise NotSupported("this channel is not a Xen grant channel")
        self._check_new(arena, size)
        pages = -(-size // mmap.PAGESIZE)
        if pages > MAX_GRANT_PAGES:
            raise InvalidValue(f"a granted arena has at most {MAX_GRANT_PAGES} pages, not {pages}")
        if len(refs) != pages:
            raise InvalidValue(f"{size} bytes take {pages} pages, {len(refs)} grant refs named")
        try:
            grants = MappedGrants.map(self._grant_domid, refs)
        except (XenDeviceError, OSError, ValueError) as exc:
            raise InvalidValue(f"mapping the zone's pinned pages: {exc}") from None
        self._arenas[arena] = _Arena(grants.memory, size, grants)
        log.debug("granted host memory shared", arena=arena, size=size, pages=pages)

    def _check_new(self, arena: int, size: int) -> None:
        if arena in self._arenas:
            raise InvalidValue(f"arena {arena} is already shared")
        if len(self._arenas) >= MAX_ARENAS:
            raise InvalidValue(f"a process shares at most {MAX_ARENAS} arenas")
        if size <= 0:
            raise InvalidValue("a shared arena must not be empty")

    def _receive(self) -> tuple[tuple[int, int], list[int]]:
        """The (arena, size) the next message on the socket announces, and its fds."""
        room = socket.CMSG_SPACE(_MAX_FDS * _FD.itemsize)
        with socket.socket(fileno=os.dup(self._socket_fd)) as sock:  # type: ignore[arg-type]
            try:
                data, ancillary, flags, _ = sock.recvmsg(
                    SHARE_MESSAGE.size, room, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                raise InvalidValue("no shared-memory message waits on the socket") from None
            except OSError as exc:
                raise InvalidValue(f"reading the shared-memory message: {exc}") from None
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % _FD.itemsize])
        if len(data) != SHARE_MESSAGE.size or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise InvalidValue("shared-memory message truncated")
        magic, _reserved, arena, size = SHARE_MESSAGE.unpack(data)
        if magic != SHARE_MAGIC:
            for fd in fds:
                os.close(fd)
            raise InvalidValue("shared-memory message has a bad magic")
        return (arena, size), list(fds)

    def _validate_and_map(self, fds: list[int], arena: int, size: int) -> mmap.mmap:
        if len(fds) != 1:
            raise InvalidValue(f"shared-memory message must carry exactly 1 fd, not {len(fds)}")
        self._check_new(arena, size)
        fd = fds[0]
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise InvalidValue("shared memory is not a sealable memfd") from None
        if seals & REQUIRED_SEALS != REQUIRED_SEALS:
            raise InvalidValue("shared memory is not sealed against shrinking and growing")
        if os.fstat(fd).st_size != size:
            raise InvalidValue("shared memory size does not match the announced size")
        try:
            return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise InvalidValue(f"mapping the shared memory: {exc}") from None

    def view(self, arena: int, offset: int, length: int) -> memoryview:
        """The bytes [offset, offset + length) of ``arena``; InvalidValue unless all of them
        lie inside it."""
        shared = self._arenas.get(arena)
        if shared is None:
            raise InvalidValue(f"arena {arena} is not shared on this channel")
        size = shared.size
        if offset < 0 or length <= 0 or offset > size or length > size - offset:
            raise InvalidValue(
                f"range [{offset}, +{length}) is outside arena {arena} of {size} bytes"
            )
        return memoryview(shared.memory)[offset : offset + length]

    def unshare(self, arena: int) -> None:
        shared = self._arenas.pop(arena, None)
        if shared is None:
            raise InvalidValue(f"arena {arena} is not shared on this channel")
        self._release([shared])

    def close(self) -> None:
        """The channel is gone: unmap everything it shared."""
        arenas, self._arenas = self._arenas, {}
        self._release(list(arenas.values()))
        if self._unreleased:
            log.warning(
                "shared host memory still in use at channel close", arenas=len(self._unreleased)
            )

    def _release(self, arenas: list[_Arena]) -> None:
        """Unmap these and any earlier arena a view held on to; keep the ones still held."""
        pending, self._unreleased = self._unreleased + arenas, []
        for shared in pending:
            try:
                shared.release()
            except BufferError:  # a backend queue still holds a view: retried next time
                self._unreleased.append(shared)
