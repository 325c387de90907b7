/*
 * Host functions in stream order (cuLaunchHostFunc, cuStreamAddCallback). gpu-proxy cannot call
 * into the zone, so the zone runs them and keeps the order itself:
 *
 *  - the call sends a fire-and-forget mark (vgpuHostFuncMark): gpu-proxy records an event there
 *    on the stream, after the work queued before;
 *  - one thread per process takes the host functions in the order they were added, polls
 *    gpu-proxy until the stream has reached the function's mark (vgpuHostFuncPoll, which leaves
 *    an earlier fire-and-forget error for the application's next call), and runs it;
 *  - until it has returned, the stream has a pending host function: a later submission to that
 *    stream (a launch, copy, memset, event record or wait, a synchronize or query) from an
 *    application thread waits for it here before it is sent, so nothing queued after the host
 *    function can start before it. Work on the legacy default stream, and the context-wide
 *    calls, wait for every pending host function; work on any stream waits for one pending on
 *    the legacy stream (the legacy stream's implicit synchronisation, over-approximated for
 *    non-blocking streams).
 *
 * Cost: one asynchronous message per host function, polls (each a round trip, backing off from
 * 20 us to 1 ms) while the stream has not reached it, and the submitting thread blocks on a
 * stream with a pending host function, where CUDA would let it queue the work and return.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#define POLL_FIRST_NS 20000L
#define POLL_MAX_NS 1000000L

struct job {
    struct job *next;
    uint64_t mark;
    uint64_t stream; /* gpu-proxy's id; 0: the legacy default stream */
    CUstream handle;
    CUhostFn fn;           /* cuLaunchHostFunc, or */
    CUstreamCallback cb;   /* cuStreamAddCallback */
    void *data;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER; /* a job was queued */
static pthread_cond_t done = PTHREAD_COND_INITIALIZER; /* a host function returned */
static struct job *head, *tail; /* queued, not yet taken by the thread */
static struct job *running;     /* taken, not yet returned */
static int thread_started;
static uint64_t next_mark;
static _Thread_local int on_host_thread;

/* Whether a host function on `stream` (UINT64_MAX: on any stream) is queued or running. */
static int pending_on(uint64_t stream)
{
    if (running && (stream == UINT64_MAX || running->stream == stream))
        return 1;
    for (struct job *j = head; j; j = j->next)
        if (stream == UINT64_MAX || j->stream == stream)
            return 1;
    return 0;
}

static int must_wait(uint64_t stream)
{
    if (stream == 0)
        return pending_on(UINT64_MAX);
    return pending_on(stream) || pending_on(0);
}

void vgpu_host_funcs_wait(uint64_t stream)
{
    if (on_host_thread)
        return;
    pthread_mutex_lock(&lock);
    while (must_wait(stream))
        pthread_cond_wait(&done, &lock);
    pthread_mutex_unlock(&lock);
}

int vgpu_host_funcs_pending(uint64_t stream)
{
    int pending;

    pthread_mutex_lock(&lock);
    pending = must_wait(stream);
    pthread_mutex_unlock(&lock);
    return pending;
}

/* Wait until gpu-proxy says the stream reached the mark: CUDA_SUCCESS, or why not. */
static CUresult reach(uint64_t mark)
{
    long pause = POLL_FIRST_NS;

    for (;;) {
        uint8_t req[8], rep[8];
        size_t len;
        int ready = 0;
        struct iovec iov = {req, (size_t)vgpu_marshal_vgpuHostFuncPoll(req, sizeof(req), mark)};
        CUresult r = vgpu_call(VGPU_OP_vgpuHostFuncPoll, &iov, 1, rep, sizeof(rep), &len);

        if (!r && vgpu_unmarshal_vgpuHostFuncPoll_reply(rep, len, &ready) < 0)
            r = CUDA_ERROR_UNKNOWN;
        if (r || ready)
            return r;
        nanosleep(&(struct timespec){0, pause}, NULL);
        pause = pause * 2 > POLL_MAX_NS ? POLL_MAX_NS : pause * 2;
    }
}

