/*
 * cuLaunchKernel: the parameters are packed into the one buffer the kernel reads, then the
 * launch goes fire-and-forget (its errors surface at the next synchronising call).
 *
 * kernelParams is an array of pointers, one per parameter, with no sizes: each value is copied
 * to its offset in the kernel's layout (read from the module image), padding zeroed. The `extra`
 * form hands over an already packed buffer (CU_LAUNCH_PARAM_BUFFER_POINTER/SIZE), whose size
 * must match the layout when the layout is known. gpu-proxy checks the size again.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <stdlib.h>
#include <string.h>

/* Parameter buffers up to this size are packed on the stack; larger ones (up to CUDA's limit
 * of 32764 bytes) on the heap. */
#define SMALL_PARAMS 4096
/* Room for the request's fixed fields before the parameters (48 bytes in the call table). */
#define LAUNCH_HEAD 64
/* Longest `extra` list accepted: key/value pairs before CU_LAUNCH_PARAM_END. */
#define MAX_EXTRA_PAIRS 64

/* The buffer and size an `extra` list names. */
static CUresult parse_extra(void **extra, const void **buf, size_t *size)
{
    const void *ptr = NULL;
    const size_t *len = NULL;
    size_t i;

    for (i = 0; i < 2 * MAX_EXTRA_PAIRS && extra[i] != CU_LAUNCH_PARAM_END; i += 2) {
        if (extra[i] == CU_LAUNCH_PARAM_BUFFER_POINTER)
            ptr = extra[i + 1];
        else if (extra[i] == CU_LAUNCH_PARAM_BUFFER_SIZE)
            len = extra[i + 1];
        else
            return CUDA_ERROR_INVALID_VALUE;
    }
    if (i == 2 * MAX_EXTRA_PAIRS || !ptr || !len || *len > VGPU_MAX_cuLaunchKernel_params)
        return CUDA_ERROR_INVALID_VALUE;
    *buf = ptr;
    *size = *len;
    return CUDA_SUCCESS;
}

/* Pack kernelParams by the layout into out (room for kernel->param_bytes). */
static void pack(const struct vgpu_kernel *kernel, void **kernelParams, uint8_t *out)
{
    memset(out, 0, kernel->param_bytes);
    for (uint32_t i = 0; i < kernel->nparams; i++)
        memcpy(out + kernel->params[i].offset, kernelParams[i], kernel->params[i].size);
}

/* The packed parameter buffer into *params (the caller's stack buffer, or malloc'd when larger)
 * and its size into *nbytes (already the `extra` buffer's size when has_extra). vgpu_lock held:
 * the layout belongs to the module. */
