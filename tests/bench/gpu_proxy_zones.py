"""gpu-proxy zone benchmarks: ``python -m tests.bench.gpu_proxy_zones [--quick]``.

Measures, on the sim backend (the dispatcher's own cost, no GPU):
- dispatcher scaling: N = 1, 8, 32, 64 zones registered in one ZoneRegistry, one C guest process
  per zone making synchronous cuDriverGetVersion calls for a fixed wall time; total calls/s,
  the median across zones of per-zone p50/p99, and per-zone p50 at N against N = 1;
- memory per idle zone: RSS of a fresh host process before and after 64 zones, each with one
  connected but quiet guest (C processes, so only the host's cost lands in the host's RSS).
The guest side is tests/bench/c/zone_client.c, linked with the same idm/csrc files libvgpu uses.
Results: results/bench/gpu_proxy_zones.json.
"""

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import structlog

from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.registry import ZoneRegistry
from gpu_proxy.telemetry.zone_stats import ZoneIdentity
from tests.bench.harness import (
    C_DIR,
    ROOT,
    build_c,
    cpus_env,
    goal_report,
    pick_cpus,
    pinned_host,
    print_goals,
)

CLIENT_SRC = C_DIR / "zone_client.c"
RESULTS = ROOT / "results" / "bench" / "gpu_proxy_zones.json"

ZONE_COUNTS = (1, 8, 32, 64)
IDLE_ZONES = 64
ZONE_LIMIT = 256 << 20
WARMUP_S = 0.3
# Guest-side busy-wait before sleeping on the doorbell. The library default (50 us) is right for
# one guest with a core to itself; 64 guests spinning that long on a 2-CPU machine would take
# the CPU the host needs to answer them. 2 us covers a reply that is already on its way.
CLIENT_SPIN_NS = 2000
SETTLE_S = 1.0

GOALS = {"memory_per_idle_zone_mib": ("<=", 2.0)}


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """The registry logs every zone it registers; 64 at a time would bury the report."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        yield
    finally:
        structlog.configure(**saved)


@contextlib.contextmanager
def zones_with_clients(
    n: int, argv: list[str], env: dict[str, str] | None = None
) -> Iterator[list[subprocess.Popen[str]]]:
    """Register n zones and start one client per zone (argv + [socket] + rest); yields once all
    have said hello. Every client is reaped and the registry closed, whatever happens."""
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-proxy-zones-") as tmp:
        registry = ZoneRegistry(SimBackend(), Path(tmp))
        try:
            for i in range(n):
                path = registry.register(
                    ZoneIdentity(zone=f"z{i}", domid=0, gpu_index=0), ZONE_LIMIT
                )
                cmd = [argv[0], argv[1], str(path), *argv[2:]]
                procs.append(
                    subprocess.Popen(
                        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
                    )
                )
            for p in procs:
                assert p.stdout is not None
                line = p.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"zone client did not connect (rc={p.poll()}): {line!r}")
            yield procs
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                for stream in (p.stdin, p.stdout):
                    if stream is not None:
                        stream.close()
            registry.close()


def run_zones(exe: Path, n: int, run_s: float, cpus: tuple[int, int] | None) -> dict[str, Any]:
    """N zones calling at once; per-zone figures from each client, aggregated here."""
    env = cpus_env(cpus)
    argv = [str(exe), "calls", str(int(WARMUP_S * 1e9)), str(int(run_s * 1e9)), str(CLIENT_SPIN_NS)]
    with zones_with_clients(n, argv, env) as procs:
        for p in procs:  # start everyone together, after all have connected
            stdin: IO[str] | None = p.stdin
            assert stdin is not None
            stdin.write("go\n")
            stdin.flush()
        per_zone = []
        for p in procs:
            out, _ = p.communicate(timeout=WARMUP_S + run_s + 60)
            if p.returncode:
                raise RuntimeError(f"zone client failed with rc={p.returncode}")
            per_zone.append(json.loads(out))
    p50s = [z["p50_ns"] for z in per_zone]
    p99s = [z["p99_ns"] for z in per_zone]
    return {
        "zones": n,
        "calls_per_s": sum(z["calls"] / z["seconds"] for z in per_zone),
        "zone_p50_us_median": statistics.median(p50s) / 1000,
        "zone_p99_us_median": statistics.median(p99s) / 1000,
        "zone_p50_us_max": max(p50s) / 1000,
        "zone_calls_min": min(z["calls"] for z in per_zone),
        "zone_calls_max": max(z["calls"] for z in per_zone),
    }


def read_status() -> dict[str, int]:
    """VmRSS and its split (anonymous: heap, stacks; shmem: the mapped rings), in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


