"""The memory ledger: no zone passes its limit, all zones together never pass the device, and
cuMemGetInfo answers from the zone's quota, never more than the device."""

import threading

import pytest
import structlog
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)
from pydantic import ValidationError

from gpu_proxy.errors import CUDA_ERROR_OUT_OF_MEMORY, InvalidValue, OutOfMemory
from gpu_proxy.quota import MemoryLedger

GIB = 1 << 30


def test_reserve_within_limit_is_recorded() -> None:
    ledger = MemoryLedger(16 * GIB)
    ledger.set_limit("a", 4 * GIB)
    ledger.reserve("a", GIB)
    ledger.reserve("a", 3 * GIB)
    assert ledger.usage("a") == (4 * GIB, 4 * GIB)


def test_reserve_past_the_zone_limit_is_out_of_memory_and_records_nothing() -> None:
    ledger = MemoryLedger(16 * GIB)
    ledger.set_limit("a", 4 * GIB)
    ledger.reserve("a", 3 * GIB)
    with pytest.raises(OutOfMemory) as err:
        ledger.reserve("a", GIB + 1)
    assert err.value.result == CUDA_ERROR_OUT_OF_MEMORY == 2
    assert ledger.usage("a") == (3 * GIB, 4 * GIB)


def test_reserve_past_the_device_is_out_of_memory_even_within_the_limit() -> None:
    ledger = MemoryLedger(8 * GIB)
    ledger.set_limit("a", 6 * GIB)
    ledger.set_limit("b", 6 * GIB)
    ledger.reserve("a", 5 * GIB)
    with pytest.raises(OutOfMemory):
        ledger.reserve("b", 4 * GIB)
    ledger.reserve("b", 3 * GIB)
    assert ledger.usage("b") == (3 * GIB, 6 * GIB)


def test_nonpositive_reserve_is_invalid_value() -> None:
    ledger = MemoryLedger(GIB)
    ledger.set_limit("a", GIB)
    for n in (0, -1):
        with pytest.raises(InvalidValue):
            ledger.reserve("a", n)
    assert ledger.usage("a") == (0, GIB)


def test_release_frees_room_and_never_goes_negative() -> None:
    ledger = MemoryLedger(4 * GIB)
    ledger.set_limit("a", 2 * GIB)
    ledger.reserve("a", 2 * GIB)
    ledger.release("a", GIB)
    ledger.reserve("a", GIB)
    for n in (2 * GIB + 1, 0):
        with pytest.raises(ValueError):
            ledger.release("a", n)
    assert ledger.usage("a") == (2 * GIB, 2 * GIB)


def test_unknown_zone_is_a_key_error() -> None:
    ledger = MemoryLedger(GIB)
    with pytest.raises(KeyError):
        ledger.reserve("ghost", 1)
    with pytest.raises(KeyError):
        ledger.mem_info("ghost")


def test_mem_info_reports_the_quota() -> None:
    ledger = MemoryLedger(16 * GIB)
    ledger.set_limit("a", 4 * GIB)
    assert ledger.mem_info("a") == (4 * GIB, 4 * GIB)
    ledger.reserve("a", GIB)
    assert ledger.mem_info("a") == (3 * GIB, 4 * GIB)


def test_mem_info_free_is_bounded_by_what_the_device_has_left() -> None:
    ledger = MemoryLedger(8 * GIB)
    ledger.set_limit("a", 8 * GIB)
    ledger.set_limit("b", 8 * GIB)
    ledger.reserve("b", 6 * GIB)
    assert ledger.mem_info("a") == (2 * GIB, 8 * GIB)


def test_limit_above_the_device_is_clamped_with_a_warning() -> None:
    ledger = MemoryLedger(8 * GIB)
    with structlog.testing.capture_logs() as logs:
        assert ledger.set_limit("a", 80 * GIB) == 8 * GIB
    assert ledger.mem_info("a") == (8 * GIB, 8 * GIB)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "memory limit clamped to device"
    ]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "1024", True, None])
def test_limits_and_device_size_must_be_positive_ints(bad: object) -> None:
    with pytest.raises(ValidationError):
        MemoryLedger(bad)  # type: ignore[arg-type]
    ledger = MemoryLedger(GIB)
    with pytest.raises(ValidationError):
        ledger.set_limit("a", bad)  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        ledger.usage("a")


def test_lowered_limit_keeps_usage_but_refuses_new_reservations() -> None:
    ledger = MemoryLedger(8 * GIB)
    ledger.set_limit("a", 4 * GIB)
    ledger.reserve("a", 3 * GIB)
    ledger.set_limit("a", 2 * GIB)
    with pytest.raises(OutOfMemory):
        ledger.reserve("a", 1)
    assert ledger.mem_info("a") == (0, 2 * GIB)
    ledger.release("a", 2 * GIB)
    ledger.reserve("a", GIB)
    assert ledger.usage("a") == (2 * GIB, 2 * GIB)


