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
    int priority; /* kept here: the call table's cuStreamCreate carries no priority */
};

/* The range the real driver reports for cc 7.0 and later; lower numbers are higher priorities. */
#define LEAST_PRIORITY 0
#define GREATEST_PRIORITY (-5)

static int is_default(CUstream stream)
{
    return !stream || stream == CU_STREAM_LEGACY || stream == CU_STREAM_PER_THREAD;
}

CUresult vgpu_stream_id(CUstream stream, uint64_t *id)
{
    CUresult r = vgpu_stream_handle_id(stream, id);

    if (!r)
        vgpu_host_funcs_wait(*id);
    return r;
}

CUresult vgpu_stream_handle_id(CUstream stream, uint64_t *id)
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

/* A priority outside the range is clamped to it, as the driver does. */
VGPU_API CUresult CUDAAPI cuStreamCreateWithPriority(CUstream *phStream, unsigned int Flags,
                                                     int priority)
{
    uint64_t id;
    CUcontext ctx;
    struct CUstream_st *s;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!phStream)
        return CUDA_ERROR_INVALID_VALUE;
    r = vgpu_remote_create(VGPU_OP_cuStreamCreate, vgpu_marshal_cuStreamCreate,
                           vgpu_unmarshal_cuStreamCreate_reply, Flags, &id);
    if (r)
        return r;
    s = malloc(sizeof(*s));
    if (s) {
        s->obj = (struct vgpu_object){VGPU_KIND_STREAM, id, ctx, free_stream};
        s->flags = Flags;
        s->priority = priority > LEAST_PRIORITY      ? LEAST_PRIORITY
                      : priority < GREATEST_PRIORITY ? GREATEST_PRIORITY
                                                     : priority;
    }
    r = vgpu_remote_adopt(s ? &s->obj : NULL, id, VGPU_OP_cuStreamDestroy_v2,
                          vgpu_marshal_cuStreamDestroy_v2);
    if (!r)
        *phStream = s;
    return r;
}

VGPU_API CUresult CUDAAPI cuStreamCreate(CUstream *phStream, unsigned int Flags)
{
    return cuStreamCreateWithPriority(phStream, Flags, LEAST_PRIORITY);
}

VGPU_API CUresult CUDAAPI cuCtxGetStreamPriorityRange(int *leastPriority, int *greatestPriority)
{
    CUcontext ctx;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (leastPriority)
        *leastPriority = LEAST_PRIORITY;
    if (greatestPriority)
        *greatestPriority = GREATEST_PRIORITY;
    return CUDA_SUCCESS;
}

