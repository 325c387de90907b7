// The CUDA runtime test programs' checks: a call that does not return what it should, or a
// condition that does not hold, names itself (line and text) on stderr and exits 1.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(call) expect((call), cudaSuccess, #call, __LINE__)
#define EXPECT(call, want) expect((call), (want), #call, __LINE__)
#define REQUIRE(cond)                                                         \
    do {                                                                      \
        if (!(cond)) {                                                        \
            std::fprintf(stderr, "line %d: %s is false\n", __LINE__, #cond);  \
            std::exit(1);                                                     \
        }                                                                     \
    } while (0)

static void expect(cudaError_t got, cudaError_t want, const char *call, int line)
{
    if (got != want) {
        std::fprintf(stderr, "line %d: %s returned %s, expected %s\n", line, call,
                     cudaGetErrorName(got), cudaGetErrorName(want));
        std::exit(1);
    }
}
