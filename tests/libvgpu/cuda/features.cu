// CUDA runtime features beyond runtime.cu, built by nvcc (cudart static or shared) and run
// through libvgpu against gpu-proxy's sim: module variables (cudaMemcpyToSymbol/FromSymbol),
// cudaLaunchKernelEx and opt-in shared memory, function attributes and occupancy, host
// functions in stream order, stream-ordered allocation (cudaMallocAsync) and the default pool,
// pinned host memory (cudaMallocHost, cudaHostAlloc).
// Usage: features symbols|launchex|occupancy|hostfunc|mallocasync|pinned. Prints "key value" lines and "ok" last; a failed check names itself
// on stderr and exits 1.
#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "check.h"

static uint64_t fnv1a(const void *data, size_t len)
{
    const unsigned char *p = static_cast<const unsigned char *>(data);
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

// The module's variables: 4 + 1024 + 16 bytes of device memory, charged to the zone.
__device__ int counter = 5;
__device__ float table[256];
__constant__ float coeffs[4] = {1.0f, 2.0f, 3.0f, 4.0f};

__global__ void use_symbols(float *out)
{
    out[threadIdx.x] = table[threadIdx.x] * coeffs[threadIdx.x % 4] + counter;
}

static void symbols()
{
    // Initial values come from the module image.
    int c = 0;
    float k[4] = {};
    std::vector<float> t(256, -1.0f), back(256);
    CHECK(cudaMemcpyFromSymbol(&c, counter, sizeof(c)));
    CHECK(cudaMemcpyFromSymbol(k, coeffs, sizeof(k)));
    CHECK(cudaMemcpyFromSymbol(back.data(), table, sizeof(float) * 256));
    REQUIRE(c == 5);
    REQUIRE(k[0] == 1.0f && k[1] == 2.0f && k[2] == 3.0f && k[3] == 4.0f);
    for (float v : back)
        REQUIRE(v == 0.0f);
    // Writes land where reads find them, at an offset too, synchronously and on a stream.
    for (int i = 0; i < 256; i++)
        t[i] = static_cast<float>(i) * 0.5f;
    c = 42;
    CHECK(cudaMemcpyToSymbol(counter, &c, sizeof(c)));
    CHECK(cudaMemcpyToSymbol(table, t.data(), sizeof(float) * 256));
    const float three[3] = {9.0f, 8.0f, 7.0f};
    CHECK(cudaMemcpyToSymbol(coeffs, three, sizeof(three), sizeof(float)));
    cudaStream_t s;
    CHECK(cudaStreamCreate(&s));
    const float tail[16] = {100, 101, 102, 103, 104, 105, 106, 107,
                            108, 109, 110, 111, 112, 113, 114, 115};
    CHECK(cudaMemcpyToSymbolAsync(table, tail, sizeof(tail), 240 * sizeof(float),
                                  cudaMemcpyHostToDevice, s));
    std::memcpy(&t[240], tail, sizeof(tail));
    CHECK(cudaMemcpyFromSymbolAsync(back.data(), table, sizeof(float) * 256, 0,
                                    cudaMemcpyDeviceToHost, s));
    CHECK(cudaStreamSynchronize(s));
    REQUIRE(fnv1a(back.data(), 256 * sizeof(float)) == fnv1a(t.data(), 256 * sizeof(float)));
    c = 0;
    CHECK(cudaMemcpyFromSymbol(&c, counter, sizeof(c)));
    CHECK(cudaMemcpyFromSymbol(k, coeffs, sizeof(k)));
    REQUIRE(c == 42);
    REQUIRE(k[0] == 1.0f && k[1] == 9.0f && k[2] == 8.0f && k[3] == 7.0f);
    std::printf("table %016llx\n", static_cast<unsigned long long>(fnv1a(back.data(), 1024)));
    // The address and size cudart reports, and device-to-device copies through it.
    void *addr = nullptr;
    size_t size = 0;
    CHECK(cudaGetSymbolAddress(&addr, table));
    CHECK(cudaGetSymbolSize(&size, table));
    REQUIRE(addr != nullptr && size == 1024);
    float *d = nullptr;
    CHECK(cudaMalloc(&d, 1024));
    CHECK(cudaMemcpy(d, addr, 1024, cudaMemcpyDeviceToDevice));
    CHECK(cudaMemcpy(back.data(), d, 1024, cudaMemcpyDeviceToHost));
    REQUIRE(fnv1a(back.data(), 1024) == fnv1a(t.data(), 1024));
    use_symbols<<<1, 256>>>(d);
    CHECK(cudaDeviceSynchronize());
    // A variable is not an allocation: it cannot be freed, and copies past its end are refused.
    EXPECT(cudaFree(addr), cudaErrorInvalidValue);
    EXPECT(cudaMemcpyToSymbol(counter, t.data(), 8), cudaErrorInvalidValue);
    EXPECT(cudaGetLastError(), cudaErrorInvalidValue);
    CHECK(cudaGetLastError());
    size_t free_b = 0, total_b = 0;
    CHECK(cudaMemGetInfo(&free_b, &total_b));
    std::printf("meminfo %zu %zu\n", free_b, total_b);
    CHECK(cudaFree(d));
    CHECK(cudaStreamDestroy(s));
}

// Under the sim kernels are validated and recorded, never run.
__global__ void scale(float *x, float k, int n)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n)
        x[t] *= k;
}

