"""LocalLink across real processes and a real unix socket, including hostile offers."""

import array
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from idm._ring import lib
from idm.channel import ChannelError, RingLayout
from idm.links.local import LocalLink, LocalListener
from idm.server import ChannelServer
from idm.wire import Op

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[LocalListener]:
    lst = LocalListener(tmp_path / "host.sock")
    yield lst
    lst.close()


def serve_one(
    listener: LocalListener, stall_timeout_ms: int = 10_000
) -> tuple[threading.Thread, list[ChannelServer]]:
    servers: list[ChannelServer] = []

    def run() -> None:
        link = listener.accept()
        channel = link.open_channel(stall_timeout_ms=stall_timeout_ms)
        server = ChannelServer(channel, {}, max_payload=1 << 20, peer_alive=link.peer_alive)
        servers.append(server)
        server.serve()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, servers


def test_zone_and_host_talk(listener: LocalListener) -> None:
    t, servers = serve_one(listener)
    ch = LocalLink.connect(listener.path, RingLayout(req_order=14, rsp_order=14)).open_channel()
    assert ch.hello_client(8 << 20) == 1 << 20
    ch.send(Op.NULL, b"ping", seq=3)
    reply = ch.recv(timeout_ms=2000)
    assert reply is not None and reply.header.seq == 3 and bytes(reply.payload) == b"ping"
    ch.close()
    t.join(5)
    assert servers[0].close_reason == "closed"


def test_peer_credentials_come_from_the_kernel(listener: LocalListener) -> None:
    links: list[LocalLink] = []
    t = threading.Thread(target=lambda: links.append(listener.accept()), daemon=True)
    t.start()
    zone = LocalLink.connect(listener.path)
    t.join(5)
    assert links[0].peer_credentials() == (os.getpid(), os.getuid(), os.getgid())
    assert links[0].layout == RingLayout()
    links[0].close()
    zone.close()


def offer_bytes(magic: int = lib.IDM_LOCAL_MAGIC, orders: tuple[int, int] = (12, 12)) -> bytes:
    return struct.pack("<4I", magic, lib.IDM_LAYOUT_VERSION, *orders)


def sealed_memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def eventfds(n: int = 4) -> list[int]:
    return [os.eventfd(0) for _ in range(n)]


REGION_12_12 = 4096 * 3


def refused_reason(listener: LocalListener, payload: bytes, fds: list[int]) -> str:
    result: list[BaseException] = []

    def accept() -> None:
        try:
            listener.accept()
        except ChannelError as exc:
            result.append(exc)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(listener.path))
        s.sendmsg(
            [payload],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [],
        )
        answer = s.recv(128)
    t.join(15)
    for fd in fds:
        os.close(fd)
    status = struct.unpack_from("<i", answer)[0]
    assert status < 0, "the host must answer a refusal with a negative status"
    assert result, "the host must refuse the offer"
    return str(result[0])


@pytest.mark.parametrize(
    ("make_offer", "reason"),
    [
        (lambda: (offer_bytes(), [sealed_memfd(REGION_12_12)]), "exactly 5 fds"),
        (lambda: (offer_bytes(), [sealed_memfd(REGION_12_12, seal=False), *eventfds()]), "sealed"),
        (lambda: (offer_bytes(), [sealed_memfd(REGION_12_12 - 4096), *eventfds()]), "size"),
        (
            lambda: (offer_bytes(orders=(12, 30)), [sealed_memfd(REGION_12_12), *eventfds()]),
            "orders",
        ),
        (
            lambda: (offer_bytes(magic=0x41414141), [sealed_memfd(REGION_12_12), *eventfds()]),
            "magic",
        ),
        (lambda: (offer_bytes()[:7], [sealed_memfd(REGION_12_12), *eventfds()]), "truncated"),
        (
            lambda: (
                offer_bytes(),
                [sealed_memfd(REGION_12_12), *eventfds(3), os.open("/dev/null", os.O_RDONLY)],
            ),
            "not an eventfd",
        ),
        (
            lambda: (offer_bytes(), [os.open("/dev/zero", os.O_RDWR), *eventfds()]),
            "sealed",
        ),
    ],
)
def test_hostile_offers_are_refused_and_the_listener_survives(
    listener: LocalListener, make_offer: object, reason: str
) -> None:
    payload, fds = make_offer()  # type: ignore[operator]
    assert reason in refused_reason(listener, payload, fds)
    test_zone_and_host_talk(listener)


ZONE_SCRIPT = """
import os, signal, sys
from idm.links.local import LocalLink
from idm.wire import pack_header
from tests.hostile_zone import publish_raw
link = LocalLink.connect(sys.argv[1])
ch = link.open_channel()
ch.hello_client(1 << 20)
if sys.argv[2] == "mid-message":
    # A header promising 300000 bytes (more than a batch holds, so it streams), 100 of them
    # published; then the zone dies.
    publish_raw(link.memory, ch, pack_header(1, 300000, 5) + b"x" * 100)
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["idle", "mid-message"])
def test_zone_process_killed_is_noticed(listener: LocalListener, when: str) -> None:
    t, servers = serve_one(listener, stall_timeout_ms=500)
    zone = subprocess.run(
        [sys.executable, "-c", ZONE_SCRIPT, str(listener.path), when],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert zone.returncode == -signal.SIGKILL, zone.stderr
    t0 = time.monotonic()
    t.join(15)
    assert not t.is_alive(), "the host must notice the dead zone"
    assert time.monotonic() - t0 < 15
    expected = "stalled" if when == "mid-message" else "peer process gone"
    assert expected in (servers[0].close_reason or "")
    # The host keeps serving new zones.
    test_zone_and_host_talk(listener)
