/*
 * Copies between host and device memory.
 *
 * The data is never copied twice on the zone side: a host-to-device request is gathered from its
 * fixed part and the caller's buffer straight into the ring (idm_sendv), and a device-to-host
 * reply is received straight into the caller's buffer. A copy larger than one message's payload
 * limit goes as several calls, each a complete copy of one slice, in order on the channel (so on
 * the stream). The channel lock is taken per slice: other threads' calls interleave with a long
 * copy instead of waiting for all of it.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* What CUDA checks before a copy is queued: a current context, the device range inside one
 * allocation (and a host buffer, if the copy has one). *nothing is set for a zero-byte copy,
 * which succeeds without a message. */
static CUresult copy_check(int has_host, const void *host, CUdeviceptr dev, size_t count,
                           int *nothing)
{
    CUcontext ctx;
    int inside;
    CUresult r = vgpu_current_context(&ctx, NULL);

    *nothing = count == 0;
    if (r || count == 0)
        return r;
    if (has_host && !host)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    inside = vgpu_allocations_contain(dev, count);
    vgpu_unlock();
    return inside ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* Bytes of data one message can carry next to `fixed` bytes of request (or reply) fields (at
 * least one: a channel too small for that refuses the first slice instead of looping). */
static size_t slice_limit(size_t fixed, size_t table_max)
{
    size_t max = vgpu_channel_max_payload();
    return max > fixed ? MIN(max - fixed, table_max) : 1;
}

/* A copy to or from pinned memory shared with gpu-proxy (pinned.c): only (arena, offset,
 * length) travel, gpu-proxy moves the bytes between the shared pages and device memory. The
 * asynchronous forms are fire-and-forget, complete when the stream is. */
static CUresult htod_shared(CUdeviceptr dst, uint64_t arena, uint64_t offset, size_t count,
                            int async, uint64_t stream)
{
    uint8_t req[40], rep[8];
    size_t len;
    struct iovec iov = {req, 0};

    if (async) {
        iov.iov_len = (size_t)vgpu_marshal_vgpuMemcpyHtoDSharedAsync(req, sizeof(req), dst, arena,
                                                                    offset, count, stream);
        return vgpu_call_async(VGPU_OP_vgpuMemcpyHtoDSharedAsync, &iov, 1);
    }
    iov.iov_len =
        (size_t)vgpu_marshal_vgpuMemcpyHtoDShared(req, sizeof(req), dst, arena, offset, count);
    return vgpu_call(VGPU_OP_vgpuMemcpyHtoDShared, &iov, 1, rep, sizeof(rep), &len);
}

static CUresult dtoh_shared(uint64_t arena, uint64_t offset, CUdeviceptr src, size_t count,
                            int async, uint64_t stream)
{
    uint8_t req[40], rep[8];
    size_t len;
    struct iovec iov = {req, 0};

    if (async) {
        iov.iov_len = (size_t)vgpu_marshal_vgpuMemcpyDtoHSharedAsync(req, sizeof(req), arena,
                                                                    offset, src, count, stream);
        return vgpu_call_async(VGPU_OP_vgpuMemcpyDtoHSharedAsync, &iov, 1);
    }
    iov.iov_len =
        (size_t)vgpu_marshal_vgpuMemcpyDtoHShared(req, sizeof(req), arena, offset, src, count);
    return vgpu_call(VGPU_OP_vgpuMemcpyDtoHShared, &iov, 1, rep, sizeof(rep), &len);
}

static CUresult htod(CUdeviceptr dst, const void *src, size_t count, int async, CUstream hStream)
{
    const uint8_t *from = src;
    uint64_t stream = 0, arena, offset;
    size_t slice;
    int nothing;
    CUresult r = copy_check(1, src, dst, count, &nothing);

    if (!r && async)
        r = vgpu_stream_id(hStream, &stream);
    else if (!r)
        vgpu_host_funcs_wait(0);
    if (r || nothing)
        return r;
    if (vgpu_pinned_shared(src, count, &arena, &offset))
        return htod_shared(dst, arena, offset, count, async, stream);
    slice = async ? slice_limit(24, VGPU_MAX_cuMemcpyHtoDAsync_v2_srcHost)
                  : slice_limit(16, VGPU_MAX_cuMemcpyHtoD_v2_srcHost);
    for (size_t done = 0; done < count && !r; done += slice) {
        uint8_t head[VGPU_HEAD_MAX], rep[8];
        size_t n = MIN(slice, count - done), len;
        struct iovec iov[2] = {{head, 0}, {(void *)(from + done), n}};

        if (async) {
            iov[0].iov_len = vgpu_head_cuMemcpyHtoDAsync_v2(head, dst + done, n, stream);
            r = vgpu_call_async(VGPU_OP_cuMemcpyHtoDAsync_v2, iov, 2);
        } else {
            iov[0].iov_len = vgpu_head_cuMemcpyHtoD_v2(head, dst + done, n);
            r = vgpu_call(VGPU_OP_cuMemcpyHtoD_v2, iov, 2, rep, sizeof(rep), &len);
        }
    }
    return r;
}

static CUresult dtoh(void *dst, CUdeviceptr src, size_t count, int on_stream, CUstream hStream)
{
    uint8_t *to = dst;
    uint64_t stream = 0, arena, offset;
    size_t slice;
    int nothing;
    CUresult r = copy_check(1, dst, src, count, &nothing);

    if (!r && on_stream)
        r = vgpu_stream_id(hStream, &stream);
    else if (!r)
        vgpu_host_funcs_wait(0);
    if (r || nothing)
        return r;
    if (vgpu_pinned_shared(dst, count, &arena, &offset))
        return dtoh_shared(arena, offset, src, count, on_stream, stream);
    /* The reply carries a u32 length before the data. */
    slice = slice_limit(4, on_stream ? VGPU_MAX_cuMemcpyDtoHAsync_v2_dstHost
                                     : VGPU_MAX_cuMemcpyDtoH_v2_dstHost);
    for (size_t done = 0; done < count && !r; done += slice) {
        uint8_t req[32];
        size_t n = MIN(slice, count - done);
        struct iovec iov = {req, 0};

        if (on_stream) {
            iov.iov_len = (size_t)vgpu_marshal_cuMemcpyDtoHAsync_v2(req, sizeof(req), src + done,
                                                                    n, stream);
            r = vgpu_call_blob(VGPU_OP_cuMemcpyDtoHAsync_v2, &iov, 1, to + done, n);
        } else {
            iov.iov_len = (size_t)vgpu_marshal_cuMemcpyDtoH_v2(req, sizeof(req), src + done, n);
            r = vgpu_call_blob(VGPU_OP_cuMemcpyDtoH_v2, &iov, 1, to + done, n);
        }
    }
    return r;
}

static CUresult dtod(CUdeviceptr dst, CUdeviceptr src, size_t count, int async, CUstream hStream)
{
    uint8_t req[40], rep[8];
    uint64_t stream = 0;
    size_t len;
    int nothing, inside;
    struct iovec iov = {req, 0};
    CUresult r = copy_check(0, NULL, dst, count, &nothing);

    if (!r && async)
        r = vgpu_stream_id(hStream, &stream);
    else if (!r)
        vgpu_host_funcs_wait(0);
    if (r || nothing)
        return r;
    vgpu_lock();
    inside = vgpu_allocations_contain(src, count);
    vgpu_unlock();
    if (!inside)
        return CUDA_ERROR_INVALID_VALUE;
    if (async) {
        iov.iov_len =
            (size_t)vgpu_marshal_cuMemcpyDtoDAsync_v2(req, sizeof(req), dst, src, count, stream);
        return vgpu_call_async(VGPU_OP_cuMemcpyDtoDAsync_v2, &iov, 1);
    }
    iov.iov_len = (size_t)vgpu_marshal_cuMemcpyDtoD_v2(req, sizeof(req), dst, src, count);
    return vgpu_call(VGPU_OP_cuMemcpyDtoD_v2, &iov, 1, rep, sizeof(rep), &len);
}

VGPU_API CUresult CUDAAPI cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost,
                                          size_t ByteCount)
{
    return htod(dstDevice, srcHost, ByteCount, 0, NULL);
}

