/*
 * Host functions, stream-ordered allocation and module variables through the driver API, in one
 * program so that test_sanitizers.py runs libvgpu's host-function thread and pool bookkeeping
 * under AddressSanitizer and UBSan too. Usage: stream_order MODULE.cubin. Prints "ok" last.
 */
#include "check.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SIZE (256 * 1024)

struct staging {
    uint8_t *bytes;
    uint64_t seed;
    int order[8];
    atomic_int next;
    atomic_int release;
};

static void fill_staging(void *arg)
{
    struct staging *st = arg;
    fill(st->bytes, SIZE, st->seed);
    st->order[atomic_fetch_add(&st->next, 1)] = 1;
}

static void gated(void *arg)
{
    struct staging *st = arg;
    while (!atomic_load(&st->release))
        ;
    st->order[atomic_fetch_add(&st->next, 1)] = 2;
}

static void callback(CUstream stream, CUresult status, void *arg)
{
    struct staging *st = arg;
    (void)stream;
    st->order[atomic_fetch_add(&st->next, 1)] = status == CUDA_SUCCESS ? 3 : -3;
}

static void host_functions(void)
{
    struct staging st = {.bytes = xmalloc(SIZE), .seed = 7};
    uint8_t *back = xmalloc(SIZE), *want = xmalloc(SIZE);
    CUstream s;
    CUdeviceptr d;

    memset(st.bytes, 0, SIZE);
    CHECK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CHECK(cuMemAlloc(&d, SIZE));
    CHECK(cuMemsetD8Async(d, 0x5a, SIZE, s));
    CHECK(cuLaunchHostFunc(s, fill_staging, &st));
    CHECK(cuMemcpyHtoDAsync(d, st.bytes, SIZE, s)); /* what the host function wrote */
    CHECK(cuMemcpyDtoHAsync(back, d, SIZE, s));
    CHECK(cuStreamSynchronize(s));
    fill(want, SIZE, 7);
    REQUIRE(checksum(back, SIZE) == checksum(want, SIZE));
    CHECK(cuLaunchHostFunc(s, gated, &st));
    CHECK(cuStreamAddCallback(s, callback, &st, 0));
    EXPECT(cuStreamQuery(s), CUDA_ERROR_NOT_READY);
    atomic_store(&st.release, 1);
    CHECK(cuCtxSynchronize());
    REQUIRE(atomic_load(&st.next) == 3);
    REQUIRE(st.order[0] == 1 && st.order[1] == 2 && st.order[2] == 3);
    EXPECT(cuLaunchHostFunc(s, NULL, &st), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuStreamAddCallback(s, callback, &st, 1), CUDA_ERROR_INVALID_VALUE);
    CHECK(cuMemFree(d));
    CHECK(cuStreamDestroy(s));
    free(st.bytes);
    free(back);
    free(want);
}

static void pool(void)
{
    CUmemoryPool p;
    CUstream s;
    CUdeviceptr a, b;
    cuuint64_t used = 0, high = 0, big = UINT64_MAX, zero = 0;
    size_t free_before, free_after, total;
    int reuse = -1;

    CHECK(cuMemGetInfo(&free_before, &total));
    CHECK(cuStreamCreate(&s, 0));
    CHECK(cuDeviceGetDefaultMemPool(&p, 0));
    CHECK(cuMemAllocAsync(&a, 1000, s));
    CHECK(cuMemAllocFromPoolAsync(&b, 3000, p, s));
    CHECK(cuMemPoolGetAttribute(p, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &used));
    REQUIRE(used == 4000);
    CHECK(cuMemFreeAsync(a, s));
    EXPECT(cuMemFreeAsync(a, s), CUDA_ERROR_INVALID_VALUE); /* already freed */
    CHECK(cuMemFree(b));
    CHECK(cuMemPoolGetAttribute(p, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &used));
    CHECK(cuMemPoolGetAttribute(p, CU_MEMPOOL_ATTR_USED_MEM_HIGH, &high));
    REQUIRE(used == 0 && high == 4000);
    CHECK(cuMemPoolSetAttribute(p, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &big));
    CHECK(cuMemPoolGetAttribute(p, CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC, &reuse));
    REQUIRE(reuse == 1);
    EXPECT(cuMemPoolSetAttribute(p, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &zero),
           CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemPoolGetAttribute((CUmemoryPool)&reuse, CU_MEMPOOL_ATTR_USED_MEM_HIGH, &high),
           CUDA_ERROR_INVALID_VALUE);
    CHECK(cuMemPoolTrimTo(p, 0));
    CHECK(cuStreamSynchronize(s));
    CHECK(cuMemGetInfo(&free_after, &total));
    REQUIRE(free_after == free_before);
    CHECK(cuStreamDestroy(s));
}

static void variables(const char *cubin)
{
    CUmodule m;
    CUdeviceptr addr, range_base;
    size_t size = 0, range_size = 0;
    int value = 0, seven = 7;
    CUfunction scale;
    CUlaunchAttribute attr = {.id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE};
    CUlaunchConfig config = {1, 1, 1, 32, 1, 1, 0, NULL, &attr, 1};
    void *params[3] = {&addr, &seven, &seven};

    CHECK(cuModuleLoad(&m, cubin));
    CHECK(cuModuleGetGlobal(&addr, &size, m, "counter"));
    REQUIRE(size == sizeof(int));
    CHECK(cuMemcpyDtoH(&value, addr, sizeof(value)));
    REQUIRE(value == 5);
    CHECK(cuMemcpyHtoD(addr, &seven, sizeof(seven)));
    CHECK(cuMemcpyDtoH(&value, addr, sizeof(value)));
    REQUIRE(value == 7);
    CHECK(cuMemGetAddressRange(&range_base, &range_size, addr));
    REQUIRE(range_base == addr && range_size == sizeof(int));
    EXPECT(cuModuleGetGlobal(&addr, &size, m, "nope"), CUDA_ERROR_NOT_FOUND);
    EXPECT(cuMemFree(addr), CUDA_ERROR_INVALID_VALUE);
    CHECK(cuModuleGetFunction(&scale, m, "scale"));
    attr.value.cooperative = 1;
    EXPECT(cuLaunchKernelEx(&config, scale, params, NULL), CUDA_ERROR_NOT_SUPPORTED);
    attr.value.cooperative = 0;
    CHECK(cuLaunchKernelEx(&config, scale, params, NULL));
    CHECK(cuCtxSynchronize());
    CHECK(cuModuleUnload(m));
    EXPECT(cuMemcpyDtoH(&value, addr, sizeof(value)), CUDA_ERROR_INVALID_VALUE);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: stream_order MODULE.cubin\n");
        return 2;
    }
    primary_context();
    host_functions();
    pool();
    variables(argv[1]);
    printf("ok\n");
    return 0;
}
