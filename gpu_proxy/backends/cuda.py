"""The real backend: the CUDA driver API through cuda-bindings.

Each zone gets its own context (cuCtxCreate), so one zone's faults and handles never touch
another's. The proxy serves many zones from many threads and a driver context is current per
thread, so every operation pushes the zone's context onto the calling thread's stack and pops
it afterwards (``_current``); no thread keeps a context current between calls.

Every non-success CUresult becomes a gpu_proxy.errors.CudaError carrying the driver's code
(``driver_error``); ``CUDA_ERROR_NOT_READY`` from a stream or event query is the answer False.
"""

import ctypes
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from cuda.bindings import driver
from cuda.pathfinder import DynamicLibNotFoundError

from gpu_proxy.backends.base import (
    Buffer,
    Context,
    DeviceGlobal,
    DeviceInfo,
    Event,
    Fill,
    Function,
    Module,
    Stream,
)
from gpu_proxy.errors import (
    CudaError,
    DriverError,
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
    ImageKind,
    KernelInfo,
    ModuleImageError,
    NoCompatibleImageError,
    parse_module_image,
)

CUDA_SUCCESS = 0
_NOT_READY = int(driver.CUresult.CUDA_ERROR_NOT_READY)
# Attributes a device may not report (older GPUs, unsupported features): left out of the table.
_ATTRIBUTE_SKIP = {
    int(driver.CUresult.CUDA_ERROR_INVALID_VALUE),
    int(driver.CUresult.CUDA_ERROR_NOT_SUPPORTED),
}
# Codes the proxy also raises itself map to the same classes, so callers catch one class
# whichever backend runs; every other code becomes a DriverError.
_ERROR_CLASSES: dict[int, type[CudaError]] = {
    cls.result: cls
    for cls in (
        InvalidValue,
        OutOfMemory,
        InvalidImage,
        InvalidContext,
        NoBinaryForGpu,
        InvalidHandle,
        NotFound,
        NotReady,
    )
}
# Zone threads block in the kernel while they wait for the GPU instead of spinning: Dom0 has few
# CPUs and serves every zone.
_CTX_FLAGS = int(driver.CUctx_flags.CU_CTX_SCHED_BLOCKING_SYNC)
_DEFAULT_STREAM = driver.CUstream(0)
# memset elem_size -> (legacy-stream call, stream call)
_MEMSET: dict[int, tuple[Callable[..., tuple[Any, ...]], Callable[..., tuple[Any, ...]]]] = {
    1: (driver.cuMemsetD8, driver.cuMemsetD8Async),
    2: (driver.cuMemsetD16, driver.cuMemsetD16Async),
    4: (driver.cuMemsetD32, driver.cuMemsetD32Async),
}


class BackendUnavailable(RuntimeError):
    """The driver cannot be used on this machine (no libcuda, no GPU, bad device ordinal)."""


def result_name(result: int) -> str:
    """The CUresult's name, e.g. CUDA_ERROR_OUT_OF_MEMORY, or a placeholder for a code this
    cuda-bindings does not know (a newer driver)."""
    try:
        return str(driver.CUresult(result).name)
    except ValueError:
        return f"CUresult {result}"


def driver_error(result: int, call: str) -> CudaError:
    """The exception for `call` failing with `result` (a non-success CUresult)."""
    message = f"{call} failed: {result_name(result)} ({result})"
    cls = _ERROR_CLASSES.get(result)
    return cls(message) if cls is not None else DriverError(result, message)


def query_result(result: int, call: str) -> bool:
    """A query's answer: True on success, False for CUDA_ERROR_NOT_READY (work still pending,
    not a failure); any other code raises."""
    if result == CUDA_SUCCESS:
        return True
    if result == _NOT_READY:
        return False
    raise driver_error(result, call)


def _call(fn: Callable[..., tuple[Any, ...]], *args: Any) -> Any:
    """Run a cuda-bindings call (which returns ``(CUresult, *outputs)``): raise its error, else
    return its single output, its outputs as a tuple, or None."""
    err, *values = fn(*args)
    if err != CUDA_SUCCESS:
        raise driver_error(int(err), fn.__name__)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class PackedParams:
    """A launch's parameter buffer and the ``extra`` array that points at it, as cuLaunchKernel
    reads them: [BUFFER_POINTER, &buffer, BUFFER_SIZE, &size, END]. Keep it alive until the
    launch call returns (the driver copies the buffer during the call)."""

    buffer: ctypes.Array[ctypes.c_char]
    size: ctypes.c_size_t
    extra: ctypes.Array[ctypes.c_void_p]

    @property
    def address(self) -> int:
        return ctypes.addressof(self.extra)


