"""XenZoneWatcher over the Xen stand-ins (xen_fakes.py): a zone's offer is attached and served
in its domain's zone, a refused offer costs nothing else, a vanished domain is torn down."""

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog

from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.registry import ZoneRegistry
from gpu_proxy.xen_zones import XenZoneWatcher, memory_limit_path
from gpu_proxy.zone import Zone
from idm.channel import Channel, RingLayout
from idm.gen.codec import CALLS_BY_NAME
from idm.links import grant
from idm.links.grant import GrantLink, Offer, host_path, offer_values, zone_path
from idm.wire import MAX_PAYLOAD
from idm.xen.xenstore import Xenstore
from tests.unit.conftest import XS_ZONE
from tests.unit.xen_fakes import FakeXen, FakeXenstored

MiB = 1 << 20
DEFAULT_LIMIT = 64 * MiB
LAYOUT = RingLayout(req_order=13, rsp_order=12)


@pytest.fixture
def xen(monkeypatch: pytest.MonkeyPatch) -> FakeXen:
    """The host's half of the devices is patched in for good; ``offer_as`` swaps the zone's."""
    xen = FakeXen()
    _pages, mapped, _evtchn = xen.devices(0)
    monkeypatch.setattr(grant, "MappedGrants", mapped)
    return xen


def offer_as(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, xs: Xenstore, domid: int, name: str = "cuda0"
) -> GrantLink:
    """Offer channel ``name`` as ``domid``. The zone grants and allocates ports, the host maps
    and binds: each side uses only its own half, so the watcher's thread never acts as the
    zone while this one offers."""
    pages, _mapped, zone_evtchn = xen.devices(domid)
    _pages, _mapped, host_evtchn = xen.devices(0)
    evtchn = SimpleNamespace(
        bind_unbound_port=zone_evtchn.bind_unbound_port,
        bind_interdomain=host_evtchn.bind_interdomain,
    )
    monkeypatch.setattr(grant, "GrantedPages", pages)
    monkeypatch.setattr(grant, "EventChannel", evtchn)
    return GrantLink.offer(name, LAYOUT, xs)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ZoneRegistry]:
    registry = ZoneRegistry(SimBackend(), tmp_path / "zones")
    yield registry
    registry.close()


@pytest.fixture
def watcher(registry: ZoneRegistry, host_xs: Xenstore, xen: FakeXen) -> Iterator[XenZoneWatcher]:
    watcher = XenZoneWatcher(registry, host_xs, default_limit=DEFAULT_LIMIT)
    yield watcher
    watcher.stop()
    assert not watcher.is_alive()


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def zones(registry: ZoneRegistry) -> dict[str, Zone]:
    return {zone.id: zone for zone in registry.zones()}


def connect(xs: Xenstore, link: GrantLink, domid: int, name: str = "cuda0") -> Channel:
    """The zone's side once the host has answered: open the channel and say hello."""
    eventually(lambda: xs.read(f"{host_path(0, domid, name)}/state") == "connected", "attach")
    channel = link.open_channel()
    channel.hello_client(MAX_PAYLOAD)
    return channel


def alloc(channel: Channel, size: int) -> int:
    call = CALLS_BY_NAME["cuMemAlloc_v2"]
    channel.send(call.opcode, call.encode_request(size), seq=1)
    answer = channel.recv(timeout_ms=10_000)
    assert answer is not None
    return answer.header.status


