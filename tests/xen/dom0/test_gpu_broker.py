"""A CUDA process reaches gpu-proxy over a real GrantLink handed to it by the zone agent's broker.

Inside the testbed's Dom0 on real Xen (marker dom0), Dom0 plays both sides, as the GrantLink
loopback test does: the broker offers to Dom0 itself (real gntalloc, evtchn, xenstored), the
host side attaches each offer (real gntdev) and serves it with gpu-proxy's registry and channel
server on the sim backend (gpu-proxy's XenZoneWatcher leaves Dom0's own offers alone, so the
test attaches them). The process is a C driver-API program built on the host with libvgpu as
its libcuda.so.1 (tests/xen/dom0_programs.py), run with VGPU_LINK=grant.
"""

import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cri_runtime.agent.gpu_broker import GrantChannelBroker
from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.registry import ZoneRegistry
from gpu_proxy.telemetry.zone_stats import ZoneIdentity
from gpu_proxy.zone import Zone
from idm.links.grant import GrantLink, host_path, zone_path
from idm.xen.xenstore import Xenstore
from tests.xen.dom0_programs import PROGRAMS_OUT, ROUND_TRIP_1MIB

pytestmark = pytest.mark.dom0

ZONE = "dom0-loopback"
LIMIT = 256 << 20
# gntalloc's limit on granted pages while the pinned-memory test runs: every buffer of
# tests/libvgpu/c/pinned.c fits but the second of its two 64 MiB buffers (16385 pages each).
GNTALLOC_LIMIT = Path("/sys/module/xen_gntalloc/parameters/limit")
GRANT_PAGES = 20_000
# Under emulation a process start, cuInit and the hello take seconds; leave ample room.
RUN_TIMEOUT_S = 300


def wait_for(what: str, probe: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def program(name: str) -> str:
    path = PROGRAMS_OUT / name
    assert path.is_file(), (
        f"{path} missing: build it on the host (python -m tests.xen.dom0_programs)"
    )
    return str(path)


class Host:
    """gpu-proxy's part: attach every offer of the given names and serve it in one zone."""

    def __init__(self, xs: Xenstore, registry: ZoneRegistry, names: list[str]) -> None:
        self.xs = xs
        self.registry = registry
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(names,))
        self._thread.start()

    def _run(self, names: list[str]) -> None:
        try:
            own = self.xs.own_domid()
            for name in names:
                wait_for(f"the offer of {name}", self._offered(f"{zone_path(own, name)}/state"))
                link = GrantLink.attach(own, name, self.xs, host_domid=own)
                self.registry.serve_channel(
                    ZONE, link.open_channel(), on_close=link.close, grant_domid=own
                )
        except BaseException as exc:  # reported by join()
            self.errors.append(exc)

    def _offered(self, state: str) -> Callable[[], bool]:
        return lambda: self.xs.read(state) == "offered"

    def join(self) -> None:
        self._thread.join(RUN_TIMEOUT_S)
        assert not self._thread.is_alive() and not self.errors, self.errors


@pytest.fixture
def xs() -> Iterator[Xenstore]:
    with Xenstore.connect() as client:
        yield client


@pytest.fixture
def registry() -> Iterator[ZoneRegistry]:
    registry = ZoneRegistry(SimBackend(), Path(tempfile.mkdtemp(prefix="proxy-", dir="/tmp")))
    registry.add(ZoneIdentity(zone=ZONE, domid=0, gpu_index=0), LIMIT)
    yield registry
    registry.close()


@pytest.fixture
def broker(xs: Xenstore) -> Iterator[GrantChannelBroker]:
    socket_dir = Path(tempfile.mkdtemp(prefix="broker-", dir="/tmp"))
    broker = GrantChannelBroker(socket_dir / "proxy.sock", xs, connect_timeout_s=120)
    broker.start()
    yield broker
    broker.close()
    assert not broker.is_alive()


def zone_of(registry: ZoneRegistry) -> Zone:
    [zone] = list(registry.zones())
    return zone


def run_env(broker: GrantChannelBroker) -> dict[str, str]:
    return {"VGPU_LINK": "grant", "VGPU_PROXY_SOCKET": str(broker.socket_path)}


