"""Pinned host memory shared with gpu-proxy over LocalLink: libvgpu's cuMemAllocHost buffers are
copied to and from device memory by (arena, offset, length) alone, and a hostile process that
names ranges outside what it shared gets an error while gpu-proxy keeps serving it."""

import fcntl
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from gpu_proxy.registry import ZoneRegistry
from gpu_proxy.shared_host import SHARE_MAGIC, SHARE_MESSAGE
from idm.channel import Channel
from idm.gen.codec import CALLS_BY_NAME
from idm.links.local import LocalLink
from idm.wire import MAX_PAYLOAD, Flags
from tests.libvgpu.conftest import MiB, Programs, passed, run, sim_zone, zone_named

OK, INVALID_VALUE = 0, 1
PAGE = 4096


def pinned_mappings() -> list[str]:
    """This process's (gpu-proxy's) mappings of shared pinned memory."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return [line for line in maps if "vgpu-pinned" in line or "hostile-pinned" in line]


def wait_unmapped(timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pinned_mappings() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pinned_mappings() == []


def test_pinned_copies_travel_as_arena_offset_length(
    registry: ZoneRegistry, programs: Programs
) -> None:
    socket_path = sim_zone(registry, "pinned", 256 * MiB)
    out = passed(run(programs["pinned"], socket=socket_path))
    sizes = [int(m) for m in re.findall(r"^pinned (\d+) ", out, re.M)]
    assert sizes == [1, 4096, 65537, (4 << 20) + 5, (64 << 20) + 1]
    calls = zone_named(registry, "pinned").stats.snapshot().calls
    counted = {api: sum(n for (a, _), n in calls.items() if a == api) for api, _ in calls}
    # 5 round trips + the chain share 2 buffers each, + one for the flags check.
    assert counted["vgpuHostShare"] == counted["vgpuHostUnshare"] == 13
    assert counted["vgpuMemcpyHtoDSharedAsync"] == 6
    assert counted["vgpuMemcpyDtoHSharedAsync"] == 6
    assert counted["vgpuMemcpyHtoDShared"] == counted["vgpuMemcpyDtoHShared"] == 5
    # Only the program's own registered memory (2 MiB + 3 bytes, under one message's payload
    # limit) went through the channel as data.
    assert counted["cuMemcpyHtoDAsync_v2"] == counted["cuMemcpyDtoHAsync_v2"] == 1
    assert "cuMemcpyHtoD_v2" not in counted and "cuMemcpyDtoH_v2" not in counted
    wait_unmapped()


class HostileProcess:
    """A zone process speaking the call table itself, sharing memory as libvgpu does."""

    def __init__(self, socket_path: Path) -> None:
        self.link = LocalLink.connect(socket_path)
        self.channel: Channel = self.link.open_channel()
        self.channel.hello_client(MAX_PAYLOAD)
        self.seq = 0

    def call(self, name: str, *args: Any) -> tuple[int, Any]:
        codec = CALLS_BY_NAME[name]
        self.seq += 1
        flags = Flags.ASYNC if codec.is_async else 0
        self.channel.send(codec.opcode, codec.encode_request(*args), seq=self.seq, flags=flags)
        if codec.is_async:
            return OK, None
        reply = self.channel.recv(timeout_ms=20_000)
        assert reply is not None and reply.header.seq == self.seq
        status = reply.header.status
        decoded = codec.decode_reply(reply.payload) if status == OK and codec.decode_reply else None
        return status, decoded

    def share(self, arena: int, size: int, seals: int) -> int:
        fd = os.memfd_create("hostile-pinned", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        with socket.socket(fileno=os.dup(self.link.socket_fd)) as sock:
            socket.send_fds(sock, [SHARE_MESSAGE.pack(SHARE_MAGIC, 0, arena, size)], [fd])
        return fd


def test_a_hostile_process_cannot_reach_outside_what_it_shared(registry: ZoneRegistry) -> None:
    guest = HostileProcess(sim_zone(registry, "hostile", 64 * MiB))
    assert guest.call("cuInit", 0)[0] == OK
    status, alloc = guest.call("cuMemAlloc_v2", 4 * PAGE)
    assert status == OK
    dev = alloc.dptr
    sealed = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    fd = guest.share(1, 2 * PAGE, sealed)
    assert guest.call("vgpuHostShare", 1, 2 * PAGE)[0] == OK
    os.pwrite(fd, b"zone-owned bytes", 0)
    for arena, offset, length in [
        (1, PAGE, PAGE + 1),
        (1, 2**63, 2**63),
        (1, 2 * PAGE, 1),
        (2, 0, 1),
    ]:
        assert guest.call("vgpuMemcpyHtoDShared", dev, arena, offset, length)[0] == INVALID_VALUE
        assert guest.call("vgpuMemcpyDtoHShared", arena, offset, dev, length)[0] == INVALID_VALUE
    # Fire-and-forget: the error is the next synchronous call's, and that call does not run.
    guest.call("vgpuMemcpyDtoHSharedAsync", 1, 2 * PAGE - 8, dev, 16, 0)
    assert guest.call("cuCtxSynchronize")[0] == INVALID_VALUE
    # Memory that can shrink under gpu-proxy is refused.
    os.close(guest.share(3, PAGE, fcntl.F_SEAL_GROW))
    assert guest.call("vgpuHostShare", 3, PAGE)[0] == INVALID_VALUE
    # Still served, and the valid range works.
    assert guest.call("vgpuMemcpyHtoDShared", dev, 1, 0, 16)[0] == OK
    assert guest.call("vgpuMemcpyDtoHShared", 1, PAGE, dev, 16)[0] == OK
    assert os.pread(fd, 16, PAGE) == b"zone-owned bytes"
    assert pinned_mappings()  # gpu-proxy maps the arena while the channel is open
    guest.channel.close()
    os.close(fd)
    wait_unmapped()  # and unmaps it when the channel closes, without a vgpuHostUnshare
