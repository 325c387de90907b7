"""Module images as `cuModuleLoadData` accepts them: ELF cubin, fatbin container, or PTX text.

Fatbin layout (confirmed against nvcc 13.0 output): a 16-byte header (u32 magic 0xBA55ED50,
u16 version 1, u16 header size, u64 size of the entries that follow), then entries, each a
header (u16 kind: 1 PTX / 2 ELF, u16 version, u32 header size, u64 payload size, u32
compressed size, u32, u16 minor, u16 major, u32 SM, u32+u32 name, u64 flags, u64, u64
uncompressed size) and its payload. nvcc 13 zstd-compresses PTX entries by default (flag
0x8000), compresses cubins too with `-compress-mode=size`, and uses raw LZ4 blocks (flag
0x2000) with `-compress-mode=speed`; `--no-compress` turns it off.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, field

import zstandard

from gpu_proxy.modules.elf import (
    ELF_MAGIC,
    GlobalInfo,
    KernelInfo,
    ModuleImageError,
    NoCompatibleImageError,
    ParamInfo,
    parse_cubin,
    unpack,
)

FATBIN_MAGIC = 0xBA55ED50
FLAG_LZ4 = 0x2000
FLAG_ZSTD = 0x8000
# A zone chooses the declared uncompressed size; cap it so one image cannot exhaust Dom0.
MAX_UNCOMPRESSED = 256 << 20

_WRAPPER = struct.Struct("<IHHQ")
_ENTRY = struct.Struct("<HHIQIIHHIIIQQQ")


class ImageKind(enum.Enum):
    """What the caller handed to cuModuleLoadData."""

    CUBIN = "cubin"
    FATBIN = "fatbin"
    PTX = "ptx"


class EntryKind(enum.IntEnum):
    """The kind field of a fatbin entry."""

    PTX = 1
    ELF = 2


@dataclass(frozen=True, slots=True)
class FatbinEntry:
    """One fatbin entry; `payload` is as stored (possibly compressed), `data()` decodes it."""

    kind: int
    arch: int
    flags: int
    offset: int
    payload: bytes
    uncompressed_size: int

    def data(self) -> bytes:
        """The entry's cubin or PTX bytes, decompressed if the entry is compressed."""
        if self.flags & FLAG_ZSTD:
            return _zstd(self.payload, self.uncompressed_size, self.offset)
        if self.flags & FLAG_LZ4:
            return _lz4_block(self.payload, self.uncompressed_size, self.offset)
        return self.payload


@dataclass(frozen=True, slots=True)
class ModuleImage:
    """A parsed module: `arch`, `kernels` and `globals` describe the code a device of that SM
    would run; for a fatbin, `entries` lists every entry and `selected` indexes the one chosen."""

    kind: ImageKind
    arch: int
    kernels: dict[str, KernelInfo]
    entries: tuple[FatbinEntry, ...] = field(default=())
    selected: int | None = None
    globals: dict[str, GlobalInfo] = field(default_factory=dict)


