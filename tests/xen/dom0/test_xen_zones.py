"""The Xen zone backend on real Xen (inside the testbed's Dom0, marker dom0): xl create -p, the
zone's xenstore home and its permissions, unpause, list, stop/destroy, a boot that fails leaving
nothing, and the runtime's recovery destroying vgpu-* domains no sandbox owns.

The domains boot the testbed's busybox guest (no zone agent in it): what is checked here is
the backend's side of a zone, which needs no agent.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from cri_runtime.agent import xen as zone_keys
from cri_runtime.agent.xen import ZoneAgentSettings
from cri_runtime.config import RuntimeConfig, XenSettings
from cri_runtime.images.store import ImageStore
from cri_runtime.pods import PodManager
from cri_runtime.state import RuntimeState, SandboxRecord, SandboxState
from cri_runtime.zones.base import GpuAccess, ZoneError, ZoneSpec, ZoneState
from cri_runtime.zones.xen import XenZoneBackend, domain_name
from cri_runtime.zones.xl import Xl, parse_list
from idm.xen.xenstore import Xenstore

pytestmark = pytest.mark.dom0

GUEST = Path("/opt/testbed/guest")
ROOT_DISK = Path("/dev/vdb")  # the testbed's second drive: the zones' shared root disk


def guest_settings(**overrides: object) -> XenSettings:
    fields: dict[str, object] = {
        "kernel": GUEST / "vmlinux",
        "ramdisk": GUEST / "guest.cpio.gz",
        "root_disk": ROOT_DISK,
        "extra": "console=hvc0 quiet",
        "min_memory_mib": 128,
        "shutdown_grace_s": 2.0,
        "reconnect_timeout_s": 5.0,
    }
    fields.update(overrides)
    return XenSettings.model_validate(fields)


@pytest.fixture(scope="module", autouse=True)
def blkback() -> None:
    """Zones' disks need Dom0's block backend; nothing loads it on demand in the testbed."""
    subprocess.run(["modprobe", "xen-blkback"], check=True, timeout=60)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[XenZoneBackend]:
    zones = XenZoneBackend(tmp_path / "zones", guest_settings())
    yield zones
    for zone in zones.list():  # whatever a failed test left
        zones.stop(zone.zone_id, grace_s=0)
    zones.close()


@pytest.fixture
def xs() -> Iterator[Xenstore]:
    with Xenstore.connect() as client:
        yield client


def vgpu_domains() -> set[str]:
    return {d.name for d in Xl().list() if d.name.startswith("vgpu-")}


def test_xl_list_output_parses() -> None:
    """The parser's unit tests use this format; real xl must still print it."""
    text = subprocess.run(["xl", "list"], capture_output=True, text=True, check=True).stdout
    print(text)
    domains = parse_list(text)
    assert domains[0].name == "Domain-0" and domains[0].domid == 0


def test_paused_zone_has_a_home_it_may_read_and_not_write(
    backend: XenZoneBackend, xs: Xenstore
) -> None:
    spec = ZoneSpec(
        zone_id="home-test", hostname="h1", memory_mib=128, gpu=GpuAccess(memory_limit=3 << 20)
    )
    record, session = backend._create_paused(spec)
    name = domain_name(spec.zone_id)
    domain = Xl().domain(name)
    assert domain is not None and domain.paused and domain.domid == record.domid
    base = zone_keys.home(record.domid)
    assert xs.read(f"{base}/zone-id") == "home-test"
    assert xs.read(f"{base}/memory-limit") == str(3 << 20)
    assert xs.read(f"{base}/session") == session
    settings = ZoneAgentSettings.model_validate_json(xs.read(f"{base}/agent") or "")
    assert settings.hostname == "h1" and settings.gpu
    # Dom0 owns the home and every key in it; the domain may only read them
    for path in (base, f"{base}/memory-limit", f"{base}/agent", f"{base}/session"):
        assert xs.get_perms(path) == ["n0", f"r{record.domid}"], path
    [zone] = [z for z in backend.list() if z.zone_id == "home-test"]
    assert zone.state == ZoneState.RUNNING and zone.domid == record.domid

    Xl().unpause(name)
    unpaused = Xl().domain(name)
    assert unpaused is not None and not unpaused.paused

    backend.stop("home-test", grace_s=0)
    assert name not in vgpu_domains()
    assert xs.read(f"{base}/zone-id") is None
    assert not backend.zone_dir("home-test").exists()
    assert [z for z in backend.list() if z.zone_id == "home-test"] == []
    backend.stop("home-test", grace_s=0)  # idempotent


def test_a_boot_whose_agent_never_comes_fails_and_leaves_nothing(
    backend: XenZoneBackend,
) -> None:
    spec = ZoneSpec(zone_id="no-agent", memory_mib=128, boot_timeout_s=20)
    started = time.monotonic()
    with pytest.raises(ZoneError, match="did not offer a control channel within 20 s"):
        backend.boot(spec)
    assert time.monotonic() - started < 120
    assert domain_name("no-agent") not in vgpu_domains()
    assert not backend.zone_dir("no-agent").exists()


def test_xl_failure_is_a_zone_error_with_xls_words(tmp_path: Path) -> None:
    zones = XenZoneBackend(tmp_path / "zones", guest_settings(kernel=Path("/nonexistent/vmlinux")))
    try:
        with pytest.raises(ZoneError, match="xl create -p") as caught:
            zones.boot(ZoneSpec(zone_id="bad-kernel", memory_mib=128, boot_timeout_s=20))
        assert "/nonexistent/vmlinux" in str(caught.value)
        assert domain_name("bad-kernel") not in vgpu_domains()
        assert not zones.zone_dir("bad-kernel").exists()
    finally:
        zones.close()


def test_recovery_destroys_vgpu_domains_nobody_tracks(
    backend: XenZoneBackend, tmp_path: Path
) -> None:
    # a zone a killed runtime left: its domain runs, no sandbox record names it
    orphan = ZoneSpec(zone_id="orphan", memory_mib=128)
    backend._create_paused(orphan)
    Xl().unpause(domain_name("orphan"))
    # and a sandbox the runtime tracked whose zone is gone
    state = RuntimeState(tmp_path / "state")
    gone = "d" * 64
    state.sandboxes.put(
        SandboxRecord(
            id=gone, created_at_ns=1, config=b"", name="p", uid="u", namespace="n", attempt=0,
            runtime_handler="", state=SandboxState.READY, zone=ZoneSpec(zone_id=gone),
        )
    )  # fmt: skip
    pods = PodManager(
        RuntimeConfig(state_dir=tmp_path / "state", zone_backend="xen", gpu_proxy_control=""),
        state,
        backend,
        cast(ImageStore, None),
        None,
    )
    pods.recover()
    assert domain_name("orphan") not in vgpu_domains()
    assert not backend.zone_dir("orphan").exists()
    assert pods.sandbox(gone).state == SandboxState.NOTREADY
