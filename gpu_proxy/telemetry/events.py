"""gpu-proxy's event stream: zone lifecycle and GPU events, served as vgpu.events.v1.ZoneEvents.

The dispatcher publishes from its hot path (call errors, quota hits), so `EventBus.publish` never
blocks and never grows memory: each event goes into a bounded ring of recent events (for replay)
and into every matching watcher's bounded queue. A watcher that falls behind loses its oldest
queued events and is told how many with a synthetic event (seq 0, kind EVENT_KIND_UNSPECIFIED,
attributes["missed"]) in their place, so neither publishers nor other watchers ever wait for it.

Shutdown: `bus.close()` ends every stream once its queued events are sent (status OK); stopping
the server returned by `serve_events` cancels the streams and unsubscribes their watchers.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from gpu_proxy.proto.gen import events_pb2, events_pb2_grpc

DEFAULT_HISTORY = 1024
DEFAULT_QUEUE_SIZE = 1024


class EventKind(enum.IntEnum):
    """vgpu.events.v1.EventKind, as a typed enum for publishers (a test keeps the two equal)."""

    EVENT_KIND_UNSPECIFIED = 0
    ZONE_REGISTERED = 1
    ZONE_REMOVED = 2
    CHANNEL_OPENED = 3
    CHANNEL_CLOSED = 4
    QUOTA_EXCEEDED = 5
    HANDLES_RECLAIMED = 6
    CALL_ERROR = 7
    PROTOCOL_VIOLATION = 8


@dataclass(frozen=True, slots=True)
class BusEvent:
    """One published event; kept as a plain object so publishing builds no protobuf message."""

    seq: int
    time_ns: int
    zone: str
    kind: EventKind
    message: str
    attributes: Mapping[str, str]

    def to_proto(self) -> events_pb2.Event:
        stamp = Timestamp()
        stamp.FromNanoseconds(self.time_ns)
        return events_pb2.Event(
            seq=self.seq,
            time=stamp,
            zone=self.zone,
            kind=self.kind.name,
            message=self.message,
            attributes=dict(self.attributes),
        )


def _missed_event(count: int) -> BusEvent:
    return BusEvent(
        seq=0,
        time_ns=time.time_ns(),
        zone="",
        kind=EventKind.EVENT_KIND_UNSPECIFIED,
        message=f"missed {count} events: this watcher fell behind",
        attributes={"missed": str(count)},
    )


class Subscription:
    """One watcher's filtered, bounded queue of events (made by `EventBus.subscribe`)."""

    def __init__(
        self, bus: EventBus, zones: frozenset[str], kinds: frozenset[int], bound: int
    ) -> None:
        self._bus = bus
        self._zones = zones
        self._kinds = kinds
        self._bound = bound
        self._queue: deque[BusEvent] = deque()
        self._missed = 0
        self._ended = False
        self._cond = threading.Condition()

    def matches(self, event: BusEvent) -> bool:
        return (not self._zones or event.zone in self._zones) and (
            not self._kinds or event.kind in self._kinds
        )

    @property
    def pending(self) -> int:
        """Events queued and not yet taken (never more than the bound)."""
        with self._cond:
            return len(self._queue)

    @property
    def ended(self) -> bool:
        """Closed, or the bus closed and everything queued has been taken."""
        with self._cond:
            return self._ended and not self._queue and not self._missed

    def offer(self, event: BusEvent) -> None:
        """Queue an event, dropping the oldest when full (called by the bus, in seq order)."""
        with self._cond:
            if self._ended:
                return
            if len(self._queue) == self._bound:
                self._queue.popleft()
                self._missed += 1
            self._queue.append(event)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> BusEvent | None:
        """The next event (a "missed N" event first if some were dropped); None once `ended`
        or when `timeout` seconds pass with nothing to take."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._missed or self._ended, timeout)
            if self._missed:
                missed, self._missed = self._missed, 0
                return _missed_event(missed)
            return self._queue.popleft() if self._queue else None

    def close(self) -> None:
        """Unsubscribe and drop whatever is queued; a blocked `get` returns None."""
        self._bus.unsubscribe(self)
        with self._cond:
            self._queue.clear()
            self._missed = 0
            self.end()

    def end(self) -> None:
        """Take no more events; `get` returns what is queued, then None."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def __iter__(self) -> Iterator[BusEvent]:
        while (event := self.get()) is not None:
            yield event


