"""The call table: one declarative source (idm/calls.toml) for every forwarded CUDA call.

`load_call_table()` parses the TOML with tomllib, validates it with the pydantic models below and
resolves every argument's type, so that the code generator (idm/codegen.py) only ever sees a
consistent table. The wire encoding derived from it is described in idm/codegen.py.

Table format::

    [scalars]                         # typedef -> C spelling; the wire type follows from it
    CUdeviceptr = "unsigned long long"
    [handles]                         # opaque CUDA handle type -> handle kind (HANDLE_KINDS)
    CUstream = "stream"

    [[call]]
    name = "cuMemAlloc_v2"            # the CUDA driver API entry point it implements
    opcode = 0x0202                   # IDM_OP_FIRST_CALL .. IDM_OP_MAX, unique
    mode = "sync"                     # or "async": fire-and-forget, no reply, no out args
    args = [                          # in the CUDA prototype's order
      { name = "dptr", dir = "out", type = "CUdeviceptr" },
      { name = "bytesize", dir = "in", type = "size_t" },
    ]

Argument types: a builtin scalar (BUILTIN_SCALARS), a `[scalars]` typedef, a `[handles]` type,
`bytes` (a blob: either `size = N` fixed bytes, or `len = "<in integer scalar arg>"`, the
length-of relation; optional `max`), or `cstring` (in only, NUL-free, optional `max`, default
CSTRING_MAX). Handles may say `nullable = true` (0 is allowed: default stream, no context).
Every call and arg may carry a `doc` string.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from idm.callcodec import IDM_MAX_PAYLOAD, IDM_OP_FIRST_CALL, IDM_OP_MAX, DecodeError

__all__ = [
    "BUILTIN_SCALARS",
    "CSTRING_MAX",
    "C_SCALARS",
    "HANDLE_KINDS",
    "IDM_MAX_PAYLOAD",
    "IDM_OP_FIRST_CALL",
    "IDM_OP_MAX",
    "WIRES",
    "Arg",
    "Call",
    "CallTable",
    "CallTableError",
    "DecodeError",
    "Layout",
    "Wire",
    "load_call_table",
    "parse_call_table",
]

DEFAULT_TABLE = Path(__file__).with_name("calls.toml")

CSTRING_MAX = 4096  # default bound on a cstring's length (bytes, without the NUL)
FIXED_BLOB_MAX = 4096  # largest `size = N` blob (these sit in the fixed part)
BLOB_PREFIX = 4  # u32 length before each cstring (request) and variable out blob (reply)


@dataclass(frozen=True, slots=True)
class Wire:
    """A primitive wire type: little-endian, no padding."""

    name: str
    fmt: str  # struct format character
    size: int
    is_int: bool
    signed: bool

    @property
    def lo(self) -> int:
        return -(1 << (8 * self.size - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        return (1 << (8 * self.size - (1 if self.signed else 0))) - 1


WIRES: dict[str, Wire] = {
    w.name: w
    for w in (
        Wire("u8", "B", 1, True, False),
        Wire("u16", "H", 2, True, False),
        Wire("u32", "I", 4, True, False),
        Wire("u64", "Q", 8, True, False),
        Wire("i8", "b", 1, True, True),
        Wire("i16", "h", 2, True, True),
        Wire("i32", "i", 4, True, True),
        Wire("i64", "q", 8, True, True),
        Wire("f32", "f", 4, False, True),
        Wire("f64", "d", 8, False, True),
    )
}

# C spellings the generated C may use for scalars, and the wire type each travels as. The
# generated C depends on nothing but <stdint.h>/<stddef.h>/<string.h>, so CUDA typedefs are
# spelled as the C types cuda.h gives them (pointers to them must stay compatible).
C_SCALARS: dict[str, str] = {
    "uint8_t": "u8",
    "uint16_t": "u16",
    "uint32_t": "u32",
    "uint64_t": "u64",
    "int8_t": "i8",
    "int16_t": "i16",
    "int32_t": "i32",
    "int64_t": "i64",
    "unsigned char": "u8",
    "signed char": "i8",
    "short": "i16",
    "unsigned short": "u16",
    "int": "i32",
    "unsigned int": "u32",
    "long long": "i64",
    "unsigned long long": "u64",
    "size_t": "u64",
    "float": "f32",
    "double": "f64",
}

# Scalar type names usable without a [scalars] entry -> C spelling.
BUILTIN_SCALARS: dict[str, str] = {
    "u8": "uint8_t",
    "u16": "uint16_t",
    "u32": "uint32_t",
    "u64": "uint64_t",
    "i8": "int8_t",
    "i16": "int16_t",
    "i32": "int32_t",
    "i64": "int64_t",
    "int": "int",
    "uint": "unsigned int",
    "size_t": "size_t",
    "float": "float",
    "double": "double",
}

# Handle kinds gpu-proxy keeps per-zone tables for. A new kind needs proxy support first.
HANDLE_KINDS = frozenset(
    {
        "context",
        "module",
        "function",
        "stream",
        "event",
        "library",
        "kernel",
        "graph",
        "graph_exec",
        "graph_node",
        "array",
        "mipmapped_array",
        "memory_pool",
        "link_state",
        "green_ctx",
    }
)

_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

# Names generated code must not see as arg names (the C and Python generators prefix their own
# locals with vgpu_ / _, so only keywords and names used unprefixed are listed).
_C_KEYWORDS = frozenset(
    {
        "auto",
        "break",
        "case",
        "char",
        "const",
        "continue",
        "default",
        "do",
        "double",
        "else",
        "enum",
        "extern",
        "float",
        "for",
        "goto",
        "if",
        "inline",
        "int",
        "long",
        "register",
        "restrict",
        "return",
        "short",
        "signed",
        "sizeof",
        "static",
        "struct",
        "switch",
        "typedef",
        "union",
        "unsigned",
        "void",
        "volatile",
        "while",
        "_Alignas",
        "_Alignof",
        "_Atomic",
        "_Bool",
        "_Complex",
        "_Generic",
        "_Imaginary",
        "_Noreturn",
        "_Static_assert",
        "_Thread_local",
        "bool",
        "true",
        "false",
        "NULL",
        "memcpy",
        "strlen",
        "size_t",
        "SIZE_MAX",
        "uint8_t",
        "uint16_t",
        "uint32_t",
        "uint64_t",
        "int8_t",
        "int16_t",
        "int32_t",
        "int64_t",
    }
)
_PY_RESERVED = frozenset({"count", "index", "int", "float", "bytes", "self"})


# Docs are copied into generated C comments and Python docstrings.
_DOC_FORBIDDEN = ("*/", '"""', "\\", "\n")


