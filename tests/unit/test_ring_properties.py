"""Property tests: whatever the sizes, messages arrive intact; whatever a zone writes (ring bytes,
call payloads), the host stays well-behaved."""

import os
import struct
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idm.channel import RingLayout, Side
from idm.wire import pack_header
from tests.fuzz.codec_target import decode_hostile_request
from tests.fuzz.ring_target import consume_hostile_ring
from tests.inprocess_link import InProcessRegion


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=12_000), min_size=1, max_size=25),
    batch=st.booleans(),
)
def test_any_size_sequence_arrives_intact_and_in_order(sizes: list[int], batch: bool) -> None:
    region = InProcessRegion(RingLayout(req_order=12, rsp_order=12))
    zone, host = region.channel(Side.ZONE), region.channel(Side.HOST)
    payloads = [os.urandom(n) for n in sizes]

    def produce() -> None:
        for i, p in enumerate(payloads):
            zone.send(30, p, seq=i, timeout_ms=5000)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    got: list[bytes] = []
    while len(got) < len(payloads):
        if batch:
            got += [bytes(p) for _, p in host.recv_batch(timeout_ms=5000)]
        else:
            msg = host.recv(timeout_ms=5000)
            assert msg is not None
            got.append(bytes(msg.payload))
    t.join(5)
    zone.close()
    host.close()
    region.close()
    assert got == payloads


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=6000))
def test_arbitrary_ring_contents_never_hurt_the_host(data: bytes) -> None:
    consume_hostile_ring(data)


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.tuples(st.integers(16, 0xFFFF), st.binary(max_size=300)), min_size=1, max_size=10
    ),
    tail=st.binary(max_size=64),
    batch=st.booleans(),
)
def test_valid_messages_before_garbage_are_delivered(
    messages: list[tuple[int, bytes]], tail: bytes, batch: bool
) -> None:
    stream = b"".join(pack_header(op, len(p), i) + p for i, (op, p) in enumerate(messages))
    if (len(stream) + len(tail)) % 2 != batch:  # the target picks batch mode by parity
        tail += b"\0"
    data = struct.pack("<Q", len(stream) + len(tail)) + stream + tail
    accepted = consume_hostile_ring(data)
    expected = [(op, len(p)) for op, p in messages]
    assert accepted[: len(expected)] == expected


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=400))
def test_call_decoders_accept_only_canonical_payloads(data: bytes) -> None:
    decode_hostile_request(data)
