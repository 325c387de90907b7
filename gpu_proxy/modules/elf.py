"""ELF64 cubin reading: just enough to list a module's kernels and their parameter layout.

Images come from zones, so every offset, size and count read from one is checked against the
image before use; anything inconsistent raises `ModuleImageError` naming what is wrong.
"""

from __future__ import annotations

import bisect
import re
import struct
from dataclasses import dataclass
from typing import Any

ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
SHT_SYMTAB = 2
SHT_NOBITS = 8
STT_OBJECT = 1
STT_FUNC = 2
STO_CUDA_ENTRY = 0x10  # st_other bit nvcc sets on __global__ functions
SHN_XINDEX = 0xFFFF
# Before ELF ABI version 8 the SM number sat in e_flags bits 0-7; since then in bits 8-15.
_NEW_ABI_VERSION = 8

# .nv.info attribute record formats: a 4-byte header (format, attribute, 2-byte field); for
# SVAL the field is the length of the value that follows, otherwise it is the value itself.
EIFMT_NVAL = 0x01
EIFMT_BVAL = 0x02
EIFMT_HVAL = 0x03
EIFMT_SVAL = 0x04
EIATTR_PARAM_CBANK = 0x0A  # SVAL: u32 bank symbol, u16 offset, u16 total parameter bytes
EIATTR_KPARAM_INFO = 0x17  # SVAL: u32 index, u16 ordinal, u16 offset, u32 packed (size<<18)
EIATTR_CBANK_PARAM_SIZE = 0x19  # HVAL: total parameter bytes
# nvcc 12.1+ for parameter lists past 4 KiB: u32 index, u16 ordinal, u16 offset, u16 size, u16
EIATTR_KPARAM_INFO_V2 = 0x45
EIATTR_MAX_THREADS = 0x05  # SVAL: u32 x, y, z (__launch_bounds__)
EIATTR_FRAME_SIZE = 0x11  # SVAL in .nv.info: u32 symbol index, u32 local bytes per thread
EIATTR_REGCOUNT = 0x2F  # SVAL in .nv.info: u32 symbol index, u32 registers per thread
# Shared memory the hardware keeps per block (sm_80 and later); see _shared_static.
RESERVED_SHARED = 1024

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_KPARAM = struct.Struct("<IHHI")
_KPARAM_V2 = struct.Struct("<IHHH")
_PARAM_CBANK = struct.Struct("<IHH")
_MAX_THREADS = struct.Struct("<III")
_SYMBOL_VALUE = struct.Struct("<II")


class ModuleImageError(ValueError):
    """The image is malformed or uses a feature this parser does not support."""


class NoCompatibleImageError(ModuleImageError):
    """The image is well formed but has no code for the requested SM (NO_BINARY_FOR_GPU)."""


@dataclass(frozen=True, slots=True)
class ParamInfo:
    """One kernel parameter: its position and where it lands in the parameter buffer."""

    index: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class KernelAttributes:
    """What `cuFuncGetAttribute` reports of a cubin kernel (a PTX kernel's are known only after
    the driver compiles it). `max_threads` is the product of its launch bounds, 0 for none."""

    num_regs: int = 0
    shared_static: int = 0
    const_bytes: int = 0
    local_bytes: int = 0
    max_threads: int = 0
    arch: int = 0


@dataclass(frozen=True, slots=True)
class KernelInfo:
    """A kernel's name (as in the symbol table), the layout `cuLaunchKernel` must marshal and,
    for cubin code, its attributes."""

    name: str
    params: tuple[ParamInfo, ...]
    param_bytes: int
    attributes: KernelAttributes | None = None


@dataclass(frozen=True, slots=True)
class GlobalInfo:
    """A module-scope `__device__` or `__constant__` variable: the driver allocates `size` bytes
    of device memory for it when the module is loaded, filled from `init` (zeros past its end).
    Initialisers that hold addresses (relocations) are not applied: those bytes stay zero."""

    name: str
    size: int
    init: bytes


@dataclass(frozen=True, slots=True)
class Cubin:
    """What a cubin tells the proxy: the SM it was built for, its kernels and its variables."""

    arch: int
    kernels: dict[str, KernelInfo]
    globals: dict[str, GlobalInfo]


@dataclass(frozen=True, slots=True)
class _Section:
    name: str
    type: int
    offset: int
    size: int
    link: int
    info: int
    entsize: int


