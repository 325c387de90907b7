"""Restarts: a runtime stopped or killed (-9) at any point comes back with every List/Status
answer unchanged, still manages running containers, and leaks no zone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cri_runtime.client import CriClient, container_config, pod_config
from cri_runtime.cri.gen import api_pb2
from devkit.daemons import RuntimeDaemon
from tests.conformance.conftest import short_dir


@pytest.fixture
def runtime(gpu_proxy: str, busybox_ref: str) -> Iterator[RuntimeDaemon]:
    base = short_dir("vrr")
    daemon = RuntimeDaemon(base, gpu_proxy_control=gpu_proxy)
    daemon.start()
    daemon.client.pull(busybox_ref)
    try:
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            client = daemon.client
            for pod in client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items:
                client.remove_pod(pod.id)
            daemon.stop()
        subprocess.run(["umount", "-R", "-q", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def zone_processes(zones_dir: Path) -> list[int]:
    """Host processes of zones under zones_dir (unshare and agents): their working directory is
    their zone's directory (standby agents, in zones_dir/.standby, are no zone's), or, for an
    agent booted cold, their command line names it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        in_zone = cwd == str(zones_dir) or cwd.startswith(f"{zones_dir}/")
        if (in_zone and "/.standby" not in cwd) or f"--zone-dir={zones_dir}".encode() in cmdline:
            found.append(int(entry.name))
    return found


def snapshot(cri: CriClient) -> tuple[list[tuple[str, int]], list[tuple[str, int, int]]]:
    pods = cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
    containers = cri.runtime.ListContainers(api_pb2.ListContainersRequest()).containers
    return (
        sorted((p.id, p.state) for p in pods),
        sorted((c.id, c.state, c.created_at) for c in containers),
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill9"])
def test_restart_keeps_pods_and_running_containers(
    runtime: RuntimeDaemon, busybox_ref: str, sig: int
) -> None:
    cri = runtime.client
    cfg = pod_config("survivor")
    pod = cri.run_pod(cfg)
    running = cri.create(pod, container_config("run", busybox_ref, ["sleep", "300"]), cfg)
    cri.start(running)
    done = cri.create(pod, container_config("done", busybox_ref, ["sh", "-c", "exit 4"]), cfg)
    cri.start(done)
    assert cri.wait_exit(done).exit_code == 4
    before = snapshot(cri)
    runtime.restart(sig)
    cri = runtime.client
    assert snapshot(cri) == before
    assert cri.status(done).exit_code == 4
    reply = cri.runtime.ExecSync(
        api_pb2.ExecSyncRequest(container_id=running, cmd=["echo", "still here"], timeout=10)
    )
    assert reply.stdout == b"still here\n"
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=running, timeout=0))
    assert cri.status(running).state == api_pb2.CONTAINER_EXITED
    cri.remove_pod(pod)
    assert zone_processes(runtime.zones_dir) == []


def test_kill9_during_run_pod_sandbox_loses_and_leaks_nothing(runtime: RuntimeDaemon) -> None:
    cri = runtime.client
    records = runtime.state_dir / "sandboxes"
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(cri.run_pod(pod_config("interrupted")))
        except grpc.RpcError as exc:
            outcome.append(exc.code())

    caller = threading.Thread(target=run)
    caller.start()
    deadline = time.monotonic() + 30
    while not any(records.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert runtime.proc is not None
    runtime.proc.kill()  # while the zone boots: the record says CREATING
    runtime.proc.wait()
    caller.join(timeout=30)
    assert outcome, "RunPodSandbox neither returned nor failed"
    runtime.start()
    pods = runtime.client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
    if isinstance(outcome[0], str):  # the kill came after the reply: the pod must be there
        assert [(p.id, p.state) for p in pods] == [(outcome[0], api_pb2.SANDBOX_READY)]
    else:  # kubelet saw a failure: no trace may remain
        assert outcome[0] == grpc.StatusCode.UNAVAILABLE, outcome
        assert pods == []
        assert list(records.glob("*.json")) == []
        assert zone_processes(runtime.zones_dir) == []
        assert [z for z in runtime.zones_dir.iterdir() if not z.name.startswith(".")] == []


def test_zone_that_dies_is_reported_and_orphans_are_stopped(
    runtime: RuntimeDaemon, busybox_ref: str
) -> None:
    cri = runtime.client
    cfg = pod_config("victim")
    pod = cri.run_pod(cfg)
    cid = cri.create(pod, container_config("c", busybox_ref, ["sleep", "300"]), cfg)
    cri.start(cid)
    for pid in zone_processes(runtime.zones_dir / pod):
        os.kill(pid, signal.SIGKILL)
    status = cri.status(cid)
    assert status.state == api_pb2.CONTAINER_EXITED and "zone" in status.message
    sandbox = cri.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod))
    assert sandbox.status.state == api_pb2.SANDBOX_NOTREADY
    cri.remove_pod(pod)

    orphan = cri.run_pod(pod_config("orphan"))
    runtime.stop()
    (runtime.state_dir / "sandboxes" / f"{orphan}.json").unlink()  # the runtime forgot it
    runtime.start()
    assert zone_processes(runtime.zones_dir) == []
    listed = runtime.client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
    assert orphan not in [p.id for p in listed]
