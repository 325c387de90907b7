"""libvgpu benchmarks: ``python -m tests.bench.libvgpu_calls [--quick]``.

A CUDA program calls the driver API through libvgpu (tests/bench/c/libvgpu_bench.c, linked with
``-lcuda`` against libvgpu built from this checkout) and gpu-proxy serves it: its ZoneRegistry on
the sim backend, in this process, as the daemon runs it. In the same run, the raw IDM channel
figures the calls rest on (tests/bench/c/idm_bench.c against a bare ChannelServer, as in
tests.bench.idm_channel), so the ratios show what the driver API layer adds: libvgpu's
bookkeeping and marshalling, gpu-proxy's decoding, checks and dispatch, and the sim's work.
- a synchronous call (cuStreamQuery) against a null round trip;
- cuLaunchKernel: the rate a program issues launches (fire-and-forget, while the ring has room)
  and the rate gpu-proxy completes them, against raw fire-and-forget messages of the same size;
- 64 MiB cuMemcpyHtoD / cuMemcpyDtoH against a raw 64 MiB message and a plain memcpy;
- 64 MiB cuMemcpyHtoDAsync / DtoHAsync + cuStreamSynchronize on pinned memory (cuMemAllocHost,
  shared with gpu-proxy: only arena, offset and length travel), against the pageable copies;
- cuModuleLoadData of a 16 MiB cubin again in the same zone: asked for by its SHA-256 (gpu-proxy's
  module cache has it) against a gpu-proxy with the cache off (the image is sent every time).
Results: results/bench/libvgpu_calls.json.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.registry import ZoneRegistry
from gpu_proxy.telemetry.zone_stats import ZoneIdentity
from libvgpu.build import build, cuda_include
from tests.bench.harness import (
    C_DIR,
    CSRC,
    GEN,
    ROOT,
    build_c,
    cpus_env,
    figures_main,
    goal_report,
    pick_cpus,
    pinned_host,
)
from tests.bench.idm_channel import python_host, run_driver
from tests.nvcc import build_modules

RESULTS = ROOT / "results" / "bench" / "libvgpu_calls.json"
COPY_BYTES = 64 << 20
KERNEL = 'extern "C" __global__ void noargs() {}\n'
# A large module: 16 MiB of initialised __device__ data make a 16 MiB cubin.
LARGE_MODULE = (
    "__device__ unsigned char blob[16 << 20] = {1, 2, 3};\n"
    'extern "C" __global__ void touch(unsigned char *out) { out[0] = blob[threadIdx.x]; }\n'
)

GOALS = {
    # A forwarded call costs what the ring costs plus gpu-proxy's dispatch: a few microseconds.
    "sync_call_overhead_us": ("<=", 10.0),
    "launches_issued_per_s": (">=", 200_000),
    "htod_vs_raw_bulk": (">=", 0.5),
    "dtoh_vs_raw_bulk": (">=", 0.5),
}


def build_driver(out: Path) -> Path:
    """libvgpu_bench.c linked against a fresh libvgpu (rpath: it loads that libcuda.so.1)."""
    libdir = build(out / "libvgpu").library.parent
    exe = out / "libvgpu_bench"
    subprocess.run(
        [
            "gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror",
            f"-I{cuda_include()}", f"-I{CSRC}", f"-I{GEN}", f"-I{C_DIR}",
            "-o", str(exe), str(C_DIR / "libvgpu_bench.c"),
            f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lcuda",
        ],
        check=True,
    )  # fmt: skip
    return exe


def run_program(exe: Path, socket: Path, cpus: tuple[int, int] | None, *args: object) -> Any:
    env = {**cpus_env(cpus), "VGPU_PROXY_SOCKET": str(socket)}
    out = subprocess.run(
        [str(exe), *map(str, args)], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout)


def measure(quick: bool) -> dict[str, Any]:
    calls = 5_000 if quick else 50_000
    # A round of launches fits the 512 KiB request ring (80 bytes each): issuing never waits.
    launches, rounds = 4_000, 5 if quick else 50
    reps = 3 if quick else 8
    raw: dict[str, Any] = {}
    cpus = pick_cpus()
    with tempfile.TemporaryDirectory(prefix="libvgpu-bench-") as tmp, pinned_host(cpus):
        out = Path(tmp)
        cubin = out / "noargs.cubin"
        build_modules(KERNEL, {cubin.name: ["-cubin", "-arch=sm_90"]}, out)
        large = out / "large.cubin"
        build_modules(LARGE_MODULE, {large.name: ["-cubin", "-arch=sm_90"]}, out)
        exe = build_driver(out)
        registry = ZoneRegistry(SimBackend(), out)
        (out / "uncached").mkdir()
        uncached = ZoneRegistry(SimBackend(), out / "uncached", module_cache_bytes=0)
        try:
            zone = ZoneIdentity(zone="bench", domid=0, pod="bench", namespace="bench", gpu_index=0)
            socket = registry.register(zone, 1 << 30)
            raw["sync"] = run_program(exe, socket, cpus, "sync", calls)
            raw["launch"] = run_program(exe, socket, cpus, "launch", cubin, launches, rounds)
            raw["htod"] = run_program(exe, socket, cpus, "htod", COPY_BYTES, reps)
            raw["dtoh"] = run_program(exe, socket, cpus, "dtoh", COPY_BYTES, reps)
            raw["pinned_htod"] = run_program(exe, socket, cpus, "pinned-htod", COPY_BYTES, reps)
            raw["pinned_dtoh"] = run_program(exe, socket, cpus, "pinned-dtoh", COPY_BYTES, reps)
            raw["module"] = run_program(exe, socket, cpus, "module", large, reps)
            plain = uncached.register(zone, 1 << 30)
            raw["module_uncached"] = run_program(exe, plain, cpus, "module", large, reps)
        finally:
            registry.close()
            uncached.close()
        idm = build_c(C_DIR / "idm_bench.c", out)
        host = out / "host.sock"
        with python_host(host):
            raw["ring_null"] = run_driver(idm, "local-null", host, calls, 0, cpus=cpus)
            raw["ring_async"] = run_driver(
                idm, "local-async", host, launches * rounds, 48, cpus=cpus
            )
            raw["ring_bulk"] = run_driver(idm, "local-bulk", host, COPY_BYTES, reps, cpus=cpus)
        raw["memcpy"] = run_driver(idm, "memcpy", COPY_BYTES, reps * 2, cpus=cpus)
    ring_bulk_s = raw["ring_bulk"]["best_s"]
    figures = {
        "sync_call_p50_us": raw["sync"]["p50_ns"] / 1000,
        "sync_call_p99_us": raw["sync"]["p99_ns"] / 1000,
        "ring_null_call_p50_us": raw["ring_null"]["p50_ns"] / 1000,
        "sync_call_overhead_us": (raw["sync"]["p50_ns"] - raw["ring_null"]["p50_ns"]) / 1000,
        "launches_issued_per_s": raw["launch"]["issued_per_s"],
        "launches_completed_per_s": raw["launch"]["completed_per_s"],
        "ring_async_msgs_per_s": raw["ring_async"]["msgs_per_s"],
        "htod_gib_per_s": raw["htod"]["gib_per_s"],
        "dtoh_gib_per_s": raw["dtoh"]["gib_per_s"],
        "pinned_htod_gib_per_s": raw["pinned_htod"]["gib_per_s"],
        "pinned_dtoh_gib_per_s": raw["pinned_dtoh"]["gib_per_s"],
        "pinned_vs_pageable_htod": raw["htod"]["best_s"] / raw["pinned_htod"]["best_s"],
        "pinned_vs_pageable_dtoh": raw["dtoh"]["best_s"] / raw["pinned_dtoh"]["best_s"],
        "ring_bulk_gib_per_s": raw["ring_bulk"]["gib_per_s"],
        "memcpy_gib_per_s": raw["memcpy"]["gib_per_s"],
        "htod_vs_raw_bulk": ring_bulk_s / raw["htod"]["best_s"],
        "dtoh_vs_raw_bulk": ring_bulk_s / raw["dtoh"]["best_s"],
        "module_first_load_ms": raw["module"]["first_s"] * 1000,
        "module_load_by_digest_ms": raw["module"]["again_s"] * 1000,
        "module_load_sent_ms": raw["module_uncached"]["again_s"] * 1000,
        "module_sent_vs_by_digest": raw["module_uncached"]["again_s"] / raw["module"]["again_s"],
    }
    return {
        "quick": quick,
        "cpus": {"host": cpus[0], "client": cpus[1]} if cpus else None,
        "figures": figures,
        "goals": goal_report(figures, GOALS),
        "raw": raw,
    }


def main(argv: list[str] | None = None) -> int:
    return figures_main(
        argv,
        title="libvgpu benchmark",
        description=__doc__.splitlines()[0],
        default_out=RESULTS,
        measure=measure,
    )


if __name__ == "__main__":
    sys.exit(main())
