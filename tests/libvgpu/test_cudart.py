"""CUDA runtime programs (tests/libvgpu/cuda/runtime.cu) built by nvcc with cudart linked
statically (nvcc's default) and as libcudart.so, run as a zone's processes: cudart finds libvgpu as
libcuda.so.1 and everything it does reaches gpu-proxy's sim. gpu-proxy's ZoneRegistry runs in this
process, one zone per test, so that the launches the sim recorded can be read back."""

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
SOURCE = Path(__file__).resolve().parent / "cuda" / "runtime.cu"


@pytest.fixture(scope="session")
def runtime_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_cudart_programs(SOURCE, tmp_path_factory.mktemp("cudart"))


@pytest.mark.parametrize("cudart", CUDARTS)
def test_device_properties_are_the_sim_model(
    registry: ZoneRegistry, runtime_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    got = cudart_values(
        runtime_programs[cudart], "props", sim_zone(registry, "props", 64 * MiB), libcuda_dir
    )
    model = MODELS["H100-SXM5-80GB"]
    a = model.attributes()
    assert got == {
        "name": f"{model.name} (vgpu sim)",
        "cc": "9.0",
        "totalGlobalMem": str(64 * MiB),  # the zone's quota is its GPU's memory
        "multiProcessorCount": str(a[Attr.MULTIPROCESSOR_COUNT]),
        "memoryBusWidth": str(a[Attr.GLOBAL_MEMORY_BUS_WIDTH]),
        "l2CacheSize": str(a[Attr.L2_CACHE_SIZE]),
        "maxThreadsPerBlock": "1024",
        "maxThreadsDim": "1024 1024 64",
        "maxGridSize": "2147483647 65535 65535",
        "sharedMemPerBlock": str(48 << 10),
        "sharedMemPerBlockOptin": str(227 << 10),
        "sharedMemPerMultiprocessor": str(228 << 10),
        "regsPerBlock": "65536",
        "warpSize": "32",
        "asyncEngineCount": str(a[Attr.ASYNC_ENGINE_COUNT]),
        "unifiedAddressing": "1",
        "managedMemory": "1",
        "concurrentKernels": "1",
        "cooperativeLaunch": "1",
        "pci": "0:1b:0",
        "memoryPoolsSupported": "1",
        "clockRate": str(a[Attr.CLOCK_RATE]),
        "driver": "13000",
    }


@pytest.mark.parametrize("cudart", CUDARTS)
def test_malloc_memcpy_memset_round_trips(
    registry: ZoneRegistry, runtime_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    socket = sim_zone(registry, "memory", 64 * MiB)
    got = cudart_values(runtime_programs[cudart], "memory", socket, libcuda_dir)
    size = (4 << 20) + 123
    assert got["meminfo"] == f"{64 * MiB - 2 * size} {64 * MiB}"  # both still allocated


@pytest.mark.parametrize("cudart", CUDARTS)
def test_streams_and_events_order_the_work(
    registry: ZoneRegistry, runtime_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    socket = sim_zone(registry, "streams", 64 * MiB)
    got = cudart_values(runtime_programs[cudart], "streams", socket, libcuda_dir)
    assert got["priorities"] == "0 -5"
    assert got["stream"] == "-5 1"  # the highest priority, cudaStreamNonBlocking


@pytest.mark.parametrize("cudart", CUDARTS)
def test_kernel_launch_validated_by_sim_without_execution(
    registry: ZoneRegistry, runtime_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    socket = sim_zone(registry, "launch", 64 * MiB)
    got = cudart_values(runtime_programs[cudart], "launch", socket, libcuda_dir)
    d, p = (int(x, 16) for x in got["ptr"].split())
    records = sim_launches(registry, "launch")
    # mixed(int i, const pair *p, pair s, char c, double d), pair = {int a; double b;}.
    mixed = struct.pack("<i4xQi4xdB7xd", 7, p, 3, 2.25, ord("q"), -0.125)
    assert [(r.function, r.grid, r.block, r.shared_mem, r.params) for r in records] == [
        ("_Z5scalePffi", (2, 1, 1), (32, 1, 1), 0, struct.pack("<Qfi", d, 2.0, 64)),
        ("_Z5mixediPK4pairS_cd", (3, 2, 1), (8, 4, 2), 0, mixed),
    ]
    assert [r.stream is None for r in records] == [True, False]


@pytest.mark.parametrize("cudart", CUDARTS)
def test_malloc_beyond_the_zone_quota_is_a_memory_allocation_error(
    registry: ZoneRegistry, runtime_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    cudart_values(
        runtime_programs[cudart], "quota", sim_zone(registry, "quota", 8 * MiB), libcuda_dir
    )
