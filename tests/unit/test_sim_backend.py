"""The sim backend keeps real memory semantics and real stream order on host memory, answers
like the driver for bad input, and records launches without pretending to compute them."""

import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpu_proxy.backends.base import GpuBackend
from gpu_proxy.backends.sim import (
    ADDRESS_BASE,
    ALIGNMENT,
    CU_EVENT_DISABLE_TIMING,
    CU_STREAM_NON_BLOCKING,
    MODELS,
    Attr,
    LaunchRecord,
    SimBackend,
    SimContext,
    SimStream,
)
from gpu_proxy.errors import (
    InvalidContext,
    InvalidHandle,
    InvalidImage,
    InvalidValue,
    NoBinaryForGpu,
    NotFound,
    NotReady,
    OutOfMemory,
)
from tests.nvcc import build_modules

CUDA_H = Path("/usr/local/cuda/include/cuda.h")
SOURCE = r"""
extern "C" __global__ void add(const float* a, const float* b, float* c, int n)
{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) c[i] = a[i] + b[i]; }
"""
BUILDS = {
    "cubin90": ["-cubin", "-arch=sm_90"],
    "fatbin": [
        "-fatbin",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
    ],
}
GATE_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Real nvcc output."""
    return build_modules(SOURCE, BUILDS, tmp_path_factory.mktemp("sim_modules"))


@pytest.fixture
def gates() -> Iterator[list[threading.Event]]:
    """Gates a test blocks streams on; all are opened at teardown so no worker is left stuck."""
    made: list[threading.Event] = []
    yield made
    for gate in made:
        gate.set()


def hold(stream: SimStream, gates: list[threading.Event]) -> threading.Event:
    """Block `stream` until the returned gate is set: later work stays queued."""
    gate = threading.Event()
    gates.append(gate)
    stream.enqueue(lambda: gate.wait(GATE_TIMEOUT_S))
    return gate


@pytest.fixture
def sim() -> SimBackend:
    return SimBackend()


@pytest.fixture
def ctx(sim: SimBackend, gates: list[threading.Event]) -> Iterator[SimContext]:
    c = sim.create_context()
    yield c
    for gate in gates:  # destroy joins the workers, so release them first
        gate.set()
    if c.alive:
        sim.destroy_context(c)


def test_sim_satisfies_the_backend_protocol() -> None:
    backend: GpuBackend = SimBackend()  # mypy checks the structure; this checks the name
    assert backend.name == "sim"


def test_device_info_describes_the_model_and_says_it_is_simulated() -> None:
    h100, a100 = SimBackend().device_info(), SimBackend("A100-SXM4-40GB").device_info()
    assert h100.name == "NVIDIA H100 80GB HBM3 (vgpu sim)"
    assert (h100.compute_capability, h100.total_mem, h100.driver_version) == (
        (9, 0),
        80 << 30,
        13000,
    )
    assert a100.compute_capability == (8, 0)
    assert h100.uuid == SimBackend().device_info().uuid != a100.uuid
    assert len(h100.uuid) == 16
    attrs = h100.attributes
    assert attrs[1] == 1024 and (attrs[2], attrs[3], attrs[4]) == (1024, 1024, 64)
    assert (attrs[5], attrs[6], attrs[7]) == (2**31 - 1, 65535, 65535)
    assert (attrs[8], attrs[10], attrs[16], attrs[75], attrs[76]) == (48 << 10, 32, 132, 9, 0)
    assert attrs[97] == 227 << 10
    assert a100.attributes[16] == 108
    with pytest.raises(ValueError, match="unknown GPU model"):
        SimBackend("RTX-9090")


def test_attribute_numbers_match_cuda_h() -> None:
    assert CUDA_H.exists(), f"{CUDA_H} not found: part of the build environment"
    declared = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"CU_DEVICE_ATTRIBUTE_(\w+)\s*=\s*(\d+)", CUDA_H.read_text())
    }
    assert {a.name: declared.get(a.name) for a in Attr} == {a.name: a.value for a in Attr}


def cuda_h_attributes() -> dict[str, int]:
    """Every enumerator of cuda.h's CUdevice_attribute (aliases included), except the _MAX end."""
    text = CUDA_H.read_text()
    body = text[
        text.index("typedef enum CUdevice_attribute_enum") : text.index("} CUdevice_attribute;")
    ]
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"(CU_DEVICE_ATTRIBUTE_\w+)\s*=\s*(\d+)", body)
    }


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_cuda_h_attribute_has_a_value_in_each_model(model: str) -> None:
    declared = cuda_h_attributes()
    assert len(declared) > 140  # the parse found the enum, not a fragment of it
    attrs = SimBackend(model).device_info().attributes
    assert {name for name, number in declared.items() if number not in attrs} == set()
    assert set(attrs) == set(declared.values())  # nothing that cuda.h does not declare


