/*
 * Pinned host memory: cuMemHostAlloc / cuMemAllocHost / cuMemFreeHost, cuMemHostRegister /
 * cuMemHostUnregister, cuMemHostGetFlags.
 *
 * Each cuMemHostAlloc allocation is memory gpu-proxy maps too: on a LocalLink a memfd sealed
 * against shrinking and growing (vgpu_channel_share_fd), under the Xen grant link pages granted
 * to gpu-proxy's domain (vgpu_channel_share_grants). A copy to or from it sends only (arena,
 * offset, length) and gpu-proxy moves the bytes between those pages and device memory
 * (memcpy.c), so cuMemcpyHtoDAsync/DtoHAsync on it are truly asynchronous. Memory the
 * application allocated itself and registers with cuMemHostRegister cannot be shared after the
 * fact, nor can an allocation the zone cannot grant (gntalloc's or the grant table's limit):
 * those are pinned in name only and copied through the channel as pageable memory is.
 */
#define _GNU_SOURCE
#include "vgpu.h"

#include "vgpu_calls.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define ALLOC_FLAGS                                                                            \
    (CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_WRITECOMBINED)
#define REGISTER_FLAGS                                                                         \
    (CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP | CU_MEMHOSTREGISTER_READ_ONLY)

struct pinned {
    uint8_t *base;
    size_t size;       /* what the caller asked for */
    size_t mapped;     /* page-rounded length of our mapping (allocations only) */
    uint64_t arena;    /* gpu-proxy's name for it; 0 when not shared */
    uint64_t grant;    /* gntalloc's index of its pages when granted (grant link) */
    int granted;
    unsigned flags;
    int registered;    /* cuMemHostRegister of the caller's own memory */
    struct pinned *next;
};

static struct pinned *pinned_list; /* vgpu_lock */
static uint64_t next_arena = 1;    /* vgpu_lock */

/* The entry containing [p, p + n) (n >= 1), or NULL (vgpu_lock held). */
static struct pinned *find(const void *p, size_t n)
{
    uintptr_t a = (uintptr_t)p;

    for (struct pinned *e = pinned_list; e; e = e->next) {
        uintptr_t b = (uintptr_t)e->base;
        if (a >= b && a - b < e->size && n <= e->size - (a - b))
            return e;
    }
    return NULL;
}

static struct pinned *take(const void *base, int registered)
{
    for (struct pinned **pp = &pinned_list; *pp; pp = &(*pp)->next) {
        struct pinned *e = *pp;
        if (e->base == base && e->registered == registered) {
            *pp = e->next;
            return e;
        }
    }
    return NULL;
}

int vgpu_pinned_shared(const void *p, size_t n, uint64_t *arena, uint64_t *offset)
{
    struct pinned *e;
    int shared = 0;

    vgpu_lock();
    e = n ? find(p, n) : NULL;
    if (e && e->arena) {
        *arena = e->arena;
        *offset = (uint64_t)((const uint8_t *)p - e->base);
        shared = 1;
    }
    vgpu_unlock();
    return shared;
}

void vgpu_pinned_reset(void)
{
    for (struct pinned *e = pinned_list; e; e = e->next)
        e->arena = e->granted = 0; /* still valid memory in the child; copied from now on */
}

/* Pages granted to gpu-proxy (grant link), else a memfd mapping shared with it, else (a grant
 * link that cannot grant more) private memory; NULL on failure. */
static void *map_pinned(size_t len, uint64_t arena, struct pinned *e, CUresult *r)
{
    int fd;
    void *p;

    *r = vgpu_channel_share_grants(len, arena, &p, &e->grant);
    if (*r != CUDA_ERROR_NOT_SUPPORTED) {
        e->granted = !*r;
        e->arena = *r ? 0 : arena;
        return *r ? NULL : p;
    }
    fd = memfd_create("vgpu-pinned", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, (off_t)len) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        if (fd >= 0)
            close(fd);
        *r = CUDA_ERROR_OUT_OF_MEMORY;
        return NULL;
    }
    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        close(fd);
        *r = CUDA_ERROR_OUT_OF_MEMORY;
        return NULL;
    }
    *r = vgpu_channel_share_fd(fd, arena, len);
    close(fd); /* the mapping, and gpu-proxy's copy of the fd, keep the memory */
    if (*r == CUDA_SUCCESS)
        e->arena = arena;
    else if (*r == CUDA_ERROR_NOT_SUPPORTED)
        *r = CUDA_SUCCESS; /* grant link: pinned in name, copied through the channel */
    if (*r) {
        munmap(p, len);
        return NULL;
    }
    return p;
}

