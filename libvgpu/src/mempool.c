/*
 * Stream-ordered allocation (cuMemAllocAsync, cuMemFreeAsync) with each device's default pool.
 * An allocation is made at once with cuMemAlloc_v2 (gpu-proxy enforces the zone's quota, and
 * refuses past it immediately, as CUDA does): the memory exists before any later work on any
 * stream, which is what stream order asks for and more. The free travels fire-and-forget
 * (cuMemFreeAsync): gpu-proxy returns the memory to the zone's quota when the stream reaches it.
 *
 * The pool keeps nothing: freed memory goes back to gpu-proxy, so reserved equals used, any
 * release threshold is met, and trimming has nothing to give back. The pool's attributes
 * (reuse policies, release threshold, usage and its high-water marks) are kept here per device.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <string.h>

struct CUmemPoolHandle_st {
    int initialized;
    int reuse[3];                    /* FOLLOW_EVENT_DEPENDENCIES, OPPORTUNISTIC, INTERNAL_DEPS */
    cuuint64_t release_threshold;
    cuuint64_t used, used_high;      /* bytes of live pool allocations (vgpu_lock) */
};

static struct CUmemPoolHandle_st pools[VGPU_MAX_DEVICES];

/* The device's default pool, or NULL for a device the zone does not have. */
static struct CUmemPoolHandle_st *default_pool(CUdevice dev)
{
    struct CUmemPoolHandle_st *p;

    if (vgpu_device_check(dev))
        return NULL;
    p = &pools[dev];
    vgpu_lock();
    if (!p->initialized) {
        /* CUDA's defaults: every reuse policy allowed, release threshold 0. */
        *p = (struct CUmemPoolHandle_st){1, {1, 1, 1}, 0, 0, 0};
    }
    vgpu_unlock();
    return p;
}

static struct CUmemPoolHandle_st *known_pool(CUmemoryPool pool)
{
    for (int i = 0; i < VGPU_MAX_DEVICES; i++)
        if (pool == &pools[i])
            return default_pool(i);
    return NULL;
}

void vgpu_mempool_released(const struct vgpu_allocation *gone)
{
    for (int i = 0; i < VGPU_MAX_DEVICES; i++)
        if (gone->pool == &pools[i])
            pools[i].used -= gone->size;
}

void vgpu_mempools_reset(void)
{
    memset(pools, 0, sizeof(pools));
}

VGPU_API CUresult CUDAAPI cuDeviceGetDefaultMemPool(CUmemoryPool *pool_out, CUdevice dev)
{
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!pool_out)
        return CUDA_ERROR_INVALID_VALUE;
    if (!(*pool_out = default_pool(dev)))
        return CUDA_ERROR_INVALID_DEVICE;
    return CUDA_SUCCESS;
}

/* The current pool is always the default one: cuMemPoolCreate is not offered. */
VGPU_API CUresult CUDAAPI cuDeviceGetMemPool(CUmemoryPool *pool, CUdevice dev)
{
    return cuDeviceGetDefaultMemPool(pool, dev);
}

VGPU_API CUresult CUDAAPI cuDeviceSetMemPool(CUdevice dev, CUmemoryPool pool)
{
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!default_pool(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    return pool == default_pool(dev) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

static CUresult alloc_from(struct CUmemPoolHandle_st *p, CUdeviceptr *dptr, size_t bytesize,
                           CUstream hStream)
{
    uint64_t stream;
    CUresult r = vgpu_stream_id(hStream, &stream);

    if (!r)
        r = cuMemAlloc_v2(dptr, bytesize);
    if (r)
        return r;
    vgpu_lock();
    vgpu_allocations_set_pool(*dptr, p);
    p->used += bytesize;
    if (p->used > p->used_high)
        p->used_high = p->used;
    vgpu_unlock();
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    CUdevice dev;
    CUcontext ctx;
    struct CUmemPoolHandle_st *p;
    CUresult r = vgpu_current_context(&ctx, &dev);

    if (r)
        return r;
    if (!dptr || !bytesize)
        return CUDA_ERROR_INVALID_VALUE;
    p = default_pool(dev);
    return p ? alloc_from(p, dptr, bytesize, hStream) : CUDA_ERROR_INVALID_DEVICE;
}

CUresult CUDAAPI cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
    VGPU_ALIAS(cuMemAllocAsync);

VGPU_API CUresult CUDAAPI cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize,
                                                  CUmemoryPool pool, CUstream hStream)
{
    CUcontext ctx;
    struct CUmemPoolHandle_st *p;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!dptr || !bytesize)
        return CUDA_ERROR_INVALID_VALUE;
    p = known_pool(pool);
    return p ? alloc_from(p, dptr, bytesize, hStream) : CUDA_ERROR_INVALID_VALUE;
}