def test_attributes_are_the_published_values() -> None:
    h100 = SimBackend().device_info().attributes
    a100 = SimBackend("A100-SXM4-40GB").device_info().attributes
    pick = (
        Attr.CLOCK_RATE, Attr.MEMORY_CLOCK_RATE, Attr.GLOBAL_MEMORY_BUS_WIDTH,
        Attr.L2_CACHE_SIZE, Attr.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, Attr.ASYNC_ENGINE_COUNT,
        Attr.CLUSTER_LAUNCH, Attr.TENSOR_MAP_ACCESS_SUPPORTED, Attr.GPU_PCI_DEVICE_ID,
    )  # fmt: skip
    assert [h100[a] for a in pick] == [
        1_980_000,
        2_619_000,
        5120,
        50 << 20,
        228 << 10,
        3,
        1,
        1,
        0x2330_10DE,
    ]
    assert [a100[a] for a in pick] == [
        1_410_000,
        1_215_000,
        5120,
        40 << 20,
        164 << 10,
        3,
        0,
        0,
        0x20B0_10DE,
    ]
    for attrs in (h100, a100):
        flags = (
            Attr.UNIFIED_ADDRESSING, Attr.MANAGED_MEMORY, Attr.CONCURRENT_KERNELS,
            Attr.COOPERATIVE_LAUNCH, Attr.MEMORY_POOLS_SUPPORTED,
            Attr.VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, Attr.STREAM_PRIORITIES_SUPPORTED,
        )  # fmt: skip
        assert [attrs[a] for a in flags] == [1] * len(flags)
        assert (attrs[Attr.COMPUTE_MODE], attrs[Attr.INTEGRATED], attrs[Attr.TCC_DRIVER]) == (
            0,
        ) * 3
        assert (attrs[Attr.PCI_DOMAIN_ID], attrs[Attr.PCI_BUS_ID], attrs[Attr.PCI_DEVICE_ID]) == (
            0, 0x1B, 0,
        )  # fmt: skip


@pytest.mark.parametrize("on_stream", [False, True], ids=["legacy", "stream"])
def test_round_trip_in_all_directions(sim: SimBackend, ctx: SimContext, on_stream: bool) -> None:
    stream = sim.stream_create(ctx, 0) if on_stream else None
    data = os.urandom((1 << 20) + 3)
    a, b = sim.mem_alloc(ctx, len(data)), sim.mem_alloc(ctx, len(data))
    sim.memcpy_htod(ctx, a, data, stream)
    sim.memcpy_dtod(ctx, b, a, len(data), stream)
    sim.memcpy_htod(ctx, b + 7, b"\xaa\xbb", stream)
    back_a = sim.memcpy_dtoh(ctx, a, len(data), stream)
    back_b = sim.memcpy_dtoh(ctx, b, len(data), stream)
    assert hashlib.sha256(back_a).digest() == hashlib.sha256(data).digest()
    assert back_b == data[:7] + b"\xaa\xbb" + data[9:]
    assert sim.memcpy_dtoh(ctx, a + 100, 5, stream) == data[100:105]


@pytest.mark.parametrize(
    ("elem_size", "value", "unit"),
    [(1, 0x5A, b"\x5a"), (2, 0xBEEF, b"\xef\xbe"), (4, 0xDEADBEEF, b"\xef\xbe\xad\xde")],
)
def test_memset_widths_write_little_endian_elements(
    sim: SimBackend, ctx: SimContext, elem_size: int, value: int, unit: bytes
) -> None:
    ptr = sim.mem_alloc(ctx, 64)
    sim.memcpy_htod(ctx, ptr, b"\x11" * 64, None)
    sim.memset(ctx, ptr + 8, value, elem_size, 5, sim.stream_create(ctx, 0))
    sim.synchronize(ctx)
    size = 5 * elem_size
    assert sim.memcpy_dtoh(ctx, ptr, 64, None) == b"\x11" * 8 + unit * 5 + b"\x11" * (56 - size)


@pytest.mark.parametrize(
    ("offset", "value", "elem_size", "count"),
    [(0, 1, 3, 1), (0, 256, 1, 1), (0, 1 << 16, 2, 1), (2, 0, 4, 1), (1, 0, 2, 1), (0, 0, 1, -1)],
)
def test_memset_rejects_what_the_driver_rejects(
    sim: SimBackend, ctx: SimContext, offset: int, value: int, elem_size: int, count: int
) -> None:
    ptr = sim.mem_alloc(ctx, 64)
    with pytest.raises(InvalidValue):
        sim.memset(ctx, ptr + offset, value, elem_size, count, None)


