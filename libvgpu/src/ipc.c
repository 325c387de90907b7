/*
 * Inter-process sharing. A zone's memory and events must never be mapped by a process outside
 * the zone, so gpu-proxy refuses every one of these (CUDA_ERROR_NOT_PERMITTED). They are still
 * forwarded: the refusal is Dom0's policy, stated in one place, not libvgpu's. Should gpu-proxy
 * ever open another process's memory or event, libvgpu could not track it (it knows only what
 * this process created): the open calls then answer CUDA_ERROR_NOT_SUPPORTED.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

VGPU_API CUresult CUDAAPI cuIpcGetMemHandle(CUipcMemHandle *pHandle, CUdeviceptr dptr)
{
    uint8_t req[8], rep[VGPU_SIZE_cuIpcGetMemHandle_pHandle];
    size_t len;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!pHandle)
        return CUDA_ERROR_INVALID_VALUE;
    iov.iov_len = (size_t)vgpu_marshal_cuIpcGetMemHandle(req, sizeof(req), dptr);
    r = vgpu_call(VGPU_OP_cuIpcGetMemHandle, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    return vgpu_unmarshal_cuIpcGetMemHandle_reply(rep, len, pHandle->reserved) < 0
               ? CUDA_ERROR_UNKNOWN
               : CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle,
                                                unsigned int Flags)
{
    uint8_t req[VGPU_SIZE_cuIpcOpenMemHandle_v2_handle + 4], rep[8];
    size_t len;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!pdptr)
        return CUDA_ERROR_INVALID_VALUE;
    iov.iov_len =
        (size_t)vgpu_marshal_cuIpcOpenMemHandle_v2(req, sizeof(req), handle.reserved, Flags);
    r = vgpu_call(VGPU_OP_cuIpcOpenMemHandle_v2, &iov, 1, rep, sizeof(rep), &len);
    return r ? r : CUDA_ERROR_NOT_SUPPORTED;
}

CUresult CUDAAPI cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int Flags)
    VGPU_ALIAS(cuIpcOpenMemHandle_v2);

VGPU_API CUresult CUDAAPI cuIpcCloseMemHandle(CUdeviceptr dptr)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    iov.iov_len = (size_t)vgpu_marshal_cuIpcCloseMemHandle(req, sizeof(req), dptr);
    return vgpu_call(VGPU_OP_cuIpcCloseMemHandle, &iov, 1, rep, sizeof(rep), &len);
}

VGPU_API CUresult CUDAAPI cuIpcGetEventHandle(CUipcEventHandle *pHandle, CUevent event)
{
    uint8_t req[8], rep[VGPU_SIZE_cuIpcGetEventHandle_pHandle];
    size_t len;
    uint64_t id;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_event_id(event, &id);

    if (r)
        return r;
    if (!pHandle)
        return CUDA_ERROR_INVALID_VALUE;
    iov.iov_len = (size_t)vgpu_marshal_cuIpcGetEventHandle(req, sizeof(req), id);
    r = vgpu_call(VGPU_OP_cuIpcGetEventHandle, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    return vgpu_unmarshal_cuIpcGetEventHandle_reply(rep, len, pHandle->reserved) < 0
               ? CUDA_ERROR_UNKNOWN
               : CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuIpcOpenEventHandle(CUevent *phEvent, CUipcEventHandle handle)
{
    uint8_t req[VGPU_SIZE_cuIpcOpenEventHandle_handle], rep[8];
    size_t len;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!phEvent)
        return CUDA_ERROR_INVALID_VALUE;
    iov.iov_len = (size_t)vgpu_marshal_cuIpcOpenEventHandle(req, sizeof(req), handle.reserved);
    r = vgpu_call(VGPU_OP_cuIpcOpenEventHandle, &iov, 1, rep, sizeof(rep), &len);
    return r ? r : CUDA_ERROR_NOT_SUPPORTED;
}
