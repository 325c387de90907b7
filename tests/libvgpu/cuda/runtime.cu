// A CUDA runtime program as nvcc builds it (cudart static or shared): cudart finds libvgpu as
// libcuda.so.1, registers the fatbin compiled in below, and every call goes through libvgpu to
// gpu-proxy's sim. Usage: runtime props|memory|streams|launch|quota. Prints "ok" last; a failed
// check names itself on stderr and exits 1.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "check.h"

// Under the sim the kernel is validated and recorded, never run: its writes never happen.
__global__ void scale(float *x, float k, int n)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n)
        x[t] *= k;
}

struct pair {
    int a;
    double b;
};

__global__ void mixed(int i, const pair *p, pair s, char c, double d)
{
    if (p && i < 0)
        printf("%f\n", p->b + s.a + s.b + c + d);
}

static uint64_t fnv1a(const void *data, size_t len)
{
    const unsigned char *p = static_cast<const unsigned char *>(data);
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static void fill(std::vector<unsigned char> &v, unsigned seed)
{
    for (size_t i = 0; i < v.size(); i++)
        v[i] = static_cast<unsigned char>((i * 2654435761u + seed) >> 13);
}

static void props()
{
    int n = -1;
    cudaDeviceProp p;
    CHECK(cudaGetDeviceCount(&n));
    REQUIRE(n == 1);
    CHECK(cudaGetDeviceProperties(&p, 0));
    std::printf("name %s\n", p.name);
    std::printf("cc %d.%d\n", p.major, p.minor);
    std::printf("totalGlobalMem %zu\n", p.totalGlobalMem);
    std::printf("multiProcessorCount %d\n", p.multiProcessorCount);
    std::printf("memoryBusWidth %d\n", p.memoryBusWidth);
    std::printf("l2CacheSize %d\n", p.l2CacheSize);
    std::printf("maxThreadsPerBlock %d\n", p.maxThreadsPerBlock);
    std::printf("maxThreadsDim %d %d %d\n", p.maxThreadsDim[0], p.maxThreadsDim[1],
                p.maxThreadsDim[2]);
    std::printf("maxGridSize %d %d %d\n", p.maxGridSize[0], p.maxGridSize[1], p.maxGridSize[2]);
    std::printf("sharedMemPerBlock %zu\n", p.sharedMemPerBlock);
    std::printf("sharedMemPerBlockOptin %zu\n", p.sharedMemPerBlockOptin);
    std::printf("sharedMemPerMultiprocessor %zu\n", p.sharedMemPerMultiprocessor);
    std::printf("regsPerBlock %d\n", p.regsPerBlock);
    std::printf("warpSize %d\n", p.warpSize);
    std::printf("asyncEngineCount %d\n", p.asyncEngineCount);
    std::printf("unifiedAddressing %d\n", p.unifiedAddressing);
    std::printf("managedMemory %d\n", p.managedMemory);
    std::printf("concurrentKernels %d\n", p.concurrentKernels);
    std::printf("cooperativeLaunch %d\n", p.cooperativeLaunch);
    std::printf("pci %x:%x:%x\n", p.pciDomainID, p.pciBusID, p.pciDeviceID);
    int value = -1;
    CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMemoryPoolsSupported, 0));
    std::printf("memoryPoolsSupported %d\n", value);
    CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrClockRate, 0)); // not in cudaDeviceProp
    std::printf("clockRate %d\n", value);
    int driver = 0;
    CHECK(cudaDriverGetVersion(&driver));
    std::printf("driver %d\n", driver);
}

static void memory()
{
    const size_t size = (4 << 20) + 123;
    std::vector<unsigned char> a(size), b(size), back(size);
    fill(a, 1);
    fill(b, 2);
    unsigned char *d1 = nullptr, *d2 = nullptr;
    CHECK(cudaMalloc(&d1, size));
    CHECK(cudaMalloc(&d2, size));
    CHECK(cudaMemcpy(d1, a.data(), size, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d2, d1, size, cudaMemcpyDeviceToDevice));
    CHECK(cudaMemcpy(back.data(), d2, size, cudaMemcpyDeviceToHost));
    REQUIRE(fnv1a(back.data(), size) == fnv1a(a.data(), size));
    // cudaMemcpyDefault: the direction comes from where each pointer lives.
    CHECK(cudaMemcpy(d1, b.data(), size, cudaMemcpyDefault));
    CHECK(cudaMemcpy(back.data(), d1, size, cudaMemcpyDefault));
    REQUIRE(fnv1a(back.data(), size) == fnv1a(b.data(), size));
    CHECK(cudaMemset(d2 + 100, 0xab, 1000));
    CHECK(cudaMemcpy(back.data(), d2, size, cudaMemcpyDeviceToHost));
    std::vector<unsigned char> want(a);
    std::memset(want.data() + 100, 0xab, 1000);
    REQUIRE(fnv1a(back.data(), size) == fnv1a(want.data(), size));
    std::printf("checksum %016llx\n", static_cast<unsigned long long>(fnv1a(back.data(), size)));
    size_t free_b = 0, total_b = 0;
    CHECK(cudaMemGetInfo(&free_b, &total_b));
    std::printf("meminfo %zu %zu\n", free_b, total_b);
    CHECK(cudaFree(d1));
    CHECK(cudaFree(d2));
}

