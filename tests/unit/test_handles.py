"""Per-zone handle tables and allocation ranges: a zone resolves only its own live objects of
the right kind, and only pointer ranges inside one of its own allocations."""

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_proxy import handles
from gpu_proxy.errors import (
    CUDA_ERROR_INVALID_HANDLE,
    CUDA_ERROR_INVALID_VALUE,
    InvalidHandle,
    InvalidValue,
    OutOfMemory,
)
from gpu_proxy.handles import (
    TEARDOWN_ORDER,
    U64_LIMIT,
    DeviceAllocations,
    HandleKind,
    HandleTable,
)
from idm.calltable import HANDLE_KINDS, load_call_table

KINDS = list(HandleKind)


def test_kinds_match_the_call_table() -> None:
    assert {str(k) for k in HandleKind} == HANDLE_KINDS
    assert set(load_call_table().handles.values()) <= HANDLE_KINDS
    assert set(TEARDOWN_ORDER) == set(HandleKind)


def test_add_returns_distinct_nonzero_u64_ids() -> None:
    table: HandleTable[str] = HandleTable()
    ids = [table.add(kind, f"obj{i}") for i, kind in enumerate(KINDS * 3)]
    assert len(set(ids)) == len(ids)
    assert all(0 < h < U64_LIMIT for h in ids)


def test_get_returns_the_object_of_that_id() -> None:
    table: HandleTable[str] = HandleTable()
    a = table.add(HandleKind.STREAM, "s1")
    b = table.add(HandleKind.STREAM, "s2")
    assert (table.get(HandleKind.STREAM, a), table.get(HandleKind.STREAM, b)) == ("s1", "s2")


def test_unknown_id_is_invalid_handle_400() -> None:
    table: HandleTable[str] = HandleTable()
    table.add(HandleKind.EVENT, "e")
    with pytest.raises(InvalidHandle) as err:
        table.get(HandleKind.EVENT, 12345)
    assert err.value.result == CUDA_ERROR_INVALID_HANDLE == 400


def test_null_id_is_invalid_handle_unless_optional() -> None:
    table: HandleTable[str] = HandleTable()
    with pytest.raises(InvalidHandle):
        table.get(HandleKind.CONTEXT, 0)
    assert table.get_optional(HandleKind.STREAM, 0) is None
    s = table.add(HandleKind.STREAM, "s")
    assert table.get_optional(HandleKind.STREAM, s) == "s"
    with pytest.raises(InvalidHandle):
        table.get_optional(HandleKind.STREAM, s + 1)


def test_id_of_another_kind_does_not_resolve() -> None:
    table: HandleTable[str] = HandleTable()
    module = table.add(HandleKind.MODULE, "m")
    for kind in KINDS:
        if kind is not HandleKind.MODULE:
            with pytest.raises(InvalidHandle):
                table.get(kind, module)
            with pytest.raises(InvalidHandle):
                table.remove(kind, module)
    assert table.get(HandleKind.MODULE, module) == "m"


def test_another_zones_id_is_not_found() -> None:
    zone_a: HandleTable[str] = HandleTable()
    zone_b: HandleTable[str] = HandleTable()
    a_ctx = zone_a.add(HandleKind.CONTEXT, "a")
    zone_b.add(HandleKind.CONTEXT, "b")
    with pytest.raises(InvalidHandle):
        zone_b.get(HandleKind.CONTEXT, a_ctx)


def test_removed_id_is_invalid_and_never_reused() -> None:
    table: HandleTable[str] = HandleTable()
    old = table.add(HandleKind.EVENT, "e")
    assert table.remove(HandleKind.EVENT, old) == "e"
    with pytest.raises(InvalidHandle):
        table.get(HandleKind.EVENT, old)
    with pytest.raises(InvalidHandle):
        table.remove(HandleKind.EVENT, old)
    fresh = {table.add(HandleKind.EVENT, "again") for _ in range(100)}
    assert old not in fresh


def test_remove_drops_dependents_with_their_parent() -> None:
    table: HandleTable[str] = HandleTable()
    ctx = table.add(HandleKind.CONTEXT, "ctx")
    module = table.add(HandleKind.MODULE, "m", parent=ctx)
    f1 = table.add(HandleKind.FUNCTION, "f1", parent=module)
    f2 = table.add(HandleKind.FUNCTION, "f2", parent=module)
    table.remove(HandleKind.FUNCTION, f2)
    assert table.remove(HandleKind.MODULE, module) == "m"
    with pytest.raises(InvalidHandle):
        table.get(HandleKind.FUNCTION, f1)
    assert table.get(HandleKind.CONTEXT, ctx) == "ctx"
    assert sum(table.counts().values()) == 1