class CallTableError(ValueError):
    """The call table is invalid. The message names the call and argument at fault."""


ArgKind = Literal["scalar", "handle", "blob", "fixed_blob", "cstring"]


class Arg(BaseModel):
    """One argument of a call, in the CUDA prototype's order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dir: Literal["in", "out"]
    type: str
    len: str | None = None  # length-of: the in integer scalar giving this blob's length/capacity
    size: int | None = Field(default=None, ge=1, le=FIXED_BLOB_MAX)  # fixed-size blob
    max: int | None = Field(default=None, ge=1, le=IDM_MAX_PAYLOAD)  # bound on a blob/cstring
    nullable: bool = False  # handles only: 0 is a valid value
    doc: str = ""

    # Resolved by CallTable validation.
    _kind: ArgKind | None = PrivateAttr(default=None)
    _wire: Wire | None = PrivateAttr(default=None)
    _c_type: str | None = PrivateAttr(default=None)
    _handle_kind: str | None = PrivateAttr(default=None)
    _bound: int | None = PrivateAttr(default=None)

    @property
    def kind(self) -> ArgKind:
        assert self._kind is not None, "arg not resolved (use load_call_table)"
        return self._kind

    @property
    def wire(self) -> Wire:
        """Wire type of a scalar or handle (handles travel as u64 ids)."""
        assert self._wire is not None, f"{self.name} has no scalar wire type"
        return self._wire

    @property
    def c_type(self) -> str:
        """C spelling of a scalar (handles: uint64_t)."""
        assert self._c_type is not None, f"{self.name} has no C scalar type"
        return self._c_type

    @property
    def handle_kind(self) -> str:
        assert self._handle_kind is not None, f"{self.name} is not a handle"
        return self._handle_kind

    @property
    def bound(self) -> int:
        """Largest length accepted for a variable blob or cstring."""
        assert self._bound is not None, f"{self.name} is not a variable-length arg"
        return self._bound

    @property
    def is_fixed(self) -> bool:
        """Lives in the fixed part of its payload (scalars, handles, fixed-size blobs)."""
        return self.kind in ("scalar", "handle", "fixed_blob")

    @property
    def fixed_size(self) -> int:
        if self.kind == "fixed_blob":
            assert self.size is not None
            return self.size
        return self.wire.size

    @property
    def struct_fmt(self) -> str:
        if self.kind == "fixed_blob":
            return f"{self.size}s"
        return self.wire.fmt


@dataclass(frozen=True, slots=True)
class Layout:
    """One payload direction: fixed part (packed, table order) then the variable tail."""

    fixed: tuple[Arg, ...]
    tail: tuple[Arg, ...]

    @property
    def fixed_size(self) -> int:
        return sum(a.fixed_size for a in self.fixed)

    @property
    def struct_fmt(self) -> str:
        return "<" + "".join(a.struct_fmt for a in self.fixed)


class Call(BaseModel):
    """One forwarded CUDA driver call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    opcode: int
    mode: Literal["sync", "async"]
    args: list[Arg] = Field(default_factory=list)
    doc: str = ""

    @property
    def is_async(self) -> bool:
        return self.mode == "async"

    @property
    def in_args(self) -> list[Arg]:
        return [a for a in self.args if a.dir == "in"]

    @property
    def out_args(self) -> list[Arg]:
        return [a for a in self.args if a.dir == "out"]

    def arg(self, name: str) -> Arg:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(name)

    def layout(self, direction: Literal["in", "out"]) -> Layout:
        args = self.in_args if direction == "in" else self.out_args
        return Layout(
            fixed=tuple(a for a in args if a.is_fixed),
            tail=tuple(a for a in args if not a.is_fixed),
        )

    @property
    def request(self) -> Layout:
        return self.layout("in")

    @property
    def reply(self) -> Layout:
        return self.layout("out")


