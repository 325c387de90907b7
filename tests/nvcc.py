"""Building real CUDA modules for the tests with nvcc (part of this project's build environment at
/usr/local/cuda: a missing nvcc fails the tests that need it instead of skipping them)."""

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


def build_modules(
    source: str, builds: Mapping[str, Sequence[str]], out_dir: Path
) -> dict[str, bytes]:
    """Compile ``source`` once per build (name -> nvcc flags), in parallel; name -> image."""
    assert os.access(NVCC, os.X_OK), f"{NVCC} not found: these tests build real CUDA modules"
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "kernels.cu"
    src.write_text(source)
    procs = {
        name: subprocess.Popen(
            [NVCC, *flags, "-o", str(out_dir / name), str(src)], stderr=subprocess.PIPE, text=True
        )
        for name, flags in builds.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"nvcc {name}: {err}"
    return {name: (out_dir / name).read_bytes() for name in builds}
