"""ZoneRegistry: the zones gpu-proxy serves, and the channels each one has open.

The runtime registers a zone (process backend) and gets back the socket its guest processes
connect to; Xen zones are added without a socket by ``XenZoneWatcher``, which hands over each
attached GrantLink's channel. Each channel is one guest process: a Caller and a ChannelServer
thread. A call's zone is the socket or the grants it arrived on, never anything the guest says.
Removing a zone stops its channels and tears it down completely.
"""

import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from gpu_proxy import errors
from gpu_proxy.backends.base import GpuBackend
from gpu_proxy.dispatch import call_handlers, streamed_handlers
from gpu_proxy.module_cache import DEFAULT_MODULE_CACHE_BYTES, ModuleImageCache
from gpu_proxy.quota import MemoryLedger
from gpu_proxy.shared_host import SharedHostMemory
from gpu_proxy.spin import SpinBudget
from gpu_proxy.telemetry.events import EventBus, EventKind
from gpu_proxy.telemetry.zone_stats import ProxyStats, ZoneIdentity
from gpu_proxy.zone import Caller, Zone
from idm.channel import Channel, ChannelError
from idm.links.local import LocalListener
from idm.server import ChannelServer, FailureStatuses
from idm.wire import MAX_PAYLOAD

log = structlog.get_logger(__name__)


ZONE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# A zone reads every reply status as a CUresult.
CALL_FAILURES = FailureStatuses(
    unknown_opcode=errors.CUDA_ERROR_NOT_SUPPORTED, handler_failed=errors.CUDA_ERROR_UNKNOWN
)


class ZoneAlreadyRegistered(ValueError):
    """A zone id is registered once; re-registering would orphan the first one's objects."""


class InvalidZoneId(ValueError):
    """Zone ids become socket file names: no path separators, no surprises."""


class UnknownZone(KeyError):
    """A channel for a zone that is not (or no longer) registered has nobody to serve it."""


class _ZoneEndpoint:
    """One zone's listener (when it has a socket) and the servers of its guest processes."""

    def __init__(self, zone: Zone, path: Path | None, spin: SpinBudget) -> None:
        self.zone = zone
        self.spin = spin
        self.servers: list[ChannelServer] = []
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self.listener = LocalListener(path) if path is not None else None
        self.acceptor = threading.Thread(target=self._accept_loop, name=f"accept-{zone.id}")
        if self.listener is not None:
            self.acceptor.start()

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while True:
            try:
                link = self.listener.accept()
            except ChannelError:
                continue  # refused offer, already logged; keep serving this zone
            except OSError:
                return  # listener closed
            self.serve(link.open_channel(), link.peer_alive, socket_fd=link.socket_fd)

    def serve(
        self,
        channel: Channel,
        peer_alive: Callable[[], bool] | None = None,
        on_close: Callable[[], None] | None = None,
        socket_fd: int | None = None,
        grant_domid: int | None = None,
    ) -> None:
        """Serve ``channel`` in a thread of its own until it closes or the zone is removed;
        ``socket_fd`` (a LocalLink's socket) is where the process passes pinned host memory,
        ``grant_domid`` (a GrantLink's zone) the domain whose granted pages it names instead."""
        caller = Caller(self.zone, shared=SharedHostMemory(socket_fd, grant_domid))
        server = ChannelServer(
            channel,
            call_handlers(caller),
            max_payload=MAX_PAYLOAD,
            name=self.zone.id,
            peer_alive=peer_alive,
            failures=CALL_FAILURES,
            streamed=streamed_handlers(caller),
        )
        thread = threading.Thread(
            target=self._serve, args=(server, caller, on_close), name=f"zone-{self.zone.id}"
        )
        with self._lock:
            if self._closed:  # removed meanwhile: nobody would ever stop this server
                raise UnknownZone(self.zone.id)
            self.servers.append(server)
            self.threads.append(thread)
        thread.start()

    def _serve(
        self, server: ChannelServer, caller: Caller, on_close: Callable[[], None] | None
    ) -> None:
        bus, zone = self.zone.bus, self.zone.id
        bus.publish(zone, EventKind.CHANNEL_OPENED, "guest process connected")
        self.spin.join(server.channel)
        try:
            server.serve()
        finally:
            self.spin.leave(server.channel)
            caller.shared.close()
            if on_close is not None:
                on_close()
        reason = server.close_reason or "stopped"
        if reason in ("closed", "peer process gone", "stopped"):
            bus.publish(zone, EventKind.CHANNEL_CLOSED, reason)
        else:
            bus.publish(zone, EventKind.PROTOCOL_VIOLATION, reason)

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()  # wakes the acceptor
            self.acceptor.join(10)
        with self._lock:
            self._closed = True
            servers, threads = list(self.servers), list(self.threads)
        for server in servers:
            server.stop()
        for thread in threads:
            thread.join(10)


