"""The CUDA backend against a real GPU: device info, memory in every direction, memset, stream
and event ordering, and modules built by nvcc for the device launched through the ``extra``
parameter buffer. Needs an NVIDIA GPU and nvcc (run on a lent device: ``pytest -m gpu``)."""

import os
import struct
import threading
from collections.abc import Iterator

import pytest
from cuda.bindings import driver

from gpu_proxy.backends.base import Context, Module
from gpu_proxy.backends.cuda import CudaBackend
from gpu_proxy.errors import InvalidContext, InvalidValue, NotFound
from tests.nvcc import build_modules

pytestmark = pytest.mark.gpu

MiB = 1 << 20

SOURCE = r"""
extern "C" __global__ void vector_add(const float* a, const float* b, float* c, int n)
{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) c[i] = a[i] + b[i]; }
extern "C" __global__ void spin_then_write(long long cycles, int* p, int v)
{ long long t = clock64(); while (clock64() - t < cycles) {} *p = v; }
extern "C" __global__ void mark(int* p) { *p = 7; }
extern "C" __global__ void nothing() {}
"""
# ~0.2 s at the ~1.7 GHz of current data-centre GPUs: long enough to observe pending work.
SPIN_CYCLES = 350_000_000


@pytest.fixture(scope="module")
def backend() -> CudaBackend:
    return CudaBackend()


@pytest.fixture
def ctx(backend: CudaBackend) -> Iterator[Context]:
    ctx = backend.create_context()
    yield ctx
    backend.destroy_context(ctx)


