"""GrantLink: the pure validation of what a zone publishes, then the whole offer/attach handshake
over stand-in devices (memfd pages, eventfd ports) and a xenstored speaking the real protocol,
then (marked ``xen``) a loopback in a real Dom0."""

import errno
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idm import _ring
from idm.channel import BellKind, RingLayout, Side
from idm.links import grant
from idm.links.grant import (
    GREFS_OFFSET,
    MAX_GREFS,
    GrantLink,
    InvalidOffer,
    Offer,
    check_name,
    decode_grefs,
    encode_grefs,
    host_path,
    offer_values,
    parse_offer,
    ring_pages,
    zone_path,
)
from idm.xen._device import XenDeviceError
from idm.xen.xenstore import Xenstore, XenstoreError
from tests.unit.conftest import XS_ZONE
from tests.unit.xen_fakes import FakeXen

ZONE = XS_ZONE
LAYOUT = RingLayout(req_order=13, rsp_order=12)  # 2 + 1 ring pages
GOOD = {
    "ring-ref": "8",
    "req-port": "3",
    "rsp-port": "4",
    "req-order": "13",
    "rsp-order": "12",
    "state": "offered",
}

# -- names, paths, sizes ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cuda0", "a", "x_y-Z9", "n" * 64])
def test_channel_names_that_fit_one_path_component(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "..", "n" * 65, "caf\u00e9", "a b", "@introduce"])
def test_channel_names_that_would_escape_or_break_the_path(name: str) -> None:
    with pytest.raises(ValueError, match="must be 1-64 of"):
        check_name(name)


def test_paths_keep_each_side_in_its_own_subtree() -> None:
    assert zone_path(7, "cuda0") == "/local/domain/7/data/vgpu/cuda0"
    assert host_path(0, 7, "cuda0") == "/local/domain/0/backend/vgpu/7/cuda0"


@pytest.mark.parametrize(
    ("req", "rsp", "pages"), [(12, 12, 2), (13, 12, 3), (19, 19, 256), (20, 20, 512)]
)
def test_ring_pages_count_both_rings(req: int, rsp: int, pages: int) -> None:
    assert ring_pages(RingLayout(req_order=req, rsp_order=rsp)) == pages


def test_rings_larger_than_the_ref_list_are_refused() -> None:
    assert MAX_GREFS == (4096 - GREFS_OFFSET) // 4
    with pytest.raises(
        ValueError, match=f"take 1024 pages; a control page lists at most {MAX_GREFS}"
    ):
        ring_pages(RingLayout(req_order=21, rsp_order=21))


# -- what the zone publishes -------------------------------------------------------------------


def test_parse_offer_reads_every_key() -> None:
    assert parse_offer(GOOD) == Offer(ring_ref=8, req_port=3, rsp_port=4, layout=LAYOUT)


@given(
    req=st.integers(12, 24),
    rsp=st.integers(12, 24),
    ring_ref=st.integers(8, 0xFFFFFFFF),
    ports=st.lists(st.integers(1, (1 << 17) - 1), min_size=2, max_size=2, unique=True),
)
def test_published_values_parse_back_or_are_refused_for_size(
    req: int, rsp: int, ring_ref: int, ports: list[int]
) -> None:
    offer = Offer(ring_ref, ports[0], ports[1], RingLayout(req_order=req, rsp_order=rsp))
    values: dict[str, str | None] = dict(offer_values(offer))
    assert list(values)[-1] == "state"
    if (1 << req) + (1 << rsp) <= MAX_GREFS * 4096:
        assert parse_offer(values) == offer
    else:
        with pytest.raises(InvalidOffer, match=f"a control page lists at most {MAX_GREFS}"):
            parse_offer(values)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("state", None, "state is None, not 'offered'"),
        ("state", "connected", "state is 'connected', not 'offered'"),
        ("ring-ref", None, "ring-ref is missing"),
        ("ring-ref", "", "ring-ref='' is not a decimal number"),
        ("ring-ref", "0x10", "ring-ref='0x10' is not a decimal number"),
        ("ring-ref", "+9", "ring-ref='\\+9' is not a decimal number"),
        ("ring-ref", " 9", "ring-ref=' 9' is not a decimal number"),
        ("ring-ref", "09", "ring-ref='09' is not a decimal number"),
        ("ring-ref", "1_0", "ring-ref='1_0' is not a decimal number"),
        ("ring-ref", "\u0669", "is not a decimal number"),
        ("ring-ref", "99999999999", "is not a decimal number"),
        ("ring-ref", "1", "ring-ref=1 is out of range 8..4294967295"),
        ("ring-ref", "4294967296", "ring-ref=4294967296 is out of range"),
        ("req-port", "0", "req-port=0 is out of range 1..131071"),
        ("rsp-port", "131072", "rsp-port=131072 is out of range 1..131071"),
        ("rsp-port", "3", "req-port and rsp-port are both 3: each ring needs its own"),
        ("req-order", "11", "req-order=11 is out of range 12..24"),
        ("rsp-order", "25", "rsp-order=25 is out of range 12..24"),
        ("req-order", "24", f"take 4097 pages; a control page lists at most {MAX_GREFS}"),
    ],
)
def test_parse_offer_refuses_bad_values(key: str, value: str | None, message: str) -> None:
    values: dict[str, str | None] = {**GOOD, key: value}
    with pytest.raises(InvalidOffer, match=message):
        parse_offer(values)


