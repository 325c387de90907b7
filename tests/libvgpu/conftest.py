"""libvgpu under test: the library built from this checkout, C programs (tests/libvgpu/c) that
use the driver API as real programs do, compiled with gcc against cuda.h and linked with
``-lcuda`` from the build, CUDA modules built by nvcc, and gpu-proxy (sim backend) serving the
programs over LocalLink. No GPU is needed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devkit.daemons import GpuProxyDaemon
from gpu_proxy.backends.sim import LaunchRecord, SimBackend, SimContext
from gpu_proxy.registry import ZoneRegistry
from gpu_proxy.telemetry.zone_stats import ZoneIdentity
from gpu_proxy.zone import Zone
from libvgpu.build import GEN, SRC, build, cuda_include
from tests.nvcc import NVCC, build_modules

C_DIR = Path(__file__).resolve().parent / "c"
MiB = 1 << 20
# cudart linked statically (nvcc's default) and as libcudart.so
CUDARTS = ("static", "shared")

# The test programs run a second time against an instrumented libvgpu (test_sanitizers.py): name ->
# arguments ({cubin} and {modules} are filled in).
SANITIZED_RUNS = {
    "device_query": [],
    "memory": [],
    "streams": [],
    "errors-handles": ["handles"],
    "errors-sticky": ["sticky", "{cubin}"],
    "fork": [],
    "threads": [],
    "launch": ["{modules}"],
    "procaddress": [],
    "stream_order": ["{cubin}"],
    "pinned": [],
}
SANITIZE = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")

# One zone per test program, so that no test sees another's memory use; `quota` is small.
ZONES = {
    "device": 64 * MiB,
    "memory": 512 * MiB,
    "streams": 64 * MiB,
    "handles": 64 * MiB,
    "quota": 8 * MiB,
    "sticky": 64 * MiB,
    "ipc": 64 * MiB,
    "fork": 64 * MiB,
    "threads": 64 * MiB,
    "stream_order": 64 * MiB,
    **{f"sanitized-{name}": 512 * MiB for name in SANITIZED_RUNS},
}

KERNELS = r"""
struct pair { int a; double b; char c; };
__device__ int counter = 5;  // a module variable (cuModuleGetGlobal)
struct big { int v[1200]; };