@pytest.fixture(scope="module")
def images(backend: CudaBackend, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """SOURCE as a cubin and as PTX for this device's SM."""
    major, minor = backend.device_info().compute_capability
    arch = f"-arch=sm_{major}{minor}"
    builds = {"cubin": ["-cubin", arch], "ptx": ["-ptx", arch]}
    return build_modules(SOURCE, builds, tmp_path_factory.mktemp("gpu_modules"))


@pytest.fixture
def module(backend: CudaBackend, ctx: Context, images: dict[str, bytes]) -> Module:
    return backend.module_load(ctx, images["cubin"])


def _current_context() -> int:
    err, current = driver.cuCtxGetCurrent()
    assert err == driver.CUresult.CUDA_SUCCESS
    return int(current)


def test_device_info_is_sane(backend: CudaBackend) -> None:
    info = backend.device_info()
    attr = driver.CUdevice_attribute
    assert info.name and "\0" not in info.name
    assert len(info.uuid) == 16 and info.uuid != bytes(16)
    assert info.total_mem > 1 << 30
    assert info.compute_capability >= (7, 0)
    assert info.compute_capability == (
        info.attributes[int(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)],
        info.attributes[int(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)],
    )
    assert info.driver_version >= 12000
    assert info.attributes[int(attr.CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)] == 1024
    assert info.attributes[int(attr.CU_DEVICE_ATTRIBUTE_WARP_SIZE)] == 32
    assert len(info.attributes) > 100
    free, total = backend.mem_info()
    assert 0 < free <= total


def test_operations_leave_no_context_current(backend: CudaBackend, ctx: Context) -> None:
    before = _current_context()
    backend.mem_free(ctx, backend.mem_alloc(ctx, MiB))
    other = backend.create_context()
    backend.destroy_context(other)
    assert _current_context() == before


def test_memory_round_trips_in_every_direction(backend: CudaBackend, ctx: Context) -> None:
    data = os.urandom(4 * MiB)
    a, b = backend.mem_alloc(ctx, len(data)), backend.mem_alloc(ctx, len(data))
    backend.memcpy_htod(ctx, a, data, None)
    backend.memcpy_dtod(ctx, b, a, len(data), None)
    assert backend.memcpy_dtoh(ctx, b, len(data), None) == data

    stream = backend.stream_create(ctx, 0)
    reversed_data = data[::-1]
    backend.memcpy_htod(ctx, a, memoryview(reversed_data), stream)
    backend.memcpy_dtod(ctx, b + 16, a, 4096, stream)
    assert backend.memcpy_dtoh(ctx, b + 16, 4096, stream) == reversed_data[:4096]
    assert backend.memcpy_dtoh(ctx, a, len(data), stream) == reversed_data
    backend.memcpy_htod(ctx, a + 3, bytearray(b"xyz"), None)
    assert backend.memcpy_dtoh(ctx, a, 8, None) == reversed_data[:3] + b"xyz" + reversed_data[6:8]
    backend.stream_destroy(ctx, stream)
    backend.mem_free(ctx, a)
    backend.mem_free(ctx, b)


def test_memset_every_width(backend: CudaBackend, ctx: Context) -> None:
    ptr = backend.mem_alloc(ctx, 64)
    backend.memset(ctx, ptr, 0x1AB, 1, 64, None)  # truncated to the byte, as in C
    assert backend.memcpy_dtoh(ctx, ptr, 64, None) == b"\xab" * 64
    backend.memset(ctx, ptr, 0xBEEF, 2, 8, None)
    assert backend.memcpy_dtoh(ctx, ptr, 16, None) == struct.pack("<8H", *[0xBEEF] * 8)
    stream = backend.stream_create(ctx, 0)
    backend.memset(ctx, ptr, 0xDEADBEEF, 4, 4, stream)
    assert backend.memcpy_dtoh(ctx, ptr, 16, stream) == struct.pack("<4I", *[0xDEADBEEF] * 4)
    with pytest.raises(InvalidValue):
        backend.memset(ctx, ptr, 0, 8, 1, None)
    backend.stream_destroy(ctx, stream)
    backend.mem_free(ctx, ptr)


def test_vector_add_through_the_extra_buffer(
    backend: CudaBackend, ctx: Context, module: Module
) -> None:
    n = 1 << 20
    a = struct.pack(f"<{n}f", *range(n))
    b = struct.pack(f"<{n}f", *(2.0 * i for i in range(n)))
    da, db, dc = (backend.mem_alloc(ctx, 4 * n) for _ in range(3))
    backend.memcpy_htod(ctx, da, a, None)
    backend.memcpy_htod(ctx, db, b, None)
    fn = backend.module_function(ctx, module, "vector_add")
    assert fn.info.param_bytes == 28
    params = struct.pack("<QQQi", da, db, dc, n)
    backend.launch(ctx, fn, ((n + 255) // 256, 1, 1), (256, 1, 1), 0, None, params)
    backend.synchronize(ctx)
    c = struct.unpack(f"<{n}f", backend.memcpy_dtoh(ctx, dc, 4 * n, None))
    assert c == tuple(3.0 * i for i in range(n))
    with pytest.raises(InvalidValue, match="28 parameter bytes, got 24"):
        backend.launch(ctx, fn, (1, 1, 1), (1, 1, 1), 0, None, params[:24])
    for ptr in (da, db, dc):
        backend.mem_free(ctx, ptr)


def test_kernels_without_parameters_and_ptx(
    backend: CudaBackend, ctx: Context, images: dict[str, bytes]
) -> None:
    ptx = backend.module_load(ctx, images["ptx"])
    assert set(ptx.kernels) == {"vector_add", "spin_then_write", "mark", "nothing"}
    nothing = backend.module_function(ctx, ptx, "nothing")
    backend.launch(ctx, nothing, (1, 1, 1), (1, 1, 1), 0, None, b"")
    ptr = backend.mem_alloc(ctx, 4)
    mark = backend.module_function(ctx, ptx, "mark")
    backend.launch(ctx, mark, (1, 1, 1), (1, 1, 1), 0, None, struct.pack("<Q", ptr))
    assert backend.memcpy_dtoh(ctx, ptr, 4, None) == struct.pack("<i", 7)
    with pytest.raises(NotFound):
        backend.module_function(ctx, ptx, "missing")
    backend.mem_free(ctx, ptr)
    backend.module_unload(ctx, ptx)


def test_streams_and_events_order_work(backend: CudaBackend, ctx: Context, module: Module) -> None:
    spin = backend.module_function(ctx, module, "spin_then_write")
    ptr = backend.mem_alloc(ctx, 4)
    backend.memset(ctx, ptr, 0, 4, 1, None)
    backend.synchronize(ctx)  # the non-blocking streams below do not wait for the memset
    s1, s2 = backend.stream_create(ctx, 1), backend.stream_create(ctx, 1)  # non-blocking
    start, done = backend.event_create(ctx, 0), backend.event_create(ctx, 0)

    backend.event_record(ctx, start, s1)
    params = struct.pack("<qQi", SPIN_CYCLES, ptr, 42)
    assert len(params) == spin.info.param_bytes
    backend.launch(ctx, spin, (1, 1, 1), (1, 1, 1), 0, s1, params)
    backend.event_record(ctx, done, s1)
    assert backend.stream_query(ctx, s1) is False  # NOT_READY is an answer, not an error
    assert backend.event_query(ctx, done) is False
    backend.stream_wait_event(ctx, s2, done)
    # Queued on s2 behind the event: sees the kernel's write although s2 is otherwise idle.
    assert backend.memcpy_dtoh(ctx, ptr, 4, s2) == struct.pack("<i", 42)
    backend.event_synchronize(ctx, done)
    assert backend.event_query(ctx, done) is True
    assert backend.stream_query(ctx, s1) is True
    backend.stream_synchronize(ctx, None)
    assert backend.event_elapsed_ms(ctx, start, done) > 10.0

    for event in (start, done):
        backend.event_destroy(ctx, event)
    for stream in (s1, s2):
        backend.stream_destroy(ctx, stream)
    backend.mem_free(ctx, ptr)


def test_zones_on_many_threads_keep_their_own_contexts(backend: CudaBackend) -> None:
    contexts = [backend.create_context() for _ in range(4)]
    errors: list[BaseException] = []

    def work(ctx: Context, seed: int) -> None:
        try:
            for i in range(20):
                data = bytes([seed, i]) * 4096
                ptr = backend.mem_alloc(ctx, len(data))
                backend.memcpy_htod(ctx, ptr, data, None)
                assert backend.memcpy_dtoh(ctx, ptr, len(data), None) == data
                backend.mem_free(ctx, ptr)
            assert _current_context() == 0
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c, n)) for n, c in enumerate(contexts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for ctx in contexts:
        backend.destroy_context(ctx)


def test_a_destroyed_context_is_rejected(backend: CudaBackend) -> None:
    ctx = backend.create_context()
    backend.destroy_context(ctx)
    with pytest.raises(InvalidContext):
        backend.mem_alloc(ctx, 16)
    with pytest.raises(InvalidContext):
        backend.destroy_context(ctx)
