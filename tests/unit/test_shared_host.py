"""Pinned host memory shared by a zone process (gpu_proxy/shared_host.py): what gpu-proxy accepts
as shared memory, and that no (arena, offset, length) reaches outside what the process shared."""

import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_proxy.dispatch import HANDLERS
from gpu_proxy.errors import InvalidValue, NotSupported
from gpu_proxy.shared_host import SHARE_MAGIC, SHARE_MESSAGE, SharedHostMemory
from gpu_proxy.zone import Caller
from idm.gen import codec as c
from tests.unit.proxy_zone import sim_caller

PAGE = 4096
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def memfd(size: int, seals: int = SEALS) -> int:
    fd = os.memfd_create("test-pinned", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class Zone:
    """The process's end of the socket and gpu-proxy's SharedHostMemory on the other end."""

    def __init__(self) -> None:
        self.proc, host = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.host = host
        self.shared = SharedHostMemory(host.fileno())

    def offer(self, arena: int, size: int, fds: list[int], magic: int = SHARE_MAGIC) -> None:
        socket.send_fds(self.proc, [SHARE_MESSAGE.pack(magic, 0, arena, size)], fds)

    def share(self, arena: int, size: int) -> int:
        """Share a fresh sealed memfd of ``size`` bytes as ``arena``; returns the process's fd."""
        fd = memfd(size)
        self.offer(arena, size, [fd])
        self.shared.share(arena, size)
        return fd

    def close(self) -> None:
        self.shared.close()
        self.proc.close()
        self.host.close()


@pytest.fixture
def zone() -> Iterator[Zone]:
    z = Zone()
    yield z
    z.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_shared_pages_are_the_processes_pages(zone: Zone) -> None:
    fd = zone.share(7, 2 * PAGE)
    os.pwrite(fd, b"hello", PAGE)
    assert bytes(zone.shared.view(7, PAGE, 5)) == b"hello"
    zone.shared.view(7, 0, 3)[:] = b"abc"
    assert os.pread(fd, 3, 0) == b"abc"
    os.close(fd)


@pytest.mark.parametrize(
    ("arena", "offset", "length"),
    [
        (7, 0, 2 * PAGE + 1),  # one byte past the end
        (7, 2 * PAGE, 1),  # starts at the end
        (7, PAGE, PAGE + 1),  # ends one past
        (7, 2**64 - 1, 2),  # offset + length wraps in 64 bits
        (7, 1, 2**64 - 1),
        (7, 0, 0),  # empty
        (8, 0, 1),  # an arena never shared
    ],
)
def test_ranges_outside_the_arena_are_refused(
    zone: Zone, arena: int, offset: int, length: int
) -> None:
    os.close(zone.share(7, 2 * PAGE))
    with pytest.raises(InvalidValue):
        zone.shared.view(arena, offset, length)


def test_memory_that_is_not_a_sealed_memfd_of_the_announced_size_is_refused(zone: Zone) -> None:
    before = open_fds()
    cases = {
        "unsealed": memfd(PAGE, seals=0),
        "only shrink sealed": memfd(PAGE, seals=fcntl.F_SEAL_SHRINK),
        "write sealed (cannot be mapped writable)": memfd(PAGE, seals=SEALS | fcntl.F_SEAL_WRITE),
        "bigger than announced": memfd(2 * PAGE),
    }
    with tempfile.TemporaryFile() as regular:
        regular.truncate(PAGE)
        cases["a regular file"] = os.dup(regular.fileno())
        for arena, (what, fd) in enumerate(cases.items(), start=1):
            zone.offer(arena, PAGE, [fd])
            with pytest.raises(InvalidValue):
                zone.shared.share(arena, PAGE)
            os.close(fd)
            assert len(zone.shared) == 0, what
    assert open_fds() == before  # every fd gpu-proxy received was closed


def test_messages_that_do_not_match_the_call_are_refused(zone: Zone) -> None:
    with pytest.raises(InvalidValue):  # nothing sent
        zone.shared.share(1, PAGE)
    fd, other = memfd(PAGE), memfd(PAGE)
    zone.offer(1, PAGE, [fd, other])  # two fds
    with pytest.raises(InvalidValue):
        zone.shared.share(1, PAGE)
    zone.offer(2, PAGE, [fd])  # names arena 2, the call arena 3
    with pytest.raises(InvalidValue):
        zone.shared.share(3, PAGE)
    zone.offer(4, PAGE, [fd], magic=0x1234)
    with pytest.raises(InvalidValue):
        zone.shared.share(4, PAGE)
    zone.offer(5, PAGE, [])  # no fd at all
    with pytest.raises(InvalidValue):
        zone.shared.share(5, PAGE)
    zone.offer(6, PAGE, [fd])
    zone.shared.share(6, PAGE)
    zone.offer(6, PAGE, [fd])  # the same arena again
    with pytest.raises(InvalidValue):
        zone.shared.share(6, PAGE)
    assert len(zone.shared) == 1
    os.close(fd)
    os.close(other)


def test_unshare_and_close_unmap(zone: Zone) -> None:
    os.close(zone.share(1, PAGE))
    os.close(zone.share(2, PAGE))
    zone.shared.unshare(1)
    with pytest.raises(InvalidValue):
        zone.shared.view(1, 0, 1)
    with pytest.raises(InvalidValue):
        zone.shared.unshare(1)
    zone.shared.close()
    with pytest.raises(InvalidValue):
        zone.shared.view(2, 0, 1)
    assert "test-pinned" not in Path("/proc/self/maps").read_text()


def test_a_channel_without_a_socket_cannot_share() -> None:
    with pytest.raises(NotSupported):
        SharedHostMemory(None).share(1, PAGE)


def test_copies_go_straight_between_the_arena_and_device_memory(zone: Zone) -> None:
    with sim_caller(1 << 20) as base:
        caller = Caller(base.zone, shared=zone.shared)
        fd = zone.share(3, 4 * PAGE)
        data = os.urandom(PAGE)
        os.pwrite(fd, data, PAGE)
        dev = HANDLERS.cuMemAlloc_v2(caller, c.cuMemAlloc_v2_Request(2 * PAGE))
        assert isinstance(dev, c.cuMemAlloc_v2_Reply)
        stream = HANDLERS.cuStreamCreate(caller, c.cuStreamCreate_Request(0))
        assert isinstance(stream, c.cuStreamCreate_Reply)
        htod = c.vgpuMemcpyHtoDSharedAsync_Request(dev.dptr, 3, PAGE, PAGE, stream.phStream)
        assert HANDLERS.vgpuMemcpyHtoDSharedAsync(caller, htod) == 0
        dtoh = c.vgpuMemcpyDtoHShared_Request(3, 3 * PAGE, dev.dptr, PAGE)
        assert HANDLERS.vgpuMemcpyDtoHShared(caller, dtoh) == 0
        assert os.pread(fd, PAGE, 3 * PAGE) == data
        # Device range checked as for every copy, and the host range against the arena.
        with pytest.raises(InvalidValue):
            HANDLERS.vgpuMemcpyHtoDShared(
                caller, c.vgpuMemcpyHtoDShared_Request(dev.dptr + PAGE, 3, 0, PAGE + 1)
            )
        with pytest.raises(InvalidValue):
            HANDLERS.vgpuMemcpyDtoHShared(
                caller, c.vgpuMemcpyDtoHShared_Request(3, 3 * PAGE + 1, dev.dptr, PAGE)
            )
        assert os.pread(fd, PAGE, 3 * PAGE) == data  # nothing was written by the refused copy
        assert HANDLERS.vgpuHostUnshare(caller, c.vgpuHostUnshare_Request(3)) == 0
        os.close(fd)
