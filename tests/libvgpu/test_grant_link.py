"""libvgpu's choice of link (VGPU_LINK) and its refusals on the grant link, without Xen: a
scripted broker answers the program the way the zone agent's broker does when it cannot set a
channel up. The grant link's success path needs Xen: tests/xen/dom0/test_gpu_broker.py."""

import errno
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.daemons import GpuProxyDaemon
from idm.links.grant_fd import GrantFdRefusal
from tests.libvgpu.conftest import Programs, passed, run, zone_socket
from tests.xen.dom0_programs import ROUND_TRIP_1MIB


def values(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def fill(size: int, seed: int) -> bytes:
    """check.h's fill(): xorshift64 bytes."""
    x = (seed * 0x9E3779B97F4A7C15 + 1) & 0xFFFFFFFFFFFFFFFF
    out = bytearray(size)
    for i in range(size):
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        out[i] = x & 0xFF
    return bytes(out)


def round_trip_checksum(size: int) -> str:
    """What tests/libvgpu/c/round_trip.c prints for ``size`` bytes."""
    return f"{fnv1a(fill(size, 7)):016x}"


@pytest.fixture
def refusing_broker(tmp_path: Path) -> Iterator[Path]:
    """Answers every connection with the refusal the broker sends when gpu-proxy never attached."""
    path = tmp_path / "broker.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    refusal = GrantFdRefusal(code=errno.ETIMEDOUT, why="gpu-proxy did not attach gpu-0").encode()

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(refusal)

    thread = threading.Thread(target=serve)
    thread.start()
    yield path
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(10)


def test_the_grant_link_reports_the_brokers_reason_once(
    programs: Programs, refusing_broker: Path
) -> None:
    proc = run(programs["init_only"], socket=refusing_broker, env={"VGPU_LINK": "grant"})
    assert proc.returncode == 0, proc.stderr
    assert values(proc.stdout) == {
        "init": "CUDA_ERROR_NO_DEVICE",
        "count": "CUDA_ERROR_NOT_INITIALIZED",
        "retain": "CUDA_ERROR_NOT_INITIALIZED",
        "version": "CUDA_SUCCESS",
    }
    assert proc.stderr.splitlines() == [
        f"libvgpu: cannot reach gpu-proxy through the zone agent at {refusing_broker} (the zone "
        "agent could not set up the channel: gpu-proxy did not attach gpu-0): no GPU for this "
        "process"
    ]


def test_an_unknown_link_is_refused_once(programs: Programs, refusing_broker: Path) -> None:
    proc = run(programs["init_only"], socket=refusing_broker, env={"VGPU_LINK": "vchan"})
    assert proc.returncode == 0, proc.stderr
    assert values(proc.stdout)["init"] == "CUDA_ERROR_NO_DEVICE"
    assert values(proc.stdout)["count"] == "CUDA_ERROR_NOT_INITIALIZED"
    assert proc.stderr.splitlines() == [
        "libvgpu: VGPU_LINK=vchan is not a link this libvgpu knows (local, grant): no GPU for "
        "this process"
    ]


def test_the_round_trip_program_over_an_explicit_local_link(
    programs: Programs, proxy: GpuProxyDaemon
) -> None:
    """The program the Dom0 grant-link test runs, and the checksum that test expects."""
    proc = run(
        programs["round_trip"], socket=zone_socket(proxy, "memory"), env={"VGPU_LINK": "local"}
    )
    assert values(passed(proc))["checksum"] == ROUND_TRIP_1MIB == round_trip_checksum(1 << 20)