extern __shared__ float dynamic_smem[];

__global__ void reverse(float *x, int n)
{
    dynamic_smem[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = dynamic_smem[n - 1 - threadIdx.x];
}

// 32 KiB of static shared memory and at most 256 threads: shared memory bounds its occupancy.
__global__ void __launch_bounds__(256) staged(float *x)
{
    __shared__ float tile[8192];
    for (int i = threadIdx.x; i < 8192; i += blockDim.x)
        tile[i] = x[i];
    __syncthreads();
    x[threadIdx.x] = tile[8191 - threadIdx.x];
}

static void launchex()
{
    float *d = nullptr;
    cudaStream_t s;
    CHECK(cudaMalloc(&d, 64 * sizeof(float)));
    CHECK(cudaStreamCreate(&s));
    std::printf("ptr %llx\n", static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(d)));
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeCooperative;
    attr[1].val.cooperative = 0;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(4, 2, 1);
    cfg.blockDim = dim3(16, 2, 1);
    cfg.stream = s;
    cfg.attrs = attr;
    cfg.numAttrs = 2;
    CHECK(cudaLaunchKernelEx(&cfg, scale, d, 3.0f, 64));
    // What a plain launch cannot do is refused, not dropped.
    attr[1].val.cooperative = 1;
    EXPECT(cudaLaunchKernelEx(&cfg, scale, d, 3.0f, 64), cudaErrorNotSupported);
    EXPECT(cudaGetLastError(), cudaErrorNotSupported);
    attr[1].val.cooperative = 0;
    attr[0].val.clusterDim.x = 2;
    EXPECT(cudaLaunchKernelEx(&cfg, scale, d, 3.0f, 64), cudaErrorNotSupported);
    EXPECT(cudaGetLastError(), cudaErrorNotSupported);
    attr[0].id = cudaLaunchAttributePriority;
    attr[0].val.priority = 0;
    EXPECT(cudaLaunchKernelEx(&cfg, scale, d, 3.0f, 64), cudaErrorNotSupported);
    EXPECT(cudaGetLastError(), cudaErrorNotSupported);
    // Dynamic shared memory past 48 KiB needs the kernel's opt-in first.
    const int big = 100 << 10;
    reverse<<<1, 64, big, s>>>(d, 64);
    EXPECT(cudaGetLastError(), cudaErrorInvalidValue);
    cudaFuncAttributes fa;
    CHECK(cudaFuncGetAttributes(&fa, reverse));
    std::printf("reverse.maxDynamicSharedSizeBytes %d\n", fa.maxDynamicSharedSizeBytes);
    CHECK(cudaFuncSetAttribute(reverse, cudaFuncAttributeMaxDynamicSharedMemorySize, big));
    CHECK(cudaFuncSetAttribute(reverse, cudaFuncAttributePreferredSharedMemoryCarveout, 50));
    CHECK(cudaFuncGetAttributes(&fa, reverse));
    std::printf("reverse.optin %d %d\n", fa.maxDynamicSharedSizeBytes,
                fa.preferredShmemCarveout);
    EXPECT(cudaFuncSetAttribute(reverse, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 << 10),
           cudaErrorInvalidValue);
    EXPECT(cudaFuncSetAttribute(reverse, cudaFuncAttributeRequiredClusterWidth, 2),
           cudaErrorNotSupported);
    CHECK(cudaGetLastError() == cudaErrorNotSupported ? cudaSuccess : cudaErrorUnknown);
    reverse<<<1, 64, big, s>>>(d, 64);
    CHECK(cudaGetLastError());
    CHECK(cudaStreamSynchronize(s));
    CHECK(cudaStreamDestroy(s));
    CHECK(cudaFree(d));
}

