"""Module images built by the real nvcc parse to the kernels and parameter layouts the driver
would use, and hostile variants of them fail only with ModuleImageError."""

import struct
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_proxy.modules import (
    EntryKind,
    ImageKind,
    KernelInfo,
    ModuleImage,
    ModuleImageError,
    NoCompatibleImageError,
    ParamInfo,
    parse_module_image,
)
from gpu_proxy.modules.elf import kernel_info
from gpu_proxy.modules.fatbin import FLAG_LZ4, FLAG_ZSTD, parse_fatbin
from tests.nvcc import build_modules

SOURCE = r"""
struct S24 { double a; float b; int c; long long d; };
extern "C" __global__ void add(const float* a, const float* b, float* c, int n)
{ int i = threadIdx.x; if (i < n) c[i] = a[i] + b[i]; }
__global__ void scale(double* x, double s, unsigned long long n)
{ if (threadIdx.x < n) x[threadIdx.x] *= s; }
__global__ void empty() {}
__global__ void bystruct(S24 s, int* out) { out[0] = (int)s.a + s.c + (int)s.d + (int)s.b; }
template <typename T> __global__ void fill(T* p, T v, int n)
{ if ((int)threadIdx.x < n) p[threadIdx.x] = v; }
template __global__ void fill<float>(float*, float, int);
template __global__ void fill<char>(char*, char, int);
struct Big { char b[4800]; };  // past 4 KiB: nvcc writes EIATTR_KPARAM_INFO_V2 for it
__global__ void big(Big s, int* out) { out[0] = s.b[4799]; }
"""

GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=[sm_90,compute_90]",
]
BUILDS = {
    "cubin": ["-cubin", "-arch=sm_90"],
    "ptx": ["-ptx", "-arch=sm_90"],
    "fatbin": ["-fatbin", *GENCODE],  # nvcc 13 default: zstd PTX, plain cubins
    "fatbin_plain": ["-fatbin", "--no-compress", *GENCODE],
    "fatbin_size": ["-fatbin", "-compress-mode=size", *GENCODE],  # zstd everything
    "fatbin_speed": ["-fatbin", "-compress-mode=speed", *GENCODE],  # LZ4 PTX
}


def _p(*layout: tuple[int, int]) -> tuple[ParamInfo, ...]:
    return tuple(ParamInfo(i, off, size) for i, (off, size) in enumerate(layout))


EXPECTED = {
    "add": KernelInfo("add", _p((0, 8), (8, 8), (16, 8), (24, 4)), 28),
    "_Z5scalePddy": KernelInfo("_Z5scalePddy", _p((0, 8), (8, 8), (16, 8)), 24),
    "_Z5emptyv": KernelInfo("_Z5emptyv", (), 0),
    "_Z8bystruct3S24Pi": KernelInfo("_Z8bystruct3S24Pi", _p((0, 24), (24, 8)), 32),
    "_Z4fillIfEvPT_S0_i": KernelInfo("_Z4fillIfEvPT_S0_i", _p((0, 8), (8, 4), (12, 4)), 16),
    "_Z4fillIcEvPT_S0_i": KernelInfo("_Z4fillIcEvPT_S0_i", _p((0, 8), (8, 1), (12, 4)), 16),
    "_Z3big3BigPi": KernelInfo("_Z3big3BigPi", _p((0, 4800), (4800, 8)), 4808),
}


