/*
 * CUDA 13's context calls that name their context (NULL: the current one). gpu-proxy holds one
 * context per zone, so synchronizing any of the process's contexts is synchronizing that one.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

VGPU_API CUresult CUDAAPI cuCtxGetDevice_v2(CUdevice *device, CUcontext ctx)
{
    CUdevice dev;
    CUresult r = vgpu_context_or_current(ctx, &dev);

    if (r)
        return r;
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    *device = dev;
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuCtxSynchronize_v2(CUcontext ctx)
{
    uint8_t rep[8];
    size_t len;
    CUdevice dev;
    CUresult r = vgpu_context_or_current(ctx, &dev);

    if (r)
        return r;
    vgpu_host_funcs_wait(0);
    return vgpu_call(VGPU_OP_cuCtxSynchronize, NULL, 0, rep, sizeof(rep), &len);
}
