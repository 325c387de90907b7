"""The stack the Xen pod tests and the zone benchmark run in Dom0: Debian's docker-registry on
loopback holding the pod image the host built (tests/xen/pod_image.py), gpu-proxy (sim backend,
serving Xen zones through its xenstore watch) and vgpu-runtime (zone_backend = "xen") on its CRI
socket, with zones booted from the zone initramfs, the shared root disk and the payload disk.
Plus the few CRI steps both use, polling gently: an emulated Dom0 has no CPU to spare.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cri_runtime.client import CriClient, container_config, pod_config
from cri_runtime.cri.gen import api_pb2
from devkit.daemons import GpuProxyDaemon, RuntimeDaemon, log_tail
from devkit.demo import read_cri_log
from devkit.registry import LocalRegistry
from tests.xen import pod_image
from tests.xen.dom0.zone_image import zone_boot

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


@contextlib.contextmanager
def xen_stack(payload_disk: Path) -> Iterator[Stack]:
    """Registry with the pod image, gpu-proxy serving Xen zones, vgpu-runtime on the xen backend;
    all stopped on exit."""
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
