"""The ring and channel over real shared memory and eventfds (both ends in this process)."""

import errno
import os
import struct
import threading
import time
from collections.abc import Callable

import pytest

from idm._ring import lib
from idm.channel import Channel, ChannelClosed, ChannelError, PeerViolation
from idm.wire import HEADER, HELLO, MAGIC, TABLE_DIGEST, Flags, Op, pack_header
from tests.conftest import Pair

MakePair = Callable[..., Pair]


def run_in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("size", [0, 1, 31, 32, 4063, 4064, 4096, 3 * 4096 + 7, 1 << 20])
def test_messages_of_any_size_arrive_intact(make_pair: MakePair, size: int) -> None:
    """A 4 KiB ring carries messages far larger than itself by streaming them."""
    _, zone, host = make_pair(req_order=12, rsp_order=12)
    payload = os.urandom(size)
    t = run_in_thread(lambda: zone.send(40, payload, seq=9, timeout_ms=5000))
    msg = host.recv(timeout_ms=5000)
    t.join()
    assert msg is not None
    assert (msg.header.opcode, msg.header.seq, msg.header.length) == (40, 9, size)
    assert bytes(msg.payload) == payload


def test_wraparound_keeps_order_and_content(make_pair: MakePair) -> None:
    _, zone, host = make_pair(req_order=12, rsp_order=12)
    sizes = [(i * 397) % 1500 for i in range(300)]
    payloads = [os.urandom(n) for n in sizes]

    def produce() -> None:
        for i, p in enumerate(payloads):
            zone.send(50, p, seq=i, timeout_ms=5000)

    t = run_in_thread(produce)
    got: list[tuple[int, bytes]] = []
    while len(got) < len(payloads):
        got += [(h.seq, bytes(p)) for h, p in host.recv_batch(timeout_ms=5000)]
    t.join()
    assert got == list(enumerate(payloads))


def test_batch_drains_many_messages_in_one_call(make_pair: MakePair) -> None:
    _, zone, host = make_pair()
    for i in range(100):
        zone.send(60, struct.pack("<I", i), seq=i)
    batch = [(h.seq, bytes(p)) for h, p in host.recv_batch(timeout_ms=1000)]
    assert batch == [(i, struct.pack("<I", i)) for i in range(100)]


def test_message_larger_than_batch_buffer_goes_through_batch_api(make_pair: MakePair) -> None:
    _, zone, host = make_pair(req_order=20)
    big = os.urandom(600 * 1024)
    zone.send(61, b"small", seq=1)
    t = run_in_thread(lambda: zone.send(62, big, seq=2, timeout_ms=5000))
    first = [(h.seq, bytes(p)) for h, p in host.recv_batch(timeout_ms=1000)]
    second = [(h.seq, bytes(p)) for h, p in host.recv_batch(timeout_ms=5000)]
    t.join()
    assert first == [(1, b"small")]
    assert second == [(2, big)]


def test_batch_returns_private_copies(make_pair: MakePair) -> None:
    """Rewriting the ring after a receive must not change what the host already holds."""
    region, zone, host = make_pair()
    zone.send(63, b"A" * 64, seq=1)
    [(header, payload)] = list(host.recv_batch(timeout_ms=1000))
    start = region.req_offset
    region.raw[start : start + 96] = b"\xff" * 96
    assert header.magic == MAGIC
    assert bytes(payload) == b"A" * 64


def test_no_doorbell_while_the_consumer_is_awake(make_pair: MakePair) -> None:
    _, zone, host = make_pair()
    for i in range(1000):
        zone.send(64, b"x", seq=i)
    assert zone.stats["notifies_sent"] == 0
    received = 0
    while received < 1000:
        received += sum(1 for _ in host.recv_batch(timeout_ms=1000))
    assert received == 1000


def test_sleeping_consumer_is_woken_once(make_pair: MakePair) -> None:
    _, zone, host = make_pair(spin_ns=0)
    got: list[int] = []
    t = run_in_thread(lambda: got.extend(h.seq for h, _ in host.recv_batch(timeout_ms=5000)))
    deadline = time.monotonic() + 5
    while host.stats["sleeps"] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    zone.send(65, b"wake", seq=7)
    t.join(5)
    assert got == [7]
    assert zone.stats["notifies_sent"] == 1
    assert host.stats["sleeps"] >= 1


