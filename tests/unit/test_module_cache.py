"""Module images sent once per zone (`vgpuModuleLoadCached`) and the kernel table gpu-proxy
returns for a loaded module (`vgpuModuleGetKernels`), driven through the dispatch handlers on
the sim backend."""

import hashlib
import struct

import pytest

from gpu_proxy.dispatch import HANDLERS
from gpu_proxy.errors import InvalidValue, NotFound
from gpu_proxy.kernel_table import encode_entry
from gpu_proxy.module_cache import ModuleImageCache
from gpu_proxy.modules import KernelInfo, ParamInfo, parse_module_image
from gpu_proxy.zone import Caller
from idm.gen import codec as c
from tests.nvcc import build_modules
from tests.unit.proxy_zone import sim_caller

SOURCE = r"""
struct S { double a; char b; };
extern "C" __global__ void __launch_bounds__(128) first(int *p, S s, char c) { p[0] = s.b + c; }
extern "C" __global__ void second() {}
extern "C" __global__ void third(float *x, float k, int n) { if (threadIdx.x < n) x[0] *= k; }
"""
MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    builds = {
        "cubin": ["-cubin", "-arch=sm_90"],
        "zstd": ["-fatbin", "-arch=sm_90", "-compress-mode=size"],
        "ptx": ["-ptx", "-arch=sm_90"],
    }
    return build_modules(SOURCE, builds, tmp_path_factory.mktemp("cache"))


def load(caller: Caller, image: bytes) -> int:
    return HANDLERS.cuModuleLoadData(caller, c.cuModuleLoadData_Request(image, len(image))).module


def load_cached(caller: Caller, image: bytes) -> int:
    digest = hashlib.sha256(image).digest()
    return HANDLERS.vgpuModuleLoadCached(caller, c.vgpuModuleLoadCached_Request(digest)).module


def decode_table(page: bytes) -> tuple[int, list[tuple[str, KernelInfo, tuple[int, ...]]]]:
    """The page format gpu_proxy/kernel_table.py documents, read independently of the encoder."""
    total, count = struct.unpack_from("<II", page)
    pos, out = 8, []
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", page, pos)
        name = page[pos + 2 : pos + 2 + name_len].decode()
        pos += 2 + name_len
        param_bytes, nparams, known, *attrs = struct.unpack_from("<9I", page, pos)
        pos += 36
        params = tuple(
            ParamInfo(i, *struct.unpack_from("<HH", page, pos + 4 * i)) for i in range(nparams)
        )
        pos += 4 * nparams
        out.append((name, KernelInfo(name, params, param_bytes), (known, *attrs)))
    assert pos == len(page)
    return total, out


def kernel_table(caller: Caller, module: int, page_size: int) -> list[tuple[str, KernelInfo]]:
    rows: list[tuple[str, KernelInfo]] = []
    while True:
        req = c.vgpuModuleGetKernels_Request(module, len(rows), page_size)
        total, page = decode_table(bytes(HANDLERS.vgpuModuleGetKernels(caller, req).table))
        assert page or len(rows) == total
        rows += [(name, info) for name, info, _ in page]
        if len(rows) == total:
            return rows


def test_a_zone_sends_an_image_once_and_loads_it_again_by_digest(images: dict[str, bytes]) -> None:
    with sim_caller(64 * MiB) as caller:
        with pytest.raises(NotFound):
            load_cached(caller, images["cubin"])
        first = load(caller, images["cubin"])
        again = load_cached(caller, images["cubin"])
        assert again != first  # a module of its own, as a second cuModuleLoadData gives
        assert kernel_table(caller, again, 4096) == kernel_table(caller, first, 4096)
        HANDLERS.cuModuleUnload(caller, c.cuModuleUnload_Request(first))
        assert load_cached(caller, images["cubin"])  # unloading keeps the image
        with pytest.raises(NotFound):
            load_cached(caller, images["ptx"])


def test_another_zones_image_is_a_miss_and_teardown_forgets_the_zone(
    images: dict[str, bytes],
) -> None:
    cache = ModuleImageCache(64 * MiB)
    with sim_caller(64 * MiB, "a", cache) as a, sim_caller(64 * MiB, "b", cache) as b:
        load(a, images["zstd"])
        with pytest.raises(NotFound):
            load_cached(b, images["zstd"])  # stored, but b never sent it
        load(b, images["zstd"])
        assert cache.usage() == (1, len(images["zstd"]))  # the bytes are kept once
        assert load_cached(b, images["zstd"])
    with sim_caller(64 * MiB, "a", cache) as a, pytest.raises(NotFound):
        load_cached(a, images["zstd"])  # a new zone of the same name starts empty


def test_least_recently_used_images_are_evicted_past_the_capacity(
    images: dict[str, bytes],
) -> None:
    cubin, zstd = images["cubin"], images["zstd"]
    cache = ModuleImageCache(len(cubin) + len(zstd) - 1)
    with sim_caller(64 * MiB, "z", cache) as caller:
        load(caller, cubin)
        load(caller, zstd)  # evicts the cubin
        assert cache.usage() == (1, len(zstd))
        with pytest.raises(NotFound):
            load_cached(caller, cubin)
        assert load_cached(caller, zstd)
    tiny = ModuleImageCache(len(cubin) - 1)
    with sim_caller(64 * MiB, "z", tiny) as caller:
        load(caller, cubin)  # larger than the whole cache: loaded, not kept
        assert tiny.usage() == (0, 0)


@pytest.mark.parametrize("build", ["cubin", "zstd", "ptx"])
def test_kernel_table_pages_carry_layouts_and_attributes(
    images: dict[str, bytes], build: str
) -> None:
    image = images[build] + (b"\0" if build == "ptx" else b"")
    parsed = parse_module_image(image, arch=90)
    with sim_caller(64 * MiB) as caller:
        module = load(caller, image)
        req = c.vgpuModuleGetKernels_Request(module, 0, 1 << 16)
        total, page = decode_table(bytes(HANDLERS.vgpuModuleGetKernels(caller, req).table))
        assert total == 3
        for name, info, attrs in page:
            expected = parsed.kernels[name]
            assert info.params == expected.params and info.param_bytes == expected.param_bytes
            if build == "ptx":
                assert attrs == (0,) * 7
            else:
                assert expected.attributes is not None
                assert attrs[0] == 1 and attrs[5:] == (expected.attributes.max_threads, 90)
        by_name = {name: (info, attrs) for name, info, attrs in page}
        first, first_attrs = by_name["first"]
        assert first.params == (ParamInfo(0, 0, 8), ParamInfo(1, 8, 16), ParamInfo(2, 24, 1))
        assert first_attrs[5] == (128 if build != "ptx" else 0)
        # One entry per page when only one fits; the pages add up to the same table.
        smallest = 8 + max(len(encode_entry(k)) for k in parsed.kernels.values())
        assert kernel_table(caller, module, smallest) == [(n, i) for n, i, _ in page]
        with pytest.raises(InvalidValue, match="page"):
            HANDLERS.vgpuModuleGetKernels(caller, c.vgpuModuleGetKernels_Request(module, 0, 16))
        with pytest.raises(InvalidValue, match="has 3"):
            HANDLERS.vgpuModuleGetKernels(caller, c.vgpuModuleGetKernels_Request(module, 4, 4096))