# -- the ref list in the control page ---------------------------------------------------------


def test_grefs_round_trip_little_endian() -> None:
    raw = encode_grefs([8, 9, 0x01020304])
    assert raw == b"\x08\0\0\0\x09\0\0\0\x04\x03\x02\x01"
    assert decode_grefs(raw, 3, ring_ref=100) == (8, 9, 0x01020304)


def test_encode_refuses_more_refs_than_the_page_holds() -> None:
    with pytest.raises(ValueError, match=f"{MAX_GREFS + 1} grant refs do not fit"):
        encode_grefs(range(8, 8 + MAX_GREFS + 1))


@pytest.mark.parametrize(
    ("refs", "count", "message"),
    [
        ([8, 9], 3, "grant ref list is 8 bytes; 3 ring pages need 12"),
        ([8, 9, 10], 2, "grant ref list is 12 bytes; 2 ring pages need 8"),
        ([8, 0], 2, "ring page 1: grant ref 0 is reserved \\(refs below 8\\)"),
        ([8, 1], 2, "ring page 1: grant ref 1 is reserved"),
        ([9, 9], 2, "ring page 1: grant ref 9 is listed twice"),
        ([100, 8], 2, "ring page 0: grant ref 100 is listed twice"),
    ],
)
def test_decode_refuses_bad_ref_lists(refs: list[int], count: int, message: str) -> None:
    with pytest.raises(InvalidOffer, match=message):
        decode_grefs(struct.pack(f"<{len(refs)}I", *refs), count, ring_ref=100)


# -- offer and attach over stand-in devices ----------------------------------------------------


@pytest.fixture
def xen() -> FakeXen:
    return FakeXen()


def act_as(monkeypatch: pytest.MonkeyPatch, xen: FakeXen, domid: int) -> type[Any]:
    """Point GrantLink's device classes at stand-ins acting as domain ``domid``; returns the
    event channel stand-in."""
    pages, mapped, evtchn = xen.devices(domid)
    monkeypatch.setattr(grant, "GrantedPages", pages)
    monkeypatch.setattr(grant, "MappedGrants", mapped)
    monkeypatch.setattr(grant, "EventChannel", evtchn)
    return evtchn


def offer(monkeypatch: pytest.MonkeyPatch, xen: FakeXen, xs: Xenstore) -> GrantLink:
    act_as(monkeypatch, xen, ZONE)
    return GrantLink.offer("cuda0", LAYOUT, xs)


def attach(monkeypatch: pytest.MonkeyPatch, xen: FakeXen, xs: Xenstore) -> GrantLink:
    act_as(monkeypatch, xen, 0)
    return GrantLink.attach(ZONE, "cuda0", xs)


