"""The demo pod's image: devkit/cuda/hello_vgpu.cu built by nvcc (cudart linked statically, nvcc's
default) over the busybox userland, with exactly the host's shared libraries that it and libvgpu
load. The image has no CUDA driver: the zone agent mounts libvgpu as libcuda.so.1 into
/usr/lib/x86_64-linux-gnu, a directory the image must have and where the loader looks without an
ld.so.cache."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from devkit.busybox import File, Userland, busybox_layer_tar, layer_tar
from devkit.images import PATH_ENV, push_image
from devkit.registry import LocalRegistry
from libvgpu.build import DEFAULT_OUT, LIBRARY

SOURCE = Path(__file__).resolve().parent / "cuda" / "hello_vgpu.cu"
NVCC = Path(shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
LIBVGPU = DEFAULT_OUT / LIBRARY
PROGRAM = "hello-vgpu"
PROGRAM_PATH = f"usr/local/bin/{PROGRAM}"
LIBDIR = "usr/lib/x86_64-linux-gnu"
# Cubins for Turing to Blackwell (a cubin also runs on later minors of its major: sm_80 on sm_86
# and sm_89); sm_90 is the H100 the sim models. libvgpu and gpu-proxy pick the device's entry.
ARCHES = ("75", "80", "90", "100", "120")
NVCC_FLAGS = tuple(f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ARCHES)
LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(\S+) \(0x[0-9a-f]+\)$")


@dataclass(frozen=True)
class Program:
    path: Path
    nvcc_version: str  # "13.0"
    build_s: float | None  # None: the cached build was current


def build_program(cache_dir: Path) -> Program:
    """The program, built by nvcc unless cache_dir holds a build of the same source, flags and
    nvcc (nvcc takes seconds; the demo's work dir keeps the cache between runs)."""
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True)
    release = re.search(r"release (\d+\.\d+)", version.stdout)
    if version.returncode != 0 or release is None:
        raise RuntimeError(f"{NVCC} --version names no release:\n{version.stdout}{version.stderr}")
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *NVCC_FLAGS, version.stdout]).encode()
    ).hexdigest()
    exe, stamp = cache_dir / PROGRAM, cache_dir / f"{PROGRAM}.key"
    if exe.is_file() and stamp.is_file() and stamp.read_text() == key:
        return Program(exe, release.group(1), None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f"{PROGRAM}.partial"
    started = time.perf_counter()
    nvcc = subprocess.run(
        [NVCC, *NVCC_FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True
    )
    if nvcc.returncode != 0:
        raise RuntimeError(f"nvcc could not build {SOURCE}:\n{nvcc.stderr.strip()}")
    os.replace(partial, exe)
    stamp.write_text(key)
    return Program(exe, release.group(1), time.perf_counter() - started)


def shared_libraries(binary: Path) -> dict[str, Path]:
    """Where the image must hold each library the binary loads -> the host's copy, from ldd:
    the loader at its own path (the binary's PT_INTERP), the others by soname in LIBDIR."""
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if ldd.returncode != 0:
        raise RuntimeError(f"ldd {binary} failed: {ldd.stderr.strip()}")
    found = {}
    for line in ldd.stdout.splitlines():
        if "=> not found" in line:
            raise RuntimeError(f"ldd {binary}: {line.strip()}")
        match = LDD_LINE.match(line)
        if match is None:
            raise RuntimeError(f"ldd {binary}: cannot read {line.strip()!r}")
        soname, path = match.groups()
        if soname is not None:
            found[f"{LIBDIR}/{soname}"] = Path(path)
        elif path.startswith("/"):
            found[path.lstrip("/")] = Path(path)
        # else the vDSO, which the kernel maps
    return found


def with_parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]


def cuda_userland(program: Path) -> Userland:
    """The program and the libraries it and libvgpu need, with every directory they are in and
    LIBDIR (libvgpu's mount target) even if no library were there."""
    libraries = {**shared_libraries(LIBVGPU), **shared_libraries(program)}
    files = [File(PROGRAM_PATH, program.read_bytes(), 0o755)] + [
        File(path, host.read_bytes(), 0o755) for path, host in sorted(libraries.items())
    ]
    directories = {
        directory
        for path in [LIBDIR, *(posixpath.dirname(file.path) for file in files)]
        for directory in with_parents(path)
    }
    return Userland([(d, 0o755) for d in sorted(directories)], files, symlinks=[])


def push_cuda_image(
    registry: LocalRegistry, repo: str, tag: str, program: Path
) -> tuple[str, list[str]]:
    """Push busybox plus a layer of the program and its libraries; returns the image's
    reference ("127.0.0.1:PORT/REPO:TAG") and the libraries' paths in it."""
    userland = cuda_userland(program)
    config = {"Env": [PATH_ENV], "Cmd": [PROGRAM]}
    push_image(registry, repo, tag, [busybox_layer_tar(), layer_tar(userland)], config)
    libraries = [file.path for file in userland.files if file.path != PROGRAM_PATH]
    return f"{registry.host}/{repo}:{tag}", libraries
