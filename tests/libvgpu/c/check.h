/*
 * What every libvgpu test program shares: calls checked against the CUresult they must return
 * (named with libvgpu's own cuGetErrorName), plain assertions, and test data with checksums.
 * A failed check prints file:line, the call and both results to stderr and exits 1.
 */
#ifndef LIBVGPU_TEST_CHECK_H
#define LIBVGPU_TEST_CHECK_H

#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call) expect_result((call), CUDA_SUCCESS, #call, __FILE__, __LINE__)
#define EXPECT(call, want) expect_result((call), (want), #call, __FILE__, __LINE__)
#define REQUIRE(cond)                                                                        \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "%s:%d: %s is false\n", __FILE__, __LINE__, #cond);              \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static inline const char *result_name(CUresult r)
{
    const char *name = NULL;
    return cuGetErrorName(r, &name) == CUDA_SUCCESS && name ? name : "(not a CUresult)";
}

static inline void expect_result(CUresult got, CUresult want, const char *call, const char *file,
                                 int line)
{
    if (got != want) {
        fprintf(stderr, "%s:%d: %s returned %s (%d), expected %s (%d)\n", file, line, call,
                result_name(got), (int)got, result_name(want), (int)want);
        exit(1);
    }
}

/* cuInit, then the device's primary context made current: what cudart does for a program. */
static inline CUcontext primary_context(void)
{
    CUcontext ctx;
    CHECK(cuInit(0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, 0));
    CHECK(cuCtxSetCurrent(ctx));
    return ctx;
}

/* Deterministic bytes that differ for every (seed, offset): catches shifted or swapped data. */
static inline void fill(uint8_t *buf, size_t len, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        buf[i] = (uint8_t)x;
    }
}

/* FNV-1a 64. */
static inline uint64_t checksum(const uint8_t *buf, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ buf[i]) * 0x100000001b3ull;
    return h;
}

static inline void *xmalloc(size_t len)
{
    void *p = malloc(len ? len : 1);
    REQUIRE(p != NULL);
    return p;
}

#endif