def test_offer_then_attach_shares_the_region_and_pairs_the_ports(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, zone_xs: Xenstore, host_xs: Xenstore
) -> None:
    zone = offer(monkeypatch, xen, zone_xs)
    host = attach(monkeypatch, xen, host_xs)
    assert (zone.side, host.side) == (Side.ZONE, Side.HOST)
    assert zone.layout == host.layout == LAYOUT
    assert len(zone.memory) == len(host.memory) == LAYOUT.region_size == 4 * 4096

    # One region, seen by both: the formatted control page, then the rings.
    magic = struct.unpack_from("<II", host.memory, 0)
    assert magic == (_ring.lib.IDM_CTRL_MAGIC, _ring.lib.IDM_LAYOUT_VERSION)
    zone.memory[-4:] = b"ping"
    assert host.memory[-4:] == b"ping"
    host.memory[4096:4100] = b"pong"
    assert zone.memory[4096:4100] == b"pong"

    # What the zone published, readable (not writable) by the host.
    zpath = zone_path(ZONE, "cuda0")
    published = {key: host_xs.read(f"{zpath}/{key}") for key in grant.ZONE_KEYS}
    ring_ref = int(published["ring-ref"] or 0)
    refs = decode_grefs(bytes(host.memory[GREFS_OFFSET : GREFS_OFFSET + 12]), 3, ring_ref)
    assert [ring_ref, *refs] == sorted(ref for (dom, ref) in xen.grants if dom == ZONE)
    assert all(g.grantee == 0 for g in xen.grants.values())
    for key in grant.ZONE_KEYS:
        assert host_xs.get_perms(f"{zpath}/{key}") == [f"n{ZONE}", "r0"]

    # The host's answer, in a key the zone reads but cannot write.
    hpath = host_path(0, ZONE, "cuda0")
    assert zone_xs.read(f"{hpath}/state") == "connected"
    assert host_xs.get_perms(f"{hpath}/state") == ["n0", f"r{ZONE}"]
    with pytest.raises(XenstoreError) as denied:
        zone_xs.write(f"{hpath}/state", "closed")
    assert denied.value.errno == errno.EACCES

    # Zone sends requests on the request ring's port, which is the host's receive bell.
    zone_tx, zone_rx = zone.bells()
    host_tx, host_rx = host.bells()
    for bell in (zone_tx, zone_rx, host_tx, host_rx):
        assert bell.kind == BellKind.EVTCHN == _ring.lib.IDM_BELL_EVTCHN
        assert bell.wait_fd == bell.notify_fd >= 0
    assert zone_tx.port == int(published["req-port"] or 0)
    assert zone_rx.port == int(published["rsp-port"] or 0)
    assert xen.ports[(ZONE, zone_tx.port)].peer == (0, host_rx.port)
    assert xen.ports[(ZONE, zone_rx.port)].peer == (0, host_tx.port)

    # The C ring accepts both sides, and a closed zone is visible to the host.
    zone_channel = zone.open_channel()
    host_channel = host.open_channel()
    zone_channel.close()
    zone_closed = _ring.ffi.offsetof("struct idm_ctrl", "zone_closed")
    assert struct.unpack_from("<I", host.memory, zone_closed) == (1,)
    host_channel.close()

    assert xen.grants == {} and xen.ports == {} and xen.mappings == 0
    assert host_xs.read(f"{zpath}/state") is None
    assert host_xs.read(f"{hpath}/state") is None
    zone.close()  # a second close does nothing


def _nothing_left_by_the_host(xen: FakeXen, host_xs: Xenstore) -> None:
    assert xen.mappings == 0
    assert all(dom == ZONE for (dom, _port) in xen.ports)
    assert host_xs.read(host_path(0, ZONE, "cuda0")) is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("req-order", "30", "req-order=30 is out of range 12..24"),
        ("ring-ref", "8 ", "ring-ref='8 ' is not a decimal number"),
        ("state", "closing", "state is 'closing', not 'offered'"),
    ],
)
def test_attach_refuses_tampered_keys_before_mapping_anything(
    monkeypatch: pytest.MonkeyPatch,
    xen: FakeXen,
    zone_xs: Xenstore,
    host_xs: Xenstore,
    key: str,
    value: str,
    message: str,
) -> None:
    zone = offer(monkeypatch, xen, zone_xs)
    zone_xs.write(f"{zone_path(ZONE, 'cuda0')}/{key}", value)
    with pytest.raises(InvalidOffer, match=f"^/local/domain/{ZONE}/data/vgpu/cuda0: {message}"):
        attach(monkeypatch, xen, host_xs)
    _nothing_left_by_the_host(xen, host_xs)
    zone.close()


def test_attach_refuses_an_aliasing_ref_list_and_unmaps(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, zone_xs: Xenstore, host_xs: Xenstore
) -> None:
    zone = offer(monkeypatch, xen, zone_xs)
    first = zone.memory[GREFS_OFFSET : GREFS_OFFSET + 4]
    zone.memory[GREFS_OFFSET + 4 : GREFS_OFFSET + 8] = first
    with pytest.raises(InvalidOffer, match=r"control page \(ref \d+\): ring page 1: .* twice"):
        attach(monkeypatch, xen, host_xs)
    _nothing_left_by_the_host(xen, host_xs)
    zone.close()


def test_attach_with_nothing_offered(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, host_xs: Xenstore
) -> None:
    with pytest.raises(InvalidOffer, match="cuda0: state is None, not 'offered'"):
        attach(monkeypatch, xen, host_xs)
    _nothing_left_by_the_host(xen, host_xs)