def test_receive_times_out_cleanly(make_pair: MakePair) -> None:
    _, zone, host = make_pair()
    t0 = time.monotonic()
    assert host.recv(timeout_ms=50) is None
    assert list(host.recv_batch(timeout_ms=50)) == []
    assert time.monotonic() - t0 < 2
    zone.send(66, b"still fine", seq=1)
    msg = host.recv(timeout_ms=1000)
    assert msg is not None and bytes(msg.payload) == b"still fine"


def test_full_ring_send_times_out_without_breaking(make_pair: MakePair) -> None:
    _, zone, host = make_pair(req_order=12)
    zone.send(67, b"f" * (4096 - HEADER.size), seq=1)
    with pytest.raises(ChannelError) as exc:
        zone.send(67, b"more", seq=2, timeout_ms=50)
    assert exc.value.code == errno.ETIMEDOUT
    assert zone.broken_reason is None
    assert host.recv(timeout_ms=1000) is not None
    zone.send(67, b"more", seq=2, timeout_ms=1000)
    msg = host.recv(timeout_ms=1000)
    assert msg is not None and msg.header.seq == 2


def test_send_cut_mid_message_breaks_the_channel(make_pair: MakePair) -> None:
    _, zone, _host = make_pair(req_order=12)
    with pytest.raises(PeerViolation, match="send timed out after"):
        zone.send(68, b"z" * 20000, seq=1, timeout_ms=50)
    with pytest.raises(PeerViolation):
        zone.send(68, b"", seq=2)


def blocked_receiver(channel: Channel) -> tuple[threading.Thread, list[ChannelClosed]]:
    """A thread asleep in a long receive; it records the ChannelClosed that ends it."""
    closed: list[ChannelClosed] = []

    def wait() -> None:
        try:
            channel.recv(timeout_ms=10_000)
        except ChannelClosed as exc:
            closed.append(exc)

    t = run_in_thread(wait)
    time.sleep(0.05)
    return t, closed


@pytest.mark.parametrize("closer", ["zone", "host"])
def test_shutdown_by_either_side_ends_a_blocked_receive(make_pair: MakePair, closer: str) -> None:
    _, zone, host = make_pair(spin_ns=0)
    t, closed = blocked_receiver(host)
    t0 = time.monotonic()
    (zone if closer == "zone" else host).shutdown()
    t.join(5)
    assert not t.is_alive() and len(closed) == 1
    assert time.monotonic() - t0 < 2


def test_data_sent_before_close_is_still_delivered(make_pair: MakePair) -> None:
    _, zone, host = make_pair()
    zone.send(69, b"last words", seq=1)
    zone.shutdown()
    msg = host.recv(timeout_ms=1000)
    assert msg is not None and bytes(msg.payload) == b"last words"
    with pytest.raises(ChannelClosed):
        host.recv(timeout_ms=1000)


def test_closed_channel_refuses_use(make_pair: MakePair) -> None:
    _, zone, _ = make_pair()
    zone.close()
    zone.shutdown()  # harmless after close
    with pytest.raises(ChannelClosed):
        zone.send(1, b"")


# -- hello ----------------------------------------------------------------------------------


def test_hello_agrees_on_the_smaller_payload_limit(make_pair: MakePair) -> None:
    _, zone, host = make_pair()
    agreed: list[int] = []
    t = run_in_thread(lambda: agreed.append(host.hello_server(1 << 20)))
    assert zone.hello_client(4 << 20) == 1 << 20
    t.join(5)
    assert agreed == [1 << 20] and zone.version == host.version == 1


def hello_host(host: Channel) -> tuple[threading.Thread, list[ChannelError]]:
    """A thread answering one hello; it records the error a refusal raises on the host."""
    errors: list[ChannelError] = []

    def serve() -> None:
        try:
            host.hello_server(1 << 20)
        except ChannelError as exc:
            errors.append(exc)

    return run_in_thread(serve), errors


def test_hello_refuses_versions_it_does_not_speak(make_pair: MakePair) -> None:
    _, zone, host = make_pair()
    t, errors = hello_host(host)
    zone.send(Op.HELLO, HELLO.pack(7, 9, 1 << 20, 0), seq=0)
    reply = zone.recv(timeout_ms=2000)
    t.join(5)
    assert reply is not None and reply.header.is_reply and reply.header.status == 1
    assert errors and "no protocol version in common" in str(errors[0])


def test_hello_refuses_a_zone_built_from_another_call_table(make_pair: MakePair) -> None:
    _, zone, host = make_pair()
    t, errors = hello_host(host)
    with pytest.raises(ChannelError, match="another call table") as exc:
        zone.hello_client(1 << 20, table_digest=TABLE_DIGEST ^ 1)
    t.join(5)
    assert exc.value.code == errno.ENOMSG
    assert errors and "another call table" in str(errors[0])


