/*
 * The device memory this process allocated, by address: cuPointerGetAttribute and
 * cuMemGetAddressRange answer from it, and copies and memsets are checked against it before
 * anything is sent (gpu-proxy checks again: this only makes errors immediate, as CUDA's are).
 *
 * A sorted array searched by bisection: allocations are few and long-lived in CUDA programs
 * (caching allocators), so lookups dominate. Callers hold vgpu_lock.
 */
#include "vgpu.h"

#include <stdlib.h>
#include <string.h>

static struct {
    struct vgpu_allocation *items; /* sorted by base, non-overlapping */
    size_t count, cap;
    unsigned long long next_buffer_id;
} allocs;

/* Index of the last allocation with base <= ptr, or SIZE_MAX if none. */
static size_t floor_index(CUdeviceptr ptr)
{
    size_t lo = 0, hi = allocs.count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (allocs.items[mid].base <= ptr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo ? lo - 1 : SIZE_MAX;
}

int vgpu_allocations_add(CUdeviceptr base, size_t size, CUcontext ctx, CUdevice device,
                         const void *module)
{
    size_t at = floor_index(base) + 1; /* SIZE_MAX + 1 == 0 */

    if (allocs.count == allocs.cap) {
        size_t cap = allocs.cap ? allocs.cap * 2 : 64;
        struct vgpu_allocation *items = realloc(allocs.items, cap * sizeof(*items));
        if (!items)
            return -1;
        allocs.items = items;
        allocs.cap = cap;
    }
    memmove(&allocs.items[at + 1], &allocs.items[at], (allocs.count - at) * sizeof(*allocs.items));
    allocs.items[at] =
        (struct vgpu_allocation){base, size, ctx, device, ++allocs.next_buffer_id, module, NULL};
    allocs.count++;
    return 0;
}

int vgpu_allocations_remove(CUdeviceptr base, struct vgpu_allocation *out)
{
    size_t i = floor_index(base);

    if (i == SIZE_MAX || allocs.items[i].base != base)
        return -1;
    *out = allocs.items[i];
    memmove(&allocs.items[i], &allocs.items[i + 1],
            (allocs.count - i - 1) * sizeof(*allocs.items));
    allocs.count--;
    return 0;
}

const struct vgpu_allocation *vgpu_allocations_find(CUdeviceptr ptr)
{
    size_t i = floor_index(ptr);

    if (i == SIZE_MAX || ptr - allocs.items[i].base >= allocs.items[i].size)
        return NULL;
    return &allocs.items[i];
}

int vgpu_allocations_contain(CUdeviceptr ptr, size_t len)
{
    const struct vgpu_allocation *a = vgpu_allocations_find(ptr);
    return a && len <= a->size - (ptr - a->base);
}

CUdeviceptr *vgpu_allocations_detach_ctx(CUcontext ctx, size_t *n)
{
    CUdeviceptr *bases = malloc((allocs.count ? allocs.count : 1) * sizeof(*bases));
    size_t kept = 0;

    *n = 0;
    if (!bases)
        return NULL;
    for (size_t i = 0; i < allocs.count; i++) {
        if (allocs.items[i].ctx != ctx)
            allocs.items[kept++] = allocs.items[i];
        else if (!allocs.items[i].module)
            bases[(*n)++] = allocs.items[i].base;
    }
    allocs.count = kept;
    return bases;
}

void vgpu_allocations_set_pool(CUdeviceptr base, const void *pool)
{
    size_t i = floor_index(base);

    if (i != SIZE_MAX && allocs.items[i].base == base)
        allocs.items[i].pool = pool;
}

void vgpu_allocations_remove_module(const void *module)
{
    size_t kept = 0;

    for (size_t i = 0; i < allocs.count; i++)
        if (allocs.items[i].module != module)
            allocs.items[kept++] = allocs.items[i];
    allocs.count = kept;
}

void vgpu_allocations_reset(void)
{
    free(allocs.items);
    memset(&allocs, 0, sizeof(allocs));
}