class ZoneRegistry:
    def __init__(
        self,
        backend: GpuBackend,
        socket_dir: Path,
        bus: EventBus | None = None,
        module_cache_bytes: int = DEFAULT_MODULE_CACHE_BYTES,
    ) -> None:
        self.backend = backend
        self.images = ModuleImageCache(module_cache_bytes)
        self.ledger = MemoryLedger(backend.device_info().total_mem)
        self.socket_dir = socket_dir
        self.bus = bus if bus is not None else EventBus()
        self.proxy_stats = ProxyStats()
        self.spin = SpinBudget()
        self._zones: dict[str, _ZoneEndpoint] = {}
        self._lock = threading.Lock()

    def register(self, identity: ZoneIdentity, memory_limit: int) -> Path:
        """Create the zone and its context; returns the socket its guest processes use."""
        path = self.socket_path(identity.zone)
        self._create(identity, memory_limit, path)
        return path

    def add(self, identity: ZoneIdentity, memory_limit: int) -> Zone:
        """Create a zone without a socket: its channels come through ``serve_channel``."""
        return self._create(identity, memory_limit, None)

    def _create(self, identity: ZoneIdentity, memory_limit: int, path: Path | None) -> Zone:
        zone_id = identity.zone
        if not ZONE_ID.fullmatch(zone_id) or zone_id in (".", ".."):
            raise InvalidZoneId(f"zone id {zone_id!r} must be 1-64 of [A-Za-z0-9_.-]")
        if memory_limit <= 0:
            raise ValueError(f"memory limit of zone {zone_id!r} must be positive")
        with self._lock:
            if zone_id in self._zones:
                raise ZoneAlreadyRegistered(f"zone {zone_id!r} is already registered")
            zone = Zone(identity, self.backend, self.ledger, memory_limit, self.bus, self.images)
            self._zones[zone_id] = _ZoneEndpoint(zone, path, self.spin)
        socket = "" if path is None else str(path)
        log.info("zone registered", zone=zone_id, memory_limit=zone.memory_limit, socket=socket)
        self.bus.publish(zone_id, EventKind.ZONE_REGISTERED, "zone registered", socket=socket)
        return zone

    def serve_channel(
        self,
        zone_id: str,
        channel: Channel,
        *,
        peer_alive: Callable[[], bool] | None = None,
        on_close: Callable[[], None] | None = None,
        grant_domid: int | None = None,
    ) -> None:
        """Serve one guest process's channel for ``zone_id`` until it closes or the zone is
        removed; ``on_close`` runs once the channel is closed (to release the link under it);
        ``grant_domid``: the channel is a GrantLink of that domain, which may share pinned
        memory as granted pages. Raises UnknownZone, serving nothing, if the zone is not
        registered."""
        with self._lock:
            endpoint = self._zones.get(zone_id)
        if endpoint is None:
            raise UnknownZone(zone_id)
        endpoint.serve(channel, peer_alive, on_close, grant_domid=grant_domid)

    def remove(self, zone_id: str) -> dict[str, int]:
        """Stop the zone's channels and release everything it held; returns what was reclaimed.
        Unknown zones are fine (removal is idempotent, as the runtime may retry)."""
        with self._lock:
            endpoint = self._zones.pop(zone_id, None)
        if endpoint is None:
            return {}
        endpoint.close()
        reclaimed = dict(endpoint.zone.teardown())
        self.proxy_stats.record_teardown(reclaimed)
        self.bus.publish(zone_id, EventKind.ZONE_REMOVED, "zone removed")
        return reclaimed

    def socket_path(self, zone_id: str) -> Path:
        return self.socket_dir / f"{zone_id}.sock"

    def zones(self) -> Iterator[Zone]:
        with self._lock:
            endpoints = list(self._zones.values())
        return (e.zone for e in endpoints)

    def close(self) -> None:
        for zone_id in [z.id for z in self.zones()]:
            self.remove(zone_id)
