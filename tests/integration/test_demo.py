"""The README's demo (``python -m devkit.demo``) as a person runs it: a GPU pod's CUDA program
(nvcc, static cudart) runs through libvgpu and gpu-proxy, which counts its calls, copies and
launch, shows the zone with its quota and releases it when the pod goes, and every daemon stops
cleanly; with --keep everything stays up until Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_runtime.client import CriClient
from cri_runtime.cri.gen import api_pb2
from devkit.daemons import ROOT
from devkit.demo import problems_before_start, processes_using

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("runc") or shutil.which("crun")),
    reason="needs root and an OCI runtime",
)
DEMO = [sys.executable, "-m", "devkit.demo"]
MiB = 1 << 20
# The container's output: its shell, then the CUDA program (devkit/cuda/hello_vgpu.cu).
CONTAINER_LINES = [
    r"hello from demo, in a vgpu-isolated zone, as pid 1",
    r"cudart -> libcuda\.so\.1 \(libvgpu\) -> gpu-proxy at /run/vgpu/proxy\.sock",
    r"device: (?P<name>.+), \d+ SMs, compute \d+\.\d, 256 MiB \(the zone's quota\)",
    r"memory: 64 MiB host -> device -> device -> host, checksum [0-9a-f]{16} verified",
    r"pinned: 64 MiB cudaMallocHost -> device -> cudaMallocHost, async on a stream, checksum "
    r"[0-9a-f]{16} verified",
    r"kernel: mix<<<65536, 256>>> launched, cudaDeviceSynchronize succeeded",
]
SIM_KERNEL = (
    "kernel: not run: the sim backend validated and recorded the launch, so there is no result "
    "to check"
)
GPU_KERNEL = "kernel: ran on the GPU, all 16777216 results verified"


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A short path, as zone sockets under it must fit a unix socket path."""
    path = Path(tempfile.mkdtemp(prefix="vd", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def lines_of(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines()]


def assert_released_and_stopped(output: str) -> None:
    lines = lines_of(output)
    assert "exited: exit code 0 (Completed)" in lines
    assert "gpu-proxy released the zone: not in ZoneControl List or /metrics, socket removed" in (
        lines
    )
    assert "vgpu_proxy_zone_teardowns_total 1.0" in lines
    for daemon in ("vgpu-runtime", "gpu-proxy"):
        assert f"stopped {daemon} (exit status 0)" in lines


def test_demo_runs_a_gpu_pod_and_releases_its_zone(work_dir: Path) -> None:
    demo = subprocess.run(
        [*DEMO, "--work-dir", str(work_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    lines = lines_of(demo.stdout)
    start = lines.index(CONTAINER_LINES[0])
    output = lines[start : start + len(CONTAINER_LINES) + 1]
    for pattern, line in zip(CONTAINER_LINES, output[:-1], strict=True):
        assert re.fullmatch(pattern, line), (pattern, output)
    device = re.fullmatch(CONTAINER_LINES[2], output[2])
    assert device is not None
    assert output[-1] == (SIM_KERNEL if device["name"].endswith("(vgpu sim)") else GPU_KERNEL)
    assert "quota   256 MiB, 0 MiB used" in lines
    # gpu-proxy counted the program's work: its launch, copies and allocations.
    assert "vgpu_kernel_launches_total 1" in lines
    assert 'vgpu_calls_total{api="cuLaunchKernel",result="CUDA_SUCCESS"} 1' in lines
    copied = dict(
        re.findall(r'^  vgpu_memcpy_bytes_total\{direction="(\w+)"\} (\d+)', demo.stdout, re.M)
    )
    assert copied.keys() == {"htod", "dtod", "dtoh"}
    assert all(int(size) >= 64 * MiB for size in copied.values()), copied
    assert "vgpu_memory_allocations_total 2" in lines and "vgpu_memory_frees_total 2" in lines
    assert "vgpu_device_memory_limit_bytes 268435456 (256 MiB)" in lines
    for call in ("PullImage", "RunPodSandbox", "CreateContainer", "StartContainer"):
        assert re.search(rf"^  {call} +\d+ ms", demo.stdout, re.M), call
    assert_released_and_stopped(demo.stdout)
    assert [zone for zone in (work_dir / "zones").iterdir() if zone.is_dir()] == []
    assert processes_using(work_dir) == []


def test_keep_leaves_everything_running_until_ctrl_c(work_dir: Path) -> None:
    demo = subprocess.Popen(
        [*DEMO, "--work-dir", str(work_dir), "--keep"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert demo.stdout is not None
    try:
        seen = []
        for line in demo.stdout:
            seen.append(line)
            if "Ctrl-C removes the pod" in line:
                break
        output = "".join(seen)
        assert "Ctrl-C removes the pod" in output, output
        [metrics_url] = set(re.findall(r"http://127\.0\.0\.1:\d+/metrics", output))
        with urllib.request.urlopen(metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        assert "\nvgpu_zones 1.0\n" in metrics
        client = CriClient(work_dir / "cri.sock")
        try:
            [pod] = client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
        finally:
            client.close()
        assert pod.state == api_pb2.SANDBOX_READY and f'zone="{pod.id}"' in metrics
        demo.send_signal(signal.SIGINT)
        output += demo.stdout.read()
        assert demo.wait(timeout=60) == 0, output
    finally:
        if demo.poll() is None:
            demo.terminate()  # the demo tears down what it started
            demo.wait(timeout=60)
    assert_released_and_stopped(output)
    assert processes_using(work_dir) == []


def test_a_work_dir_too_long_for_zone_sockets_is_refused_up_front() -> None:
    too_long = Path("/tmp") / ("d" * 40)
    demo = subprocess.run(
        [*DEMO, "--work-dir", str(too_long)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert demo.returncode == 2
    assert "too long" in demo.stderr and "unix socket path" in demo.stderr
    assert not too_long.exists()


def test_missing_nvcc_or_libvgpu_is_refused_up_front(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("devkit.demo.NVCC", tmp_path / "nvcc")
    monkeypatch.setattr("devkit.demo.LIBVGPU", tmp_path / "libvgpu.so")
    problems = problems_before_start(Path("/tmp/vd"))
    assert f"{tmp_path}/nvcc not found" in problems[0]
    assert f"{tmp_path}/libvgpu.so not found" in problems[1] and "libvgpu.build" in problems[1]
