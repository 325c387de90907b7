"""ZoneControl over a real gRPC unix socket: the runtime's way to create and remove zones."""

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.control import ZoneControlService, serve_control
from gpu_proxy.proto.gen import control_pb2 as pb
from gpu_proxy.proto.gen import control_pb2_grpc
from gpu_proxy.registry import ZoneRegistry
from idm.gen.codec import CALLS_BY_NAME
from idm.links.local import LocalLink
from idm.wire import MAX_PAYLOAD

MiB = 1 << 20


@pytest.fixture
def control(tmp_path: Path) -> Iterator[control_pb2_grpc.ZoneControlStub]:
    registry = ZoneRegistry(SimBackend(), tmp_path / "zones")
    (tmp_path / "zones").mkdir()
    address = f"unix://{tmp_path / 'control.sock'}"
    server = serve_control(ZoneControlService(registry, 8 * MiB, 0), address)
    with grpc.insecure_channel(address) as channel:
        yield control_pb2_grpc.ZoneControlStub(channel)
    server.stop(5).wait()
    registry.close()


def register(
    stub: control_pb2_grpc.ZoneControlStub, zone: str, limit: int = 0
) -> pb.RegisterZoneReply:
    request = pb.RegisterZoneRequest(
        identity=pb.ZoneIdentity(zone=zone, domid=3, pod="trainer", namespace="ml"),
        memory_limit_bytes=limit,
    )
    reply: pb.RegisterZoneReply = stub.Register(request, timeout=10)
    return reply


def test_register_use_list_remove(control: control_pb2_grpc.ZoneControlStub) -> None:
    reply = register(control, "pod-a", 4 * MiB)
    assert reply.memory_limit_bytes == 4 * MiB and reply.socket_path.endswith("pod-a.sock")
    assert register(control, "pod-b").memory_limit_bytes == 8 * MiB  # the default
    channel = LocalLink.connect(reply.socket_path).open_channel()
    channel.hello_client(MAX_PAYLOAD)
    alloc = CALLS_BY_NAME["cuMemAlloc_v2"]
    channel.send(alloc.opcode, alloc.encode_request(MiB), seq=1)
    answer = channel.recv(timeout_ms=10_000)
    assert answer is not None and answer.header.status == 0
    zones = {z.identity.zone: z for z in control.List(pb.ListZonesRequest(), timeout=10).zones}
    assert set(zones) == {"pod-a", "pod-b"}
    assert zones["pod-a"].memory_used_bytes == MiB
    assert zones["pod-a"].identity.pod == "trainer" and zones["pod-a"].identity.domid == 3
    removed = control.Remove(pb.RemoveZoneRequest(zone="pod-a"), timeout=10)
    assert dict(removed.reclaimed) == {"device_memory": 1}
    assert dict(control.Remove(pb.RemoveZoneRequest(zone="pod-a"), timeout=10).reclaimed) == {}
    names = [z.identity.zone for z in control.List(pb.ListZonesRequest(), timeout=10).zones]
    assert names == ["pod-b"]


@pytest.mark.parametrize(
    ("zone", "code", "text"),
    [
        ("../../etc/x", grpc.StatusCode.INVALID_ARGUMENT, "must be 1-64"),
        ("", grpc.StatusCode.INVALID_ARGUMENT, "must be 1-64"),
        ("dup", grpc.StatusCode.ALREADY_EXISTS, "already registered"),
    ],
)
def test_bad_registrations_get_clear_grpc_errors(
    control: control_pb2_grpc.ZoneControlStub, zone: str, code: grpc.StatusCode, text: str
) -> None:
    register(control, "dup")
    with pytest.raises(grpc.RpcError) as err:
        register(control, zone)
    assert err.value.code() == code and text in (err.value.details() or "")
