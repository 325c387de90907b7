/*
 * The CUDA handles this process holds (contexts, modules, functions, streams, events): each is a
 * pointer to a libvgpu object, and a handle is honoured only while its object is in this table,
 * so a destroyed or made-up handle is refused with an error instead of being dereferenced.
 *
 * The table is an open-addressing hash set of object pointers (linear probing, deletion by
 * backward shift), guarded by the one lock over libvgpu's local state.
 */
#include "vgpu.h"

#include <pthread.h>
#include <stdlib.h>

static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;

static struct {
    struct vgpu_object **slots;
    size_t cap; /* a power of two, or 0 */
    size_t count;
} table;

void vgpu_lock(void)
{
    pthread_mutex_lock(&state_lock);
}

void vgpu_unlock(void)
{
    pthread_mutex_unlock(&state_lock);
}

static size_t slot_of(const void *p, size_t cap)
{
    /* Objects are heap pointers: the low bits carry no information, mix them away. */
    uint64_t h = (uint64_t)(uintptr_t)p * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 17) & (cap - 1);
}

static void put(struct vgpu_object **slots, size_t cap, struct vgpu_object *obj)
{
    size_t i = slot_of(obj, cap);
    while (slots[i])
        i = (i + 1) & (cap - 1);
    slots[i] = obj;
}

static int grow(void)
{
    size_t cap = table.cap ? table.cap * 2 : 64;
    struct vgpu_object **slots = calloc(cap, sizeof(*slots));

    if (!slots)
        return -1;
    for (size_t i = 0; i < table.cap; i++)
        if (table.slots[i])
            put(slots, cap, table.slots[i]);
    free(table.slots);
    table.slots = slots;
    table.cap = cap;
    return 0;
}

int vgpu_objects_add(struct vgpu_object *obj)
{
    if ((table.count + 1) * 2 > table.cap && grow())
        return -1;
    put(table.slots, table.cap, obj);
    table.count++;
    return 0;
}

static size_t find_slot(const void *p)
{
    size_t i;

    if (!table.cap || !p)
        return SIZE_MAX;
    for (i = slot_of(p, table.cap); table.slots[i]; i = (i + 1) & (table.cap - 1))
        if (table.slots[i] == p)
            return i;
    return SIZE_MAX;
}

struct vgpu_object *vgpu_objects_find(const void *handle, enum vgpu_kind kind)
{
    size_t i = find_slot(handle);
    if (i == SIZE_MAX || table.slots[i]->kind != kind)
        return NULL;
    return table.slots[i];
}

static void remove_at(size_t hole)
{
    size_t mask = table.cap - 1, i = hole;

    table.slots[hole] = NULL;
    table.count--;
    /* Pull later members of the probe run back over the hole, so lookups never stop early. */
    for (i = (i + 1) & mask; table.slots[i]; i = (i + 1) & mask) {
        size_t home = slot_of(table.slots[i], table.cap);
        if (((i - home) & mask) >= ((i - hole) & mask)) {
            table.slots[hole] = table.slots[i];
            table.slots[i] = NULL;
            hole = i;
        }
    }
}

void vgpu_objects_remove(struct vgpu_object *obj)
{
    size_t i = find_slot(obj);
    if (i != SIZE_MAX)
        remove_at(i);
}

struct vgpu_object **vgpu_objects_detach_owned(CUcontext ctx, size_t *n)
{
    struct vgpu_object **out = malloc((table.count ? table.count : 1) * sizeof(*out));
    size_t i = 0;

    *n = 0;
    if (!out)
        return NULL;
    while (i < table.cap) {
        struct vgpu_object *obj = table.slots[i];
        if (obj && obj->kind != VGPU_KIND_CONTEXT && obj->ctx == ctx) {
            out[(*n)++] = obj;
            remove_at(i); /* may pull an unvisited member into slot i: look at it again */
        } else {
            i++;
        }
    }
    return out;
}

void vgpu_objects_reset(void)
{
    for (size_t i = 0; i < table.cap; i++)
        if (table.slots[i])
            table.slots[i]->destroy(table.slots[i]);
    free(table.slots);
    table.slots = NULL;
    table.cap = table.count = 0;
}
