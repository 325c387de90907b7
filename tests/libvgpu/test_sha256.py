"""libvgpu's SHA-256 gives hashlib's digests: gpu-proxy's module cache answers a zone by the
digest of the bytes it received, so a digest libvgpu computed differently would never hit. Both
the SHA-extension rounds (this CPU's, where it has them) and the portable ones, across every
padding boundary."""

import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from libvgpu.build import GEN, SRC
from tests.libvgpu.conftest import C_DIR, compile_c

SIZES = [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000, (1 << 20) + 3]


@pytest.mark.parametrize("portable", [False, True], ids=["cpu", "portable"])
def test_digests_match_hashlib(tmp_path: Path, portable: bool) -> None:
    exe = tmp_path / "sha256"
    compile_c([C_DIR / "sha256.c", SRC / "sha256.c"], exe, [], include=(SRC, GEN))
    env = {k: v for k, v in os.environ.items() if k != "VGPU_SHA256_PORTABLE"}
    if portable:
        env["VGPU_SHA256_PORTABLE"] = "1"
    rng = random.Random(7)
    for size in SIZES:
        data = rng.randbytes(size)
        out = subprocess.run([exe], input=data, capture_output=True, env=env, check=True)
        assert out.stdout.decode().strip() == hashlib.sha256(data).hexdigest(), size
