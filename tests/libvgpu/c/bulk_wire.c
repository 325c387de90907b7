/*
 * libvgpu restates the fixed part of the calls whose data it gathers from the caller's buffer
 * (libvgpu/src/bulk_wire.c). Each head followed by the data must be byte for byte what the
 * marshaller generated from the call table produces. Linked with those two files only.
 */
#include "vgpu.h"
#include "vgpu_calls.h"

#include <stdio.h>
#include <string.h>

static int same(const char *call, const uint8_t *head, size_t head_len, const uint8_t *data,
                size_t len, const uint8_t *generated, int generated_len)
{
    if (generated_len < 0 || (size_t)generated_len != head_len + len ||
        memcmp(generated, head, head_len) != 0 || memcmp(generated + head_len, data, len) != 0) {
        fprintf(stderr, "%s: the head does not match the generated marshalling\n", call);
        return 0;
    }
    return 1;
}

int main(void)
{
    static uint8_t data[1000], generated[2048];
    uint8_t head[VGPU_HEAD_MAX];
    size_t n;
    int ok = 1, g;

    for (size_t i = 0; i < sizeof(data); i++)
        data[i] = (uint8_t)(i * 13 + 5);

    n = vgpu_head_cuMemcpyHtoD_v2(head, 0x7f0012345678ull, sizeof(data));
    g = vgpu_marshal_cuMemcpyHtoD_v2(generated, sizeof(generated), 0x7f0012345678ull, data,
                                     sizeof(data));
    ok &= same("cuMemcpyHtoD_v2", head, n, data, sizeof(data), generated, g);
    ok &= n == vgpu_call_by_opcode(VGPU_OP_cuMemcpyHtoD_v2)->req_fixed;

    n = vgpu_head_cuMemcpyHtoDAsync_v2(head, 0x7f00abcdef01ull, 999, 0x1122334455667788ull);
    g = vgpu_marshal_cuMemcpyHtoDAsync_v2(generated, sizeof(generated), 0x7f00abcdef01ull, data,
                                          999, 0x1122334455667788ull);
    ok &= same("cuMemcpyHtoDAsync_v2", head, n, data, 999, generated, g);
    ok &= n == vgpu_call_by_opcode(VGPU_OP_cuMemcpyHtoDAsync_v2)->req_fixed;

    n = vgpu_head_cuModuleLoadData(head, 777);
    g = vgpu_marshal_cuModuleLoadData(generated, sizeof(generated), data, 777);
    ok &= same("cuModuleLoadData", head, n, data, 777, generated, g);
    ok &= n == vgpu_call_by_opcode(VGPU_OP_cuModuleLoadData)->req_fixed;

    puts(ok ? "ok" : "mismatch");
    return ok ? 0 : 1;
}
