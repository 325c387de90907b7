"""GrantLink: the IDM channel between a zone and the host over Xen grant pages and event channels.

Zone side (``offer``): grant a control page plus the ring pages to the host (gntalloc), format
the control page, list the ring pages' grant refs in it, allocate one unbound event channel per
ring, and publish ``ring-ref``, ``req-port``, ``rsp-port``, ``req-order``, ``rsp-order`` and
finally ``state=offered`` under ``/local/domain/<zone>/data/<service>/<name>/`` (zone-owned, host
may read; the service directory is ``vgpu`` for gpu-proxy's channels, ``vgpu-agent`` for the zone
agent's control channel).

Host side (``attach``): everything the zone wrote is untrusted. The xenstore values are parsed
strictly and bounded; the control page is mapped alone and the ref list copied out of it once,
then validated (count fixed by the layout, no reserved or repeated refs) and never read from
shared memory again; control page and rings are mapped as one region with one gntdev request;
both ports are bound; ``state=connected`` goes in a host-owned key the zone may only read,
``/local/domain/<host>/backend/<service>/<zone>/<name>/state``.

The parsing and validation are plain functions so they are tested without Xen.
"""

import mmap
import re
import struct
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Self

import structlog

from idm._ring import ffi, lib
from idm.channel import Bell, BellKind, Channel, RingLayout, Side
from idm.xen._device import check_domid
from idm.xen.evtchn import EventChannel
from idm.xen.gntalloc import GrantedPages
from idm.xen.gntdev import MappedGrants
from idm.xen.xenstore import Xenstore, XenstoreError

log = structlog.get_logger(__name__)

GREFS_OFFSET: int = lib.IDM_CTRL_GREFS_OFFSET
MAX_GREFS: int = lib.IDM_CTRL_MAX_GREFS
ORDER_MIN: int = lib.IDM_RING_ORDER_MIN
ORDER_MAX: int = lib.IDM_RING_ORDER_MAX
# GNTTAB_NR_RESERVED_ENTRIES: refs 0..7 belong to the toolstack (console, xenstore pages).
FIRST_GREF = 8
GREF_MAX = 0xFFFFFFFF
# EVTCHN_FIFO_NR_CHANNELS - 1: no event channel ABI has a larger port.
MAX_PORT = (1 << 17) - 1

# The service directory: gpu-proxy serves every channel under data/vgpu/; other services (the
# zone agent's control channel, "vgpu-agent") keep theirs apart so it never attaches them.
SERVICE = "vgpu"
STATE_OFFERED = "offered"
STATE_CONNECTED = "connected"
ZONE_KEYS = ("ring-ref", "req-port", "rsp-port", "req-order", "rsp-order", "state")

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,9}")
_GREF = struct.Struct("<I")


class InvalidOffer(ValueError):
    """What a zone published for a channel cannot be used; the message names the value."""


@dataclass(frozen=True, slots=True)
class Offer:
    """One channel as a zone publishes it (validated when it comes from xenstore)."""

    ring_ref: int
    req_port: int
    rsp_port: int
    layout: RingLayout


def check_name(name: str) -> str:
    """Channel names become one xenstore path component."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"channel name {name!r} must be 1-64 of [A-Za-z0-9_-]")
    return name


def ring_pages(layout: RingLayout) -> int:
    """Pages of both rings: the control page must have room for one grant ref per page."""
    pages = layout.data_pages
    if pages > MAX_GREFS:
        raise ValueError(
            f"rings of 2^{layout.req_order} + 2^{layout.rsp_order} bytes take {pages} pages; "
            f"a control page lists at most {MAX_GREFS} grant refs"
        )
    return pages


def zone_path(zone_domid: int, name: str, service: str = SERVICE) -> str:
    """The zone's own keys for channel ``name`` of ``service`` (only the zone writes them)."""
    return f"/local/domain/{zone_domid}/data/{service}/{name}"


def host_path(host_domid: int, zone_domid: int, name: str, service: str = SERVICE) -> str:
    """The host's keys for the zone's channel ``name`` (only the host writes them)."""
    return f"/local/domain/{host_domid}/backend/{service}/{zone_domid}/{name}"


def offer_values(offer: Offer) -> dict[str, str]:
    """The keys a zone publishes, ``state`` last: the host reads nothing before it is set."""
    return {
        "ring-ref": str(offer.ring_ref),
        "req-port": str(offer.req_port),
        "rsp-port": str(offer.rsp_port),
        "req-order": str(offer.layout.req_order),
        "rsp-order": str(offer.layout.rsp_order),
        "state": STATE_OFFERED,
    }


def _number(values: Mapping[str, str | None], key: str, low: int, high: int) -> int:
    text = values.get(key)
    if text is None:
        raise InvalidOffer(f"{key} is missing")
    if not _DECIMAL.fullmatch(text):
        raise InvalidOffer(f"{key}={text!r} is not a decimal number")
    value = int(text)
    if not low <= value <= high:
        raise InvalidOffer(f"{key}={value} is out of range {low}..{high}")
    return value


