/*
 * fork(): the parent's CUDA state is not the child's. One child calls cuInit and works with its
 * own context and memory on a channel of its own; another goes straight to the driver API (no
 * cuInit: the process already made it) and gets a channel on its first call. Meanwhile and
 * afterwards the parent's own channel, memory and context are untouched.
 */
#include "check.h"

#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define SIZE 4096

static void child_work(CUcontext parent_ctx, CUdeviceptr parent_ptr, int call_init)
{
    uint8_t data[SIZE], back[SIZE];
    CUcontext current, ctx;
    CUdeviceptr mine;

    /* Nothing of the parent's is valid here. */
    CHECK(cuCtxGetCurrent(&current));
    REQUIRE(current == NULL);
    EXPECT(cuCtxSetCurrent(parent_ctx), CUDA_ERROR_INVALID_CONTEXT);
    EXPECT(cuMemcpyDtoH(back, parent_ptr, SIZE), CUDA_ERROR_INVALID_CONTEXT);
    if (call_init)
        CHECK(cuInit(0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, 0));
    CHECK(cuCtxSetCurrent(ctx));
    EXPECT(cuMemcpyDtoH(back, parent_ptr, SIZE), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuPointerGetAttribute(&current, CU_POINTER_ATTRIBUTE_CONTEXT, parent_ptr),
           CUDA_ERROR_INVALID_VALUE);
    /* Its own work goes through. */
    fill(data, SIZE, 100 + (uint64_t)call_init);
    CHECK(cuMemAlloc(&mine, SIZE));
    CHECK(cuMemcpyHtoD(mine, data, SIZE));
    CHECK(cuMemcpyDtoH(back, mine, SIZE));
    REQUIRE(memcmp(data, back, SIZE) == 0);
    CHECK(cuMemFree(mine));
    CHECK(cuDevicePrimaryCtxRelease(0));
}

static void run_child(CUcontext ctx, CUdeviceptr ptr, int call_init)
{
    int status;
    pid_t pid = fork();

    REQUIRE(pid >= 0);
    if (pid == 0) {
        child_work(ctx, ptr, call_init);
        fflush(stdout);
        _exit(0);
    }
    REQUIRE(waitpid(pid, &status, 0) == pid);
    REQUIRE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main(void)
{
    uint8_t data[SIZE], back[SIZE];
    CUcontext ctx = primary_context();
    CUdeviceptr p;

    fill(data, SIZE, 1);
    CHECK(cuMemAlloc(&p, SIZE));
    CHECK(cuMemcpyHtoD(p, data, SIZE));
    run_child(ctx, p, 1);
    run_child(ctx, p, 0);
    /* The parent's channel, context and memory came through both children. */
    CHECK(cuMemcpyDtoH(back, p, SIZE));
    REQUIRE(memcmp(data, back, SIZE) == 0);
    CHECK(cuCtxSynchronize());
    CHECK(cuMemFree(p));
    printf("ok\n");
    return 0;
}