static void print_attributes(const char *name, const void *fn)
{
    cudaFuncAttributes fa;
    CHECK(cudaFuncGetAttributes(&fa, fn));
    std::printf("%s.attrs %d %zu %zu %d %d %d\n", name, fa.numRegs, fa.sharedSizeBytes,
                fa.localSizeBytes, fa.maxThreadsPerBlock, fa.binaryVersion,
                fa.maxDynamicSharedSizeBytes);
}

template <typename F> static void print_occupancy(const char *name, F fn)
{
    const int sizes[] = {32, 64, 96, 128, 256, 512, 1024};
    const size_t dynamic[] = {0, 4096, 40000};
    for (int size : sizes) {
        for (size_t dyn : dynamic) {
            int blocks = -1;
            CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, size, dyn));
            std::printf("%s.blocks.%d.%zu %d\n", name, size, dyn, blocks);
        }
    }
    // cudart computes cudaOccupancyMaxPotentialBlockSize in its header; the driver's own is
    // reached through its entry point.
    using Potential = CUresult (*)(int *, int *, CUfunction, CUoccupancyB2DSize, size_t, int);
    void *entry = nullptr;
    cudaDriverEntryPointQueryResult found;
    CHECK(cudaGetDriverEntryPointByVersion("cuOccupancyMaxPotentialBlockSize", &entry, 13000,
                                           cudaEnableDefault, &found));
    REQUIRE(found == cudaDriverEntryPointSuccess && entry);
    cudaFunction_t f;
    CHECK(cudaGetFuncBySymbol(&f, reinterpret_cast<const void *>(fn)));
    int grid = -1, block = -1;
    const int limits[] = {0, 200};
    for (int limit : limits) {
        for (size_t dyn : dynamic) {
            CUresult r = reinterpret_cast<Potential>(entry)(
                &grid, &block, reinterpret_cast<CUfunction>(f), nullptr, dyn, limit);
            REQUIRE(r == CUDA_SUCCESS);
            std::printf("%s.potential.%d.%zu %d %d\n", name, limit, dyn, grid, block);
        }
    }
}

static void occupancy()
{
    print_attributes("scale", reinterpret_cast<const void *>(scale));
    print_attributes("staged", reinterpret_cast<const void *>(staged));
    print_occupancy("scale", scale);
    print_occupancy("staged", staged);
}

// What host functions do: fill the staging buffer a later copy uploads, and note their order.
struct staging {
    std::vector<unsigned char> bytes;
    unsigned seed;
    std::atomic<int> order[8];
    std::atomic<int> next;
    std::atomic<int> release; // the gated function spins until the main thread sets it
};

static void fill_staging(void *arg)
{
    staging *st = static_cast<staging *>(arg);
    for (size_t i = 0; i < st->bytes.size(); i++)
        st->bytes[i] = static_cast<unsigned char>((i * 2654435761u + st->seed) >> 13);
    st->order[st->next++] = 1;
}

static void gated(void *arg)
{
    staging *st = static_cast<staging *>(arg);
    while (!st->release.load())
        ;
    st->order[st->next++] = 2;
}

static void CUDART_CB callback(cudaStream_t, cudaError_t status, void *arg)
{
    staging *st = static_cast<staging *>(arg);
    st->order[st->next++] = status == cudaSuccess ? 3 : -3;
}

