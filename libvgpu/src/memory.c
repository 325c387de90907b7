/*
 * Device memory: allocation, free, usage, memsets. Every allocation is recorded locally
 * (allocations.c) so that pointers can be described and checked without asking gpu-proxy;
 * gpu-proxy enforces the zone's quota and checks every pointer again.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

VGPU_API CUresult CUDAAPI cuMemGetInfo_v2(size_t *free, size_t *total)
{
    uint8_t rep[16];
    size_t len;
    CUcontext ctx;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!free || !total)
        return CUDA_ERROR_INVALID_VALUE;
    r = vgpu_call(VGPU_OP_cuMemGetInfo_v2, NULL, 0, rep, sizeof(rep), &len);
    if (r)
        return r;
    return vgpu_unmarshal_cuMemGetInfo_v2_reply(rep, len, free, total) < 0 ? CUDA_ERROR_UNKNOWN
                                                                           : CUDA_SUCCESS;
}

static void free_remote(CUdeviceptr ptr)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct iovec iov = {req, (size_t)vgpu_marshal_cuMemFree_v2(req, sizeof(req), ptr)};
    (void)vgpu_call(VGPU_OP_cuMemFree_v2, &iov, 1, rep, sizeof(rep), &len);
}

VGPU_API CUresult CUDAAPI cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    uint8_t req[8], rep[8];
    size_t len;
    CUdeviceptr ptr;
    CUcontext ctx;
    CUdevice dev;
    struct iovec iov = {req, 0};
    int stored;
    CUresult r = vgpu_current_context(&ctx, &dev);

    if (r)
        return r;
    if (!dptr || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    iov.iov_len = (size_t)vgpu_marshal_cuMemAlloc_v2(req, sizeof(req), bytesize);
    r = vgpu_call(VGPU_OP_cuMemAlloc_v2, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    if (vgpu_unmarshal_cuMemAlloc_v2_reply(rep, len, &ptr) < 0)
        return CUDA_ERROR_UNKNOWN;
    vgpu_lock();
    stored = vgpu_allocations_add(ptr, bytesize, ctx, dev, NULL) == 0;
    vgpu_unlock();
    if (!stored) {
        free_remote(ptr); /* memory we could not account for must not stay allocated */
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *dptr = ptr;
    return CUDA_SUCCESS;
}

CUresult vgpu_check_freeable(CUdeviceptr dptr)
{
    const struct vgpu_allocation *a;
    CUresult r;

    vgpu_lock();
    a = vgpu_allocations_find(dptr);
    r = a && a->base == dptr && !a->module ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    vgpu_unlock();
    return r;
}

void vgpu_forget_freed(CUdeviceptr dptr)
{
    struct vgpu_allocation gone;

    vgpu_lock();
    if (vgpu_allocations_remove(dptr, &gone) == 0) /* else a concurrent free failed remotely */
        vgpu_mempool_released(&gone);
    vgpu_unlock();
}

VGPU_API CUresult CUDAAPI cuMemFree_v2(CUdeviceptr dptr)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_require_init();

    if (!r && dptr == 0)
        return CUDA_SUCCESS; /* nothing to free: cudart's cudaFree(0), which starts a context */
    if (!r)
        r = vgpu_check_freeable(dptr);
    if (r)
        return r;
    iov.iov_len = (size_t)vgpu_marshal_cuMemFree_v2(req, sizeof(req), dptr);
    r = vgpu_call(VGPU_OP_cuMemFree_v2, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    vgpu_forget_freed(dptr);
    return CUDA_SUCCESS;
}

/* ---- memsets ------------------------------------------------------------------------------- */

/* The checks CUDA makes before it queues a memset: a current context, N elements of `width`
 * bytes inside one allocation, dst aligned to the element. *nothing is set for N == 0. */