def test_remove_zone_returns_what_it_held_and_frees_the_device() -> None:
    ledger = MemoryLedger(4 * GIB)
    ledger.set_limit("a", 4 * GIB)
    ledger.set_limit("b", 4 * GIB)
    ledger.reserve("a", 3 * GIB)
    assert ledger.remove_zone("a") == 3 * GIB
    ledger.reserve("b", 4 * GIB)
    with pytest.raises(KeyError):
        ledger.reserve("a", 1)


@pytest.mark.parametrize(("limit", "device"), [(5_000, 16_000), (10_000, 16_000)])
def test_concurrent_reserves_never_over_commit(limit: int, device: int) -> None:
    """Two zones, four threads each: first the zone limits bind, then the device does."""
    ledger = MemoryLedger(device)
    for zone in ("a", "b"):
        ledger.set_limit(zone, limit)
    granted = [0] * 8
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        zone, size = "ab"[n % 2], 1 + n  # odd sizes so the last fits are contested
        start.wait()
        for _ in range(3_000):
            try:
                ledger.reserve(zone, size)
            except OutOfMemory:
                continue
            granted[n] += size

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_zone = {z: sum(g for n, g in enumerate(granted) if "ab"[n % 2] == z) for z in "ab"}
    assert {z: ledger.usage(z)[0] for z in "ab"} == per_zone
    assert all(used <= limit for used in per_zone.values())
    assert sum(per_zone.values()) <= device
    assert sum(per_zone.values()) > min(2 * limit, device) - 8  # contested to the end


class LedgerMachine(RuleBasedStateMachine):
    """Random zones reserving, releasing, changing limits and leaving, against a model."""

    zones = Bundle("zones")

    @initialize(device=st.integers(min_value=1, max_value=1_000))
    def make_ledger(self, device: int) -> None:
        self.device = device
        self.ledger = MemoryLedger(device)
        self.limits: dict[str, int] = {}
        self.used: dict[str, int] = {}
        self.over: set[str] = set()  # zones whose limit was lowered below their usage
        self.serial = 0

    @rule(target=zones, limit=st.integers(min_value=1, max_value=1_500))
    def add_zone(self, limit: int) -> str:
        self.serial += 1
        zone = f"z{self.serial}"
        self.used[zone] = 0
        self.set_limit(zone, limit)
        return zone

    @rule(zone=zones, limit=st.integers(min_value=1, max_value=1_500))
    def set_limit(self, zone: str, limit: int) -> None:
        self.limits[zone] = self.ledger.set_limit(zone, limit)
        assert self.limits[zone] == min(limit, self.device)
        if self.used[zone] > self.limits[zone]:
            self.over.add(zone)

    @rule(zone=zones, nbytes=st.integers(min_value=1, max_value=600))
    def reserve(self, zone: str, nbytes: int) -> None:
        fits = (
            self.used[zone] + nbytes <= self.limits[zone]
            and sum(self.used.values()) + nbytes <= self.device
        )
        if fits:
            self.ledger.reserve(zone, nbytes)
            self.used[zone] += nbytes
        else:
            with pytest.raises(OutOfMemory):
                self.ledger.reserve(zone, nbytes)

    @rule(zone=zones, part=st.integers(min_value=1, max_value=600))
    def release(self, zone: str, part: int) -> None:
        if self.used[zone] == 0:
            return
        nbytes = min(part, self.used[zone])
        self.ledger.release(zone, nbytes)
        self.used[zone] -= nbytes
        if self.used[zone] <= self.limits[zone]:
            self.over.discard(zone)

    @rule(zone=consumes(zones))
    def remove_zone(self, zone: str) -> None:
        assert self.ledger.remove_zone(zone) == self.used.pop(zone)
        del self.limits[zone]
        self.over.discard(zone)

    @invariant()
    def usage_within_limits_and_device(self) -> None:
        total = 0
        for zone, limit in self.limits.items():
            used, ledger_limit = self.ledger.usage(zone)
            assert (used, ledger_limit) == (self.used[zone], limit)
            assert used <= limit or zone in self.over
            total += used
        assert total <= self.device

    @invariant()
    def mem_info_never_exceeds_the_device(self) -> None:
        device_free = self.device - sum(self.used.values())
        for zone, limit in self.limits.items():
            free, total = self.ledger.mem_info(zone)
            assert total == min(limit, self.device) <= self.device
            assert 0 <= free <= device_free
            assert free == max(0, min(limit - self.used[zone], device_free))


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_ledger_state_machine = LedgerMachine.TestCase
