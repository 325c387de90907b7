/*
 * cuInit and cuDriverGetVersion. cuInit opens the channel to gpu-proxy and takes the device
 * snapshot; its outcome is the process's for good, as with the real driver: a failed cuInit
 * (no gpu-proxy, or one built from another call table) is returned again by every later cuInit,
 * and every other call answers CUDA_ERROR_NOT_INITIALIZED.
 */
#include "vgpu.h"

#include <pthread.h>

static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static int attempted;           /* guarded by init_lock */
static CUresult outcome;        /* guarded by init_lock */
static int initialised;         /* atomic: read on every call */

CUresult vgpu_require_init(void)
{
    return __atomic_load_n(&initialised, __ATOMIC_ACQUIRE) ? CUDA_SUCCESS
                                                            : CUDA_ERROR_NOT_INITIALIZED;
}

VGPU_API CUresult CUDAAPI cuInit(unsigned int Flags)
{
    CUresult r;

    if (Flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&init_lock);
    if (!attempted) {
        r = vgpu_channel_connect();
        if (r == CUDA_SUCCESS)
            r = vgpu_device_snapshot();
        attempted = 1;
        outcome = r;
        __atomic_store_n(&initialised, r == CUDA_SUCCESS, __ATOMIC_RELEASE);
    } else if (outcome == CUDA_SUCCESS) {
        r = vgpu_channel_connect(); /* the child of a fork opens its own channel here */
    } else {
        r = outcome;
    }
    pthread_mutex_unlock(&init_lock);
    return r;
}

/* The driver API version libvgpu implements: the one of the cuda.h it was built against. It
 * needs no channel, so it answers before cuInit too, as the real driver does. */
VGPU_API CUresult CUDAAPI cuDriverGetVersion(int *driverVersion)
{
    if (!driverVersion)
        return CUDA_ERROR_INVALID_VALUE;
    *driverVersion = CUDA_VERSION;
    return CUDA_SUCCESS;
}

void vgpu_init_atfork(enum vgpu_fork_phase phase)
{
    if (phase == VGPU_FORK_PREPARE)
        pthread_mutex_lock(&init_lock);
    else
        pthread_mutex_unlock(&init_lock); /* the child keeps cuInit's outcome: it ran here */
}
