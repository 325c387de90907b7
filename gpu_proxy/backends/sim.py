"""A GPU backend for machines without a GPU: device memory is host memory, each stream is a
worker thread, and kernels are validated and recorded in stream order but never executed.

It is honest by construction: every byte a zone reads back was written by the zone's own copy
or memset, and a launch leaves device memory untouched rather than inventing a result. Event
times are time.perf_counter_ns taken when the event's marker is reached in stream order.
"""

from __future__ import annotations

import bisect
import enum
import mmap
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gpu_proxy.backends.base import Buffer, Context, DeviceInfo, Event, Function, Module, Stream
from gpu_proxy.errors import (
    InvalidContext,
    InvalidHandle,
    InvalidImage,
    InvalidValue,
    NoBinaryForGpu,
    NotFound,
    NotReady,
    OutOfMemory,
)
from gpu_proxy.modules import (
    KernelInfo,
    ModuleImage,
    ModuleImageError,
    NoCompatibleImageError,
    parse_module_image,
)

DRIVER_VERSION = 13000
ADDRESS_BASE = 0x7F00_0000_0000
ALIGNMENT = 256
CU_STREAM_NON_BLOCKING = 0x1
CU_EVENT_DISABLE_TIMING = 0x2
_EVENT_FLAGS = 0x7  # BLOCKING_SYNC | DISABLE_TIMING | INTERPROCESS
# Copies and memsets go in slices so a huge operation needs no equally huge temporary.
_CHUNK = 64 << 20
_UUID_NAMESPACE = uuid.UUID("5b0d7a52-61c1-4b8e-9c8e-2f4f3c6a0e11")


class Attr(enum.IntEnum):
    """CUdevice_attribute numbers as in cuda.h (only those the sim reports)."""

    MAX_THREADS_PER_BLOCK = 1
    MAX_BLOCK_DIM_X = 2
    MAX_BLOCK_DIM_Y = 3
    MAX_BLOCK_DIM_Z = 4
    MAX_GRID_DIM_X = 5
    MAX_GRID_DIM_Y = 6
    MAX_GRID_DIM_Z = 7
    MAX_SHARED_MEMORY_PER_BLOCK = 8
    TOTAL_CONSTANT_MEMORY = 9
    WARP_SIZE = 10
    MAX_PITCH = 11
    MAX_REGISTERS_PER_BLOCK = 12
    CLOCK_RATE = 13
    TEXTURE_ALIGNMENT = 14
    MULTIPROCESSOR_COUNT = 16
    KERNEL_EXEC_TIMEOUT = 17
    INTEGRATED = 18
    COMPUTE_MODE = 20
    CONCURRENT_KERNELS = 31
    ECC_ENABLED = 32
    MEMORY_CLOCK_RATE = 36
    GLOBAL_MEMORY_BUS_WIDTH = 37
    L2_CACHE_SIZE = 38
    MAX_THREADS_PER_MULTIPROCESSOR = 39
    UNIFIED_ADDRESSING = 41
    COMPUTE_CAPABILITY_MAJOR = 75
    COMPUTE_CAPABILITY_MINOR = 76
    MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81
    MAX_REGISTERS_PER_MULTIPROCESSOR = 82
    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
    MAX_BLOCKS_PER_MULTIPROCESSOR = 106
    RESERVED_SHARED_MEMORY_PER_BLOCK = 111


