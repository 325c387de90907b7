"""The call table (idm/calls.toml) and its validation (idm/calltable.py)."""

import re
from pathlib import Path

import pytest

from idm import callcodec
from idm.calltable import (
    CSTRING_MAX,
    HANDLE_KINDS,
    IDM_MAX_PAYLOAD,
    CallTableError,
    load_call_table,
    parse_call_table,
)

REPO = Path(__file__).resolve().parents[2]

# The calls gpu-proxy and libvgpu need first.
EXPECTED_CALLS = {
    "cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuDeviceGet", "cuDeviceGetName",
    "cuDeviceGetUuid_v2", "cuDeviceTotalMem_v2", "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxGetState",
    "cuCtxCreate_v2", "cuCtxDestroy_v2", "cuCtxSynchronize", "cuMemGetInfo_v2", "cuMemAlloc_v2",
    "cuMemFree_v2", "cuMemcpyHtoD_v2", "cuMemcpyDtoH_v2", "cuMemcpyDtoD_v2",
    "cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2", "cuMemcpyDtoDAsync_v2", "cuMemsetD8_v2",
    "cuMemsetD32_v2", "cuMemsetD8Async", "cuMemsetD32Async", "cuModuleLoadData",
    "cuModuleUnload", "cuModuleGetFunction", "cuFuncGetAttribute", "cuLaunchKernel",
    "cuStreamCreate", "cuStreamDestroy_v2", "cuStreamSynchronize", "cuStreamQuery",
    "cuStreamWaitEvent", "cuEventCreate", "cuEventRecord", "cuEventSynchronize", "cuEventQuery",
    "cuEventElapsedTime", "cuEventDestroy_v2",
}  # fmt: skip
EXPECTED_ASYNC = {
    "cuMemcpyHtoDAsync_v2", "cuMemcpyDtoDAsync_v2", "cuMemsetD8Async", "cuMemsetD32Async",
    "cuLaunchKernel", "cuStreamWaitEvent", "cuEventRecord", "cuMemFreeAsync", "vgpuHostFuncMark",
    "vgpuMemcpyHtoDSharedAsync", "vgpuMemcpyDtoHSharedAsync",
}  # fmt: skip


def test_real_table_has_every_call_once_with_valid_opcodes() -> None:
    table = load_call_table()
    names = [c.name for c in table.calls]
    opcodes = [c.opcode for c in table.calls]
    assert set(names) >= EXPECTED_CALLS
    assert len(set(names)) == len(names)
    assert len(set(opcodes)) == len(opcodes)
    assert all(callcodec.IDM_OP_FIRST_CALL <= op <= callcodec.IDM_OP_MAX for op in opcodes)
    assert {c.name for c in table.calls if c.is_async} == EXPECTED_ASYNC
    assert all(not c.out_args for c in table.calls if c.is_async)


def test_real_table_argument_semantics() -> None:
    table = load_call_table()
    launch = table.by_name("cuLaunchKernel")
    params = launch.arg("params")
    assert (params.kind, params.len, params.bound) == ("blob", "paramsSize", 32764)
    assert launch.arg("f").handle_kind == "function"
    stream = launch.arg("hStream")
    assert (stream.kind, stream.handle_kind, stream.nullable) == ("handle", "stream", True)
    assert launch.arg("paramsSize").wire.name == "u32"

    dtoh = table.by_name("cuMemcpyDtoHAsync_v2")
    assert not dtoh.is_async  # the data has to come back
    assert [(a.name, a.kind, a.len) for a in dtoh.out_args] == [("dstHost", "blob", "ByteCount")]

    assert table.by_name("cuDeviceGetUuid_v2").arg("uuid").kind == "fixed_blob"
    name = table.by_name("cuModuleGetFunction").arg("name")
    assert (name.kind, name.bound) == ("cstring", CSTRING_MAX)
    assert table.by_name("cuMemAlloc_v2").arg("dptr").c_type == "unsigned long long"
    assert table.by_name("cuDeviceGet").arg("device").c_type == "int"
    assert table.by_name("cuEventElapsedTime").arg("pMilliseconds").wire.name == "f32"


def test_layouts_put_fixed_fields_first_and_size_blobs_to_fit() -> None:
    table = load_call_table()
    htod = table.by_name("cuMemcpyHtoD_v2")
    assert htod.request.struct_fmt == "<QQ"
    assert [a.name for a in htod.request.fixed] == ["dstDevice", "ByteCount"]
    assert [a.name for a in htod.request.tail] == ["srcHost"]
    # A blob without max takes what the payload leaves after the fixed part.
    assert htod.arg("srcHost").bound == IDM_MAX_PAYLOAD - 16
    dtoh = table.by_name("cuMemcpyDtoH_v2")
    assert dtoh.arg("dstHost").bound == IDM_MAX_PAYLOAD - 4  # u32 length prefix
    assert table.by_name("cuDeviceGetUuid_v2").reply.struct_fmt == "<16s"
    assert table.by_name("cuLaunchKernel").request.fixed_size == 8 + 7 * 4 + 8 + 4


