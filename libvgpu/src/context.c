/*
 * Contexts and the per-thread context stack, answered locally.
 *
 * gpu-proxy gives a zone exactly one context on its GPU (the GPU's MMU separates zones), so
 * every CUcontext libvgpu hands out names that one remote context. Locally they are distinct,
 * as an application expects: each has its own place on the thread's stack, owns the memory,
 * modules, streams and events created while it was current, and takes them with it when it is
 * destroyed (or, for a device's primary context, when its last retain is released).
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <stdlib.h>

/* Deep enough for any push/pop nesting seen in practice (libraries push one level each). */
#define STACK_MAX 64

static struct CUctx_st *primary[VGPU_MAX_DEVICES]; /* vgpu_lock */
/* Bumped in the child of a fork: context stacks inherited from the parent are void there. */
static unsigned epoch;

static __thread struct {
    CUcontext stack[STACK_MAX];
    int depth;
    unsigned epoch;
} tls;

/* The calling thread's stack, emptied if it was inherited across a fork. vgpu_lock held. */
static void own_stack(void)
{
    if (tls.epoch != epoch) {
        tls.depth = 0;
        tls.epoch = epoch;
    }
}

static struct CUctx_st *live(CUcontext ctx)
{
    return (struct CUctx_st *)vgpu_objects_find(ctx, VGPU_KIND_CONTEXT);
}

CUresult vgpu_current_context(CUcontext *ctx, CUdevice *device)
{
    CUresult r = vgpu_require_init();
    struct CUctx_st *c;

    if (r)
        return r;
    vgpu_lock();
    own_stack();
    c = tls.depth ? live(tls.stack[tls.depth - 1]) : NULL;
    if (c && (!c->primary || c->retained > 0)) {
        *ctx = c;
        if (device)
            *device = c->device;
    } else
        r = CUDA_ERROR_INVALID_CONTEXT;
    vgpu_unlock();
    return r;
}

static void free_context(struct vgpu_object *obj)
{
    free(obj);
}

static struct CUctx_st *new_context(uint64_t id, CUdevice dev, unsigned int flags, int is_primary)
{
    struct CUctx_st *c = calloc(1, sizeof(*c));

    if (!c)
        return NULL;
    c->obj = (struct vgpu_object){VGPU_KIND_CONTEXT, id, NULL, free_context};
    c->device = dev;
    c->flags = flags;
    c->primary = is_primary;
    if (vgpu_objects_add(&c->obj)) {
        free(c);
        return NULL;
    }
    return c;
}

/* Tell gpu-proxy to release what the context owned; errors are the context's last and are not
 * anyone's to report (a destroyed context has no one left to ask). */
static void release_remote(struct vgpu_object *obj)
{
    uint8_t req[16], rep[8];
    size_t len;
    int n = -1;
    uint32_t op = 0;

    switch (obj->kind) {
    case VGPU_KIND_MODULE:
        op = VGPU_OP_cuModuleUnload;
        n = vgpu_marshal_cuModuleUnload(req, sizeof(req), obj->id);
        break;
    case VGPU_KIND_STREAM:
        op = VGPU_OP_cuStreamDestroy_v2;
        n = vgpu_marshal_cuStreamDestroy_v2(req, sizeof(req), obj->id);
        break;
    case VGPU_KIND_EVENT:
        op = VGPU_OP_cuEventDestroy_v2;
        n = vgpu_marshal_cuEventDestroy_v2(req, sizeof(req), obj->id);
        break;
    case VGPU_KIND_CONTEXT:
    case VGPU_KIND_FUNCTION: /* functions go with their module */
    case VGPU_KIND_LIBRARY:  /* libraries and their kernels belong to no context */
    case VGPU_KIND_KERNEL:
        break;
    }
    if (n >= 0) {
        struct iovec iov = {req, (size_t)n};
        (void)vgpu_call(op, &iov, 1, rep, sizeof(rep), &len);
    }
}

void vgpu_release_owned(CUcontext ctx)
{
    struct vgpu_object **objs;
    CUdeviceptr *bases;
    size_t nobjs, nbases;

    vgpu_cls_destroy(ctx); /* first: cudart's destructors release what they registered */
    vgpu_lock();
    objs = vgpu_objects_detach_owned(ctx, &nobjs);
    bases = vgpu_allocations_detach_ctx(ctx, &nbases);
    vgpu_unlock();
    for (size_t i = 0; i < nobjs; i++) {
        release_remote(objs[i]);
        objs[i]->destroy(objs[i]);
    }
    for (size_t i = 0; i < nbases; i++) {
        uint8_t req[8], rep[8];
        size_t len;
        struct iovec iov = {req, (size_t)vgpu_marshal_cuMemFree_v2(req, sizeof(req), bases[i])};
        (void)vgpu_call(VGPU_OP_cuMemFree_v2, &iov, 1, rep, sizeof(rep), &len);
    }
    free(objs);
    free(bases);
}

