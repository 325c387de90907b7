/*
 * Eight threads share the process's channel: each allocates, copies in both directions (plain
 * and on a stream of its own), checks its bytes and frees, many times over, all at once. At the
 * end every byte is given back.
 */
#include "check.h"

#include <pthread.h>
#include <string.h>

#define THREADS 8
#define ROUNDS 25

static CUcontext shared_ctx;

static void *worker(void *arg)
{
    uint64_t id = (uint64_t)(uintptr_t)arg;
    CUstream s;

    CHECK(cuCtxSetCurrent(shared_ctx)); /* each thread has its own context stack */
    CHECK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    for (uint64_t round = 0; round < ROUNDS; round++) {
        size_t size = 1 + (size_t)((id * 7919 + round * 104729) % (256 << 10));
        uint8_t *data = xmalloc(size), *back = xmalloc(size);
        CUdeviceptr a, b;

        fill(data, size, id * 1000 + round);
        CHECK(cuMemAlloc(&a, size));
        CHECK(cuMemAlloc(&b, size));
        CHECK(cuMemcpyHtoD(a, data, size));
        CHECK(cuMemcpyDtoDAsync(b, a, size, s));
        CHECK(cuMemsetD8Async(a, 0, size, s));
        CHECK(cuMemcpyDtoHAsync(back, b, size, s));
        REQUIRE(memcmp(data, back, size) == 0);
        CHECK(cuMemcpyDtoH(back, a, size));
        for (size_t i = 0; i < size; i++)
            REQUIRE(back[i] == 0);
        CHECK(cuStreamSynchronize(s));
        CHECK(cuMemFree(a));
        CHECK(cuMemFree(b));
        free(data);
        free(back);
    }
    CHECK(cuStreamDestroy(s));
    return NULL;
}

int main(void)
{
    pthread_t threads[THREADS];
    size_t free_before, free_after, total;

    shared_ctx = primary_context();
    CHECK(cuMemGetInfo(&free_before, &total));
    for (uintptr_t i = 0; i < THREADS; i++)
        REQUIRE(pthread_create(&threads[i], NULL, worker, (void *)i) == 0);
    for (int i = 0; i < THREADS; i++)
        REQUIRE(pthread_join(threads[i], NULL) == 0);
    CHECK(cuMemGetInfo(&free_after, &total));
    REQUIRE(free_after == free_before);
    printf("ok\n");
    return 0;
}