CUresult CUDAAPI cuMemcpyHtoD_v2_ptds(CUdeviceptr dstDevice, const void *srcHost,
                                      size_t ByteCount) VGPU_ALIAS(cuMemcpyHtoD_v2);

VGPU_API CUresult CUDAAPI cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount)
{
    return dtoh(dstHost, srcDevice, ByteCount, 0, NULL);
}

CUresult CUDAAPI cuMemcpyDtoH_v2_ptds(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount)
    VGPU_ALIAS(cuMemcpyDtoH_v2);

VGPU_API CUresult CUDAAPI cuMemcpyDtoD_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice,
                                          size_t ByteCount)
{
    return dtod(dstDevice, srcDevice, ByteCount, 0, NULL);
}

CUresult CUDAAPI cuMemcpyDtoD_v2_ptds(CUdeviceptr dstDevice, CUdeviceptr srcDevice,
                                      size_t ByteCount) VGPU_ALIAS(cuMemcpyDtoD_v2);

/* Pageable memory travels in the request: the host buffer may be reused as soon as this returns.
 * Shared pinned memory is read by gpu-proxy in stream order, as CUDA reads pinned memory. */
VGPU_API CUresult CUDAAPI cuMemcpyHtoDAsync_v2(CUdeviceptr dstDevice, const void *srcHost,
                                               size_t ByteCount, CUstream hStream)
{
    return htod(dstDevice, srcHost, ByteCount, 1, hStream);
}

CUresult CUDAAPI cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr dstDevice, const void *srcHost,
                                           size_t ByteCount, CUstream hStream)
    VGPU_ALIAS(cuMemcpyHtoDAsync_v2);

/* Synchronous on the wire for pageable memory: the bytes must be back before they can be
 * written to dstHost. Into shared pinned memory it is fire-and-forget (complete with the stream). */
VGPU_API CUresult CUDAAPI cuMemcpyDtoHAsync_v2(void *dstHost, CUdeviceptr srcDevice,
                                               size_t ByteCount, CUstream hStream)
{
    return dtoh(dstHost, srcDevice, ByteCount, 1, hStream);
}

CUresult CUDAAPI cuMemcpyDtoHAsync_v2_ptsz(void *dstHost, CUdeviceptr srcDevice,
                                           size_t ByteCount, CUstream hStream)
    VGPU_ALIAS(cuMemcpyDtoHAsync_v2);

VGPU_API CUresult CUDAAPI cuMemcpyDtoDAsync_v2(CUdeviceptr dstDevice, CUdeviceptr srcDevice,
                                               size_t ByteCount, CUstream hStream)
{
    return dtod(dstDevice, srcDevice, ByteCount, 1, hStream);
}

CUresult CUDAAPI cuMemcpyDtoDAsync_v2_ptsz(CUdeviceptr dstDevice, CUdeviceptr srcDevice,
                                           size_t ByteCount, CUstream hStream)
    VGPU_ALIAS(cuMemcpyDtoDAsync_v2);