def unpack(fmt: struct.Struct, data: bytes, offset: int, what: str) -> tuple[Any, ...]:
    """`fmt.unpack_from` that names `what` instead of raising struct.error on a short image."""
    if offset < 0 or offset + fmt.size > len(data):
        raise ModuleImageError(
            f"{what} at offset {offset:#x} ({fmt.size} bytes) runs past the image "
            f"({len(data)} bytes)"
        )
    return fmt.unpack_from(data, offset)


class _Strings:
    """String-table lookups that stay linear on hostile tables: NUL positions are indexed once,
    and the bytes decoded across all tables of one image are capped at twice its size."""

    def __init__(self, table: bytes, budget: list[int]) -> None:
        self._table = table
        self._nuls = [m.start() for m in re.finditer(b"\0", table)]
        self._budget = budget

    def get(self, offset: int, what: str) -> str:
        if offset >= len(self._table):
            raise ModuleImageError(f"{what}: string offset {offset:#x} outside its table")
        i = bisect.bisect_left(self._nuls, offset)
        if i == len(self._nuls):
            raise ModuleImageError(f"{what}: string at {offset:#x} is not NUL-terminated")
        end = self._nuls[i]
        self._budget[0] -= end - offset
        if self._budget[0] < 0:
            raise ModuleImageError(f"{what}: names add up to more than twice the image size")
        try:
            return self._table[offset:end].decode("ascii")
        except UnicodeDecodeError as exc:
            raise ModuleImageError(f"{what}: string at {offset:#x} is not ASCII") from exc


def _section_bytes(data: bytes, sec: _Section) -> bytes:
    if sec.offset + sec.size > len(data):
        raise ModuleImageError(
            f"section {sec.name or '?'}: [{sec.offset:#x}, +{sec.size:#x}) runs past the image "
            f"({len(data)} bytes)"
        )
    return data[sec.offset : sec.offset + sec.size]


def _sections(
    data: bytes, shoff: int, shnum: int, shentsize: int, shstrndx: int, budget: list[int]
) -> list[_Section]:
    if shoff == 0:
        raise ModuleImageError("ELF has no section header table")
    if shentsize != _SHDR.size:
        raise ModuleImageError(f"ELF section header size {shentsize}, expected {_SHDR.size}")
    first = unpack(_SHDR, data, shoff, "section header 0")
    if shnum == 0:  # extended numbering: the real count is in section 0's sh_size
        shnum = first[5]
    if shstrndx == SHN_XINDEX:
        shstrndx = first[6]
    if shoff + shnum * _SHDR.size > len(data):
        raise ModuleImageError(f"ELF section header table ({shnum} entries) runs past the image")
    raw = [unpack(_SHDR, data, shoff + i * _SHDR.size, f"section header {i}") for i in range(shnum)]
    if not 0 < shstrndx < shnum:
        raise ModuleImageError(f"ELF section name table index {shstrndx} out of range")
    _, _, _, _, str_off, str_size, *_ = raw[shstrndx]
    names = _Strings(
        _section_bytes(data, _Section(".shstrtab", 0, str_off, str_size, 0, 0, 0)), budget
    )
    sections = []
    for i, (name, stype, _flags, _addr, off, size, link, info, _align, entsize) in enumerate(raw):
        sname = names.get(name, f"section {i} name") if i else ""
        sections.append(_Section(sname, stype, off, size, link, info, entsize))
    return sections


def elf_arch(data: bytes) -> int:
    """The SM number a cubin was built for, after checking the ELF header is a CUDA one."""
    ident, _type, machine, _ver, _entry, _phoff, _shoff, flags, *_ = unpack(
        _EHDR, data, 0, "ELF header"
    )
    if ident[:4] != ELF_MAGIC:
        raise ModuleImageError("not an ELF image")
    if ident[4] != 2 or ident[5] != 1:
        raise ModuleImageError("cubin is not ELF64 little-endian")
    if machine != EM_CUDA:
        raise ModuleImageError(f"ELF machine {machine} is not EM_CUDA ({EM_CUDA})")
    arch: int = (flags >> 8) & 0xFF if ident[8] >= _NEW_ABI_VERSION else flags & 0xFF
    if arch == 0:
        raise ModuleImageError(f"cubin e_flags {flags:#x} name no SM architecture")
    return arch


