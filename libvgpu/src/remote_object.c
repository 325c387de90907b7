/*
 * Objects gpu-proxy creates for a flags argument (streams, events): the create call, and the
 * hand-over of the new id to the handle table. If the local wrapper cannot be allocated or
 * registered, the host's object is destroyed again, so neither side keeps what the caller never
 * got a handle for.
 */
#include "vgpu.h"

CUresult vgpu_remote_create(uint32_t opcode, vgpu_marshal_flags_fn marshal,
                            vgpu_unmarshal_id_fn unmarshal, unsigned int flags, uint64_t *id)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct iovec iov = {req, (size_t)marshal(req, sizeof(req), flags)};
    CUresult r = vgpu_call(opcode, &iov, 1, rep, sizeof(rep), &len);

    if (r)
        return r;
    return unmarshal(rep, len, id) < 0 ? CUDA_ERROR_UNKNOWN : CUDA_SUCCESS;
}

CUresult vgpu_remote_adopt(struct vgpu_object *obj, uint64_t id, uint32_t destroy_opcode,
                           vgpu_marshal_id_fn marshal_destroy)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct iovec iov = {req, 0};
    int failed = 1;

    if (obj) {
        vgpu_lock();
        failed = vgpu_objects_add(obj);
        vgpu_unlock();
        if (!failed)
            return CUDA_SUCCESS;
        obj->destroy(obj);
    }
    iov.iov_len = (size_t)marshal_destroy(req, sizeof(req), id);
    (void)vgpu_call(destroy_opcode, &iov, 1, rep, sizeof(rep), &len);
    return CUDA_ERROR_OUT_OF_MEMORY;
}
