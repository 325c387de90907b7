/*
 * cuGetProcAddress: how cudart, cuBLAS, PyTorch and cuda-python find driver entry points. They
 * ask by base name ("cuMemAlloc") and the CUDA version whose ABI they were built for; the driver
 * answers with the newest variant introduced no later than that version (cuMemAlloc at 3020 and
 * up is cuMemAlloc_v2). With CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM the per-thread-stream
 * variant (_ptds/_ptsz) is returned where one exists. The versions are those of the toolkit's
 * cudaTypedefs.h (PFN_<name>_v<version>).
 *
 * A name or variant libvgpu does not implement is refused with CUDA_ERROR_NOT_FOUND and
 * CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND, never an older variant of another ABI. cudart asks for
 * every entry point it knows (about 450) at start-up, so the names refused are said on stderr,
 * once each, only when VGPU_LOG_UNIMPLEMENTED=1: that shows what a failing program looked for.
 */
#include "vgpu.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct proc {
    const char *name; /* base name */
    int version;      /* CUDA version that introduced this variant */
    void *fn;         /* its implementation */
    void *ptds;       /* per-thread default stream variant, or NULL */
};

VGPU_API CUresult CUDAAPI vgpu_get_proc_address_v1(const char *symbol, void **pfn,
                                                   int cudaVersion, cuuint64_t flags)
    __asm__("cuGetProcAddress");

#define P(name, version, fn) {#name, version, (void *)(fn), NULL}
#define PT(name, version, fn, ptds) {#name, version, (void *)(fn), (void *)(ptds)}
/* A variant libvgpu lacks: a caller asking for its version must not get an older ABI. */
#define NONE(name, version) {#name, version, NULL, NULL}