VGPU_API CUresult CUDAAPI cuMemHostAlloc(void **pp, size_t bytesize, unsigned int Flags)
{
    long page = sysconf(_SC_PAGESIZE);
    struct pinned *e;
    CUcontext ctx;
    uint64_t arena;
    size_t len;
    void *p;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!pp || bytesize == 0 || (Flags & ~ALLOC_FLAGS) || bytesize > SIZE_MAX - (size_t)page)
        return CUDA_ERROR_INVALID_VALUE;
    len = (bytesize + (size_t)page - 1) & ~((size_t)page - 1);
    e = calloc(1, sizeof(*e));
    if (!e)
        return CUDA_ERROR_OUT_OF_MEMORY;
    vgpu_lock();
    arena = next_arena++;
    vgpu_unlock();
    p = map_pinned(len, arena, e, &r);
    if (!p) {
        free(e);
        return r;
    }
    e->base = p;
    e->size = bytesize;
    e->mapped = len;
    e->flags = Flags;
    vgpu_lock();
    e->next = pinned_list;
    pinned_list = e;
    vgpu_unlock();
    *pp = p;
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuMemAllocHost_v2(void **pp, size_t bytesize)
{
    return cuMemHostAlloc(pp, bytesize, 0);
}

VGPU_API CUresult CUDAAPI cuMemFreeHost(void *p)
{
    struct pinned *e;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    vgpu_lock();
    e = take(p, 0);
    vgpu_unlock();
    if (!e)
        return CUDA_ERROR_INVALID_VALUE;
    if (e->arena) {
        uint8_t req[8], rep[8];
        size_t len;
        struct iovec iov = {req, (size_t)vgpu_marshal_vgpuHostUnshare(req, sizeof(req),
                                                                     e->arena)};
        /* gpu-proxy waits for queued copies first; a lost channel has nothing mapped left. */
        r = vgpu_call(VGPU_OP_vgpuHostUnshare, &iov, 1, rep, sizeof(rep), &len);
        if (r && r != CUDA_ERROR_DEVICE_UNAVAILABLE) {
            vgpu_lock();
            e->next = pinned_list;
            pinned_list = e;
            vgpu_unlock();
            return r;
        }
    }
    if (e->granted)
        vgpu_channel_ungrant(e->base, e->mapped, e->grant);
    else
        munmap(e->base, e->mapped);
    free(e);
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuMemHostGetFlags(unsigned int *pFlags, void *p)
{
    struct pinned *e;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!pFlags)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    e = find(p, 1);
    if (e)
        *pFlags = e->flags;
    vgpu_unlock();
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

VGPU_API CUresult CUDAAPI cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int Flags)
{
    struct pinned *e;
    CUcontext ctx;
    int overlaps = 0;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!p || bytesize == 0 || (Flags & ~REGISTER_FLAGS))
        return CUDA_ERROR_INVALID_VALUE;
    e = calloc(1, sizeof(*e));
    if (!e)
        return CUDA_ERROR_OUT_OF_MEMORY;
    *e = (struct pinned){.base = p, .size = bytesize, .flags = Flags, .registered = 1};
    vgpu_lock();
    for (struct pinned *o = pinned_list; o; o = o->next)
        overlaps |= (uintptr_t)p < (uintptr_t)o->base + o->size &&
                    (uintptr_t)o->base < (uintptr_t)p + bytesize;
    if (!overlaps) {
        e->next = pinned_list;
        pinned_list = e;
    }
    vgpu_unlock();
    if (overlaps) {
        free(e);
        return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    }
    return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemHostRegister(void *p, size_t bytesize, unsigned int Flags)
    VGPU_ALIAS(cuMemHostRegister_v2);

VGPU_API CUresult CUDAAPI cuMemHostUnregister(void *p)
{
    struct pinned *e;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    vgpu_lock();
    e = take(p, 1);
    vgpu_unlock();
    free(e);
    return e ? CUDA_SUCCESS : CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
}
