/*
 * Streams. NULL, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD all travel as gpu-proxy's legacy
 * default stream (id 0): the zone's one remote context has no per-thread default streams, and
 * the legacy stream's stronger ordering is a correct (if less concurrent) way to run per-thread
 * default stream work.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <stdlib.h>

struct CUstream_st {
    struct vgpu_object obj;
    unsigned int flags;
};

static int is_default(CUstream stream)
{
    return !stream || stream == CU_STREAM_LEGACY || stream == CU_STREAM_PER_THREAD;
}

CUresult vgpu_stream_id(CUstream stream, uint64_t *id)
{
    struct vgpu_object *obj;

    if (is_default(stream)) {
        CUcontext ctx;
        *id = 0;
        return vgpu_current_context(&ctx, NULL); /* the default stream is the current context's */
    }
    vgpu_lock();
    obj = vgpu_objects_find(stream, VGPU_KIND_STREAM);
    if (obj)
        *id = obj->id;
    vgpu_unlock();
    return obj ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

static void free_stream(struct vgpu_object *obj)
{
    free(obj);
}

VGPU_API CUresult CUDAAPI cuStreamCreate(CUstream *phStream, unsigned int Flags)
{
    uint8_t req[8], rep[8];
    size_t len;
    uint64_t id;
    CUcontext ctx;
    struct CUstream_st *s;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!phStream)
        return CUDA_ERROR_INVALID_VALUE;
    iov.iov_len = (size_t)vgpu_marshal_cuStreamCreate(req, sizeof(req), Flags);
    r = vgpu_call(VGPU_OP_cuStreamCreate, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    if (vgpu_unmarshal_cuStreamCreate_reply(rep, len, &id) < 0)
        return CUDA_ERROR_UNKNOWN;
    s = malloc(sizeof(*s));
    if (s) {
        s->obj = (struct vgpu_object){VGPU_KIND_STREAM, id, ctx, free_stream};
        s->flags = Flags;
        vgpu_lock();
        if (vgpu_objects_add(&s->obj)) {
            free(s);
            s = NULL;
        }
        vgpu_unlock();
    }
    if (!s) {
        iov.iov_len = (size_t)vgpu_marshal_cuStreamDestroy_v2(req, sizeof(req), id);
        (void)vgpu_call(VGPU_OP_cuStreamDestroy_v2, &iov, 1, rep, sizeof(rep), &len);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *phStream = s;
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuStreamDestroy_v2(CUstream hStream)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct vgpu_object *obj;
    struct iovec iov = {req, 0};
    uint64_t id = 0;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    vgpu_lock();
    obj = vgpu_objects_find(hStream, VGPU_KIND_STREAM);
    if (obj)
        id = obj->id;
    vgpu_unlock();
    if (!obj)
        return CUDA_ERROR_INVALID_HANDLE;
    iov.iov_len = (size_t)vgpu_marshal_cuStreamDestroy_v2(req, sizeof(req), id);
    r = vgpu_call(VGPU_OP_cuStreamDestroy_v2, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    /* Whoever takes it out of the table frees it: a concurrent destroy failed remotely. */
    vgpu_lock();
    obj = vgpu_objects_find(hStream, VGPU_KIND_STREAM);
    if (obj)
        vgpu_objects_remove(obj);
    vgpu_unlock();
    if (obj)
        obj->destroy(obj);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamDestroy(CUstream hStream) VGPU_ALIAS(cuStreamDestroy_v2);

VGPU_API CUresult CUDAAPI cuStreamSynchronize(CUstream hStream)
{
    uint8_t req[8], rep[8];
    size_t len;
    uint64_t id;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_stream_id(hStream, &id);

    if (r)
        return r;
    iov.iov_len = (size_t)vgpu_marshal_cuStreamSynchronize(req, sizeof(req), id);
    return vgpu_call(VGPU_OP_cuStreamSynchronize, &iov, 1, rep, sizeof(rep), &len);
}

CUresult CUDAAPI cuStreamSynchronize_ptsz(CUstream hStream) VGPU_ALIAS(cuStreamSynchronize);

/* CUDA_SUCCESS when all the stream's work has run, CUDA_ERROR_NOT_READY while some has not. */
VGPU_API CUresult CUDAAPI cuStreamQuery(CUstream hStream)
{
    uint8_t req[8], rep[8];
    size_t len;
    uint64_t id;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_stream_id(hStream, &id);

    if (r)
        return r;
    iov.iov_len = (size_t)vgpu_marshal_cuStreamQuery(req, sizeof(req), id);
    return vgpu_call(VGPU_OP_cuStreamQuery, &iov, 1, rep, sizeof(rep), &len);
}

CUresult CUDAAPI cuStreamQuery_ptsz(CUstream hStream) VGPU_ALIAS(cuStreamQuery);

VGPU_API CUresult CUDAAPI cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags)
{
    uint8_t req[24];
    uint64_t stream, event;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_stream_id(hStream, &stream);

    if (!r)
        r = vgpu_event_id(hEvent, &event);
    if (r)
        return r;
    iov.iov_len = (size_t)vgpu_marshal_cuStreamWaitEvent(req, sizeof(req), stream, event, Flags);
    return vgpu_call_async(VGPU_OP_cuStreamWaitEvent, &iov, 1);
}

CUresult CUDAAPI cuStreamWaitEvent_ptsz(CUstream hStream, CUevent hEvent, unsigned int Flags)
    VGPU_ALIAS(cuStreamWaitEvent);
