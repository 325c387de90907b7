"""Per-zone object model: the handles a zone may name, and the device memory it may touch.

Every id or pointer a zone sends is resolved here, in that zone's own tables, before the
backend sees it. A zone therefore can only name its own objects: another zone's id, a freed
id, or an id of the wrong kind is CUDA_ERROR_INVALID_HANDLE, and a pointer range outside one
of its live allocations is CUDA_ERROR_INVALID_VALUE.
"""

from __future__ import annotations

import secrets
import threading
import weakref
from bisect import bisect_right, insort
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from gpu_proxy.errors import InvalidHandle, InvalidValue, OutOfMemory

T = TypeVar("T")

U64_LIMIT = 1 << 64
_TAG_BITS = 16
_SERIAL_BITS = 64 - _TAG_BITS


class HandleKind(StrEnum):
    """The handle kinds the call table may use (idm.calltable.HANDLE_KINDS, by value)."""

    CONTEXT = "context"
    MODULE = "module"
    FUNCTION = "function"
    STREAM = "stream"
    EVENT = "event"
    LIBRARY = "library"
    KERNEL = "kernel"
    GRAPH = "graph"
    GRAPH_EXEC = "graph_exec"
    GRAPH_NODE = "graph_node"
    ARRAY = "array"
    MIPMAPPED_ARRAY = "mipmapped_array"
    MEMORY_POOL = "memory_pool"
    LINK_STATE = "link_state"
    GREEN_CTX = "green_ctx"


# Teardown order: what depends on an object goes before it. Executable graphs reference
# functions, graphs, arrays and run on streams; graph nodes live in graphs; functions/kernels
# in modules/libraries; level arrays in mipmapped arrays; streams may belong to green contexts;
# everything lives in a context, so contexts go last. Device memory (DeviceAllocations) also
# belongs to a context: the caller frees it before destroying the CONTEXT entries.
TEARDOWN_ORDER: tuple[HandleKind, ...] = (
    HandleKind.GRAPH_EXEC,
    HandleKind.GRAPH_NODE,
    HandleKind.GRAPH,
    HandleKind.LINK_STATE,
    HandleKind.FUNCTION,
    HandleKind.KERNEL,
    HandleKind.EVENT,
    HandleKind.STREAM,
    HandleKind.MODULE,
    HandleKind.LIBRARY,
    HandleKind.ARRAY,
    HandleKind.MIPMAPPED_ARRAY,
    HandleKind.MEMORY_POOL,
    HandleKind.GREEN_CTX,
    HandleKind.CONTEXT,
)
_RANK = {kind: i for i, kind in enumerate(TEARDOWN_ORDER)}


class _TagPool:
    """Gives each live HandleTable a distinct random tag for the top bits of its ids, so an id
    can never resolve in another zone's table, even if a routing bug looked it up there. The
    tag is random, not the zone's number: it tells a zone nothing about other zones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[int] = set()

    def take(self) -> int:
        with self._lock:
            if len(self._live) >= 1 << _TAG_BITS:
                raise RuntimeError("too many live handle tables")
            while True:
                tag = secrets.randbits(_TAG_BITS)
                if tag not in self._live:
                    self._live.add(tag)
                    return tag

    def give_back(self, tag: int) -> None:
        with self._lock:
            self._live.discard(tag)


_TAGS = _TagPool()


@dataclass
class _Entry(Generic[T]):
    kind: HandleKind
    obj: T
    children: set[int] = field(default_factory=set)
    parent: int | None = None


class HandleTable(Generic[T]):
    """One zone's handles: opaque u64 ids on the wire, mapped to backend objects.

    Ids are `tag << 48 | serial`: the serial only grows, so an id is never reused while the
    table lives (a stale id cannot alias a newer object), and the per-table tag keeps the ids
    of different zones disjoint. Ids are never 0, which CUDA reserves for NULL.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry[T]] = {}
        self._tag = _TAGS.take()
        self._next_serial = 1
        weakref.finalize(self, _TAGS.give_back, self._tag)

    def add(self, kind: HandleKind, obj: T, parent: int | None = None) -> int:
        """Register `obj` and return its new id. `parent` names an object (any kind) whose
        destruction destroys this one too (a module's functions, a library's kernels), so
        `remove` of the parent drops it. Raises InvalidHandle when the parent is gone (the
        caller then destroys `obj`), OutOfMemory when the zone's id space is spent."""
        with self._lock:
            if parent is not None and parent not in self._entries:
                raise InvalidHandle(f"parent handle {parent:#x} not found")
            if self._next_serial >= 1 << _SERIAL_BITS:
                raise OutOfMemory("handle ids exhausted for this zone")
            handle = self._tag << _SERIAL_BITS | self._next_serial
            self._next_serial += 1
            self._entries[handle] = _Entry(kind, obj, parent=parent)
            if parent is not None:
                self._entries[parent].children.add(handle)
            return handle

    def get(self, kind: HandleKind, handle: int) -> T:
        """The object behind `handle`; InvalidHandle for NULL, unknown ids and other kinds."""
        with self._lock:
            return self._lookup(kind, handle).obj

    def get_optional(self, kind: HandleKind, handle: int) -> T | None:
        """As `get`, but NULL means None: for arguments where CUDA gives NULL a meaning (the
        default stream, the current context)."""
        return None if handle == 0 else self.get(kind, handle)

    def remove(self, kind: HandleKind, handle: int) -> T:
        """Forget `handle` and the objects that depend on it (see `add`); return its object
        for the backend to destroy."""
        with self._lock:
            entry = self._lookup(kind, handle)
            if entry.parent is not None:
                self._entries[entry.parent].children.discard(handle)
            self._forget(handle)
            return entry.obj

    def counts(self) -> dict[HandleKind, int]:
        """Live handles per kind (every kind present), for the handle-count metrics."""
        with self._lock:
            counts = dict.fromkeys(HandleKind, 0)
            for entry in self._entries.values():
                counts[entry.kind] += 1
            return counts

    def drain(self) -> list[tuple[HandleKind, int, T]]:
        """Empty the table at zone teardown; return everything it held, dependents before what
        they depend on (TEARDOWN_ORDER; newest first within a kind), for the backend to
        reclaim in that order."""
        with self._lock:
            held = [(e.kind, h, e.obj) for h, e in self._entries.items()]
            self._entries.clear()
        held.sort(key=lambda item: (_RANK[item[0]], -item[1]))
        return held

    def _lookup(self, kind: HandleKind, handle: int) -> _Entry[T]:
        entry = self._entries.get(handle)
        if entry is None or entry.kind is not kind:
            raise InvalidHandle(f"no {kind} handle {handle:#x} in this zone")
        return entry

    def _forget(self, handle: int) -> None:
        entry = self._entries.pop(handle)
        for child in entry.children:
            self._forget(child)


