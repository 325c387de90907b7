"""The proxy's call handlers: zone handles → backend objects, every pointer and length checked
against the zone's own allocations, memory charged to the zone's quota, then the backend runs.

One handler per call, overriding the generated ``CallHandlers`` (gpu_proxy/gen/dispatch_table,
generated from idm/calls.toml); ``call_handlers`` gives the channel server its table. The error
of a fire-and-forget call is kept on the caller and returned by its next synchronous call,
which then does not run (so nothing it would have created is lost), as CUDA reports
asynchronous errors.
"""

import time
from collections.abc import Callable

from cuda.bindings.driver import CUdevice_attribute, CUresult

from gpu_proxy.backends.base import Buffer, Stream
from gpu_proxy.errors import (
    CUDA_ERROR_INVALID_VALUE,
    CUDA_ERROR_NOT_PERMITTED,
    CUDA_ERROR_NOT_READY,
    CudaError,
    InvalidDevice,
    InvalidHandle,
    InvalidValue,
    NotFound,
    OutOfMemory,
)
from gpu_proxy.gen.dispatch_table import DISPATCH, CallHandlers, invoke
from gpu_proxy.handles import HandleKind
from gpu_proxy.kernel_table import encode_page
from gpu_proxy.telemetry.events import EventKind
from gpu_proxy.telemetry.zone_stats import MemcpyDirection
from gpu_proxy.zone import Caller
from idm.callcodec import CUDA_ERROR_NOT_SUPPORTED, CUDA_SUCCESS, DecodeError
from idm.channel import PayloadReader
from idm.gen import codec as c
from idm.server import Reply, StreamedHandler
from idm.wire import Header

DEVICE = 0  # one GPU per proxy instance; a zone sees it as device 0
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_EVENT_DISABLE_TIMING = 0x2
# Host-function marks one process may have outstanding: each holds a backend event.
MAX_HOST_MARKS = 4096
# Calls libvgpu makes on its own behalf (its host-function thread): an earlier fire-and-forget
# error is not theirs to take, it stays for the application's next call.
KEEPS_DEFERRED_ERROR = frozenset({"vgpuHostFuncPoll"})

