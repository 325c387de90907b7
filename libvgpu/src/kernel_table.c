/*
 * A module's kernel table, from gpu-proxy (vgpuModuleGetKernels): every kernel's name, parameter
 * layout (cuLaunchKernel's kernelParams carry no sizes) and attributes (cuFuncGetAttribute and
 * occupancy are answered in the zone). gpu-proxy reads them from the image it loaded, zstd- and
 * LZ4-compressed fatbin entries included, so the zone parses no image. The page format is
 * gpu_proxy/kernel_table.py's; a page that does not follow it is refused, not trusted.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <stdlib.h>
#include <string.h>

#define PAGE VGPU_MAX_vgpuModuleGetKernels_table
#define ENTRY_FIXED 36u /* nine u32 after the name */
#define PARAMS_MAX 32764u

/* One entry at p (len bytes left) into k; its size, or 0 if malformed. */
static size_t read_entry(const uint8_t *p, size_t len, struct vgpu_kernel *k)
{
    size_t name_len, pos;
    uint32_t f[9];

    if (len < 2)
        return 0;
    name_len = vgpu_rd16(p);
    pos = 2 + name_len;
    if (name_len == 0 || len < pos + ENTRY_FIXED || memchr(p + 2, '\0', name_len))
        return 0;
    for (int i = 0; i < 9; i++)
        f[i] = vgpu_rd32(p + pos + 4 * (size_t)i);
    pos += ENTRY_FIXED;
    /* f: parameter bytes, count, attributes known, registers, shared, constants, local,
     * launch-bound threads, SM */
    if (f[0] > PARAMS_MAX || f[1] > PARAMS_MAX || (size_t)f[1] * 4 > len - pos)
        return 0;
    k->name = strndup((const char *)p + 2, name_len);
    k->params = malloc((f[1] ? f[1] : 1) * sizeof(*k->params));
    if (!k->name || !k->params)
        return 0;
    k->param_bytes = f[0];
    k->nparams = f[1];
    for (uint32_t i = 0; i < f[1]; i++, pos += 4) {
        k->params[i] = (struct vgpu_param){vgpu_rd16(p + pos), vgpu_rd16(p + pos + 2)};
        if (k->params[i].offset + k->params[i].size > k->param_bytes)
            return 0;
    }
    if (f[2])
        k->attrs = (struct vgpu_func_attrs){f[3], f[4], f[5], f[6], f[7], f[8]};
    return pos;
}

CUresult vgpu_kernels_fetch(uint64_t module_id, struct vgpu_kernels *out)
{
    uint8_t req[16], *rep = malloc(PAGE + 4), *page = malloc(PAGE);
    size_t rep_len, len, total = 0;
    CUresult r = rep && page ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;

    *out = (struct vgpu_kernels){0};
    while (!r) {
        struct iovec iov = {req, (size_t)vgpu_marshal_vgpuModuleGetKernels(
                                     req, sizeof(req), module_id, (unsigned)out->count, PAGE)};
        size_t count, pos = 8;

        r = vgpu_call(VGPU_OP_vgpuModuleGetKernels, &iov, 1, rep, PAGE + 4, &rep_len);
        if (r)
            break;
        if (vgpu_unmarshal_vgpuModuleGetKernels_reply(rep, rep_len, page, PAGE, &len) < 0 ||
            len < 8) {
            r = CUDA_ERROR_UNKNOWN;
            break;
        }
        count = vgpu_rd32(page + 4);
        if (out->count == 0) {
            total = vgpu_rd32(page);
            if (!(out->kernels = calloc(total ? total : 1, sizeof(*out->kernels))))
                r = CUDA_ERROR_OUT_OF_MEMORY;
        } else if (vgpu_rd32(page) != total) {
            r = CUDA_ERROR_UNKNOWN;
        }
        if (!r && (count > total - out->count || (count == 0 && out->count < total)))
            r = CUDA_ERROR_UNKNOWN;
        for (size_t i = 0; !r && i < count; i++) {
            struct vgpu_kernel *k = &out->kernels[out->count++];
            size_t used = read_entry(page + pos, len - pos, k);
            if (!used || vgpu_kernels_find(out, k->name) != k)
                r = CUDA_ERROR_UNKNOWN;
            pos += used;
        }
        if (!r && pos != len)
            r = CUDA_ERROR_UNKNOWN;
        if (out->count == total)
            break;
    }
    free(rep);
    free(page);
    if (r == CUDA_ERROR_UNKNOWN)
        vgpu_log("gpu-proxy sent a malformed kernel table for module %llu",
                 (unsigned long long)module_id);
    if (r)
        vgpu_kernels_free(out);
    return r;
}

void vgpu_kernels_free(struct vgpu_kernels *k)
{
    for (size_t i = 0; i < k->count; i++) {
        free(k->kernels[i].name);
        free(k->kernels[i].params);
    }
    free(k->kernels);
    k->kernels = NULL;
    k->count = 0;
}

const struct vgpu_kernel *vgpu_kernels_find(const struct vgpu_kernels *k, const char *name)
{
    for (size_t i = 0; i < k->count; i++)
        if (k->kernels[i].name && strcmp(k->kernels[i].name, name) == 0)
            return &k->kernels[i];
    return NULL;
}