def _define(text: str, name: str) -> int:
    m = re.search(rf"^#define {name} (.+?)(?:\s*/\*.*)?$", text, re.MULTILINE)
    assert m, name
    return int(eval(m.group(1).replace("u", "")))


def test_constants_mirror_idm_h() -> None:
    header = (REPO / "idm/csrc/idm.h").read_text()
    assert _define(header, "IDM_MAX_PAYLOAD") == callcodec.IDM_MAX_PAYLOAD == 64 << 20
    assert _define(header, "IDM_OP_FIRST_CALL") == callcodec.IDM_OP_FIRST_CALL
    assert _define(header, "IDM_OP_MAX") == callcodec.IDM_OP_MAX


def test_digest_covers_the_wire_not_the_docs() -> None:
    text = (REPO / "idm/calls.toml").read_text()
    base = parse_call_table(text).digest()
    assert parse_call_table(text).digest() == base
    documented = text.replace('doc = "CUDA calls it `count`"', 'doc = "renamed"')
    assert documented != text
    assert parse_call_table(documented).digest() == base
    retyped = text.replace(
        '{ name = "ordinal", dir = "in", type = "int" }',
        '{ name = "ordinal", dir = "in", type = "i64" }',
    )
    assert retyped != text
    assert parse_call_table(retyped).digest() != base


def test_load_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mini.toml"
    path.write_text('[[call]]\nname = "cuInit"\nopcode = 16\nmode = "sync"\n')
    table = load_call_table(path)
    assert [(c.name, c.opcode, c.args) for c in table.calls] == [("cuInit", 16, [])]


# ---- rejected tables ----------------------------------------------------------------------------

PRELUDE = """
[scalars]
CUdeviceptr = "unsigned long long"
[handles]
CUstream = "stream"
"""


def call(name: str = "cuFoo", opcode: int = 0x0201, mode: str = "sync", args: str = "[]") -> str:
    return f'[[call]]\nname = "{name}"\nopcode = {opcode}\nmode = "{mode}"\nargs = {args}\n'


def blob_call(blob: str, extra: str = "") -> str:
    return call(args=f'[{{ name = "n", dir = "in", type = "size_t" }}, {blob}{extra}]')