@dataclass(frozen=True)
class GpuModel:
    """The published properties of one GPU model; limits shared by cc 8.x/9.x are defaults."""

    name: str
    compute_capability: tuple[int, int]
    total_mem: int
    sm_count: int
    clock_khz: int
    mem_clock_khz: int
    l2_bytes: int
    shared_per_sm: int
    shared_per_block_optin: int
    bus_width_bits: int = 5120
    max_threads_per_block: int = 1024
    max_block: tuple[int, int, int] = (1024, 1024, 64)
    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)
    shared_per_block: int = 48 << 10
    constant_mem: int = 64 << 10
    warp_size: int = 32

    @property
    def arch(self) -> int:
        """The SM number module images are selected for (cc 9.0 -> 90)."""
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    def attributes(self) -> dict[int, int]:
        """Every attribute the sim reports, keyed by CUdevice_attribute number."""
        values = {
            Attr.MAX_THREADS_PER_BLOCK: self.max_threads_per_block,
            Attr.MAX_BLOCK_DIM_X: self.max_block[0],
            Attr.MAX_BLOCK_DIM_Y: self.max_block[1],
            Attr.MAX_BLOCK_DIM_Z: self.max_block[2],
            Attr.MAX_GRID_DIM_X: self.max_grid[0],
            Attr.MAX_GRID_DIM_Y: self.max_grid[1],
            Attr.MAX_GRID_DIM_Z: self.max_grid[2],
            Attr.MAX_SHARED_MEMORY_PER_BLOCK: self.shared_per_block,
            Attr.TOTAL_CONSTANT_MEMORY: self.constant_mem,
            Attr.WARP_SIZE: self.warp_size,
            Attr.MAX_PITCH: 2**31 - 1,
            Attr.MAX_REGISTERS_PER_BLOCK: 65536,
            Attr.CLOCK_RATE: self.clock_khz,
            Attr.TEXTURE_ALIGNMENT: 512,
            Attr.MULTIPROCESSOR_COUNT: self.sm_count,
            Attr.KERNEL_EXEC_TIMEOUT: 0,
            Attr.INTEGRATED: 0,
            Attr.COMPUTE_MODE: 0,
            Attr.CONCURRENT_KERNELS: 1,
            Attr.ECC_ENABLED: 1,
            Attr.MEMORY_CLOCK_RATE: self.mem_clock_khz,
            Attr.GLOBAL_MEMORY_BUS_WIDTH: self.bus_width_bits,
            Attr.L2_CACHE_SIZE: self.l2_bytes,
            Attr.MAX_THREADS_PER_MULTIPROCESSOR: 2048,
            Attr.UNIFIED_ADDRESSING: 1,
            Attr.COMPUTE_CAPABILITY_MAJOR: self.compute_capability[0],
            Attr.COMPUTE_CAPABILITY_MINOR: self.compute_capability[1],
            Attr.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: self.shared_per_sm,
            Attr.MAX_REGISTERS_PER_MULTIPROCESSOR: 65536,
            Attr.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: self.shared_per_block_optin,
            Attr.MAX_BLOCKS_PER_MULTIPROCESSOR: 32,
            Attr.RESERVED_SHARED_MEMORY_PER_BLOCK: 1024,
        }
        return {int(k): v for k, v in values.items()}


MODELS: Mapping[str, GpuModel] = {
    "H100-SXM5-80GB": GpuModel(
        name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        total_mem=80 << 30,
        sm_count=132,
        clock_khz=1_980_000,
        mem_clock_khz=2_619_000,
        l2_bytes=50 << 20,
        shared_per_sm=228 << 10,
        shared_per_block_optin=227 << 10,
    ),
    "A100-SXM4-40GB": GpuModel(
        name="NVIDIA A100-SXM4-40GB",
        compute_capability=(8, 0),
        total_mem=40 << 30,
        sm_count=108,
        clock_khz=1_410_000,
        mem_clock_khz=1_215_000,
        l2_bytes=40 << 20,
        shared_per_sm=164 << 10,
        shared_per_block_optin=163 << 10,
    ),
}


@dataclass(frozen=True)
class LaunchRecord:
    """A launch as it reached its place in stream order; the sim ran no code for it."""

    function: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    params: bytes
    stream: SimStream | None


@dataclass
class _Mark:
    """One cuEventRecord: `done` is set when the stream reaches it, `ns` stamped just before."""

    done: threading.Event = field(default_factory=threading.Event)
    ns: int | None = None


