"""Everything gpu-proxy holds for one zone, and how all of it is given back.

A zone has exactly one backend context (the GPU's MMU separates contexts; no sharing across
zones), one handle table, its device allocations and its share of the memory ledger. Several
channels (one per guest process) may serve one zone concurrently: the tables and the ledger are
thread-safe, and each channel keeps its own deferred error (``Caller``), as each CUDA process
has its own.
"""

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from gpu_proxy.backends.base import Context, GpuBackend
from gpu_proxy.handles import DeviceAllocations, HandleKind, HandleTable
from gpu_proxy.module_cache import ModuleImageCache
from gpu_proxy.quota import MemoryLedger
from gpu_proxy.shared_host import SharedHostMemory
from gpu_proxy.telemetry.events import EventBus, EventKind
from gpu_proxy.telemetry.zone_stats import ZoneIdentity, ZoneStats

log = structlog.get_logger(__name__)


class Zone:
    """Also the telemetry collector's view of a zone (identity, stats, memory, handle counts):
    its series are read from these live tables, so they vanish with the zone."""

    def __init__(
        self,
        identity: ZoneIdentity,
        backend: GpuBackend,
        ledger: MemoryLedger,
        limit: int,
        bus: EventBus,
        images: ModuleImageCache,
    ) -> None:
        self.id = identity.zone
        self.identity = identity
        self.stats = ZoneStats()
        self.bus = bus
        zone_id = self.id
        self.backend = backend
        self.images = images  # module images this zone sent, answered by digest
        self.ledger = ledger
        self.memory_limit = ledger.set_limit(zone_id, limit)
        self.handles: HandleTable[Any] = HandleTable()
        self.allocations = DeviceAllocations()
        self.context: Context = backend.create_context()
        self.context_handle = self.handles.add(HandleKind.CONTEXT, self.context)
        self._closed = False
        self._lock = threading.Lock()

    def memory(self) -> tuple[int, int]:
        return self.ledger.usage(self.id)

    def handle_counts(self) -> dict[str, int]:
        return {kind.value: n for kind, n in self.handles.counts().items()}

    def teardown(self) -> Counter[str]:
        """Release everything the zone still holds, children before parents; returns what was
        reclaimed by kind (device memory as "device_memory", in allocations)."""
        with self._lock:
            if self._closed:
                return Counter()
            self._closed = True
        self.images.forget_zone(self.id)
        reclaimed: Counter[str] = Counter()
        release = {
            HandleKind.FUNCTION: lambda obj: None,  # goes with its module
            HandleKind.MODULE: lambda obj: self.backend.module_unload(self.context, obj),
            HandleKind.STREAM: lambda obj: self.backend.stream_destroy(self.context, obj),
            HandleKind.EVENT: lambda obj: self.backend.event_destroy(self.context, obj),
        }
        for kind, _handle, obj in self.handles.drain():
            if kind == HandleKind.CONTEXT:
                continue  # destroyed last, after the memory that lives in it
            release.get(kind, lambda obj: None)(obj)
            reclaimed[kind.value] += 1
        for base, _size in self.allocations.drain():
            self.backend.mem_free(self.context, base)
            reclaimed["device_memory"] += 1
        self.backend.destroy_context(self.context)
        held = self.ledger.remove_zone(self.id)
        self.stats.record_reclaimed(reclaimed)
        log.info("zone torn down", zone=self.id, reclaimed=dict(reclaimed), bytes=held)
        if reclaimed:
            attrs = {kind: str(n) for kind, n in reclaimed.items()}
            self.bus.publish(self.id, EventKind.HANDLES_RECLAIMED, "zone torn down", **attrs)
        return reclaimed


@dataclass
class Caller:
    """One channel's view of its zone: the state a CUDA process has of its own."""

    zone: Zone
    # The first error of a fire-and-forget call, reported by the next sync call (CUDA's
    # asynchronous error semantics).
    deferred_error: int = 0
    # Host-function marks (vgpuHostFuncMark): libvgpu's mark -> the backend event recorded there.
    host_marks: dict[int, Any] = field(default_factory=dict)
    # Pinned host memory the process shared (LocalLink only): unmapped when the channel closes.
    shared: SharedHostMemory = field(default_factory=lambda: SharedHostMemory(None))