def memory_child(exe: Path, out: Path, trace: bool) -> None:
    """Runs in a fresh interpreter: RSS (or, with trace, Python heap) before and after
    IDLE_ZONES zones, each with one connected idle C guest."""
    if trace:
        tracemalloc.start()
    with quiet_logs(), tempfile.TemporaryDirectory(prefix="gpu-proxy-mem-") as tmp:
        # A registry that has served one zone: imports and lazy setup are in the baseline.
        registry = ZoneRegistry(SimBackend(), Path(tmp))
        registry.register(ZoneIdentity(zone="warm", domid=0, gpu_index=0), ZONE_LIMIT)
        registry.close()
        gc.collect()
        time.sleep(0.2)
        before, heap_before = read_status(), tracemalloc.get_traced_memory()[0] if trace else 0
        with zones_with_clients(IDLE_ZONES, [str(exe), "idle"]):
            time.sleep(SETTLE_S)
            gc.collect()
            after, heap_after = read_status(), tracemalloc.get_traced_memory()[0] if trace else 0
    result = {
        "before_kib": before,
        "after_kib": after,
        "heap_delta_bytes": heap_after - heap_before,
    }
    out.write_text(json.dumps(result))


def run_memory_child(exe: Path, tmp: Path, trace: bool) -> dict[str, Any]:
    out = tmp / f"memory-{'trace' if trace else 'rss'}.json"
    cmd = [sys.executable, "-m", "tests.bench.gpu_proxy_zones", "--memory-child", str(exe)]
    cmd += [str(out), *(["--trace"] if trace else [])]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=120)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def measure(quick: bool) -> dict[str, Any]:
    run_s = 2.0 if quick else 5.0
    cpus = pick_cpus()
    with tempfile.TemporaryDirectory(prefix="gpu-proxy-bench-") as tmp:
        exe = build_c(CLIENT_SRC, Path(tmp))
        with pinned_host(cpus), quiet_logs():
            host_cpus = len(os.sched_getaffinity(0))
            scaling = [run_zones(exe, n, run_s, cpus) for n in ZONE_COUNTS]
        rss = run_memory_child(exe, Path(tmp), trace=False)
        heap = run_memory_child(exe, Path(tmp), trace=True)
    base = scaling[0]["zone_p50_us_median"]
    for row in scaling:
        row["zone_p50_vs_1_zone"] = row["zone_p50_us_median"] / base

    def per_zone_mib(key: str) -> float:
        return float(rss["after_kib"][key] - rss["before_kib"][key]) / IDLE_ZONES / 1024

    figures: dict[str, float] = {}
    for row in scaling:
        n = row["zones"]
        figures[f"zones_{n}_calls_per_s"] = row["calls_per_s"]
        figures[f"zones_{n}_zone_p50_us"] = row["zone_p50_us_median"]
        figures[f"zones_{n}_zone_p99_us"] = row["zone_p99_us_median"]
        figures[f"zones_{n}_p50_vs_1_zone"] = row["zone_p50_vs_1_zone"]
        figures[f"zones_{n}_fairness"] = row["zone_calls_min"] / row["zone_calls_max"]
    figures["memory_per_idle_zone_mib"] = per_zone_mib("VmRSS")
    figures["memory_per_idle_zone_anon_mib"] = per_zone_mib("RssAnon")
    figures["memory_per_idle_zone_shmem_mib"] = per_zone_mib("RssShmem")
    figures["python_heap_per_idle_zone_kib"] = heap["heap_delta_bytes"] / IDLE_ZONES / 1024
    figures["threads_per_idle_zone"] = (
        rss["after_kib"]["Threads"] - rss["before_kib"]["Threads"]
    ) / IDLE_ZONES
    return {
        "quick": quick,
        "run_s": run_s,
        "warmup_s": WARMUP_S,
        "client_spin_ns": CLIENT_SPIN_NS,
        "host_spin_ns": "library default",
        "cpus": {"host": cpus[0], "clients": cpus[1]} if cpus else None,
        "host_cpu_count": host_cpus,
        "machine_cpu_count": os.cpu_count(),
        "figures": figures,
        "goals": goal_report(figures, GOALS),
        "raw": {"scaling": scaling, "memory_rss": rss, "memory_tracemalloc": heap},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (demo, smoke)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--memory-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        exe, out = args.memory_child
        memory_child(exe, out, trace=args.trace)
        return 0
    result = measure(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu-proxy zone benchmark ({'quick' if args.quick else 'full'} run, sim backend)")
    print(f"  host CPUs: {result['host_cpu_count']}, guest spin: {CLIENT_SPIN_NS} ns")
    print(
        f"  {'zones':>5} {'calls/s':>12} {'zone p50 us':>12} {'zone p99 us':>12}"
        f" {'p50 vs 1':>9} {'fairness':>9}"
    )
    for row in result["raw"]["scaling"]:
        print(
            f"  {row['zones']:>5} {row['calls_per_s']:>12,.0f} {row['zone_p50_us_median']:>12.1f}"
            f" {row['zone_p99_us_median']:>12.1f} {row['zone_p50_vs_1_zone']:>9.2f}"
            f" {row['zone_calls_min'] / row['zone_calls_max']:>9.2f}"
        )
    print("  (fairness: fewest calls any zone made / most; p50 and p99 are medians across zones)")
    for name, value in result["figures"].items():
        if not name.startswith("zones_"):
            print(f"  {name:<40} {value:>14,.3f}")
    print_goals(result["goals"])
    print(f"results: {args.out}")
    return 0 if all(math.isfinite(v) for v in result["figures"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
