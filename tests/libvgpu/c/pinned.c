/*
 * Pinned host memory through libvgpu: cuMemAllocHost / cuMemHostAlloc buffers round-trip through
 * device memory with the asynchronous and synchronous copies, from and to the middle of a pinned
 * buffer, up to 64 MiB + 1 in one copy; cuMemHostRegister'ed memory of the program's own is
 * copied too; flags, double registration and bad frees answer as CUDA does.
 * Prints "pinned <bytes> <checksum>" per round trip, then "ok".
 */
#include "check.h"

#include <string.h>

#define MiB ((size_t)1 << 20)

static void round_trip(CUstream stream, size_t size, uint64_t seed)
{
    uint8_t *src, *back;
    CUdeviceptr dev;
    uint64_t sum;

    CHECK(cuMemAllocHost((void **)&src, size));
    CHECK(cuMemHostAlloc((void **)&back, size + 64, CU_MEMHOSTALLOC_PORTABLE));
    fill(src, size, seed);
    sum = checksum(src, size);
    memset(back, 0xAA, size + 64);
    CHECK(cuMemAlloc(&dev, size));
    CHECK(cuMemcpyHtoDAsync(dev, src, size, stream));
    CHECK(cuStreamSynchronize(stream));
    memset(src, 0, size); /* the device has its own copy now */
    CHECK(cuMemcpyDtoHAsync(back + 64, dev, size, stream)); /* into the middle of a buffer */
    CHECK(cuStreamSynchronize(stream));
    REQUIRE(checksum(back + 64, size) == sum);
    for (int i = 0; i < 64; i++)
        REQUIRE(back[i] == 0xAA); /* nothing before the destination range was touched */
    /* The synchronous forms, from the middle of a pinned buffer to the start of another. */
    CHECK(cuMemsetD8(dev, 0, size));
    CHECK(cuMemcpyHtoD(dev, back + 64, size));
    CHECK(cuMemcpyDtoH(src, dev, size));
    REQUIRE(checksum(src, size) == sum);
    CHECK(cuMemFree(dev));
    CHECK(cuMemFreeHost(src));
    CHECK(cuMemFreeHost(back));
    printf("pinned %zu %016llx\n", size, (unsigned long long)sum);
}

/* Copies queued back to back on a stream, without a synchronisation between them, run in order:
 * device -> pinned -> device -> pinned, each reading what the one before wrote. */
static void stream_ordered_chain(CUstream stream)
{
    size_t size = 3 * MiB + 17;
    uint8_t *a, *b;
    CUdeviceptr d1, d2;

    CHECK(cuMemAllocHost((void **)&a, size));
    CHECK(cuMemAllocHost((void **)&b, size));
    CHECK(cuMemAlloc(&d1, size));
    CHECK(cuMemAlloc(&d2, size));
    fill(a, size, 99);
    memset(b, 0, size);
    CHECK(cuMemcpyHtoDAsync(d1, a, size, stream));
    CHECK(cuMemcpyDtoDAsync(d2, d1, size, stream));
    CHECK(cuMemcpyDtoHAsync(b, d2, size, stream));
    CHECK(cuStreamSynchronize(stream));
    REQUIRE(memcmp(a, b, size) == 0);
    CHECK(cuMemFree(d1));
    CHECK(cuMemFree(d2));
    CHECK(cuMemFreeHost(a));
    CHECK(cuMemFreeHost(b));
}

static void registered_memory(CUstream stream)
{
    size_t size = 2 * MiB + 3;
    uint8_t *host = xmalloc(size), *back = xmalloc(size);
    CUdeviceptr dev;

    fill(host, size, 7);
    CHECK(cuMemHostRegister(host, size, CU_MEMHOSTREGISTER_PORTABLE));
    EXPECT(cuMemHostRegister(host + 100, 10, 0), CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED);
    CHECK(cuMemAlloc(&dev, size));
    CHECK(cuMemcpyHtoDAsync(dev, host, size, stream));
    CHECK(cuMemcpyDtoHAsync(back, dev, size, stream));
    CHECK(cuStreamSynchronize(stream));
    REQUIRE(memcmp(host, back, size) == 0);
    CHECK(cuMemHostUnregister(host));
    EXPECT(cuMemHostUnregister(host), CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED);
    EXPECT(cuMemFreeHost(host), CUDA_ERROR_INVALID_VALUE); /* not cuMemHostAlloc'ed */
    CHECK(cuMemFree(dev));
    free(host);
    free(back);
}

static void flags_and_refusals(void)
{
    unsigned int flags = 0;
    void *p, *q;

    CHECK(cuMemHostAlloc(&p, 4096, CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_WRITECOMBINED));
    CHECK(cuMemHostGetFlags(&flags, (uint8_t *)p + 100));
    REQUIRE(flags == (CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_WRITECOMBINED));
    EXPECT(cuMemHostAlloc(&q, 4096, 0x80), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemHostAlloc(&q, 0, 0), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemFreeHost((uint8_t *)p + 1), CUDA_ERROR_INVALID_VALUE);
    CHECK(cuMemFreeHost(p));
    EXPECT(cuMemFreeHost(p), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemHostGetFlags(&flags, p), CUDA_ERROR_INVALID_VALUE);
}

int main(void)
{
    static const size_t sizes[] = {1, 4096, 65537, 4 * MiB + 5, 64 * MiB + 1};
    CUstream stream;

    primary_context();
    CHECK(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        round_trip(stream, sizes[i], i + 1);
    stream_ordered_chain(stream);
    registered_memory(stream);
    flags_and_refusals();
    CHECK(cuStreamDestroy(stream));
    printf("ok\n");
    return 0;
}