def test_add_with_a_dead_parent_is_refused() -> None:
    table: HandleTable[str] = HandleTable()
    lib = table.add(HandleKind.LIBRARY, "lib")
    table.remove(HandleKind.LIBRARY, lib)
    with pytest.raises(InvalidHandle):
        table.add(HandleKind.KERNEL, "k", parent=lib)
    assert sum(table.counts().values()) == 0


def test_exhausted_id_space_is_out_of_memory() -> None:
    table: HandleTable[str] = HandleTable()
    # Reaching 2**48 serials by adding would take days; start the counter at its last value.
    table._next_serial = (1 << 48) - 1
    last = table.add(HandleKind.EVENT, "last")
    with pytest.raises(OutOfMemory):
        table.add(HandleKind.EVENT, "one too many")
    assert table.get(HandleKind.EVENT, last) == "last"


def test_live_tables_have_distinct_tags_given_back_when_dropped() -> None:
    tables: list[HandleTable[str]] = [HandleTable() for _ in range(300)]
    tops = {t.add(HandleKind.CONTEXT, "c") >> 48 for t in tables}
    assert len(tops) == len(tables)
    live_before = len(handles._TAGS._live)
    del tables
    assert len(handles._TAGS._live) == live_before - 300


def test_counts_cover_every_kind() -> None:
    table: HandleTable[str] = HandleTable()
    table.add(HandleKind.STREAM, "s1")
    table.add(HandleKind.STREAM, "s2")
    e = table.add(HandleKind.EVENT, "e")
    table.remove(HandleKind.EVENT, e)
    counts = table.counts()
    assert counts == {kind: 2 if kind is HandleKind.STREAM else 0 for kind in KINDS}


def test_drain_returns_everything_children_before_parents_and_empties() -> None:
    table: HandleTable[str] = HandleTable()
    added = {kind: table.add(kind, str(kind)) for kind in KINDS}  # parents first
    drained = table.drain()
    assert sorted((k, h) for k, h, _ in drained) == sorted(added.items())
    order = [k for k, _, _ in drained]
    for child, parent in [
        (HandleKind.FUNCTION, HandleKind.MODULE),
        (HandleKind.KERNEL, HandleKind.LIBRARY),
        (HandleKind.EVENT, HandleKind.CONTEXT),
        (HandleKind.STREAM, HandleKind.CONTEXT),
        (HandleKind.MODULE, HandleKind.CONTEXT),
        (HandleKind.GRAPH_EXEC, HandleKind.GRAPH),
        (HandleKind.GRAPH_EXEC, HandleKind.STREAM),
        (HandleKind.GRAPH_NODE, HandleKind.GRAPH),
        (HandleKind.ARRAY, HandleKind.MIPMAPPED_ARRAY),
        (HandleKind.STREAM, HandleKind.GREEN_CTX),
        (HandleKind.GREEN_CTX, HandleKind.CONTEXT),
    ]:
        assert order.index(child) < order.index(parent), (child, parent)
    assert sum(table.counts().values()) == 0
    assert table.drain() == []


def test_concurrent_adds_get_distinct_ids() -> None:
    table: HandleTable[int] = HandleTable()
    got: list[list[int]] = [[] for _ in range(8)]

    def worker(n: int) -> None:
        got[n] = [table.add(HandleKind.EVENT, n) for _ in range(2000)]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [h for ids in got for h in ids]
    assert len(set(flat)) == len(flat) == 16_000
    assert all(table.get(HandleKind.EVENT, h) == n for n, ids in enumerate(got) for h in ids)


