"""Module variables (`__device__`, `__constant__`): read from cubins and PTX alike, allocated
and initialised by the sim when a module loads, charged to the zone's quota by gpu-proxy, never
freeable as allocations, and returned with the module."""

from collections.abc import Iterator

import pytest

from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.dispatch import HANDLERS
from gpu_proxy.errors import InvalidValue, NotFound, OutOfMemory
from gpu_proxy.modules import ModuleImageError, parse_module_image
from gpu_proxy.zone import Caller
from idm.gen import codec as c
from tests.nvcc import build_modules
from tests.unit.proxy_zone import sim_caller

SOURCE = r"""
__device__ int counter = 5;
__device__ float table[100];
__constant__ float coeffs[4] = {1.0f, 2.0f, 3.0f, 4.0f};
__device__ double dinit[3] = {1.5, 2.5, -3.5};
extern "C" __global__ void k(float *o) { o[0] = counter + table[1] + coeffs[2] + dinit[0]; }
"""
BUILDS = {
    "cubin": ["-cubin", "-arch=sm_90"],
    "ptx": ["-ptx", "-arch=sm_90"],
    "fatbin": ["-fatbin", "-arch=sm_90"],
}
EXPECTED = {
    "counter": (4, (5).to_bytes(4, "little")),
    "table": (400, bytes(400)),
    "coeffs": (16, b"".join(int(f).to_bytes(4, "little") for f in (0x3F800000, 0x40000000,
                                                                      0x40400000, 0x40800000))),
    "dinit": (24, bytes.fromhex("000000000000f83f") + bytes.fromhex("0000000000000440")
              + bytes.fromhex("0000000000000cc0")),
}  # fmt: skip
TOTAL = sum(size for size, _ in EXPECTED.values())


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return build_modules(SOURCE, BUILDS, tmp_path_factory.mktemp("globals"))


@pytest.mark.parametrize("kind", BUILDS)
def test_variables_and_their_initial_bytes_from_every_image_kind(
    images: dict[str, bytes], kind: str
) -> None:
    image = images[kind] + (b"\0" if kind == "ptx" else b"")
    found = parse_module_image(image, arch=90).globals
    got = {name: (v.size, v.init + bytes(v.size - len(v.init))) for name, v in found.items()}
    assert got == EXPECTED


@pytest.mark.parametrize(
    ("decl", "why"),
    [
        (".global .align 4 .u32 p = generic(q);", "not a constant"),
        (".global .align 1 .b8 b[2] = {1, 2, 3};", "3 initialisers for 2 elements"),
        (".global .align 1 .b8 b[2] = {1, 256};", "does not fit"),
        (".global .u32 a;\n.global .u32 a;", "defined twice"),
    ],
)
def test_bad_ptx_variables_are_rejected(decl: str, why: str) -> None:
    ptx = f".version 8.0\n.target sm_90\n.address_size 64\n{decl}\n".encode()
    with pytest.raises(ModuleImageError, match=why):
        parse_module_image(ptx + b"\0")


def test_sim_allocates_initialised_variables_and_frees_them_with_the_module(
    images: dict[str, bytes],
) -> None:
    sim = SimBackend(total_mem=1 << 20)
    ctx = sim.create_context()
    free_before = sim.mem_info()[0]
    module = sim.module_load(ctx, images["cubin"])
    assert {name: v.size for name, v in module.globals.items()} == {
        name: size for name, (size, _) in EXPECTED.items()
    }
    for name, (size, init) in EXPECTED.items():
        var = module.globals[name]
        assert bytes(sim.memcpy_dtoh(ctx, var.address, size, None)) == init
    counter = module.globals["counter"].address
    sim.memcpy_htod(ctx, counter, (42).to_bytes(4, "little"), None)
    assert bytes(sim.memcpy_dtoh(ctx, counter, 4, None)) == (42).to_bytes(4, "little")
    with pytest.raises(InvalidValue, match="not the start of an allocation"):
        sim.mem_free(ctx, counter)
    sim.module_unload(ctx, module)
    assert sim.mem_info()[0] == free_before
    with pytest.raises(InvalidValue):
        sim.memcpy_dtoh(ctx, counter, 4, None)
    sim.destroy_context(ctx)


@pytest.fixture
def caller() -> Iterator[Caller]:
    with sim_caller(TOTAL + 100) as caller:
        yield caller


def load(caller: Caller, image: bytes) -> int:
    reply = HANDLERS.cuModuleLoadData(caller, c.cuModuleLoadData_Request(image, len(image)))
    assert isinstance(reply, c.cuModuleLoadData_Reply)
    return reply.module


def test_proxy_charges_variables_to_the_zone_and_refuses_what_does_not_fit(
    caller: Caller, images: dict[str, bytes]
) -> None:
    zone = caller.zone
    handle = load(caller, images["cubin"])
    assert zone.memory() == (TOTAL, TOTAL + 100)
    got = HANDLERS.cuModuleGetGlobal_v2(caller, c.cuModuleGetGlobal_v2_Request(handle, b"table"))
    assert isinstance(got, c.cuModuleGetGlobal_v2_Reply) and got.size == 400
    assert zone.allocations.check_range(got.dptr, 400) == (got.dptr, 0)
    with pytest.raises(NotFound):
        HANDLERS.cuModuleGetGlobal_v2(caller, c.cuModuleGetGlobal_v2_Request(handle, b"nope"))
    with pytest.raises(InvalidValue):  # cuMemFree of a variable
        HANDLERS.cuMemFree_v2(caller, c.cuMemFree_v2_Request(got.dptr))
    # A second copy does not fit the quota: refused, and nothing of it stays loaded or charged.
    with pytest.raises(OutOfMemory):
        load(caller, images["cubin"])
    assert zone.memory()[0] == TOTAL
    assert HANDLERS.cuModuleUnload(caller, c.cuModuleUnload_Request(handle)) == 0
    assert zone.memory()[0] == 0
    with pytest.raises(InvalidValue):
        zone.allocations.check_range(got.dptr, 1)
