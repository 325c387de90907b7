/*
 * libvgpu benchmark driver (tests/bench/libvgpu_calls.py): a CUDA program using the driver API
 * through libvgpu (linked as -lcuda) against gpu-proxy. Modes:
 *   sync N              N synchronous calls (cuStreamQuery on the default stream): latency
 *   launch CUBIN N R    R rounds of N launches of a kernel without parameters, each followed
 *                       by cuCtxSynchronize: the rate the program issues them (best round; N
 *                       small enough that the ring never fills, so this is libvgpu's own cost)
 *                       and the rate gpu-proxy completes them (all rounds)
 *   htod BYTES REPS     cuMemcpyHtoD of BYTES, best of REPS (after one warm-up)
 *   dtoh BYTES REPS     cuMemcpyDtoH likewise
 *   pinned-htod BYTES REPS  cuMemcpyHtoDAsync from a cuMemAllocHost buffer (shared with
 *                       gpu-proxy) on a stream, then cuStreamSynchronize: the whole copy
 *   pinned-dtoh BYTES REPS  cuMemcpyDtoHAsync into it likewise
 *   module IMAGE REPS   cuModuleLoad of IMAGE (+ cuModuleUnload): the first load, then the best
 *                       of REPS more (by digest, where gpu-proxy's module cache has it)
 * Prints one JSON object. With IDM_BENCH_CPUS="H,C" the program runs on CPU C.
 */
#include "bench.h"

#include <cuda.h>

static void check(CUresult r, const char *what)
{
    if (r != CUDA_SUCCESS) {
        const char *name = "?";
        cuGetErrorName(r, &name);
        fprintf(stderr, "libvgpu_bench: %s: %s\n", what, name);
        exit(1);
    }
}

static void setup(void)
{
    CUcontext ctx;
    check(cuInit(0), "cuInit");
    check(cuDevicePrimaryCtxRetain(&ctx, 0), "cuDevicePrimaryCtxRetain");
    check(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
}

static void run_sync(long n)
{
    uint64_t *lat = calloc((size_t)n, sizeof(*lat));
    double sum = 0;

    if (!lat)
        die("calloc", ENOMEM);
    for (long i = 0; i < n / 10 + 100; i++) /* warm-up */
        check(cuStreamQuery(NULL), "cuStreamQuery");
    for (long i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        check(cuStreamQuery(NULL), "cuStreamQuery");
        lat[i] = now_ns() - t0;
        sum += (double)lat[i];
    }
    qsort(lat, (size_t)n, sizeof(*lat), cmp_u64);
    printf("{\"mode\": \"sync\", \"calls\": %ld, \"p50_ns\": %llu, \"p99_ns\": %llu, "
           "\"mean_ns\": %.1f}\n",
           n, (unsigned long long)lat[n / 2], (unsigned long long)lat[n * 99 / 100],
           sum / (double)n);
    free(lat);
}

static void run_launch(const char *cubin, long n, long rounds)
{
    CUmodule module;
    CUfunction f;
    uint64_t best = UINT64_MAX, total = 0;

    check(cuModuleLoad(&module, cubin), "cuModuleLoad");
    check(cuModuleGetFunction(&f, module, "noargs"), "cuModuleGetFunction");
    for (long r = 0; r <= rounds; r++) { /* round 0 warms up */
        uint64_t t0 = now_ns(), issued;
        for (long i = 0; i < n; i++)
            check(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL), "cuLaunchKernel");
        issued = now_ns() - t0;
        check(cuCtxSynchronize(), "cuCtxSynchronize");
        if (r) {
            best = issued < best ? issued : best;
            total += now_ns() - t0;
        }
    }
    printf("{\"mode\": \"launch\", \"launches\": %ld, \"rounds\": %ld, "
           "\"best_issue_s\": %.6f, \"total_s\": %.6f, \"issued_per_s\": %.0f, "
           "\"completed_per_s\": %.0f}\n",
           n, rounds, (double)best / 1e9, (double)total / 1e9, (double)n / ((double)best / 1e9),
           (double)(n * rounds) / ((double)total / 1e9));
}