static void streams()
{
    const size_t size = 1 << 20;
    std::vector<unsigned char> a(size), back(size);
    fill(a, 3);
    unsigned char *d1 = nullptr, *d2 = nullptr;
    cudaStream_t s1, s2;
    cudaEvent_t copied, start, end;
    CHECK(cudaMalloc(&d1, size));
    CHECK(cudaMalloc(&d2, size));
    CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CHECK(cudaStreamCreate(&s2));
    CHECK(cudaEventCreate(&copied));
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&end));
    // s2's copy may only start once s1's upload has run: the event orders them.
    CHECK(cudaEventRecord(start, s1));
    CHECK(cudaMemcpyAsync(d1, a.data(), size, cudaMemcpyHostToDevice, s1));
    CHECK(cudaEventRecord(copied, s1));
    CHECK(cudaStreamWaitEvent(s2, copied, 0));
    CHECK(cudaMemcpyAsync(d2, d1, size, cudaMemcpyDeviceToDevice, s2));
    CHECK(cudaMemsetAsync(d2, 7, 16, s2));
    CHECK(cudaMemcpyAsync(back.data(), d2, size, cudaMemcpyDeviceToHost, s2));
    CHECK(cudaEventRecord(end, s2));
    CHECK(cudaStreamSynchronize(s2));
    CHECK(cudaEventSynchronize(end));
    CHECK(cudaEventQuery(end));
    CHECK(cudaStreamQuery(s1));
    float ms = -1;
    CHECK(cudaEventElapsedTime(&ms, start, end));
    REQUIRE(ms >= 0);
    std::memset(a.data(), 7, 16);
    REQUIRE(fnv1a(back.data(), size) == fnv1a(a.data(), size));
    int lo = 1, hi = 1;
    CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    std::printf("priorities %d %d\n", lo, hi);
    cudaStream_t s3;
    CHECK(cudaStreamCreateWithPriority(&s3, cudaStreamNonBlocking, hi));
    int prio = 1;
    unsigned flags = 0;
    CHECK(cudaStreamGetPriority(s3, &prio));
    CHECK(cudaStreamGetFlags(s3, &flags));
    std::printf("stream %d %u\n", prio, flags);
    CHECK(cudaStreamDestroy(s3));
    CHECK(cudaEventDestroy(copied));
    CHECK(cudaEventDestroy(start));
    CHECK(cudaEventDestroy(end));
    CHECK(cudaStreamDestroy(s1));
    CHECK(cudaStreamDestroy(s2));
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaFree(d1));
    CHECK(cudaFree(d2));
}

static void launch()
{
    const int n = 64;
    std::vector<float> x(n), back(n);
    for (int i = 0; i < n; i++)
        x[i] = static_cast<float>(i);
    float *d = nullptr;
    pair *p = nullptr;
    CHECK(cudaMalloc(&d, n * sizeof(float)));
    CHECK(cudaMalloc(&p, sizeof(pair)));
    CHECK(cudaMemcpy(d, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    std::printf("ptr %llx %llx\n", static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(d)),
                static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(p)));
    scale<<<2, 32>>>(d, 2.0f, n);
    CHECK(cudaGetLastError());
    cudaStream_t s;
    CHECK(cudaStreamCreate(&s));
    mixed<<<dim3(3, 2, 1), dim3(8, 4, 2), 0, s>>>(7, p, pair{3, 2.25}, 'q', -0.125);
    CHECK(cudaGetLastError());
    CHECK(cudaStreamSynchronize(s));
    CHECK(cudaDeviceSynchronize());
    // Not executed: device memory still holds what was copied in.
    CHECK(cudaMemcpy(back.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
    REQUIRE(std::memcmp(back.data(), x.data(), n * sizeof(float)) == 0);
    CHECK(cudaStreamDestroy(s));
    CHECK(cudaFree(d));
    CHECK(cudaFree(p));
}

static void quota()
{
    void *small = nullptr, *big = nullptr;
    CHECK(cudaMalloc(&small, 1 << 20));
    EXPECT(cudaMalloc(&big, 64 << 20), cudaErrorMemoryAllocation);
    EXPECT(cudaGetLastError(), cudaErrorMemoryAllocation);
    CHECK(cudaGetLastError()); // not sticky: reading it reset it
    CHECK(cudaFree(small));
    CHECK(cudaMalloc(&big, 4 << 20)); // within the quota again
    CHECK(cudaFree(big));
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    if (!std::strcmp(mode, "props"))
        props();
    else if (!std::strcmp(mode, "memory"))
        memory();
    else if (!std::strcmp(mode, "streams"))
        streams();
    else if (!std::strcmp(mode, "launch"))
        launch();
    else if (!std::strcmp(mode, "quota"))
        quota();
    else {
        std::fprintf(stderr, "usage: runtime props|memory|streams|launch|quota\n");
        return 2;
    }
    std::printf("ok\n");
    return 0;
}
