"""The IDM wire format as Python sees it.

The C header ``idm/csrc/idm.h`` is the one source of truth: constants are read from the compiled
module and ``tests/unit/test_wire.py`` checks that ``HEADER`` matches the C struct byte for byte.
"""

import struct
from enum import IntEnum, IntFlag
from typing import NamedTuple

from idm._ring import lib
from idm.gen.codec import CALL_TABLE_DIGEST

MAGIC: int = lib.IDM_MAGIC
VERSION_MIN: int = lib.IDM_VERSION_MIN
VERSION_MAX: int = lib.IDM_VERSION_MAX
MAX_PAYLOAD: int = lib.IDM_MAX_PAYLOAD
OP_FIRST_CALL: int = lib.IDM_OP_FIRST_CALL
OP_MAX: int = lib.IDM_OP_MAX

# What the hello carries: the first 64 bits of the call table's digest (VGPU_CALL_TABLE_DIGEST).
TABLE_DIGEST = int(CALL_TABLE_DIGEST[:16], 16)

HEADER = struct.Struct("<IHHIIQiI")
HELLO = struct.Struct("<HHIQ")


class Flags(IntFlag):
    REPLY = lib.IDM_F_REPLY
    ASYNC = lib.IDM_F_ASYNC


class Op(IntEnum):
    """Channel-level opcodes; CUDA calls start at OP_FIRST_CALL and come from the call table."""

    HELLO = lib.IDM_OP_HELLO
    NULL = lib.IDM_OP_NULL


class Status(IntEnum):
    """Status of replies to channel-level requests (call replies carry a CUresult instead)."""

    OK = lib.IDM_ST_OK
    BAD_VERSION = lib.IDM_ST_BAD_VERSION
    BAD_REQUEST = lib.IDM_ST_BAD_REQUEST
    UNKNOWN_OPCODE = lib.IDM_ST_UNKNOWN_OPCODE
    BAD_TABLE = lib.IDM_ST_BAD_TABLE


class Header(NamedTuple):
    magic: int
    version: int
    flags: int
    opcode: int
    length: int
    seq: int
    status: int
    reserved: int

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> "Header":
        return cls._make(HEADER.unpack_from(buf, offset))

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & Flags.REPLY)

    @property
    def is_async(self) -> bool:
        return bool(self.flags & Flags.ASYNC)


def pack_header(opcode: int, length: int, seq: int, *, flags: int = 0, status: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION_MAX, flags, opcode, length, seq, status, 0)