# (zone, action, kind, pick): pick chooses which of that zone's live ids to remove.
_ops = st.lists(
    st.tuples(
        st.sampled_from("AB"),
        st.sampled_from(["add", "remove"]),
        st.sampled_from(KINDS),
        st.integers(min_value=0, max_value=50),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops)
def test_ids_never_resolve_in_the_other_zone_or_as_another_kind(
    ops: list[tuple[str, str, HandleKind, int]],
) -> None:
    tables: dict[str, HandleTable[str]] = {"A": HandleTable(), "B": HandleTable()}
    live: dict[str, dict[int, HandleKind]] = {"A": {}, "B": {}}
    ever: dict[str, set[int]] = {"A": set(), "B": set()}
    for zone, action, kind, pick in ops:
        if action == "add":
            h = tables[zone].add(kind, zone)
            assert h not in ever[zone]
            live[zone][h] = kind
            ever[zone].add(h)
        elif live[zone]:
            h = sorted(live[zone])[pick % len(live[zone])]
            assert tables[zone].remove(live[zone].pop(h), h) == zone
    for zone, other in [("A", "B"), ("B", "A")]:
        for h in ever[zone]:
            for kind in KINDS:
                with pytest.raises(InvalidHandle):
                    tables[other].get(kind, h)
                if live[zone].get(h) is kind:
                    assert tables[zone].get(kind, h) == zone
                else:
                    with pytest.raises(InvalidHandle):
                        tables[zone].get(kind, h)


def test_check_range_accepts_ranges_inside_one_allocation() -> None:
    mem = DeviceAllocations()
    mem.add(0x1000, 0x100)
    assert mem.check_range(0x1000, 0x100) == (0x1000, 0)
    assert mem.check_range(0x1010, 0x20) == (0x1000, 0x10)
    assert mem.check_range(0x10FF, 1) == (0x1000, 0xFF)


def test_check_range_allows_length_zero_only_at_a_valid_pointer() -> None:
    mem = DeviceAllocations()
    mem.add(0x1000, 0x100)
    assert mem.check_range(0x1080, 0) == (0x1000, 0x80)
    for ptr in (0, 0xFFF, 0x1100):
        with pytest.raises(InvalidValue):
            mem.check_range(ptr, 0)


def test_check_range_rejects_ranges_past_the_end_or_spanning_two_allocations() -> None:
    mem = DeviceAllocations()
    mem.add(0x1000, 0x100)
    mem.add(0x1100, 0x100)  # adjacent: a range across both still touches two objects
    for ptr, length in [(0x1000, 0x101), (0x10F0, 0x20), (0x0FFF, 2), (0x1200, 1)]:
        with pytest.raises(InvalidValue) as err:
            mem.check_range(ptr, length)
        assert err.value.result == CUDA_ERROR_INVALID_VALUE == 1


def test_check_range_rejects_overflow_and_non_u64() -> None:
    mem = DeviceAllocations()
    top = U64_LIMIT - 0x1000
    mem.add(top, 0x1000)
    assert mem.check_range(U64_LIMIT - 1, 1) == (top, 0xFFF)
    for ptr, length in [(top + 1, U64_LIMIT - 1), (top, 0x1001), (-1, 1), (top, -1)]:
        with pytest.raises(InvalidValue):
            mem.check_range(ptr, length)


def test_freed_allocation_no_longer_checks_and_free_needs_the_base() -> None:
    mem = DeviceAllocations()
    mem.add(0x1000, 0x100)
    with pytest.raises(InvalidValue):
        mem.remove(0x1001)
    assert mem.remove(0x1000) == 0x100
    with pytest.raises(InvalidValue):
        mem.check_range(0x1000, 1)
    with pytest.raises(InvalidValue):
        mem.remove(0x1000)
    assert len(mem) == 0


def test_overlapping_or_bad_allocation_from_backend_is_a_bug() -> None:
    mem = DeviceAllocations()
    mem.add(0x1000, 0x100)
    for base, size in [(0x10FF, 0x10), (0x0F00, 0x101), (0x1000, 1), (0, 1), (0x5000, 0)]:
        with pytest.raises(ValueError):
            mem.add(base, size)
    assert len(mem) == 1


def test_allocations_drain_returns_all_and_empties() -> None:
    mem = DeviceAllocations()
    mem.add(0x3000, 0x10)
    mem.add(0x1000, 0x20)
    assert mem.drain() == [(0x1000, 0x20), (0x3000, 0x10)]
    assert len(mem) == 0
    with pytest.raises(InvalidValue):
        mem.check_range(0x1000, 1)


# Small address space (slots of 16 bytes) so random probes often hit edges.
_alloc_ops = st.lists(
    st.tuples(
        st.booleans(),
        st.integers(min_value=1, max_value=30),
        st.integers(min_value=1, max_value=40),
    ),
    max_size=40,
)
_probes = st.lists(
    st.tuples(st.integers(min_value=0, max_value=700), st.integers(min_value=0, max_value=80)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=_alloc_ops, probes=_probes)
def test_check_range_matches_brute_force_model(
    ops: list[tuple[bool, int, int]], probes: list[tuple[int, int]]
) -> None:
    mem = DeviceAllocations()
    model: dict[int, int] = {}  # base -> size
    for alloc, slot, size in ops:
        base = slot * 16
        if alloc:
            fits = all(base + size <= b or b + s <= base for b, s in model.items())
            if fits:
                mem.add(base, size)
                model[base] = size
            else:
                with pytest.raises(ValueError):
                    mem.add(base, size)
        elif base in model:
            assert mem.remove(base) == model.pop(base)
        else:
            with pytest.raises(InvalidValue):
                mem.remove(base)
    # Each live allocation's edges: just before, at and past its start and end.
    edges = [
        (ptr, end - ptr + extra)
        for b, s in model.items()
        for ptr, end in [(b - 1, b + s), (b, b + s), (b + s - 1, b + s), (b + s, b + s)]
        for extra in (-1, 0, 1)
        if end - ptr + extra >= 0
    ]
    for ptr, length in probes + edges:
        owners = [b for b, s in model.items() if b <= ptr < b + s and ptr + length <= b + s]
        if owners:
            assert mem.check_range(ptr, length) == (owners[0], ptr - owners[0])
        else:
            with pytest.raises(InvalidValue):
                mem.check_range(ptr, length)
    assert len(mem) == len(model)
