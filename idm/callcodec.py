"""Runtime pieces shared by the generated call codecs (idm/gen/codec.py) and their users.

Kept small and free of pydantic/tomllib so that importing the generated codec stays cheap: the
call table (idm/calltable.py) is only needed by the code generator and the tests.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Mirrors of idm/csrc/idm.h (tests/unit/test_calltable.py checks that they agree).
IDM_MAX_PAYLOAD = 64 << 20
IDM_OP_FIRST_CALL = 16
IDM_OP_MAX = 0xFFFF

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_SUPPORTED = 801

# Anything a payload may arrive as. Decoders accept all three; blobs come back as memoryviews.
Buffer = bytes | bytearray | memoryview


class DecodeError(ValueError):
    """A payload broke the call table's encoding rules. The message names the call and field."""


class EncodeError(ValueError):
    """Values that cannot be encoded (out of range, wrong length, too large) or a handler that
    returned something other than its call's reply. The message names the call and field."""


def as_view(payload: Buffer) -> memoryview:
    """A flat byte view of `payload` (no copy)."""
    view = memoryview(payload)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def explain_pack_error(
    where: str, fields: tuple[tuple[str, str], ...], values: tuple[Any, ...], err: Exception
) -> EncodeError:
    """Turn a struct.pack failure into an EncodeError naming the offending field."""
    for (name, fmt), value in zip(fields, values, strict=True):
        try:
            struct.pack("<" + fmt, value)
        except (struct.error, OverflowError, TypeError) as e:
            return EncodeError(f"{where}: {name} = {value!r}: {e}")
    return EncodeError(f"{where}: {err}")


@dataclass(frozen=True, slots=True)
class HandleRef:
    """A handle-typed field of a request or reply: u64 id on the wire, per-zone table in Dom0."""

    field: str
    kind: str
    nullable: bool


@dataclass(frozen=True, slots=True)
class CallCodec:
    """Everything the generated codec knows about one call, for generic users (dispatch, tests).

    `encode_reply`/`decode_reply`/`reply_type` are None for fire-and-forget calls (no reply).
    `out_caps` pairs each variable-length out blob with the in field giving its capacity;
    `bounds` gives the largest length accepted for each blob/cstring field.
    `request_head` (with its field names) is the request's fixed part when the request is that
    part followed by one blob whose length it carries: the part a large request's receiver takes
    first, to put the blob straight where it belongs (gpu-proxy's streamed copies).
    """

    name: str
    opcode: int
    is_async: bool
    request_type: type[tuple[Any, ...]]
    reply_type: type[tuple[Any, ...]] | None
    encode_request: Callable[..., bytes]
    decode_request: Callable[[Buffer], tuple[Any, ...]]
    encode_reply: Callable[..., bytes] | None
    decode_reply: Callable[[Buffer], tuple[Any, ...]] | None
    in_handles: tuple[HandleRef, ...]
    out_handles: tuple[HandleRef, ...]
    out_caps: tuple[tuple[str, str], ...]
    bounds: tuple[tuple[str, int], ...]
    request_head: struct.Struct | None = None
    request_head_fields: tuple[str, ...] = ()

    def reply_cap_violation(self, req: tuple[Any, ...], rep: tuple[Any, ...]) -> str | None:
        """Why `rep` does not fit the capacities `req` asked for, or None if it does."""
        for blob, cap_field in self.out_caps:
            size = len(as_view(getattr(rep, blob)))
            cap = getattr(req, cap_field)
            if size > cap:
                return (
                    f"{self.name} reply: {blob} is {size} bytes, more than the {cap} "
                    f"requested by {cap_field}"
                )
        return None