static void hostfunc()
{
    const size_t size = 1 << 20;
    staging st;
    st.bytes.assign(size, 0);
    st.seed = 11;
    st.next = 0;
    st.release = 0;
    std::vector<unsigned char> back(size), want(size);
    unsigned char *d = nullptr;
    cudaStream_t s;
    CHECK(cudaMalloc(&d, size));
    CHECK(cudaStreamCreate(&s));
    CHECK(cudaMemsetAsync(d, 0x5a, size, s));
    // The host function fills the staging buffer; the copy queued after it must upload what it
    // wrote, not the zeros the buffer held when the copy was queued.
    CHECK(cudaLaunchHostFunc(s, fill_staging, &st));
    CHECK(cudaMemcpyAsync(d, st.bytes.data(), size, cudaMemcpyHostToDevice, s));
    CHECK(cudaMemcpyAsync(back.data(), d, size, cudaMemcpyDeviceToHost, s));
    CHECK(cudaStreamSynchronize(s));
    for (size_t i = 0; i < size; i++)
        want[i] = static_cast<unsigned char>((i * 2654435761u + 11) >> 13);
    REQUIRE(fnv1a(back.data(), size) == fnv1a(want.data(), size));
    std::printf("checksum %016llx\n", static_cast<unsigned long long>(fnv1a(back.data(), size)));
    // A stream with a host function that has not returned is not idle, and synchronizing it
    // waits for the function; callbacks get the stream's status, in order.
    CHECK(cudaLaunchHostFunc(s, gated, &st));
    CHECK(cudaStreamAddCallback(s, callback, &st, 0));
    EXPECT(cudaStreamQuery(s), cudaErrorNotReady);
    REQUIRE(st.next.load() == 1);
    st.release = 1;
    CHECK(cudaStreamSynchronize(s));
    CHECK(cudaStreamQuery(s));
    std::printf("order %d %d %d\n", st.order[0].load(), st.order[1].load(), st.order[2].load());
    // On the legacy default stream, and the device-wide synchronize.
    st.seed = 12;
    CHECK(cudaLaunchHostFunc(0, fill_staging, &st));
    CHECK(cudaMemcpy(d, st.bytes.data(), size, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(back.data(), d, size, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < size; i++)
        want[i] = static_cast<unsigned char>((i * 2654435761u + 12) >> 13);
    REQUIRE(fnv1a(back.data(), size) == fnv1a(want.data(), size));
    CHECK(cudaStreamAddCallback(s, callback, &st, 0));
    CHECK(cudaDeviceSynchronize());
    std::printf("calls %d\n", st.next.load());
    EXPECT(cudaStreamAddCallback(s, callback, &st, 1), cudaErrorInvalidValue);
    CHECK(cudaGetLastError() == cudaErrorInvalidValue ? cudaSuccess : cudaErrorUnknown);
    CHECK(cudaStreamDestroy(s));
    CHECK(cudaFree(d));
}

static void mallocasync()
{
    const size_t size = (4 << 20) + 100;
    std::vector<unsigned char> a(size), back(size), want(size);
    for (size_t i = 0; i < size; i++)
        a[i] = static_cast<unsigned char>((i * 2654435761u + 5) >> 13);
    size_t free0 = 0, free1 = 0, total = 0;
    CHECK(cudaMemGetInfo(&free0, &total));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned char *p = nullptr, *q = nullptr;
    CHECK(cudaMallocAsync(&p, size, s));
    CHECK(cudaMallocAsync(reinterpret_cast<void **>(&q), size, s));
    CHECK(cudaMemcpyAsync(p, a.data(), size, cudaMemcpyHostToDevice, s));
    CHECK(cudaMemsetAsync(p + 1000, 0x77, 5000, s));
    CHECK(cudaMemcpyAsync(q, p, size, cudaMemcpyDeviceToDevice, s));
    CHECK(cudaFreeAsync(p, s));
    CHECK(cudaMemcpyAsync(back.data(), q, size, cudaMemcpyDeviceToHost, s));
    want = a;
    std::memset(want.data() + 1000, 0x77, 5000);
    REQUIRE(fnv1a(back.data(), size) == fnv1a(want.data(), size));
    cudaMemPool_t pool;
    CHECK(cudaDeviceGetDefaultMemPool(&pool, 0));
    cudaMemPool_t current;
    CHECK(cudaDeviceGetMemPool(&current, 0));
    REQUIRE(current == pool);
    cuuint64_t used = 0, high = 0, reserved = 0;
    CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used));
    CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high));
    CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &reserved));
    std::printf("pool %llu %llu %llu\n", static_cast<unsigned long long>(used),
                static_cast<unsigned long long>(high), static_cast<unsigned long long>(reserved));
    cuuint64_t threshold = UINT64_MAX, got = 0;
    CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &got));
    REQUIRE(got == UINT64_MAX);
    int reuse = 1;
    CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolReuseAllowOpportunistic, &reuse));
    REQUIRE(reuse == 1);
    reuse = 0;
    CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowOpportunistic, &reuse));
    CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolReuseAllowOpportunistic, &reuse));
    REQUIRE(reuse == 0);
    cuuint64_t zero = 0, one = 1;
    EXPECT(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &one),
           cudaErrorInvalidValue);
    CHECK(cudaGetLastError() == cudaErrorInvalidValue ? cudaSuccess : cudaErrorUnknown);
    CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
    CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high));
    REQUIRE(high == size); // reset to what is in use now: q
    CHECK(cudaMemPoolTrimTo(pool, 0));
    // Past the zone's quota: refused at once, as CUDA refuses an allocation that cannot fit.
    void *huge = nullptr;
    EXPECT(cudaMallocAsync(&huge, total, s), cudaErrorMemoryAllocation);
    CHECK(cudaGetLastError() == cudaErrorMemoryAllocation ? cudaSuccess : cudaErrorUnknown);
    CHECK(cudaFreeAsync(q, s));
    CHECK(cudaStreamSynchronize(s));
    CHECK(cudaMemGetInfo(&free1, &total));
    std::printf("meminfo %zu %zu\n", free0, free1);
    CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used));
    REQUIRE(used == 0);
    CHECK(cudaStreamDestroy(s));
}

