/*
 * Error paths, one per mode:
 *   handles          freed pointers, destroyed or made-up handles, no current context
 *   quota LIMIT      the zone's memory quota (LIMIT bytes) bounds allocations and is reported
 *   sticky CUBIN     a launch gpu-proxy refuses fails later, at the next synchronising call
 *   ipc              gpu-proxy refuses inter-process sharing
 */
#include "check.h"

#include <string.h>

static void handles(void)
{
    uint8_t host[64] = {0};
    CUdeviceptr p;
    CUcontext ctx, created;
    CUstream s;
    CUevent e;
    CUmodule m;

    CHECK(cuInit(0));
    /* No context current yet: what needs one is refused. */
    EXPECT(cuMemAlloc(&p, 64), CUDA_ERROR_INVALID_CONTEXT);
    EXPECT(cuStreamCreate(&s, 0), CUDA_ERROR_INVALID_CONTEXT);
    EXPECT(cuCtxPushCurrent((CUcontext)host), CUDA_ERROR_INVALID_CONTEXT);
    ctx = primary_context();

    CHECK(cuMemAlloc(&p, 64));
    CHECK(cuMemFree(p));
    EXPECT(cuMemFree(p), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemcpyHtoD(p, host, 64), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemcpyDtoH(host, p, 64), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemsetD8Async(p, 0, 64, NULL), CUDA_ERROR_INVALID_VALUE); /* at once, not later */
    EXPECT(cuMemFree((CUdeviceptr)host), CUDA_ERROR_INVALID_VALUE);
    CHECK(cuMemFree(0)); /* no-op, as cudart's cudaFree(0) relies on */

    CHECK(cuStreamCreate(&s, 0));
    CHECK(cuStreamDestroy(s));
    EXPECT(cuStreamQuery(s), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuStreamSynchronize((CUstream)host), CUDA_ERROR_INVALID_HANDLE);
    CHECK(cuEventCreate(&e, 0));
    CHECK(cuEventDestroy(e));
    EXPECT(cuEventSynchronize(e), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuStreamWaitEvent(NULL, e, 0), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuModuleUnload((CUmodule)host), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuModuleLoadData(&m, "this is not a module"), CUDA_ERROR_INVALID_IMAGE);

    /* What a destroyed context owned went with it. */
    CHECK(cuCtxCreate(&created, NULL, 0, 0));
    CHECK(cuMemAlloc(&p, 4096));
    CHECK(cuStreamCreate(&s, 0));
    CHECK(cuCtxDestroy(created));
    EXPECT(cuMemsetD8(p, 0, 16), CUDA_ERROR_INVALID_VALUE); /* the primary is current again */
    EXPECT(cuStreamSynchronize(s), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuCtxSetCurrent(created), CUDA_ERROR_INVALID_CONTEXT);
    {
        CUcontext current;
        CHECK(cuCtxGetCurrent(&current));
        REQUIRE(current == ctx);
    }

    /* Strings for any CUresult, none for what is not one. */
    {
        const char *text;
        CHECK(cuGetErrorName(CUDA_ERROR_OUT_OF_MEMORY, &text));
        REQUIRE(strcmp(text, "CUDA_ERROR_OUT_OF_MEMORY") == 0);
        CHECK(cuGetErrorString(CUDA_ERROR_OUT_OF_MEMORY, &text));
        REQUIRE(strcmp(text, "out of memory") == 0);
        CHECK(cuGetErrorString(CUDA_ERROR_INVALID_HANDLE, &text));
        REQUIRE(strcmp(text, "invalid resource handle") == 0);
        EXPECT(cuGetErrorName((CUresult)12345, &text), CUDA_ERROR_INVALID_VALUE);
        REQUIRE(text == NULL);
        EXPECT(cuGetErrorString((CUresult)12345, &text), CUDA_ERROR_INVALID_VALUE);
    }
}