/* Rows of one name are consecutive and in increasing version. */
static const struct proc table[] = {
    P(cuInit, 2000, cuInit),
    P(cuDriverGetVersion, 2020, cuDriverGetVersion),
    P(cuGetErrorName, 6000, cuGetErrorName),
    P(cuGetErrorString, 6000, cuGetErrorString),
    P(cuGetProcAddress, 11030, vgpu_get_proc_address_v1),
    P(cuGetProcAddress, 12000, cuGetProcAddress_v2),
    P(cuGetExportTable, 3000, cuGetExportTable),
    /* devices */
    P(cuDeviceGet, 2000, cuDeviceGet),
    P(cuDeviceGetCount, 2000, cuDeviceGetCount),
    P(cuDeviceGetName, 2000, cuDeviceGetName),
    P(cuDeviceGetUuid, 9020, cuDeviceGetUuid),
    P(cuDeviceGetUuid, 11040, cuDeviceGetUuid_v2),
    P(cuDeviceTotalMem, 3020, cuDeviceTotalMem_v2),
    P(cuDeviceGetAttribute, 2000, cuDeviceGetAttribute),
    /* contexts */
    P(cuDevicePrimaryCtxRetain, 7000, cuDevicePrimaryCtxRetain),
    P(cuDevicePrimaryCtxRelease, 7000, cuDevicePrimaryCtxRelease),
    P(cuDevicePrimaryCtxRelease, 11000, cuDevicePrimaryCtxRelease_v2),
    P(cuDevicePrimaryCtxGetState, 7000, cuDevicePrimaryCtxGetState),
    P(cuCtxCreate, 3020, cuCtxCreate_v2),
    NONE(cuCtxCreate, 11040),
    P(cuCtxCreate, 12050, cuCtxCreate_v4),
    P(cuCtxDestroy, 4000, cuCtxDestroy_v2),
    P(cuCtxGetCurrent, 4000, cuCtxGetCurrent),
    P(cuCtxSetCurrent, 4000, cuCtxSetCurrent),
    P(cuCtxPushCurrent, 4000, cuCtxPushCurrent_v2),
    P(cuCtxPopCurrent, 4000, cuCtxPopCurrent_v2),
    P(cuCtxGetDevice, 2000, cuCtxGetDevice),
    P(cuCtxGetDevice, 13000, cuCtxGetDevice_v2),
    P(cuCtxSynchronize, 2000, cuCtxSynchronize),
    P(cuCtxSynchronize, 13000, cuCtxSynchronize_v2),
    /* memory */
    P(cuMemGetInfo, 3020, cuMemGetInfo_v2),
    P(cuMemAlloc, 3020, cuMemAlloc_v2),
    NONE(cuMemAllocHost, 2000),
    P(cuMemAllocHost, 3020, cuMemAllocHost_v2),
    P(cuMemHostAlloc, 2020, cuMemHostAlloc),
    P(cuMemFreeHost, 2000, cuMemFreeHost),
    P(cuMemHostGetFlags, 2030, cuMemHostGetFlags),
    P(cuMemHostRegister, 4000, cuMemHostRegister_v2),
    P(cuMemHostRegister, 6050, cuMemHostRegister_v2),
    P(cuMemHostUnregister, 4000, cuMemHostUnregister),
    P(cuMemFree, 3020, cuMemFree_v2),
    P(cuMemGetAddressRange, 3020, cuMemGetAddressRange_v2),
    PT(cuMemcpy, 4000, cuMemcpy, cuMemcpy_ptds),
    PT(cuMemcpyAsync, 4000, cuMemcpyAsync, cuMemcpyAsync_ptsz),
    PT(cuMemcpyHtoD, 3020, cuMemcpyHtoD_v2, cuMemcpyHtoD_v2_ptds),
    PT(cuMemcpyDtoH, 3020, cuMemcpyDtoH_v2, cuMemcpyDtoH_v2_ptds),
    PT(cuMemcpyDtoD, 3020, cuMemcpyDtoD_v2, cuMemcpyDtoD_v2_ptds),
    PT(cuMemcpyHtoDAsync, 3020, cuMemcpyHtoDAsync_v2, cuMemcpyHtoDAsync_v2_ptsz),
    PT(cuMemcpyDtoHAsync, 3020, cuMemcpyDtoHAsync_v2, cuMemcpyDtoHAsync_v2_ptsz),
    PT(cuMemcpyDtoDAsync, 3020, cuMemcpyDtoDAsync_v2, cuMemcpyDtoDAsync_v2_ptsz),
    PT(cuMemsetD8, 3020, cuMemsetD8_v2, cuMemsetD8_v2_ptds),
    PT(cuMemsetD32, 3020, cuMemsetD32_v2, cuMemsetD32_v2_ptds),
    PT(cuMemsetD8Async, 3020, cuMemsetD8Async, cuMemsetD8Async_ptsz),
    PT(cuMemsetD32Async, 3020, cuMemsetD32Async, cuMemsetD32Async_ptsz),
    PT(cuMemAllocAsync, 11020, cuMemAllocAsync, cuMemAllocAsync_ptsz),
    PT(cuMemAllocFromPoolAsync, 11020, cuMemAllocFromPoolAsync, cuMemAllocFromPoolAsync_ptsz),
    PT(cuMemFreeAsync, 11020, cuMemFreeAsync, cuMemFreeAsync_ptsz),
    P(cuDeviceGetDefaultMemPool, 11020, cuDeviceGetDefaultMemPool),
    P(cuDeviceGetMemPool, 11020, cuDeviceGetMemPool),
    P(cuDeviceSetMemPool, 11020, cuDeviceSetMemPool),
    P(cuMemPoolGetAttribute, 11020, cuMemPoolGetAttribute),
    P(cuMemPoolSetAttribute, 11020, cuMemPoolSetAttribute),
    P(cuMemPoolTrimTo, 11020, cuMemPoolTrimTo),
    P(cuPointerGetAttribute, 4000, cuPointerGetAttribute),
    P(cuPointerGetAttributes, 7000, cuPointerGetAttributes),
    /* modules, libraries, launches */
    P(cuModuleLoad, 2000, cuModuleLoad),
    P(cuModuleLoadData, 2000, cuModuleLoadData),
    P(cuModuleLoadFatBinary, 2000, cuModuleLoadFatBinary),
    P(cuModuleUnload, 2000, cuModuleUnload),
    P(cuModuleGetFunction, 2000, cuModuleGetFunction),
    P(cuModuleGetGlobal, 3020, cuModuleGetGlobal_v2),
    P(cuLibraryLoadData, 12000, cuLibraryLoadData),
    P(cuLibraryUnload, 12000, cuLibraryUnload),
    P(cuLibraryGetKernel, 12000, cuLibraryGetKernel),
    P(cuLibraryGetModule, 12000, cuLibraryGetModule),
    P(cuLibraryGetGlobal, 12000, cuLibraryGetGlobal),
    P(cuKernelGetFunction, 12000, cuKernelGetFunction),
    P(cuKernelGetAttribute, 12000, cuKernelGetAttribute),
    P(cuKernelSetAttribute, 12000, cuKernelSetAttribute),
    P(cuFuncGetAttribute, 2020, cuFuncGetAttribute),
    P(cuFuncGetParamInfo, 12040, cuFuncGetParamInfo),
    P(cuFuncSetAttribute, 9000, cuFuncSetAttribute),
    PT(cuLaunchKernel, 4000, cuLaunchKernel, cuLaunchKernel_ptsz),
    PT(cuLaunchKernelEx, 11060, cuLaunchKernelEx, cuLaunchKernelEx_ptsz),
    P(cuOccupancyMaxActiveBlocksPerMultiprocessor, 6050,
      cuOccupancyMaxActiveBlocksPerMultiprocessor),
    P(cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags, 7000,
      cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags),
    P(cuOccupancyMaxPotentialBlockSize, 6050, cuOccupancyMaxPotentialBlockSize),
    P(cuOccupancyMaxPotentialBlockSizeWithFlags, 7000, cuOccupancyMaxPotentialBlockSizeWithFlags),
    /* streams and events */
    P(cuStreamCreate, 2000, cuStreamCreate),
    P(cuStreamCreateWithPriority, 5050, cuStreamCreateWithPriority),
    PT(cuStreamGetPriority, 5050, cuStreamGetPriority, cuStreamGetPriority_ptsz),
    PT(cuStreamGetFlags, 5050, cuStreamGetFlags, cuStreamGetFlags_ptsz),
    PT(cuStreamGetCtx, 9020, cuStreamGetCtx, cuStreamGetCtx_ptsz),
    P(cuCtxGetStreamPriorityRange, 5050, cuCtxGetStreamPriorityRange),
    P(cuStreamDestroy, 4000, cuStreamDestroy_v2),
    PT(cuStreamSynchronize, 2000, cuStreamSynchronize, cuStreamSynchronize_ptsz),
    PT(cuStreamQuery, 2000, cuStreamQuery, cuStreamQuery_ptsz),
    PT(cuStreamWaitEvent, 3020, cuStreamWaitEvent, cuStreamWaitEvent_ptsz),
    PT(cuStreamAddCallback, 5000, cuStreamAddCallback, cuStreamAddCallback_ptsz),
    PT(cuLaunchHostFunc, 10000, cuLaunchHostFunc, cuLaunchHostFunc_ptsz),
    PT(cuStreamIsCapturing, 10000, cuStreamIsCapturing, cuStreamIsCapturing_ptsz),
    NONE(cuStreamGetCaptureInfo, 10010),
    PT(cuStreamGetCaptureInfo, 11030, cuStreamGetCaptureInfo_v2, cuStreamGetCaptureInfo_v2_ptsz),
    PT(cuStreamGetCaptureInfo, 12030, cuStreamGetCaptureInfo_v3, cuStreamGetCaptureInfo_v3_ptsz),
    P(cuThreadExchangeStreamCaptureMode, 10010, cuThreadExchangeStreamCaptureMode),
    P(cuModuleGetLoadingMode, 11070, cuModuleGetLoadingMode),
    P(cuEventCreate, 2000, cuEventCreate),
    PT(cuEventRecord, 2000, cuEventRecord, cuEventRecord_ptsz),
    P(cuEventSynchronize, 2000, cuEventSynchronize),
    P(cuEventQuery, 2000, cuEventQuery),
    P(cuEventElapsedTime, 2000, cuEventElapsedTime),
    P(cuEventElapsedTime, 12080, cuEventElapsedTime_v2),
    P(cuEventDestroy, 4000, cuEventDestroy_v2),
    /* features gpu-proxy does not offer a zone (unsupported.c): present, answering NOT_SUPPORTED */
    P(cuMemAddressReserve, 10020, cuMemAddressReserve),
    P(cuMemAddressFree, 10020, cuMemAddressFree),
    P(cuMemCreate, 10020, cuMemCreate),
    P(cuMemRelease, 10020, cuMemRelease),
    P(cuMemMap, 10020, cuMemMap),
    P(cuMemUnmap, 10020, cuMemUnmap),
    P(cuMemSetAccess, 10020, cuMemSetAccess),
    P(cuMemGetAllocationGranularity, 10020, cuMemGetAllocationGranularity),
    P(cuMemGetAllocationPropertiesFromHandle, 10020, cuMemGetAllocationPropertiesFromHandle),
    P(cuMemRetainAllocationHandle, 11000, cuMemRetainAllocationHandle),
    P(cuMemExportToShareableHandle, 10020, cuMemExportToShareableHandle),
    P(cuMemImportFromShareableHandle, 10020, cuMemImportFromShareableHandle),
    NONE(cuStreamWriteValue32, 8000),
    PT(cuStreamWriteValue32, 11070, cuStreamWriteValue32_v2, cuStreamWriteValue32_v2_ptsz),
    P(cuMulticastCreate, 12010, cuMulticastCreate),
    P(cuMulticastAddDevice, 12010, cuMulticastAddDevice),
    P(cuMulticastBindMem, 12010, cuMulticastBindMem),
    P(cuMulticastUnbind, 12010, cuMulticastUnbind),
    P(cuGreenCtxCreate, 12040, cuGreenCtxCreate),
    P(cuGreenCtxDestroy, 12040, cuGreenCtxDestroy),
    P(cuGreenCtxStreamCreate, 12050, cuGreenCtxStreamCreate),
    P(cuCtxFromGreenCtx, 12040, cuCtxFromGreenCtx),
    P(cuDeviceGetDevResource, 12040, cuDeviceGetDevResource),
    P(cuDevSmResourceSplitByCount, 12040, cuDevSmResourceSplitByCount),
    P(cuDevResourceGenerateDesc, 12040, cuDevResourceGenerateDesc),
    P(cuLogsRegisterCallback, 12090, cuLogsRegisterCallback),
    P(cuLogsUnregisterCallback, 12090, cuLogsUnregisterCallback),
    /* inter-process sharing (gpu-proxy refuses it) */
    P(cuIpcGetMemHandle, 4010, cuIpcGetMemHandle),
    P(cuIpcOpenMemHandle, 4010, cuIpcOpenMemHandle),
    P(cuIpcOpenMemHandle, 11000, cuIpcOpenMemHandle_v2),
    P(cuIpcCloseMemHandle, 4010, cuIpcCloseMemHandle),
    P(cuIpcGetEventHandle, 4010, cuIpcGetEventHandle),
    P(cuIpcOpenEventHandle, 4010, cuIpcOpenEventHandle),
};

