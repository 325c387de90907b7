"""What a hostile or dying zone can do that the channel API never would: write bytes straight
into its request ring and publish them, bypassing idm_send (e.g. half a message)."""

import struct
from typing import Any

from idm._ring import ffi, lib
from idm.channel import Channel

_PROD = ffi.offsetof("struct idm_ctrl", "req") + ffi.offsetof("struct idm_dir_ctrl", "prod")


def publish_raw(memory: Any, channel: Channel, data: bytes) -> None:
    """Append ``data`` to the zone's request ring at its producer index and publish it."""
    ring = 1 << channel.link.layout.req_order
    assert len(data) <= ring, "more than the ring holds"
    sent = int(channel._ep.tx_prod)
    start, base = sent % ring, lib.IDM_PAGE_SIZE
    first = min(len(data), ring - start)
    memory[base + start : base + start + first] = data[:first]
    memory[base : base + len(data) - first] = data[first:]  # wrapped part, if any
    memory[_PROD : _PROD + 8] = struct.pack("<Q", sent + len(data))
