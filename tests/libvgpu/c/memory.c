/*
 * Device memory through libvgpu: round trips host -> device -> device -> host in sizes from one
 * byte to 64 MiB + 1 (more than one message: libvgpu splits it), copies into the middle of an
 * allocation, memsets of bytes and words, usage accounting, and the pointer attributes libvgpu
 * answers from its own records.
 */
#include "check.h"

#include <stdbool.h>
#include <string.h>

#define MiB ((size_t)1 << 20)

static void round_trip(size_t size, uint64_t seed)
{
    uint8_t *src = xmalloc(size), *back = xmalloc(size);
    CUdeviceptr a, b;

    fill(src, size, seed);
    memset(back, 0, size);
    CHECK(cuMemAlloc(&a, size));
    CHECK(cuMemAlloc(&b, size));
    CHECK(cuMemcpyHtoD(a, src, size));
    CHECK(cuMemcpyDtoD(b, a, size));
    CHECK(cuMemsetD8(a, 0, size)); /* b must not share a's bytes */
    CHECK(cuMemcpyDtoH(back, b, size));
    if (checksum(back, size) != checksum(src, size)) {
        fprintf(stderr, "round trip of %zu bytes came back different\n", size);
        exit(1);
    }
    CHECK(cuMemFree(a));
    CHECK(cuMemFree(b));
    printf("round_trip %zu %016llx\n", size, (unsigned long long)checksum(src, size));
    free(src);
    free(back);
}

static void partial_copies(void)
{
    uint8_t src[4096], back[4096], expect[4096];
    CUdeviceptr a;

    fill(src, sizeof(src), 7);
    CHECK(cuMemAlloc(&a, sizeof(src)));
    CHECK(cuMemsetD8(a, 0xAB, sizeof(src)));
    CHECK(cuMemcpyHtoD(a + 1000, src, 1000)); /* into the middle */
    CHECK(cuMemcpyDtoD(a + 3000, a + 1000, 500));
    CHECK(cuMemcpyDtoH(back, a, sizeof(back)));
    memset(expect, 0xAB, sizeof(expect));
    memcpy(expect + 1000, src, 1000);
    memcpy(expect + 3000, src, 500);
    REQUIRE(memcmp(back, expect, sizeof(back)) == 0);
    /* Zero-byte copies are no-ops; a range past the allocation is refused. */
    CHECK(cuMemcpyHtoD(a, src, 0));
    EXPECT(cuMemcpyHtoD(a + 4000, src, 97), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemcpyDtoH(back, a + 1, sizeof(back)), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuMemcpyDtoD(a, a + 2048, 4096), CUDA_ERROR_INVALID_VALUE);
    CHECK(cuMemFree(a));
}

static void memsets(void)
{
    uint32_t words[1024];
    uint8_t bytes[4096];
    CUdeviceptr a;

    CHECK(cuMemAlloc(&a, sizeof(words)));
    CHECK(cuMemsetD32(a, 0xDEADBEEF, 1024));
    CHECK(cuMemsetD32(a + 8, 0x01020304, 2));
    CHECK(cuMemsetD8(a + 4000, 0x5A, 96));
    CHECK(cuMemcpyDtoH(words, a, sizeof(words)));
    memcpy(bytes, words, sizeof(bytes));
    for (int i = 0; i < 1000; i++) {
        uint32_t want = i == 2 || i == 3 ? 0x01020304u : 0xDEADBEEFu;
        REQUIRE(words[i] == want);
    }
    for (int i = 4000; i < 4096; i++)
        REQUIRE(bytes[i] == 0x5A);
    EXPECT(cuMemsetD32(a + 2, 0, 1), CUDA_ERROR_INVALID_VALUE);      /* misaligned */
    EXPECT(cuMemsetD32(a, 0, 1025), CUDA_ERROR_INVALID_VALUE);       /* past the end */
    CHECK(cuMemFree(a));
}

static void accounting_and_attributes(void)
{
    size_t free0, total0, free1, total1, range_size;
    CUdeviceptr a, base;
    CUcontext ctx, owner;
    unsigned int type;
    int ordinal;
    bool managed = true;
    unsigned long long id_a, id_b;
    CUpointer_attribute attrs[3] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                                    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                    CU_POINTER_ATTRIBUTE_RANGE_SIZE};
    void *values[3] = {&type, &ordinal, &range_size};
    uint8_t host[64];

    CHECK(cuCtxGetCurrent(&ctx));
    CHECK(cuMemGetInfo(&free0, &total0));
    CHECK(cuMemAlloc(&a, 3 * MiB));
    CHECK(cuMemGetInfo(&free1, &total1));
    REQUIRE(total0 == total1 && free0 - free1 >= 3 * MiB);
    printf("total=%zu\n", total0);

    CHECK(cuPointerGetAttribute(&owner, CU_POINTER_ATTRIBUTE_CONTEXT, a + 12345));
    REQUIRE(owner == ctx);
    CHECK(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, a));
    REQUIRE(type == CU_MEMORYTYPE_DEVICE);
    CHECK(cuPointerGetAttribute(&base, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, a + 100));
    REQUIRE(base == a);
    CHECK(cuPointerGetAttribute(&managed, CU_POINTER_ATTRIBUTE_IS_MANAGED, a));
    REQUIRE(!managed);
    CHECK(cuPointerGetAttribute(&id_a, CU_POINTER_ATTRIBUTE_BUFFER_ID, a));
    CHECK(cuMemGetAddressRange(&base, &range_size, a + 3 * MiB - 1));
    REQUIRE(base == a && range_size == 3 * MiB);
    EXPECT(cuMemGetAddressRange(&base, &range_size, a + 3 * MiB), CUDA_ERROR_NOT_FOUND);
    EXPECT(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)host),
           CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_HOST_POINTER, a),
           CUDA_ERROR_INVALID_VALUE);
    CHECK(cuPointerGetAttributes(3, attrs, values, a + 1));
    REQUIRE(type == CU_MEMORYTYPE_DEVICE && ordinal == 0 && range_size == 3 * MiB);
    CHECK(cuPointerGetAttributes(3, attrs, values, (CUdeviceptr)host)); /* not an error here */
    REQUIRE(type == 0 && ordinal == 0 && range_size == 0);

    CHECK(cuMemFree(a));
    CHECK(cuMemGetInfo(&free1, &total1));
    REQUIRE(free1 == free0);
    EXPECT(cuPointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, a),
           CUDA_ERROR_INVALID_VALUE);
    CHECK(cuMemAlloc(&a, 64));
    CHECK(cuPointerGetAttribute(&id_b, CU_POINTER_ATTRIBUTE_BUFFER_ID, a));
    REQUIRE(id_b != id_a);
    EXPECT(cuMemAlloc(&a, 0), CUDA_ERROR_INVALID_VALUE);
    CHECK(cuMemFree(a));
}

int main(void)
{
    static const size_t sizes[] = {1,       3,        4096,     65537, MiB, 4 * MiB + 5,
                                   64 * MiB, 64 * MiB + 1};

    primary_context();
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        round_trip(sizes[i], i + 1);
    partial_copies();
    memsets();
    accounting_and_attributes();
    printf("ok\n");
    return 0;
}