class CallTable(BaseModel):
    """The whole table, validated and resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    scalars: dict[str, str] = Field(default_factory=dict)
    handles: dict[str, str] = Field(default_factory=dict)
    calls: list[Call] = Field(default_factory=list, alias="call")

    @model_validator(mode="after")
    def _validate(self) -> CallTable:
        problems = _check_types(self) + _check_calls(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def sorted_calls(self) -> list[Call]:
        return sorted(self.calls, key=lambda c: c.opcode)

    def by_name(self, name: str) -> Call:
        for c in self.calls:
            if c.name == name:
                return c
        raise KeyError(name)

    def digest(self) -> str:
        """SHA-256 (hex) over everything that affects the wire: both ends can compare it."""
        canon = [
            [
                c.opcode,
                c.name,
                c.mode,
                [
                    [a.name, a.dir, a.kind, _wire_desc(a), a.len, a.size, _bound_or_none(a)]
                    for a in c.args
                ],
            ]
            for c in self.sorted_calls()
        ]
        return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()


def _wire_desc(a: Arg) -> str | None:
    if a.kind == "handle":
        return f"u64:{a.handle_kind}"
    if a.kind == "scalar":
        return a.wire.name
    return None


def _bound_or_none(a: Arg) -> int | None:
    return a.bound if a.kind in ("blob", "cstring") else None


def _where(call: Call, arg: Arg | None = None) -> str:
    s = f"call '{call.name}' (opcode {call.opcode:#06x})"
    return f"{s}, arg '{arg.name}'" if arg is not None else s


def _check_types(t: CallTable) -> list[str]:
    problems: list[str] = []
    for name, c in t.scalars.items():
        if not _IDENT.match(name) or name in BUILTIN_SCALARS or name in ("bytes", "cstring"):
            problems.append(f"[scalars] '{name}': not a valid new type name")
        if c not in C_SCALARS:
            problems.append(
                f"[scalars] '{name}': unknown C type '{c}' (one of: {', '.join(C_SCALARS)})"
            )
    for name, kind in t.handles.items():
        if not _IDENT.match(name) or name in BUILTIN_SCALARS or name in t.scalars:
            problems.append(f"[handles] '{name}': not a valid new type name")
        if kind not in HANDLE_KINDS:
            problems.append(
                f"[handles] '{name}': unknown handle kind '{kind}' "
                f"(one of: {', '.join(sorted(HANDLE_KINDS))})"
            )
    return problems


def _check_calls(t: CallTable) -> list[str]:
    problems: list[str] = []
    by_name: dict[str, Call] = {}
    by_opcode: dict[int, Call] = {}
    for call in t.calls:
        if call.name in by_name:
            problems.append(
                f"{_where(call)}: duplicate call name (also opcode "
                f"{by_name[call.name].opcode:#06x})"
            )
        by_name.setdefault(call.name, call)
        if call.opcode in by_opcode:
            problems.append(
                f"{_where(call)}: duplicate opcode, already used by '{by_opcode[call.opcode].name}'"
            )
        by_opcode.setdefault(call.opcode, call)
        problems += _check_call(t, call)
    return problems


def _check_call(t: CallTable, call: Call) -> list[str]:
    problems: list[str] = []
    if not _IDENT.match(call.name) or keyword.iskeyword(call.name):
        problems.append(f"{_where(call)}: name must be an identifier [A-Za-z][A-Za-z0-9_]*")
    if not IDM_OP_FIRST_CALL <= call.opcode <= IDM_OP_MAX:
        problems.append(
            f"{_where(call)}: opcode must be in {IDM_OP_FIRST_CALL:#x}..{IDM_OP_MAX:#x} "
            f"(0..{IDM_OP_FIRST_CALL - 1} are channel-level opcodes, see idm.h)"
        )
    for doc in [call.doc] + [a.doc for a in call.args]:
        if any(bad in doc for bad in _DOC_FORBIDDEN):
            problems.append(f"{_where(call)}: docs must not contain {_DOC_FORBIDDEN}")
    seen: set[str] = set()
    for arg in call.args:
        where = _where(call, arg)
        if arg.name in seen:
            problems.append(f"{where}: duplicate arg name")
        seen.add(arg.name)
        problems += _check_name(where, arg.name)
        problems += _resolve(t, where, arg)
        if call.is_async and arg.dir == "out":
            problems.append(f"{where}: async (fire-and-forget) calls cannot have out args")
    if problems:
        return problems
    # Cross-arg checks, now that every arg is resolved.
    c_params = ["vgpu_buf", "vgpu_cap", "vgpu_len"]
    for arg in call.args:
        where = _where(call, arg)
        c_params.append(arg.name)
        if arg.kind == "blob" and arg.dir == "out":
            c_params += [f"{arg.name}_cap", f"{arg.name}_len"]
        if arg.len is None:
            continue
        target = next((a for a in call.args if a.name == arg.len), None)
        if target is None:
            problems.append(f"{where}: len = '{arg.len}' names no arg of this call")
        elif target.dir != "in" or target.kind != "scalar" or not target.wire.is_int:
            problems.append(
                f"{where}: len = '{arg.len}' must name an 'in' integer scalar arg "
                f"(it is: {target.dir} {target.kind} of type {target.type})"
            )
    dupes = sorted({p for p in c_params if c_params.count(p) > 1})
    if dupes:
        problems.append(f"{_where(call)}: generated C parameter names collide: {dupes}")
    for direction in ("in", "out"):
        # A blob without an explicit max may take whatever its payload leaves.
        lay = call.layout(direction)
        n_prefixed = sum(1 for a in lay.tail if a.kind == "cstring" or a.dir == "out")
        room = IDM_MAX_PAYLOAD - lay.fixed_size - BLOB_PREFIX * n_prefixed
        for arg in lay.tail:
            if arg.kind == "blob" and arg.max is None:
                arg._bound = room
            elif arg.bound > room:
                problems.append(
                    f"{_where(call, arg)}: max = {arg.bound} cannot fit in one payload "
                    f"(at most {room} bytes after the fixed part and length prefixes)"
                )
    return problems


def _check_name(where: str, name: str) -> list[str]:
    if not _IDENT.match(name):
        return [f"{where}: arg name must be an identifier [A-Za-z][A-Za-z0-9_]*"]
    if keyword.iskeyword(name) or name in _PY_RESERVED or name in _C_KEYWORDS:
        return [f"{where}: arg name '{name}' is reserved in generated C or Python code"]
    if name.startswith("vgpu_"):
        return [f"{where}: arg names must not start with 'vgpu_' (generated C uses it)"]
    return []


def _resolve(t: CallTable, where: str, arg: Arg) -> list[str]:
    """Work out an arg's kind and wire type; report misplaced options."""
    problems: list[str] = []
    ty = arg.type
    kind: ArgKind
    if ty == "bytes":
        if (arg.len is None) == (arg.size is None):
            return [f"{where}: a bytes arg needs exactly one of len = '<in arg>' or size = N"]
        kind = "blob" if arg.len is not None else "fixed_blob"
        if kind == "fixed_blob" and arg.max is not None:
            problems.append(f"{where}: max is only for variable-length bytes (it has size)")
    elif ty == "cstring":
        kind = "cstring"
        if arg.dir != "in":
            problems.append(f"{where}: cstring args must be dir = 'in' (use bytes for output)")
    elif ty in t.handles:
        kind = "handle"
        arg._handle_kind = t.handles[ty]
        arg._wire = WIRES["u64"]
        arg._c_type = "uint64_t"
    elif ty in BUILTIN_SCALARS or ty in t.scalars:
        kind = "scalar"
        c_type = BUILTIN_SCALARS.get(ty) or t.scalars[ty]
        if c_type not in C_SCALARS:
            return [f"{where}: type '{ty}' has an unknown C type"]  # reported by _check_types
        arg._wire = WIRES[C_SCALARS[c_type]]
        arg._c_type = c_type
    else:
        return [
            f"{where}: unknown type '{ty}' (a builtin scalar {sorted(BUILTIN_SCALARS)}, "
            "a [scalars] or [handles] entry, 'bytes' or 'cstring')"
        ]
    if kind not in ("blob", "fixed_blob"):
        if arg.len is not None:
            problems.append(f"{where}: len is only for bytes args")
        if arg.size is not None:
            problems.append(f"{where}: size is only for bytes args")
    if kind in ("scalar", "handle") and arg.max is not None:
        problems.append(f"{where}: max is only for variable-length bytes and cstring args")
    if kind != "handle" and arg.nullable:
        problems.append(f"{where}: nullable is only for handle args")
    arg._kind = kind
    if kind == "cstring":
        arg._bound = arg.max if arg.max is not None else CSTRING_MAX
    elif kind == "blob" and arg.max is not None:
        arg._bound = arg.max
    return problems


