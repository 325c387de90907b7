"""Zones boot the real agent from the zone initramfs, on real Xen, inside the testbed's Dom0.

Two PV zones boot at once from the same read-only root disk (/dev/vdb, the pristine Dom0 image)
and one payload disk image (each through a read-only loop device of its own). Their consoles
must show every VGPU-ZONE-STAGE line up to ``agent-exec`` (``python-ok`` means python3 ran from
the zone's root with the payload's C extensions), and both zones' blkback must hold the root disk
at the same time. The disks' hotplug script is ours (block-ro): Xen's generic "block" script
overran libxl's 10 s hotplug timeout in the emulated Dom0. The second zone also gets a disk
through ``xl block-attach`` while paused and loses it through ``xl block-detach`` while running
(zones/xen_disks.py's helpers).
The payload loop devices, released as soon as blkback holds them (before the zones even run),
must stay usable and be gone after ``xl destroy``.

Stage timings (``xl create``, guest uptime at each stage, seconds from unpause until Dom0 saw
each line) go to $TESTBED_SHARE/zone-boot-timings.json for the bench to collect.

What the agent does after ``agent-exec`` is the agent's own business (its tests give it a zone
identity in xenstore; here it has none): domains are kept on power-off and crash
(``preserve``) so that both stay attached to their disks until the end.
"""

import itertools
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cri_runtime.zones.xen_disks import (
    BLOCK_RO_SCRIPT,
    attach_loop,
    backend_holds,
    block_attach,
    block_detach,
    disk_spec,
    loop_backing_file,
    release_loop,
    release_loop_when_held,
)
from cri_runtime.zones.xl import Xl
from idm.xen.xenstore import Xenstore
from kernel_builder.zone_initramfs import FAIL_PREFIX, STAGE_PREFIX, STAGES
from tests.xen.dom0.zone_image import SHARE, ZoneBoot, zone_boot

pytestmark = pytest.mark.dom0

CONSOLE_LOGS = Path("/var/log/xen/console")
TIMINGS = SHARE / "zone-boot-timings.json"
ZONE_MEMORY_MIB = 384
# Under emulation a PV guest's init runs ~10 s after `xl create`, python3 is ~11x slower.
BOOT_TIMEOUT_S = 420
RELEASE_TIMEOUT_S = 60
ROOT_VBD = 51712  # xvda
PAYLOAD_VBD = 51728  # xvdb
EXTRA_VDEV, EXTRA_VBD = "xvdc", 51744
STAGE_LINE = re.compile(rf"^{STAGE_PREFIX} (\S+) ([0-9.]+)$")
_names = itertools.count()


@dataclass
class Zone:
    name: str
    payload_loop: Path
    script: Path | None  # the disks' hotplug script; None: Xen's generic "block"
    domid: int = 0
    create_s: float = 0.0
    unpaused_at: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # guest uptime at each stage line
    seen_s: dict[str, float] = field(default_factory=dict)  # since unpause, as Dom0 saw it
    failures: list[str] = field(default_factory=list)

    def console(self) -> str:
        log = CONSOLE_LOGS / f"guest-{self.name}.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def poll(self) -> None:
        """Record the stage and fail lines the console shows now."""
        for raw in self.console().splitlines():
            line = raw.strip()
            if match := STAGE_LINE.match(line):
                if match[1] not in self.stages:
                    self.stages[match[1]] = float(match[2])
                    self.seen_s[match[1]] = round(time.monotonic() - self.unpaused_at, 2)
            elif line.startswith(FAIL_PREFIX) and line not in self.failures:
                self.failures.append(line)

    def timings(self) -> dict[str, object]:
        return {
            "name": self.name,
            "hotplug_script": str(self.script or "block"),
            "xl_create_paused_s": round(self.create_s, 2),
            "stage_uptime_s": self.stages,
            "stage_seen_after_unpause_s": self.seen_s,
            "failures": self.failures,
        }


def xl(*args: str, timeout: float = 180) -> str:
    proc = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"xl {' '.join(args)} failed: {proc.stderr.strip()}"
    return proc.stdout


def domain_names() -> set[str]:
    return {line.split()[0] for line in xl("list").splitlines()[1:] if line.strip()}


def wait_for_stage(zones: list[Zone], stage: str, timeout_s: float) -> None:
    """Until every zone printed ``stage``; fails at once on a zone's VGPU-ZONE-FAIL before it."""
    deadline = time.monotonic() + timeout_s
    while True:
        for zone in zones:
            zone.poll()
            failed_before = zone.failures and "agent-exec" not in zone.stages
            assert not failed_before, f"{zone.name} failed to boot:\n{zone.console()[-3000:]}"
        if all(stage in zone.stages for zone in zones):
            return
        assert time.monotonic() < deadline, f"no {stage} stage within {timeout_s} s; " + "; ".join(
            f"{z.name}: {z.stages} console {z.console()[-1500:]!r}" for z in zones
        )
        time.sleep(0.25)


def wait_until(what: str, probe: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)


