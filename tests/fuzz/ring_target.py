"""One hostile-zone input for the host's ring consumer, shared by hypothesis and atheris.

The input is whatever a zone could do: arbitrary bytes in the request ring and an arbitrary
producer index. The host must either deliver well-formed messages or close the channel with a
PeerViolation/ChannelError; it must never crash, hang, or hand out anything out of bounds.
"""

import struct

from idm.channel import Channel, ChannelError, RingLayout, Side
from idm.wire import MAGIC
from tests.inprocess_link import InProcessRegion

LAYOUT = RingLayout(req_order=12, rsp_order=12)
MAX_PAYLOAD = 8192


def consume_hostile_ring(data: bytes) -> list[tuple[int, int]]:
    """Returns (opcode, length) of every message the host accepted."""
    prod = struct.unpack_from("<Q", data.ljust(8, b"\0"))[0]
    ring = data[8 : 8 + (1 << LAYOUT.req_order)]
    region = InProcessRegion(LAYOUT)
    host = Channel(region.side(Side.HOST), Side.HOST, spin_ns=0, stall_timeout_ms=0)
    host._ep.max_payload = MAX_PAYLOAD
    accepted: list[tuple[int, int]] = []
    try:
        region.raw[region.req_offset : region.req_offset + len(ring)] = ring
        at = region.ctrl_offset("req", "prod")
        region.raw[at : at + 8] = struct.pack("<Q", prod)
        use_batch = bool(prod & 1)
        for _ in range(64):
            if use_batch:
                got = [(h, len(p)) for h, p in host.recv_batch(timeout_ms=0)]
            else:
                msg = host.recv(timeout_ms=0)
                got = [] if msg is None else [(msg.header, len(msg.payload))]
            if not got:
                break
            for header, length in got:
                assert header.magic == MAGIC
                assert header.length == length <= MAX_PAYLOAD
                accepted.append((header.opcode, length))
    except ChannelError:
        pass
    finally:
        host.close()
        region.close()
    return accepted