def pack_launch_params(params: bytes) -> PackedParams:
    """The ``extra`` form for an already marshalled parameter buffer, so the proxy never has to
    split it into per-parameter pointers."""
    buffer = ctypes.create_string_buffer(params, len(params))
    size = ctypes.c_size_t(len(params))
    extra = (ctypes.c_void_p * 5)(
        driver.CU_LAUNCH_PARAM_BUFFER_POINTER,
        ctypes.addressof(buffer),
        driver.CU_LAUNCH_PARAM_BUFFER_SIZE,
        ctypes.addressof(size),
        driver.CU_LAUNCH_PARAM_END,
    )
    return PackedParams(buffer, size, extra)


@dataclass(eq=False)
class CudaContext:
    handle: Any  # CUcontext
    live: bool = True


@dataclass(frozen=True, eq=False)
class CudaStream:
    handle: Any  # CUstream


@dataclass(frozen=True, eq=False)
class CudaEvent:
    handle: Any  # CUevent


@dataclass(frozen=True, eq=False)
class CudaModule:
    handle: Any  # CUmodule
    kernels: Mapping[str, KernelInfo]
    globals: Mapping[str, DeviceGlobal]


@dataclass(frozen=True, eq=False)
class CudaFunction:
    handle: Any  # CUfunction
    info: KernelInfo


T = TypeVar("T")


def _of(kind: type[T], obj: object, error: type[CudaError]) -> T:
    """`obj` as this backend's `kind`; anything else (another backend's object) is `error`."""
    if not isinstance(obj, kind):
        raise error(f"not a {kind.__name__}: {type(obj).__name__}")
    return obj


def _stream(stream: Stream | None) -> Any:
    return _DEFAULT_STREAM if stream is None else _of(CudaStream, stream, InvalidHandle).handle


def _event(event: Event) -> Any:
    return _of(CudaEvent, event, InvalidHandle).handle


@contextmanager
def _current(ctx: Context) -> Iterator[None]:
    """Make the zone's context current on the calling thread for one operation, then restore
    whatever was current before (push/pop), however the operation ends."""
    context = _of(CudaContext, ctx, InvalidContext)
    if not context.live:
        raise InvalidContext("context was destroyed")
    _call(driver.cuCtxPushCurrent, context.handle)
    try:
        yield
    finally:
        _call(driver.cuCtxPopCurrent)


def _init_device(ordinal: int) -> Any:
    """cuInit and the CUdevice, or BackendUnavailable saying what is missing."""
    try:
        err, *_ = driver.cuInit(0)
    except DynamicLibNotFoundError as exc:
        raise BackendUnavailable(
            f"CUDA backend unavailable: libcuda could not be loaded ({exc}); "
            "install the NVIDIA driver or run the proxy with the sim backend"
        ) from exc
    if err != CUDA_SUCCESS:
        raise BackendUnavailable(
            f"CUDA backend unavailable: cuInit failed with {result_name(int(err))} ({int(err)})"
        )
    try:
        return _call(driver.cuDeviceGet, ordinal)
    except CudaError as exc:
        raise BackendUnavailable(f"CUDA backend unavailable: device {ordinal}: {exc}") from exc