// Writes through p: on a GPU it would change device memory, under the sim it must not.
extern "C" __global__ void mixed(int i, float *p, float f, pair s, char c, double d) {
    if (p) p[0] = i + f + s.a + s.b + s.c + c + d;
}
extern "C" __global__ void noargs() {}
extern "C" __global__ void scale(float *x, float k, int n) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) x[t] *= k;
}
extern "C" __global__ void big(big b, int *out) { out[0] = b.v[0] + b.v[1199]; }
"""

# name -> nvcc flags. The sim is an H100 (sm_90). nvcc 13 zstd-compresses PTX entries by
# default and LZ4-compresses them with -compress-mode=speed; -compress-mode=size compresses
# cubins with zstd too.
MODULE_BUILDS = {
    "kernels.cubin": ["-cubin", "-arch=sm_90"],
    "kernels.fatbin": ["-fatbin", "-arch=sm_90"],
    "kernels.ptx": ["-ptx", "-arch=sm_90"],
    "kernels_sm80.cubin": ["-cubin", "-arch=sm_80"],
    "kernels_lz4_ptx.fatbin": [
        "-fatbin", "-gencode", "arch=compute_90,code=compute_90", "-compress-mode=speed",
    ],
    "kernels_zstd.fatbin": ["-fatbin", "-arch=sm_90", "-compress-mode=size"],
}  # fmt: skip


@dataclass
class Programs:
    """The C test programs, each compiled on first use and linked against libvgpu (rpath)."""

    libdir: Path
    out: Path
    cflags: tuple[str, ...] = ()
    built: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Path:
        if name not in self.built:
            exe = self.out / name
            compile_c(
                [C_DIR / f"{name}.c"],
                exe,
                [f"-L{self.libdir}", f"-Wl,-rpath,{self.libdir}", "-lcuda", "-ldl"],
                cflags=self.cflags,
            )
            self.built[name] = exe
        return self.built[name]


def compile_c(
    sources: list[Path],
    exe: Path,
    link: list[str],
    include: tuple[Path, ...] = (),
    cflags: tuple[str, ...] = (),
) -> None:
    """gcc, warnings as errors, against the CUDA toolkit's headers."""
    cmd = [
        os.environ.get("CC") or "cc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror",
        "-pthread", *cflags, f"-I{cuda_include()}", f"-I{C_DIR}", *(f"-I{d}" for d in include),
        "-o", str(exe), *(str(s) for s in sources), *link,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"compiling {exe.name} failed:\n{proc.stderr}"


def run(
    exe: Path, *args: str, socket: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a test program as a zone's process: gpu-proxy's zone socket in VGPU_PROXY_SOCKET."""
    return subprocess.run(
        [str(exe), *args],
        env={**os.environ, **(env or {}), "VGPU_PROXY_SOCKET": str(socket)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def passed(proc: subprocess.CompletedProcess[str]) -> str:
    """The program's stdout, after checking it exited 0 (its stderr names a failed check)."""
    assert proc.returncode == 0, (
        f"{proc.args[0]} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    assert proc.stdout.splitlines()[-1] == "ok", proc.stdout
    return proc.stdout


@pytest.fixture(scope="session")
def libcuda_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libvgpu built from this checkout; the directory holds libcuda.so.1 and libcuda.so."""
    return build(tmp_path_factory.mktemp("libvgpu")).library.parent


@pytest.fixture(scope="session")
def programs(libcuda_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Programs:
    return Programs(libcuda_dir, tmp_path_factory.mktemp("programs"))


@pytest.fixture(scope="session")
def sanitized_programs(tmp_path_factory: pytest.TempPathFactory) -> Programs:
    """The same programs and libvgpu, built with AddressSanitizer and UBSan."""
    libdir = build(tmp_path_factory.mktemp("libvgpu-sanitized"), SANITIZE).library.parent
    return Programs(libdir, tmp_path_factory.mktemp("programs-sanitized"), SANITIZE)


@pytest.fixture(scope="session")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Module images built by nvcc from KERNELS, by file name."""
    out = tmp_path_factory.mktemp("modules")
    build_modules(KERNELS, MODULE_BUILDS, out)
    return {name: out / name for name in MODULE_BUILDS}


@pytest.fixture(scope="session")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuProxyDaemon]:
    """gpu-proxy (sim backend) as its own process, serving one zone per entry of ZONES."""
    zones = [arg for name, size in ZONES.items() for arg in ("--zone", f"{name}={size}")]
    daemon = GpuProxyDaemon(tmp_path_factory.mktemp("proxy"), extra=tuple(zones))
    daemon.start()
    yield daemon
    assert daemon.stop() == 0


def zone_socket(proxy: GpuProxyDaemon, zone: str) -> Path:
    return proxy.socket_dir / f"{zone}.sock"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ZoneRegistry]:
    """gpu-proxy's ZoneRegistry (sim backend) in this process: the same code as the daemon,
    and a test can read back what the sim recorded."""
    reg = ZoneRegistry(SimBackend(), tmp_path)
    yield reg
    reg.close()


def sim_zone(registry: ZoneRegistry, name: str, quota: int) -> Path:
    """Register zone ``name`` with ``quota`` bytes; its socket."""
    return registry.register(
        ZoneIdentity(zone=name, domid=0, pod="pod", namespace="ml", gpu_index=0), quota
    )


def zone_named(registry: ZoneRegistry, name: str) -> Zone:
    [zone] = [z for z in registry.zones() if z.id == name]
    return zone


def call_counts(registry: ZoneRegistry, zone_id: str) -> dict[tuple[str, str], int]:
    """How often gpu-proxy answered each (call, result) for the zone."""
    return dict(zone_named(registry, zone_id).stats.snapshot().calls)


def sim_launches(registry: ZoneRegistry, zone_id: str) -> list[LaunchRecord]:
    """The launches the sim recorded for the zone, in stream order."""
    [zone] = [z for z in registry.zones() if z.id == zone_id]
    assert isinstance(zone.context, SimContext)
    return list(zone.context.launches)


def build_cudart_programs(source: Path, out: Path) -> dict[str, Path]:
    """``source`` built by nvcc once per cudart linkage in CUDARTS (in parallel), for the H100
    the sim models."""
    exes = {cudart: out / f"{source.stem}-{cudart}" for cudart in CUDARTS}
    procs = {
        cudart: subprocess.Popen(
            [NVCC, "-arch=sm_90", f"-cudart={cudart}", "-o", str(exe), str(source)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for cudart, exe in exes.items()
    }
    for cudart, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"nvcc -cudart={cudart}: {err}"
    return exes


def cudart_values(exe: Path, mode: str, socket: Path, libdir: Path) -> dict[str, str]:
    """Run one mode of a cudart test program as a zone's process; its `key value` lines.
    libcudart.so (the shared linkage) comes from the toolkit."""
    env = {"LD_LIBRARY_PATH": f"{libdir}:/usr/local/cuda/lib64"}
    out = passed(run(exe, mode, socket=socket, env=env))
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def bulk_wire_check(out: Path) -> Path:
    """tests/libvgpu/c/bulk_wire.c linked with libvgpu's head encoders and the generated
    marshalling, nothing else."""
    exe = out / "bulk_wire"
    compile_c(
        [C_DIR / "bulk_wire.c", SRC / "bulk_wire.c", GEN / "vgpu_marshal.c"],
        exe,
        [],
        include=(SRC, GEN),
    )
    return exe
