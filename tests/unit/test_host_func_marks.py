"""gpu-proxy's side of host functions: a mark is reached when its stream's earlier work has run,
is forgotten once reported, is bounded per process, and polling it never takes an earlier
fire-and-forget error away from the application."""

import threading
from collections.abc import Iterator

import pytest

from gpu_proxy.backends.sim import SimStream
from gpu_proxy.dispatch import HANDLERS, MAX_HOST_MARKS, call_handlers
from gpu_proxy.errors import CUDA_ERROR_INVALID_VALUE, InvalidHandle, InvalidValue
from gpu_proxy.handles import HandleKind
from gpu_proxy.zone import Caller
from idm.gen import codec as c
from idm.wire import Header
from tests.unit.proxy_zone import sim_caller


@pytest.fixture
def caller() -> Iterator[Caller]:
    with sim_caller(1 << 20) as caller:
        yield caller


def poll(caller: Caller, mark: int) -> int:
    reply = HANDLERS.vgpuHostFuncPoll(caller, c.vgpuHostFuncPoll_Request(mark))
    assert isinstance(reply, c.vgpuHostFuncPoll_Reply)
    return reply.ready


def test_mark_is_reached_after_the_streams_earlier_work(caller: Caller) -> None:
    zone = caller.zone
    handle = HANDLERS.cuStreamCreate(caller, c.cuStreamCreate_Request(0))
    assert isinstance(handle, c.cuStreamCreate_Reply)
    stream = zone.handles.get(HandleKind.STREAM, handle.phStream)
    assert isinstance(stream, SimStream)
    gate = threading.Event()
    stream.enqueue(lambda: gate.wait(10))
    assert HANDLERS.vgpuHostFuncMark(caller, c.vgpuHostFuncMark_Request(handle.phStream, 7)) == 0
    assert poll(caller, 7) == 0  # the work before it has not run
    gate.set()
    stream.drain()
    assert poll(caller, 7) == 1
    with pytest.raises(InvalidHandle):  # reported once, then forgotten
        poll(caller, 7)
    with pytest.raises(InvalidHandle):
        HANDLERS.vgpuHostFuncMark(caller, c.vgpuHostFuncMark_Request(12345, 8))  # no stream


def test_marks_are_bounded_per_process(caller: Caller) -> None:
    for mark in range(MAX_HOST_MARKS):
        HANDLERS.vgpuHostFuncMark(caller, c.vgpuHostFuncMark_Request(0, mark))
    with pytest.raises(InvalidValue):
        HANDLERS.vgpuHostFuncMark(caller, c.vgpuHostFuncMark_Request(0, MAX_HOST_MARKS))
    with pytest.raises(InvalidValue):
        HANDLERS.vgpuHostFuncMark(caller, c.vgpuHostFuncMark_Request(0, 0))  # a duplicate


def test_polling_leaves_an_earlier_fire_and_forget_error_for_the_application(
    caller: Caller,
) -> None:
    handlers = call_handlers(caller)

    def send(name: str, *args: int) -> int | None:
        payload = memoryview(getattr(c, f"encode_{name}_request")(*args))
        opcode = c.CALLS_BY_NAME[name].opcode
        reply = handlers[opcode](Header(0, 0, 0, opcode, len(payload), 0, 0, 0), payload)
        return None if reply is None else reply.status

    assert send("vgpuHostFuncMark", 0, 1) is None
    # A memset outside every allocation: its error is kept for the next synchronous call.
    assert send("cuMemsetD8Async", 0x10, 1, 1, 0) is None
    assert caller.deferred_error == CUDA_ERROR_INVALID_VALUE
    assert send("vgpuHostFuncPoll", 1) == 0
    assert caller.deferred_error == CUDA_ERROR_INVALID_VALUE  # still the application's
    assert send("cuCtxSynchronize") == CUDA_ERROR_INVALID_VALUE
    assert caller.deferred_error == 0
