"""Pinned host memory a guest process shares with gpu-proxy (LocalLink channels only).

libvgpu backs each pinned allocation (cuMemHostAlloc) with a memfd sealed against shrinking and
growing, and passes it over its LocalLink's unix socket (SCM_RIGHTS) just before the
``vgpuHostShare`` call that names it. gpu-proxy validates it as ``idm_local_accept`` validates the
ring (seals, exact size) and maps it for that channel only; copies then name (arena, offset,
length) and move bytes straight between those pages and device memory. Every range is checked
against the arena it names, so a hostile process can neither read nor write outside memory it
shared itself; the seals mean its pages can never vanish under gpu-proxy (no SIGBUS).
"""

import array
import contextlib
import fcntl
import mmap
import os
import socket
import struct

import structlog

from gpu_proxy.errors import InvalidValue, NotSupported

log = structlog.get_logger(__name__)

# The message that carries the fd: magic "VPIN", reserved, arena id, size (little-endian).
SHARE_MESSAGE = struct.Struct("<IIQQ")
SHARE_MAGIC = 0x4E495056
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
# Arenas one process may have shared at once: each holds an fd's worth of mapping.
MAX_ARENAS = 4096
# At most this many fds are taken from one message; extras are closed.
_MAX_FDS = 8
_FD = array.array("i")


class SharedHostMemory:
    """One channel's shared arenas: arena id -> the mapping of the process's memfd."""

    def __init__(self, socket_fd: int | None) -> None:
        self._socket_fd = socket_fd
        self._arenas: dict[int, mmap.mmap] = {}

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
        self._arenas[arena] = mapping
        log.debug("host memory shared", arena=arena, size=size)

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
        if arena in self._arenas:
            raise InvalidValue(f"arena {arena} is already shared")
        if len(self._arenas) >= MAX_ARENAS:
            raise InvalidValue(f"a process shares at most {MAX_ARENAS} arenas")
        if size <= 0:
            raise InvalidValue("a shared arena must not be empty")
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
        mapping = self._arenas.get(arena)
        if mapping is None:
            raise InvalidValue(f"arena {arena} is not shared on this channel")
        if offset < 0 or length <= 0 or offset > len(mapping) or length > len(mapping) - offset:
            raise InvalidValue(
                f"range [{offset}, +{length}) is outside arena {arena} of {len(mapping)} bytes"
            )
        return memoryview(mapping)[offset : offset + length]

    def unshare(self, arena: int) -> None:
        mapping = self._arenas.pop(arena, None)
        if mapping is None:
            raise InvalidValue(f"arena {arena} is not shared on this channel")
        _unmap(mapping)

    def close(self) -> None:
        """The channel is gone: unmap everything it shared."""
        arenas, self._arenas = self._arenas, {}
        for mapping in arenas.values():
            _unmap(mapping)


def _unmap(mapping: mmap.mmap) -> None:
    # A view still held by a backend queue keeps the mapping alive until it is collected.
    with contextlib.suppress(BufferError):
        mapping.close()