def _lz4_block(src: bytes, size: int, where: int) -> bytes:
    """Decode one raw LZ4 block (no frame) into exactly `size` bytes."""
    what = f"LZ4 fatbin entry at {where:#x}"
    out = bytearray()
    pos = 0

    def length(base: int) -> int:
        nonlocal pos
        if base != 15:
            return base
        while True:
            if pos >= len(src):
                raise ModuleImageError(f"{what}: truncated length")
            byte = src[pos]
            pos += 1
            base += byte
            if byte != 255:
                return base

    while pos < len(src):
        token = src[pos]
        pos += 1
        literals = length(token >> 4)
        if pos + literals > len(src) or len(out) + literals > size:
            raise ModuleImageError(f"{what}: literal run overflows")
        out += src[pos : pos + literals]
        pos += literals
        if pos == len(src):
            break
        if pos + 2 > len(src):
            raise ModuleImageError(f"{what}: truncated match offset")
        back = src[pos] | src[pos + 1] << 8
        pos += 2
        match = length(token & 15) + 4
        if back == 0 or back > len(out) or len(out) + match > size:
            raise ModuleImageError(f"{what}: bad match (offset {back}, length {match})")
        window = out[len(out) - back :]
        out += (window * (match // back + 1))[:match]
    if len(out) != size:
        raise ModuleImageError(f"{what}: decoded {len(out)} bytes, header says {size}")
    return bytes(out)


def _zstd(src: bytes, size: int, where: int) -> bytes:
    """Decode a zstd frame. The size the entry header declares bounds everything: a frame that
    announces another size is refused before any output buffer is allocated."""
    try:
        announced = zstandard.frame_content_size(src)
        if announced not in (-1, size):
            raise ModuleImageError(
                f"zstd fatbin entry at {where:#x}: frame announces {announced} bytes, "
                f"entry header says {size}"
            )
        out = zstandard.ZstdDecompressor().decompress(src, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ModuleImageError(f"zstd fatbin entry at {where:#x}: {exc}") from exc
    if len(out) != size:
        raise ModuleImageError(
            f"zstd fatbin entry at {where:#x}: {len(out)} bytes, header says {size}"
        )
    return out


def parse_fatbin(data: bytes) -> tuple[FatbinEntry, ...]:
    """Every entry of a fatbin container; bytes after the container are ignored, as the driver,
    which gets only a pointer, ignores them."""
    magic, version, header_size, fat_size = unpack(_WRAPPER, data, 0, "fatbin header")
    if magic != FATBIN_MAGIC:
        raise ModuleImageError(f"fatbin magic {magic:#x}, expected {FATBIN_MAGIC:#x}")
    if version != 1 or header_size < _WRAPPER.size:
        raise ModuleImageError(f"fatbin header version {version} size {header_size} unsupported")
    end = header_size + fat_size
    if end > len(data):
        raise ModuleImageError(f"fatbin declares {fat_size} bytes of entries; image too short")
    entries = []
    pos = header_size
    while pos < end:
        what = f"fatbin entry at {pos:#x}"
        kind, _ver, ehsize, size, csize, _, _, _, arch, _, _, flags, _, usize = unpack(
            _ENTRY, data, pos, what
        )
        if ehsize < _ENTRY.size or pos + ehsize + size > end:
            raise ModuleImageError(f"{what}: header {ehsize} + payload {size} bytes overrun")
        payload = data[pos + ehsize : pos + ehsize + size]
        if flags & (FLAG_LZ4 | FLAG_ZSTD):
            if csize > size or usize > MAX_UNCOMPRESSED:
                raise ModuleImageError(
                    f"{what}: compressed {csize} of {size} bytes, uncompressed {usize} bytes"
                )
            payload = payload[:csize]
        else:
            usize = size
        entries.append(FatbinEntry(kind, arch, flags, pos, payload, usize))
        pos += ehsize + size
    return tuple(entries)


def select_entry(entries: tuple[FatbinEntry, ...], arch: int | None) -> int:
    """Index of the entry a device of SM `arch` (None: the newest) would load, as the driver
    picks: a cubin of the same major and minor no newer, else PTX no newer (to be JIT-ed)."""
    best: tuple[int, int, int] | None = None  # (prefer ELF, arch, index)
    for i, entry in enumerate(entries):
        if entry.kind == EntryKind.ELF:
            ok = arch is None or (entry.arch // 10 == arch // 10 and entry.arch <= arch)
        elif entry.kind == EntryKind.PTX:
            ok = arch is None or entry.arch <= arch
        else:
            continue
        key = (int(entry.kind == EntryKind.ELF), entry.arch, i)
        if ok and (best is None or key[:2] > best[:2]):
            best = key
    if best is None:
        wanted = f"sm_{arch}" if arch is not None else "any SM"
        raise NoCompatibleImageError(f"fatbin has no cubin or PTX for {wanted}")
    return best[2]


# The patterns avoid nested or open-ended repetition so hostile text cannot make them quadratic:
# an unterminated block comment runs to the end, and a parameter list is cut at its `)`.
_PTX_COMMENT = re.compile(r"//[^\n]*|/\*.*?(?:\*/|\Z)", re.S)
_PTX_TARGET = re.compile(r"\.target\s+sm_(\d+)")
_PTX_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$%][\w$%]*)\s*(\()?")
# A module variable: `.global`/`.const` at the start of a statement (not `ld.global`), scalar or
# array, with an optional initialiser up to the `;`. `.extern` declarations define nothing.
_PTX_VARIABLE = re.compile(
    r"(?m)^[ \t]*((?:\.(?:visible|weak|extern)[ \t]+)*)\.(?:global|const)[ \t]+"
    r"(?:\.align[ \t]+\d+[ \t]+)?\.[usbf](8|16|32|64)[ \t]+([A-Za-z_$%][\w$%]*)"
    r"[ \t]*(?:\[[ \t]*(\d+)[ \t]*\])?[ \t]*(?:=([^;\n]*))?;"
)
_PTX_INIT_VALUE = re.compile(
    r"-?(?:0[xX][0-9a-fA-F]+|0[fF][0-9a-fA-F]{8}|0[dD][0-9a-fA-F]{16}|\d+)"
)
_PTX_PARAM = re.compile(
    r"\.param\s+(?:\.align\s+(\d+)\s+)?\.[usbf](8|16|32|64)(?:\s+\.\w+(?:\s+\d+)?)*"
    r"\s+[A-Za-z_$%][\w$%]*\s*(?:\[\s*(\d+)\s*\])?"
)


def _ptx_params(name: str, plist: str) -> KernelInfo:
    """Lay parameters out as the driver does: each at the next multiple of its alignment."""
    params = []
    offset = 0
    for i, decl in enumerate(p.strip() for p in plist.split(",") if p.strip()):
        match = _PTX_PARAM.fullmatch(decl)
        if match is None:
            raise ModuleImageError(f"PTX kernel {name}: cannot parse parameter {decl[:80]!r}")
        elem = int(match.group(2)) // 8
        align = int(match.group(1) or elem)
        if align <= 0 or align & (align - 1):
            raise ModuleImageError(f"PTX kernel {name}: parameter {i} alignment {align}")
        size = elem * int(match.group(3) or 1)
        offset = -(-offset // align) * align
        params.append(ParamInfo(i, offset, size))
        offset += size
    return KernelInfo(name, tuple(params), offset)


def _ptx_value(token: str, width: int, where: str) -> bytes:
    """One initialiser element as `width` little-endian bytes (0f/0d: the bits of a float)."""
    if _PTX_INIT_VALUE.fullmatch(token) is None:
        raise ModuleImageError(f"{where}: initialiser element {token[:40]!r} is not a constant")
    negative, digits = token.startswith("-"), token.lstrip("-")
    if digits[:2] in ("0f", "0F", "0d", "0D"):
        value = int(digits[2:], 16)
    else:
        value = int(digits, 0 if digits[:2] in ("0x", "0X") else 10)
    if negative:
        value = -value
    if not -(1 << (8 * width - 1)) <= value < 1 << (8 * width):
        raise ModuleImageError(f"{where}: initialiser {token} does not fit {width} bytes")
    return (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _ptx_globals(text: str) -> dict[str, GlobalInfo]:
    """`.global` and `.const` variables of PTX text, with initialisers of constants."""
    out: dict[str, GlobalInfo] = {}
    for match in _PTX_VARIABLE.finditer(text):
        if ".extern" in match.group(1):
            continue
        width, name = int(match.group(2)) // 8, match.group(3)
        where = f"PTX variable {name}"
        count = int(match.group(4)) if match.group(4) is not None else 1
        init = b""
        if match.group(5) is not None:
            body = match.group(5).strip()
            if body.startswith("{") != body.endswith("}"):
                raise ModuleImageError(f"{where}: unbalanced initialiser braces")
            tokens = [t.strip() for t in body.strip("{}").split(",") if t.strip()]
            if len(tokens) > count:
                raise ModuleImageError(f"{where}: {len(tokens)} initialisers for {count} elements")
            init = b"".join(_ptx_value(t, width, where) for t in tokens)
        if name in out:
            raise ModuleImageError(f"{where} defined twice")
        if count:
            out[name] = GlobalInfo(name, width * count, init)
    return out


def parse_ptx(data: bytes) -> tuple[int, dict[str, KernelInfo]]:
    """Target SM and `.entry` kernels of NUL-terminated PTX text."""
    target, kernels, _ = _parse_ptx_module(data)
    return target, kernels


def _parse_ptx_module(data: bytes) -> tuple[int, dict[str, KernelInfo], dict[str, GlobalInfo]]:
    """Target SM and `.entry` kernels of NUL-terminated PTX text."""
    text_bytes = data.split(b"\0", 1)[0]
    try:
        text = _PTX_COMMENT.sub(" ", text_bytes.decode("ascii"))
    except UnicodeDecodeError as exc:
        raise ModuleImageError("image is neither ELF nor fatbin, and not ASCII PTX") from exc
    target = _PTX_TARGET.search(text)
    if target is None:
        raise ModuleImageError("PTX has no `.target sm_NN` directive")
    kernels: dict[str, KernelInfo] = {}
    pos = 0
    while (entry := _PTX_ENTRY.search(text, pos)) is not None:
        name, pos = entry.group(1), entry.end()
        plist = ""
        if entry.group(2):
            close = text.find(")", pos)
            if close < 0:
                raise ModuleImageError(f"PTX kernel {name}: parameter list is not closed")
            plist, pos = text[pos:close], close + 1
        if name in kernels:
            raise ModuleImageError(f"PTX kernel {name} defined twice")
        kernels[name] = _ptx_params(name, plist)
    return int(target.group(1)), kernels, _ptx_globals(text)


def parse_module_image(data: bytes, arch: int | None = None) -> ModuleImage:
    """Parse what cuModuleLoadData accepts, for a device of SM `arch` (None: newest code)."""
    if data.startswith(ELF_MAGIC):
        cubin = parse_cubin(data)
        if arch is not None and not (cubin.arch // 10 == arch // 10 and cubin.arch <= arch):
            raise NoCompatibleImageError(f"cubin for sm_{cubin.arch} cannot run on sm_{arch}")
        return ModuleImage(ImageKind.CUBIN, cubin.arch, cubin.kernels, globals=cubin.globals)
    if data[:4] == FATBIN_MAGIC.to_bytes(4, "little"):
        entries = parse_fatbin(data)
        index = select_entry(entries, arch)
        chosen = entries[index]
        payload = chosen.data()
        if chosen.kind == EntryKind.ELF:
            cubin = parse_cubin(payload)
            if cubin.arch != chosen.arch:
                raise ModuleImageError(
                    f"fatbin entry at {chosen.offset:#x} says sm_{chosen.arch}, "
                    f"its cubin says sm_{cubin.arch}"
                )
            kernels, variables = cubin.kernels, cubin.globals
        else:
            _, kernels, variables = _parse_ptx_module(payload)
        return ModuleImage(ImageKind.FATBIN, chosen.arch, kernels, entries, index, variables)
    target, kernels, variables = _parse_ptx_module(data)
    if arch is not None and target > arch:
        raise NoCompatibleImageError(f"PTX for sm_{target} cannot be JIT-ed for sm_{arch}")
    return ModuleImage(ImageKind.PTX, target, kernels, globals=variables)