def test_allocation_is_bounded_aligned_and_never_reuses_addresses() -> None:
    sim = SimBackend(total_mem=1 << 20)
    ctx = sim.create_context()
    big = sim.mem_alloc(ctx, 1 << 20)
    assert sim.mem_info() == (0, 1 << 20)
    with pytest.raises(OutOfMemory):
        sim.mem_alloc(ctx, 1)
    sim.mem_free(ctx, big)
    assert sim.mem_info() == (1 << 20, 1 << 20)
    small = [sim.mem_alloc(ctx, n) for n in (1, 255, 257)]
    assert big == ADDRESS_BASE
    assert all(p % ALIGNMENT == 0 for p in small)
    assert len({big, *small}) == 4  # the freed range is not handed out again
    assert sim.mem_info()[0] == (1 << 20) - 4 * ALIGNMENT  # charged in 256-byte units
    with pytest.raises(InvalidValue):
        sim.mem_alloc(ctx, 0)
    sim.destroy_context(ctx)
    assert sim.mem_info() == (1 << 20, 1 << 20)


def test_out_of_range_operations_raise_invalid_value(sim: SimBackend, ctx: SimContext) -> None:
    a = sim.mem_alloc(ctx, 256)
    b = sim.mem_alloc(ctx, 256)
    assert b == a + 256  # adjacent, so a range across the boundary must still be refused
    freed = sim.mem_alloc(ctx, 16)
    sim.mem_free(ctx, freed)
    bad: list[Callable[[], object]] = [
        lambda: sim.memcpy_htod(ctx, a + 255, b"xy", None),
        lambda: sim.memcpy_dtoh(ctx, a + 200, 100, None),
        lambda: sim.memcpy_dtoh(ctx, a - 1, 1, None),
        lambda: sim.memcpy_dtoh(ctx, a, -1, None),
        lambda: sim.memcpy_dtod(ctx, a, b + 1, 256, None),
        lambda: sim.memcpy_dtoh(ctx, freed, 1, None),
        lambda: sim.memset(ctx, b + 250, 0, 1, 7, None),
        lambda: sim.mem_free(ctx, a + 16),
        lambda: sim.mem_free(ctx, freed),
    ]
    for op in bad:
        with pytest.raises(InvalidValue):
            op()
    assert sim.memcpy_dtoh(ctx, b, 256, None) == bytes(256)  # nothing leaked into b


def test_one_stream_runs_h2d_d2d_d2h_in_order(
    sim: SimBackend, ctx: SimContext, gates: list[threading.Event]
) -> None:
    stream = sim.stream_create(ctx, 0)
    data = os.urandom(4096)
    a, b = sim.mem_alloc(ctx, 4096), sim.mem_alloc(ctx, 4096)
    gate = hold(stream, gates)
    sim.memcpy_htod(ctx, a, data, stream)
    sim.memcpy_dtod(ctx, b, a, 4096, stream)
    assert not sim.stream_query(ctx, stream)  # the copies are really asynchronous
    gate.set()
    assert sim.memcpy_dtoh(ctx, b, 4096, stream) == data
    assert sim.stream_query(ctx, stream)


def test_stream_waiting_on_an_event_sees_the_copy_before_it(
    sim: SimBackend, ctx: SimContext, gates: list[threading.Event]
) -> None:
    first, second = sim.stream_create(ctx, 0), sim.stream_create(ctx, 0)
    event = sim.event_create(ctx, 0)
    data = os.urandom(1024)
    a, b = sim.mem_alloc(ctx, 1024), sim.mem_alloc(ctx, 1024)
    gate = hold(first, gates)
    sim.memcpy_htod(ctx, a, data, first)
    sim.event_record(ctx, event, first)
    sim.stream_wait_event(ctx, second, event)
    sim.memcpy_dtod(ctx, b, a, 1024, second)
    assert not sim.event_query(ctx, event)
    assert not sim.stream_query(ctx, second)  # waiting on the first stream's gate
    gate.set()
    sim.stream_synchronize(ctx, second)
    assert sim.event_query(ctx, event)
    assert sim.memcpy_dtoh(ctx, b, 1024, second) == data