def test_an_offer_is_served_in_its_domains_zone(
    monkeypatch: pytest.MonkeyPatch,
    xen: FakeXen,
    host_xs: Xenstore,
    zone_xs: Xenstore,
    registry: ZoneRegistry,
    watcher: XenZoneWatcher,
) -> None:
    # What the toolstack and the runtime write, read-only to the zone.
    for key, value in [("name", "trainer"), ("vgpu/memory-limit", str(16 * MiB))]:
        host_xs.write(f"/local/domain/{XS_ZONE}/{key}", value)
        host_xs.set_perms(f"/local/domain/{XS_ZONE}/{key}", 0, [XS_ZONE])
    link = offer_as(monkeypatch, xen, zone_xs, XS_ZONE)
    channel = connect(zone_xs, link, XS_ZONE)
    assert alloc(channel, 3 * MiB) == 0
    zone = zones(registry)["dom5"]
    assert (zone.identity.domid, zone.identity.pod) == (XS_ZONE, "trainer")
    assert zone.memory() == (3 * MiB, 16 * MiB)
    assert xen.mappings == 1

    # The zone's process exits: the host unmaps and withdraws its answer; the zone stays.
    channel.close()
    link.close()
    eventually(lambda: xen.mappings == 0, "the host to unmap")
    assert host_xs.read(f"{host_path(0, XS_ZONE, 'cuda0')}/state") is None
    assert list(zones(registry)) == ["dom5"]

    # A new process offers the same channel again: served in the same zone.
    link = offer_as(monkeypatch, xen, zone_xs, XS_ZONE)
    channel = connect(zone_xs, link, XS_ZONE)
    assert alloc(channel, MiB) == 0
    assert zone.memory() == (4 * MiB, 16 * MiB)
    channel.close()
    link.close()


def test_a_limit_the_zone_could_write_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
    xen: FakeXen,
    zone_xs: Xenstore,
    registry: ZoneRegistry,
    watcher: XenZoneWatcher,
) -> None:
    # The stand-in's domain home is zone-owned (libxl's is not): the zone writes the key itself.
    zone_xs.write(memory_limit_path(XS_ZONE), str(1 << 40))
    link = offer_as(monkeypatch, xen, zone_xs, XS_ZONE)
    channel = connect(zone_xs, link, XS_ZONE)
    assert zones(registry)["dom5"].memory() == (0, DEFAULT_LIMIT)
    channel.close()
    link.close()


def test_a_refused_offer_is_skipped_and_others_are_served(
    monkeypatch: pytest.MonkeyPatch,
    xen: FakeXen,
    xenstored: FakeXenstored,
    host_xs: Xenstore,
    zone_xs: Xenstore,
    registry: ZoneRegistry,
    watcher: XenZoneWatcher,
) -> None:
    bad = {**offer_values(Offer(8, 1, 2, LAYOUT)), "ring-ref": "0x10"}
    with structlog.testing.capture_logs() as logs:
        for key, value in bad.items():
            zone_xs.write(f"{zone_path(XS_ZONE, 'cuda0')}/{key}", value)
        zone_xs.write(f"/local/domain/{XS_ZONE}/data/unrelated", "1")  # rescans domain 5
        xenstored.add_domain(6)
        with Xenstore.connect(socket_path=xenstored.listen(6)) as other_xs:
            link = offer_as(monkeypatch, xen, other_xs, 6)
            channel = connect(other_xs, link, 6)
            assert alloc(channel, MiB) == 0
            channel.close()
            link.close()
    refused = [entry for entry in logs if entry["event"] == "xen channel offer refused"]
    assert len(refused) == 1  # tried once, not on every later event
    assert refused[0]["domid"] == XS_ZONE
    assert "ring-ref='0x10' is not a decimal number" in refused[0]["reason"]
    assert watcher.is_alive()
    assert list(zones(registry)) == ["dom6"]
    assert zones(registry)["dom6"].memory() == (MiB, DEFAULT_LIMIT)


