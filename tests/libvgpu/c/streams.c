/*
 * Asynchronous work: copies and memsets on streams run in stream order, a stream waits for an
 * event recorded on another, events time the work between them, and queries report progress.
 */
#include "check.h"

#include <string.h>

#define SIZE ((size_t)8 << 20)

int main(void)
{
    uint8_t *pattern = xmalloc(SIZE), *back = xmalloc(SIZE);
    uint32_t words[256];
    CUstream s1, s2;
    CUevent start, end, untimed;
    CUdeviceptr a, b;
    CUresult q;
    float ms = -1;

    primary_context();
    CHECK(cuStreamCreate(&s1, CU_STREAM_DEFAULT));
    CHECK(cuStreamCreate(&s2, CU_STREAM_NON_BLOCKING));
    CHECK(cuEventCreate(&start, CU_EVENT_DEFAULT));
    CHECK(cuEventCreate(&end, CU_EVENT_DEFAULT));
    CHECK(cuEventCreate(&untimed, CU_EVENT_DISABLE_TIMING));
    CHECK(cuMemAlloc(&a, SIZE));
    CHECK(cuMemAlloc(&b, SIZE));
    fill(pattern, SIZE, 42);

    /* In one stream, later work sees earlier work: copy, then overwrite the head, read back. */
    CHECK(cuEventRecord(start, s1));
    CHECK(cuMemcpyHtoDAsync(a, pattern, SIZE, s1));
    CHECK(cuMemsetD32Async(a, 0xCAFEF00D, 256, s1));
    CHECK(cuMemsetD8Async(a + 1024, 0x11, 1024, s1));
    CHECK(cuMemcpyDtoDAsync(b, a, SIZE, s1));
    CHECK(cuEventRecord(end, s1));
    q = cuStreamQuery(s1);
    REQUIRE(q == CUDA_SUCCESS || q == CUDA_ERROR_NOT_READY);

    /* Another stream waits for `end` before it reads b. */
    CHECK(cuStreamWaitEvent(s2, end, 0));
    CHECK(cuMemcpyDtoHAsync(back, b, SIZE, s2));
    CHECK(cuStreamSynchronize(s2));
    memcpy(words, back, sizeof(words));
    for (int i = 0; i < 256; i++)
        REQUIRE(words[i] == 0xCAFEF00Du);
    for (int i = 1024; i < 2048; i++)
        REQUIRE(back[i] == 0x11);
    REQUIRE(memcmp(back + 2048, pattern + 2048, SIZE - 2048) == 0);

    CHECK(cuEventSynchronize(end));
    CHECK(cuEventQuery(end));
    CHECK(cuEventElapsedTime(&ms, start, end));
    REQUIRE(ms >= 0);
    printf("elapsed_ms=%f\n", (double)ms);
    CHECK(cuStreamSynchronize(s1));
    CHECK(cuStreamQuery(s1));
    CHECK(cuStreamQuery(s2));

    /* An event without timing cannot be timed; one never recorded is complete. */
    CHECK(cuEventQuery(untimed));
    CHECK(cuEventRecord(untimed, s1));
    CHECK(cuEventSynchronize(untimed));
    EXPECT(cuEventElapsedTime(&ms, start, untimed), CUDA_ERROR_INVALID_HANDLE);

    /* The default streams: NULL, legacy and per-thread all run in order with the rest. */
    CHECK(cuMemsetD8Async(b, 0x22, 16, NULL));
    CHECK(cuMemsetD8Async(b + 16, 0x33, 16, CU_STREAM_LEGACY));
    CHECK(cuMemsetD8Async(b + 32, 0x44, 16, CU_STREAM_PER_THREAD));
    CHECK(cuStreamSynchronize(NULL));
    CHECK(cuStreamQuery(CU_STREAM_LEGACY));
    CHECK(cuMemcpyDtoHAsync(back, b, 48, CU_STREAM_PER_THREAD));
    for (int i = 0; i < 48; i++)
        REQUIRE(back[i] == (i < 16 ? 0x22 : i < 32 ? 0x33 : 0x44));

    CHECK(cuEventDestroy(start));
    CHECK(cuEventDestroy(end));
    CHECK(cuEventDestroy(untimed));
    CHECK(cuStreamDestroy(s1));
    CHECK(cuStreamDestroy(s2));
    EXPECT(cuStreamSynchronize(s1), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuMemcpyHtoDAsync(a, pattern, 16, s2), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuEventRecord(start, NULL), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuEventQuery(end), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuStreamDestroy(s1), CUDA_ERROR_INVALID_HANDLE);
    CHECK(cuCtxSynchronize());
    CHECK(cuMemFree(a));
    CHECK(cuMemFree(b));
    free(pattern);
    free(back);
    printf("ok\n");
    return 0;
}