void vgpu_contexts_reset(void)
{
    /* The objects themselves went with vgpu_objects_reset. */
    for (int i = 0; i < VGPU_MAX_DEVICES; i++)
        primary[i] = NULL;
    epoch++;
}

/* ---- context stack ---------------------------------------------------------------------------- */

VGPU_API CUresult CUDAAPI cuCtxGetCurrent(CUcontext *pctx)
{
    CUresult r = vgpu_require_init();
    if (r)
        return r;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    own_stack();
    *pctx = tls.depth ? tls.stack[tls.depth - 1] : NULL;
    vgpu_unlock();
    return CUDA_SUCCESS;
}

/* Replaces the top of the stack (pushes onto an empty one). NULL leaves no context current:
 * it replaces the top too, so that what is below becomes current again only when popped. */
VGPU_API CUresult CUDAAPI cuCtxSetCurrent(CUcontext ctx)
{
    CUresult r = vgpu_require_init();
    if (r)
        return r;
    vgpu_lock();
    own_stack();
    if (ctx && !live(ctx))
        r = CUDA_ERROR_INVALID_CONTEXT;
    else if (tls.depth)
        tls.stack[tls.depth - 1] = ctx;
    else if (ctx)
        tls.stack[tls.depth++] = ctx;
    vgpu_unlock();
    return r;
}

VGPU_API CUresult CUDAAPI cuCtxPushCurrent_v2(CUcontext ctx)
{
    CUresult r = vgpu_require_init();
    if (r)
        return r;
    vgpu_lock();
    own_stack();
    if (!live(ctx))
        r = CUDA_ERROR_INVALID_CONTEXT;
    else if (tls.depth == STACK_MAX)
        r = CUDA_ERROR_OUT_OF_MEMORY;
    else
        tls.stack[tls.depth++] = ctx;
    vgpu_unlock();
    return r;
}

CUresult CUDAAPI cuCtxPushCurrent(CUcontext ctx) VGPU_ALIAS(cuCtxPushCurrent_v2);

VGPU_API CUresult CUDAAPI cuCtxPopCurrent_v2(CUcontext *pctx)
{
    CUresult r = vgpu_require_init();
    if (r)
        return r;
    vgpu_lock();
    own_stack();
    if (!tls.depth) {
        r = CUDA_ERROR_INVALID_CONTEXT;
    } else {
        tls.depth--;
        if (pctx)
            *pctx = tls.stack[tls.depth];
    }
    vgpu_unlock();
    return r;
}

CUresult CUDAAPI cuCtxPopCurrent(CUcontext *pctx) VGPU_ALIAS(cuCtxPopCurrent_v2);

VGPU_API CUresult CUDAAPI cuCtxGetDevice(CUdevice *device)
{
    CUcontext ctx;
    CUdevice dev;
    CUresult r = vgpu_current_context(&ctx, &dev);
    if (r)
        return r;
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    *device = dev;
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuCtxSynchronize(void)
{
    uint8_t rep[8];
    size_t len;
    CUcontext ctx;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    vgpu_host_funcs_wait(0);
    return vgpu_call(VGPU_OP_cuCtxSynchronize, NULL, 0, rep, sizeof(rep), &len);
}

/* ctx, or the current context when ctx is NULL, if it is usable; its device in *device. */
CUresult vgpu_context_or_current(CUcontext ctx, CUdevice *device)
{
    CUresult r;
    struct CUctx_st *c;

    if (!ctx)
        return vgpu_current_context(&ctx, device);
    r = vgpu_require_init();
    if (r)
        return r;
    vgpu_lock();
    c = live(ctx);
    if (c && (!c->primary || c->retained > 0))
        *device = c->device;
    else
        r = CUDA_ERROR_INVALID_CONTEXT;
    vgpu_unlock();
    return r;
}

/* ---- created contexts ----------------------------------------------------------------------- */

VGPU_API CUresult CUDAAPI cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    uint8_t req[16], rep[16];
    size_t len;
    uint64_t id;
    struct iovec iov = {req, 0};
    struct CUctx_st *c;
    CUresult r = vgpu_device_check(dev);

    if (r)
        return r;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    own_stack();
    r = tls.depth == STACK_MAX ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_SUCCESS; /* it is pushed */
    vgpu_unlock();
    if (r)
        return r;
    iov.iov_len = (size_t)vgpu_marshal_cuCtxCreate_v2(req, sizeof(req), flags, dev);
    r = vgpu_call(VGPU_OP_cuCtxCreate_v2, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    if (vgpu_unmarshal_cuCtxCreate_v2_reply(rep, len, &id) < 0)
        return CUDA_ERROR_UNKNOWN;
    vgpu_lock();
    c = new_context(id, dev, flags, 0);
    if (c)
        tls.stack[tls.depth++] = c; /* only this thread pushes onto its stack */
    else
        r = CUDA_ERROR_OUT_OF_MEMORY;
    vgpu_unlock();
    if (!r)
        *pctx = c;
    return r;
}

CUresult CUDAAPI cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice dev)
    VGPU_ALIAS(cuCtxCreate_v2);