def run_served(
    xs: Xenstore, registry: ZoneRegistry, broker: GrantChannelBroker, name: str
) -> subprocess.CompletedProcess[str]:
    """Run program ``name`` through the broker while gpu-proxy's part serves its channel; it
    must succeed."""
    host = Host(xs, registry, ["gpu-0"])
    proc = subprocess.run(
        [program(name)],
        env=run_env(broker),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    host.join()
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_a_cuda_program_round_trips_over_the_brokers_grant_link(
    xs: Xenstore, registry: ZoneRegistry, broker: GrantChannelBroker
) -> None:
    own = xs.own_domid()
    proc = run_served(xs, registry, broker, "round_trip")
    assert proc.stdout.splitlines() == [f"checksum={ROUND_TRIP_1MIB}", "ok"]
    # The process has exited: the broker withdrew the offer, gpu-proxy closed its side.
    wait_for("the offer to be withdrawn", lambda: xs.read(zone_path(own, "gpu-0")) is None)
    wait_for("gpu-proxy to close", lambda: xs.read(host_path(own, own, "gpu-0")) is None)
    wait_for("the broker to forget it", lambda: broker.channels() == [])
    assert zone_of(registry).memory() == (0, LIMIT)  # freed by the program, nothing held


def gntdev_mappings() -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if "gntdev" in line]


def test_pinned_memory_is_granted_to_gpu_proxy_and_copies_carry_no_data(
    xs: Xenstore, registry: ZoneRegistry, broker: GrantChannelBroker
) -> None:
    """cuMemAllocHost buffers are pages granted to gpu-proxy's domain (real gntalloc), mapped
    by gpu-proxy (real gntdev): copies name (arena, offset, length). A buffer gntalloc cannot
    grant (its limit, lowered here) is copied through the channel instead, said once on stderr;
    every checksum holds either way, and everything is unmapped when the process is done."""
    own = xs.own_domid()
    before = GNTALLOC_LIMIT.read_text()
    GNTALLOC_LIMIT.write_text(str(GRANT_PAGES))
    try:
        proc = run_served(xs, registry, broker, "pinned")
    finally:
        GNTALLOC_LIMIT.write_text(before)
    sizes = [int(m) for m in re.findall(r"^pinned (\d+) ", proc.stdout, re.M)]
    assert sizes == [1, 4096, 65537, (4 << 20) + 5, (64 << 20) + 1]
    [line] = proc.stderr.splitlines()
    assert re.fullmatch(
        r"libvgpu: granting 16385 pages of pinned memory to gpu-proxy failed .*", line
    )
    calls = zone_of(registry).stats.snapshot().calls
    counted = {api: sum(n for (a, _), n in calls.items() if a == api) for api, _ in calls}
    # 13 buffers, as over a LocalLink (tests/libvgpu/test_pinned.py), less the one refused.
    assert counted["vgpuHostShareGrants"] == counted["vgpuHostUnshare"] == 12
    assert "vgpuHostShare" not in counted
    assert counted["vgpuMemcpyHtoDSharedAsync"] >= 5 and counted["vgpuMemcpyDtoHSharedAsync"] >= 5
    wait_for("gpu-proxy to close", lambda: xs.read(host_path(own, own, "gpu-0")) is None)
    wait_for("gpu-proxy to unmap every granted page", lambda: gntdev_mappings() == [])
    assert zone_of(registry).memory() == (0, LIMIT)


def test_the_process_loses_its_gpu_when_gpu_proxys_side_goes(
    xs: Xenstore, registry: ZoneRegistry, broker: GrantChannelBroker
) -> None:
    host = Host(xs, registry, ["gpu-0"])
    proc = subprocess.Popen(
        [program("init_only"), "wait"],
        env=run_env(broker),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        host.join()
        assert zone_of(registry).memory() == (4096, LIMIT)
        registry.remove(ZONE)  # gpu-proxy tears the zone down: its channel closes
        wait_for("the broker to hang up", lambda: broker.channels() == [])
        stdout, stderr = proc.communicate("go\n", timeout=RUN_TIMEOUT_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr
    assert stdout.splitlines() == [
        "alloc=CUDA_ERROR_DEVICE_UNAVAILABLE",
        "alloc=CUDA_ERROR_DEVICE_UNAVAILABLE",
        "sync=CUDA_ERROR_DEVICE_UNAVAILABLE",
    ]
    [line] = stderr.splitlines()
    assert re.fullmatch(
        r"libvgpu: lost the channel to gpu-proxy while (sending a request|waiting for a reply): "
        r"gpu-proxy (went away \(its socket hung up\)|closed the channel)",
        line,
    ), line
    own = xs.own_domid()
    assert xs.read(zone_path(own, "gpu-0")) is None