class DeviceAllocations:
    """One zone's live device allocations, as sorted (base, size) intervals.

    Backends allocate in one address space for all zones, so a raw pointer from a zone is
    trusted only once `check_range` has placed the whole range inside one allocation of that
    zone: this is what keeps a zone's memcpy/memset/launch away from other zones' memory.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bases: list[int] = []
        self._sizes: dict[int, int] = {}
        self._owners: dict[int, int] = {}  # base -> module handle, for modules' variables

    def add(self, base: int, size: int, owner: int | None = None) -> None:
        """Record an allocation the backend just made; `owner` names the module whose variable
        it is (not freeable by cuMemFree, gone with the module). An overlap means the backend
        and this table disagree, which is a proxy bug, so it raises ValueError rather than a
        CUresult."""
        if base <= 0 or size <= 0 or base + size > U64_LIMIT:
            raise ValueError(f"bad allocation [{base:#x}, +{size:#x})")
        with self._lock:
            i = bisect_right(self._bases, base)
            prev_end = self._bases[i - 1] + self._sizes[self._bases[i - 1]] if i else 0
            next_base = self._bases[i] if i < len(self._bases) else U64_LIMIT
            if prev_end > base or base + size > next_base:
                raise ValueError(f"allocation [{base:#x}, +{size:#x}) overlaps a live one")
            insort(self._bases, base)
            self._sizes[base] = size
            if owner is not None:
                self._owners[base] = owner

    def remove(self, base: int) -> int:
        """Forget the allocation starting at `base` (cuMemFree) and return its size; anything
        but the base of a live allocation (a module's variable included) is InvalidValue, as in
        CUDA."""
        with self._lock:
            if base in self._owners or base not in self._sizes:
                raise InvalidValue(f"{base:#x} is not a live allocation of this zone")
            return self._forget(base)

    def remove_owned(self, owner: int) -> int:
        """Forget every variable of module `owner` (unloaded); returns their total size."""
        with self._lock:
            bases = [base for base, o in self._owners.items() if o == owner]
            return sum(self._forget(base) for base in bases)

    def _forget(self, base: int) -> int:
        self._owners.pop(base, None)
        del self._bases[bisect_right(self._bases, base) - 1]
        return self._sizes.pop(base)

    def check_range(self, ptr: int, length: int) -> tuple[int, int]:
        """(base, offset) of the one allocation holding all of [ptr, ptr + length); else
        InvalidValue. Length 0 is allowed at a pointer inside an allocation."""
        if not (0 <= ptr < U64_LIMIT and 0 <= length < U64_LIMIT):
            raise InvalidValue(f"range {ptr:#x}+{length:#x} is not a pair of u64")
        with self._lock:
            i = bisect_right(self._bases, ptr) - 1
            if i >= 0:
                base = self._bases[i]
                end = base + self._sizes[base]
                if ptr < end and ptr + length <= end:
                    return base, ptr - base
        raise InvalidValue(f"range {ptr:#x}+{length:#x} is not inside one allocation of this zone")

    def drain(self) -> list[tuple[int, int]]:
        """Empty the table at zone teardown; return the (base, size) pairs still allocated
        (modules' variables are not: they go with their modules)."""
        with self._lock:
            held = [(base, self._sizes[base]) for base in self._bases if base not in self._owners]
            self._bases.clear()
            self._sizes.clear()
            self._owners.clear()
            return held

    def __len__(self) -> int:
        with self._lock:
            return len(self._bases)
