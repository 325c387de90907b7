"""The Python view of the wire format must match the C header byte for byte."""

import re
from pathlib import Path

from idm._ring import ffi, lib
from idm.wire import HEADER, HELLO, MAGIC, TABLE_DIGEST, Flags, Header, pack_header

ROOT = Path(__file__).resolve().parents[2]

FIELDS = ["magic", "version", "flags", "opcode", "length", "seq", "status", "reserved"]


def test_header_layout_matches_c() -> None:
    assert HEADER.size == ffi.sizeof("struct idm_hdr") == 32
    offsets = [ffi.offsetof("struct idm_hdr", f) for f in FIELDS]
    assert offsets == [0, 4, 6, 8, 12, 16, 24, 28]


def test_hello_layout_matches_c() -> None:
    assert HELLO.size == ffi.sizeof("struct idm_hello") == 16


def test_hello_digest_is_the_one_libvgpu_is_built_with() -> None:
    header = (ROOT / "libvgpu" / "gen" / "vgpu_calls.h").read_text()
    match = re.search(r"#define VGPU_CALL_TABLE_DIGEST (0x[0-9a-f]+)ull", header)
    assert match is not None
    assert int(match.group(1), 16) == TABLE_DIGEST != 0


def test_magic_spells_idm1() -> None:
    assert MAGIC.to_bytes(4, "little") == b"IDM1"


def test_python_header_equals_c_header_bytes() -> None:
    c = ffi.new("struct idm_hdr *")
    lib.idm_hdr_init(c, 0x1234, lib.IDM_F_REPLY, 0xDEADBEEF01, 77, -5)
    py = pack_header(0x1234, 77, 0xDEADBEEF01, flags=Flags.REPLY, status=-5)
    assert bytes(ffi.buffer(c)) == py
    h = Header.unpack_from(py)
    assert (h.opcode, h.length, h.seq, h.status, h.is_reply, h.is_async) == (
        0x1234,
        77,
        0xDEADBEEF01,
        -5,
        True,
        False,
    )


def test_control_block_leaves_room_for_grant_refs() -> None:
    assert ffi.sizeof("struct idm_ctrl") <= lib.IDM_CTRL_GREFS_OFFSET
    assert lib.IDM_CTRL_MAX_GREFS == (lib.IDM_PAGE_SIZE - lib.IDM_CTRL_GREFS_OFFSET) // 4
    # the four indices/flags of a direction sit on distinct cache lines
    offs = [
        ffi.offsetof("struct idm_dir_ctrl", f)
        for f in ("prod", "cons", "prod_waiting", "cons_waiting")
    ]
    assert len({o // 64 for o in offs}) == 4