def parse_offer(values: Mapping[str, str | None]) -> Offer:
    """Validate a zone's published keys (None: absent). Numbers must be plain decimal, in range;
    the two rings need distinct ports and must fit the control page's ref list."""
    state = values.get("state")
    if state != STATE_OFFERED:
        raise InvalidOffer(f"state is {state!r}, not {STATE_OFFERED!r}")
    ring_ref = _number(values, "ring-ref", FIRST_GREF, GREF_MAX)
    req_port = _number(values, "req-port", 1, MAX_PORT)
    rsp_port = _number(values, "rsp-port", 1, MAX_PORT)
    if req_port == rsp_port:
        raise InvalidOffer(f"req-port and rsp-port are both {req_port}: each ring needs its own")
    layout = RingLayout(
        req_order=_number(values, "req-order", ORDER_MIN, ORDER_MAX),
        rsp_order=_number(values, "rsp-order", ORDER_MIN, ORDER_MAX),
    )
    try:
        ring_pages(layout)
    except ValueError as exc:
        raise InvalidOffer(str(exc)) from exc
    return Offer(ring_ref, req_port, rsp_port, layout)


def encode_grefs(refs: Sequence[int]) -> bytes:
    """The ring pages' refs as the control page lists them: little-endian u32, in page order."""
    if len(refs) > MAX_GREFS:
        raise ValueError(f"{len(refs)} grant refs do not fit a control page ({MAX_GREFS} max)")
    return struct.pack(f"<{len(refs)}I", *refs)


def decode_grefs(raw: bytes, count: int, ring_ref: int) -> tuple[int, ...]:
    """Validate the ref list copied from a zone's control page. ``count`` comes from the layout,
    never from the zone's page; reserved refs and repeats (pages aliasing each other or the
    control page) are refused."""
    if len(raw) != count * _GREF.size:
        raise InvalidOffer(
            f"grant ref list is {len(raw)} bytes; {count} ring pages need {count * _GREF.size}"
        )
    refs = tuple(ref for (ref,) in _GREF.iter_unpack(raw))
    seen = {ring_ref}
    for page, ref in enumerate(refs):
        if ref < FIRST_GREF:
            raise InvalidOffer(
                f"ring page {page}: grant ref {ref} is reserved (refs below {FIRST_GREF})"
            )
        if ref in seen:
            raise InvalidOffer(f"ring page {page}: grant ref {ref} is listed twice")
        seen.add(ref)
    return refs


def _publish(xs: Xenstore, path: str, owner: int, reader: int, values: Mapping[str, str]) -> None:
    """Replace ``path`` with ``values``: ``owner`` may write, ``reader`` only read, nobody else
    anything (keys inherit the directory's permissions). A stale node from an earlier run is
    removed first, so keys of two offers never mix."""
    xs.remove(path)
    xs.mkdir(path)
    xs.set_perms(path, owner, [reader])
    for key, value in values.items():
        xs.write(f"{path}/{key}", value)


@dataclass(frozen=True, slots=True)
class ZoneHandles:
    """The open devices behind the zone side of a channel: what a process needs to use it
    without opening /dev/xen itself (the zone agent passes them over a unix socket)."""

    pages_fd: int  # gntalloc: map pages_length bytes at pages_offset
    pages_offset: int
    pages_length: int
    req_fd: int  # evtchn bound to req_port: the request ring's doorbell
    req_port: int
    rsp_fd: int  # evtchn bound to rsp_port: the response ring's doorbell
    rsp_port: int