def test_legacy_stream_waits_for_blocking_streams_only(
    sim: SimBackend, ctx: SimContext, gates: list[threading.Event]
) -> None:
    blocking = sim.stream_create(ctx, 0)
    non_blocking = sim.stream_create(ctx, CU_STREAM_NON_BLOCKING)
    ptr = sim.mem_alloc(ctx, 4)
    hold(non_blocking, gates)
    gate = hold(blocking, gates)
    sim.memcpy_htod(ctx, ptr, b"late", blocking)
    assert not sim.stream_query(ctx, None)
    opener = threading.Timer(0.2, gate.set)
    opener.start()
    # Legacy work runs only after the blocking stream's copy, despite the gated non-blocking one.
    assert sim.memcpy_dtoh(ctx, ptr, 4, None) == b"late"
    opener.join()
    assert not sim.stream_query(ctx, non_blocking)
    with pytest.raises(InvalidValue):
        sim.stream_create(ctx, 2)


def test_event_timing_and_its_errors(
    sim: SimBackend, ctx: SimContext, gates: list[threading.Event]
) -> None:
    stream = sim.stream_create(ctx, 0)
    start, end, never = (sim.event_create(ctx, 0) for _ in range(3))
    untimed = sim.event_create(ctx, CU_EVENT_DISABLE_TIMING)
    ptr = sim.mem_alloc(ctx, 1 << 20)
    sim.event_record(ctx, start, stream)
    sim.memset(ctx, ptr, 7, 1, 1 << 20, stream)
    sim.event_record(ctx, end, stream)
    sim.event_synchronize(ctx, end)
    assert sim.event_elapsed_ms(ctx, start, end) >= 0.0
    assert sim.event_query(ctx, never)  # never recorded counts as complete, as in CUDA
    with pytest.raises(InvalidHandle):
        sim.event_elapsed_ms(ctx, start, never)
    sim.event_record(ctx, untimed, stream)
    sim.event_synchronize(ctx, untimed)
    with pytest.raises(InvalidHandle):
        sim.event_elapsed_ms(ctx, start, untimed)
    gate = hold(stream, gates)
    sim.event_record(ctx, end, stream)  # re-record: the old completion no longer counts
    assert not sim.event_query(ctx, end)
    with pytest.raises(NotReady):
        sim.event_elapsed_ms(ctx, start, end)
    gate.set()
    sim.event_synchronize(ctx, end)
    assert sim.event_elapsed_ms(ctx, start, end) >= 0.0
    sim.event_destroy(ctx, end)
    with pytest.raises(InvalidHandle):
        sim.event_query(ctx, end)


def test_modules_from_nvcc_load_for_the_models_arch(images: dict[str, bytes]) -> None:
    h100, a100 = SimBackend(), SimBackend("A100-SXM4-40GB")
    hctx, actx = h100.create_context(), a100.create_context()
    cubin = h100.module_load(hctx, images["cubin90"])
    assert cubin.image.arch == 90
    assert cubin.kernels["add"].param_bytes == 28
    assert a100.module_load(actx, images["fatbin"]).image.arch == 80
    assert h100.module_load(hctx, images["fatbin"]).image.arch == 90
    with pytest.raises(NoBinaryForGpu):
        a100.module_load(actx, images["cubin90"])
    with pytest.raises(InvalidImage):
        h100.module_load(hctx, images["cubin90"][:200])
    assert h100.module_function(hctx, cubin, "add").info.name == "add"
    with pytest.raises(NotFound):
        h100.module_function(hctx, cubin, "sub")
    h100.module_unload(hctx, cubin)
    with pytest.raises(InvalidHandle):
        h100.module_function(hctx, cubin, "add")


@pytest.mark.parametrize(
    ("grid", "block", "shared", "params"),
    [
        ((0, 1, 1), (1, 1, 1), 0, 28),
        ((2**31, 1, 1), (1, 1, 1), 0, 28),
        ((1, 65536, 1), (1, 1, 1), 0, 28),
        ((1, 1, 1), (1, 1, 0), 0, 28),
        ((1, 1, 1), (1, 1, 65), 0, 28),
        ((1, 1, 1), (1025, 1, 1), 0, 28),
        ((1, 1, 1), (512, 2, 2), 0, 28),
        ((1, 1, 1), (1, 1, 1), (48 << 10) + 1, 28),
        ((1, 1, 1), (1, 1, 1), -1, 28),
        ((1, 1, 1), (1, 1, 1), 0, 27),
        ((1, 1, 1), (1, 1, 1), 0, 32),
    ],
)
def test_launch_rejects_bad_configurations(
    images: dict[str, bytes],
    sim: SimBackend,
    ctx: SimContext,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    shared: int,
    params: int,
) -> None:
    fn = sim.module_function(ctx, sim.module_load(ctx, images["cubin90"]), "add")
    sim.launch(ctx, fn, (2**31 - 1, 65535, 65535), (1024, 1, 1), 48 << 10, None, bytes(28))
    with pytest.raises(InvalidValue):
        sim.launch(ctx, fn, grid, block, shared, None, bytes(params))
    assert len(ctx.launches) == 1  # only the valid one at the limits