// cudaMallocHost / cudaHostAlloc buffers (shared with gpu-proxy by libvgpu) round-trip through
// device memory with cudaMemcpyAsync in both directions and a kernel between, checksummed.
static void pinned()
{
    const int n = (8 << 20) / 4 + 3;
    const size_t bytes = n * sizeof(float);
    float *src, *back, *d;
    cudaStream_t s;

    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CHECK(cudaMallocHost(&src, bytes));
    CHECK(cudaHostAlloc(&back, bytes, cudaHostAllocPortable));
    CHECK(cudaMalloc(&d, bytes));
    for (int i = 0; i < n; i++)
        src[i] = static_cast<float>(i % 1000);
    std::memset(back, 0, bytes);
    CHECK(cudaMemcpyAsync(d, src, bytes, cudaMemcpyHostToDevice, s));
    scale<<<(n + 255) / 256, 256, 0, s>>>(d, 2.0f, n);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpyAsync(back, d, bytes, cudaMemcpyDeviceToHost, s));
    CHECK(cudaStreamSynchronize(s));
    for (int i = 0; i < n; i++)
        REQUIRE(back[i] == src[i]); // the sim runs no kernel code: the bytes come back unscaled
    CHECK(cudaMemcpyAsync(back, d, bytes, cudaMemcpyDefault, s)); // direction from the pointers
    CHECK(cudaStreamSynchronize(s));
    std::printf("pinned %016llx %016llx\n",
                static_cast<unsigned long long>(fnv1a(src, bytes)),
                static_cast<unsigned long long>(fnv1a(back, bytes)));
    CHECK(cudaFree(d));
    CHECK(cudaFreeHost(src));
    CHECK(cudaFreeHost(back));
    CHECK(cudaStreamDestroy(s));
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    if (!std::strcmp(mode, "symbols"))
        symbols();
    else if (!std::strcmp(mode, "launchex"))
        launchex();
    else if (!std::strcmp(mode, "occupancy"))
        occupancy();
    else if (!std::strcmp(mode, "hostfunc"))
        hostfunc();
    else if (!std::strcmp(mode, "mallocasync"))
        mallocasync();
    else if (!std::strcmp(mode, "pinned"))
        pinned();
    else {
        std::fprintf(stderr,
                     "usage: features symbols|launchex|occupancy|hostfunc|mallocasync|pinned\n");
        return 2;
    }
    std::printf("ok\n");
    return 0;
}
