/*
 * What a zone answers for features gpu-proxy does not offer it, and the driver queries programs
 * rely on anyway (PyTorch resolves the virtual memory calls at start-up and asks whether a
 * stream is capturing before every allocation): the entry points exist, the device attributes
 * say the features are absent, and the calls answer CUDA_ERROR_NOT_SUPPORTED. No stream ever
 * captures (libvgpu offers no graphs); the capture mode is kept per thread; libraries load
 * lazily. Prints "ok".
 */
#include "check.h"

static const char *const resolved[] = {
    "cuMemAddressReserve", "cuMemAddressFree", "cuMemCreate", "cuMemRelease", "cuMemMap",
    "cuMemUnmap", "cuMemSetAccess", "cuMemGetAllocationGranularity",
    "cuMemExportToShareableHandle", "cuMemImportFromShareableHandle",
    "cuMemGetAllocationPropertiesFromHandle", "cuMemRetainAllocationHandle",
    "cuStreamWriteValue32", "cuMulticastCreate", "cuMulticastAddDevice", "cuMulticastBindMem",
    "cuMulticastUnbind", "cuGreenCtxCreate", "cuGreenCtxDestroy", "cuGreenCtxStreamCreate",
    "cuCtxFromGreenCtx", "cuDeviceGetDevResource", "cuDevSmResourceSplitByCount",
    "cuDevResourceGenerateDesc", "cuLogsRegisterCallback", "cuLogsUnregisterCallback",
    "cuStreamIsCapturing", "cuStreamGetCaptureInfo", "cuThreadExchangeStreamCaptureMode",
    "cuModuleGetLoadingMode",
};

int main(void)
{
    CUstream s;
    CUstreamCaptureStatus status;
    CUstreamCaptureMode mode;
    CUmoduleLoadingMode loading;
    CUmemGenericAllocationHandle handle;
    CUmemAllocationProp prop = {.type = CU_MEM_ALLOCATION_TYPE_PINNED,
                                .location = {CU_MEM_LOCATION_TYPE_DEVICE, 0}};
    CUdeviceptr p = 0;
    size_t granularity;
    int value;
    void *fn;
    CUdriverProcAddressQueryResult found;

    primary_context();
    CHECK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    for (size_t i = 0; i < sizeof(resolved) / sizeof(resolved[0]); i++) {
        fn = NULL;
        CHECK(cuGetProcAddress(resolved[i], &fn, 13000, 0, &found));
        REQUIRE(fn != NULL && found == CU_GET_PROC_ADDRESS_SUCCESS);
    }

    status = (CUstreamCaptureStatus)99;
    CHECK(cuStreamIsCapturing(s, &status));
    REQUIRE(status == CU_STREAM_CAPTURE_STATUS_NONE);
    status = (CUstreamCaptureStatus)99;
    CHECK(cuStreamIsCapturing(NULL, &status));
    REQUIRE(status == CU_STREAM_CAPTURE_STATUS_NONE);
    EXPECT(cuStreamIsCapturing((CUstream)&value, &status), CUDA_ERROR_INVALID_HANDLE);
    status = (CUstreamCaptureStatus)99;
    CHECK(cuStreamGetCaptureInfo(s, &status, NULL, NULL, NULL, NULL, NULL));
    REQUIRE(status == CU_STREAM_CAPTURE_STATUS_NONE);

    mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    CHECK(cuThreadExchangeStreamCaptureMode(&mode));
    REQUIRE(mode == CU_STREAM_CAPTURE_MODE_GLOBAL);
    mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
    CHECK(cuThreadExchangeStreamCaptureMode(&mode));
    REQUIRE(mode == CU_STREAM_CAPTURE_MODE_RELAXED);
    mode = (CUstreamCaptureMode)42;
    EXPECT(cuThreadExchangeStreamCaptureMode(&mode), CUDA_ERROR_INVALID_VALUE);

    CHECK(cuModuleGetLoadingMode(&loading));
    REQUIRE(loading == CU_MODULE_LAZY_LOADING);

    CHECK(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, 0));
    REQUIRE(value == 0);
    CHECK(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_MULTICAST_SUPPORTED, 0));
    REQUIRE(value == 0);
    EXPECT(cuMemAddressReserve(&p, 2 << 20, 0, 0, 0), CUDA_ERROR_NOT_SUPPORTED);
    EXPECT(cuMemCreate(&handle, 2 << 20, &prop, 0), CUDA_ERROR_NOT_SUPPORTED);
    EXPECT(cuMemGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
           CUDA_ERROR_NOT_SUPPORTED);
    EXPECT(cuStreamWriteValue32(s, p, 1, 0), CUDA_ERROR_NOT_SUPPORTED);

    CHECK(cuStreamDestroy(s));
    printf("ok\n");
    return 0;
}
