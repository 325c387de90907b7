"""The call-table code generator (idm/codegen.py) and what it generates.

* the checked-in outputs are up to date, generation is deterministic, --check catches staleness;
* the generated C (compiled with cffi) and the generated Python codec agree byte for byte, for
  random values of every call's arguments (hypothesis), for the real table and for a synthetic
  table that uses every argument kind and wire type;
* malformed payloads are rejected by both (DecodeError naming call and field / -1 with no output
  written), and every payload the Python decoders accept is the canonical encoding;
* the gpu-proxy dispatch skeleton routes, defaults to CUDA_ERROR_NOT_SUPPORTED and refuses
  replies the call cannot carry.
"""

import importlib.util
import math
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cffi
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_proxy.gen import dispatch_table
from idm import codegen
from idm.callcodec import (
    CUDA_ERROR_NOT_SUPPORTED,
    CUDA_SUCCESS,
    IDM_MAX_PAYLOAD,
    CallCodec,
    DecodeError,
    EncodeError,
)
from idm.calltable import Arg, Call, CallTable, load_call_table, parse_call_table
from idm.gen import codec as real_codec

REPO = codegen.ROOT

# Every arg kind and wire type, signed length-of args, a length-of shared by an in and an out
# blob, several tail items per direction, fixed-size blobs both ways, an empty async call.
SYNTHETIC = """
[scalars]
Tiny = "signed char"
Small = "short"
UShort = "unsigned short"
Big = "long long"
Real = "double"
Word = "uint32_t"
[handles]
CUstream = "stream"
CUevent = "event"

[[call]]
name = "allKinds"
opcode = 0x7001
mode = "sync"
args = [
  { name = "a", dir = "in", type = "Tiny" },
  { name = "b", dir = "in", type = "Small" },
  { name = "c", dir = "in", type = "UShort" },
  { name = "d", dir = "in", type = "Big" },
  { name = "e", dir = "in", type = "Real" },
  { name = "key", dir = "in", type = "bytes", size = 8 },
  { name = "n1", dir = "in", type = "i16" },
  { name = "blob1", dir = "in", type = "bytes", len = "n1", max = 100 },
  { name = "label", dir = "in", type = "cstring", max = 32 },
  { name = "blob2", dir = "in", type = "bytes", len = "n2", max = 50 },
  { name = "n2", dir = "in", type = "u8" },
  { name = "s", dir = "in", type = "CUstream", nullable = true },
  { name = "cap1", dir = "in", type = "i64" },
  { name = "cap2", dir = "in", type = "u16" },
  { name = "o1", dir = "out", type = "Tiny" },
  { name = "o2", dir = "out", type = "Real" },
  { name = "ob1", dir = "out", type = "bytes", len = "cap1", max = 40 },
  { name = "okey", dir = "out", type = "bytes", size = 4 },
  { name = "ob2", dir = "out", type = "bytes", len = "cap2", max = 30 },
  { name = "oe", dir = "out", type = "CUevent" },
  { name = "osz", dir = "out", type = "size_t" },
  { name = "of", dir = "out", type = "float" },
  { name = "ow", dir = "out", type = "Word" },
  { name = "oi", dir = "out", type = "i64" },
  { name = "ou", dir = "out", type = "u16" },
]

[[call]]
name = "sharedLen"
opcode = 0x7002
mode = "sync"
args = [
  { name = "n", dir = "in", type = "uint" },
  { name = "src", dir = "in", type = "bytes", len = "n", max = 64 },
  { name = "dst", dir = "out", type = "bytes", len = "n", max = 64 },
]

[[call]]
name = "nothing"
opcode = 0x7003
mode = "async"

[[call]]
name = "twoBlobs"
opcode = 0x7004
mode = "async"
args = [
  { name = "n1", dir = "in", type = "u32" },
  { name = "b1", dir = "in", type = "bytes", len = "n1" },
  { name = "n2", dir = "in", type = "u32" },
  { name = "b2", dir = "in", type = "bytes", len = "n2" },
]
"""


# ---- building the C side ------------------------------------------------------------------------


@dataclass
class World:
    table: CallTable
    codec: ModuleType
    ffi: Any
    lib: Any