/* CUDA 12.5+'s cuCtxCreate: execution affinity and CIG contexts have nothing to map to in a zone. */
VGPU_API CUresult CUDAAPI cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *ctxCreateParams,
                                         unsigned int flags, CUdevice dev)
{
    if (ctxCreateParams &&
        (ctxCreateParams->numExecAffinityParams > 0 || ctxCreateParams->cigParams))
        return CUDA_ERROR_NOT_SUPPORTED;
    return cuCtxCreate_v2(pctx, flags, dev);
}

VGPU_API CUresult CUDAAPI cuCtxDestroy_v2(CUcontext ctx)
{
    uint8_t req[16], rep[8];
    size_t len;
    struct iovec iov = {req, 0};
    struct CUctx_st *c;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    vgpu_lock();
    own_stack();
    c = live(ctx);
    if (!c || c->primary) {
        vgpu_unlock();
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    /* Claimed here: a concurrent cuCtxDestroy of the same context finds it gone. */
    vgpu_objects_remove(&c->obj);
    for (int i = tls.depth - 1; i >= 0; i--)
        if (tls.stack[i] == ctx) {
            for (int j = i; j < tls.depth - 1; j++)
                tls.stack[j] = tls.stack[j + 1];
            tls.depth--;
        }
    vgpu_unlock();
    /* The call reports any pending fire-and-forget error; the context goes either way. */
    iov.iov_len = (size_t)vgpu_marshal_cuCtxDestroy_v2(req, sizeof(req), c->obj.id);
    r = vgpu_call(VGPU_OP_cuCtxDestroy_v2, &iov, 1, rep, sizeof(rep), &len);
    vgpu_release_owned(ctx);
    free(c);
    return r;
}

CUresult CUDAAPI cuCtxDestroy(CUcontext ctx) VGPU_ALIAS(cuCtxDestroy_v2);

/* ---- primary contexts ------------------------------------------------------------------------ */

VGPU_API CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    uint8_t req[8], rep[16];
    size_t len;
    uint64_t id;
    struct iovec iov = {req, 0};
    struct CUctx_st *c;
    CUresult r = vgpu_device_check(dev);

    if (r)
        return r;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    c = primary[dev];
    if (c && c->retained > 0) {
        c->retained++;
        *pctx = c;
        vgpu_unlock();
        return CUDA_SUCCESS;
    }
    vgpu_unlock();
    iov.iov_len = (size_t)vgpu_marshal_cuDevicePrimaryCtxRetain(req, sizeof(req), dev);
    r = vgpu_call(VGPU_OP_cuDevicePrimaryCtxRetain, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    if (vgpu_unmarshal_cuDevicePrimaryCtxRetain_reply(rep, len, &id) < 0)
        return CUDA_ERROR_UNKNOWN;
    vgpu_lock();
    if (!primary[dev])
        primary[dev] = new_context(id, dev, 0, 1);
    c = primary[dev];
    if (c) {
        c->obj.id = id;
        c->retained++;
        *pctx = c;
    }
    vgpu_unlock();
    return c ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

VGPU_API CUresult CUDAAPI cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct iovec iov = {req, 0};
    struct CUctx_st *c;
    int last;
    CUresult r = vgpu_device_check(dev);

    if (r)
        return r;
    vgpu_lock();
    c = primary[dev];
    if (!c || c->retained == 0) {
        vgpu_unlock();
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    last = --c->retained == 0;
    vgpu_unlock();
    if (!last)
        return CUDA_SUCCESS;
    /* First the call itself, which reports any pending fire-and-forget error; then the primary
     * context is reset: what it owned is released, its handle stays the same. */
    iov.iov_len = (size_t)vgpu_marshal_cuDevicePrimaryCtxRelease_v2(req, sizeof(req), dev);
    r = vgpu_call(VGPU_OP_cuDevicePrimaryCtxRelease_v2, &iov, 1, rep, sizeof(rep), &len);
    vgpu_release_owned(c);
    return r;
}

CUresult CUDAAPI cuDevicePrimaryCtxRelease(CUdevice dev) VGPU_ALIAS(cuDevicePrimaryCtxRelease_v2);

/* Answered locally: gpu-proxy's one context is always active, the zone's primary may not be. */
VGPU_API CUresult CUDAAPI cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags,
                                                     int *active)
{
    CUresult r = vgpu_device_check(dev);
    if (r)
        return r;
    if (!flags || !active)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    *flags = primary[dev] ? primary[dev]->flags : 0;
    *active = primary[dev] && primary[dev]->retained > 0;
    vgpu_unlock();
    return CUDA_SUCCESS;
}

/* A device's primary context without retaining it (cudart's private interface asks this way):
 * made, inactive, if it was never retained; gpu-proxy's id comes with the first retain. */
CUresult vgpu_primary_context(CUcontext *pctx, CUdevice dev)
{
    CUresult r = vgpu_device_check(dev);

    if (r)
        return r;
    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    if (!primary[dev])
        primary[dev] = new_context(0, dev, 0, 1);
    *pctx = primary[dev];
    vgpu_unlock();
    return *pctx ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