def write_config(zone: Zone, boot: ZoneBoot, directory: Path) -> Path:
    disks = [
        disk_spec(boot.root_disk, "xvda", script=zone.script),
        disk_spec(zone.payload_loop, "xvdb", script=zone.script),
    ]
    config = directory / f"{zone.name}.cfg"
    config.write_text(
        f'name = "{zone.name}"\n'
        'type = "pv"\n'
        f'kernel = "{boot.kernel}"\n'
        f'ramdisk = "{boot.ramdisk}"\n'
        'extra = "console=hvc0 quiet"\n'
        f"memory = {ZONE_MEMORY_MIB}\n"
        "vcpus = 1\n"
        f"disk = [{', '.join(repr(d) for d in disks)}]\n"
        'on_poweroff = "preserve"\n'
        'on_crash = "preserve"\n'
    )
    return config


def backend(xs: Xenstore, zone: Zone, vbd: int, key: str) -> str | None:
    return xs.read(f"/local/domain/0/backend/vbd/{zone.domid}/{vbd}/{key}")


@pytest.fixture
def xs() -> Iterator[Xenstore]:
    with Xenstore.connect() as client:
        yield client


@pytest.mark.timeout(1200)  # two boots to python3 under emulation, on a shared 2-core host
def test_two_zones_boot_the_agent_from_shared_read_only_disks(
    payload_disk: Path, xs: Xenstore, tmp_path: Path
) -> None:
    boot = zone_boot()
    free_mib = int(dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in xl("info").splitlines())
    )["free_memory"])  # fmt: skip
    assert free_mib >= 2 * ZONE_MEMORY_MIB, f"Xen has {free_mib} MiB free, two zones need more"
    run = next(_names)
    zones: list[Zone] = []
    loops: list[Path] = []
    extra_loop: Path | None = None
    try:
        for i in range(2):
            zone = Zone(f"zoneboot-{run}-{i}", attach_loop(payload_disk), BLOCK_RO_SCRIPT)
            zones.append(zone)
            loops.append(zone.payload_loop)
            started = time.monotonic()
            xl("create", "-p", str(write_config(zone, boot, tmp_path)))
            zone.create_s = time.monotonic() - started
            zone.domid = int(xl("domid", zone.name))
            # blkback opens a paused zone's disks already: its loop device can go to the
            # kernel now, to be freed with the zone.
            release_loop_when_held(zone.payload_loop, zone.domid, "xvdb")
            assert backend_holds(zone.domid, "xvda")

        # xl block-attach on a paused zone: the disk is there when its blkfront starts.
        extra_loop = attach_loop(payload_disk)
        loops.append(extra_loop)
        block_attach(Xl(), zones[1].name, extra_loop, EXTRA_VDEV, script=BLOCK_RO_SCRIPT)
        assert str(EXTRA_VBD) in xl("block-list", zones[1].name)
        wait_until(
            "blkback to hold the attached disk",
            lambda: backend_holds(zones[1].domid, EXTRA_VDEV),
            30,
        )

        for zone in zones:
            zone.unpaused_at = time.monotonic()
            xl("unpause", zone.name)

        wait_for_stage(zones, "root", BOOT_TIMEOUT_S)
        # Both zones' blkback hold the one root disk, read-only, at the same time.
        for zone in zones:
            assert backend(xs, zone, ROOT_VBD, "params") == str(boot.root_disk)
            assert backend(xs, zone, ROOT_VBD, "mode") == "r"
        wait_until(
            "both zones' root disk connected",
            lambda: all(backend(xs, z, ROOT_VBD, "state") == "4" for z in zones),
            60,
        )

        # xl block-detach on a running zone that never mounted the disk; its loop device is
        # then unused and goes at once.
        wait_until(
            f"{EXTRA_VDEV} connected in {zones[1].name}",
            lambda: backend(xs, zones[1], EXTRA_VBD, "state") == "4",
            60,
        )
        block_detach(Xl(), zones[1].name, EXTRA_VDEV)
        assert str(EXTRA_VBD) not in xl("block-list", zones[1].name)
        assert release_loop(extra_loop) is True
        assert loop_backing_file(extra_loop) is None

        wait_for_stage(zones, "agent-exec", BOOT_TIMEOUT_S)
        for zone in zones:
            expected = list(STAGES)
            assert list(zone.stages)[: len(expected)] == expected, (zone.name, zone.stages)
            uptimes = [zone.stages[s] for s in expected]
            assert uptimes == sorted(uptimes), (zone.name, zone.stages)
            # Released before boot, the payload loop device stayed bound while the zone held it.
            assert backend(xs, zone, PAYLOAD_VBD, "state") == "4"
            assert loop_backing_file(zone.payload_loop) == payload_disk.resolve()
    finally:
        for zone in zones:
            zone.poll()
            if zone.name in domain_names():
                xl("destroy", zone.name)
        for loop in loops:
            release_loop(loop)  # a no-op for those already released
        TIMINGS.write_text(
            json.dumps(
                {
                    "memory_mib": ZONE_MEMORY_MIB,
                    "kernel_version": boot.manifest.kernel_version,
                    "zones": [zone.timings() for zone in zones],
                },
                indent=2,
            )
            + "\n"
        )
        print(TIMINGS.read_text())
    assert not {z.name for z in zones} & domain_names()
    # Destroying the zones closed their disks: the released loop devices are freed.
    wait_until(
        "the zones' loop devices to be freed",
        lambda: all(loop_backing_file(loop) is None for loop in loops),
        RELEASE_TIMEOUT_S,
    )
