/*
 * fork(): the child starts with no channel and none of its parent's GPU objects, as with the
 * real driver, where a child cannot use the CUDA state it inherited. Its next call that needs
 * gpu-proxy opens a channel of its own; the parent's handles are unknown in the child.
 */
#include "vgpu.h"

#include <pthread.h>

static void prepare(void)
{
    vgpu_init_atfork(VGPU_FORK_PREPARE);
    vgpu_channel_atfork(VGPU_FORK_PREPARE);
    vgpu_lock();
    vgpu_host_funcs_atfork(VGPU_FORK_PREPARE);
}

static void parent(void)
{
    vgpu_host_funcs_atfork(VGPU_FORK_PARENT);
    vgpu_unlock();
    vgpu_channel_atfork(VGPU_FORK_PARENT);
    vgpu_init_atfork(VGPU_FORK_PARENT);
}

static void child(void)
{
    vgpu_host_funcs_atfork(VGPU_FORK_CHILD);
    vgpu_objects_reset();
    vgpu_allocations_reset();
    vgpu_mempools_reset();
    vgpu_contexts_reset();
    vgpu_cls_reset();
    vgpu_pinned_reset();
    vgpu_unlock();
    vgpu_channel_atfork(VGPU_FORK_CHILD);
    vgpu_init_atfork(VGPU_FORK_CHILD);
}

__attribute__((constructor)) static void register_fork_handlers(void)
{
    pthread_atfork(prepare, parent, child);
}
