"""CUDA runtime programs (tests/libvgpu/cuda/runtime.cu) built by nvcc with cudart linked
statically (nvcc's default) and as libcudart.so, run as a zone's processes: cudart finds libvgpu as
libcuda.so.1 and everything it does reaches gpu-proxy's sim. gpu-proxy's ZoneRegistry runs in this
process, one zone per test, so that the launches the sim recorded can be read back."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_proxy.backends.sim import MODELS, Attr, LaunchRecord, SimBackend, SimContext
from gpu_proxy.registry import ZoneRegistry
from gpu_proxy.telemetry.zone_stats import ZoneIdentity
from tests.libvgpu.conftest import passed, run
from tests.nvcc import NVCC

MiB = 1 << 20
SOURCE = Path(__file__).resolve().parent / "cuda" / "runtime.cu"
CUDARTS = ("static", "shared")


@pytest.fixture(scope="session")
def runtime_programs(
    libcuda_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """runtime.cu built once per cudart linkage (in parallel), for the H100 the sim models."""
    out = tmp_path_factory.mktemp("cudart")
    exes = {cudart: out / f"runtime-{cudart}" for cudart in CUDARTS}
    procs = {
        cudart: subprocess.Popen(
            [NVCC, "-arch=sm_90", f"-cudart={cudart}", "-o", str(exe), str(SOURCE)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for cudart, exe in exes.items()
    }
    for cudart, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"nvcc -cudart={cudart}: {err}"
    return exes


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ZoneRegistry]:
    reg = ZoneRegistry(SimBackend(), tmp_path)
    yield reg
    reg.close()


def zone(registry: ZoneRegistry, name: str, quota: int) -> Path:
    return registry.register(
        ZoneIdentity(zone=name, domid=0, pod="pod", namespace="ml", gpu_index=0), quota
    )


def run_mode(
    programs: dict[str, Path], cudart: str, mode: str, socket: Path, libdir: Path
) -> dict[str, str]:
    """The program's `key value` lines; libcudart.so comes from the toolkit."""
    env = {"LD_LIBRARY_PATH": f"{libdir}:/usr/local/cuda/lib64"}
    out = passed(run(programs[cudart], mode, socket=socket, env=env))
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@pytest.mark.parametrize("cudart", CUDARTS)
def test_device_properties_are_the_sim_model(
    registry: ZoneRegistry, runtime_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    got = run_mode(
        runtime_programs, cudart, "props", zone(registry, "props", 64 * MiB), libcuda_dir
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
    socket = zone(registry, "memory", 64 * MiB)
    got = run_mode(runtime_programs, cudart, "memory", socket, libcuda_dir)
    size = (4 << 20) + 123
    assert got["meminfo"] == f"{64 * MiB - 2 * size} {64 * MiB}"  # both still allocated


@pytest.mark.parametrize("cudart", CUDARTS)
def test_streams_and_events_order_the_work(
    registry: ZoneRegistry, runtime_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    socket = zone(registry, "streams", 64 * MiB)
    got = run_mode(runtime_programs, cudart, "streams", socket, libcuda_dir)
    assert got["priorities"] == "0 -5"
    assert got["stream"] == "-5 1"  # the highest priority, cudaStreamNonBlocking


@pytest.mark.parametrize("cudart", CUDARTS)
def test_kernel_launch_validated_by_sim_without_execution(
    registry: ZoneRegistry, runtime_programs: dict[str, Path], libcuda_dir: Path, cudart: str
) -> None:
    socket = zone(registry, "launch", 64 * MiB)
    got = run_mode(runtime_programs, cudart, "launch", socket, libcuda_dir)
    d, p = (int(x, 16) for x in got["ptr"].split())
    [z] = [z for z in registry.zones() if z.id == "launch"]
    assert isinstance(z.context, SimContext)
    records: list[LaunchRecord] = list(z.context.launches)
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
    run_mode(runtime_programs, cudart, "quota", zone(registry, "quota", 8 * MiB), libcuda_dir)
