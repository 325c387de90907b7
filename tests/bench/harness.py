"""What every benchmark here shares: building its C driver against the IDM sources, pinning the
host and the C clients to separate CPUs, and reporting figures against goals (never asserting
them: these machines are too noisy for thresholds)."""

import argparse
import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "idm" / "csrc"
GEN = ROOT / "libvgpu" / "gen"
C_DIR = Path(__file__).resolve().parent / "c"
IDM_SOURCES = ("ring", "bell", "hello", "local_link")

Goals = Mapping[str, tuple[str, float]]


def build_c(source: Path, out_dir: Path) -> Path:
    """Compile a C benchmark driver with the same idm/csrc files libvgpu links."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / source.stem
    sources = [source, *(CSRC / f"{name}.c" for name in IDM_SOURCES)]
    cmd = ["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]
    cmd += [f"-I{CSRC}", f"-I{GEN}", f"-I{C_DIR}", "-o", str(exe)]
    subprocess.run([*cmd, *map(str, sources)], check=True)
    return exe


def pick_cpus() -> tuple[int, int] | None:
    """Two CPUs for host and clients: pinning removes the run-to-run swings that come from where
    the scheduler happens to place spinning sides. None with fewer than two CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else None


def cpus_env(cpus: tuple[int, int] | None) -> dict[str, str]:
    """The environment that tells a C driver (bench.h) where to pin itself."""
    return {**os.environ, **({"IDM_BENCH_CPUS": f"{cpus[0]},{cpus[1]}"} if cpus else {})}


@contextlib.contextmanager
def pinned_host(cpus: tuple[int, int] | None) -> Iterator[None]:
    """Pin this process (and the host threads it starts) to the host CPU for the block."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, {cpus[0]})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def goal_report(figures: Mapping[str, float], goals: Goals) -> dict[str, dict[str, Any]]:
    report = {}
    for name, (op, target) in goals.items():
        value = figures[name]
        met = value <= target if op == "<=" else value >= target
        report[name] = {"value": round(value, 3), "goal": f"{op} {target}", "met": met}
    return report


def print_goals(report: Mapping[str, Mapping[str, Any]]) -> None:
    print("goals:")
    for name, g in report.items():
        verdict = "met" if g["met"] else "MISSED"
        print(f"  {name:<40} {g['value']:>14,.3f}  goal {g['goal']:<12} {verdict}")


def figures_main(
    argv: list[str] | None,
    *,
    title: str,
    description: str,
    default_out: Path,
    measure: Callable[[bool], dict[str, Any]],
) -> int:
    """The command line of a benchmark whose result is flat figures and goals: --quick and
    --out, then the JSON file, the figures and the goals on stdout."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke)")
    parser.add_argument("--out", type=Path, default=default_out, help="JSON results file")
    args = parser.parse_args(argv)
    result = measure(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{title} ({'quick' if args.quick else 'full'} run)")
    for name, value in result["figures"].items():
        print(f"  {name:<40} {value:>14,.3f}")
    print_goals(result["goals"])
    print(f"results: {args.out}")
    return 0