# -- a hostile zone -------------------------------------------------------------------------


def put_raw(region: object, at: int, data: bytes) -> None:
    region.raw[at : at + len(data)] = data  # type: ignore[attr-defined]


def publish_prod(region: object, value: int) -> None:
    at = region.ctrl_offset("req", "prod")  # type: ignore[attr-defined]
    put_raw(region, at, struct.pack("<Q", value))


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"EVIL" + pack_header(70, 0, 1)[4:], "bad magic"),
        (pack_header(70, 2 << 20, 1), "exceeds"),
        (pack_header(70, 0, 1, flags=0x80), "unknown flags"),
        (pack_header(0x10000, 0, 1), "opcode"),
        (pack_header(70, 0, 1)[:28] + b"\x01\x00\x00\x00", "reserved"),
        (pack_header(70, 0, 1)[:4] + b"\x09\x00" + pack_header(70, 0, 1)[6:], "version"),
    ],
)
def test_hostile_header_closes_only_that_channel(
    make_pair: MakePair, header: bytes, reason: str
) -> None:
    region, _zone, host = make_pair()
    _, good_zone, good_host = make_pair()
    host._ep.max_payload = 1 << 20  # as agreed in a hello
    put_raw(region, region.req_offset, header)
    publish_prod(region, len(header))
    with pytest.raises(PeerViolation, match=reason):
        list(host.recv_batch(timeout_ms=100))
    with pytest.raises(PeerViolation):
        host.recv(timeout_ms=0)
    good_zone.send(71, b"unaffected", seq=1)
    msg = good_host.recv(timeout_ms=1000)
    assert msg is not None and bytes(msg.payload) == b"unaffected"


def test_producer_index_beyond_the_ring_is_a_violation(make_pair: MakePair) -> None:
    region, _, host = make_pair(req_order=12)
    publish_prod(region, 4097)
    with pytest.raises(PeerViolation, match="producer index"):
        host.recv(timeout_ms=100)


def test_consumer_index_rewound_by_the_zone_is_a_violation(make_pair: MakePair) -> None:
    region, zone, host = make_pair(rsp_order=12)
    host.send(72, b"reply", seq=1, flags=Flags.REPLY)
    assert zone.recv(timeout_ms=1000) is not None
    at = region.ctrl_offset("rsp", "cons")
    put_raw(region, at, struct.pack("<Q", 2**64 - 4096))
    # Space the host saw free is still free; the bad index is caught at the next look at it.
    with pytest.raises(PeerViolation, match="consumer index"):
        for seq in range(2, 5):
            host.send(72, b"x" * 2000, seq=seq, flags=Flags.REPLY, timeout_ms=100)


def test_zone_stalling_mid_message_is_cut_off(make_pair: MakePair) -> None:
    region, _, host = make_pair(stall_timeout_ms=100)
    header = pack_header(73, 1000, 1)
    put_raw(region, region.req_offset, header + b"p" * 100)
    publish_prod(region, len(header) + 100)
    t0 = time.monotonic()
    with pytest.raises(PeerViolation, match="stalled"):
        host.recv(timeout_ms=100)
    assert time.monotonic() - t0 < 5


def test_region_smaller_than_layout_is_refused() -> None:
    from idm._ring import ffi

    ep = ffi.new("struct idm_endpoint *")
    lay = ffi.new("struct idm_layout *", (12, 12))
    buf = ffi.new("char[]", 4096)
    bell = ffi.new("struct idm_bell *", (1, -1, -1, 0))
    assert lib.idm_ep_init(ep, buf, 4096, lay, 1, bell, bell) == -errno.EINVAL
    assert lib.idm_region_size(ffi.new("struct idm_layout *", (11, 12))) == 0
    assert lib.idm_region_size(ffi.new("struct idm_layout *", (25, 12))) == 0


def test_batch_delivers_valid_messages_before_a_bad_header(make_pair: MakePair) -> None:
    region, _, host = make_pair()
    stream = pack_header(80, 3, 1) + b"abc" + b"EVIL" + pack_header(80, 0, 2)[4:]
    put_raw(region, region.req_offset, stream)
    publish_prod(region, len(stream))
    assert [(h.seq, bytes(p)) for h, p in host.recv_batch(timeout_ms=100)] == [(1, b"abc")]
    with pytest.raises(PeerViolation, match="bad magic"):
        list(host.recv_batch(timeout_ms=100))
