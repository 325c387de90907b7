/*
 * Pointer attributes and address ranges, answered from this process's allocations. The value
 * types are the ones NVIDIA's own bindings (cuda-python) use for each attribute: C bool (one
 * byte) for the yes/no attributes, unsigned int for enums, and so on.
 */
#include "vgpu.h"

#include <stdbool.h>
#include <string.h>

/* Write one attribute of allocation `a` for address ptr; CUDA_ERROR_INVALID_VALUE for an
 * attribute device memory does not have. */
static CUresult describe(void *data, CUpointer_attribute attribute, CUdeviceptr ptr,
                         const struct vgpu_allocation *a)
{
    switch (attribute) {
    case CU_POINTER_ATTRIBUTE_CONTEXT:
        *(CUcontext *)data = a->ctx;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
        *(unsigned int *)data = CU_MEMORYTYPE_DEVICE;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
        *(CUdeviceptr *)data = ptr;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_BUFFER_ID:
    case CU_POINTER_ATTRIBUTE_MEMORY_BLOCK_ID:
        *(unsigned long long *)data = a->buffer_id;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
        *(int *)data = a->device;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
    case CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR:
        *(CUdeviceptr *)data = a->base;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
    case CU_POINTER_ATTRIBUTE_MAPPING_SIZE:
        *(size_t *)data = a->size;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_MAPPED:
        *(bool *)data = true;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS:
    case CU_POINTER_ATTRIBUTE_IS_MANAGED:
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE: /* gpu-proxy refuses IPC */
    case CU_POINTER_ATTRIBUTE_IS_HW_DECOMPRESS_CAPABLE:
        *(bool *)data = false;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE:
        *(unsigned int *)data = 0;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_ACCESS_FLAGS:
        *(unsigned int *)data = CU_POINTER_ATTRIBUTE_ACCESS_FLAG_READWRITE;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES: /* not exportable: no shareable handles */
        *(unsigned long long *)data = 0;
        return CUDA_SUCCESS;
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE: /* cuMemAlloc memory is not from a pool */
        *(CUmemoryPool *)data = NULL;
        return CUDA_SUCCESS;
    default: /* HOST_POINTER (device memory is not mapped to the host), P2P_TOKENS, unknown */
        return CUDA_ERROR_INVALID_VALUE;
    }
}

/* Bytes of an attribute's value, 0 for attributes libvgpu does not know. */
static size_t value_size(CUpointer_attribute attribute)
{
    switch (attribute) {
    case CU_POINTER_ATTRIBUTE_CONTEXT:
        return sizeof(CUcontext);
    case CU_POINTER_ATTRIBUTE_HOST_POINTER:
        return sizeof(void *);
    case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE:
        return sizeof(CUmemoryPool);
    case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
    case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
    case CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR:
        return sizeof(CUdeviceptr);
    case CU_POINTER_ATTRIBUTE_BUFFER_ID:
    case CU_POINTER_ATTRIBUTE_MEMORY_BLOCK_ID:
    case CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES:
        return sizeof(unsigned long long);
    case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
    case CU_POINTER_ATTRIBUTE_MAPPING_SIZE:
        return sizeof(size_t);
    case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
        return sizeof(int);
    case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
    case CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE:
    case CU_POINTER_ATTRIBUTE_ACCESS_FLAGS:
        return sizeof(unsigned int);
    case CU_POINTER_ATTRIBUTE_MAPPED:
    case CU_POINTER_ATTRIBUTE_SYNC_MEMOPS:
    case CU_POINTER_ATTRIBUTE_IS_MANAGED:
    case CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE:
    case CU_POINTER_ATTRIBUTE_IS_HW_DECOMPRESS_CAPABLE:
        return sizeof(bool);
    default:
        return 0;
    }
}

VGPU_API CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attribute,
                                                CUdeviceptr ptr)
{
    const struct vgpu_allocation *a;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!data)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    a = vgpu_allocations_find(ptr);
    r = a ? describe(data, attribute, ptr, a) : CUDA_ERROR_INVALID_VALUE;
    vgpu_unlock();
    return r;
}

/* Unlike the singular call, an unknown pointer (or an attribute device memory does not have) is
 * not an error here: the value reads as zero/NULL (memory type 0: not a CUDA pointer), as CUDA
 * documents. Only an attribute libvgpu does not know at all is refused. */
VGPU_API CUresult CUDAAPI cuPointerGetAttributes(unsigned int numAttributes,
                                                 CUpointer_attribute *attributes, void **data,
                                                 CUdeviceptr ptr)
{
    const struct vgpu_allocation *a;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (numAttributes && (!attributes || !data))
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    a = vgpu_allocations_find(ptr);
    for (unsigned int i = 0; i < numAttributes && !r; i++) {
        size_t size = value_size(attributes[i]);
        if (!data[i] || !size)
            r = CUDA_ERROR_INVALID_VALUE;
        else if (!a || describe(data[i], attributes[i], ptr, a) != CUDA_SUCCESS)
            memset(data[i], 0, size);
    }
    vgpu_unlock();
    return r;
}

VGPU_API CUresult CUDAAPI cuMemGetAddressRange_v2(CUdeviceptr *pbase, size_t *psize,
                                                  CUdeviceptr dptr)
{
    const struct vgpu_allocation *a;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    vgpu_lock();
    a = vgpu_allocations_find(dptr);
    if (a) {
        if (pbase)
            *pbase = a->base;
        if (psize)
            *psize = a->size;
    }
    vgpu_unlock();
    return a ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}
