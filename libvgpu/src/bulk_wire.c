/*
 * Request heads of the calls whose bulk data is gathered from the caller's buffer instead of
 * being marshalled into one (host-to-device copies, module images): the generated marshallers
 * (libvgpu/gen) copy the data into their output, which would copy every byte twice.
 *
 * A head is the call's fixed part in the call table's wire encoding (idm/codegen.py): every `in`
 * scalar and handle in table order, little-endian, packed; the data follows it unprefixed. The
 * layout is restated here, so tests/libvgpu checks each head against the generated marshaller.
 */
#include "vgpu.h"

static size_t put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
    return 8;
}

/* dstDevice u64, ByteCount u64 */
size_t vgpu_head_cuMemcpyHtoD_v2(uint8_t *head, CUdeviceptr dst, size_t count)
{
    size_t n = put_u64(head, dst);
    return n + put_u64(head + n, count);
}

/* dstDevice u64, ByteCount u64, hStream u64 */
size_t vgpu_head_cuMemcpyHtoDAsync_v2(uint8_t *head, CUdeviceptr dst, size_t count,
                                      uint64_t stream)
{
    size_t n = vgpu_head_cuMemcpyHtoD_v2(head, dst, count);
    return n + put_u64(head + n, stream);
}

/* imageSize u64 */
size_t vgpu_head_cuModuleLoadData(uint8_t *head, size_t image_size)
{
    return put_u64(head, image_size);
}
