"""C programs the Dom0 suite runs, built on the host (Dom0 has no compiler) into build/dom0/,
which the testbed's payload carries: libvgpu as lib/libcuda.so.1 and driver-API test programs
from tests/libvgpu/c that find it through their rpath ($ORIGIN/lib), wherever the payload lands.

``python -m tests.xen.dom0_programs`` builds them; tests/xen/test_testbed.py does so before
every boot."""

import os
import subprocess
import sys
from pathlib import Path

from libvgpu.build import build, cuda_include

ROOT = Path(__file__).resolve().parent.parent.parent
PROGRAMS_OUT = ROOT / "build" / "dom0"
C_DIR = ROOT / "tests" / "libvgpu" / "c"
PROGRAMS = ("round_trip", "init_only", "pinned")
# What round_trip prints for its default 1 MiB (tests/libvgpu/test_grant_link.py checks it
# against Python's computation and a LocalLink run on the host).
ROUND_TRIP_1MIB = "8460c6b9431747be"


def build_dom0_programs(out: Path = PROGRAMS_OUT) -> Path:
    """Build libvgpu and PROGRAMS into ``out``; returns ``out``."""
    lib = build(out / "lib").library.parent
    for name in PROGRAMS:
        cmd = [
            os.environ.get("CC") or "cc", "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror",
            "-pthread", f"-I{cuda_include()}", f"-I{C_DIR}", "-o", str(out / name),
            str(C_DIR / f"{name}.c"), f"-L{lib}", "-Wl,-rpath,$ORIGIN/lib", "-lcuda",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {name} for Dom0 failed:\n{proc.stderr}")
    return out


if __name__ == "__main__":
    print(f"built {build_dom0_programs()}")
    sys.exit(0)