static CUresult memset_check(CUdeviceptr dst, size_t width, size_t count, int *nothing)
{
    CUcontext ctx;
    int inside;
    CUresult r = vgpu_current_context(&ctx, NULL);

    *nothing = count == 0;
    if (r || count == 0)
        return r;
    if (dst % width || count > SIZE_MAX / width)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    inside = vgpu_allocations_contain(dst, count * width);
    vgpu_unlock();
    return inside ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

VGPU_API CUresult CUDAAPI cuMemsetD8_v2(CUdeviceptr dstDevice, unsigned char uc, size_t N)
{
    uint8_t req[24], rep[8];
    size_t len;
    int nothing;
    struct iovec iov = {req, 0};
    CUresult r = memset_check(dstDevice, 1, N, &nothing);

    if (r || nothing)
        return r;
    vgpu_host_funcs_wait(0);
    iov.iov_len = (size_t)vgpu_marshal_cuMemsetD8_v2(req, sizeof(req), dstDevice, uc, N);
    return vgpu_call(VGPU_OP_cuMemsetD8_v2, &iov, 1, rep, sizeof(rep), &len);
}

CUresult CUDAAPI cuMemsetD8_v2_ptds(CUdeviceptr dstDevice, unsigned char uc, size_t N)
    VGPU_ALIAS(cuMemsetD8_v2);

VGPU_API CUresult CUDAAPI cuMemsetD32_v2(CUdeviceptr dstDevice, unsigned int ui, size_t N)
{
    uint8_t req[24], rep[8];
    size_t len;
    int nothing;
    struct iovec iov = {req, 0};
    CUresult r = memset_check(dstDevice, 4, N, &nothing);

    if (r || nothing)
        return r;
    vgpu_host_funcs_wait(0);
    iov.iov_len = (size_t)vgpu_marshal_cuMemsetD32_v2(req, sizeof(req), dstDevice, ui, N);
    return vgpu_call(VGPU_OP_cuMemsetD32_v2, &iov, 1, rep, sizeof(rep), &len);
}

CUresult CUDAAPI cuMemsetD32_v2_ptds(CUdeviceptr dstDevice, unsigned int ui, size_t N)
    VGPU_ALIAS(cuMemsetD32_v2);

VGPU_API CUresult CUDAAPI cuMemsetD8Async(CUdeviceptr dstDevice, unsigned char uc, size_t N,
                                          CUstream hStream)
{
    uint8_t req[32];
    uint64_t stream;
    int nothing;
    struct iovec iov = {req, 0};
    CUresult r = memset_check(dstDevice, 1, N, &nothing);

    if (!r)
        r = vgpu_stream_id(hStream, &stream);
    if (r || nothing)
        return r;
    iov.iov_len =
        (size_t)vgpu_marshal_cuMemsetD8Async(req, sizeof(req), dstDevice, uc, N, stream);
    return vgpu_call_async(VGPU_OP_cuMemsetD8Async, &iov, 1);
}

CUresult CUDAAPI cuMemsetD8Async_ptsz(CUdeviceptr dstDevice, unsigned char uc, size_t N,
                                      CUstream hStream) VGPU_ALIAS(cuMemsetD8Async);

VGPU_API CUresult CUDAAPI cuMemsetD32Async(CUdeviceptr dstDevice, unsigned int ui, size_t N,
                                           CUstream hStream)
{
    uint8_t req[32];
    uint64_t stream;
    int nothing;
    struct iovec iov = {req, 0};
    CUresult r = memset_check(dstDevice, 4, N, &nothing);

    if (!r)
        r = vgpu_stream_id(hStream, &stream);
    if (r || nothing)
        return r;
    iov.iov_len =
        (size_t)vgpu_marshal_cuMemsetD32Async(req, sizeof(req), dstDevice, ui, N, stream);
    return vgpu_call_async(VGPU_OP_cuMemsetD32Async, &iov, 1);
}

CUresult CUDAAPI cuMemsetD32Async_ptsz(CUdeviceptr dstDevice, unsigned int ui, size_t N,
                                       CUstream hStream) VGPU_ALIAS(cuMemsetD32Async);
