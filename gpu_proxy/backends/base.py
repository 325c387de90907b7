"""The narrow interface every GPU backend implements (``cuda``: the real driver; ``sim``: a
host-memory device for machines without a GPU).

A backend knows nothing about zones: the dispatcher has already resolved the zone's handles to
the backend objects below and checked every pointer and length against the zone's own
allocations (gpu_proxy.handles) and quota (gpu_proxy.quota) before it calls in. Failures are
raised as gpu_proxy.errors.CudaError subclasses carrying the CUresult the zone receives.

Stream-ordered operations take ``stream=None`` for the legacy default stream, which (as in
CUDA) waits for all other streams of the context before running and runs synchronously.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gpu_proxy.modules import KernelInfo

Buffer = bytes | bytearray | memoryview
# Fills a writable buffer with the next bytes of a copy's source (the zone's message, received
# piece by piece); a backend calls it over buffers covering the copy, in order.
Fill = Callable[[memoryview], None]


@dataclass(frozen=True)
class DeviceInfo:
    """What a zone learns about the GPU at connect time (answered locally by libvgpu after)."""

    name: str
    uuid: bytes  # 16 bytes
    total_mem: int
    compute_capability: tuple[int, int]
    driver_version: int  # as cuDriverGetVersion reports it, e.g. 13000
    attributes: Mapping[int, int] = field(default_factory=dict)  # CUdevice_attribute -> value


class Context(Protocol):
    """One zone's CUDA context on the device."""


class Stream(Protocol):
    """A stream of one context."""


class Event(Protocol):
    """An event of one context."""


@dataclass(frozen=True)
class DeviceGlobal:
    """Where a module's `__device__`/`__constant__` variable lives while the module is loaded."""

    address: int
    size: int


class Module(Protocol):
    """A loaded module; ``kernels`` gives every kernel's parameter layout, ``globals`` every
    variable's device memory (allocated by the load, freed by the unload)."""

    @property
    def kernels(self) -> Mapping[str, KernelInfo]: ...

    @property
    def globals(self) -> Mapping[str, DeviceGlobal]: ...


class Function(Protocol):
    """A kernel of a loaded module."""

    @property
    def info(self) -> KernelInfo: ...


class GpuBackend(Protocol):
    name: str

    def device_info(self) -> DeviceInfo: ...

    # contexts
    def create_context(self) -> Context: ...
    def destroy_context(self, ctx: Context) -> None: ...
    def synchronize(self, ctx: Context) -> None: ...

    # memory (addresses are device virtual addresses)
    def mem_alloc(self, ctx: Context, size: int) -> int: ...
    def mem_free(self, ctx: Context, ptr: int) -> None: ...
    def mem_free_async(
        self, ctx: Context, ptr: int, stream: Stream | None, freed: Callable[[], None]
    ) -> None:
        """cuMemFreeAsync: free once the stream's earlier work has run, then call `freed`."""
        ...

    def mem_info(self) -> tuple[int, int]: ...  # (free, total) of the physical device
    def memcpy_htod(self, ctx: Context, dst: int, data: Buffer, stream: Stream | None) -> None: ...
    def memcpy_dtoh(self, ctx: Context, src: int, size: int, stream: Stream | None) -> Buffer: ...
    def memcpy_dtod(
        self, ctx: Context, dst: int, src: int, size: int, stream: Stream | None
    ) -> None: ...
    def memcpy_htod_from(
        self, ctx: Context, dst: int, size: int, fill: Fill, stream: Stream | None
    ) -> None:
        """A copy whose source bytes are still arriving: the backend hands ``fill`` the buffers
        they should land in, so they are received once, where they are needed."""
        ...

    def memcpy_htod_shared(
        self, ctx: Context, dst: int, src: memoryview, stream: Stream | None
    ) -> None:
        """From host memory the caller keeps mapped until the stream has run the copy (pinned
        memory a zone shares): read in stream order, never snapshotted."""
        ...

    def memcpy_dtoh_into(
        self, ctx: Context, src: int, dst: memoryview, stream: Stream | None
    ) -> None:
        """Into host memory the caller keeps mapped until the stream has run the copy; on a
        stream it may return before the copy has run (cuMemcpyDtoHAsync into pinned memory)."""
        ...

    def memset(
        self, ctx: Context, dst: int, value: int, elem_size: int, count: int, stream: Stream | None
    ) -> None: ...

    # modules and launches
    def module_load(self, ctx: Context, image: bytes) -> Module: ...
    def module_unload(self, ctx: Context, module: Module) -> None: ...
    def module_function(self, ctx: Context, module: Module, name: str) -> Function: ...
    def function_set_max_dynamic_shared(self, ctx: Context, fn: Function, nbytes: int) -> None:
        """cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES): the opt-in launch limit."""
        ...

    def launch(
        self,
        ctx: Context,
        fn: Function,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_mem: int,
        stream: Stream | None,
        params: bytes,
    ) -> None: ...

    # streams and events
    def stream_create(self, ctx: Context, flags: int) -> Stream: ...
    def stream_destroy(self, ctx: Context, stream: Stream) -> None: ...
    def stream_synchronize(self, ctx: Context, stream: Stream | None) -> None: ...
    def stream_query(self, ctx: Context, stream: Stream | None) -> bool: ...  # True when idle
    def stream_wait_event(self, ctx: Context, stream: Stream | None, event: Event) -> None: ...
    def event_create(self, ctx: Context, flags: int) -> Event: ...
    def event_record(self, ctx: Context, event: Event, stream: Stream | None) -> None: ...
    def event_synchronize(self, ctx: Context, event: Event) -> None: ...
    def event_query(self, ctx: Context, event: Event) -> bool: ...  # True when complete
    def event_elapsed_ms(self, ctx: Context, start: Event, end: Event) -> float: ...
    def event_destroy(self, ctx: Context, event: Event) -> None: ...