def _entry_symbols(
    data: bytes, symtab: _Section, sections: list[_Section], budget: list[int]
) -> list[tuple[int, str]]:
    """(symbol index, name) of the function symbols marked as kernel entry points."""
    if symtab.entsize != _SYM.size:
        raise ModuleImageError(f"symbol table entry size {symtab.entsize}, expected {_SYM.size}")
    if not 0 < symtab.link < len(sections):
        raise ModuleImageError(f"symbol table string table index {symtab.link} out of range")
    table = _section_bytes(data, symtab)
    strings = _Strings(_section_bytes(data, sections[symtab.link]), budget)
    out = []
    for i in range(len(table) // _SYM.size):
        name, info, other, _shndx, _value, _size = _SYM.unpack_from(table, i * _SYM.size)
        if info & 0xF == STT_FUNC and other & STO_CUDA_ENTRY:
            out.append((i, strings.get(name, f"symbol {i} name")))
    return out


def _is_variable_section(name: str) -> bool:
    """Sections holding module variables: `.nv.global` (zeroed), `.nv.global.init` and the
    user constant bank `.nv.constantN` (kernel parameter banks `.nv.constant0.<kernel>` hold no
    OBJECT symbols)."""
    return name in (".nv.global", ".nv.global.init") or name.startswith(".nv.constant")


def _global_symbols(
    data: bytes, symtab: _Section, sections: list[_Section], budget: list[int]
) -> dict[str, GlobalInfo]:
    """Module variables: OBJECT symbols defined in a variable section, with their initial
    bytes (none for a NOBITS section)."""
    table = _section_bytes(data, symtab)
    strings = _Strings(_section_bytes(data, sections[symtab.link]), budget)
    out: dict[str, GlobalInfo] = {}
    for i in range(len(table) // _SYM.size):
        name_off, info, _other, shndx, value, size = _SYM.unpack_from(table, i * _SYM.size)
        if info & 0xF != STT_OBJECT or not 0 < shndx < len(sections) or size == 0:
            continue
        sec = sections[shndx]
        if not _is_variable_section(sec.name):
            continue
        name = strings.get(name_off, f"symbol {i} name")
        if value + size > sec.size:
            raise ModuleImageError(
                f"variable {name}: [{value:#x}, +{size:#x}) runs past section {sec.name} "
                f"({sec.size:#x} bytes)"
            )
        if name in out:
            raise ModuleImageError(f"variable {name} defined twice")
        init = b"" if sec.type == SHT_NOBITS else _section_bytes(data, sec)[value : value + size]
        out[name] = GlobalInfo(name, size, init)
    return out


def _attributes(info: bytes, what: str) -> list[tuple[int, bytes]]:
    """Split an `.nv.info*` section into (attribute, value bytes) records."""
    records = []
    pos = 0
    while pos < len(info):
        if pos + 4 > len(info):
            raise ModuleImageError(f"{what}: truncated attribute header at {pos:#x}")
        fmt, attr, field = (
            info[pos],
            info[pos + 1],
            int.from_bytes(info[pos + 2 : pos + 4], "little"),
        )
        pos += 4
        if fmt == EIFMT_SVAL:
            if pos + field > len(info):
                raise ModuleImageError(
                    f"{what}: attribute {attr:#x} value ({field} bytes) runs past the section"
                )
            records.append((attr, info[pos : pos + field]))
            pos += field
        elif fmt in (EIFMT_NVAL, EIFMT_BVAL, EIFMT_HVAL):
            records.append((attr, info[pos - 2 : pos]))
        else:
            raise ModuleImageError(f"{what}: unknown attribute format {fmt:#x} at {pos - 4:#x}")
    return records


def kernel_info(name: str, info: bytes) -> KernelInfo:
    """Parameter layout of kernel `name` from its `.nv.info.<name>` section."""
    what = f".nv.info.{name}"
    by_ordinal: dict[int, ParamInfo] = {}
    cbank_bytes: int | None = None
    declared_bytes: int | None = None
    for attr, value in _attributes(info, what):
        if attr in (EIATTR_KPARAM_INFO, EIATTR_KPARAM_INFO_V2):
            if attr == EIATTR_KPARAM_INFO:
                _index, ordinal, offset, packed = unpack(_KPARAM, value, 0, f"{what} KPARAM_INFO")
                size = (packed >> 18) & 0x3FFF
            else:
                _index, ordinal, offset, size = unpack(
                    _KPARAM_V2, value, 0, f"{what} KPARAM_INFO_V2"
                )
            if ordinal in by_ordinal:
                raise ModuleImageError(f"{what}: parameter {ordinal} described twice")
            by_ordinal[ordinal] = ParamInfo(ordinal, offset, size)
        elif attr == EIATTR_PARAM_CBANK:
            cbank_bytes = unpack(_PARAM_CBANK, value, 0, f"{what} PARAM_CBANK")[2]
        elif attr == EIATTR_CBANK_PARAM_SIZE:
            declared_bytes = int.from_bytes(value, "little")
    params = tuple(by_ordinal[i] for i in sorted(by_ordinal))
    if [p.index for p in params] != list(range(len(params))):
        raise ModuleImageError(f"{what}: parameter ordinals {sorted(by_ordinal)} are not 0..n-1")
    end = max((p.offset + p.size for p in params), default=0)
    if cbank_bytes is not None and declared_bytes is not None and cbank_bytes != declared_bytes:
        raise ModuleImageError(
            f"{what}: PARAM_CBANK says {cbank_bytes} parameter bytes, "
            f"CBANK_PARAM_SIZE says {declared_bytes}"
        )
    total = cbank_bytes if cbank_bytes is not None else declared_bytes
    if total is None:
        total = end
    if end > total:
        raise ModuleImageError(f"{what}: parameters end at {end}, past the {total}-byte buffer")
    return KernelInfo(name, params, total)


def _max_threads(info: bytes, what: str) -> int:
    """The product of a kernel's launch bounds (EIATTR_MAX_THREADS), 0 when it has none."""
    for attr, value in _attributes(info, what):
        if attr == EIATTR_MAX_THREADS:
            x, y, z = unpack(_MAX_THREADS, value, 0, f"{what} MAX_THREADS")
            return int(min(x * y * z, 0xFFFF_FFFF))
    return 0


def _per_symbol(info: bytes, attr: int) -> dict[int, int]:
    """Values the module-wide `.nv.info` gives per symbol index for `attr` (REGCOUNT or
    FRAME_SIZE)."""
    out: dict[int, int] = {}
    for found, value in _attributes(info, ".nv.info"):
        if found == attr and len(value) >= _SYMBOL_VALUE.size:
            symbol, amount = _SYMBOL_VALUE.unpack_from(value)
            out[symbol] = amount
    return out


def _shared_static(name: str, by_name: dict[str, _Section], reserved: bool) -> int:
    """Static shared memory of kernel `name`: the size of its `.nv.shared.<name>` section. nvcc
    13 for sm_90 places shared variables after the 1 KiB the hardware reserves per block and
    says so with a `.nv.shared.reserved.N` section (`reserved`); the kernel's section then spans
    that window, which is not the kernel's own memory."""
    sec = by_name.get(f".nv.shared.{name}")
    if sec is None:
        return 0
    return sec.size - RESERVED_SHARED if reserved and sec.size >= RESERVED_SHARED else sec.size


def parse_cubin(data: bytes) -> Cubin:
    """Kernels (symbols marked STO_CUDA_ENTRY) of an ELF cubin, with their parameter layouts."""
    arch = elf_arch(data)
    fields = unpack(_EHDR, data, 0, "ELF header")
    shoff, shentsize, shnum, shstrndx = fields[6], fields[11], fields[12], fields[13]
    budget = [2 * len(data)]
    sections = _sections(data, shoff, shnum, shentsize, shstrndx, budget)
    by_name = {s.name: s for s in sections}
    symtabs = [s for s in sections if s.type == SHT_SYMTAB]
    if len(symtabs) != 1:
        raise ModuleImageError(f"cubin has {len(symtabs)} symbol tables, expected 1")
    module_info = by_name.get(".nv.info")
    module_bytes = _section_bytes(data, module_info) if module_info is not None else b""
    regs = _per_symbol(module_bytes, EIATTR_REGCOUNT)
    frames = _per_symbol(module_bytes, EIATTR_FRAME_SIZE)
    constants = by_name.get(".nv.constant3")
    const_bytes = constants.size if constants is not None else 0
    reserved = any(n.startswith(".nv.shared.reserved.") for n in by_name)
    kernels: dict[str, KernelInfo] = {}
    for index, name in _entry_symbols(data, symtabs[0], sections, budget):
        if name in kernels:
            raise ModuleImageError(f"kernel {name} defined twice")
        info = by_name.get(f".nv.info.{name}")
        info_bytes = _section_bytes(data, info) if info is not None else b""
        layout = kernel_info(name, info_bytes)
        attributes = KernelAttributes(
            num_regs=regs.get(index, 0),
            shared_static=_shared_static(name, by_name, reserved),
            const_bytes=const_bytes,
            local_bytes=frames.get(index, 0),
            max_threads=_max_threads(info_bytes, f".nv.info.{name}"),
            arch=arch,
        )
        kernels[name] = KernelInfo(name, layout.params, layout.param_bytes, attributes)
    return Cubin(arch, kernels, _global_symbols(data, symtabs[0], sections, budget))
