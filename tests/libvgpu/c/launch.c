/*
 * Modules and launches: a real cubin, fatbins (plain, LZ4- and zstd-compressed) and PTX built
 * by nvcc load through libvgpu; kernels launch with kernelParams of mixed sizes (packed by the
 * layouts gpu-proxy returns for each image) and with a packed `extra` buffer. The test reads what
 * gpu-proxy recorded, so each launch's order and bytes are fixed here:
 *   1 mixed  grid 2x3x4 block 32x2x1, kernelParams, default stream
 *   2 mixed  grid 1x1x1 block 1x1x1,  extra (same bytes as 1), stream s
 *   3 noargs grid 1x1x1 block 1x1x1
 *   4 scale  from the fatbin, kernelParams        5 scale from the PTX, kernelParams
 *   6 scale  from the LZ4 PTX fatbin              7 big (4800-byte struct + pointer)
 *   8 scale  from the zstd fatbin (gpu-proxy decodes it), kernelParams
 * Usage: launch CUBIN FATBIN PTX CUBIN_SM80 FATBIN_LZ4_PTX FATBIN_ZSTD
 */
#include "check.h"

#include <string.h>

struct pair {
    int a;
    double b;
    char c;
};

struct big {
    int v[1200];
};

/* Images read so far, freed at the end (a clean run under LeakSanitizer). */
static void *images[8];
static int nimages;

static void *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    long n;
    char *buf;

    REQUIRE(f != NULL);
    REQUIRE(fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) > 0 && fseek(f, 0, SEEK_SET) == 0);
    buf = xmalloc((size_t)n + 1);
    REQUIRE(fread(buf, 1, (size_t)n, f) == (size_t)n);
    buf[n] = '\0'; /* PTX is text: cuModuleLoadData wants it NUL-terminated */
    fclose(f);
    REQUIRE(nimages < 8);
    return images[nimages++] = buf;
}

static CUfunction function(CUmodule m, const char *name)
{
    CUfunction f, again;
    CHECK(cuModuleGetFunction(&f, m, name));
    CHECK(cuModuleGetFunction(&again, m, name));
    REQUIRE(f == again); /* one handle per kernel, as the driver gives */
    return f;
}

static void launch_scale(CUfunction f, CUdeviceptr x)
{
    float k = 2.0f;
    int n = 64;
    void *params[] = {&x, &k, &n};
    CHECK(cuLaunchKernel(f, 2, 1, 1, 32, 1, 1, 0, NULL, params, NULL));
}

