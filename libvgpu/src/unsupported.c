/*
 * Entry points of features gpu-proxy does not offer a zone: virtual memory management
 * (cuMemCreate, cuMemMap, ...; a zone's memory is cuMemAlloc'd and charged by gpu-proxy),
 * shareable memory handles, stream memory operations, multicast objects, green contexts and the
 * driver's log callbacks. A real driver on a GPU without these features still has the symbols,
 * and programs resolve them at start-up whether or not they use them (PyTorch asserts on the
 * VMM ones): so they exist here, and answer CUDA_ERROR_NOT_SUPPORTED, said once per feature on
 * stderr. gpu-proxy reports the matching device attributes as 0
 * (CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, ..._MULTICAST_SUPPORTED, ...), which
 * is how a program is meant to find out before calling.
 */
#include "vgpu.h"

enum feature { VMM, SHAREABLE, MEM_OPS, MULTICAST, GREEN_CONTEXTS, LOG_CALLBACKS, NFEATURES };

static const char *const what[NFEATURES] = {
    "virtual memory management (cuMemCreate, cuMemMap, ...)",
    "shareable memory handles",
    "stream memory operations",
    "multicast objects",
    "green contexts",
    "driver log callbacks",
};

static CUresult refuse(enum feature f, const char *call)
{
    static int said[NFEATURES];
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!__atomic_exchange_n(&said[f], 1, __ATOMIC_RELAXED))
        vgpu_log("%s: CUDA_ERROR_NOT_SUPPORTED: zones are not offered %s (the device "
                 "attribute says so)",
                 call, what[f]);
    return CUDA_ERROR_NOT_SUPPORTED;
}

#define REFUSE(feature) return refuse(feature, __func__)

