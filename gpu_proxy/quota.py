"""The device-memory ledger: one for the whole proxy, so every zone's quota and the one GPU's
capacity are checked together, under one lock, before the backend allocates anything."""

from __future__ import annotations

import threading
from typing import Annotated

import structlog
from pydantic import Field, TypeAdapter

from gpu_proxy.errors import InvalidValue, OutOfMemory

_log = structlog.get_logger(__name__)

_POSITIVE_BYTES: TypeAdapter[int] = TypeAdapter(Annotated[int, Field(strict=True, gt=0)])


class MemoryLedger:
    """Per-zone limits and usage against one device's capacity.

    Callers `reserve` before the backend allocates and `release` after it frees (or when the
    allocation failed), so check and record are one atomic step: two zones, or two threads of
    one zone, cannot both pass a check that only one of them fits. `device_total` is the bytes
    the proxy may hand out, which configuration may set below the physical size for headroom.
    """

    def __init__(self, device_total: int) -> None:
        self._device_total = _POSITIVE_BYTES.validate_python(device_total)
        self._lock = threading.Lock()
        self._limits: dict[str, int] = {}
        self._used: dict[str, int] = {}

    def set_limit(self, zone: str, limit: int) -> int:
        """Set (or create) `zone`'s limit and return the limit in force: a limit larger than the
        device is clamped to it. Lowering a limit below current usage keeps the memory already
        held but refuses new reservations until usage drops under it."""
        limit = _POSITIVE_BYTES.validate_python(limit)
        if limit > self._device_total:
            _log.warning(
                "memory limit clamped to device",
                zone=zone,
                requested=limit,
                device_total=self._device_total,
            )
            limit = self._device_total
        with self._lock:
            self._limits[zone] = limit
            self._used.setdefault(zone, 0)
        return limit

    def reserve(self, zone: str, nbytes: int) -> None:
        """Charge `nbytes` to `zone`, or raise OutOfMemory if that would pass its limit or the
        device's capacity. KeyError for a zone without a limit (a proxy bug, not zone input)."""
        if nbytes <= 0:
            raise InvalidValue(f"cannot reserve {nbytes} bytes")
        with self._lock:
            limit, used = self._limits[zone], self._used[zone]
            if used + nbytes > limit:
                raise OutOfMemory(f"zone {zone}: {nbytes} bytes would pass its limit {limit}")
            if self._device_used() + nbytes > self._device_total:
                raise OutOfMemory(f"zone {zone}: {nbytes} bytes do not fit on the device")
            self._used[zone] = used + nbytes

    def release(self, zone: str, nbytes: int) -> None:
        """Return `nbytes` that `zone` reserved. Releasing more than it holds is a proxy bug
        (ValueError): usage never goes negative."""
        with self._lock:
            used = self._used[zone]
            if not 0 < nbytes <= used:
                raise ValueError(f"zone {zone} releases {nbytes} bytes but holds {used}")
            self._used[zone] = used - nbytes

    def mem_info(self, zone: str) -> tuple[int, int]:
        """(free, total) for the zone's cuMemGetInfo: its quota, never more than the device."""
        with self._lock:
            limit, used = self._limits[zone], self._used[zone]
            device_free = self._device_total - self._device_used()
            return max(0, min(limit - used, device_free)), min(limit, self._device_total)

    def usage(self, zone: str) -> tuple[int, int]:
        """(used, limit) of a zone, for the memory metrics."""
        with self._lock:
            return self._used[zone], self._limits[zone]

    def remove_zone(self, zone: str) -> int:
        """Drop a torn-down zone; return the bytes it still held (reclaimed memory)."""
        with self._lock:
            del self._limits[zone]
            return self._used.pop(zone)

    def _device_used(self) -> int:
        return sum(self._used.values())
