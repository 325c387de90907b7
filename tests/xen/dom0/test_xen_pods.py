"""Issue 7 end to end, inside the testbed's Dom0: pods are Xen domUs, their CUDA calls cross grant
pages to gpu-proxy.

Real parts only: vgpu-runtime (zone_backend = "xen") on its CRI socket, gpu-proxy (sim backend,
serving Xen zones through its xenstore watch), Debian's docker-registry on loopback holding the
pod image the host built (tests/xen/pod_image.py: devkit's hello-vgpu, cudart static), zones
booted from the zone initramfs + the shared root disk + the payload disk. The CUDA program runs
in a container in the domU; libvgpu reaches gpu-proxy through the zone agent's broker over a
GrantLink. Sizes are small: under emulation the channel moves about a MiB a second.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cri_runtime.client import CriClient, container_config, pod_config
from cri_runtime.cri.gen import api_pb2
from devkit.daemons import GpuProxyDaemon, RuntimeDaemon, log_tail
from devkit.demo import read_cri_log
from devkit.registry import LocalRegistry
from tests.xen import pod_image
from tests.xen.dom0.zone_image import zone_boot

# Zones boot in tens of seconds under emulation; a pod test boots up to two.
pytestmark = [pytest.mark.dom0, pytest.mark.timeout(1500)]

GPU_HANDLER = "vgpu-isolated"
GPU_MEMORY = "vgpu-isolated.io/gpu-memory"
BOOT_TIMEOUT = "vgpu-isolated.io/zone-boot-timeout"
ZONE_LIBVGPU = "/opt/vgpu-zone/libvgpu/build/libvgpu.so"
ZONE_MEMORY = 320 << 20  # two zones and Dom0 fit in the testbed's 2 GiB
EXIT_TIMEOUT_S = 600.0
CHECKSUM = re.compile(r"memory: (\d+) MiB host -> device -> device -> host, checksum \w+ verified")


@dataclass
class Stack:
    base: Path
    registry: LocalRegistry
    proxy: GpuProxyDaemon
    runtime: RuntimeDaemon
    image: str

    @property
    def cri(self) -> CriClient:
        return self.runtime.client

    def diagnostics(self) -> str:
        return (
            f"\n--- vgpu-runtime log:\n{log_tail(self.runtime.log_path, 40)}"
            f"\n--- gpu-proxy log:\n{log_tail(self.proxy.log_path, 20)}"
            f"\n--- guest consoles:\n{guest_consoles()}"
        )


def guest_consoles() -> str:
    logs = sorted(Path("/var/log/xen/console").glob("guest-vgpu-*.log"))
    return "\n".join(f"{p.name}:\n{log_tail(p, 15)}" for p in logs[-3:])


def vgpu_domains() -> dict[str, int]:
    """Name -> domid of every vgpu-* domain, from xl (the toolstack, never a guest)."""
    out = subprocess.run(["xl", "list"], capture_output=True, text=True, check=True).stdout
    domains = {}
    for line in out.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].startswith("vgpu-"):
            domains[fields[0]] = int(fields[1])
    return domains


def gntdev_mappings(pid: int) -> int:
    """Grant mappings a process holds (gpu-proxy maps each zone channel's pages through gntdev)."""
    return sum(
        "/dev/xen/gntdev" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
    )


def loopback_up() -> None:
    """The testbed's Dom0 init brings up no network: the registry and gRPC need ``lo``."""
    subprocess.run(["busybox", "ip", "link", "set", "lo", "up"], check=True, timeout=30)


@pytest.fixture(scope="module")
def stack(payload_disk: Path) -> Iterator[Stack]:
    boot = zone_boot()
    loopback_up()
    base = Path(tempfile.mkdtemp(prefix="xp-", dir="/tmp"))
    registry = LocalRegistry(base / "registry").start()
    image = pod_image.push(registry, "test/hello-vgpu", "1")
    proxy = GpuProxyDaemon(base / "gp", backend="sim", extra=("--xen-zones", "on"))
    proxy.start()
    config = base / "runtime.toml"
    config.write_text(
        'zone_backend = "xen"\n'
        "zone_boot_timeout_s = 300\n"
        "[xen]\n"
        f'kernel = "{boot.kernel}"\n'
        f'ramdisk = "{boot.ramdisk}"\n'
        f'root_disk = "{boot.root_disk}"\n'
        f'system_disk = "{payload_disk}"\n'
        f'libvgpu = "{ZONE_LIBVGPU}"\n'
        "shutdown_grace_s = 5\n"
    )
    runtime = RuntimeDaemon(
        base / "rt", proxy.control_address, extra=("--config", str(config), "--zone-backend", "xen")
    )
    runtime.start()
    stack = Stack(base, registry, proxy, runtime, image)
    try:
        stack.cri.pull(image)
        yield stack
    finally:
        runtime.stop()
        proxy.stop()
        registry.stop()


@dataclass
class Pod:
    id: str
    name: str
    config: api_pb2.PodSandboxConfig


def run_pod(stack: Stack, name: str, quota: str | None) -> Pod:
    """A pod with a zone small enough for two to run at once; a GPU pod when ``quota`` is set."""
    annotations = {BOOT_TIMEOUT: "300s", **({GPU_MEMORY: quota} if quota else {})}
    config = pod_config(name, log_directory=stack.base / "logs" / name, annotations=annotations)
    config.linux.resources.CopyFrom(
        api_pb2.LinuxContainerResources(memory_limit_in_bytes=ZONE_MEMORY)
    )
    return Pod(stack.cri.run_pod(config, GPU_HANDLER), name, config)


def remove_pod(stack: Stack, pod: Pod) -> None:
    stack.cri.stop_pod(pod.id)
    stack.cri.remove_pod(pod.id)


def start(stack: Stack, pod: Pod, name: str, command: list[str]) -> str:
    config = container_config(name, stack.image, command, log_path=f"{name}.log")
    container = stack.cri.create(pod.id, config, pod.config)
    stack.cri.start(container)
    return container


def wait_exit(stack: Stack, container: str, timeout_s: float = EXIT_TIMEOUT_S) -> int:
    """The exit code, polling once a second (an emulated Dom0 has no CPU to spare)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = stack.cri.status(container)
        if status.state == api_pb2.CONTAINER_EXITED:
            return int(status.exit_code)
        time.sleep(1)
    raise AssertionError(f"container {container} still running after {timeout_s} s")


def log_lines(pod: Pod, name: str) -> list[str]:
    path = Path(pod.config.log_directory) / f"{name}.log"
    return [line for _, line in read_cri_log(path)] if path.exists() else []


def proxy_zones(stack: Stack) -> set[str]:
    return {zone.identity.zone for zone in stack.proxy.zones()}


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.5)


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
    # gpu-proxy served the program over the zone's grant channel, as zone dom<domid>.
    attached = stack.proxy.logged("xen channel attached")
    assert attached is not None and attached["zone"] == f"dom{domid}", stack.diagnostics()

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
    remove_pod(stack, pod)
    assert stack.cri.status(container).state == api_pb2.CONTAINER_EXITED
    assert f"vgpu-{pod.id}" not in vgpu_domains()