VGPU_API CUresult CUDAAPI cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment,
                                              CUdeviceptr addr, unsigned long long flags)
{
    (void)ptr, (void)size, (void)alignment, (void)addr, (void)flags;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    (void)ptr, (void)size;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                                      const CUmemAllocationProp *prop, unsigned long long flags)
{
    (void)handle, (void)size, (void)prop, (void)flags;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemRelease(CUmemGenericAllocationHandle handle)
{
    (void)handle;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemMap(CUdeviceptr ptr, size_t size, size_t offset,
                                   CUmemGenericAllocationHandle handle, unsigned long long flags)
{
    (void)ptr, (void)size, (void)offset, (void)handle, (void)flags;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    (void)ptr, (void)size;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc,
                                         size_t count)
{
    (void)ptr, (void)size, (void)desc, (void)count;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemGetAllocationGranularity(size_t *granularity,
                                                        const CUmemAllocationProp *prop,
                                                        CUmemAllocationGranularity_flags option)
{
    (void)granularity, (void)prop, (void)option;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemGetAllocationPropertiesFromHandle(
    CUmemAllocationProp *prop, CUmemGenericAllocationHandle handle)
{
    (void)prop, (void)handle;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle,
                                                      void *addr)
{
    (void)handle, (void)addr;
    REFUSE(VMM);
}

VGPU_API CUresult CUDAAPI cuMemExportToShareableHandle(void *shareableHandle,
                                                       CUmemGenericAllocationHandle handle,
                                                       CUmemAllocationHandleType handleType,
                                                       unsigned long long flags)
{
    (void)shareableHandle, (void)handle, (void)handleType, (void)flags;
    REFUSE(SHAREABLE);
}

VGPU_API CUresult CUDAAPI cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle,
                                                         void *osHandle,
                                                         CUmemAllocationHandleType shHandleType)
{
    (void)handle, (void)osHandle, (void)shHandleType;
    REFUSE(SHAREABLE);
}

VGPU_API CUresult CUDAAPI cuStreamWriteValue32_v2(CUstream stream, CUdeviceptr addr,
                                                  cuuint32_t value, unsigned int flags)
{
    (void)stream, (void)addr, (void)value, (void)flags;
    REFUSE(MEM_OPS);
}

CUresult CUDAAPI cuStreamWriteValue32_v2_ptsz(CUstream stream, CUdeviceptr addr,
                                              cuuint32_t value, unsigned int flags)
    VGPU_ALIAS(cuStreamWriteValue32_v2);

VGPU_API CUresult CUDAAPI cuMulticastCreate(CUmemGenericAllocationHandle *mcHandle,
                                            const CUmulticastObjectProp *prop)
{
    (void)mcHandle, (void)prop;
    REFUSE(MULTICAST);
}

VGPU_API CUresult CUDAAPI cuMulticastAddDevice(CUmemGenericAllocationHandle mcHandle, CUdevice dev)
{
    (void)mcHandle, (void)dev;
    REFUSE(MULTICAST);
}

VGPU_API CUresult CUDAAPI cuMulticastBindMem(CUmemGenericAllocationHandle mcHandle, size_t mcOffset,
                                             CUmemGenericAllocationHandle memHandle,
                                             size_t memOffset, size_t size,
                                             unsigned long long flags)
{
    (void)mcHandle, (void)mcOffset, (void)memHandle, (void)memOffset, (void)size, (void)flags;
    REFUSE(MULTICAST);
}

VGPU_API CUresult CUDAAPI cuMulticastUnbind(CUmemGenericAllocationHandle mcHandle, CUdevice dev,
                                            size_t mcOffset, size_t size)
{
    (void)mcHandle, (void)dev, (void)mcOffset, (void)size;
    REFUSE(MULTICAST);
}

VGPU_API CUresult CUDAAPI cuGreenCtxCreate(CUgreenCtx *phCtx, CUdevResourceDesc desc, CUdevice dev,
                                           unsigned int flags)
{
    (void)phCtx, (void)desc, (void)dev, (void)flags;
    REFUSE(GREEN_CONTEXTS);
}

VGPU_API CUresult CUDAAPI cuGreenCtxDestroy(CUgreenCtx hCtx)
{
    (void)hCtx;
    REFUSE(GREEN_CONTEXTS);
}

VGPU_API CUresult CUDAAPI cuGreenCtxStreamCreate(CUstream *phStream, CUgreenCtx greenCtx,
                                                 unsigned int flags, int priority)
{
    (void)phStream, (void)greenCtx, (void)flags, (void)priority;
    REFUSE(GREEN_CONTEXTS);
}

VGPU_API CUresult CUDAAPI cuCtxFromGreenCtx(CUcontext *pContext, CUgreenCtx hCtx)
{
    (void)pContext, (void)hCtx;
    REFUSE(GREEN_CONTEXTS);
}

VGPU_API CUresult CUDAAPI cuDeviceGetDevResource(CUdevice device, CUdevResource *resource,
                                                 CUdevResourceType type)
{
    (void)device, (void)resource, (void)type;
    REFUSE(GREEN_CONTEXTS);
}

VGPU_API CUresult CUDAAPI cuDevSmResourceSplitByCount(CUdevResource *result, unsigned int *nbGroups,
                                                      const CUdevResource *input,
                                                      CUdevResource *remaining,
                                                      unsigned int useFlags, unsigned int minCount)
{
    (void)result, (void)nbGroups, (void)input, (void)remaining, (void)useFlags, (void)minCount;
    REFUSE(GREEN_CONTEXTS);
}

VGPU_API CUresult CUDAAPI cuDevResourceGenerateDesc(CUdevResourceDesc *phDesc,
                                                    CUdevResource *resources,
                                                    unsigned int nbResources)
{
    (void)phDesc, (void)resources, (void)nbResources;
    REFUSE(GREEN_CONTEXTS);
}

VGPU_API CUresult CUDAAPI cuLogsRegisterCallback(CUlogsCallback callbackFunc, void *userData,
                                                 CUlogsCallbackHandle *callback_out)
{
    (void)callbackFunc, (void)userData, (void)callback_out;
    REFUSE(LOG_CALLBACKS);
}

VGPU_API CUresult CUDAAPI cuLogsUnregisterCallback(CUlogsCallbackHandle callback)
{
    (void)callback;
    REFUSE(LOG_CALLBACKS);
}