static CUresult parameters(const struct vgpu_kernel *kernel, void **kernelParams, int has_extra,
                           const void *extra_buf, uint8_t **params, size_t *nbytes)
{
    if (has_extra) {
        if (*nbytes != kernel->param_bytes)
            return CUDA_ERROR_INVALID_VALUE;
    } else if (kernel->nparams && !kernelParams) {
        return CUDA_ERROR_INVALID_VALUE;
    } else {
        *nbytes = kernel->param_bytes;
    }
    if (*nbytes > SMALL_PARAMS && !(*params = malloc(*nbytes)))
        return CUDA_ERROR_OUT_OF_MEMORY;
    if (has_extra)
        memcpy(*params, extra_buf, *nbytes);
    else
        pack(kernel, kernelParams, *params);
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned int gridDimX,
                                         unsigned int gridDimY, unsigned int gridDimZ,
                                         unsigned int blockDimX, unsigned int blockDimY,
                                         unsigned int blockDimZ, unsigned int sharedMemBytes,
                                         CUstream hStream, void **kernelParams, void **extra)
{
    uint8_t small[SMALL_PARAMS], small_msg[LAUNCH_HEAD + SMALL_PARAMS], *params = small, *msg = small_msg;
    const void *extra_buf = NULL;
    const struct vgpu_kernel *kernel;
    size_t nbytes = 0, cap = sizeof(small_msg);
    uint64_t id, stream;
    CUcontext ctx;
    int n;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!gridDimX || !gridDimY || !gridDimZ || !blockDimX || !blockDimY || !blockDimZ ||
        (kernelParams && extra))
        return CUDA_ERROR_INVALID_VALUE;
    r = vgpu_kernel_function(&f);
    if (!r && sharedMemBytes) {
        /* Refused now, as CUDA does, rather than at the next synchronising call. */
        struct vgpu_function_info info;
        r = vgpu_function_attributes(f, &info);
        if (!r && sharedMemBytes > (unsigned int)info.max_dynamic_shared)
            r = CUDA_ERROR_INVALID_VALUE;
    }
    if (!r)
        r = vgpu_stream_id(hStream, &stream);
    if (!r && extra)
        r = parse_extra(extra, &extra_buf, &nbytes);
    if (r)
        return r;
    vgpu_lock();
    r = vgpu_function_find(f, &id, &kernel);
    if (!r)
        r = parameters(kernel, kernelParams, extra != NULL, extra_buf, &params, &nbytes);
    vgpu_unlock();
    if (!r && nbytes > SMALL_PARAMS && !(msg = malloc(cap = LAUNCH_HEAD + nbytes)))
        r = CUDA_ERROR_OUT_OF_MEMORY;
    if (!r) {
        n = vgpu_marshal_cuLaunchKernel(msg, cap, id, gridDimX, gridDimY, gridDimZ, blockDimX,
                                        blockDimY, blockDimZ, sharedMemBytes, stream,
                                        (unsigned int)nbytes, params);
        if (n < 0) {
            r = CUDA_ERROR_INVALID_VALUE;
        } else {
            struct iovec iov = {msg, (size_t)n};
            r = vgpu_call_async(VGPU_OP_cuLaunchKernel, &iov, 1);
        }
    }
    if (params != small)
        free(params);
    if (msg != small_msg)
        free(msg);
    return r;
}

CUresult CUDAAPI cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                     unsigned int gridDimZ, unsigned int blockDimX,
                                     unsigned int blockDimY, unsigned int blockDimZ,
                                     unsigned int sharedMemBytes, CUstream hStream,
                                     void **kernelParams, void **extra)
    VGPU_ALIAS(cuLaunchKernel);

/* Whether a launch attribute can be honoured: the ones that ask for nothing beyond a plain
 * launch. Cooperative and cluster launches, priorities, programmatic dependencies, memory
 * sync domains, ... are refused rather than dropped. */
static int plain_launch_attribute(const CUlaunchAttribute *a)
{
    switch (a->id) {
    case CU_LAUNCH_ATTRIBUTE_IGNORE:
        return 1;
    case CU_LAUNCH_ATTRIBUTE_COOPERATIVE:
        return a->value.cooperative == 0;
    case CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION:
        return a->value.clusterDim.x == 1 && a->value.clusterDim.y == 1 &&
               a->value.clusterDim.z == 1;
    case CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE:
        return a->value.clusterSchedulingPolicyPreference == CU_CLUSTER_SCHEDULING_POLICY_DEFAULT;
    default:
        return 0;
    }
}

VGPU_API CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f,
                                           void **kernelParams, void **extra)
{
    CUcontext ctx;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!config || (config->numAttrs && !config->attrs))
        return CUDA_ERROR_INVALID_VALUE;
    for (unsigned int i = 0; i < config->numAttrs; i++)
        if (!plain_launch_attribute(&config->attrs[i]))
            return CUDA_ERROR_NOT_SUPPORTED;
    return cuLaunchKernel(f, config->gridDimX, config->gridDimY, config->gridDimZ,
                          config->blockDimX, config->blockDimY, config->blockDimZ,
                          config->sharedMemBytes, config->hStream, kernelParams, extra);
}

CUresult CUDAAPI cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f,
                                       void **kernelParams, void **extra)
    VGPU_ALIAS(cuLaunchKernelEx);
