/*
 * cuMemcpy / cuMemcpyAsync (cudaMemcpyDefault): with unified addressing the direction follows from
 * where each pointer lives. A pointer inside one of this process's allocations is device memory;
 * any other is the caller's host memory. Host-to-host copies never leave the zone: done here,
 * after the stream's earlier work for the asynchronous form.
 */
#include "vgpu.h"

#include <string.h>

static int on_device(CUdeviceptr p)
{
    int found;

    vgpu_lock();
    found = vgpu_allocations_find(p) != NULL;
    vgpu_unlock();
    return found;
}

static CUresult copy(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream stream, int async)
{
    int dst_dev = on_device(dst), src_dev = on_device(src);
    CUresult r;

    if (dst_dev && src_dev)
        return async ? cuMemcpyDtoDAsync_v2(dst, src, n, stream) : cuMemcpyDtoD_v2(dst, src, n);
    if (dst_dev)
        return async ? cuMemcpyHtoDAsync_v2(dst, (const void *)(uintptr_t)src, n, stream)
                     : cuMemcpyHtoD_v2(dst, (const void *)(uintptr_t)src, n);
    if (src_dev)
        return async ? cuMemcpyDtoHAsync_v2((void *)(uintptr_t)dst, src, n, stream)
                     : cuMemcpyDtoH_v2((void *)(uintptr_t)dst, src, n);
    r = async ? cuStreamSynchronize(stream) : vgpu_require_init();
    if (r)
        return r;
    if (n && (!dst || !src))
        return CUDA_ERROR_INVALID_VALUE;
    memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount)
{
    return copy(dst, src, ByteCount, NULL, 0);
}

CUresult CUDAAPI cuMemcpy_ptds(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount)
    VGPU_ALIAS(cuMemcpy);

VGPU_API CUresult CUDAAPI cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount,
                                        CUstream hStream)
{
    return copy(dst, src, ByteCount, hStream, 1);
}

CUresult CUDAAPI cuMemcpyAsync_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t ByteCount,
                                    CUstream hStream) VGPU_ALIAS(cuMemcpyAsync);
