/*
 * Devices: a snapshot of everything static about the zone's GPU (count, name, UUID, memory,
 * every attribute) taken once, at cuInit, in two pipelined batches. Device queries are then
 * answered locally: frameworks ask for dozens of attributes at start-up, and none of them changes
 * while the process runs. The snapshot outlives a fork: the child sees the same GPU.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <stdlib.h>
#include <string.h>

struct device {
    char name[VGPU_MAX_cuDeviceGetName_name];
    CUuuid uuid;
    size_t total_mem;
    int attrs[CU_DEVICE_ATTRIBUTE_MAX];
    unsigned char has_attr[CU_DEVICE_ATTRIBUTE_MAX]; /* gpu-proxy answers every attribute it knows */
};

static struct {
    int count;
    struct device dev[VGPU_MAX_DEVICES];
} snap; /* written once by cuInit, before it reports success; read-only afterwards */

/* Calls answered per device: name, UUID, total memory, then attributes 1 .. MAX - 1. */
#define PER_DEVICE (3 + CU_DEVICE_ATTRIBUTE_MAX - 1)

/* The requests are a few fixed-size fields: marshalling them into 32 bytes cannot fail. */
static void add(struct vgpu_batch_call *c, uint32_t opcode, int len)
{
    c->opcode = opcode;
    c->req_len = (uint32_t)len;
}

static CUresult count_devices(int *count)
{
    struct vgpu_batch_call calls[2] = {{0}};
    CUresult r;

    add(&calls[0], VGPU_OP_cuInit, vgpu_marshal_cuInit(calls[0].req, sizeof(calls[0].req), 0));
    add(&calls[1], VGPU_OP_cuDeviceGetCount,
        vgpu_marshal_cuDeviceGetCount(calls[1].req, sizeof(calls[1].req)));
    r = vgpu_call_batch(calls, 2);
    if (r)
        return r;
    for (int i = 0; i < 2; i++)
        if (calls[i].status)
            return calls[i].status;
    if (vgpu_unmarshal_cuDeviceGetCount_reply(calls[1].rep, calls[1].rep_len, count) < 0)
        return CUDA_ERROR_UNKNOWN;
    return CUDA_SUCCESS;
}

static CUresult describe(int dev, struct vgpu_batch_call *calls, struct device *out)
{
    struct vgpu_batch_call *c = calls;
    size_t name_len;
    CUresult r;

    add(c, VGPU_OP_cuDeviceGetName,
        vgpu_marshal_cuDeviceGetName(c->req, sizeof(c->req), (int)sizeof(out->name), dev));
    c++;
    add(c, VGPU_OP_cuDeviceGetUuid_v2, vgpu_marshal_cuDeviceGetUuid_v2(c->req, sizeof(c->req), dev));
    c++;
    add(c, VGPU_OP_cuDeviceTotalMem_v2,
        vgpu_marshal_cuDeviceTotalMem_v2(c->req, sizeof(c->req), dev));
    c++;
    for (int a = 1; a < CU_DEVICE_ATTRIBUTE_MAX; a++, c++)
        add(c, VGPU_OP_cuDeviceGetAttribute,
            vgpu_marshal_cuDeviceGetAttribute(c->req, sizeof(c->req), a, dev));
    r = vgpu_call_batch(calls, PER_DEVICE);
    if (r)
        return r;
    for (int i = 0; i < 3; i++)
        if (calls[i].status)
            return calls[i].status;
    if (vgpu_unmarshal_cuDeviceGetName_reply(calls[0].rep, calls[0].rep_len, out->name,
                                             sizeof(out->name), &name_len) < 0 ||
        vgpu_unmarshal_cuDeviceGetUuid_v2_reply(calls[1].rep, calls[1].rep_len, out->uuid.bytes) <
            0 ||
        vgpu_unmarshal_cuDeviceTotalMem_v2_reply(calls[2].rep, calls[2].rep_len,
                                                 &out->total_mem) < 0)
        return CUDA_ERROR_UNKNOWN;
    out->name[name_len < sizeof(out->name) ? name_len : sizeof(out->name) - 1] = '\0';
    for (int a = 1; a < CU_DEVICE_ATTRIBUTE_MAX; a++) {
        struct vgpu_batch_call *ac = &calls[3 + a - 1];
        /* An attribute gpu-proxy does not know stays unknown: cuDeviceGetAttribute refuses it. */
        out->has_attr[a] = ac->status == CUDA_SUCCESS &&
                           vgpu_unmarshal_cuDeviceGetAttribute_reply(ac->rep, ac->rep_len,
                                                                     &out->attrs[a]) == 0;
    }
    return CUDA_SUCCESS;
}