def _load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _build_c(gen_dir: Path, tmp: Path, modname: str) -> tuple[Any, Any]:
    """Compile vgpu_marshal.c with cffi (API mode) and import it."""
    header = (gen_dir / "vgpu_calls.h").read_text()
    decls = "\n".join(line for line in header.splitlines() if not line.startswith("#"))
    consts = sorted(set(re.findall(r"^#define (VGPU_\w+) ", header, re.MULTILINE)))
    ffi = cffi.FFI()
    ffi.cdef(decls + "\n" + "\n".join(f"#define {c} ..." for c in consts))
    ffi.set_source(
        modname,
        '#include "vgpu_calls.h"',
        sources=[str(gen_dir / "vgpu_marshal.c")],
        include_dirs=[str(gen_dir)],
    )
    so = ffi.compile(tmpdir=str(tmp))
    mod = _load_module(modname, Path(so))
    return mod.ffi, mod.lib


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, World]:
    tmp = tmp_path_factory.mktemp("codegen")
    real = World(load_call_table(), real_codec, *_build_c(REPO / "libvgpu/gen", tmp, "_vgpu_real"))
    syn_table = parse_call_table(SYNTHETIC)
    codegen.write_outputs(tmp / "syn", codegen.generate(syn_table))
    syn = World(
        syn_table,
        _load_module("_vgpu_syn_codec", tmp / "syn" / codegen.PY_CODEC),
        *_build_c(tmp / "syn/libvgpu/gen", tmp, "_vgpu_syn"),
    )
    return {"real": real, "synthetic": syn}


def _cases(sync_only: bool = False) -> list[tuple[str, str]]:
    tables = {"real": load_call_table(), "synthetic": parse_call_table(SYNTHETIC)}
    return [
        (world, c.name)
        for world, table in tables.items()
        for c in table.sorted_calls()
        if not (sync_only and c.is_async)
    ]


ALL = _cases()
SYNC = _cases(sync_only=True)


# ---- values -------------------------------------------------------------------------------------


def _scalar(a: Arg) -> st.SearchStrategy[Any]:
    if a.kind == "handle":
        return st.integers(0, 2**64 - 1)
    if a.wire.is_int:
        return st.integers(a.wire.lo, a.wire.hi)
    return st.floats(width=32 if a.wire.size == 4 else 64, allow_nan=False)


def draw_request(data: st.DataObject, call: Call) -> dict[str, Any]:
    vals: dict[str, Any] = {}
    for a in call.args:
        if a.kind == "blob" and a.len not in vals:
            assert a.len is not None
            hi = min([48] + [b.bound for b in call.args if b.kind == "blob" and b.len == a.len])
            vals[a.len] = data.draw(st.integers(0, hi), label=a.len)
    for a in call.in_args:
        if a.name in vals:
            continue
        if a.kind == "blob":
            n = vals[a.len]  # type: ignore[index]
            strategy: st.SearchStrategy[Any] = st.binary(min_size=n, max_size=n)
        elif a.kind == "fixed_blob":
            strategy = st.binary(min_size=a.fixed_size, max_size=a.fixed_size)
        elif a.kind == "cstring":
            strategy = st.binary(max_size=min(a.bound, 40)).map(lambda b: b.replace(b"\0", b"?"))
        else:
            strategy = _scalar(a)
        vals[a.name] = data.draw(strategy, label=a.name)
    return vals


def draw_reply(data: st.DataObject, call: Call, req: dict[str, Any]) -> dict[str, Any]:
    outs: dict[str, Any] = {}
    for a in call.out_args:
        if a.kind == "blob":
            n = data.draw(st.integers(0, req[a.len]), label=f"len({a.name})")  # type: ignore[index]
            outs[a.name] = data.draw(st.binary(min_size=n, max_size=n), label=a.name)
        elif a.kind == "fixed_blob":
            outs[a.name] = data.draw(
                st.binary(min_size=a.fixed_size, max_size=a.fixed_size), label=a.name
            )
        else:
            outs[a.name] = data.draw(_scalar(a), label=a.name)
    return outs


def norm(values: Any) -> list[Any]:
    return [bytes(v) if isinstance(v, bytes | bytearray | memoryview) else v for v in values]


def fn(world: World, prefix: str, call: Call, suffix: str) -> Callable[..., Any]:
    f: Callable[..., Any] = getattr(world.codec, f"{prefix}_{call.name}_{suffix}")
    return f


def c_marshal(world: World, call: Call, vals: dict[str, Any], cap: int) -> bytes | None:
    ffi, args = world.ffi, []
    for a in call.in_args:
        v = vals[a.name]
        if a.kind in ("blob", "fixed_blob") and isinstance(v, bytes):
            v = ffi.from_buffer("uint8_t[]", v)
        args.append(v)
    buf = ffi.new("uint8_t[]", max(cap, 1))
    n = getattr(world.lib, f"vgpu_marshal_{call.name}")(buf, cap, *args)
    assert n >= -1
    return None if n < 0 else ffi.buffer(buf, n)[:]


SENTINEL = 0x5A


def _reader(ffi: Any, p: Any, size: int | None = None, length: Any = None) -> Callable[[], Any]:
    def read() -> Any:
        if size is None:
            return p[0]
        data = ffi.buffer(p, size)[:]
        return data if length is None else (data, length[0])

    return read