def parse_call_table(text: str, source: str = "<string>") -> CallTable:
    """Parse and validate a call table given as TOML text. Raises CallTableError."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CallTableError(f"{source}: not valid TOML: {e}") from None
    try:
        table = CallTable.model_validate(raw)
    except ValidationError as e:
        raise CallTableError(_format_errors(source, raw, e)) from None
    return table


def load_call_table(path: Path | str | None = None) -> CallTable:
    """Load idm/calls.toml (or `path`), validated and resolved. Raises CallTableError."""
    p = Path(path) if path is not None else DEFAULT_TABLE
    return parse_call_table(p.read_text(encoding="utf-8"), source=p.name)


def _format_errors(source: str, raw: dict[str, Any], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = e["loc"]
        msg = e["msg"].removeprefix("Value error, ")
        if not loc:  # our own model validator: messages already name call and arg
            lines += [f"{source}: {m}" for m in msg.split("\n")]
            continue
        lines.append(f"{source}: {_describe_loc(raw, loc)}: {msg}")
    return "\n".join(lines)


def _describe_loc(raw: dict[str, Any], loc: tuple[int | str, ...]) -> str:
    """('call', 3, 'args', 1, 'dir') -> "call 'cuFoo' (#4), arg 'x' (#2), field 'dir'"."""
    parts: list[str] = []
    node: Any = raw
    i = 0
    while i < len(loc):
        key = loc[i]
        if key in ("call", "args") and i + 1 < len(loc) and isinstance(loc[i + 1], int):
            idx = loc[i + 1]
            assert isinstance(idx, int)
            try:
                node = node[key][idx]
                name = node.get("name", "?") if isinstance(node, dict) else "?"
            except (KeyError, IndexError, TypeError):
                node, name = None, "?"
            parts.append(f"{'call' if key == 'call' else 'arg'} '{name}' (#{idx + 1})")
            i += 2
        else:
            parts.append(f"field '{'.'.join(str(k) for k in loc[i:])}'")
            break
    return ", ".join(parts)