static void *host_thread(void *arg)
{
    (void)arg;
    on_host_thread = 1;
    for (;;) {
        struct job *j;
        CUresult status;

        pthread_mutex_lock(&lock);
        while (!head)
            pthread_cond_wait(&work, &lock);
        j = head;
        head = j->next;
        if (!head)
            tail = NULL;
        running = j;
        pthread_mutex_unlock(&lock);

        status = reach(j->mark);
        if (j->cb)
            j->cb(j->handle, status, j->data);
        else if (status == CUDA_SUCCESS)
            j->fn(j->data); /* a stream in error runs no more of its work */
        else
            vgpu_log("host function not run: its stream failed (CUresult %d)", (int)status);

        pthread_mutex_lock(&lock);
        running = NULL;
        pthread_cond_broadcast(&done);
        pthread_mutex_unlock(&lock);
        free(j);
    }
    return NULL;
}

static CUresult add(CUstream hStream, CUhostFn fn, CUstreamCallback cb, void *data)
{
    uint8_t req[24];
    uint64_t stream;
    struct iovec iov = {req, 0};
    struct job *j;
    int started;
    CUresult r = vgpu_stream_handle_id(hStream, &stream);

    if (r)
        return r;
    j = calloc(1, sizeof(*j));
    if (!j)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *j = (struct job){NULL, 0, stream, hStream, fn, cb, data};
    pthread_mutex_lock(&lock);
    j->mark = ++next_mark;
    if (!thread_started) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        thread_started = pthread_create(&t, &attr, host_thread, NULL) == 0;
        pthread_attr_destroy(&attr);
    }
    started = thread_started;
    pthread_mutex_unlock(&lock);
    if (!started) {
        free(j);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    /* The mark is in the ring before the thread can poll for it. */
    iov.iov_len = (size_t)vgpu_marshal_vgpuHostFuncMark(req, sizeof(req), stream, j->mark);
    r = vgpu_call_async(VGPU_OP_vgpuHostFuncMark, &iov, 1);
    if (r) {
        free(j);
        return r;
    }
    pthread_mutex_lock(&lock);
    if (tail)
        tail->next = j;
    else
        head = j;
    tail = j;
    pthread_cond_signal(&work);
    pthread_mutex_unlock(&lock);
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuLaunchHostFunc(CUstream hStream, CUhostFn fn, void *userData)
{
    if (!fn)
        return CUDA_ERROR_INVALID_VALUE;
    return add(hStream, fn, NULL, userData);
}

CUresult CUDAAPI cuLaunchHostFunc_ptsz(CUstream hStream, CUhostFn fn, void *userData)
    VGPU_ALIAS(cuLaunchHostFunc);

/* flags must be 0 (CUDA reserves them). The callback gets the stream's status. */
VGPU_API CUresult CUDAAPI cuStreamAddCallback(CUstream hStream, CUstreamCallback callback,
                                              void *userData, unsigned int flags)
{
    if (!callback || flags)
        return CUDA_ERROR_INVALID_VALUE;
    return add(hStream, NULL, callback, userData);
}

CUresult CUDAAPI cuStreamAddCallback_ptsz(CUstream hStream, CUstreamCallback callback,
                                          void *userData, unsigned int flags)
    VGPU_ALIAS(cuStreamAddCallback);

void vgpu_host_funcs_atfork(enum vgpu_fork_phase phase)
{
    switch (phase) {
    case VGPU_FORK_PREPARE:
        pthread_mutex_lock(&lock);
        break;
    case VGPU_FORK_PARENT:
        pthread_mutex_unlock(&lock);
        break;
    case VGPU_FORK_CHILD:
        /* The thread is not copied, and the jobs were the parent's: forget them. */
        while (head) {
            struct job *j = head;
            head = j->next;
            free(j);
        }
        tail = NULL;
        free(running);
        running = NULL;
        thread_started = 0;
        pthread_mutex_init(&lock, NULL);
        pthread_cond_init(&work, NULL);
        pthread_cond_init(&done, NULL);
        break;
    }
}
