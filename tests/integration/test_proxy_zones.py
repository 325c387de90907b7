"""gpu-proxy's core end to end on the sim backend: zones registered in a ZoneRegistry, guests
connecting over real LocalLink channels and speaking the generated call codec (as libvgpu does
in C), isolation between zones, quotas, deferred errors, and complete teardown."""

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gpu_proxy import errors
from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.registry import ZoneRegistry
from gpu_proxy.telemetry.events import EventKind
from gpu_proxy.telemetry.metrics import ProxyCollector
from gpu_proxy.telemetry.zone_stats import ZoneIdentity
from idm.channel import Channel, ChannelClosed
from idm.gen.codec import CALLS_BY_NAME
from idm.links.local import LocalLink
from idm.wire import MAX_PAYLOAD, Flags
from tests.nvcc import build_modules

MiB = 1 << 20
OK, INVALID_VALUE, OUT_OF_MEMORY, INVALID_HANDLE = 0, 1, 2, 400
KERNELS = """
extern "C" __global__ void add(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) c[i] = a[i] + b[i];
}
"""


class Guest:
    """One guest process's channel, speaking the call table like libvgpu."""

    def __init__(self, socket_path: Path) -> None:
        self.channel: Channel = LocalLink.connect(socket_path).open_channel()
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

    def ok(self, name: str, *args: Any) -> Any:
        status, reply = self.call(name, *args)
        assert status == OK, f"{name} returned {status}"
        return reply


def zone(name: str) -> ZoneIdentity:
    return ZoneIdentity(zone=name, domid=0, pod=f"pod-{name}", namespace="ml", gpu_index=0)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ZoneRegistry]:
    reg = ZoneRegistry(SimBackend(), tmp_path)
    yield reg
    reg.close()


