"""cuMemFreeAsync in gpu-proxy: the zone loses the address at once, and the memory returns to its
quota only when the stream reaches the free (work queued before it still has the memory)."""

import threading
from collections.abc import Iterator

import pytest

from gpu_proxy.backends.sim import SimStream
from gpu_proxy.dispatch import HANDLERS
from gpu_proxy.errors import InvalidValue
from gpu_proxy.handles import HandleKind
from gpu_proxy.zone import Caller
from idm.gen import codec as c
from tests.unit.proxy_zone import sim_caller


@pytest.fixture
def caller() -> Iterator[Caller]:
    with sim_caller(1 << 20) as caller:
        yield caller


def test_quota_returns_when_the_stream_reaches_the_free(caller: Caller) -> None:
    zone = caller.zone
    alloc = HANDLERS.cuMemAlloc_v2(caller, c.cuMemAlloc_v2_Request(4096))
    stream = HANDLERS.cuStreamCreate(caller, c.cuStreamCreate_Request(0))
    assert isinstance(alloc, c.cuMemAlloc_v2_Reply)
    assert isinstance(stream, c.cuStreamCreate_Reply)
    sim_stream = zone.handles.get(HandleKind.STREAM, stream.phStream)
    assert isinstance(sim_stream, SimStream)
    gate = threading.Event()
    sim_stream.enqueue(lambda: gate.wait(10))
    ptr = alloc.dptr
    assert HANDLERS.cuMemFreeAsync(caller, c.cuMemFreeAsync_Request(ptr, stream.phStream)) == 0
    assert zone.memory()[0] == 4096  # the stream has not reached the free
    with pytest.raises(InvalidValue):  # but the zone can no longer name the memory
        zone.allocations.check_range(ptr, 1)
    with pytest.raises(InvalidValue):
        HANDLERS.cuMemFreeAsync(caller, c.cuMemFreeAsync_Request(ptr, 0))  # twice
    gate.set()
    sim_stream.drain()
    assert zone.memory()[0] == 0


def test_free_async_on_the_legacy_stream_and_of_what_is_not_an_allocation(
    caller: Caller,
) -> None:
    alloc = HANDLERS.cuMemAlloc_v2(caller, c.cuMemAlloc_v2_Request(4096))
    assert isinstance(alloc, c.cuMemAlloc_v2_Reply)
    with pytest.raises(InvalidValue):
        HANDLERS.cuMemFreeAsync(caller, c.cuMemFreeAsync_Request(alloc.dptr + 8, 0))
    assert HANDLERS.cuMemFreeAsync(caller, c.cuMemFreeAsync_Request(alloc.dptr, 0)) == 0
    assert caller.zone.memory()[0] == 0
