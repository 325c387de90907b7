"""Build libvgpu, the zone's ``libcuda.so.1``: ``python -m libvgpu.build [--out DIR]``.

One ``cc`` command compiles libvgpu's sources (``libvgpu/src``), the marshalling generated from
the call table (``libvgpu/gen``) and the IDM ring's C files (the very list ``idm._build`` gives
cffi, so both ends of a channel run one implementation) into ``DIR/libvgpu.so`` with the soname
``libcuda.so.1``, then links ``libcuda.so.1`` and ``libcuda.so`` to it. Warnings are errors;
only the CUDA driver API entry points are exported (``-fvisibility=hidden`` plus an explicit
attribute on each). The types and prototypes come from the CUDA toolkit's ``cuda.h``
(``$CUDA_HOME`` or ``/usr/local/cuda``). Run by scripts/setup.sh after ``python -m idm.build``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from idm._build import CSRC as IDM_CSRC
from idm._build import SOURCES as IDM_SOURCES

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "libvgpu" / "src"
GEN = ROOT / "libvgpu" / "gen"
DEFAULT_OUT = ROOT / "libvgpu" / "build"
LIBRARY = "libvgpu.so"
SONAME = "libcuda.so.1"
LINKS = {SONAME: LIBRARY, "libcuda.so": SONAME}

CFLAGS = ("-std=c11", "-O2", "-fPIC", "-fvisibility=hidden", "-pthread")
WARNINGS = ("-Wall", "-Wextra", "-Werror")
LDFLAGS = ("-shared", f"-Wl,-soname,{SONAME}", "-Wl,-z,defs", "-Wl,-z,relro,-z,now")


class BuildError(RuntimeError):
    """The build cannot run or the compiler refused the sources (the message has its output)."""


@dataclass(frozen=True)
class Built:
    library: Path  # DIR/libvgpu.so; DIR/libcuda.so.1 and DIR/libcuda.so link to it
    compiler_output: str  # empty for a clean build


def cuda_include() -> Path:
    """The CUDA toolkit's include directory (the one with cuda.h)."""
    home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    include = home / "include"
    if not (include / "cuda.h").is_file():
        raise BuildError(
            f"{include / 'cuda.h'} not found: libvgpu takes the driver API's types and "
            "prototypes from the CUDA toolkit (set CUDA_HOME to its root)"
        )
    return include


def sources() -> list[Path]:
    """Every C file compiled into the library, in a fixed order (reproducible output)."""
    return [
        *sorted(SRC.glob("*.c")),
        GEN / "vgpu_marshal.c",
        *(IDM_CSRC / name for name in IDM_SOURCES),
    ]


def command(output: Path, extra_cflags: Sequence[str] = ()) -> list[str]:
    compiler = shlex.split(os.environ.get("CC") or "cc")
    includes = [f"-I{d}" for d in (SRC, GEN, IDM_CSRC, cuda_include())]
    return [
        *compiler,
        *CFLAGS,
        *extra_cflags,
        *WARNINGS,
        *includes,
        *LDFLAGS,
        "-o",
        str(output),
        *(str(s) for s in sources()),
    ]


def build(out: Path = DEFAULT_OUT, extra_cflags: Sequence[str] = ()) -> Built:
    """Compile into ``out`` (created if needed); the library replaces any earlier one only once
    it is complete. ``extra_cflags`` is for instrumented test builds (sanitizers)."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".{LIBRARY}.partial"
    proc = subprocess.run(
        command(partial, extra_cflags), capture_output=True, text=True, check=False
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"compiling libvgpu failed:\n{output}")
    library = out / LIBRARY
    partial.replace(library)
    for name, target in LINKS.items():
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return Built(library, output)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m libvgpu.build", description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = ap.parse_args(argv)
    try:
        built = build(args.out)
    except BuildError as exc:
        print(f"libvgpu.build: {exc}", file=sys.stderr)
        return 1
    print(f"built {built.library} (soname {SONAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