H = HandleKind
# Device attributes of features a zone cannot use through gpu-proxy, reported as 0 whatever the
# GPU has: virtual memory management and shareable handles (a zone's memory is cuMemAlloc'd and
# charged here), stream memory operations, GPUDirect RDMA, IPC (refused), compression (needs
# VMM), multicast. libvgpu has their entry points, answering CUDA_ERROR_NOT_SUPPORTED.
ATTRIBUTES_OFF_IN_ZONES = frozenset(
    int(getattr(CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}"))
    for name in (
        "CAN_USE_STREAM_MEM_OPS_V1",
        "CAN_USE_64_BIT_STREAM_MEM_OPS_V1",
        "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
        "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED",
        "HANDLE_TYPE_WIN32_HANDLE_SUPPORTED",
        "HANDLE_TYPE_WIN32_KMT_HANDLE_SUPPORTED",
        "GENERIC_COMPRESSION_SUPPORTED",
        "GPU_DIRECT_RDMA_SUPPORTED",
        "GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS",
        "MEMPOOL_SUPPORTED_HANDLE_TYPES",
        "CAN_USE_64_BIT_STREAM_MEM_OPS",
        "IPC_EVENT_SUPPORTED",
        "HANDLE_TYPE_FABRIC_SUPPORTED",
        "MULTICAST_SUPPORTED",
        "HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
        "HOST_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED",
    )
)


def _stream(caller: Caller, handle: int) -> Stream | None:
    obj: Stream | None = caller.zone.handles.get_optional(H.STREAM, handle)
    return obj


def _check_device(dev: int) -> None:
    if dev != DEVICE:
        raise InvalidDevice(f"device {dev}: a zone has device 0 only")


def _load_module(caller: Caller, image: bytes) -> int:
    """Load an image in the zone's context; its handle. A module's variables are device memory:
    charged to the zone's quota (a module with huge `__device__` arrays must not get around it),
    and registered as ranges the zone may copy to and from, but not free."""
    zone = caller.zone
    module = zone.backend.module_load(zone.context, image)
    charge = sum(v.size for v in module.globals.values())
    try:
        if charge:
            zone.ledger.reserve(zone.id, charge)
    except OutOfMemory:
        zone.backend.module_unload(zone.context, module)
        raise
    handle = zone.handles.add(H.MODULE, module)
    for var in module.globals.values():
        zone.allocations.add(var.address, var.size, owner=handle)
    return handle


class ProxyCalls(CallHandlers[Caller]):
    """The handlers every backend shares: isolation, quota and bookkeeping live here."""

    # -- init and device ----------------------------------------------------------------------

    def cuInit(self, ctx: Caller, req: c.cuInit_Request) -> int:
        return CUDA_SUCCESS if req.Flags == 0 else CUDA_ERROR_INVALID_VALUE

    def cuDriverGetVersion(
        self, ctx: Caller, req: c.cuDriverGetVersion_Request
    ) -> c.cuDriverGetVersion_Reply:
        return c.cuDriverGetVersion_Reply(ctx.zone.backend.device_info().driver_version)

    def cuDeviceGetCount(
        self, ctx: Caller, req: c.cuDeviceGetCount_Request
    ) -> c.cuDeviceGetCount_Reply:
        return c.cuDeviceGetCount_Reply(1)

    def cuDeviceGet(self, ctx: Caller, req: c.cuDeviceGet_Request) -> c.cuDeviceGet_Reply:
        _check_device(req.ordinal)
        return c.cuDeviceGet_Reply(DEVICE)

    def cuDeviceGetName(
        self, ctx: Caller, req: c.cuDeviceGetName_Request
    ) -> c.cuDeviceGetName_Reply | int:
        _check_device(req.dev)
        if req.len <= 0:
            return CUDA_ERROR_INVALID_VALUE
        name = ctx.zone.backend.device_info().name.encode()[: req.len - 1] + b"\0"
        return c.cuDeviceGetName_Reply(name)

    def cuDeviceGetUuid_v2(
        self, ctx: Caller, req: c.cuDeviceGetUuid_v2_Request
    ) -> c.cuDeviceGetUuid_v2_Reply:
        _check_device(req.dev)
        return c.cuDeviceGetUuid_v2_Reply(ctx.zone.backend.device_info().uuid)

    def cuDeviceTotalMem_v2(
        self, ctx: Caller, req: c.cuDeviceTotalMem_v2_Request
    ) -> c.cuDeviceTotalMem_v2_Reply:
        _check_device(req.dev)
        return c.cuDeviceTotalMem_v2_Reply(ctx.zone.ledger.mem_info(ctx.zone.id)[1])

    def cuDeviceGetAttribute(
        self, ctx: Caller, req: c.cuDeviceGetAttribute_Request
    ) -> c.cuDeviceGetAttribute_Reply | int:
        _check_device(req.dev)
        value = ctx.zone.backend.device_info().attributes.get(req.attrib)
        if value is None:
            return CUDA_ERROR_INVALID_VALUE
        return c.cuDeviceGetAttribute_Reply(0 if req.attrib in ATTRIBUTES_OFF_IN_ZONES else value)

    # -- contexts: one per zone ---------------------------------------------------------------

    def cuDevicePrimaryCtxRetain(
        self, ctx: Caller, req: c.cuDevicePrimaryCtxRetain_Request
    ) -> c.cuDevicePrimaryCtxRetain_Reply:
        _check_device(req.dev)
        return c.cuDevicePrimaryCtxRetain_Reply(ctx.zone.context_handle)

    def cuDevicePrimaryCtxRelease_v2(
        self, ctx: Caller, req: c.cuDevicePrimaryCtxRelease_v2_Request
    ) -> int:
        _check_device(req.dev)
        return CUDA_SUCCESS

    def cuDevicePrimaryCtxGetState(
        self, ctx: Caller, req: c.cuDevicePrimaryCtxGetState_Request
    ) -> c.cuDevicePrimaryCtxGetState_Reply:
        _check_device(req.dev)
        return c.cuDevicePrimaryCtxGetState_Reply(0, 1)

    def cuCtxCreate_v2(self, ctx: Caller, req: c.cuCtxCreate_v2_Request) -> c.cuCtxCreate_v2_Reply:
        # A zone gets exactly one context on the device; every context it creates is that one.
        _check_device(req.dev)
        return c.cuCtxCreate_v2_Reply(ctx.zone.context_handle)

    def cuCtxDestroy_v2(self, ctx: Caller, req: c.cuCtxDestroy_v2_Request) -> int:
        ctx.zone.handles.get(H.CONTEXT, req.ctx)
        return CUDA_SUCCESS

    def cuCtxSynchronize(self, ctx: Caller, req: c.cuCtxSynchronize_Request) -> int:
        ctx.zone.backend.synchronize(ctx.zone.context)
        return CUDA_SUCCESS

    # -- memory ---------------------------------------------------------------------------------

    def cuMemGetInfo_v2(
        self, ctx: Caller, req: c.cuMemGetInfo_v2_Request
    ) -> c.cuMemGetInfo_v2_Reply:
        free, total = ctx.zone.ledger.mem_info(ctx.zone.id)
        return c.cuMemGetInfo_v2_Reply(free, total)

    def cuMemAlloc_v2(self, ctx: Caller, req: c.cuMemAlloc_v2_Request) -> c.cuMemAlloc_v2_Reply:
        zone = ctx.zone
        if req.bytesize == 0:
            raise InvalidValue("zero-byte allocation")
        try:
            zone.ledger.reserve(zone.id, req.bytesize)  # before the backend: no race
        except OutOfMemory:
            used, limit = zone.memory()
            zone.bus.publish(
                zone.id, EventKind.QUOTA_EXCEEDED, "device memory quota exceeded",
                requested=req.bytesize, used=used, limit=limit,
            )  # fmt: skip
            raise
        try:
            ptr = zone.backend.mem_alloc(zone.context, req.bytesize)
        except BaseException:
            zone.ledger.release(zone.id, req.bytesize)
            raise
        zone.allocations.add(ptr, req.bytesize)
        zone.stats.record_allocation()
        return c.cuMemAlloc_v2_Reply(ptr)

    def cuMemFree_v2(self, ctx: Caller, req: c.cuMemFree_v2_Request) -> int:
        zone = ctx.zone
        size = zone.allocations.remove(req.dptr)
        zone.backend.mem_free(zone.context, req.dptr)
        zone.ledger.release(zone.id, size)
        zone.stats.record_free()
        return CUDA_SUCCESS

    def cuMemFreeAsync(self, ctx: Caller, req: c.cuMemFreeAsync_Request) -> int:
        """The zone can no longer name the memory; its quota gets it back when the stream has
        run the free."""
        zone = ctx.zone
        stream = _stream(ctx, req.hStream)
        size = zone.allocations.remove(req.dptr)

        def freed() -> None:
            zone.ledger.release(zone.id, size)
            zone.stats.record_free()

        try:
            zone.backend.mem_free_async(zone.context, req.dptr, stream, freed)
        except BaseException:
            zone.allocations.add(req.dptr, size)
            raise
        return CUDA_SUCCESS

    def _htod(self, ctx: Caller, dst: int, data: memoryview, stream: Stream | None) -> int:
        ctx.zone.allocations.check_range(dst, len(data))
        ctx.zone.backend.memcpy_htod(ctx.zone.context, dst, data, stream)
        ctx.zone.stats.record_memcpy(MemcpyDirection.HTOD, len(data))
        return CUDA_SUCCESS

    def _dtoh(self, ctx: Caller, src: int, size: int, stream: Stream | None) -> Buffer:
        ctx.zone.allocations.check_range(src, size)
        data = ctx.zone.backend.memcpy_dtoh(ctx.zone.context, src, size, stream)
        ctx.zone.stats.record_memcpy(MemcpyDirection.DTOH, size)
        return data

    def _dtod(self, ctx: Caller, dst: int, src: int, size: int, stream: Stream | None) -> int:
        ctx.zone.allocations.check_range(dst, size)
        ctx.zone.allocations.check_range(src, size)
        ctx.zone.backend.memcpy_dtod(ctx.zone.context, dst, src, size, stream)
        ctx.zone.stats.record_memcpy(MemcpyDirection.DTOD, size)
        return CUDA_SUCCESS

    def _memset(
        self, ctx: Caller, dst: int, value: int, width: int, count: int, stream: Stream | None
    ) -> int:
        ctx.zone.allocations.check_range(dst, width * count)
        ctx.zone.backend.memset(ctx.zone.context, dst, value, width, count, stream)
        return CUDA_SUCCESS

    def cuMemcpyHtoD_v2(self, ctx: Caller, req: c.cuMemcpyHtoD_v2_Request) -> int:
        return self._htod(ctx, req.dstDevice, memoryview(req.srcHost), None)

    def cuMemcpyDtoH_v2(
        self, ctx: Caller, req: c.cuMemcpyDtoH_v2_Request
    ) -> c.cuMemcpyDtoH_v2_Reply:
        return c.cuMemcpyDtoH_v2_Reply(self._dtoh(ctx, req.srcDevice, req.ByteCount, None))

    def cuMemcpyDtoD_v2(self, ctx: Caller, req: c.cuMemcpyDtoD_v2_Request) -> int:
        return self._dtod(ctx, req.dstDevice, req.srcDevice, req.ByteCount, None)

    def cuMemcpyHtoDAsync_v2(self, ctx: Caller, req: c.cuMemcpyHtoDAsync_v2_Request) -> int:
        stream = _stream(ctx, req.hStream)
        return self._htod(ctx, req.dstDevice, memoryview(req.srcHost), stream)

    def cuMemcpyDtoHAsync_v2(
        self, ctx: Caller, req: c.cuMemcpyDtoHAsync_v2_Request
    ) -> c.cuMemcpyDtoHAsync_v2_Reply:
        stream = _stream(ctx, req.hStream)
        return c.cuMemcpyDtoHAsync_v2_Reply(self._dtoh(ctx, req.srcDevice, req.ByteCount, stream))

    def cuMemcpyDtoDAsync_v2(self, ctx: Caller, req: c.cuMemcpyDtoDAsync_v2_Request) -> int:
        stream = _stream(ctx, req.hStream)
        return self._dtod(ctx, req.dstDevice, req.srcDevice, req.ByteCount, stream)

    # -- pinned host memory shared by the process (gpu_proxy/shared_host.py) -----------------

    def vgpuHostShare(self, ctx: Caller, req: c.vgpuHostShare_Request) -> int:
        ctx.shared.share(req.arena, req.size)
        return CUDA_SUCCESS

    def vgpuHostShareGrants(self, ctx: Caller, req: c.vgpuHostShareGrants_Request) -> int:
        if len(req.refs) % 4:
            raise InvalidValue(f"{len(req.refs)} bytes of grant refs is not a whole number")
        refs = memoryview(req.refs).cast("B").cast("I")
        ctx.shared.share_grants(req.arena, req.size, refs)
        return CUDA_SUCCESS

    def vgpuHostUnshare(self, ctx: Caller, req: c.vgpuHostUnshare_Request) -> int:
        # Work queued on a stream may still read or write the pages (cuMemFreeHost syncs too).
        ctx.zone.backend.synchronize(ctx.zone.context)
        ctx.shared.unshare(req.arena)
        return CUDA_SUCCESS

    def _htod_shared(
        self, ctx: Caller, dst: int, arena: int, offset: int, size: int, stream: Stream | None
    ) -> int:
        view = ctx.shared.view(arena, offset, size)
        ctx.zone.allocations.check_range(dst, size)
        ctx.zone.backend.memcpy_htod_shared(ctx.zone.context, dst, view, stream)
        ctx.zone.stats.record_memcpy(MemcpyDirection.HTOD, size)
        return CUDA_SUCCESS

    def vgpuMemcpyHtoDShared(self, ctx: Caller, req: c.vgpuMemcpyHtoDShared_Request) -> int:
        return self._htod_shared(ctx, req.dstDevice, req.arena, req.offset, req.ByteCount, None)

    def vgpuMemcpyHtoDSharedAsync(
        self, ctx: Caller, req: c.vgpuMemcpyHtoDSharedAsync_Request
    ) -> int:
        stream = _stream(ctx, req.hStream)
        return self._htod_shared(ctx, req.dstDevice, req.arena, req.offset, req.ByteCount, stream)

    def _dtoh_shared(
        self, ctx: Caller, arena: int, offset: int, src: int, size: int, stream: Stream | None
    ) -> int:
        view = ctx.shared.view(arena, offset, size)
        ctx.zone.allocations.check_range(src, size)
        ctx.zone.backend.memcpy_dtoh_into(ctx.zone.context, src, view, stream)
        ctx.zone.stats.record_memcpy(MemcpyDirection.DTOH, size)
        return CUDA_SUCCESS

    def vgpuMemcpyDtoHShared(self, ctx: Caller, req: c.vgpuMemcpyDtoHShared_Request) -> int:
        return self._dtoh_shared(ctx, req.arena, req.offset, req.srcDevice, req.ByteCount, None)

    def vgpuMemcpyDtoHSharedAsync(
        self, ctx: Caller, req: c.vgpuMemcpyDtoHSharedAsync_Request
    ) -> int:
        stream = _stream(ctx, req.hStream)
        return self._dtoh_shared(ctx, req.arena, req.offset, req.srcDevice, req.ByteCount, stream)

    def cuMemsetD8_v2(self, ctx: Caller, req: c.cuMemsetD8_v2_Request) -> int:
        return self._memset(ctx, req.dstDevice, req.uc, 1, req.N, None)

    def cuMemsetD32_v2(self, ctx: Caller, req: c.cuMemsetD32_v2_Request) -> int:
        return self._memset(ctx, req.dstDevice, req.ui, 4, req.N, None)

    def cuMemsetD8Async(self, ctx: Caller, req: c.cuMemsetD8Async_Request) -> int:
        return self._memset(ctx, req.dstDevice, req.uc, 1, req.N, _stream(ctx, req.hStream))

    def cuMemsetD32Async(self, ctx: Caller, req: c.cuMemsetD32Async_Request) -> int:
        return self._memset(ctx, req.dstDevice, req.ui, 4, req.N, _stream(ctx, req.hStream))

    # -- modules and launches -------------------------------------------------------------------

    def cuModuleLoadData(
        self, ctx: Caller, req: c.cuModuleLoadData_Request
    ) -> c.cuModuleLoadData_Reply:
        image = bytes(req.image)
        handle = _load_module(ctx, image)
        ctx.zone.images.put(ctx.zone.id, image)
        return c.cuModuleLoadData_Reply(handle)

    def vgpuModuleLoadCached(
        self, ctx: Caller, req: c.vgpuModuleLoadCached_Request
    ) -> c.vgpuModuleLoadCached_Reply:
        image = ctx.zone.images.get(ctx.zone.id, bytes(req.digest))
        if image is None:
            raise NotFound("no module image with that digest from this zone: send it")
        return c.vgpuModuleLoadCached_Reply(_load_module(ctx, image))

    def vgpuModuleGetKernels(
        self, ctx: Caller, req: c.vgpuModuleGetKernels_Request
    ) -> c.vgpuModuleGetKernels_Reply:
        module = ctx.zone.handles.get(H.MODULE, req.hmod)
        page = encode_page(list(module.kernels.values()), req.first, req.tableSize)
        return c.vgpuModuleGetKernels_Reply(page)

    def cuModuleUnload(self, ctx: Caller, req: c.cuModuleUnload_Request) -> int:
        zone = ctx.zone
        module = zone.handles.remove(H.MODULE, req.hmod)  # its functions go with it
        charge = zone.allocations.remove_owned(req.hmod)
        zone.backend.module_unload(zone.context, module)
        if charge:
            zone.ledger.release(zone.id, charge)
        return CUDA_SUCCESS

    def cuModuleGetGlobal_v2(
        self, ctx: Caller, req: c.cuModuleGetGlobal_v2_Request
    ) -> c.cuModuleGetGlobal_v2_Reply:
        module = ctx.zone.handles.get(H.MODULE, req.hmod)
        var = module.globals.get(req.name.decode(errors="replace"))
        if var is None:
            raise NotFound(f"module has no variable {req.name[:200]!r}")
        return c.cuModuleGetGlobal_v2_Reply(var.address, var.size)

    def cuModuleGetFunction(
        self, ctx: Caller, req: c.cuModuleGetFunction_Request
    ) -> c.cuModuleGetFunction_Reply:
        zone = ctx.zone
        module = zone.handles.get(H.MODULE, req.hmod)
        fn = zone.backend.module_function(zone.context, module, req.name.decode(errors="replace"))
        return c.cuModuleGetFunction_Reply(zone.handles.add(H.FUNCTION, fn, parent=req.hmod))

    def cuFuncGetAttribute(self, ctx: Caller, req: c.cuFuncGetAttribute_Request) -> int:
        ctx.zone.handles.get(H.FUNCTION, req.hfunc)
        return CUDA_ERROR_NOT_SUPPORTED

    def cuFuncSetAttribute(self, ctx: Caller, req: c.cuFuncSetAttribute_Request) -> int:
        """Only the dynamic shared memory limit reaches the backend: it is what a launch is
        checked against. Other attributes are libvgpu's to keep."""
        fn = ctx.zone.handles.get(H.FUNCTION, req.hfunc)
        if req.attrib != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES:
            return CUDA_ERROR_NOT_SUPPORTED
        ctx.zone.backend.function_set_max_dynamic_shared(ctx.zone.context, fn, req.value)
        return CUDA_SUCCESS

    def cuLaunchKernel(self, ctx: Caller, req: c.cuLaunchKernel_Request) -> int:
        zone = ctx.zone
        fn = zone.handles.get(H.FUNCTION, req.f)
        zone.backend.launch(
            zone.context,
            fn,
            (req.gridDimX, req.gridDimY, req.gridDimZ),
            (req.blockDimX, req.blockDimY, req.blockDimZ),
            req.sharedMemBytes,
            _stream(ctx, req.hStream),
            bytes(req.params),
        )
        zone.stats.record_launch()
        return CUDA_SUCCESS

    # -- streams and events ---------------------------------------------------------------------

    def cuStreamCreate(self, ctx: Caller, req: c.cuStreamCreate_Request) -> c.cuStreamCreate_Reply:
        stream = ctx.zone.backend.stream_create(ctx.zone.context, req.Flags)
        return c.cuStreamCreate_Reply(ctx.zone.handles.add(H.STREAM, stream))

    def cuStreamDestroy_v2(self, ctx: Caller, req: c.cuStreamDestroy_v2_Request) -> int:
        stream = ctx.zone.handles.remove(H.STREAM, req.hStream)
        ctx.zone.backend.stream_destroy(ctx.zone.context, stream)
        return CUDA_SUCCESS

    def cuStreamSynchronize(self, ctx: Caller, req: c.cuStreamSynchronize_Request) -> int:
        ctx.zone.backend.stream_synchronize(ctx.zone.context, _stream(ctx, req.hStream))
        return CUDA_SUCCESS

    def cuStreamQuery(self, ctx: Caller, req: c.cuStreamQuery_Request) -> int:
        idle = ctx.zone.backend.stream_query(ctx.zone.context, _stream(ctx, req.hStream))
        return CUDA_SUCCESS if idle else CUDA_ERROR_NOT_READY

    def cuStreamWaitEvent(self, ctx: Caller, req: c.cuStreamWaitEvent_Request) -> int:
        event = ctx.zone.handles.get(H.EVENT, req.hEvent)
        ctx.zone.backend.stream_wait_event(ctx.zone.context, _stream(ctx, req.hStream), event)
        return CUDA_SUCCESS

    def cuEventCreate(self, ctx: Caller, req: c.cuEventCreate_Request) -> c.cuEventCreate_Reply:
        event = ctx.zone.backend.event_create(ctx.zone.context, req.Flags)
        return c.cuEventCreate_Reply(ctx.zone.handles.add(H.EVENT, event))

    def cuEventRecord(self, ctx: Caller, req: c.cuEventRecord_Request) -> int:
        event = ctx.zone.handles.get(H.EVENT, req.hEvent)
        ctx.zone.backend.event_record(ctx.zone.context, event, _stream(ctx, req.hStream))
        return CUDA_SUCCESS

    def cuEventSynchronize(self, ctx: Caller, req: c.cuEventSynchronize_Request) -> int:
        event = ctx.zone.handles.get(H.EVENT, req.hEvent)
        ctx.zone.backend.event_synchronize(ctx.zone.context, event)
        return CUDA_SUCCESS

    def cuEventQuery(self, ctx: Caller, req: c.cuEventQuery_Request) -> int:
        event = ctx.zone.handles.get(H.EVENT, req.hEvent)
        done = ctx.zone.backend.event_query(ctx.zone.context, event)
        return CUDA_SUCCESS if done else CUDA_ERROR_NOT_READY

    def cuEventElapsedTime(
        self, ctx: Caller, req: c.cuEventElapsedTime_Request
    ) -> c.cuEventElapsedTime_Reply:
        start = ctx.zone.handles.get(H.EVENT, req.hStart)
        end = ctx.zone.handles.get(H.EVENT, req.hEnd)
        ms = ctx.zone.backend.event_elapsed_ms(ctx.zone.context, start, end)
        return c.cuEventElapsedTime_Reply(ms)

    def cuEventDestroy_v2(self, ctx: Caller, req: c.cuEventDestroy_v2_Request) -> int:
        event = ctx.zone.handles.remove(H.EVENT, req.hEvent)
        ctx.zone.backend.event_destroy(ctx.zone.context, event)
        return CUDA_SUCCESS

    # -- host functions: libvgpu runs them; gpu-proxy tells it when their stream got there ------

    def vgpuHostFuncMark(self, ctx: Caller, req: c.vgpuHostFuncMark_Request) -> int:
        zone = ctx.zone
        if len(ctx.host_marks) >= MAX_HOST_MARKS or req.mark in ctx.host_marks:
            raise InvalidValue(f"host-function mark {req.mark}: duplicate or too many pending")
        stream = _stream(ctx, req.hStream)
        event = zone.backend.event_create(zone.context, CU_EVENT_DISABLE_TIMING)
        zone.backend.event_record(zone.context, event, stream)
        ctx.host_marks[req.mark] = event
        return CUDA_SUCCESS

    def vgpuHostFuncPoll(
        self, ctx: Caller, req: c.vgpuHostFuncPoll_Request
    ) -> c.vgpuHostFuncPoll_Reply:
        zone = ctx.zone
        event = ctx.host_marks.get(req.mark)
        if event is None:
            raise InvalidHandle(f"no host-function mark {req.mark}")
        if not zone.backend.event_query(zone.context, event):
            return c.vgpuHostFuncPoll_Reply(0)
        del ctx.host_marks[req.mark]
        zone.backend.event_destroy(zone.context, event)
        return c.vgpuHostFuncPoll_Reply(1)

    # -- inter-process sharing: never across a zone's boundary ---------------------------------

    def cuIpcGetMemHandle(self, ctx: Caller, req: c.cuIpcGetMemHandle_Request) -> int:
        return CUDA_ERROR_NOT_PERMITTED

    def cuIpcOpenMemHandle_v2(self, ctx: Caller, req: c.cuIpcOpenMemHandle_v2_Request) -> int:
        return CUDA_ERROR_NOT_PERMITTED

    def cuIpcCloseMemHandle(self, ctx: Caller, req: c.cuIpcCloseMemHandle_Request) -> int:
        return CUDA_ERROR_NOT_PERMITTED

    def cuIpcGetEventHandle(self, ctx: Caller, req: c.cuIpcGetEventHandle_Request) -> int:
        return CUDA_ERROR_NOT_PERMITTED

    def cuIpcOpenEventHandle(self, ctx: Caller, req: c.cuIpcOpenEventHandle_Request) -> int:
        return CUDA_ERROR_NOT_PERMITTED


HANDLERS = ProxyCalls()
_RESULT_NAMES: dict[int, str] = {int(r): str(r.name) for r in CUresult}


def result_name(status: int) -> str:
    """The CUresult's name for metrics labels (dashboards read names, not numbers)."""
    return _RESULT_NAMES.get(status, str(status))


Handler = Callable[[Header, memoryview], Reply | None]


def call_handlers(caller: Caller) -> dict[int, Handler]:
    """The channel server's table for one caller: every call opcode of the call table."""

    def handle(header: Header, payload: memoryview) -> Reply | None:
        entry = DISPATCH[header.opcode]
        deferred = _take_deferred(caller, entry.name, entry.is_async)
        if deferred is not None:
            return deferred
        started = time.perf_counter()
        try:
            status, reply = invoke(HANDLERS, caller, entry, payload)
        except DecodeError:
            status, reply = CUDA_ERROR_INVALID_VALUE, b""
        except CudaError as exc:
            status, reply = exc.result, b""
        return _finish(caller, entry.name, entry.is_async, status, reply, started)

    return dict.fromkeys(DISPATCH, handle)


def _take_deferred(caller: Caller, name: str, is_async: bool) -> Reply | None:
    """A sync call answers the caller's kept fire-and-forget error instead of running (the
    calls in KEEPS_DEFERRED_ERROR leave it for the application's next call)."""
    if is_async or not caller.deferred_error or name in KEEPS_DEFERRED_ERROR:
        return None
    status, caller.deferred_error = caller.deferred_error, 0
    return Reply(status)


def _finish(
    caller: Caller,
    name: str,
    is_async: bool,
    status: int,
    reply: bytes | tuple[Buffer, ...],
    started: float,
) -> Reply | None:
    """Count the call; keep a fire-and-forget call's error for the next sync call."""
    caller.zone.stats.record_call(name, result_name(status), time.perf_counter() - started)
    if is_async:
        if status and not caller.deferred_error:
            caller.deferred_error = status
        return None
    return Reply(status, reply)


def _streamed_htod(caller: Caller, head: dict[str, int], reader: PayloadReader) -> int:
    zone = caller.zone
    dst, count = head["dstDevice"], head["ByteCount"]
    stream = _stream(caller, head["hStream"]) if "hStream" in head else None
    zone.allocations.check_range(dst, count)
    zone.backend.memcpy_htod_from(zone.context, dst, count, reader.read_into, stream)
    zone.stats.record_memcpy(MemcpyDirection.HTOD, count)
    return CUDA_SUCCESS


# Calls whose large requests are received piece by piece: the head into private memory (decoded
# and checked first), the data straight where the backend wants it (device memory on the sim),
# instead of into a private copy of the whole message and from there to the device.
_STREAMED: dict[str, Callable[[Caller, dict[str, int], PayloadReader], int]] = {
    "cuMemcpyHtoD_v2": _streamed_htod,
    "cuMemcpyHtoDAsync_v2": _streamed_htod,
}


def streamed_handlers(caller: Caller) -> dict[int, StreamedHandler]:
    """The channel server's streamed handlers for one caller (large host-to-device copies),
    with the same deferred-error and accounting rules as ``call_handlers``."""

    def handle(header: Header, reader: PayloadReader) -> Reply | None:
        entry = DISPATCH[header.opcode]
        head_struct = entry.codec.request_head
        assert head_struct is not None
        deferred = _take_deferred(caller, entry.name, entry.is_async)
        if deferred is not None:
            return deferred
        started = time.perf_counter()
        try:
            if reader.remaining < head_struct.size:
                raise DecodeError(f"{entry.name}: shorter than its {head_struct.size}-byte head")
            raw = bytearray(head_struct.size)
            reader.read_into(raw)
            head = dict(zip(entry.codec.request_head_fields, head_struct.unpack(raw), strict=True))
            if head["ByteCount"] != reader.remaining:
                raise DecodeError(f"{entry.name}: ByteCount is not the data that follows")
            status = _STREAMED[entry.name](caller, head, reader)
        except DecodeError:
            status = CUDA_ERROR_INVALID_VALUE
        except CudaError as exc:
            status = exc.result
        return _finish(caller, entry.name, entry.is_async, status, b"", started)

    return {op: handle for op, entry in DISPATCH.items() if entry.name in _STREAMED}
