"""Fixtures of the CRI conformance suite: gpu-proxy (sim) and vgpu-runtime (process backend) as
real daemons, a CRI client over the real socket, and a busybox image in a real registry."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cri_runtime.client import CriClient
from cri_runtime.cri.gen import api_pb2
from devkit.daemons import GpuProxyDaemon, RuntimeDaemon


def short_dir(prefix: str) -> Path:
    """Unix socket paths must stay under 108 bytes and zone ids are 64 characters, so the
    daemons' directories get short names rather than pytest's long tmp paths."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="session")
def gpu_proxy() -> Iterator[str]:
    proxy = GpuProxyDaemon(short_dir("vgp"))
    try:
        proxy.start()
        yield proxy.control_address
    finally:
        if proxy.proc is not None:
            proxy.stop()
        shutil.rmtree(proxy.base, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(gpu_proxy: str) -> Iterator[RuntimeDaemon]:
    base = short_dir("vrt")
    runtime = RuntimeDaemon(base, gpu_proxy_control=gpu_proxy)
    runtime.start()
    try:
        yield runtime
    finally:
        client = CriClient(runtime.socket)
        try:
            for pod in client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items:
                client.remove_pod(pod.id)
        except grpc.RpcError as exc:
            print(f"clean-up of pods failed: {exc}")
        client.close()
        runtime.stop()
        subprocess.run(["umount", "-R", "-q", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cri(daemon: RuntimeDaemon) -> CriClient:
    return daemon.client


@pytest.fixture(scope="module")
def image(daemon: RuntimeDaemon, busybox_ref: str) -> str:
    """The busybox test image, pulled into this runtime."""
    daemon.client.pull(busybox_ref)
    return busybox_ref