def c_unmarshal(
    world: World, call: Call, payload: bytes, caps: dict[str, int], room: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Run vgpu_unmarshal_<call>_reply on outputs pre-filled with SENTINEL.

    Returns (rc, snapshot): each output's value, blobs as (all buffer bytes, reported length).
    `room` sizes out-blob buffers when it differs from the capacity passed in (fuzzing).
    """
    ffi, args = world.ffi, []
    readers: dict[str, Callable[[], Any]] = {}
    for a in call.out_args:
        if a.kind in ("scalar", "handle"):
            p = ffi.new(f"{a.c_type} *", SENTINEL)
            args.append(p)
            readers[a.name] = _reader(ffi, p)
        elif a.kind == "fixed_blob":
            p = ffi.new("uint8_t[]", [SENTINEL] * a.fixed_size)
            args.append(p)
            readers[a.name] = _reader(ffi, p, a.fixed_size)
        else:
            size = max(caps[a.name] if room is None else room, 1)
            p = ffi.new("uint8_t[]", [SENTINEL] * size)
            length = ffi.new("size_t *", SENTINEL)
            args += [p, caps[a.name], length]
            readers[a.name] = _reader(ffi, p, size, length)
    src = ffi.from_buffer("uint8_t[]", payload)
    rc = getattr(world.lib, f"vgpu_unmarshal_{call.name}_reply")(src, len(payload), *args)
    assert rc in (0, -1)
    return rc, {name: read() for name, read in readers.items()}


def c_outputs(call: Call, snapshot: dict[str, Any]) -> list[Any]:
    out = []
    for a in call.out_args:
        v = snapshot[a.name]
        out.append(v[0][: v[1]] if a.kind == "blob" else v)
    return out


def untouched(call: Call, snapshot: dict[str, Any]) -> bool:
    for a in call.out_args:
        v = snapshot[a.name]
        if a.kind == "blob":
            if v != (bytes([SENTINEL]) * len(v[0]), SENTINEL):
                return False
        elif a.kind == "fixed_blob":
            if v != bytes([SENTINEL]) * a.fixed_size:
                return False
        elif v != SENTINEL:
            return False
    return True


def caps_of(call: Call, req: dict[str, Any]) -> dict[str, int]:
    return {a.name: req[a.len] for a in call.out_args if a.kind == "blob"}  # type: ignore[index]


# ---- freshness and determinism ------------------------------------------------------------------


def test_checked_in_outputs_are_up_to_date() -> None:
    outputs = codegen.generate(load_call_table())
    assert set(outputs) == set(codegen.OUTPUTS)
    stale = [rel for rel in outputs if (REPO / rel).read_bytes() != outputs[rel].encode()]
    assert not stale, f"stale generated files {stale}: run `python -m idm.codegen`"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    assert codegen.main(["--root", str(tmp_path / "a")]) == 0
    assert codegen.main(["--root", str(tmp_path / "b")]) == 0
    for rel in codegen.OUTPUTS:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert codegen.write_outputs(tmp_path / "a", codegen.generate(load_call_table())) == []


def test_check_mode_lists_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert codegen.main(["--root", str(tmp_path)]) == 0
    assert codegen.main(["--check", "--root", str(tmp_path)]) == 0
    capsys.readouterr()
    with (tmp_path / codegen.PY_CODEC).open("a") as f:
        f.write("# edited by hand\n")
    (tmp_path / codegen.C_HEADER).unlink()
    assert codegen.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"stale: {codegen.PY_CODEC}" in err and f"stale: {codegen.C_HEADER}" in err
    assert f"stale: {codegen.C_SOURCE}" not in err
    assert codegen.main(["--root", str(tmp_path)]) == 0  # regenerating fixes it
    assert codegen.main(["--check", "--root", str(tmp_path)]) == 0


def test_check_mode_on_the_repository() -> None:
    assert codegen.main(["--check"]) == 0


def test_invalid_table_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[call]]\nname = "cuX"\nopcode = 3\nmode = "sync"\n')
    assert codegen.main(["--table", str(bad), "--root", str(tmp_path)]) == 2
    assert "call 'cuX'" in capsys.readouterr().err
    assert not (tmp_path / codegen.PY_CODEC).exists()


def test_every_output_names_its_generator() -> None:
    for rel, text in codegen.generate(load_call_table()).items():
        first = text.splitlines()[0]
        assert first.startswith("/* " if rel.endswith((".c", ".h")) else "# "), rel
        assert "idm/codegen.py" in first and "Do not edit" in first, rel


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_generated_c_is_strict_c11_clean(worlds: dict[str, World], tmp_path: Path) -> None:
    flags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-Wconversion", "-Wshadow"]
    syn_gen = tmp_path / "syn"
    codegen.write_outputs(syn_gen, codegen.generate(worlds["synthetic"].table))
    for gen in (REPO / "libvgpu/gen", syn_gen / "libvgpu/gen"):
        out = subprocess.run(
            ["gcc", *flags, "-c", str(gen / "vgpu_marshal.c"), "-o", str(tmp_path / "m.o")],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
    # The header stands alone and its guard works.
    tu = tmp_path / "tu.c"
    tu.write_text(
        '#include "vgpu_calls.h"\n#include "vgpu_calls.h"\nint main(void) { return 0; }\n'
    )
    out = subprocess.run(
        ["gcc", *flags, f"-I{REPO / 'libvgpu/gen'}", "-fsyntax-only", str(tu)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


# ---- C and Python agree -------------------------------------------------------------------------

PROPERTY = settings(max_examples=20, deadline=None)


@pytest.mark.parametrize(("world_name", "name"), ALL)
@PROPERTY
@given(data=st.data())
def test_requests_encoded_in_c_decode_in_python(
    worlds: dict[str, World], world_name: str, name: str, data: st.DataObject
) -> None:
    world = worlds[world_name]
    call = world.table.by_name(name)
    vals = draw_request(data, call)
    py = fn(world, "encode", call, "request")(**vals)
    c = c_marshal(world, call, vals, len(py) + 8)
    assert c == py  # one encoding, byte for byte
    if py:
        assert c_marshal(world, call, vals, len(py) - 1) is None  # does not fit
    expected = norm(vals[a.name] for a in call.in_args)
    assert c is not None
    for payload in (c, memoryview(bytearray(c))):
        req = fn(world, "decode", call, "request")(payload)
        assert req._fields == tuple(a.name for a in call.in_args)
        assert norm(req) == expected


@pytest.mark.parametrize(("world_name", "name"), SYNC)
@PROPERTY
@given(data=st.data())
def test_replies_encoded_in_python_decode_in_c(
    worlds: dict[str, World], world_name: str, name: str, data: st.DataObject
) -> None:
    world = worlds[world_name]
    call = world.table.by_name(name)
    req = draw_request(data, call)
    outs = draw_reply(data, call, req)
    py = fn(world, "encode", call, "reply")(**outs)
    rc, snapshot = c_unmarshal(world, call, py, caps_of(call, req))
    expected = norm(outs[a.name] for a in call.out_args)
    assert rc == 0
    assert c_outputs(call, snapshot) == expected
    rep = fn(world, "decode", call, "reply")(py)
    assert norm(rep) == expected
    codec: CallCodec = world.codec.CALLS[call.opcode]
    req_tuple = codec.request_type(**req)
    assert codec.reply_cap_violation(req_tuple, rep) is None


@pytest.mark.parametrize(("world_name", "name"), SYNC)
@PROPERTY
@given(data=st.data())
def test_truncated_or_extended_replies_are_rejected_by_both(
    worlds: dict[str, World], world_name: str, name: str, data: st.DataObject
) -> None:
    world = worlds[world_name]
    call = world.table.by_name(name)
    req = draw_request(data, call)
    py = fn(world, "encode", call, "reply")(**draw_reply(data, call, req))
    extra = data.draw(st.binary(min_size=1, max_size=4), label="extra")
    cut = data.draw(st.integers(0, len(py) - 1), label="cut") if py else None
    bad_payloads = [py + extra] + ([py[:cut]] if cut is not None else [])
    for bad in bad_payloads:
        with pytest.raises(DecodeError, match=f"^{call.name} reply: "):
            fn(world, "decode", call, "reply")(bad)
        rc, snapshot = c_unmarshal(world, call, bad, caps_of(call, req))
        assert rc == -1
        assert untouched(call, snapshot)


def _mutations(payload: bytes) -> st.SearchStrategy[bytes]:
    n = len(payload)
    options = [
        st.binary(max_size=n + 16),
        st.binary(min_size=1, max_size=8).map(lambda b: payload + b),
    ]
    if n:
        options.append(st.integers(0, n - 1).map(lambda k: payload[:k]))
        options.append(
            st.tuples(st.integers(0, n - 1), st.integers(0, 255)).map(
                lambda t: payload[: t[0]] + bytes([t[1]]) + payload[t[0] + 1 :]
            )
        )
    if n >= 4:
        words = st.sampled_from([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 4097])
        options.append(
            st.tuples(st.integers(0, n - 4), words).map(
                lambda t: payload[: t[0]] + struct.pack("<I", t[1]) + payload[t[0] + 4 :]
            )
        )
    return st.one_of(options)


def _has_nan(values: Any) -> bool:
    return any(isinstance(v, float) and math.isnan(v) for v in values)


@pytest.mark.parametrize(("world_name", "name"), ALL)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_decoders_accept_only_canonical_payloads(
    worlds: dict[str, World], world_name: str, name: str, data: st.DataObject
) -> None:
    world = worlds[world_name]
    call = world.table.by_name(name)
    req = draw_request(data, call)
    payload = data.draw(_mutations(fn(world, "encode", call, "request")(**req)), label="request")
    try:
        decoded = fn(world, "decode", call, "request")(payload)
    except DecodeError as e:
        assert str(e).startswith(f"{call.name} request: ")
    else:
        if not _has_nan(decoded):
            assert fn(world, "encode", call, "request")(*decoded) == payload
    if call.is_async:
        return
    reply = fn(world, "encode", call, "reply")(**draw_reply(data, call, req))
    payload = data.draw(_mutations(reply), label="reply")
    bounds = {a.name: a.bound for a in call.out_args if a.kind == "blob"}
    rc, snapshot = c_unmarshal(world, call, payload, bounds, room=len(payload))
    try:
        rep = fn(world, "decode", call, "reply")(payload)
    except DecodeError as e:
        assert str(e).startswith(f"{call.name} reply: ")
        assert rc == -1 and untouched(call, snapshot)
    else:
        assert rc == 0  # C and Python accept exactly the same replies
        if not _has_nan(rep):
            assert fn(world, "encode", call, "reply")(*rep) == payload
            assert c_outputs(call, snapshot) == norm(rep)


# ---- specific malformed payloads ----------------------------------------------------------------


def test_out_blob_larger_than_the_callers_capacity(worlds: dict[str, World]) -> None:
    world = worlds["real"]
    call = world.table.by_name("cuMemcpyDtoH_v2")
    reply = real_codec.encode_cuMemcpyDtoH_v2_reply(b"12345678")
    rc, snapshot = c_unmarshal(world, call, reply, {"dstHost": 4})
    assert rc == -1 and untouched(call, snapshot)
    rc, snapshot = c_unmarshal(world, call, reply, {"dstHost": 8})
    assert rc == 0 and c_outputs(call, snapshot) == [b"12345678"]
    req = real_codec.cuMemcpyDtoH_v2_Request(srcDevice=0x1000, ByteCount=4)
    rep = real_codec.decode_cuMemcpyDtoH_v2_reply(reply)
    message = real_codec.CALLS[call.opcode].reply_cap_violation(req, rep)
    assert message is not None and "dstHost" in message and "ByteCount" in message


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (struct.pack("<I", 10) + b"abc", "dstHost is 10 bytes, only 3 left"),
        (struct.pack("<I", 0xFFFFFFFF) + b"abc", "more than the max"),
        (b"\x01\x00", "ends before the length of dstHost"),
        (b"", "ends before the length of dstHost"),
    ],
)
def test_bad_out_blob_lengths(worlds: dict[str, World], payload: bytes, match: str) -> None:
    world = worlds["real"]
    call = world.table.by_name("cuMemcpyDtoH_v2")
    with pytest.raises(DecodeError, match=f"cuMemcpyDtoH_v2 reply: .*{match}"):
        real_codec.decode_cuMemcpyDtoH_v2_reply(payload)
    rc, snapshot = c_unmarshal(world, call, payload, {"dstHost": 1 << 20})
    assert rc == -1 and untouched(call, snapshot)


@pytest.mark.parametrize(
    ("byte_count", "data", "match"),
    [
        (5, b"abcd", "srcHost needs ByteCount = 5 bytes, 4 left"),
        (3, b"abcd", "1 trailing bytes"),
        (2**63, b"abcd", "ByteCount = 9223372036854775808 is outside 0..67108848"),
        (
            IDM_MAX_PAYLOAD,
            b"",
            "ByteCount = 67108864 is outside 0..67108848 \\(length of srcHost\\)",
        ),
    ],
)
def test_length_of_mismatch_and_huge_lengths(byte_count: int, data: bytes, match: str) -> None:
    payload = struct.pack("<QQ", 0x1000, byte_count) + data
    with pytest.raises(DecodeError, match=f"^cuMemcpyHtoD_v2 request: {match}"):
        real_codec.decode_cuMemcpyHtoD_v2_request(payload)


def test_length_of_args_are_bounded_when_encoding(worlds: dict[str, World]) -> None:
    world = worlds["real"]
    htod = world.table.by_name("cuMemcpyHtoD_v2")
    bound = htod.arg("srcHost").bound
    vals = {"dstDevice": 1, "srcHost": world.ffi.NULL, "ByteCount": bound + 1}
    assert c_marshal(world, htod, vals, 1 << 27) is None
    assert c_marshal(world, htod, {**vals, "ByteCount": 4}, 64) is None  # NULL with a length
    assert c_marshal(world, htod, {**vals, "ByteCount": 0}, 64) == struct.pack("<QQ", 1, 0)
    with pytest.raises(EncodeError, match=r"srcHost is 4 bytes but ByteCount = 5"):
        real_codec.encode_cuMemcpyHtoD_v2_request(1, b"abcd", 5)
    # An out blob's capacity is bounded too: the reply must fit in one message.
    dtoh = world.table.by_name("cuMemcpyDtoH_v2")
    too_big = dtoh.arg("dstHost").bound + 1
    assert c_marshal(world, dtoh, {"srcDevice": 1, "ByteCount": too_big}, 64) is None
    with pytest.raises(EncodeError, match=r"ByteCount = 67108861 is outside"):
        real_codec.encode_cuMemcpyDtoH_v2_request(1, too_big)
    with pytest.raises(DecodeError, match=r"capacity of dstHost"):
        real_codec.decode_cuMemcpyDtoH_v2_request(struct.pack("<QQ", 1, too_big))


def test_negative_signed_lengths(worlds: dict[str, World]) -> None:
    world = worlds["real"]
    name = world.table.by_name("cuDeviceGetName")
    assert c_marshal(world, name, {"len": -1, "dev": 0}, 64) is None
    assert c_marshal(world, name, {"len": 257, "dev": 0}, 64) is None
    assert c_marshal(world, name, {"len": 256, "dev": 0}, 64) == struct.pack("<ii", 256, 0)
    with pytest.raises(EncodeError, match=r"len = -1 is outside 0..256"):
        real_codec.encode_cuDeviceGetName_request(-1, 0)
    with pytest.raises(DecodeError, match=r"^cuDeviceGetName request: len = -1 is outside"):
        real_codec.decode_cuDeviceGetName_request(struct.pack("<ii", -1, 0))
    syn = worlds["synthetic"]
    codec = syn.codec
    all_kinds = syn.table.by_name("allKinds")
    vals = dict(
        a=0, b=0, c=0, d=0, e=0.0, key=bytes(8), n1=-1, blob1=b"", label=b"x", blob2=b"",
        n2=0, s=0, cap1=0, cap2=0,
    )  # fmt: skip
    assert c_marshal(syn, all_kinds, vals, 4096) is None
    assert c_marshal(syn, all_kinds, {**vals, "n1": 0, "cap1": -5}, 4096) is None
    with pytest.raises(EncodeError, match=r"blob1 is 0 bytes but n1 = -1"):
        codec.encode_allKinds_request(**vals)
    good = codec.encode_allKinds_request(**{**vals, "n1": 0})
    fixed = syn.table.by_name("allKinds").request
    offset = sum(a.fixed_size for a in fixed.fixed[: [a.name for a in fixed.fixed].index("n1")])
    bad = good[:offset] + struct.pack("<h", -1) + good[offset + 2 :]
    with pytest.raises(DecodeError, match=r"n1 = -1 is outside 0..100 \(length of blob1\)"):
        codec.decode_allKinds_request(bad)


@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (struct.pack("<I", 3) + b"a\0b", "name contains a NUL byte"),
        (struct.pack("<I", 5000) + b"x" * 5000, "name is 5000 bytes, more than the max 4096"),
        (struct.pack("<I", 10) + b"abc", "name is 10 bytes, only 3 left"),
        (b"\x05\x00", "payload ends before the length of name"),
        (struct.pack("<I", 3) + b"abcd", "1 trailing bytes"),
    ],
)
def test_bad_cstrings_are_rejected(tail: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=f"^cuModuleGetFunction request: {match}"):
        real_codec.decode_cuModuleGetFunction_request(struct.pack("<Q", 7) + tail)


def test_cstrings_when_encoding(worlds: dict[str, World]) -> None:
    world = worlds["real"]
    call = world.table.by_name("cuModuleGetFunction")
    ok = c_marshal(world, call, {"hmod": 7, "name": b"k" * 4096}, 1 << 13)
    assert ok == real_codec.encode_cuModuleGetFunction_request(7, b"k" * 4096)
    assert real_codec.decode_cuModuleGetFunction_request(ok).name == b"k" * 4096
    assert c_marshal(world, call, {"hmod": 7, "name": b"k" * 4097}, 1 << 13) is None
    assert c_marshal(world, call, {"hmod": 7, "name": world.ffi.NULL}, 64) is None
    with pytest.raises(EncodeError, match=r"name contains a NUL byte"):
        real_codec.encode_cuModuleGetFunction_request(7, b"a\0b")
    with pytest.raises(EncodeError, match=r"name must be bytes, not str"):
        real_codec.encode_cuModuleGetFunction_request(7, "kernel")  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match=r"more than the max 4096"):
        real_codec.encode_cuModuleGetFunction_request(7, b"k" * 4097)


def test_encode_errors_name_the_field() -> None:
    with pytest.raises(EncodeError, match=r"^cuDeviceGet request: ordinal = 2147483648"):
        real_codec.encode_cuDeviceGet_request(2**31)
    with pytest.raises(EncodeError, match=r"^cuMemAlloc_v2 reply: dptr = -1"):
        real_codec.encode_cuMemAlloc_v2_reply(-1)
    with pytest.raises(EncodeError, match=r"^cuLaunchKernel request: gridDimY = 'x'"):
        real_codec.encode_cuLaunchKernel_request(1, 1, "x", 1, 1, 1, 1, 0, 0, 0, b"")  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match=r"uuid is 15 bytes, must be 16"):
        real_codec.encode_cuDeviceGetUuid_v2_reply(bytes(15))
    with pytest.raises(EncodeError, match=r"params is 32765 bytes, more than the max 32764"):
        real_codec.encode_cuLaunchKernel_request(1, 1, 1, 1, 1, 1, 1, 0, 0, 32765, bytes(32765))


def test_fixed_replies_reject_wrong_sizes(worlds: dict[str, World]) -> None:
    world = worlds["real"]
    call = world.table.by_name("cuMemGetInfo_v2")
    good = real_codec.encode_cuMemGetInfo_v2_reply(1 << 30, 1 << 34)
    assert c_outputs(call, c_unmarshal(world, call, good, {})[1]) == [1 << 30, 1 << 34]
    for bad in (good[:-1], good + b"\0", b""):
        with pytest.raises(DecodeError, match=f"payload is {len(bad)} bytes, expected 16"):
            real_codec.decode_cuMemGetInfo_v2_reply(bad)
        rc, snapshot = c_unmarshal(world, call, bad, {})
        assert rc == -1 and untouched(call, snapshot)


def test_total_payload_is_bounded(worlds: dict[str, World]) -> None:
    world = worlds["synthetic"]
    call = world.table.by_name("twoBlobs")
    assert call.arg("b1").bound == call.arg("b2").bound == IDM_MAX_PAYLOAD - 8
    half = IDM_MAX_PAYLOAD // 2
    big = world.ffi.new("uint8_t[]", half)
    vals = {"n1": half, "b1": big, "n2": half, "b2": big}
    assert c_marshal(world, call, vals, 2 * IDM_MAX_PAYLOAD) is None  # 8 + 64 MiB > max
    assert c_marshal(world, call, {**vals, "n2": half - 8}, 2 * IDM_MAX_PAYLOAD) is not None
    blob = bytes(half)
    with pytest.raises(EncodeError, match=r"twoBlobs request: 67108872 bytes, more than"):
        world.codec.encode_twoBlobs_request(half, blob, half, blob)


# ---- the C call table ---------------------------------------------------------------------------


def test_c_call_table_matches_python(worlds: dict[str, World]) -> None:
    world = worlds["real"]
    ffi, lib = world.ffi, world.lib
    assert lib.VGPU_NUM_CALLS == len(real_codec.CALLS) == len(world.table.calls)
    assert lib.VGPU_MAX_PAYLOAD == IDM_MAX_PAYLOAD
    assert int(real_codec.CALL_TABLE_DIGEST[:16], 16) == lib.VGPU_CALL_TABLE_DIGEST
    assert world.table.digest() == real_codec.CALL_TABLE_DIGEST
    opcodes = []
    for i in range(lib.VGPU_NUM_CALLS):
        info = lib.vgpu_calls[i]
        name = ffi.string(info.name).decode()
        call = world.table.by_name(name)
        assert info.opcode == call.opcode == getattr(lib, f"VGPU_OP_{name}")
        assert bool(info.is_async) == call.is_async == real_codec.CALLS[info.opcode].is_async
        assert info.req_fixed == call.request.fixed_size
        assert info.rep_fixed == (0 if call.is_async else call.reply.fixed_size)
        assert lib.vgpu_call_by_opcode(info.opcode) == lib.vgpu_calls + i
        opcodes.append(info.opcode)
    assert opcodes == sorted(opcodes)
    for unknown in (0, 1, 15, 0x0100, 0x0200, 0xFFFF, 0x10101):
        assert lib.vgpu_call_by_opcode(unknown) == ffi.NULL
    assert lib.VGPU_MAX_cuLaunchKernel_params == 32764
    assert lib.VGPU_SIZE_cuDeviceGetUuid_v2_uuid == 16


def test_python_codec_registry() -> None:
    table = load_call_table()
    assert sorted(real_codec.CALLS) == sorted(c.opcode for c in table.calls)
    for opcode, codec in real_codec.CALLS.items():
        call = table.by_name(codec.name)
        assert codec.opcode == opcode and real_codec.CALLS_BY_NAME[codec.name] is codec
        assert (codec.reply_type is None) == call.is_async == (codec.encode_reply is None)
        assert codec.request_type._fields == tuple(a.name for a in call.in_args)  # type: ignore[attr-defined]
    launch = real_codec.CALLS_BY_NAME["cuLaunchKernel"]
    assert [(h.field, h.kind, h.nullable) for h in launch.in_handles] == [
        ("f", "function", False),
        ("hStream", "stream", True),
    ]
    assert real_codec.CALLS_BY_NAME["cuCtxCreate_v2"].out_handles[0].kind == "context"
    assert real_codec.CALLS_BY_NAME["cuMemcpyDtoH_v2"].out_caps == (("dstHost", "ByteCount"),)


# ---- dispatch skeleton --------------------------------------------------------------------------

Handlers = dispatch_table.CallHandlers[list[str]]


def test_dispatch_covers_every_call() -> None:
    table = load_call_table()
    assert sorted(dispatch_table.DISPATCH) == sorted(c.opcode for c in table.calls)
    for opcode, entry in dispatch_table.DISPATCH.items():
        call = table.by_name(entry.name)
        assert call.opcode == opcode and entry.codec is real_codec.CALLS[opcode]
        assert entry.is_async == call.is_async == (entry.encode_reply is None)
        assert callable(getattr(dispatch_table.CallHandlers, entry.method))


def test_default_handlers_answer_not_supported(worlds: dict[str, World]) -> None:
    world = worlds["real"]
    ctx: list[str] = []
    for opcode, entry in dispatch_table.DISPATCH.items():
        call = world.table.by_name(entry.name)
        defaults = {"blob": b"", "cstring": b"k"}
        vals = {
            a.name: bytes(a.size or 0) if a.kind == "fixed_blob" else defaults.get(a.kind, 0)
            for a in call.in_args
        }
        if call.name == "cuDeviceGetUuid_v2":
            vals = {"dev": 0}
        payload = real_codec.CALLS[opcode].encode_request(**vals)
        assert dispatch_table.invoke(Handlers(), ctx, entry, payload) == (
            CUDA_ERROR_NOT_SUPPORTED,
            b"",
        )


class Backend(Handlers):
    def cuMemAlloc_v2(self, ctx: list[str], req: Any) -> Any:
        ctx.append(f"alloc {req.bytesize}")
        return real_codec.cuMemAlloc_v2_Reply(dptr=0x7F0000001000)

    def cuMemcpyDtoH_v2(self, ctx: list[str], req: Any) -> Any:
        return real_codec.cuMemcpyDtoH_v2_Reply(dstHost=b"\xab" * 8)  # ignores ByteCount

    def cuCtxSynchronize(self, ctx: list[str], req: Any) -> Any:
        return 700  # CUDA_ERROR_ILLEGAL_ADDRESS, sticky from an earlier async launch

    def cuLaunchKernel(self, ctx: list[str], req: Any) -> int:
        ctx.append(f"launch {bytes(req.params).hex()} on {req.hStream}")
        return CUDA_SUCCESS

    def cuDeviceGet(self, ctx: list[str], req: Any) -> Any:
        return CUDA_SUCCESS  # wrong: cuDeviceGet has an out value

    def cuMemFree_v2(self, ctx: list[str], req: Any) -> Any:
        return real_codec.cuMemAlloc_v2_Reply(dptr=1)  # wrong reply type


def test_invoke_runs_handlers(worlds: dict[str, World]) -> None:
    world = worlds["real"]
    d = dispatch_table.DISPATCH
    ctx: list[str] = []
    status, reply = dispatch_table.invoke(
        Backend(), ctx, d[0x0202], real_codec.encode_cuMemAlloc_v2_request(4096)
    )
    assert status == CUDA_SUCCESS and isinstance(reply, bytes)
    rc, snapshot = c_unmarshal(world, world.table.by_name("cuMemAlloc_v2"), reply, {})
    assert rc == 0 and snapshot["dptr"] == 0x7F0000001000
    launch = real_codec.encode_cuLaunchKernel_request(5, 1, 1, 1, 32, 1, 1, 0, 9, 2, b"\x01\x02")
    assert dispatch_table.invoke(Backend(), ctx, d[0x0510], launch) == (CUDA_SUCCESS, b"")
    assert ctx == ["alloc 4096", "launch 0102 on 9"]
    sync = real_codec.encode_cuCtxSynchronize_request()
    assert dispatch_table.invoke(Backend(), ctx, d[0x0303], sync) == (700, b"")


def test_invoke_refuses_what_a_call_cannot_carry() -> None:
    d = dispatch_table.DISPATCH
    with pytest.raises(EncodeError, match=r"dstHost is 8 bytes, more than the 4 requested by"):
        dispatch_table.invoke(
            Backend(), [], d[0x0211], real_codec.encode_cuMemcpyDtoH_v2_request(1, 4)
        )
    status, parts = dispatch_table.invoke(
        Backend(), [], d[0x0211], real_codec.encode_cuMemcpyDtoH_v2_request(1, 8)
    )
    assert isinstance(parts, tuple)  # gathered by the server, not joined
    assert (status, b"".join(parts)) == (CUDA_SUCCESS, struct.pack("<I", 8) + b"\xab" * 8)
    with pytest.raises(EncodeError, match=r"cuDeviceGet: handler returned CUDA_SUCCESS without"):
        dispatch_table.invoke(Backend(), [], d[0x0104], real_codec.encode_cuDeviceGet_request(0))
    with pytest.raises(EncodeError, match=r"cuMemFree_v2: handler returned cuMemAlloc_v2_Reply"):
        dispatch_table.invoke(Backend(), [], d[0x0203], real_codec.encode_cuMemFree_v2_request(1))
    with pytest.raises(DecodeError, match=r"^cuMemAlloc_v2 request: payload is 3 bytes"):
        dispatch_table.invoke(Backend(), [], d[0x0202], b"abc")
