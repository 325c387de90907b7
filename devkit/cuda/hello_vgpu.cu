// The demo pod's CUDA program, built by nvcc with cudart linked statically (its default). In the
// zone, cudart loads libcuda.so.1, which is libvgpu: every call below crosses the zone's channel
// to gpu-proxy. It prints what it sees and did; a failed call names itself and exits 1.
// `hello-vgpu [MIB]` sets the round trip's size (default 64 MiB; the nested Xen tests use a few MiB:
// under emulation the channel moves about a MiB a second).
//
// Under gpu-proxy's sim backend (device name ending "(vgpu sim)") memory and copies are real but
// kernels never run: the launch is validated and recorded, so its output is not checked there.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(call) check((call), #call)

static void check(cudaError_t err, const char *call)
{
    if (err != cudaSuccess) {
        std::fprintf(stderr, "FAILED: %s: %s (%s)\n", call, cudaGetErrorName(err),
                     cudaGetErrorString(err));
        std::exit(1);
    }
}

static const size_t MiB = 1 << 20;
static const size_t DEFAULT_MIB = 64;
static const unsigned THREADS = 256;

__global__ void mix(unsigned *x, unsigned n)
{
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        x[i] = x[i] * 2654435761u + i;
}

static uint64_t fnv1a(const void *data, size_t len)
{
    const unsigned char *p = static_cast<const unsigned char *>(data);
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

int main(int argc, char **argv)
{
    std::setvbuf(stdout, nullptr, _IOLBF, 0);  // a pipe in the container: keep order with stderr
    char *end = nullptr;
    unsigned long mib = argc > 1 ? std::strtoul(argv[1], &end, 10) : DEFAULT_MIB;
    if (argc > 2 || (argc > 1 && (*end != '\0' || mib == 0 || mib > 4096))) {
        std::fprintf(stderr, "usage: %s [MIB]  (1-4096, default %zu)\n", argv[0], DEFAULT_MIB);
        return 2;
    }
    const size_t bytes = mib * MiB;
    const char *socket = std::getenv("VGPU_PROXY_SOCKET");
    std::printf("cudart -> libcuda.so.1 (libvgpu) -> gpu-proxy at %s\n",
                socket ? socket : "(VGPU_PROXY_SOCKET unset)");

    cudaDeviceProp p;
    CHECK(cudaGetDeviceProperties(&p, 0));
    bool sim = std::strstr(p.name, "(vgpu sim)") != nullptr;
    std::printf("device: %s, %d SMs, compute %d.%d, %zu MiB (the zone's quota)\n", p.name,
                p.multiProcessorCount, p.major, p.minor, p.totalGlobalMem / MiB);

    const unsigned n = bytes / sizeof(unsigned);
    std::vector<unsigned> host(n), back(n);
    for (unsigned i = 0; i < n; i++)
        host[i] = i * 2246822519u ^ 0x9e3779b9u;
    unsigned *a = nullptr, *b = nullptr;
    CHECK(cudaMalloc(&a, bytes));
    CHECK(cudaMalloc(&b, bytes));
    CHECK(cudaMemcpy(a, host.data(), bytes, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    CHECK(cudaMemcpy(back.data(), b, bytes, cudaMemcpyDeviceToHost));
    uint64_t sent = fnv1a(host.data(), bytes), got = fnv1a(back.data(), bytes);
    if (got != sent) {
        std::fprintf(stderr, "FAILED: memory round trip: checksum %016llx, sent %016llx\n",
                     (unsigned long long)got, (unsigned long long)sent);
        return 1;
    }
    std::printf("memory: %zu MiB host -> device -> device -> host, checksum %016llx verified\n",
                bytes / MiB, (unsigned long long)got);

    // Pinned memory is shared with gpu-proxy (a memfd over a LocalLink, pages granted to Dom0 in
    // a Xen zone): these copies carry an offset into it, not the data.
    unsigned *pinned_src = nullptr, *pinned_back = nullptr;
    cudaStream_t stream;
    CHECK(cudaStreamCreate(&stream));
    CHECK(cudaMallocHost(&pinned_src, bytes));
    CHECK(cudaMallocHost(&pinned_back, bytes));
    std::memcpy(pinned_src, host.data(), bytes);
    std::memset(pinned_back, 0, bytes);
    CHECK(cudaMemcpyAsync(b, pinned_src, bytes, cudaMemcpyHostToDevice, stream));
    CHECK(cudaMemcpyAsync(pinned_back, b, bytes, cudaMemcpyDeviceToHost, stream));
    CHECK(cudaStreamSynchronize(stream));
    got = fnv1a(pinned_back, bytes);
    if (got != sent) {
        std::fprintf(stderr, "FAILED: pinned round trip: checksum %016llx, sent %016llx\n",
                     (unsigned long long)got, (unsigned long long)sent);
        return 1;
    }
    std::printf("pinned: %zu MiB cudaMallocHost -> device -> cudaMallocHost, async on a stream, "
                "checksum %016llx verified\n",
                bytes / MiB, (unsigned long long)got);
    CHECK(cudaFreeHost(pinned_src));
    CHECK(cudaFreeHost(pinned_back));
    CHECK(cudaStreamDestroy(stream));

    unsigned blocks = (n + THREADS - 1) / THREADS;
    mix<<<blocks, THREADS>>>(b, n);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::printf("kernel: mix<<<%u, %u>>> launched, cudaDeviceSynchronize succeeded\n", blocks,
                THREADS);
    if (sim) {
        std::printf("kernel: not run: the sim backend validated and recorded the launch, so there "
                    "is no result to check\n");
    } else {
        CHECK(cudaMemcpy(back.data(), b, bytes, cudaMemcpyDeviceToHost));
        for (unsigned i = 0; i < n; i++) {
            if (back[i] != host[i] * 2654435761u + i) {
                std::fprintf(stderr, "FAILED: kernel result: element %u is %u, expected %u\n",
                             i, back[i], host[i] * 2654435761u + i);
                return 1;
            }
        }
        std::printf("kernel: ran on the GPU, all %u results verified\n", n);
    }
    CHECK(cudaFree(a));
    CHECK(cudaFree(b));
    return 0;
}