class EventBus:
    """Fans published events out to watchers; safe to use from any thread."""

    def __init__(
        self, history: int = DEFAULT_HISTORY, queue_size: int = DEFAULT_QUEUE_SIZE
    ) -> None:
        if history < 1 or queue_size < 1:
            raise ValueError("history and queue_size must be at least 1")
        self._queue_size = queue_size
        self._lock = threading.Lock()
        self._seq = 0
        self._history: deque[BusEvent] = deque(maxlen=history)
        self._subscribers: list[Subscription] = []
        self._closed = False

    def publish(self, zone: str, kind: EventKind, message: str, /, **attributes: object) -> int:
        """Record an event and hand it to every matching watcher; returns its seq. Attribute
        values are stringified. Never blocks on watchers (their queues drop instead)."""
        attrs = {key: str(value) for key, value in attributes.items()}
        now = time.time_ns()
        with self._lock:
            self._seq += 1
            event = BusEvent(self._seq, now, zone, kind, message, attrs)
            self._history.append(event)
            for sub in self._subscribers:
                if sub.matches(event):
                    sub.offer(event)
            return event.seq

    def subscribe(
        self, zones: Iterable[str] = (), kinds: Iterable[int] = (), replay: bool = False
    ) -> Subscription:
        """A watcher of events in `zones` of `kinds` (empty: all). With `replay` its queue
        starts with the matching recent events, with no gap or repeat before live ones. On a
        closed bus the subscription is already ended."""
        sub = Subscription(self, frozenset(zones), frozenset(kinds), self._queue_size)
        with self._lock:
            if self._closed:
                sub.end()
                return sub
            if replay:
                for event in self._history:
                    if sub.matches(event):
                        sub.offer(event)
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    def recent(self) -> list[BusEvent]:
        """The replay ring, oldest first (at most `history` events)."""
        with self._lock:
            return list(self._history)

    def backlogs(self) -> list[int]:
        """Each watcher's queued event count: how far behind it is (never above queue_size)."""
        with self._lock:
            return [sub.pending for sub in self._subscribers]

    @property
    def subscriber_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def close(self) -> None:
        """End every watcher's stream after its queued events; later publishes only go into
        the replay ring."""
        with self._lock:
            self._closed = True
            subscribers, self._subscribers = self._subscribers, []
        for sub in subscribers:
            sub.end()


class ZoneEventsService:
    """The vgpu.events.v1.ZoneEvents servicer; each open Watch holds one server thread."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus

    def Watch(
        self, request: events_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[events_pb2.Event]:
        sub = self._bus.subscribe(request.zones, request.kinds, request.replay)
        try:
            # Client cancel, deadline or server stop: close() wakes the blocked get().
            if not context.add_callback(sub.close):
                return
            for event in sub:
                yield event.to_proto()
        finally:
            sub.close()


def serve_events(bus: EventBus, address: str, *, max_watchers: int = 16) -> grpc.Server:
    """Start a gRPC server for `bus` on `address` ("unix:///path" or "host:port"); watchers
    beyond `max_watchers` are refused with RESOURCE_EXHAUSTED rather than queued forever.
    Raises RuntimeError if the address cannot be bound."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_watchers, thread_name_prefix="zone-events"),
        maximum_concurrent_rpcs=max_watchers,
    )
    events_pb2_grpc.add_ZoneEventsServicer_to_server(ZoneEventsService(bus), server)
    server.add_insecure_port(address)
    server.start()
    return server
