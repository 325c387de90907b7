"""The README's demo (``python -m devkit.demo``) as a person runs it: a GPU pod's container
finds its channel, gpu-proxy shows the zone with its quota and releases it when the pod goes,
and every daemon stops cleanly; with --keep everything stays up until Ctrl-C."""

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
from devkit.demo import processes_using

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("runc") or shutil.which("crun")),
    reason="needs root and an OCI runtime",
)
DEMO = [sys.executable, "-m", "devkit.demo"]
CONTAINER_LINES = [
    "hello from demo, in a vgpu-isolated zone",
    "own pid namespace: this shell is pid 1",
    "GPU channel present: /run/vgpu/proxy.sock is a socket",
]


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
    assert lines[start : start + 3] == CONTAINER_LINES
    assert "quota   256 MiB, 0 MiB used" in lines
    [limit] = [line for line in lines if line.startswith("vgpu_device_memory_limit_bytes")]
    assert limit.endswith(" 2.68435456e+08")
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
