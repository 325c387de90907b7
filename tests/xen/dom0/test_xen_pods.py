"""Issue 7 end to end, inside the testbed's Dom0: pods are Xen domUs, their CUDA calls cross grant
pages to gpu-proxy.

Real parts only (tests/xen/dom0/xen_stack.py): vgpu-runtime on the xen backend, gpu-proxy (sim
backend) serving Xen zones, a real registry holding devkit's hello-vgpu. The CUDA program runs
in a container in the domU; libvgpu reaches gpu-proxy through the zone agent's broker over a
GrantLink. Sizes are small: under emulation the channel moves about a MiB a second.
"""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri_runtime.cri.gen import api_pb2
from tests.xen.dom0.xen_stack import (
    CHECKSUM,
    Stack,
    gntdev_mappings,
    log_lines,
    proxy_zones,
    remove_pod,
    run_pod,
    start,
    vgpu_domains,
    wait_exit,
    wait_until,
    xen_stack,
)

# Zones boot in tens of seconds under emulation; a pod test boots up to two.
pytestmark = [pytest.mark.dom0, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def stack(payload_disk: Path) -> Iterator[Stack]:
    with xen_stack(payload_disk) as stack:
        yield stack


def test_a_gpu_pod_is_a_domu_whose_cuda_calls_cross_grant_pages(stack: Stack) -> None:
    assert stack.proxy.proc is not None
    mappings_before = gntdev_mappings(stack.proxy.proc.pid)
    t0 = time.monotonic()
    pod = run_pod(stack, "one", "64Mi")
    booted_s = time.monotonic() - t0
    domains = vgpu_domains()
    assert f"vgpu-{pod.id}" in domains, (domains, stack.diagnostics())
    domid = domains[f"vgpu-{pod.id}"]

    t1 = time.monotonic()
    code = wait_exit(stack, start(stack, pod, "cuda", ["hello-vgpu", "2"]))
    lines = log_lines(pod, "cuda")
    print(f"RunPodSandbox {booted_s:.1f} s, create+start+run {time.monotonic() - t1:.1f} s")
    assert code == 0, (lines, stack.diagnostics())
    assert any("(vgpu sim)" in line and "64 MiB (the zone's quota)" in line for line in lines)
    assert any((m := CHECKSUM.search(line)) and m.group(1) == "2" for line in lines), lines
    assert any(line.startswith("pinned: 2 MiB") and "verified" in line for line in lines), lines
    # gpu-proxy served the program over the zone's grant channel, as zone dom<domid>, and mapped
    # its two cudaMallocHost buffers from the pages the domU granted it.
    attached = stack.proxy.logged("xen channel attached")
    assert attached is not None and attached["zone"] == f"dom{domid}", stack.diagnostics()
    with urllib.request.urlopen(stack.proxy.metrics_url, timeout=30) as response:
        metrics = response.read().decode()
    labels = f'api="vgpuHostShareGrants",result="CUDA_SUCCESS",zone="dom{domid}"'
    shared = f"vgpu_calls_total{{{labels}}}"
    assert f"{shared} 2.0" in metrics, [m for m in metrics.splitlines() if "HostShare" in m]

    remove_pod(stack, pod)
    assert f"vgpu-{pod.id}" not in vgpu_domains()
    wait_until(lambda: f"dom{domid}" not in proxy_zones(stack), 60, "gpu-proxy drops the zone")
    assert gntdev_mappings(stack.proxy.proc.pid) == mappings_before
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert pod.id not in loops, loops


def test_two_zones_keep_their_quotas_and_one_destroyed_mid_call_spares_the_other(
    stack: Stack,
) -> None:
    small, big = run_pod(stack, "small", "4Mi"), run_pod(stack, "big", "64Mi")
    try:
        big_domid = vgpu_domains()[f"vgpu-{big.id}"]
        # 2 x 3 MiB does not fit a 4 MiB quota: the second cudaMalloc fails, in zone "small" only.
        starved = start(stack, small, "starved", ["hello-vgpu", "3"])
        victim = start(stack, big, "victim", ["hello-vgpu", "48"])  # minutes of copies
        assert wait_exit(stack, starved) == 1, (log_lines(small, "starved"), stack.diagnostics())
        lines = log_lines(small, "starved")
        assert any("4 MiB (the zone's quota)" in line for line in lines), lines
        assert any("cudaErrorMemoryAllocation" in line for line in lines), lines

        wait_until(lambda: f"dom{big_domid}" in proxy_zones(stack), 300, "big's program connects")
        time.sleep(5)  # inside its copies now
        subprocess.run(["xl", "destroy", f"vgpu-{big.id}"], check=True, timeout=120)
        wait_until(lambda: f"dom{big_domid}" not in proxy_zones(stack), 60, "big reclaimed")
        assert stack.cri.status(victim).state == api_pb2.CONTAINER_EXITED
        # The other zone keeps working: a new program in it runs to the end.
        again = start(stack, small, "again", ["hello-vgpu", "1"])
        assert wait_exit(stack, again) == 0, (log_lines(small, "again"), stack.diagnostics())
    finally:
        remove_pod(stack, small)
        remove_pod(stack, big)
    assert not vgpu_domains(), stack.diagnostics()


def test_a_runtime_killed_mid_pod_finds_it_again(stack: Stack) -> None:
    pod = run_pod(stack, "survivor", None)
    container = start(stack, pod, "sleep", ["sleep", "3600"])
    wait_until(
        lambda: stack.cri.status(container).state == api_pb2.CONTAINER_RUNNING, 120, "running"
    )
    stack.runtime.restart(signal.SIGKILL)
    status = stack.cri.status(container)
    assert status.state == api_pb2.CONTAINER_RUNNING, (status, stack.diagnostics())
    # The new runtime talks to the same agent (reattached over a fresh control channel).
    reply = stack.cri.runtime.ExecSync(
        api_pb2.ExecSyncRequest(container_id=container, cmd=["echo", "still here"], timeout=60),
        timeout=120,
    )
    assert (reply.exit_code, reply.stdout) == (0, b"still here\n"), stack.diagnostics()
    stack.cri.stop_pod(pod.id)
    assert stack.cri.status(container).state == api_pb2.CONTAINER_EXITED
    stack.cri.remove_pod(pod.id)
    assert f"vgpu-{pod.id}" not in vgpu_domains()