class CudaBackend:
    """One GPU (by driver ordinal) through the CUDA driver API."""

    name = "cuda"

    def __init__(self, device_ordinal: int = 0) -> None:
        self._device = _init_device(device_ordinal)
        # mem_info has no zone context to run in: the device's primary context serves it.
        self._primary = _call(driver.cuDevicePrimaryCtxRetain, self._device)
        self._info = self._query_device_info()
        major, minor = self._info.compute_capability
        self._arch = major * 10 + minor

    def _query_device_info(self) -> DeviceInfo:
        dev = self._device
        attributes: dict[int, int] = {}
        for attr in driver.CUdevice_attribute:
            if attr == driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX:
                continue
            err, value = driver.cuDeviceGetAttribute(attr, dev)
            if err == CUDA_SUCCESS:
                attributes[int(attr)] = int(value)
            elif int(err) not in _ATTRIBUTE_SKIP:
                raise driver_error(int(err), "cuDeviceGetAttribute")
        a = driver.CUdevice_attribute
        name: bytes = _call(driver.cuDeviceGetName, 256, dev)
        return DeviceInfo(
            name=name.split(b"\0", 1)[0].decode(errors="replace"),
            uuid=bytes(_call(driver.cuDeviceGetUuid, dev).bytes),
            total_mem=int(_call(driver.cuDeviceTotalMem, dev)),
            compute_capability=(
                attributes[int(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)],
                attributes[int(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)],
            ),
            driver_version=int(_call(driver.cuDriverGetVersion)),
            attributes=attributes,
        )

    def device_info(self) -> DeviceInfo:
        return self._info

    # contexts
    def create_context(self) -> Context:
        handle = _call(driver.cuCtxCreate, None, _CTX_FLAGS, self._device)
        # cuCtxCreate leaves the new context current on this thread; operations push it anew.
        _call(driver.cuCtxPopCurrent)
        return CudaContext(handle)

    def destroy_context(self, ctx: Context) -> None:
        context = _of(CudaContext, ctx, InvalidContext)
        if not context.live:
            raise InvalidContext("context was destroyed")
        context.live = False
        _call(driver.cuCtxDestroy, context.handle)

    def synchronize(self, ctx: Context) -> None:
        with _current(ctx):
            _call(driver.cuCtxSynchronize)

    # memory
    def mem_alloc(self, ctx: Context, size: int) -> int:
        with _current(ctx):
            return int(_call(driver.cuMemAlloc, size))

    def mem_free(self, ctx: Context, ptr: int) -> None:
        with _current(ctx):
            _call(driver.cuMemFree, ptr)

    def mem_free_async(
        self, ctx: Context, ptr: int, stream: Stream | None, freed: Callable[[], None]
    ) -> None:
        """The memory came from cuMemAlloc, not a pool: the stream's earlier work is waited
        for, then it is freed (the zone's thread waits instead of the stream)."""
        with _current(ctx):
            _call(driver.cuStreamSynchronize, _stream(stream))
            _call(driver.cuMemFree, ptr)
        freed()

    def mem_info(self) -> tuple[int, int]:
        _call(driver.cuCtxPushCurrent, self._primary)
        try:
            free, total = _call(driver.cuMemGetInfo)
        finally:
            _call(driver.cuCtxPopCurrent)
        return int(free), int(total)

    def memcpy_htod(self, ctx: Context, dst: int, data: Buffer, stream: Stream | None) -> None:
        size = memoryview(data).nbytes
        with _current(ctx):
            if stream is None:
                _call(driver.cuMemcpyHtoD, dst, data, size)
            else:
                # From pageable memory the driver stages `data` before returning, so the caller
                # may reuse it at once.
                _call(driver.cuMemcpyHtoDAsync, dst, data, size, _stream(stream))

    def memcpy_htod_from(
        self, ctx: Context, dst: int, size: int, fill: Fill, stream: Stream | None
    ) -> None:
        """Received into one private buffer, then copied as memcpy_htod copies. A pair of
        pinned staging buffers, filled alternately while the other's DMA runs, is what would
        overlap the transfer with the receive (to be measured on a GPU)."""
        payload = bytearray(size)
        fill(memoryview(payload))
        self.memcpy_htod(ctx, dst, payload, stream)

    def memcpy_htod_shared(
        self, ctx: Context, dst: int, src: memoryview, stream: Stream | None
    ) -> None:
        """Staged by the driver as pageable memory is: registering the zone's pages with the
        driver (cuMemHostRegister) is what would make this a DMA straight from them."""
        self.memcpy_htod(ctx, dst, src, stream)

    def memcpy_dtoh_into(
        self, ctx: Context, src: int, dst: memoryview, stream: Stream | None
    ) -> None:
        """Synchronous on the stream, through a staging buffer, as memcpy_dtoh is."""
        dst[:] = self.memcpy_dtoh(ctx, src, len(dst), stream)

    def memcpy_dtoh(self, ctx: Context, src: int, size: int, stream: Stream | None) -> bytes:
        """On a stream, the copy is queued there and the stream synchronized before returning:
        the bytes must exist for the reply, so the caller waits for that stream's earlier work."""
        out = bytearray(size)
        with _current(ctx):
            if stream is None:
                _call(driver.cuMemcpyDtoH, out, src, size)
            else:
                handle = _stream(stream)
                _call(driver.cuMemcpyDtoHAsync, out, src, size, handle)
                _call(driver.cuStreamSynchronize, handle)
        return bytes(out)

    def memcpy_dtod(
        self, ctx: Context, dst: int, src: int, size: int, stream: Stream | None
    ) -> None:
        with _current(ctx):
            if stream is None:
                _call(driver.cuMemcpyDtoD, dst, src, size)
            else:
                _call(driver.cuMemcpyDtoDAsync, dst, src, size, _stream(stream))

    def memset(
        self, ctx: Context, dst: int, value: int, elem_size: int, count: int, stream: Stream | None
    ) -> None:
        calls = _MEMSET.get(elem_size)
        if calls is None:
            raise InvalidValue(f"memset element size {elem_size} is not 1, 2 or 4")
        # Truncated to the element as C's implicit conversion does for cuMemsetD8/D16.
        value &= (1 << (8 * elem_size)) - 1
        sync, queued = calls
        with _current(ctx):
            if stream is None:
                _call(sync, dst, value, count)
            else:
                _call(queued, dst, value, count, _stream(stream))

    # modules and launches
    def module_load(self, ctx: Context, image: bytes) -> Module:
        """The proxy's own parser reads the image first: it rejects what it cannot vouch for
        before the driver's parser sees it, and gives the kernel table launches marshal with."""
        try:
            parsed = parse_module_image(image, arch=self._arch)
        except NoCompatibleImageError as exc:
            raise NoBinaryForGpu(str(exc)) from exc
        except ModuleImageError as exc:
            raise InvalidImage(str(exc)) from exc
        # The driver reads PTX as a C string.
        data = image + b"\0" if parsed.kind is ImageKind.PTX else image
        with _current(ctx):
            handle = _call(driver.cuModuleLoadData, data)
            try:
                variables = {
                    name: DeviceGlobal(
                        *(int(v) for v in _call(driver.cuModuleGetGlobal, handle, name.encode()))
                    )
                    for name in parsed.globals
                }
            except CudaError:
                _call(driver.cuModuleUnload, handle)
                raise
        return CudaModule(handle, parsed.kernels, variables)

    def module_unload(self, ctx: Context, module: Module) -> None:
        with _current(ctx):
            _call(driver.cuModuleUnload, _of(CudaModule, module, InvalidHandle).handle)

    def module_function(self, ctx: Context, module: Module, name: str) -> Function:
        mod = _of(CudaModule, module, InvalidHandle)
        info = mod.kernels.get(name)
        if info is None:
            raise NotFound(f"module has no kernel {name!r}")
        with _current(ctx):
            handle = _call(driver.cuModuleGetFunction, mod.handle, name.encode())
        return CudaFunction(handle, info)

    def function_set_max_dynamic_shared(self, ctx: Context, fn: Function, nbytes: int) -> None:
        func = _of(CudaFunction, fn, InvalidHandle)
        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        with _current(ctx):
            _call(driver.cuFuncSetAttribute, func.handle, attr, nbytes)

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
        func = _of(CudaFunction, fn, InvalidHandle)
        if len(params) != func.info.param_bytes:
            raise InvalidValue(
                f"{func.info.name} takes {func.info.param_bytes} parameter bytes, got {len(params)}"
            )
        # A kernel without parameters gets no buffer at all rather than a zero-sized one.
        packed = pack_launch_params(params) if params else None
        with _current(ctx):
            _call(
                driver.cuLaunchKernel,
                func.handle,
                *grid,
                *block,
                shared_mem,
                _stream(stream),
                None,
                packed.address if packed is not None else 0,
            )

    # streams and events
    def stream_create(self, ctx: Context, flags: int) -> Stream:
        with _current(ctx):
            return CudaStream(_call(driver.cuStreamCreate, flags))

    def stream_destroy(self, ctx: Context, stream: Stream) -> None:
        with _current(ctx):
            _call(driver.cuStreamDestroy, _of(CudaStream, stream, InvalidHandle).handle)

    def stream_synchronize(self, ctx: Context, stream: Stream | None) -> None:
        with _current(ctx):
            _call(driver.cuStreamSynchronize, _stream(stream))

    def stream_query(self, ctx: Context, stream: Stream | None) -> bool:
        with _current(ctx):
            (err,) = driver.cuStreamQuery(_stream(stream))
        return query_result(int(err), "cuStreamQuery")

    def stream_wait_event(self, ctx: Context, stream: Stream | None, event: Event) -> None:
        with _current(ctx):
            _call(driver.cuStreamWaitEvent, _stream(stream), _event(event), 0)

    def event_create(self, ctx: Context, flags: int) -> Event:
        with _current(ctx):
            return CudaEvent(_call(driver.cuEventCreate, flags))

    def event_record(self, ctx: Context, event: Event, stream: Stream | None) -> None:
        with _current(ctx):
            _call(driver.cuEventRecord, _event(event), _stream(stream))

    def event_synchronize(self, ctx: Context, event: Event) -> None:
        with _current(ctx):
            _call(driver.cuEventSynchronize, _event(event))

    def event_query(self, ctx: Context, event: Event) -> bool:
        with _current(ctx):
            (err,) = driver.cuEventQuery(_event(event))
        return query_result(int(err), "cuEventQuery")

    def event_elapsed_ms(self, ctx: Context, start: Event, end: Event) -> float:
        with _current(ctx):
            return float(_call(driver.cuEventElapsedTime, _event(start), _event(end)))

    def event_destroy(self, ctx: Context, event: Event) -> None:
        with _current(ctx):
            _call(driver.cuEventDestroy, _event(event))