#define NPROCS (sizeof(table) / sizeof(table[0]))

/* Names asked for and not found, each said once on stderr (when asked to). */
static pthread_mutex_t missing_lock = PTHREAD_MUTEX_INITIALIZER;
static char **missing;
static size_t nmissing;

static void report_missing(const char *symbol)
{
    const char *env = getenv("VGPU_LOG_UNIMPLEMENTED");
    char **grown, *copy;

    if (!env || strcmp(env, "1") != 0)
        return;
    pthread_mutex_lock(&missing_lock);
    for (size_t i = 0; i < nmissing; i++) {
        if (strcmp(missing[i], symbol) == 0) {
            pthread_mutex_unlock(&missing_lock);
            return;
        }
    }
    grown = realloc(missing, (nmissing + 1) * sizeof(*missing));
    copy = strdup(symbol);
    if (grown)
        missing = grown;
    if (grown && copy)
        missing[nmissing++] = copy;
    else
        free(copy);
    pthread_mutex_unlock(&missing_lock);
    vgpu_log("cuGetProcAddress: %s is not implemented", symbol);
}

VGPU_API CUresult CUDAAPI cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion,
                                             cuuint64_t flags,
                                             CUdriverProcAddressQueryResult *symbolStatus)
{
    const struct proc *best = NULL;
    int known = 0;

    if (symbolStatus)
        *symbolStatus = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    if (!symbol || !pfn || cudaVersion > CUDA_VERSION ||
        (flags & ~(cuuint64_t)(CU_GET_PROC_ADDRESS_LEGACY_STREAM |
                               CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM)))
        return CUDA_ERROR_INVALID_VALUE;
    *pfn = NULL;
    for (size_t i = 0; i < NPROCS; i++) {
        if (strcmp(table[i].name, symbol) != 0)
            continue;
        known = 1;
        if (table[i].version <= cudaVersion)
            best = &table[i];
    }
    if (!best && known) {
        if (symbolStatus)
            *symbolStatus = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
        return CUDA_ERROR_NOT_FOUND;
    }
    if (!best || !best->fn) {
        report_missing(symbol);
        return CUDA_ERROR_NOT_FOUND;
    }
    *pfn = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) && best->ptds ? best->ptds
                                                                                  : best->fn;
    if (symbolStatus)
        *symbolStatus = CU_GET_PROC_ADDRESS_SUCCESS;
    return CUDA_SUCCESS;
}

/* CUDA 11.3's cuGetProcAddress, without the status. Its exported name is cuGetProcAddress,
 * which cuda.h declares with the 12.0 prototype, hence the C name. */
CUresult CUDAAPI vgpu_get_proc_address_v1(const char *symbol, void **pfn, int cudaVersion,
                                          cuuint64_t flags)
{
    return cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, NULL);
}