class GrantLink:
    """One side of a channel between a zone and the host: the mapped region (control page, then
    the request ring, then the response ring) and one event channel per ring."""

    def __init__(
        self,
        side: Side,
        layout: RingLayout,
        pages: GrantedPages | MappedGrants,
        req: EventChannel,
        rsp: EventChannel,
        xs: Xenstore,
        published: str,
    ) -> None:
        self._side = side
        self._layout = layout
        self._pages = pages
        self._req = req
        self._rsp = rsp
        self._xs = xs
        self._published = published
        self._closed = False

    @classmethod
    def offer(
        cls,
        name: str,
        layout: RingLayout,
        xs: Xenstore,
        remote_domid: int = 0,
        *,
        service: str = SERVICE,
    ) -> Self:
        """Zone side: grant and format the region, bind the ports, publish ``state=offered``
        under ``data/<service>/<name>``."""
        check_name(name)
        check_name(service)
        check_domid(remote_domid)
        count = ring_pages(layout)
        own = xs.own_domid()
        path = zone_path(own, name, service)
        with ExitStack() as undo:
            pages = GrantedPages.allocate(remote_domid, 1 + count)
            undo.callback(pages.close)
            with ffi.from_buffer(pages.memory) as base:
                lib.idm_region_format(base, layout.to_c())
            pages.memory[GREFS_OFFSET : GREFS_OFFSET + count * _GREF.size] = encode_grefs(
                pages.grefs[1:]
            )
            req = EventChannel.bind_unbound_port(remote_domid)
            undo.callback(req.close)
            rsp = EventChannel.bind_unbound_port(remote_domid)
            undo.callback(rsp.close)
            undo.callback(xs.remove, path)
            offer = Offer(pages.grefs[0], req.port, rsp.port, layout)
            _publish(xs, path, own, remote_domid, offer_values(offer))
            undo.pop_all()
        log.info(
            "grant link offered",
            path=path,
            host=remote_domid,
            pages=1 + count,
            req_port=req.port,
            rsp_port=rsp.port,
        )
        return cls(Side.ZONE, layout, pages, req, rsp, xs, path)

    @classmethod
    def attach(
        cls, domid: int, name: str, xs: Xenstore, *, host_domid: int = 0, service: str = SERVICE
    ) -> Self:
        """Host side: validate zone ``domid``'s offer of channel ``name`` of ``service``, map
        it, bind the ports, publish ``state=connected``. Raises InvalidOffer for anything the
        zone got wrong."""
        check_name(name)
        check_name(service)
        check_domid(domid)
        path = zone_path(domid, name, service)
        try:
            offer = parse_offer({key: xs.read(f"{path}/{key}") for key in ZONE_KEYS})
        except InvalidOffer as exc:
            raise InvalidOffer(f"{path}: {exc}") from exc
        count = ring_pages(offer.layout)
        with MappedGrants.map(domid, [offer.ring_ref]) as ctrl:
            raw = ctrl.memory[GREFS_OFFSET : GREFS_OFFSET + count * _GREF.size]
        try:
            refs = decode_grefs(raw, count, offer.ring_ref)
        except InvalidOffer as exc:
            raise InvalidOffer(f"{path}: control page (ref {offer.ring_ref}): {exc}") from exc
        hpath = host_path(host_domid, domid, name, service)
        with ExitStack() as undo:
            region = MappedGrants.map(domid, [offer.ring_ref, *refs])
            undo.callback(region.close)
            req = EventChannel.bind_interdomain(domid, offer.req_port)
            undo.callback(req.close)
            rsp = EventChannel.bind_interdomain(domid, offer.rsp_port)
            undo.callback(rsp.close)
            undo.callback(xs.remove, hpath)
            _publish(xs, hpath, host_domid, domid, {"state": STATE_CONNECTED})
            undo.pop_all()
        log.info(
            "grant link attached",
            zone=domid,
            channel=name,
            pages=1 + count,
            req_port=req.port,
            rsp_port=rsp.port,
        )
        return cls(Side.HOST, offer.layout, region, req, rsp, xs, hpath)

    @property
    def side(self) -> Side:
        return self._side

    @property
    def layout(self) -> RingLayout:
        return self._layout

    @property
    def memory(self) -> mmap.mmap:
        return self._pages.memory

    def bells(self) -> tuple[Bell, Bell]:
        """(tx, rx): the zone sends on the request ring's port, the host on the response's."""
        req = Bell(BellKind.EVTCHN, self._req.fd, self._req.fd, self._req.port)
        rsp = Bell(BellKind.EVTCHN, self._rsp.fd, self._rsp.fd, self._rsp.port)
        return (req, rsp) if self._side == Side.ZONE else (rsp, req)

    def open_channel(self, *, spin_ns: int | None = None) -> Channel:
        return Channel(self, self._side, spin_ns=spin_ns)

    def zone_handles(self) -> ZoneHandles:
        """Zone side only: the fds, offset and ports behind this link. They stay owned by the
        link (``close`` closes them); pass them on, do not close them."""
        if self._side != Side.ZONE or isinstance(self._pages, MappedGrants):
            raise ValueError("only the zone side of a grant link has granted pages to hand on")
        return ZoneHandles(
            pages_fd=self._pages.fd,
            pages_offset=self._pages.offset,
            pages_length=len(self._pages.memory),
            req_fd=self._req.fd,
            req_port=self._req.port,
            rsp_fd=self._rsp.fd,
            rsp_port=self._rsp.port,
        )

    def close(self) -> None:
        """Unmap, unbind both ports and withdraw what this side published. Raises BufferError,
        releasing nothing, while a buffer still points into ``memory`` (close the channel
        first)."""
        if self._closed:
            return
        self._pages.close()
        self._req.close()
        self._rsp.close()
        try:
            self._xs.remove(self._published)
        except XenstoreError as exc:
            log.warning("grant link: xenstore cleanup failed", path=self._published, error=str(exc))
        self._closed = True
        log.info("grant link closed", side=self._side.name, path=self._published)