CUresult vgpu_device_snapshot(void)
{
    struct vgpu_batch_call *calls;
    int count;
    CUresult r = count_devices(&count);

    if (r)
        return r;
    if (count > VGPU_MAX_DEVICES)
        count = VGPU_MAX_DEVICES;
    calls = calloc(PER_DEVICE, sizeof(*calls));
    if (!calls)
        return CUDA_ERROR_OUT_OF_MEMORY;
    for (int dev = 0; dev < count && !r; dev++) {
        memset(calls, 0, PER_DEVICE * sizeof(*calls));
        r = describe(dev, calls, &snap.dev[dev]);
    }
    free(calls);
    if (!r)
        snap.count = count;
    return r;
}

CUresult vgpu_device_check(CUdevice dev)
{
    CUresult r = vgpu_require_init();
    if (r)
        return r;
    return dev >= 0 && dev < snap.count ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

int vgpu_device_arch(CUdevice dev)
{
    const struct device *d;

    if (vgpu_device_check(dev))
        return 0;
    d = &snap.dev[dev];
    if (!d->has_attr[CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR] ||
        !d->has_attr[CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR])
        return 0;
    return d->attrs[CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR] * 10 +
           d->attrs[CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR];
}

VGPU_API CUresult CUDAAPI cuDeviceGetCount(int *count)
{
    CUresult r = vgpu_require_init();
    if (r)
        return r;
    if (!count)
        return CUDA_ERROR_INVALID_VALUE;
    *count = snap.count;
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal)
{
    CUresult r = vgpu_device_check(ordinal);
    if (r)
        return r;
    if (!device)
        return CUDA_ERROR_INVALID_VALUE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuDeviceGetName(char *name, int len, CUdevice dev)
{
    CUresult r = vgpu_device_check(dev);
    size_t n;

    if (r)
        return r;
    if (!name || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    n = strlen(snap.dev[dev].name);
    if (n > (size_t)len - 1)
        n = (size_t)len - 1;
    memcpy(name, snap.dev[dev].name, n);
    name[n] = '\0';
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev)
{
    CUresult r = vgpu_device_check(dev);
    if (r)
        return r;
    if (!uuid)
        return CUDA_ERROR_INVALID_VALUE;
    *uuid = snap.dev[dev].uuid;
    return CUDA_SUCCESS;
}

/* The same UUID: the versions differ only for MIG instances, which a zone never sees. */
CUresult CUDAAPI cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) VGPU_ALIAS(cuDeviceGetUuid_v2);

/* gpu-proxy answers with the zone's memory quota, never more than the physical device. */
VGPU_API CUresult CUDAAPI cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    CUresult r = vgpu_device_check(dev);
    if (r)
        return r;
    if (!bytes)
        return CUDA_ERROR_INVALID_VALUE;
    *bytes = snap.dev[dev].total_mem;
    return CUDA_SUCCESS;
}

VGPU_API CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
{
    CUresult r = vgpu_device_check(dev);
    if (r)
        return r;
    if (!pi || attrib <= 0 || attrib >= CU_DEVICE_ATTRIBUTE_MAX || !snap.dev[dev].has_attr[attrib])
        return CUDA_ERROR_INVALID_VALUE;
    *pi = snap.dev[dev].attrs[attrib];
    return CUDA_SUCCESS;
}