/* What the stream was created with; the default streams have flags 0 and the lowest priority. */
static CUresult created_with(CUstream stream, unsigned int *flags, int *priority, CUcontext *ctx)
{
    struct CUstream_st *s;
    CUcontext current;
    CUresult r = vgpu_current_context(&current, NULL);

    if (r)
        return r;
    if (is_default(stream)) {
        *flags = 0;
        *priority = LEAST_PRIORITY;
        *ctx = current;
        return CUDA_SUCCESS;
    }
    vgpu_lock();
    s = (struct CUstream_st *)vgpu_objects_find(stream, VGPU_KIND_STREAM);
    if (s) {
        *flags = s->flags;
        *priority = s->priority;
        *ctx = s->obj.ctx;
    }
    vgpu_unlock();
    return s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

VGPU_API CUresult CUDAAPI cuStreamGetPriority(CUstream hStream, int *priority)
{
    unsigned int flags;
    CUcontext ctx;

    if (!priority)
        return CUDA_ERROR_INVALID_VALUE;
    return created_with(hStream, &flags, priority, &ctx);
}

CUresult CUDAAPI cuStreamGetPriority_ptsz(CUstream hStream, int *priority)
    VGPU_ALIAS(cuStreamGetPriority);

VGPU_API CUresult CUDAAPI cuStreamGetFlags(CUstream hStream, unsigned int *flags)
{
    int priority;
    CUcontext ctx;

    if (!flags)
        return CUDA_ERROR_INVALID_VALUE;
    return created_with(hStream, flags, &priority, &ctx);
}

CUresult CUDAAPI cuStreamGetFlags_ptsz(CUstream hStream, unsigned int *flags)
    VGPU_ALIAS(cuStreamGetFlags);

VGPU_API CUresult CUDAAPI cuStreamGetCtx(CUstream hStream, CUcontext *pctx)
{
    unsigned int flags;
    int priority;

    if (!pctx)
        return CUDA_ERROR_INVALID_VALUE;
    return created_with(hStream, &flags, &priority, pctx);
}

CUresult CUDAAPI cuStreamGetCtx_ptsz(CUstream hStream, CUcontext *pctx)
    VGPU_ALIAS(cuStreamGetCtx);

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
    CUresult r = vgpu_stream_handle_id(hStream, &id);

    if (r)
        return r;
    if (vgpu_host_funcs_pending(id))
        return CUDA_ERROR_NOT_READY; /* a host function on it has not returned */
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

/* Stream capture: libvgpu offers no graphs (cuStreamBeginCapture is not an entry point), so no
 * stream is ever capturing. PyTorch asks before every allocation (cudaStreamIsCapturing). */
VGPU_API CUresult CUDAAPI cuStreamIsCapturing(CUstream hStream,
                                              CUstreamCaptureStatus *captureStatus)
{
    uint64_t id;
    CUresult r = vgpu_stream_handle_id(hStream, &id);

    if (r)
        return r;
    if (!captureStatus)
        return CUDA_ERROR_INVALID_VALUE;
    *captureStatus = CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamIsCapturing_ptsz(CUstream hStream, CUstreamCaptureStatus *captureStatus)
    VGPU_ALIAS(cuStreamIsCapturing);

/* The capture information of a stream that is not capturing: only the status is defined. */
VGPU_API CUresult CUDAAPI cuStreamGetCaptureInfo_v3(CUstream hStream,
                                                    CUstreamCaptureStatus *captureStatus_out,
                                                    cuuint64_t *id_out, CUgraph *graph_out,
                                                    const CUgraphNode **dependencies_out,
                                                    const CUgraphEdgeData **edgeData_out,
                                                    size_t *numDependencies_out)
{
    (void)id_out, (void)graph_out, (void)dependencies_out, (void)edgeData_out;
    (void)numDependencies_out;
    return cuStreamIsCapturing(hStream, captureStatus_out);
}

CUresult CUDAAPI cuStreamGetCaptureInfo_v3_ptsz(CUstream hStream,
                                                CUstreamCaptureStatus *captureStatus_out,
                                                cuuint64_t *id_out, CUgraph *graph_out,
                                                const CUgraphNode **dependencies_out,
                                                const CUgraphEdgeData **edgeData_out,
                                                size_t *numDependencies_out)
    VGPU_ALIAS(cuStreamGetCaptureInfo_v3);

VGPU_API CUresult CUDAAPI cuStreamGetCaptureInfo_v2(CUstream hStream,
                                                    CUstreamCaptureStatus *captureStatus_out,
                                                    cuuint64_t *id_out, CUgraph *graph_out,
                                                    const CUgraphNode **dependencies_out,
                                                    size_t *numDependencies_out)
{
    (void)id_out, (void)graph_out, (void)dependencies_out, (void)numDependencies_out;
    return cuStreamIsCapturing(hStream, captureStatus_out);
}

CUresult CUDAAPI cuStreamGetCaptureInfo_v2_ptsz(CUstream hStream,
                                                CUstreamCaptureStatus *captureStatus_out,
                                                cuuint64_t *id_out, CUgraph *graph_out,
                                                const CUgraphNode **dependencies_out,
                                                size_t *numDependencies_out)
    VGPU_ALIAS(cuStreamGetCaptureInfo_v2);

/* The calling thread's capture interaction mode: kept (and exchanged) though no capture can
 * start, because cudart and PyTorch set it around sections that must not be captured. */
VGPU_API CUresult CUDAAPI cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *mode)
{
    static _Thread_local CUstreamCaptureMode current = CU_STREAM_CAPTURE_MODE_GLOBAL;
    CUstreamCaptureMode previous = current;

    if (!mode || (*mode != CU_STREAM_CAPTURE_MODE_GLOBAL &&
                  *mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
                  *mode != CU_STREAM_CAPTURE_MODE_RELAXED))
        return CUDA_ERROR_INVALID_VALUE;
    current = *mode;
    *mode = previous;
    return CUDA_SUCCESS;
}
