"""The per-channel serving loop: dispatch, replies, errors, and what a zone cannot do to it."""

import threading
from collections.abc import Callable, Iterator

import pytest

from idm.channel import Channel, PayloadReader
from idm.server import ChannelServer, FailureStatuses, Reply
from idm.wire import Flags, Header, Op, Status
from tests.conftest import Pair

MakePair = Callable[..., Pair]


def start(server: ChannelServer) -> threading.Thread:
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    return t


def call(zone: Channel, opcode: int, payload: bytes, seq: int) -> tuple[int, bytes]:
    zone.send(opcode, payload, seq=seq)
    reply = zone.recv(timeout_ms=2000)
    assert reply is not None and reply.header.is_reply and reply.header.seq == seq
    return reply.header.status, bytes(reply.payload)


Served = tuple[Channel, ChannelServer, list[tuple[int, bytes]]]


@pytest.fixture
def served(make_pair: MakePair) -> Iterator[Served]:
    _, zone, host = make_pair()
    seen: list[tuple[int, bytes]] = []

    def double(header: Header, payload: memoryview) -> Reply:
        seen.append((header.opcode, bytes(payload)))
        return Reply(0, bytes(payload) * 2)

    def record(header: Header, payload: memoryview) -> None:
        seen.append((header.opcode, bytes(payload)))

    def broken(header: Header, payload: memoryview) -> Reply:
        raise RuntimeError("handler bug")

    server = ChannelServer(host, {100: double, 101: record, 102: broken}, max_payload=1 << 20)
    thread = start(server)
    zone.hello_client(1 << 20)
    yield zone, server, seen
    server.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_sync_call_gets_its_handlers_reply(served: Served) -> None:
    zone, _, seen = served
    assert call(zone, 100, b"ab", 1) == (0, b"abab")
    assert seen == [(100, b"ab")]


def test_fire_and_forget_runs_in_order_without_reply(
    served: Served,
) -> None:
    zone, _, seen = served
    for i in range(5):
        zone.send(101, bytes([i]), seq=10 + i, flags=Flags.ASYNC)
    assert call(zone, Op.NULL, b"sync", 20) == (Status.OK, b"sync")
    assert seen == [(101, bytes([i])) for i in range(5)]


def test_unknown_opcode_gets_an_error_reply_and_the_channel_lives(
    served: Served,
) -> None:
    zone, _, _ = served
    assert call(zone, 999, b"", 1)[0] == Status.UNKNOWN_OPCODE
    zone.send(998, b"", seq=2, flags=Flags.ASYNC)
    assert call(zone, 100, b"ok", 3) == (0, b"okok")


def test_failure_statuses_can_be_mapped_to_the_channel_s_status_space(
    make_pair: MakePair,
) -> None:
    _, zone, host = make_pair()

    def broken(header: Header, payload: memoryview) -> Reply:
        raise RuntimeError("handler bug")

    server = ChannelServer(
        host, {5000: broken}, max_payload=1 << 20, failures=FailureStatuses(801, 999)
    )
    thread = start(server)
    zone.hello_client(1 << 20)
    assert call(zone, 4999, b"", 1)[0] == 801
    assert call(zone, 5000, b"", 2)[0] == 999
    assert call(zone, Op.NULL, b"alive", 3) == (Status.OK, b"alive")
    server.stop()
    thread.join(5)


def test_handler_exception_costs_only_that_request(
    served: Served,
) -> None:
    zone, _, _ = served
    assert call(zone, 102, b"", 1)[0] == Status.BAD_REQUEST
    assert call(zone, 100, b"x", 2) == (0, b"xx")


def test_zone_sending_a_reply_is_disconnected(make_pair: MakePair) -> None:
    _, zone, host = make_pair()
    server = ChannelServer(host, {}, max_payload=1 << 20)
    thread = start(server)
    zone.hello_client(1 << 20)
    zone.send(100, b"", seq=1, flags=Flags.REPLY)
    thread.join(5)
    assert not thread.is_alive()
    assert "reply" in (server.close_reason or "")


def test_first_message_must_be_hello(make_pair: MakePair) -> None:
    _, zone, host = make_pair()
    server = ChannelServer(host, {}, max_payload=1 << 20)
    thread = start(server)
    zone.send(100, b"", seq=1)
    thread.join(5)
    assert not thread.is_alive() and server.close_reason is not None


def test_zone_that_never_reads_its_replies_is_cut_off(make_pair: MakePair) -> None:
    _, zone, host = make_pair(rsp_order=12, stall_timeout_ms=200)
    server = ChannelServer(host, {}, max_payload=1 << 20)
    thread = start(server)
    zone.hello_client(1 << 20)
    for seq in range(1, 20):  # 19 KiB of replies for a 4 KiB response ring
        zone.send(Op.NULL, b"r" * 1024, seq=seq)
    thread.join(10)
    assert not thread.is_alive()
    assert "left its response ring full for 200 ms" in (server.close_reason or "")


def test_streamed_handlers_take_large_payloads_in_pieces(make_pair: MakePair) -> None:
    """A large message of a streamed opcode reaches its handler unread: it takes what it wants
    in pieces (here the first 8 bytes, then every other 64 KiB slice); the server discards the
    rest, so the channel stays in step. A small message of the same opcode and a handler that
    raises cost nothing more. Other large messages arrive whole as before."""
    _, zone, host = make_pair()
    taken: list[bytes] = []

    def pieces(header: Header, reader: PayloadReader) -> Reply:
        head = bytearray(8)
        reader.read_into(head)
        chunk = bytearray(64 << 10)
        while reader.remaining >= 2 * len(chunk):
            reader.read_into(chunk)
            taken.append(bytes(chunk))
            reader.read_into(chunk)  # skipped
        return Reply(0, bytes(head) + reader.remaining.to_bytes(8, "little"))

    def broken(header: Header, reader: PayloadReader) -> Reply:
        reader.read_into(bytearray(3))
        raise RuntimeError("handler bug")

    def whole(header: Header, payload: memoryview) -> Reply:
        return Reply(0, len(payload).to_bytes(8, "little") + bytes(payload[-4:]))

    server = ChannelServer(
        host,
        {100: whole, 101: whole},
        max_payload=4 << 20,
        streamed={100: pieces, 102: broken},
    )
    thread = start(server)
    zone.hello_client(4 << 20)
    big = b"headhead" + b"".join(bytes([i]) * (64 << 10) for i in range(40)) + b"tail"
    assert call(zone, 100, big, 1) == (0, b"headhead" + (4).to_bytes(8, "little"))
    assert taken == [bytes([i]) * (64 << 10) for i in range(0, 40, 2)]
    assert call(zone, 100, b"small", 2) == (0, (5).to_bytes(8, "little") + b"mall")
    assert call(zone, 101, big, 3) == (0, len(big).to_bytes(8, "little") + b"tail")
    assert call(zone, 102, big, 4)[0] == Status.BAD_REQUEST
    assert call(zone, Op.NULL, b"alive", 5) == (Status.OK, b"alive")
    server.stop()
    thread.join(5)
