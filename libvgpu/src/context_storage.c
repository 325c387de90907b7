/*
 * Context-local storage: cudart keeps its per-context state (its view of a device's primary
 * context, registered modules) in the driver, keyed by (context, key), through a private export
 * table (export_table.c). A value may carry a destructor, which the driver calls when the context
 * is destroyed or its primary context is released for the last time.
 */
#include "vgpu.h"

#include <stdlib.h>

struct entry {
    CUcontext ctx;
    void *key;
    void *value;
    vgpu_cls_dtor dtor;
    struct entry *next;
};

static struct entry *entries; /* vgpu_lock */

/* NULL means the calling thread's current context. */
static CUresult resolve(CUcontext *ctx)
{
    return *ctx ? CUDA_SUCCESS : vgpu_current_context(ctx, NULL);
}

static struct entry **find(CUcontext ctx, const void *key)
{
    struct entry **e = &entries;
    while (*e && ((*e)->ctx != ctx || (*e)->key != key))
        e = &(*e)->next;
    return e;
}

CUresult vgpu_cls_insert(CUcontext ctx, void *key, void *value, vgpu_cls_dtor dtor)
{
    struct entry **e, *n;
    CUresult r = resolve(&ctx);

    if (r)
        return r;
    vgpu_lock();
    e = find(ctx, key);
    if (*e) {
        (*e)->value = value;
        (*e)->dtor = dtor;
    } else if ((n = malloc(sizeof(*n)))) {
        *n = (struct entry){ctx, key, value, dtor, entries};
        entries = n;
    } else {
        r = CUDA_ERROR_OUT_OF_MEMORY;
    }
    vgpu_unlock();
    return r;
}

CUresult vgpu_cls_remove(CUcontext ctx, void *key)
{
    struct entry **e, *gone;
    CUresult r = resolve(&ctx);

    if (r)
        return r;
    vgpu_lock();
    e = find(ctx, key);
    gone = *e;
    if (gone)
        *e = gone->next;
    vgpu_unlock();
    free(gone);
    return gone ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult vgpu_cls_get(void **value, CUcontext ctx, void *key)
{
    struct entry *e;
    CUresult r;

    if (!value)
        return CUDA_ERROR_INVALID_VALUE;
    *value = NULL;
    r = resolve(&ctx);
    if (r)
        return r;
    vgpu_lock();
    e = *find(ctx, key);
    if (e)
        *value = e->value;
    vgpu_unlock();
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

void vgpu_cls_destroy(CUcontext ctx)
{
    struct entry **e = &entries, *mine = NULL, *n;

    vgpu_lock();
    while (*e) {
        n = *e;
        if (n->ctx == ctx) {
            *e = n->next;
            n->next = mine;
            mine = n;
        } else {
            e = &n->next;
        }
    }
    vgpu_unlock();
    /* Outside the lock: a destructor may call back into the driver. */
    while (mine) {
        n = mine->next;
        if (mine->dtor)
            mine->dtor(ctx, mine->key, mine->value);
        free(mine);
        mine = n;
    }
}

/* The child of a fork has none of its parent's contexts (vgpu_lock held by fork.c). */
void vgpu_cls_reset(void)
{
    struct entry *n;
    while (entries) {
        n = entries->next;
        free(entries);
        entries = n;
    }
}
