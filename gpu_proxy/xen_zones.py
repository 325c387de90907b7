"""XenZoneWatcher: serves every channel a Xen zone offers, and tears the zone down with its domain.

One xenstore watch on ``/local/domain``. An event under ``/local/domain/<domid>/`` rescans that
domain only; anything else (the first event, ``/local/domain`` itself) rescans every domain, so
offers made before gpu-proxy started are found too. A channel is a zone's
``data/vgpu/<name>/state == "offered"``; the watcher attaches it (GrantLink validates everything
the zone wrote) and hands the channel to the registry, in zone ``dom<domid>``, created on the
zone's first offer. The zone's identity is the domid its grants belong to, never a value the
guest wrote.

The zone's memory limit is ``/local/domain/<domid>/vgpu/memory-limit`` (decimal bytes), written
by the runtime before the domain is unpaused; without it the default applies. libxl makes a
domain's home directory Dom0-owned and only readable by the domain (only ``data/`` and a few
other subdirectories are the domain's), so the zone cannot write that key; the watcher still
ignores the key if its permissions would let the zone write it. ``/local/domain/<domid>/name``
(set by the toolstack, read-only to the domain) labels the zone's telemetry.

A zone has as many channels as it has CUDA processes (its agent's broker offers ``gpu-<n>`` for
each), and they come and go. An offer is tried once per distinct set of published values: a
refused offer is logged and not retried until the zone withdraws it or publishes different
values. An attached channel whose offer is withdrawn (or replaced by different values) is shut
down: the zone side has released or is releasing its grants, and nobody would ever use it again.
Once an attached channel closes, the zone's next offer of that name is attached (even if Xen
handed out the same refs and ports); a withdrawn one's domain is rescanned as soon as it has
closed, since the new offer may have been published while it was closing. Offers of the host's
own domain are not zones and are left alone (the Dom0 loopback self-test uses them).
"""

import contextlib
import re
import threading
from dataclasses import dataclass

import structlog

from gpu_proxy.registry import UnknownZone, ZoneAlreadyRegistered, ZoneRegistry
from gpu_proxy.telemetry.zone_stats import ZoneIdentity
from idm.channel import Channel
from idm.links.grant import STATE_OFFERED, ZONE_KEYS, GrantLink, zone_path
from idm.xen.xenstore import Xenstore, XenstoreError

log = structlog.get_logger(__name__)

DOMAINS = "/local/domain"
_DOMAIN_EVENT = re.compile(r"/local/domain/([0-9]{1,5})(?:/.*)?")
_DECIMAL = re.compile(r"[1-9][0-9]{0,19}")
# ``state`` first: the zone writes it last, so once it reads "offered" the other keys read after
# it are complete (read the other way round, a scan during the writes sees a torn offer).
_OFFER_KEYS = ("state", *(key for key in ZONE_KEYS if key != "state"))
# How long the thread blocks on the watch before it looks at ``stop()``.
POLL_S = 0.2


@dataclass(slots=True)
class _Served:
    """An attached channel and the offer values it was attached from."""

    name: str
    values: tuple[str | None, ...]
    channel: Channel
    withdrawn: bool = False  # shut down because the zone withdrew or replaced the offer


def zone_id(domid: int) -> str:
    return f"dom{domid}"


def memory_limit_path(domid: int) -> str:
    """Written by the runtime (toolstack), outside the zone's writable ``data/`` subtree."""
    return f"{DOMAINS}/{domid}/vgpu/memory-limit"


def _children(xs: Xenstore, path: str) -> list[str]:
    """The names under ``path``; none if it vanished while we looked (or we may not read it)."""
    try:
        return xs.directory(path)
    except XenstoreError:
        return []