def layouts(image: ModuleImage) -> dict[str, KernelInfo]:
    """The kernels' parameter layouts, without the attributes only cubin code has."""
    return {name: replace(k, attributes=None) for name, k in image.kernels.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Every build of SOURCE, compiled in parallel (about 2 s)."""
    return build_modules(SOURCE, BUILDS, tmp_path_factory.mktemp("modules"))


def test_cubin_kernels_and_param_layouts(images: dict[str, bytes]) -> None:
    image = parse_module_image(images["cubin"])
    assert (image.kind, image.arch, image.entries, image.selected) == (
        ImageKind.CUBIN,
        90,
        (),
        None,
    )
    assert layouts(image) == EXPECTED


def test_ptx_entries_lay_out_params_like_the_cubin(images: dict[str, bytes]) -> None:
    image = parse_module_image(images["ptx"] + b"\0")
    assert (image.kind, image.arch) == (ImageKind.PTX, 90)
    assert layouts(image) == EXPECTED


def test_default_fatbin_layout_and_compression(images: dict[str, bytes]) -> None:
    entries = parse_fatbin(images["fatbin"])
    assert [(e.kind, e.arch) for e in entries] == [
        (EntryKind.ELF, 80),
        (EntryKind.ELF, 90),
        (EntryKind.PTX, 90),
    ]
    assert [bool(e.flags & FLAG_ZSTD) for e in entries] == [False, False, True]
    assert entries[0].payload.startswith(b"\x7fELF")
    assert b".entry add(" in entries[2].data()


@pytest.mark.parametrize("build", ["fatbin", "fatbin_plain", "fatbin_size", "fatbin_speed"])
def test_every_compression_mode_decodes_to_the_same_code(
    images: dict[str, bytes], build: str
) -> None:
    plain = parse_fatbin(images["fatbin_plain"])
    entries = parse_fatbin(images[build])
    assert [e.data().rstrip(b"\0") for e in entries] == [e.data().rstrip(b"\0") for e in plain]
    image = parse_module_image(images[build])
    assert (image.kind, image.arch, image.selected) == (ImageKind.FATBIN, 90, 1)
    assert layouts(image) == EXPECTED


def test_compression_flags_per_mode(images: dict[str, bytes]) -> None:
    def flags(build: str) -> list[int]:
        return [e.flags & (FLAG_LZ4 | FLAG_ZSTD) for e in parse_fatbin(images[build])]

    assert flags("fatbin_plain") == [0, 0, 0]
    assert flags("fatbin_size") == [FLAG_ZSTD] * 3
    assert flags("fatbin_speed") == [0, 0, FLAG_LZ4]


@pytest.mark.parametrize(
    ("device", "selected", "arch"),
    [(80, 0, 80), (86, 0, 80), (89, 0, 80), (90, 1, 90), (100, 2, 90), (None, 1, 90)],
)
def test_fatbin_selects_like_the_driver(
    images: dict[str, bytes], device: int | None, selected: int, arch: int
) -> None:
    image = parse_module_image(images["fatbin"], arch=device)
    assert (image.selected, image.arch, len(image.entries)) == (selected, arch, 3)
    assert layouts(image) == EXPECTED


def test_no_code_for_older_device(images: dict[str, bytes]) -> None:
    with pytest.raises(NoCompatibleImageError, match="sm_75"):
        parse_module_image(images["fatbin"], arch=75)
    with pytest.raises(NoCompatibleImageError, match="sm_90 cannot run on sm_80"):
        parse_module_image(images["cubin"], arch=80)
    with pytest.raises(NoCompatibleImageError, match="sm_90 cannot be JIT-ed for sm_80"):
        parse_module_image(images["ptx"], arch=80)


def test_fatbin_entry_arch_must_match_its_cubin(images: dict[str, bytes]) -> None:
    data = bytearray(images["fatbin_plain"])
    entry = parse_fatbin(bytes(data))[1]
    struct.pack_into("<I", data, entry.offset + 28, 91)
    with pytest.raises(ModuleImageError, match="says sm_91, its cubin says sm_90"):
        parse_module_image(bytes(data), arch=91)


def test_nv_info_inconsistencies_are_rejected() -> None:
    def kparam(ordinal: int, offset: int, size: int) -> bytes:
        return struct.pack("<BBHIHHI", 4, 0x17, 12, 0, ordinal, offset, (size << 18) | 0x1F000)

    cbank = struct.pack("<BBHIHH", 4, 0x0A, 8, 0, 0x210, 12)
    good = kparam(1, 8, 4) + kparam(0, 0, 8) + cbank + struct.pack("<BBH", 3, 0x19, 12)
    assert kernel_info("k", good) == KernelInfo("k", _p((0, 8), (8, 4)), 12)
    cases = {
        "described twice": kparam(0, 0, 8) + kparam(0, 8, 4),
        "not 0..n-1": kparam(1, 0, 8),
        "past the 12-byte buffer": kparam(0, 0, 8) + kparam(1, 8, 8) + cbank,
        "CBANK_PARAM_SIZE says 16": cbank + struct.pack("<BBH", 3, 0x19, 16),
        "runs past the section": struct.pack("<BBH", 4, 0x17, 200),
        "unknown attribute format": b"\x07\x17\x00\x00",
        "truncated attribute header": good + b"\x04",
        "KPARAM_INFO at offset": struct.pack("<BBH", 4, 0x17, 4) + b"\0" * 4,
    }
    for message, info in cases.items():
        with pytest.raises(ModuleImageError, match=message):
            kernel_info("k", info)


def test_corrupt_lz4_and_zstd_payloads_are_rejected(images: dict[str, bytes]) -> None:
    for build, expected in (("fatbin_speed", "LZ4"), ("fatbin", "zstd")):
        ptx = parse_fatbin(images[build])[2]
        assert ptx.flags & (FLAG_LZ4 | FLAG_ZSTD)
        with pytest.raises(ModuleImageError, match=expected):
            replace(ptx, payload=ptx.payload[: len(ptx.payload) // 2]).data()
        with pytest.raises(ModuleImageError, match=expected):
            replace(ptx, uncompressed_size=ptx.uncompressed_size - 1).data()


def test_ptx_without_target_or_with_odd_params_is_rejected() -> None:
    with pytest.raises(ModuleImageError, match=r"\.target"):
        parse_module_image(b".version 9.0\n.visible .entry k()\n{}\0")
    with pytest.raises(ModuleImageError, match="cannot parse parameter"):
        parse_module_image(b".target sm_90\n.entry k(.param .pred p)\n{}\0")
    with pytest.raises(ModuleImageError, match="not ASCII PTX"):
        parse_module_image(b".target sm_90\n// \xff\n\0")


def test_garbage_is_rejected_with_a_reason() -> None:
    cases = {
        b"": "no `.target",
        b"\x7fELF": "ELF header",
        b"\x50\xed\x55\xba\x01\x00\x10\x00" + struct.pack("<Q", 1 << 40): "image too short",
        b"\x50\xed\x55\xba\x02\x00\x10\x00" + bytes(8): "version 2",
    }
    for data, message in cases.items():
        with pytest.raises(ModuleImageError, match=message):
            parse_module_image(data)


def _mutate(data: bytes, source: st.DataObject, hot: int) -> bytes:
    """Truncate, flip bytes (mostly in the first `hot` bytes and the section headers), or
    write a huge or tiny word at some offset."""
    draw = source.draw
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["truncate", "flip", "word"]))
        if how == "truncate":
            del out[draw(st.integers(0, len(out))) :]
            continue
        if not out:
            continue
        region = draw(st.sampled_from([(0, min(hot, len(out))), (0, len(out))]))
        pos = draw(st.integers(region[0], max(region[0], region[1] - 1)))
        if how == "flip":
            out[pos] ^= draw(st.integers(1, 255))
        else:
            word = draw(st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63]))
            chunk = word.to_bytes(8, "little")[: draw(st.sampled_from([2, 4, 8]))]
            out[pos : pos + len(chunk)] = chunk[: len(out) - pos]
    return bytes(out)


def _check_hostile(data: bytes) -> None:
    try:
        image = parse_module_image(data)
    except ModuleImageError:
        return
    for kernel in image.kernels.values():  # whatever parses must be self-consistent
        assert all(p.offset + p.size <= kernel.param_bytes for p in kernel.params)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_cubin_raises_only_module_image_error(
    images: dict[str, bytes], data: st.DataObject
) -> None:
    cubin = images["cubin"]
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    mutated = _mutate(cubin, data, 0x40)
    if data.draw(st.booleans()):  # aim at the section header table too
        pos = data.draw(st.integers(shoff, len(cubin) - 1))
        mutated = mutated[:pos] + bytes([data.draw(st.integers(0, 255))]) + mutated[pos + 1 :]
    _check_hostile(mutated)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["fatbin", "fatbin_speed", "fatbin_size"]))
def test_mutated_fatbin_raises_only_module_image_error(
    images: dict[str, bytes], data: st.DataObject, build: str
) -> None:
    # hot region: wrapper header plus the first entry header
    _check_hostile(_mutate(images[build], data, 0x50))


def test_hostile_ptx_is_rejected_in_linear_time() -> None:
    started = time.monotonic()
    cases = {
        b".target sm_90\n" + b".entry a(" * 200_000: "not closed",
        b"/*" * 500_000: r"no `\.target",
        b".target sm_90\n.entry k(.param .u32 " + b"a" * 200_000 + b"!)": "cannot parse",
    }
    for data, message in cases.items():
        with pytest.raises(ModuleImageError, match=message):
            parse_module_image(data + b"\0")
    assert time.monotonic() - started < 5


ATTRIBUTE_SOURCE = r"""
__constant__ float table[40];
extern "C" __global__ void __launch_bounds__(256) staged(float* out, int n) {
    __shared__ float tile[300];
    volatile float spill[64];
    int t = threadIdx.x;
    for (int i = 0; i < 64; i++) spill[i] = out[(t + i) % n];
    tile[t % 300] = spill[t % 64] + table[t % 40];
    __syncthreads();
    out[t] = tile[(t + 1) % 300];
}
extern "C" __global__ void plain(int* p) { p[threadIdx.x] = 1; }
"""


def test_cubin_kernel_attributes_as_the_driver_reports_them(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Registers and local memory come from the module's .nv.info, shared memory from the
    kernel's .nv.shared section (less the reserved window), constants from .nv.constant3, launch
    bounds from the kernel's .nv.info; PTX code has none (known only once the driver compiles
    it)."""
    built = build_modules(
        ATTRIBUTE_SOURCE,
        {"cubin": ["-cubin", "-arch=sm_90"], "fatbin": ["-fatbin", "-arch=sm_90",
         "-compress-mode=size"], "ptx": ["-ptx", "-arch=sm_90"]},
        tmp_path_factory.mktemp("attributes"),
    )  # fmt: skip
    for build in ("cubin", "fatbin"):
        kernels = parse_module_image(built[build]).kernels
        staged, plain = kernels["staged"].attributes, kernels["plain"].attributes
        assert staged is not None and plain is not None
        assert (staged.shared_static, staged.const_bytes, staged.max_threads, staged.arch) == (
            1200,
            160,
            256,
            90,
        )
        assert staged.local_bytes >= 256  # the volatile array lives in local memory
        assert 0 < plain.num_regs <= staged.num_regs
        assert (plain.shared_static, plain.local_bytes, plain.max_threads) == (0, 0, 0)
    ptx = parse_module_image(built["ptx"] + b"\0").kernels
    assert ptx["staged"].attributes is None