class SimStream:
    """A stream: its operations run in order on its own worker thread."""

    def __init__(self, ctx: SimContext, flags: int) -> None:
        self.ctx = ctx
        self.flags = flags
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], threading.Event] | None]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._stopped = False
        self._cancelled = False
        self._thread = threading.Thread(target=self._work, name="sim-stream", daemon=True)
        self._thread.start()

    @property
    def destroyed(self) -> bool:
        return self._stopped

    def enqueue(
        self, work: Callable[[], object], done: threading.Event | None = None
    ) -> threading.Event:
        """Queue `work` after everything queued before; `done` (returned) is set once it ran."""
        done = threading.Event() if done is None else done
        with self._lock:
            if self._stopped:
                raise InvalidHandle("stream was destroyed")
            self._pending += 1
            self._queue.put((work, done))
        return done

    def idle(self) -> bool:
        with self._lock:
            return self._pending == 0

    def drain(self) -> None:
        """Block until everything queued so far has run (or, once stopped, the worker ended)."""
        try:
            self.enqueue(_nothing).wait()
        except InvalidHandle:
            self._thread.join()

    def stop(self, cancel: bool) -> None:
        """Let the worker finish the queue and exit; `cancel` skips work not yet started."""
        with self._lock:
            self._cancelled |= cancel
            if not self._stopped:
                self._stopped = True
                self._queue.put(None)

    def join(self) -> None:
        self._thread.join()

    def _work(self) -> None:
        # Every operation is validated before it is queued, so running one cannot fail.
        while (item := self._queue.get()) is not None:
            work, done = item
            if not self._cancelled:
                work()
            with self._lock:
                self._pending -= 1
            done.set()
        self.ctx.forget(self)


def _nothing() -> None:
    """A marker operation: running it proves everything queued before it has run."""


class SimContext:
    """One zone's context: its allocations, streams, and the launches it has executed."""

    def __init__(self) -> None:
        self.alive = True
        self.lock = threading.Lock()
        self.legacy_lock = threading.Lock()  # legacy-stream work runs one call at a time
        self.streams: set[SimStream] = set()
        self.allocations: dict[int, mmap.mmap] = {}
        self.bases: list[int] = []  # sorted keys of `allocations`, for range lookups
        self.launches: list[LaunchRecord] = []

    def forget(self, stream: SimStream) -> None:
        with self.lock:
            self.streams.discard(stream)

    def live_streams(self, blocking_only: bool) -> list[SimStream]:
        with self.lock:
            return [s for s in self.streams if not (blocking_only and s.flags)]


class SimModule:
    """A loaded module image; `kernels` is what the image declares for the model's SM."""

    def __init__(self, ctx: SimContext, image: ModuleImage) -> None:
        self.ctx = ctx
        self.image = image
        self.loaded = True

    @property
    def kernels(self) -> Mapping[str, KernelInfo]:
        return self.image.kernels


class SimFunction:
    """A kernel of a loaded module."""

    def __init__(self, module: SimModule, info: KernelInfo) -> None:
        self.module = module
        self._info = info

    @property
    def info(self) -> KernelInfo:
        return self._info


class SimEvent:
    """An event; `mark` is its most recent record (None: never recorded)."""

    def __init__(self, ctx: SimContext, flags: int) -> None:
        self.ctx = ctx
        self.flags = flags
        self.mark: _Mark | None = None
        self.destroyed = False