class XenZoneWatcher:
    """A thread attaching Xen zones' channel offers to ``registry`` until ``stop()``."""

    def __init__(
        self,
        registry: ZoneRegistry,
        xs: Xenstore,
        *,
        host_domid: int = 0,
        default_limit: int,
        gpu_index: int = 0,
    ) -> None:
        if default_limit <= 0:
            raise ValueError(f"default memory limit must be positive, not {default_limit}")
        self.registry = registry
        self.xs = xs
        self.host_domid = host_domid
        self.default_limit = default_limit
        self.gpu_index = gpu_index
        # The values of each channel's last offer tried (attached or refused).
        self._tried: dict[tuple[int, str], tuple[str | None, ...]] = {}
        # Channels being served, by (domid, name).
        self._served: dict[tuple[int, str], _Served] = {}
        # Domains to rescan: a withdrawn channel of theirs closed (set by its serving thread).
        self._rescan: set[int] = set()
        self._lock = threading.Lock()  # guards the three above
        # Domains this watcher served: the zones it tears down when their domain goes.
        self._zones: set[int] = set()
        self._stop = threading.Event()
        self._watch = xs.watch(DOMAINS)
        self._thread = threading.Thread(target=self._run, name="xen-zones")
        self._thread.start()

    def is_alive(self) -> bool:
        """For health checks: the thread ends only through ``stop()``."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """End the thread. Zones stay registered: the registry's owner removes them."""
        self._stop.set()
        self._thread.join(10)
        self._watch.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            changed = self._watch.wait(POLL_S)
            with self._lock:
                rescan, self._rescan = self._rescan, set()
            try:
                for domid in sorted(rescan):
                    self._scan(domid)
                if changed is None:
                    continue
                match = _DOMAIN_EVENT.fullmatch(changed)
                if match is None:
                    self._scan_all()
                else:
                    self._scan(int(match.group(1)))
            except Exception:
                # A bug or a xenstore failure must cost this event, not every zone's channels.
                log.exception("xen zone scan failed", changed=changed)

    def _scan_all(self) -> None:
        present = {int(name) for name in _children(self.xs, DOMAINS) if name.isdecimal()}
        for domid in sorted(present | self._zones):
            self._scan(domid)

    def _scan(self, domid: int) -> None:
        if domid == self.host_domid:
            return
        if self.xs.read(f"{DOMAINS}/{domid}") is None:
            self._domain_gone(domid)
            return
        names = set(_children(self.xs, f"{DOMAINS}/{domid}/data/vgpu"))
        with self._lock:
            for key in [key for key in self._tried if key[0] == domid and key[1] not in names]:
                del self._tried[key]  # withdrawn: a new offer of that name is tried
            withdrawn = [
                served
                for key, served in self._served.items()
                if key[0] == domid and key[1] not in names
            ]
        for name in sorted(names):
            key = (domid, name)
            path = zone_path(domid, name)
            values = tuple(self.xs.read(f"{path}/{key_}") for key_ in _OFFER_KEYS)
            with self._lock:
                served = self._served.get(key)
                if served is not None:
                    if served.values != values:  # withdrawn or re-offered: close it first
                        withdrawn.append(served)
                    continue
                if values[0] != STATE_OFFERED:
                    self._tried.pop(key, None)
                    continue
                if self._tried.get(key) == values:
                    continue
                self._tried[key] = values
            self._attach(domid, name, values)
        for served in withdrawn:
            with self._lock:
                first, served.withdrawn = not served.withdrawn, True
            if first:
                # Its serving thread closes it and unmaps; the close rescans this domain.
                log.info(
                    "xen channel withdrawn by the zone", zone=zone_id(domid), channel=served.name
                )
                served.channel.shutdown()

    def _attach(self, domid: int, name: str, values: tuple[str | None, ...]) -> None:
        try:
            link = GrantLink.attach(domid, name, self.xs, host_domid=self.host_domid)
        except (ValueError, OSError) as exc:
            # InvalidOffer, a bad name, refs or ports Xen refuses: what the zone published.
            log.warning("xen channel offer refused", domid=domid, channel=name, reason=str(exc))
            return
        zone = zone_id(domid)
        with contextlib.suppress(ZoneAlreadyRegistered):
            self.registry.add(self._identity(domid), self._memory_limit(domid))
        self._zones.add(domid)

        channel = link.open_channel()

        def closed() -> None:
            link.close()
            with self._lock:  # the zone may offer this channel again, even with equal values
                self._tried.pop((domid, name), None)
                served = self._served.get((domid, name))
                if served is not None and served.channel is channel:
                    del self._served[(domid, name)]
                    if served.withdrawn:  # the zone's new offer may be complete already
                        self._rescan.add(domid)

        with self._lock:
            self._served[(domid, name)] = _Served(name, values, channel)
        try:
            self.registry.serve_channel(zone, channel, on_close=closed, grant_domid=domid)
        except UnknownZone:  # removed by the registry's owner meanwhile
            channel.close()
            closed()
            log.warning("xen channel dropped: zone removed", zone=zone, channel=name)
            return
        log.info("xen channel attached", zone=zone, channel=name)

    def _identity(self, domid: int) -> ZoneIdentity:
        return ZoneIdentity(
            zone=zone_id(domid),
            domid=domid,
            pod=self.xs.read(f"{DOMAINS}/{domid}/name") or "",
            gpu_index=self.gpu_index,
            gpu_uuid=self.registry.backend.device_info().uuid.hex(),
        )

    def _memory_limit(self, domid: int) -> int:
        path = memory_limit_path(domid)
        text = self.xs.read(path)
        if text is None:
            return self.default_limit
        perms = self.xs.get_perms(path)
        zone_may_write = perms[0] == f"n{domid}" or any(
            p[0] in "wb" and p[1:] == str(domid) for p in perms[1:]
        )
        if zone_may_write or not _DECIMAL.fullmatch(text):
            log.warning(
                "xen zone memory limit ignored",
                domid=domid,
                value=text,
                perms=perms,
                reason="zone may write it" if zone_may_write else "not a positive decimal",
            )
            return self.default_limit
        return int(text)

    def _domain_gone(self, domid: int) -> None:
        with self._lock:
            self._tried = {key: v for key, v in self._tried.items() if key[0] != domid}
        if domid not in self._zones:
            return
        self._zones.discard(domid)
        reclaimed = self.registry.remove(zone_id(domid))
        self.xs.remove(f"{DOMAINS}/{self.host_domid}/backend/vgpu/{domid}")
        log.info("xen zone gone", zone=zone_id(domid), reclaimed=reclaimed)