CUresult CUDAAPI cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize,
                                              CUmemoryPool pool, CUstream hStream)
    VGPU_ALIAS(cuMemAllocFromPoolAsync);

/* Any allocation of the process may be freed this way (as with CUDA); a module's variable may
 * not. The address is forgotten here at once: using it afterwards is a use after free. */
VGPU_API CUresult CUDAAPI cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
    uint8_t req[24];
    uint64_t stream;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_stream_id(hStream, &stream);

    if (!r)
        r = vgpu_check_freeable(dptr);
    if (r)
        return r;
    iov.iov_len = (size_t)vgpu_marshal_cuMemFreeAsync(req, sizeof(req), dptr, stream);
    r = vgpu_call_async(VGPU_OP_cuMemFreeAsync, &iov, 1);
    if (r)
        return r;
    vgpu_forget_freed(dptr);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream)
    VGPU_ALIAS(cuMemFreeAsync);

/* The pool whose attribute cuMemPoolGet/SetAttribute reads or writes through value. */
static CUresult attribute_pool(CUmemoryPool pool, const void *value,
                               struct CUmemPoolHandle_st **out)
{
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!(*out = known_pool(pool)) || !value)
        return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuMemPoolGetAttribute(CUmemoryPool pool, CUmemPool_attribute attr,
                                                void *value)
{
    struct CUmemPoolHandle_st *p;
    CUresult r = attribute_pool(pool, value, &p);

    if (r)
        return r;
    vgpu_lock();
    switch (attr) {
    case CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES:
    case CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC:
    case CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES:
        *(int *)value = p->reuse[attr - CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES];
        break;
    case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD:
        *(cuuint64_t *)value = p->release_threshold;
        break;
    case CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: /* nothing is kept beyond what is used */
    case CU_MEMPOOL_ATTR_USED_MEM_CURRENT:
        *(cuuint64_t *)value = p->used;
        break;
    case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH:
    case CU_MEMPOOL_ATTR_USED_MEM_HIGH:
        *(cuuint64_t *)value = p->used_high;
        break;
    default:
        r = CUDA_ERROR_INVALID_VALUE;
    }
    vgpu_unlock();
    return r;
}

/* The reuse policies and the release threshold are kept and reported; with nothing cached,
 * every one of them is met. The high-water marks may only be reset (to 0). */
VGPU_API CUresult CUDAAPI cuMemPoolSetAttribute(CUmemoryPool pool, CUmemPool_attribute attr,
                                                void *value)
{
    struct CUmemPoolHandle_st *p;
    CUresult r = attribute_pool(pool, value, &p);

    if (r)
        return r;
    vgpu_lock();
    switch (attr) {
    case CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES:
    case CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC:
    case CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES:
        p->reuse[attr - CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES] = *(int *)value != 0;
        break;
    case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD:
        p->release_threshold = *(cuuint64_t *)value;
        break;
    case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH:
    case CU_MEMPOOL_ATTR_USED_MEM_HIGH:
        if (*(cuuint64_t *)value != 0)
            r = CUDA_ERROR_INVALID_VALUE;
        else
            p->used_high = p->used;
        break;
    default:
        r = CUDA_ERROR_INVALID_VALUE; /* read-only */
    }
    vgpu_unlock();
    return r;
}

VGPU_API CUresult CUDAAPI cuMemPoolTrimTo(CUmemoryPool pool, size_t minBytesToKeep)
{
    CUresult r = vgpu_require_init();

    (void)minBytesToKeep; /* the pool holds no unused memory to trim */
    if (r)
        return r;
    return known_pool(pool) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