int main(int argc, char **argv)
{
    CUmodule cubin, fatbin, ptx, lz4, zstd, missing;
    CUfunction mixed, noargs, scale, big_fn;
    CUstream s;
    CUdeviceptr p;
    struct pair pr;
    struct big b;
    int i = 7;
    float f = 1.5f;
    char c = 'q';
    double d = -0.125;
    void *mixed_params[] = {&i, &p, &f, &pr, &c, &d};
    uint8_t packed[64] = {0}, device_bytes[16];
    size_t offset, size, packed_size = sizeof(packed), wrong_size = 60;
    void *extra[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, packed, CU_LAUNCH_PARAM_BUFFER_SIZE,
                     &packed_size, CU_LAUNCH_PARAM_END};
    void *extra_wrong[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, packed, CU_LAUNCH_PARAM_BUFFER_SIZE,
                           &wrong_size, CU_LAUNCH_PARAM_END};
    void *extra_no_size[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, packed, CU_LAUNCH_PARAM_END};

    REQUIRE(argc == 7);
    primary_context();
    /* Blocking: the default-stream launch after it waits for it, which fixes the order. */
    CHECK(cuStreamCreate(&s, CU_STREAM_DEFAULT));
    CHECK(cuMemAlloc(&p, 256));
    CHECK(cuMemsetD8(p, 0x77, 256));
    memset(&pr, 0, sizeof(pr)); /* defined padding: the test compares bytes */
    pr.a = 3, pr.b = 2.25, pr.c = 'x';
    for (int k = 0; k < 1200; k++)
        b.v[k] = k * 3 + 1;

    CHECK(cuModuleLoad(&cubin, argv[1]));
    CHECK(cuModuleLoadData(&fatbin, read_file(argv[2])));
    CHECK(cuModuleLoadData(&ptx, read_file(argv[3])));
    EXPECT(cuModuleLoadData(&missing, read_file(argv[4])), CUDA_ERROR_NO_BINARY_FOR_GPU);
    CHECK(cuModuleLoadFatBinary(&lz4, read_file(argv[5])));
    CHECK(cuModuleLoadData(&zstd, read_file(argv[6])));
    EXPECT(cuModuleLoad(&missing, "/nonexistent/kernels.cubin"), CUDA_ERROR_FILE_NOT_FOUND);

    mixed = function(cubin, "mixed");
    noargs = function(cubin, "noargs");
    big_fn = function(cubin, "big");
    EXPECT(cuModuleGetFunction(&scale, cubin, "no_such_kernel"), CUDA_ERROR_NOT_FOUND);

    /* The layout, as the driver reports it; `extra` is packed from it. */
    for (size_t k = 0; k < 6; k++) {
        CHECK(cuFuncGetParamInfo(mixed, k, &offset, &size));
        printf("param %zu offset=%zu size=%zu\n", k, offset, size);
        memcpy(packed + offset, mixed_params[k], size);
    }
    EXPECT(cuFuncGetParamInfo(mixed, 6, &offset, &size), CUDA_ERROR_INVALID_VALUE);

    CHECK(cuLaunchKernel(mixed, 2, 3, 4, 32, 2, 1, 0, NULL, mixed_params, NULL)); /* 1 */
    CHECK(cuLaunchKernel(mixed, 1, 1, 1, 1, 1, 1, 0, s, NULL, extra));           /* 2 */
    CHECK(cuLaunchKernel(noargs, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL));        /* 3 */
    launch_scale(function(fatbin, "scale"), p);                                  /* 4 */
    launch_scale(function(ptx, "scale"), p);                                     /* 5 */
    launch_scale(function(lz4, "scale"), p);                                     /* 6 */
    {
        void *big_params[] = {&b, &p};
        CHECK(cuLaunchKernel(big_fn, 1, 1, 1, 1, 1, 1, 0, NULL, big_params, NULL)); /* 7 */
    }
    /* gpu-proxy decoded the zstd-compressed cubin: its layout is known as any other. */
    scale = function(zstd, "scale");
    CHECK(cuFuncGetParamInfo(scale, 2, &offset, &size));
    REQUIRE(offset == 12 && size == 4);
    launch_scale(scale, p); /* 8 */

    /* Refused before anything is sent, as the driver refuses them. */
    EXPECT(cuLaunchKernel(mixed, 1, 1, 1, 1, 1, 1, 0, NULL, mixed_params, extra),
           CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(mixed, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(mixed, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, extra_wrong),
           CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(mixed, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, extra_no_size),
           CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel(mixed, 0, 1, 1, 1, 1, 1, 0, NULL, mixed_params, NULL),
           CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuLaunchKernel((CUfunction)0x1234, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL),
           CUDA_ERROR_INVALID_HANDLE);

    /* Every launch above passed gpu-proxy's checks (an error would surface here)... */
    CHECK(cuCtxSynchronize());
    /* ...and none ran: the sim validates and records launches but never executes them. */
    CHECK(cuMemcpyDtoH(device_bytes, p, sizeof(device_bytes)));
    for (size_t k = 0; k < sizeof(device_bytes); k++)
        REQUIRE(device_bytes[k] == 0x77);

    CHECK(cuModuleUnload(cubin));
    EXPECT(cuLaunchKernel(noargs, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuModuleGetFunction(&noargs, cubin, "noargs"), CUDA_ERROR_INVALID_HANDLE);
    EXPECT(cuModuleUnload(cubin), CUDA_ERROR_INVALID_HANDLE);
    CHECK(cuModuleUnload(fatbin));
    CHECK(cuModuleUnload(ptx));
    CHECK(cuModuleUnload(lz4));
    CHECK(cuModuleUnload(zstd));
    CHECK(cuStreamDestroy(s));
    CHECK(cuMemFree(p));
    while (nimages)
        free(images[--nimages]);
    printf("ok\n");
    return 0;
}
