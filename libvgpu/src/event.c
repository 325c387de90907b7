/*
 * Events. Recording is fire-and-forget (its errors surface at the next synchronous call);
 * queries, waits and elapsed times are synchronous calls to gpu-proxy, which timestamps an event
 * when its stream reaches it.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <stdlib.h>

struct CUevent_st {
    struct vgpu_object obj;
    unsigned int flags;
};

CUresult vgpu_event_id(CUevent event, uint64_t *id)
{
    struct vgpu_object *obj;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    vgpu_lock();
    obj = vgpu_objects_find(event, VGPU_KIND_EVENT);
    if (obj)
        *id = obj->id;
    vgpu_unlock();
    return obj ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

static void free_event(struct vgpu_object *obj)
{
    free(obj);
}

/* A synchronous call naming one event, with no reply fields. */
static CUresult event_call(uint32_t opcode, CUevent event,
                           int (*marshal)(uint8_t *, size_t, uint64_t))
{
    uint8_t req[8], rep[8];
    size_t len;
    uint64_t id;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_event_id(event, &id);

    if (r)
        return r;
    iov.iov_len = (size_t)marshal(req, sizeof(req), id);
    return vgpu_call(opcode, &iov, 1, rep, sizeof(rep), &len);
}

VGPU_API CUresult CUDAAPI cuEventCreate(CUevent *phEvent, unsigned int Flags)
{
    uint64_t id;
    CUcontext ctx;
    struct CUevent_st *e;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!phEvent)
        return CUDA_ERROR_INVALID_VALUE;
    r = vgpu_remote_create(VGPU_OP_cuEventCreate, vgpu_marshal_cuEventCreate,
                           vgpu_unmarshal_cuEventCreate_reply, Flags, &id);
    if (r)
        return r;
    e = malloc(sizeof(*e));
    if (e) {
        e->obj = (struct vgpu_object){VGPU_KIND_EVENT, id, ctx, free_event};
        e->flags = Flags;
    }
    r = vgpu_remote_adopt(e ? &e->obj : NULL, id, VGPU_OP_cuEventDestroy_v2,
                          vgpu_marshal_cuEventDestroy_v2);
    if (!r)
        *phEvent = e;
    return r;
}

VGPU_API CUresult CUDAAPI cuEventRecord(CUevent hEvent, CUstream hStream)
{
    uint8_t req[16];
    uint64_t event, stream;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_event_id(hEvent, &event);

    if (!r)
        r = vgpu_stream_id(hStream, &stream);
    if (r)
        return r;
    iov.iov_len = (size_t)vgpu_marshal_cuEventRecord(req, sizeof(req), event, stream);
    return vgpu_call_async(VGPU_OP_cuEventRecord, &iov, 1);
}

CUresult CUDAAPI cuEventRecord_ptsz(CUevent hEvent, CUstream hStream) VGPU_ALIAS(cuEventRecord);

VGPU_API CUresult CUDAAPI cuEventSynchronize(CUevent hEvent)
{
    return event_call(VGPU_OP_cuEventSynchronize, hEvent, vgpu_marshal_cuEventSynchronize);
}

/* CUDA_SUCCESS once the event's work has run, CUDA_ERROR_NOT_READY before. */
VGPU_API CUresult CUDAAPI cuEventQuery(CUevent hEvent)
{
    return event_call(VGPU_OP_cuEventQuery, hEvent, vgpu_marshal_cuEventQuery);
}

VGPU_API CUresult CUDAAPI cuEventElapsedTime_v2(float *pMilliseconds, CUevent hStart,
                                                CUevent hEnd)
{
    uint8_t req[16], rep[8];
    size_t len;
    uint64_t start, end;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_event_id(hStart, &start);

    if (!r)
        r = vgpu_event_id(hEnd, &end);
    if (r)
        return r;
    if (!pMilliseconds)
        return CUDA_ERROR_INVALID_VALUE;
    iov.iov_len = (size_t)vgpu_marshal_cuEventElapsedTime(req, sizeof(req), start, end);
    r = vgpu_call(VGPU_OP_cuEventElapsedTime, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    return vgpu_unmarshal_cuEventElapsedTime_reply(rep, len, pMilliseconds) < 0
               ? CUDA_ERROR_UNKNOWN
               : CUDA_SUCCESS;
}

/* cuda.h 13 spells cuEventElapsedTime as the _v2 name; older binaries call the unversioned one.
 * gpu-proxy has one call for both. */
CUresult CUDAAPI cuEventElapsedTime(float *pMilliseconds, CUevent hStart, CUevent hEnd)
    VGPU_ALIAS(cuEventElapsedTime_v2);

VGPU_API CUresult CUDAAPI cuEventDestroy_v2(CUevent hEvent)
{
    struct vgpu_object *obj;
    CUresult r = event_call(VGPU_OP_cuEventDestroy_v2, hEvent, vgpu_marshal_cuEventDestroy_v2);

    if (r)
        return r;
    /* Whoever takes it out of the table frees it: a concurrent destroy failed remotely. */
    vgpu_lock();
    obj = vgpu_objects_find(hEvent, VGPU_KIND_EVENT);
    if (obj)
        vgpu_objects_remove(obj);
    vgpu_unlock();
    if (obj)
        obj->destroy(obj);
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuEventDestroy(CUevent hEvent) VGPU_ALIAS(cuEventDestroy_v2);