BAD_TABLES = {
    "duplicate opcode": (
        call("cuFoo", 0x0201) + call("cuBar", 0x0201),
        ["call 'cuBar'", "0x0201", "duplicate opcode", "'cuFoo'"],
    ),
    "duplicate name": (
        call("cuFoo", 0x0201) + call("cuFoo", 0x0202),
        ["call 'cuFoo'", "duplicate call name"],
    ),
    "channel opcode": (call(opcode=15), ["call 'cuFoo'", "opcode must be in 0x10..0xffff"]),
    "opcode too big": (call(opcode=0x10000), ["call 'cuFoo'", "opcode must be in"]),
    "dangling len": (
        blob_call('{ name = "data", dir = "in", type = "bytes", len = "nbytes" }'),
        ["call 'cuFoo'", "arg 'data'", "len = 'nbytes' names no arg"],
    ),
    "len names an out arg": (
        call(
            args='[{ name = "n", dir = "out", type = "size_t" },'
            ' { name = "data", dir = "in", type = "bytes", len = "n" }]'
        ),
        ["arg 'data'", "must name an 'in' integer scalar", "out scalar of type size_t"],
    ),
    "len names a float": (
        call(
            args='[{ name = "n", dir = "in", type = "float" },'
            ' { name = "data", dir = "in", type = "bytes", len = "n" }]'
        ),
        ["arg 'data'", "must name an 'in' integer scalar"],
    ),
    "len names a handle": (
        call(
            args='[{ name = "n", dir = "in", type = "CUstream" },'
            ' { name = "data", dir = "in", type = "bytes", len = "n" }]'
        ),
        ["arg 'data'", "must name an 'in' integer scalar", "handle"],
    ),
    "out arg on async call": (
        call(mode="async", args='[{ name = "dptr", dir = "out", type = "CUdeviceptr" }]'),
        ["call 'cuFoo'", "arg 'dptr'", "async", "cannot have out args"],
    ),
    "unknown type": (
        call(args='[{ name = "x", dir = "in", type = "CUwhatever" }]'),
        ["call 'cuFoo'", "arg 'x'", "unknown type 'CUwhatever'"],
    ),
    "unknown handle kind": (
        '[scalars]\n[handles]\nCUthing = "thing"\n' + call(),
        ["[handles] 'CUthing'", "unknown handle kind 'thing'"],
    ),
    "unknown C type": (
        '[scalars]\nCUx = "long double"\n' + call(),
        ["[scalars] 'CUx'", "unknown C type 'long double'"],
    ),
    "bytes without len or size": (
        blob_call('{ name = "data", dir = "in", type = "bytes" }'),
        ["arg 'data'", "exactly one of len"],
    ),
    "bytes with len and size": (
        blob_call('{ name = "data", dir = "in", type = "bytes", len = "n", size = 4 }'),
        ["arg 'data'", "exactly one of len"],
    ),
    "out cstring": (
        call(args='[{ name = "s", dir = "out", type = "cstring" }]'),
        ["arg 's'", "cstring args must be dir = 'in'"],
    ),
    "len on a scalar": (
        call(
            args='[{ name = "n", dir = "in", type = "u32" }, { name = "m", dir = "in", '
            'type = "u32", len = "n" }]'
        ),
        ["arg 'm'", "len is only for bytes"],
    ),
    "nullable scalar": (
        call(args='[{ name = "n", dir = "in", type = "u32", nullable = true }]'),
        ["arg 'n'", "nullable is only for handle"],
    ),
    "reserved name": (
        call(args='[{ name = "count", dir = "out", type = "int" }]'),
        ["arg 'count'", "reserved"],
    ),
    "C keyword": (
        call(args='[{ name = "int", dir = "in", type = "int" }]'),
        ["arg 'int'", "reserved"],
    ),
    "generator prefix": (
        call(args='[{ name = "vgpu_x", dir = "in", type = "int" }]'),
        ["arg 'vgpu_x'", "vgpu_"],
    ),
    "duplicate arg": (
        call(
            args='[{ name = "x", dir = "in", type = "int" }, { name = "x", dir = "in", '
            'type = "u8" }]'
        ),
        ["call 'cuFoo'", "arg 'x'", "duplicate arg name"],
    ),
    "C parameter collision": (
        call(
            args='[{ name = "n", dir = "in", type = "u32" }, { name = "name", dir = "out", '
            'type = "bytes", len = "n" }, { name = "name_cap", dir = "out", type = "u32" }]'
        ),
        ["call 'cuFoo'", "collide", "name_cap"],
    ),
    "max too large for the payload": (
        blob_call(f'{{ name = "data", dir = "in", type = "bytes", len = "n", max = {64 << 20} }}'),
        ["arg 'data'", "cannot fit in one payload"],
    ),
    "misspelt option": (
        blob_call('{ name = "data", dir = "in", type = "bytes", lenght = "n" }'),
        ["call 'cuFoo' (#1)", "arg 'data' (#2)", "lenght", "Extra inputs are not permitted"],
    ),
    "bad direction": (
        call(args='[{ name = "x", dir = "inout", type = "int" }]'),
        ["call 'cuFoo' (#1)", "arg 'x' (#1)", "field 'dir'"],
    ),
    "doc that would end a C comment": (
        call(args='[{ name = "x", dir = "in", type = "int", doc = "a */ b" }]'),
        ["call 'cuFoo'", "docs must not contain"],
    ),
    "bad mode": (call(mode="maybe"), ["call 'cuFoo' (#1)", "field 'mode'"]),
    "bad TOML": ("[[call]\nname = 1", ["not valid TOML"]),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_tables_are_rejected_with_a_clear_message(case: str) -> None:
    text, fragments = BAD_TABLES[case]
    with pytest.raises(CallTableError) as err:
        parse_call_table(PRELUDE + text if "[scalars]" not in text else text, "t.toml")
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_every_problem_is_reported_at_once() -> None:
    text = (
        PRELUDE
        + call(
            args='[{ name = "a", dir = "in", type = "nope" },'
            ' { name = "b", dir = "in", type = "bytes", len = "zz" }]',
            mode="async",
        )
        + call("cuBar", 3)
    )
    with pytest.raises(CallTableError) as err:
        parse_call_table(text)
    message = str(err.value)
    assert "arg 'a': unknown type 'nope'" in message
    assert "call 'cuBar'" in message and "opcode must be in" in message


def test_handle_kinds_are_a_fixed_set() -> None:
    assert {"context", "module", "function", "stream", "event"} <= HANDLE_KINDS
    table = parse_call_table(
        '[handles]\nCUgraphExec = "graph_exec"\n'
        + call(args='[{ name = "g", dir = "in", type = "CUgraphExec" }]')
    )
    assert table.calls[0].arg("g").handle_kind == "graph_exec"