def test_a_vanished_domain_is_torn_down(
    monkeypatch: pytest.MonkeyPatch,
    xen: FakeXen,
    host_xs: Xenstore,
    zone_xs: Xenstore,
    registry: ZoneRegistry,
    watcher: XenZoneWatcher,
) -> None:
    link = offer_as(monkeypatch, xen, zone_xs, XS_ZONE)
    channel = connect(zone_xs, link, XS_ZONE)
    assert alloc(channel, MiB) == 0
    with structlog.testing.capture_logs() as logs:
        host_xs.remove(f"/local/domain/{XS_ZONE}")  # what the toolstack does on destroy
        eventually(lambda: any(e["event"] == "xen zone gone" for e in logs), "the teardown")
    gone = [entry for entry in logs if entry["event"] == "xen zone gone"]
    assert [entry["reclaimed"] for entry in gone] == [{"device_memory": 1}]
    assert "dom5" not in zones(registry)
    assert xen.mappings == 0
    assert all(dom == XS_ZONE for dom, _port in xen.ports)  # the host's ports are unbound
    assert host_xs.read(f"/local/domain/0/backend/vgpu/{XS_ZONE}") is None
    channel.close()
    link.close()


def test_channels_of_one_zone_come_and_go_independently(
    monkeypatch: pytest.MonkeyPatch,
    xen: FakeXen,
    host_xs: Xenstore,
    zone_xs: Xenstore,
    registry: ZoneRegistry,
    watcher: XenZoneWatcher,
) -> None:
    """What a zone agent's broker does: one channel per process, withdrawn when it exits."""
    links = {
        name: offer_as(monkeypatch, xen, zone_xs, XS_ZONE, name) for name in ("gpu-0", "gpu-1")
    }
    channels = {name: connect(zone_xs, link, XS_ZONE, name) for name, link in links.items()}
    assert [alloc(channel, MiB) for channel in channels.values()] == [0, 0]
    assert xen.mappings == 2

    # gpu-0's offer is withdrawn without a word on its ring: the host closes that channel only.
    with structlog.testing.capture_logs() as logs:
        zone_xs.remove(zone_path(XS_ZONE, "gpu-0"))
        eventually(lambda: xen.mappings == 1, "the host to close the withdrawn channel")
    assert host_xs.read(f"{host_path(0, XS_ZONE, 'gpu-0')}/state") is None
    assert host_xs.read(f"{host_path(0, XS_ZONE, 'gpu-1')}/state") == "connected"
    withdrawn = [e["channel"] for e in logs if e["event"] == "xen channel withdrawn by the zone"]
    assert withdrawn == ["gpu-0"]
    assert alloc(channels["gpu-1"], MiB) == 0

    # A new process, a new name: attached in the same zone beside gpu-1.
    links["gpu-2"] = offer_as(monkeypatch, xen, zone_xs, XS_ZONE, "gpu-2")
    channels["gpu-2"] = connect(zone_xs, links["gpu-2"], XS_ZONE, "gpu-2")
    assert alloc(channels["gpu-2"], MiB) == 0
    assert xen.mappings == 2
    assert zones(registry)["dom5"].memory() == (4 * MiB, DEFAULT_LIMIT)
    for name, channel in channels.items():
        channel.close()
        links[name].close()
    eventually(lambda: xen.mappings == 0, "the host to unmap every channel")


def test_an_offer_replaced_while_served_is_closed_then_the_new_one_attached(
    monkeypatch: pytest.MonkeyPatch,
    xen: FakeXen,
    zone_xs: Xenstore,
    registry: ZoneRegistry,
    watcher: XenZoneWatcher,
) -> None:
    old = offer_as(monkeypatch, xen, zone_xs, XS_ZONE)
    assert alloc(connect(zone_xs, old, XS_ZONE), MiB) == 0
    # The zone re-offers the name with other pages before the host noticed anything.
    new = offer_as(monkeypatch, xen, zone_xs, XS_ZONE)
    channel = connect(zone_xs, new, XS_ZONE)  # the hello waits for the host to serve the new one
    assert xen.mappings == 1
    assert alloc(channel, 2 * MiB) == 0
    assert zones(registry)["dom5"].memory() == (3 * MiB, DEFAULT_LIMIT)
    channel.close()
    new.close()
    old.close()