def test_attach_undoes_the_mapping_when_a_port_cannot_be_bound(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, zone_xs: Xenstore, host_xs: Xenstore
) -> None:
    zone = offer(monkeypatch, xen, zone_xs)
    zone_xs.write(f"{zone_path(ZONE, 'cuda0')}/rsp-port", "999")
    with pytest.raises(XenDeviceError):
        attach(monkeypatch, xen, host_xs)
    _nothing_left_by_the_host(xen, host_xs)
    zone.close()
    assert xen.grants == {} and xen.ports == {}


def test_attach_withdraws_a_half_published_answer(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, zone_xs: Xenstore, host_xs: Xenstore
) -> None:
    zone = offer(monkeypatch, xen, zone_xs)

    def write(path: str, value: str) -> None:
        raise XenstoreError(errno.EDQUOT, path, "quota")

    monkeypatch.setattr(host_xs, "write", write)
    with pytest.raises(XenstoreError, match="quota"):
        attach(monkeypatch, xen, host_xs)
    _nothing_left_by_the_host(xen, host_xs)
    zone.close()


def test_offer_undoes_everything_when_binding_fails(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, zone_xs: Xenstore
) -> None:
    evtchn = act_as(monkeypatch, xen, ZONE)
    real_bind = evtchn.bind_unbound_port
    calls = []

    def bind_once(remote: int) -> Any:
        calls.append(remote)
        if len(calls) == 2:
            raise XenDeviceError(errno.ENOSPC, "fake-evtchn", "no ports left")
        return real_bind(remote)

    monkeypatch.setattr(evtchn, "bind_unbound_port", bind_once)
    with pytest.raises(XenDeviceError, match="no ports left"):
        GrantLink.offer("cuda0", LAYOUT, zone_xs)
    assert calls == [0, 0]
    assert xen.grants == {} and xen.ports == {}
    assert zone_xs.read(f"{zone_path(ZONE, 'cuda0')}/state") is None


def test_offer_withdraws_a_half_published_offer(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, zone_xs: Xenstore
) -> None:
    real_write = zone_xs.write

    def write(path: str, value: str) -> None:
        if path.endswith("/state"):
            raise XenstoreError(errno.EDQUOT, path, "quota")
        real_write(path, value)

    monkeypatch.setattr(zone_xs, "write", write)
    with pytest.raises(XenstoreError, match="quota"):
        offer(monkeypatch, xen, zone_xs)
    assert xen.grants == {} and xen.ports == {}
    assert zone_xs.read(f"{zone_path(ZONE, 'cuda0')}/ring-ref") is None


def test_offer_replaces_a_stale_offer(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, zone_xs: Xenstore
) -> None:
    stale = zone_path(ZONE, "cuda0")
    zone_xs.write(f"{stale}/leftover", "1")
    zone = offer(monkeypatch, xen, zone_xs)
    assert zone_xs.read(f"{stale}/leftover") is None
    assert zone_xs.read(f"{stale}/state") == "offered"
    zone.close()


def test_offer_refuses_a_layout_too_big_before_granting(
    monkeypatch: pytest.MonkeyPatch, xen: FakeXen, zone_xs: Xenstore
) -> None:
    act_as(monkeypatch, xen, ZONE)
    with pytest.raises(ValueError, match=f"a control page lists at most {MAX_GREFS}"):
        GrantLink.offer("cuda0", RingLayout(req_order=22, rsp_order=12), zone_xs)
    assert xen.grants == {}


# -- a real Dom0 (nested Xen testbed) ----------------------------------------------------------


@pytest.mark.dom0
def test_loopback_in_dom0_carries_a_message() -> None:
    """Dom0 offers to itself and attaches: real gntalloc, gntdev, evtchn and xenstored."""
    with Xenstore.connect() as xs:
        own = xs.own_domid()
        zone = GrantLink.offer("selftest", RingLayout(req_order=12, rsp_order=12), xs, own)
        host = GrantLink.attach(own, "selftest", xs, host_domid=own)
        zone_channel, host_channel = zone.open_channel(), host.open_channel()
        with ThreadPoolExecutor(1) as pool:
            server = pool.submit(host_channel.hello_server, 1 << 20)
            zone_channel.hello_client(1 << 20)
            server.result(timeout=30)
            # Larger than the 4 KiB ring: it streams, so the host must be receiving meanwhile.
            received = pool.submit(host_channel.recv, 30_000)
            zone_channel.send(_ring.lib.IDM_OP_NULL, b"ping" * 3000, seq=1, timeout_ms=30_000)
            message = received.result(timeout=60)
        assert message is not None
        assert bytes(message.payload) == b"ping" * 3000
        zone_channel.close()
        host_channel.close()