@pytest.fixture(scope="module")
def cubin(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    builds = {"k.cubin": ["-cubin", "-arch=sm_90"]}
    return build_modules(KERNELS, builds, tmp_path_factory.mktemp("cubin"))["k.cubin"]


def test_memory_round_trips_in_every_direction(registry: ZoneRegistry) -> None:
    guest = Guest(registry.register(zone("zone-a"), 64 * MiB))
    guest.ok("cuInit", 0)
    assert guest.ok("cuMemGetInfo_v2").total == 64 * MiB
    a = guest.ok("cuMemAlloc_v2", MiB).dptr
    b = guest.ok("cuMemAlloc_v2", MiB).dptr
    data = os.urandom(MiB)
    guest.ok("cuMemcpyHtoD_v2", a, data, MiB)
    guest.ok("cuMemcpyDtoD_v2", b, a, MiB)
    assert bytes(guest.ok("cuMemcpyDtoH_v2", b, MiB).dstHost) == data
    guest.ok("cuMemsetD32_v2", b, 0xDEADBEEF, 4)
    assert (
        bytes(guest.ok("cuMemcpyDtoH_v2", b, 20).dstHost) == b"\xef\xbe\xad\xde" * 4 + data[16:20]
    )
    stream = guest.ok("cuStreamCreate", 0).phStream
    guest.ok("cuMemcpyHtoDAsync_v2", a, b"z" * 4096, 4096, stream)
    assert bytes(guest.ok("cuMemcpyDtoHAsync_v2", a, 4096, stream).dstHost) == b"z" * 4096


def test_quota_is_per_zone(registry: ZoneRegistry) -> None:
    a = Guest(registry.register(zone("zone-a"), 4 * MiB))
    b = Guest(registry.register(zone("zone-b"), 4 * MiB))
    a.ok("cuMemAlloc_v2", 3 * MiB)
    assert a.call("cuMemAlloc_v2", 2 * MiB)[0] == OUT_OF_MEMORY
    assert a.ok("cuMemGetInfo_v2").free == MiB
    b.ok("cuMemAlloc_v2", 3 * MiB)  # zone b's quota is untouched by zone a's
    assert b.ok("cuDeviceTotalMem_v2", 0).totalBytes == 4 * MiB


def test_a_zone_cannot_reach_another_zones_objects(registry: ZoneRegistry) -> None:
    a = Guest(registry.register(zone("zone-a"), 16 * MiB))
    b = Guest(registry.register(zone("zone-b"), 16 * MiB))
    ptr = a.ok("cuMemAlloc_v2", MiB).dptr
    a.ok("cuMemcpyHtoD_v2", ptr, b"secret", 6)
    stream = a.ok("cuStreamCreate", 0).phStream
    assert b.call("cuMemcpyDtoH_v2", ptr, 6)[0] == INVALID_VALUE
    assert b.call("cuMemFree_v2", ptr)[0] == INVALID_VALUE
    assert b.call("cuStreamSynchronize", stream)[0] == INVALID_HANDLE
    assert bytes(a.ok("cuMemcpyDtoH_v2", ptr, 6).dstHost) == b"secret"


def test_out_of_range_and_malformed_requests_cost_only_that_request(
    registry: ZoneRegistry,
) -> None:
    guest = Guest(registry.register(zone("zone-a"), 16 * MiB))
    ptr = guest.ok("cuMemAlloc_v2", 4096).dptr
    assert guest.call("cuMemcpyDtoH_v2", ptr + 4000, 200)[0] == INVALID_VALUE
    assert guest.call("cuMemsetD32_v2", ptr, 0, 1025)[0] == INVALID_VALUE
    guest.channel.send(CALLS_BY_NAME["cuMemAlloc_v2"].opcode, b"\x01\x02", seq=99)
    reply = guest.channel.recv(timeout_ms=10_000)
    assert reply is not None and reply.header.status == INVALID_VALUE
    guest.channel.send(0x7FFF, b"", seq=100)
    reply = guest.channel.recv(timeout_ms=10_000)
    # a CUresult, as every reply a zone gets: IDM's own UNKNOWN_OPCODE (3) would read as
    # CUDA_ERROR_NOT_INITIALIZED
    assert reply is not None and reply.header.status == errors.CUDA_ERROR_NOT_SUPPORTED
    assert guest.ok("cuMemGetInfo_v2").total == 16 * MiB


def test_large_host_to_device_copies_are_received_straight_into_place(
    registry: ZoneRegistry,
) -> None:
    """Copies past the batch size are streamed (head first, then the data straight into device
    memory): the bytes land in order, on the legacy stream and on another one, and a head that
    lies (a ByteCount that is not the data that follows, a range outside the allocation, an
    unknown stream) costs only that request, its data discarded."""
    guest = Guest(registry.register(zone("zone-a"), 64 * MiB))
    size = 3 * MiB + 5
    ptr = guest.ok("cuMemAlloc_v2", size).dptr
    stream = guest.ok("cuStreamCreate", 0).phStream
    data = bytes(i * 7 % 251 for i in range(size))
    guest.ok("cuMemcpyHtoD_v2", ptr, data, size)
    assert bytes(guest.ok("cuMemcpyDtoH_v2", ptr, size).dstHost) == data
    guest.call("cuMemcpyHtoDAsync_v2", ptr, data[::-1], size, stream)
    guest.ok("cuStreamSynchronize", stream)
    assert bytes(guest.ok("cuMemcpyDtoH_v2", ptr, size).dstHost) == data[::-1]

    opcode = CALLS_BY_NAME["cuMemcpyHtoD_v2"].opcode
    head = struct.Struct("<QQ")
    lies = [
        head.pack(ptr, size - 1) + data,  # ByteCount one short of the data
        head.pack(ptr + 4096, size) + data,  # runs past the allocation
    ]
    for seq, payload in enumerate(lies, start=500):
        guest.channel.send(opcode, payload, seq=seq)
        reply = guest.channel.recv(timeout_ms=10_000)
        assert reply is not None and reply.header.status == INVALID_VALUE
    guest.call("cuMemcpyHtoDAsync_v2", ptr, data, size, 0xBAD)
    assert guest.call("cuCtxSynchronize")[0] == INVALID_HANDLE
    assert bytes(guest.ok("cuMemcpyDtoH_v2", ptr, size).dstHost) == data[::-1]  # untouched


def test_fire_and_forget_errors_surface_at_the_next_sync_call(
    registry: ZoneRegistry, cubin: bytes
) -> None:
    guest = Guest(registry.register(zone("zone-a"), 16 * MiB))
    module = guest.ok("cuModuleLoadData", cubin, len(cubin)).module
    fn = guest.ok("cuModuleGetFunction", module, b"add").hfunc
    params = bytes(28)  # three pointers and an int, as .nv.info lays them out
    guest.call("cuLaunchKernel", fn, 1, 1, 1, 128, 1, 1, 0, 0, len(params), params)
    guest.ok("cuCtxSynchronize")
    guest.call("cuLaunchKernel", fn, 1, 1, 1, 128, 1, 1, 0, 0, 4, bytes(4))  # wrong size
    guest.call("cuLaunchKernel", 12345, 1, 1, 1, 1, 1, 1, 0, 0, 0, b"")  # unknown function
    assert guest.call("cuCtxSynchronize")[0] == INVALID_VALUE  # the first error wins
    guest.ok("cuCtxSynchronize")  # reported once


def test_removing_a_zone_reclaims_everything(registry: ZoneRegistry, cubin: bytes) -> None:
    guest = Guest(registry.register(zone("zone-a"), 16 * MiB))
    other = Guest(registry.register(zone("zone-b"), 16 * MiB))
    for _ in range(3):
        guest.ok("cuMemAlloc_v2", MiB)
    guest.ok("cuStreamCreate", 0)
    guest.ok("cuEventCreate", 0)
    module = guest.ok("cuModuleLoadData", cubin, len(cubin)).module
    guest.ok("cuModuleGetFunction", module, b"add")
    reclaimed = registry.remove("zone-a")
    assert reclaimed == {
        "device_memory": 3,
        "stream": 1,
        "event": 1,
        "module": 1,
        "function": 1,
    }
    assert registry.ledger.mem_info("zone-b")[1] == 16 * MiB
    with pytest.raises(ChannelClosed):
        guest.call("cuMemGetInfo_v2")
    assert other.ok("cuMemGetInfo_v2").total == 16 * MiB
    assert registry.remove("zone-a") == {}  # idempotent


def test_a_zone_registers_once(registry: ZoneRegistry) -> None:
    registry.register(zone("zone-a"), MiB)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(zone("zone-a"), MiB)


def test_telemetry_and_events_follow_the_zone(registry: ZoneRegistry) -> None:
    watch = registry.bus.subscribe(replay=True)
    guest = Guest(registry.register(zone("zone-a"), 2 * MiB))
    ptr = guest.ok("cuMemAlloc_v2", MiB).dptr
    guest.ok("cuMemcpyHtoD_v2", ptr, b"x" * 1000, 1000)
    assert guest.call("cuMemAlloc_v2", 2 * MiB)[0] == OUT_OF_MEMORY
    registry_metrics = CollectorRegistry()
    registry_metrics.register(ProxyCollector(lambda: list(registry.zones()), registry.proxy_stats))
    value = registry_metrics.get_sample_value
    labels = {"zone": "zone-a"}
    assert value("vgpu_device_memory_used_bytes", labels) == MiB
    assert value("vgpu_device_memory_limit_bytes", labels) == 2 * MiB
    assert value("vgpu_memcpy_bytes_total", {**labels, "direction": "htod"}) == 1000
    ok = {**labels, "api": "cuMemAlloc_v2", "result": "CUDA_SUCCESS"}
    oom = {**labels, "api": "cuMemAlloc_v2", "result": "CUDA_ERROR_OUT_OF_MEMORY"}
    assert value("vgpu_calls_total", ok) == 1 and value("vgpu_calls_total", oom) == 1
    registry.remove("zone-a")
    assert value("vgpu_device_memory_used_bytes", labels) is None  # series go with the zone
    assert value("vgpu_proxy_handles_reclaimed_total", {"kind": "device_memory"}) == 1
    kinds = []
    while (event := watch.get(timeout=0.5)) is not None:
        kinds.append(event.kind)
    for expected in (
        EventKind.ZONE_REGISTERED,
        EventKind.CHANNEL_OPENED,
        EventKind.QUOTA_EXCEEDED,
        EventKind.HANDLES_RECLAIMED,
        EventKind.ZONE_REMOVED,
    ):
        assert expected in kinds, (expected, kinds)


DYING_GUEST = """
import os, signal, sys
from idm.gen.codec import CALLS_BY_NAME
from idm.links.local import LocalLink
from idm.wire import MAX_PAYLOAD, pack_header
from tests.hostile_zone import publish_raw
link = LocalLink.connect(sys.argv[1])
ch = link.open_channel()
ch.hello_client(MAX_PAYLOAD)
alloc = CALLS_BY_NAME["cuMemAlloc_v2"]
ch.send(alloc.opcode, alloc.encode_request(8 << 20), seq=1)
ptr = alloc.decode_reply(ch.recv(timeout_ms=10000).payload).dptr
copy = CALLS_BY_NAME["cuMemcpyHtoD_v2"]
payload = copy.encode_request(ptr, b"x" * (8 << 20), 8 << 20)
# The header of an 8 MiB copy and its first 64 KiB, published; then the process dies mid-call.
publish_raw(link.memory, ch, pack_header(copy.opcode, len(payload), 2) + payload[: 64 << 10])
print("dying", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_zone_dying_mid_call_leaves_other_zones_running(registry: ZoneRegistry) -> None:
    other = Guest(registry.register(zone("zone-b"), 16 * MiB))
    path = registry.register(zone("zone-a"), 16 * MiB)
    dying = subprocess.run(
        [sys.executable, "-c", DYING_GUEST, str(path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dying.returncode == -9 and "dying" in dying.stdout, dying.stderr
    for _ in range(20):  # zone b is served while zone a's channel hangs mid-message
        assert other.ok("cuMemGetInfo_v2").total == 16 * MiB
    # zone a stays registered until the runtime removes it; removal ends the stuck channel
    t0 = time.monotonic()
    assert registry.remove("zone-a") == {"device_memory": 1}
    assert time.monotonic() - t0 < 5
    assert other.ok("cuMemGetInfo_v2").total == 16 * MiB


def test_ipc_sharing_is_refused(registry: ZoneRegistry) -> None:
    guest = Guest(registry.register(zone("zone-a"), 16 * MiB))
    ptr = guest.ok("cuMemAlloc_v2", MiB).dptr
    event = guest.ok("cuEventCreate", 0).phEvent
    not_permitted = 800
    assert guest.call("cuIpcGetMemHandle", ptr)[0] == not_permitted
    assert guest.call("cuIpcOpenMemHandle_v2", bytes(64), 1)[0] == not_permitted
    assert guest.call("cuIpcCloseMemHandle", ptr)[0] == not_permitted
    assert guest.call("cuIpcGetEventHandle", event)[0] == not_permitted
    assert guest.call("cuIpcOpenEventHandle", bytes(64))[0] == not_permitted
    assert guest.ok("cuMemGetInfo_v2").total == 16 * MiB


def test_a_zone_sees_exactly_one_device(registry: ZoneRegistry) -> None:
    guest = Guest(registry.register(zone("zone-a"), 16 * MiB))
    invalid_device = 101
    assert guest.ok("cuDeviceGetCount").deviceCount == 1
    assert guest.ok("cuDeviceGet", 0).device == 0
    assert guest.call("cuDeviceGet", 1)[0] == invalid_device
    assert guest.call("cuDeviceGetAttribute", 1, 1)[0] == invalid_device  # (attrib, dev)
    assert b"(vgpu sim)" in bytes(guest.ok("cuDeviceGetName", 256, 0).name)