static void quota(size_t limit)
{
    size_t free, total;
    CUdeviceptr half, big;

    primary_context();
    CHECK(cuMemGetInfo(&free, &total));
    REQUIRE(total == limit && free == limit);
    CHECK(cuDeviceTotalMem(&total, 0));
    REQUIRE(total == limit);
    CHECK(cuMemAlloc(&half, limit / 2));
    EXPECT(cuMemAlloc(&big, limit), CUDA_ERROR_OUT_OF_MEMORY);
    EXPECT(cuMemAlloc(&big, limit / 2 + 4096), CUDA_ERROR_OUT_OF_MEMORY);
    CHECK(cuMemGetInfo(&free, &total));
    REQUIRE(free == limit - limit / 2);
    CHECK(cuMemFree(half));
    CHECK(cuMemAlloc(&big, limit)); /* the whole quota, once it is free */
    CHECK(cuMemFree(big));
}

static void sticky(const char *cubin)
{
    CUmodule m;
    CUfunction noargs;
    CUdeviceptr p;
    uint8_t host[16];

    primary_context();
    CHECK(cuModuleLoad(&m, cubin));
    CHECK(cuModuleGetFunction(&noargs, m, "noargs"));
    CHECK(cuMemAlloc(&p, 16));
    /* More dynamic shared memory than the kernel may have is refused at once, as CUDA does
     * (libvgpu knows the kernel's limit)... */
    EXPECT(cuLaunchKernel(noargs, 1, 1, 1, 1, 1, 1, 1 << 20, NULL, NULL, NULL),
           CUDA_ERROR_INVALID_VALUE);
    /* ...gpu-proxy refuses these (a grid taller than the device allows, more threads than a
     * block may have), but cuLaunchKernel is fire-and-forget: it succeeds... */
    CHECK(cuLaunchKernel(noargs, 1, 65536, 1, 1, 1, 1, 0, NULL, NULL, NULL));
    CHECK(cuLaunchKernel(noargs, 1, 1, 1, 2048, 1, 1, 0, NULL, NULL, NULL));
    /* ...and the first error surfaces at the next synchronising call, which does not run. */
    EXPECT(cuCtxSynchronize(), CUDA_ERROR_INVALID_VALUE);
    /* It was reported once; the channel and the process carry on. */
    CHECK(cuCtxSynchronize());
    CHECK(cuMemcpyHtoD(p, "0123456789abcdef", 16));
    CHECK(cuMemcpyDtoH(host, p, 16));
    REQUIRE(memcmp(host, "0123456789abcdef", 16) == 0);
    /* Any synchronous call is the next one: here an allocation, which is not made. */
    CHECK(cuLaunchKernel(noargs, 1, 1, 1, 4096, 1, 1, 0, NULL, NULL, NULL));
    EXPECT(cuMemAlloc(&p, 16), CUDA_ERROR_INVALID_VALUE);
    CHECK(cuModuleUnload(m));
}

static void ipc(void)
{
    CUipcMemHandle mem_handle;
    CUipcEventHandle event_handle;
    CUdeviceptr p;
    CUevent e;

    primary_context();
    CHECK(cuMemAlloc(&p, 64));
    CHECK(cuEventCreate(&e, CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING));
    EXPECT(cuIpcGetMemHandle(&mem_handle, p), CUDA_ERROR_NOT_PERMITTED);
    memset(&mem_handle, 0, sizeof(mem_handle));
    EXPECT(cuIpcOpenMemHandle(&p, mem_handle, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
           CUDA_ERROR_NOT_PERMITTED);
    EXPECT(cuIpcGetEventHandle(&event_handle, e), CUDA_ERROR_NOT_PERMITTED);
    memset(&event_handle, 0, sizeof(event_handle));
    EXPECT(cuIpcOpenEventHandle(&e, event_handle), CUDA_ERROR_NOT_PERMITTED);
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";

    if (!strcmp(mode, "handles") && argc == 2)
        handles();
    else if (!strcmp(mode, "quota") && argc == 3)
        quota(strtoull(argv[2], NULL, 0));
    else if (!strcmp(mode, "sticky") && argc == 3)
        sticky(argv[2]);
    else if (!strcmp(mode, "ipc") && argc == 2)
        ipc();
    else {
        fprintf(stderr, "usage: see the comment at the top of errors.c\n");
        return 2;
    }
    printf("ok\n");
    return 0;
}