static void run_copy(int to_device, int pinned, size_t bytes, long reps)
{
    uint8_t *host = NULL;
    uint64_t best = UINT64_MAX;
    CUdeviceptr dev;
    CUstream stream = NULL;

    if (pinned) {
        check(cuMemAllocHost((void **)&host, bytes), "cuMemAllocHost");
        check(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    } else if (!(host = malloc(bytes))) {
        die("malloc", ENOMEM);
    }
    memset(host, 0x5a, bytes);
    check(cuMemAlloc(&dev, bytes), "cuMemAlloc");
    for (long r = 0; r <= reps; r++) { /* rep 0 warms both sides' buffers */
        uint64_t t0 = now_ns(), dt;
        if (pinned && to_device)
            check(cuMemcpyHtoDAsync(dev, host, bytes, stream), "cuMemcpyHtoDAsync");
        else if (pinned)
            check(cuMemcpyDtoHAsync(host, dev, bytes, stream), "cuMemcpyDtoHAsync");
        else if (to_device)
            check(cuMemcpyHtoD(dev, host, bytes), "cuMemcpyHtoD");
        else
            check(cuMemcpyDtoH(host, dev, bytes), "cuMemcpyDtoH");
        if (pinned)
            check(cuStreamSynchronize(stream), "cuStreamSynchronize");
        dt = now_ns() - t0;
        if (r && dt < best)
            best = dt;
    }
    printf("{\"mode\": \"%s%s\", \"bytes\": %zu, \"reps\": %ld, \"best_s\": %.6f, "
           "\"gib_per_s\": %.3f}\n",
           pinned ? "pinned-" : "", to_device ? "htod" : "dtoh", bytes, reps, (double)best / 1e9,
           (double)bytes / ((double)best / 1e9) / (1u << 30));
    check(cuMemFree(dev), "cuMemFree");
    if (pinned) {
        check(cuStreamDestroy(stream), "cuStreamDestroy");
        check(cuMemFreeHost(host), "cuMemFreeHost");
    } else {
        free(host);
    }
}

static void run_module(const char *path, long reps)
{
    FILE *f = fopen(path, "rb");
    uint64_t first = 0, best = UINT64_MAX;
    long size;
    char *image;
    CUmodule module;

    if (!f || fseek(f, 0, SEEK_END) || (size = ftell(f)) <= 0 || fseek(f, 0, SEEK_SET))
        die(path, errno ? errno : EINVAL);
    if (!(image = malloc((size_t)size)) || fread(image, 1, (size_t)size, f) != (size_t)size)
        die(path, EIO);
    fclose(f);
    for (long r = 0; r <= reps; r++) {
        uint64_t t0 = now_ns(), dt;
        check(cuModuleLoadData(&module, image), "cuModuleLoadData");
        dt = now_ns() - t0;
        check(cuModuleUnload(module), "cuModuleUnload");
        if (!r)
            first = dt;
        else if (dt < best)
            best = dt;
    }
    printf("{\"mode\": \"module\", \"bytes\": %ld, \"reps\": %ld, \"first_s\": %.6f, "
           "\"again_s\": %.6f}\n",
           size, reps, (double)first / 1e9, (double)best / 1e9);
    free(image);
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";

    pin_self(1);
    setup();
    if (!strcmp(mode, "sync") && argc == 3)
        run_sync(atol(argv[2]));
    else if (!strcmp(mode, "launch") && argc == 5)
        run_launch(argv[2], atol(argv[3]), atol(argv[4]));
    else if ((!strcmp(mode, "htod") || !strcmp(mode, "dtoh")) && argc == 4)
        run_copy(!strcmp(mode, "htod"), 0, strtoull(argv[2], NULL, 0), atol(argv[3]));
    else if ((!strcmp(mode, "pinned-htod") || !strcmp(mode, "pinned-dtoh")) && argc == 4)
        run_copy(!strcmp(mode, "pinned-htod"), 1, strtoull(argv[2], NULL, 0), atol(argv[3]));
    else if (!strcmp(mode, "module") && argc == 4)
        run_module(argv[2], atol(argv[3]));
    else {
        fprintf(stderr, "usage: see the comment at the top of libvgpu_bench.c\n");
        return 2;
    }
    return 0;
}
