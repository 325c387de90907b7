"""CUDA runtime features beyond the basics (tests/libvgpu/cuda/features.cu), built by nvcc with
cudart static and shared, run as a zone's processes against gpu-proxy's sim in this process:
module variables (cudaMemcpyToSymbol/FromSymbol), cudaLaunchKernelEx and opt-in shared memory,
function attributes and occupancy, host functions in stream order, cudaMallocAsync, pinned host
memory."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from gpu_proxy.backends.sim import MODELS, Attr
from gpu_proxy.registry import ZoneRegistry
from tests.libvgpu.conftest import (
    CUDARTS,
    build_cudart_programs,
    cudart_values,
    sim_launches,
    sim_zone,
)

MiB = 1 << 20
SOURCE = Path(__file__).resolve().parent / "cuda" / "features.cu"
# features.cu's module variables: int counter, float table[256], float coeffs[4].
VARIABLE_BYTES = 4 + 1024 + 16


@pytest.fixture(scope="session")
def feature_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_cudart_programs(SOURCE, tmp_path_factory.mktemp("cudart-features"))


def run_mode(
    registry: ZoneRegistry, programs: dict[str, Path], cudart: str, mode: str, libdir: Path
) -> dict[str, str]:
    """Run one mode in a fresh 64 MiB zone named after it."""
    socket = sim_zone(registry, mode, 64 * MiB)
    return cudart_values(programs[cudart], mode, socket, libdir)


@pytest.mark.parametrize("cudart", CUDARTS)
def test_memcpy_to_and_from_symbols(
    registry: ZoneRegistry, feature_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    got = run_mode(registry, feature_programs, cudart, "symbols", libcuda_dir)
    # The module's variables are charged to the zone (the program still holds 1 KiB of its own).
    assert got["meminfo"] == f"{64 * MiB - VARIABLE_BYTES - 1024} {64 * MiB}"
    [zone] = [z for z in registry.zones() if z.id == "symbols"]
    assert zone.memory()[0] == 0  # everything returned when the process's context went


@pytest.mark.parametrize("cudart", CUDARTS)
def test_launch_kernel_ex_and_opt_in_shared_memory(
    registry: ZoneRegistry, feature_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    got = run_mode(registry, feature_programs, cudart, "launchex", libcuda_dir)
    assert got["reverse.maxDynamicSharedSizeBytes"] == str(48 << 10)
    assert got["reverse.optin"] == f"{100 << 10} 50"
    d = int(got["ptr"], 16)
    # Only the launches libvgpu could honour reached the sim: the refused ones left no trace.
    assert [
        (r.function, r.grid, r.block, r.shared_mem, r.params, r.stream is None)
        for r in sim_launches(registry, "launchex")
    ] == [
        ("_Z5scalePffi", (4, 2, 1), (16, 2, 1), 0, struct.pack("<Qfi", d, 3.0, 64), False),
        ("_Z7reversePfi", (1, 1, 1), (64, 1, 1), 100 << 10, struct.pack("<Qi", d, 64), False),
    ]


def blocks_per_sm(regs: int, static: int, max_threads: int, size: int, dynamic: int) -> int:
    """The occupancy calculator's formula (cuda_occupancy.h) for the sim's H100, written out
    independently of libvgpu's C: the least of the block, warp, register and shared memory
    limits; 0 for a block larger than the function allows or more dynamic shared memory than
    its limit."""
    a = MODELS["H100-SXM5-80GB"].attributes()
    warp = a[Attr.WARP_SIZE]
    if size > max_threads or static + dynamic > a[Attr.MAX_SHARED_MEMORY_PER_BLOCK]:
        return 0
    warps = -(-size // warp)
    limits = [
        a[Attr.MAX_BLOCKS_PER_MULTIPROCESSOR],
        a[Attr.MAX_THREADS_PER_MULTIPROCESSOR] // warp // warps,
    ]
    if regs:
        per_warp = -(-regs * warp // 256) * 256
        limits.append(a[Attr.MAX_REGISTERS_PER_MULTIPROCESSOR] // per_warp // warps)
    smem = -(-(static + dynamic + a[Attr.RESERVED_SHARED_MEMORY_PER_BLOCK]) // 128) * 128
    limits.append(a[Attr.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR] // smem)
    return min(limits)


@pytest.mark.parametrize("cudart", CUDARTS)
def test_function_attributes_and_occupancy_follow_the_documented_formula(
    registry: ZoneRegistry, feature_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    got = run_mode(registry, feature_programs, cudart, "occupancy", libcuda_dir)
    sm_count = MODELS["H100-SXM5-80GB"].attributes()[Attr.MULTIPROCESSOR_COUNT]
    # numRegs sharedSizeBytes localSizeBytes maxThreadsPerBlock binaryVersion maxDynamicShared
    scale_regs = int(got["scale.attrs"].split()[0])
    assert got["scale.attrs"] == f"{scale_regs} 0 0 1024 90 {48 << 10}"
    staged_regs = int(got["staged.attrs"].split()[0])
    # 32 KiB of static shared memory, __launch_bounds__(256); 16 KiB left for dynamic.
    assert got["staged.attrs"] == f"{staged_regs} {32 << 10} 0 256 90 {16 << 10}"
    assert 0 < scale_regs <= 32 and 0 < staged_regs <= 32  # as nvcc 13 compiles them
    kernels = {"scale": (scale_regs, 0, 1024), "staged": (staged_regs, 32 << 10, 256)}
    for name, (regs, static, max_threads) in kernels.items():
        for size in (32, 64, 96, 128, 256, 512, 1024):
            for dynamic in (0, 4096, 40000):
                want = blocks_per_sm(regs, static, max_threads, size, dynamic)
                assert got[f"{name}.blocks.{size}.{dynamic}"] == str(want), (name, size, dynamic)
        for limit in (0, 200):
            for dynamic in (0, 4096, 40000):
                top = min(max_threads, limit or max_threads) // 32 * 32
                best = max(
                    range(top, 0, -32),
                    key=lambda b: (blocks_per_sm(regs, static, max_threads, b, dynamic) * b, b),
                )
                blocks = blocks_per_sm(regs, static, max_threads, best, dynamic)
                expected = f"{blocks * sm_count} {best}" if blocks else "0 0"
                assert got[f"{name}.potential.{limit}.{dynamic}"] == expected, (name, dynamic)
    # Shared memory is what bounds `staged`: 6 blocks of 33 KiB in 228 KiB, at any block size.
    assert got["staged.blocks.128.0"] == got["staged.blocks.256.0"] == "6"


@pytest.mark.parametrize("cudart", CUDARTS)
def test_host_functions_run_in_stream_order(
    registry: ZoneRegistry, feature_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    """The program checks the uploads (what the host functions wrote, checksummed) itself, and
    that a stream with a host function not yet returned is not idle; here: the functions and
    callbacks ran in the order they were queued, each once."""
    got = run_mode(registry, feature_programs, cudart, "hostfunc", libcuda_dir)
    assert got["order"] == "1 2 3"  # fill, gated, callback (cudaSuccess)
    assert got["calls"] == "5"


@pytest.mark.parametrize("cudart", CUDARTS)
def test_malloc_async_uses_the_default_pool_within_the_quota(
    registry: ZoneRegistry, feature_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    """Copies through stream-ordered allocations are checksummed by the program; here: the
    pool's usage and high-water mark, and every byte back in the zone's quota once the stream
    ran the frees."""
    got = run_mode(registry, feature_programs, cudart, "mallocasync", libcuda_dir)
    size = (4 << 20) + 100
    assert got["pool"] == f"{size} {2 * size} {size}"  # used, high, reserved after one free
    assert got["meminfo"] == f"{64 * MiB} {64 * MiB}"  # free before, free after
    [zone] = [z for z in registry.zones() if z.id == "mallocasync"]
    assert zone.memory() == (0, 64 * MiB)


@pytest.mark.parametrize("cudart", CUDARTS)
def test_pinned_host_memory_is_copied_by_arena_offset_length(
    registry: ZoneRegistry, feature_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    """The program checks the bytes that came back; here: both checksums agree, and the async
    copies went as shared-arena calls (no data in the channel), both buffers unshared at the end."""
    got = run_mode(registry, feature_programs, cudart, "pinned", libcuda_dir)
    sent, back = got["pinned"].split()
    assert sent == back
    [zone] = [z for z in registry.zones() if z.id == "pinned"]
    calls: dict[str, int] = {}
    for (api, _result), n in zone.stats.snapshot().calls.items():
        calls[api] = calls.get(api, 0) + n
    assert calls["vgpuHostShare"] == calls["vgpuHostUnshare"] == 2
    assert calls["vgpuMemcpyHtoDSharedAsync"] == 1
    assert calls["vgpuMemcpyDtoHSharedAsync"] == 2
    assert "cuMemcpyHtoDAsync_v2" not in calls and "cuMemcpyDtoHAsync_v2" not in calls