def _charge(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def _copy(dst: mmap.mmap, dst_off: int, src: Buffer | mmap.mmap, src_off: int, size: int) -> None:
    for start in range(0, size, _CHUNK):
        n = min(_CHUNK, size - start)
        dst[dst_off + start : dst_off + start + n] = src[src_off + start : src_off + start + n]


def _fill(dst: mmap.mmap, dst_off: int, unit: bytes, size: int) -> None:
    block = memoryview(unit * (min(size, _CHUNK) // len(unit)))
    for start in range(0, size, _CHUNK):
        n = min(_CHUNK, size - start)
        dst[dst_off + start : dst_off + start + n] = block[:n]


class SimBackend:
    """GpuBackend on host memory. Stream-ordered operations run on per-stream worker threads;
    `stream=None` (the legacy default stream) first drains the context's blocking streams and
    then runs in the caller. A memcpy_dtoh on a stream blocks the caller until the stream has
    reached and executed the copy."""

    name = "sim"

    def __init__(self, model: str = "H100-SXM5-80GB", total_mem: int | None = None) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown GPU model {model!r}; known: {', '.join(MODELS)}")
        self.model = MODELS[model]
        self._total = self.model.total_mem if total_mem is None else total_mem
        self._used = 0
        self._next_addr = ADDRESS_BASE
        self._lock = threading.Lock()
        # Immutable and asked for on hot paths (cuDriverGetVersion, attributes): built once.
        self._info = DeviceInfo(
            name=f"{self.model.name} (vgpu sim)",
            uuid=uuid.uuid5(_UUID_NAMESPACE, model).bytes,
            total_mem=self._total,
            compute_capability=self.model.compute_capability,
            driver_version=DRIVER_VERSION,
            attributes=MappingProxyType(self.model.attributes()),
        )

    # device

    def device_info(self) -> DeviceInfo:
        return self._info

    # contexts

    def create_context(self) -> SimContext:
        return SimContext()

    def destroy_context(self, ctx: Context) -> None:
        """Cancel queued work, stop the workers, and return the context's memory."""
        c = self._ctx(ctx)
        with c.lock:
            c.alive = False
            streams = list(c.streams)
        for s in streams:
            s.stop(cancel=True)
        for s in streams:
            s.join()
        with c.lock:
            freed = sum(_charge(len(slab)) for slab in c.allocations.values())
            c.allocations.clear()
            c.bases.clear()
        with self._lock:
            self._used -= freed

    def synchronize(self, ctx: Context) -> None:
        c = self._ctx(ctx)
        for s in c.live_streams(blocking_only=False):
            s.drain()

    # memory

    def mem_alloc(self, ctx: Context, size: int) -> int:
        c = self._ctx(ctx)
        if size <= 0:
            raise InvalidValue(f"allocation size {size}")
        charge = _charge(size)
        with self._lock:
            if self._used + charge > self._total:
                raise OutOfMemory(f"{size} bytes requested, {self._total - self._used} free")
            self._used += charge
            addr = self._next_addr
            self._next_addr += charge  # never reused: a stale pointer cannot alias a new one
        try:
            slab = mmap.mmap(-1, size)  # anonymous: zero pages, touched lazily
        except OSError as exc:
            with self._lock:
                self._used -= charge
            raise OutOfMemory(f"host cannot back {size} bytes: {exc}") from exc
        with c.lock:
            c.allocations[addr] = slab
            bisect.insort(c.bases, addr)
        return addr

    def mem_free(self, ctx: Context, ptr: int) -> None:
        """Like cuMemFree, waits for the context's outstanding work first."""
        c = self._ctx(ctx)
        with c.lock:
            if ptr not in c.allocations:
                raise InvalidValue(f"{ptr:#x} is not the start of an allocation")
        self.synchronize(c)
        with c.lock:
            slab = c.allocations.pop(ptr, None)
            if slab is None:
                raise InvalidValue(f"{ptr:#x} was freed concurrently")
            c.bases.remove(ptr)
        with self._lock:
            self._used -= _charge(len(slab))

    def mem_info(self) -> tuple[int, int]:
        with self._lock:
            return self._total - self._used, self._total

    def memcpy_htod(self, ctx: Context, dst: int, data: Buffer, stream: Stream | None) -> None:
        """The source bytes are taken now, so the caller may reuse its buffer at once."""
        c = self._ctx(ctx)
        payload = bytes(data)
        slab, off = self._span(c, dst, len(payload))
        self._submit(c, stream, lambda: _copy(slab, off, payload, 0, len(payload)))

    def memcpy_dtoh(self, ctx: Context, src: int, size: int, stream: Stream | None) -> bytes:
        """Blocks until the copy has executed in stream order, then returns its bytes."""
        c = self._ctx(ctx)
        slab, off = self._span(c, src, size)
        result: list[bytes] = []
        self._submit(c, stream, lambda: result.append(slab[off : off + size])).wait()
        return result[0]

    def memcpy_dtod(
        self, ctx: Context, dst: int, src: int, size: int, stream: Stream | None
    ) -> None:
        c = self._ctx(ctx)
        dslab, doff = self._span(c, dst, size)
        sslab, soff = self._span(c, src, size)
        self._submit(c, stream, lambda: _copy(dslab, doff, sslab, soff, size))

    def memset(
        self, ctx: Context, dst: int, value: int, elem_size: int, count: int, stream: Stream | None
    ) -> None:
        """cuMemsetD8/D16/D32: `count` elements of `elem_size` bytes, dst aligned to it."""
        c = self._ctx(ctx)
        if elem_size not in (1, 2, 4):
            raise InvalidValue(f"memset element size {elem_size}")
        if not 0 <= value < 1 << (8 * elem_size):
            raise InvalidValue(f"memset value {value} does not fit {elem_size} bytes")
        if count < 0 or dst % elem_size:
            raise InvalidValue(f"memset of {count} x {elem_size} bytes at {dst:#x}")
        size = count * elem_size
        slab, off = self._span(c, dst, size)
        unit = value.to_bytes(elem_size, "little")
        self._submit(c, stream, lambda: _fill(slab, off, unit, size))

    # modules and launches

    def module_load(self, ctx: Context, image: bytes) -> SimModule:
        c = self._ctx(ctx)
        try:
            parsed = parse_module_image(bytes(image), arch=self.model.arch)
        except NoCompatibleImageError as exc:
            raise NoBinaryForGpu(str(exc)) from exc
        except ModuleImageError as exc:
            raise InvalidImage(str(exc)) from exc
        return SimModule(c, parsed)

    def module_unload(self, ctx: Context, module: Module) -> None:
        self._module(self._ctx(ctx), module).loaded = False

    def module_function(self, ctx: Context, module: Module, name: str) -> SimFunction:
        m = self._module(self._ctx(ctx), module)
        info = m.kernels.get(name)
        if info is None:
            raise NotFound(f"module has no kernel {name!r}")
        return SimFunction(m, info)

    def launch(
        self,
        ctx: Context,
        fn: Function,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_mem: int,
        stream: Stream | None,
        params: bytes,
    ) -> None:
        """Validate as cuLaunchKernel does, then record the launch when its stream reaches it.

        The dynamic shared memory limit is the non-opt-in one: the backend has no
        cuFuncSetAttribute to raise it."""
        c = self._ctx(ctx)
        if not isinstance(fn, SimFunction) or fn.module.ctx is not c or not fn.module.loaded:
            raise InvalidHandle("not a function of a module loaded in this context")
        m = self.model
        for what, dims, limits in (("grid", grid, m.max_grid), ("block", block, m.max_block)):
            if len(dims) != 3 or not all(
                1 <= d <= lim for d, lim in zip(dims, limits, strict=True)
            ):
                raise InvalidValue(f"{what} {dims} outside 1..{limits}")
        if block[0] * block[1] * block[2] > m.max_threads_per_block:
            raise InvalidValue(f"block {block} exceeds {m.max_threads_per_block} threads")
        if not 0 <= shared_mem <= m.shared_per_block:
            raise InvalidValue(f"{shared_mem} bytes of shared memory, limit {m.shared_per_block}")
        if len(params) != fn.info.param_bytes:
            raise InvalidValue(f"{len(params)} parameter bytes, kernel takes {fn.info.param_bytes}")
        s = None if stream is None else self._stream(c, stream)
        record = LaunchRecord(fn.info.name, grid, block, shared_mem, bytes(params), s)

        def executed() -> None:
            with c.lock:
                c.launches.append(record)

        self._submit(c, s, executed)

    # streams and events

    def stream_create(self, ctx: Context, flags: int) -> SimStream:
        c = self._ctx(ctx)
        if flags not in (0, CU_STREAM_NON_BLOCKING):
            raise InvalidValue(f"stream flags {flags:#x}")
        s = SimStream(c, flags)
        with c.lock:
            c.streams.add(s)
        return s

    def stream_destroy(self, ctx: Context, stream: Stream) -> None:
        """Returns at once, as cuStreamDestroy does; queued work still completes."""
        self._stream(self._ctx(ctx), stream).stop(cancel=False)

    def stream_synchronize(self, ctx: Context, stream: Stream | None) -> None:
        c = self._ctx(ctx)
        if stream is None:
            self._submit(c, None, _nothing)
        else:
            self._stream(c, stream).drain()

    def stream_query(self, ctx: Context, stream: Stream | None) -> bool:
        c = self._ctx(ctx)
        if stream is None:
            return all(s.idle() for s in c.live_streams(blocking_only=True))
        return self._stream(c, stream).idle()

    def stream_wait_event(self, ctx: Context, stream: Stream | None, event: Event) -> None:
        """Later work on `stream` waits for the event's latest record (none: no wait)."""
        c = self._ctx(ctx)
        mark = self._event(c, event).mark
        if mark is not None:
            self._submit(c, stream, mark.done.wait)

    def event_create(self, ctx: Context, flags: int) -> SimEvent:
        c = self._ctx(ctx)
        if flags & ~_EVENT_FLAGS:
            raise InvalidValue(f"event flags {flags:#x}")
        return SimEvent(c, flags)

    def event_record(self, ctx: Context, event: Event, stream: Stream | None) -> None:
        c = self._ctx(ctx)
        ev = self._event(c, event)
        mark = _Mark()

        def stamp() -> None:
            mark.ns = time.perf_counter_ns()

        self._submit(c, stream, stamp, mark.done)
        ev.mark = mark

    def event_synchronize(self, ctx: Context, event: Event) -> None:
        mark = self._event(self._ctx(ctx), event).mark
        if mark is not None:
            mark.done.wait()

    def event_query(self, ctx: Context, event: Event) -> bool:
        mark = self._event(self._ctx(ctx), event).mark
        return mark is None or mark.done.is_set()

    def event_elapsed_ms(self, ctx: Context, start: Event, end: Event) -> float:
        """As cuEventElapsedTime: INVALID_HANDLE for an event never recorded or created with
        DISABLE_TIMING, NOT_READY while either record is still pending."""
        c = self._ctx(ctx)
        stamps = []
        for ev in (self._event(c, start), self._event(c, end)):
            if ev.flags & CU_EVENT_DISABLE_TIMING or ev.mark is None:
                raise InvalidHandle("event was never recorded or does not record timing")
            stamps.append(ev.mark.ns if ev.mark.done.is_set() else None)
        if stamps[0] is None or stamps[1] is None:
            raise NotReady("event has not completed")
        return (stamps[1] - stamps[0]) / 1e6

    def event_destroy(self, ctx: Context, event: Event) -> None:
        self._event(self._ctx(ctx), event).destroyed = True

    # helpers

    def _ctx(self, ctx: Context) -> SimContext:
        if not isinstance(ctx, SimContext) or not ctx.alive:
            raise InvalidContext("context was destroyed or is not a sim context")
        return ctx

    def _stream(self, c: SimContext, stream: Stream) -> SimStream:
        if not isinstance(stream, SimStream) or stream.ctx is not c or stream.destroyed:
            raise InvalidHandle("not a live stream of this context")
        return stream

    def _event(self, c: SimContext, event: Event) -> SimEvent:
        if not isinstance(event, SimEvent) or event.ctx is not c or event.destroyed:
            raise InvalidHandle("not a live event of this context")
        return event

    def _module(self, c: SimContext, module: Module) -> SimModule:
        if not isinstance(module, SimModule) or module.ctx is not c or not module.loaded:
            raise InvalidHandle("not a module loaded in this context")
        return module

    def _span(self, c: SimContext, ptr: int, size: int) -> tuple[mmap.mmap, int]:
        """The allocation holding [ptr, ptr + size) and ptr's offset in it."""
        if size < 0:
            raise InvalidValue(f"negative size {size}")
        with c.lock:
            i = bisect.bisect_right(c.bases, ptr) - 1
            if i >= 0:
                base = c.bases[i]
                slab = c.allocations[base]
                if ptr + size <= base + len(slab):
                    return slab, ptr - base
        raise InvalidValue(f"[{ptr:#x}, +{size}) is not inside one allocation")

    def _submit(
        self,
        c: SimContext,
        stream: Stream | None,
        work: Callable[[], object],
        done: threading.Event | None = None,
    ) -> threading.Event:
        """Run `work` in `stream`'s order; the returned event is set once it has run."""
        if stream is not None:
            return self._stream(c, stream).enqueue(work, done)
        done = threading.Event() if done is None else done
        with c.legacy_lock:
            for s in c.live_streams(blocking_only=True):
                s.drain()
            work()
        done.set()
        return done