def test_opt_in_dynamic_shared_memory_raises_the_launch_limit_for_the_kernel(
    images: dict[str, bytes], sim: SimBackend, ctx: SimContext
) -> None:
    module = sim.module_load(ctx, images["cubin90"])
    fn = sim.module_function(ctx, module, "add")
    big = 100 << 10
    with pytest.raises(InvalidValue, match="limit 49152"):
        sim.launch(ctx, fn, (1, 1, 1), (1, 1, 1), big, None, bytes(28))
    with pytest.raises(InvalidValue, match="opt-in limit"):
        sim.function_set_max_dynamic_shared(ctx, fn, sim.model.shared_per_block_optin + 1)
    sim.function_set_max_dynamic_shared(ctx, fn, big)
    # Another handle of the same kernel shares the limit, as in CUDA.
    again = sim.module_function(ctx, module, "add")
    sim.launch(ctx, again, (1, 1, 1), (1, 1, 1), big, None, bytes(28))
    with pytest.raises(InvalidValue):
        sim.launch(ctx, again, (1, 1, 1), (1, 1, 1), big + 1, None, bytes(28))
    assert [r.shared_mem for r in ctx.launches] == [big]


def test_launch_is_recorded_not_computed(
    images: dict[str, bytes], sim: SimBackend, ctx: SimContext, gates: list[threading.Event]
) -> None:
    """`add` would write c = a + b; the sim records the launch in order and leaves c alone."""
    fn = sim.module_function(ctx, sim.module_load(ctx, images["cubin90"]), "add")
    stream = sim.stream_create(ctx, 0)
    a, b, c = (sim.mem_alloc(ctx, 16) for _ in range(3))
    ones = bytes.fromhex("0000803f") * 4  # four float 1.0
    sim.memcpy_htod(ctx, a, ones, None)
    sim.memcpy_htod(ctx, b, ones, None)
    params = a.to_bytes(8, "little") + b.to_bytes(8, "little") + c.to_bytes(8, "little")
    params += (4).to_bytes(4, "little")
    gate = hold(stream, gates)
    sim.launch(ctx, fn, (1, 1, 1), (4, 1, 1), 0, stream, params)
    sim.memcpy_htod(ctx, c, b"\xee" * 16, stream)
    assert ctx.launches == []  # not reached in stream order yet
    gate.set()
    sim.stream_synchronize(ctx, stream)
    assert ctx.launches == [LaunchRecord("add", (1, 1, 1), (4, 1, 1), 0, params, stream)]
    assert sim.memcpy_dtoh(ctx, c, 16, None) == b"\xee" * 16  # only the copy wrote c
    assert sim.memcpy_dtoh(ctx, a, 16, None) == ones


def test_destroyed_context_refuses_everything_and_returns_memory(
    sim: SimBackend, gates: list[threading.Event]
) -> None:
    ctx = sim.create_context()
    stream = sim.stream_create(ctx, 0)
    ptr = sim.mem_alloc(ctx, 1 << 20)
    gate = hold(stream, gates)
    sim.memcpy_htod(ctx, ptr, b"never", stream)
    threading.Timer(0.1, gate.set).start()
    sim.destroy_context(ctx)
    assert sim.mem_info() == (80 << 30, 80 << 30)
    assert not ctx.streams  # workers exited
    with pytest.raises(InvalidContext):
        sim.mem_alloc(ctx, 16)
    with pytest.raises(InvalidContext):
        sim.stream_query(ctx, stream)
    with pytest.raises(InvalidContext):
        sim.destroy_context(ctx)


def test_handles_of_another_context_are_refused(sim: SimBackend, ctx: SimContext) -> None:
    other = sim.create_context()
    stream, event = sim.stream_create(other, 0), sim.event_create(other, 0)
    ptr = sim.mem_alloc(other, 16)
    with pytest.raises(InvalidHandle):
        sim.stream_synchronize(ctx, stream)
    with pytest.raises(InvalidHandle):
        sim.event_record(ctx, event, None)
    with pytest.raises(InvalidValue):
        sim.memcpy_dtoh(ctx, ptr, 16, None)
    sim.stream_destroy(other, stream)
    with pytest.raises(InvalidHandle):
        sim.memcpy_htod(other, ptr, b"x", stream)
    sim.destroy_context(other)
