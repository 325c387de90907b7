/*
 * Modules and their functions. gpu-proxy loads the image in the zone's context: first asked by
 * the image's SHA-256 (vgpuModuleLoadCached: the zone sent it before, as every process of a
 * program does), else sent whole. libvgpu then keeps the module's kernel table (kernel_table.c),
 * because cuLaunchKernel's kernelParams carry no sizes. A function handle is looked up once per
 * name and module, as the real driver returns the same CUfunction for the same kernel.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct CUmod_st {
    struct vgpu_object obj;
    struct vgpu_kernels kernels;
    struct CUfunc_st **functions; /* looked up so far; owned by the object table */
    size_t nfunctions, cap;
};

struct CUfunc_st {
    struct vgpu_object obj;
    struct CUmod_st *module;
    const struct vgpu_kernel *kernel; /* in the module's table */
    char *name;
    int max_dynamic_shared; /* cuFuncSetAttribute's, or -1: the default */
    int carveout;           /* CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, -1: none */
};

static void free_module(struct vgpu_object *obj)
{
    struct CUmod_st *m = (struct CUmod_st *)obj;
    vgpu_kernels_free(&m->kernels);
    free(m->functions);
    free(m);
}

static void free_function(struct vgpu_object *obj)
{
    struct CUfunc_st *f = (struct CUfunc_st *)obj;
    free(f->name);
    free(f);
}

static struct CUmod_st *live_module(CUmodule hmod)
{
    return (struct CUmod_st *)vgpu_objects_find(hmod, VGPU_KIND_MODULE);
}

CUresult vgpu_function_find(CUfunction f, uint64_t *id, const struct vgpu_kernel **kernel)
{
    struct CUfunc_st *fn = (struct CUfunc_st *)vgpu_objects_find(f, VGPU_KIND_FUNCTION);

    if (!fn)
        return CUDA_ERROR_INVALID_HANDLE;
    *id = fn->obj.id;
    *kernel = fn->kernel;
    return CUDA_SUCCESS;
}

static void unload_remote(uint64_t id)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct iovec iov = {req, (size_t)vgpu_marshal_cuModuleUnload(req, sizeof(req), id)};
    (void)vgpu_call(VGPU_OP_cuModuleUnload, &iov, 1, rep, sizeof(rep), &len);
}

/* The module id gpu-proxy gives the image: loaded by digest if this zone sent it before, else
 * sent. */
static CUresult load_remote(const void *image, size_t size, uint64_t *id)
{
    uint8_t head[VGPU_HEAD_MAX], rep[8], digest[VGPU_SHA256_BYTES], req[4 + VGPU_SHA256_BYTES];
    size_t len;
    struct iovec iov[2];
    CUresult r;

    vgpu_sha256(image, size, digest);
    iov[0] = (struct iovec){req, (size_t)vgpu_marshal_vgpuModuleLoadCached(req, sizeof(req),
                                                                           digest)};
    r = vgpu_call(VGPU_OP_vgpuModuleLoadCached, iov, 1, rep, sizeof(rep), &len);
    if (!r)
        return vgpu_unmarshal_vgpuModuleLoadCached_reply(rep, len, id) < 0 ? CUDA_ERROR_UNKNOWN
                                                                           : CUDA_SUCCESS;
    if (r != CUDA_ERROR_NOT_FOUND)
        return r;
    iov[0] = (struct iovec){head, vgpu_head_cuModuleLoadData(head, size)};
    iov[1] = (struct iovec){(void *)image, size};
    r = vgpu_call(VGPU_OP_cuModuleLoadData, iov, 2, rep, sizeof(rep), &len);
    if (!r && vgpu_unmarshal_cuModuleLoadData_reply(rep, len, id) < 0)
        r = CUDA_ERROR_UNKNOWN;
    return r;
}

VGPU_API CUresult CUDAAPI cuModuleLoadData(CUmodule *module, const void *image)
{
    char why[160];
    size_t size;
    uint64_t id;
    CUcontext ctx;
    struct CUmod_st *m;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    if (!module || !image)
        return CUDA_ERROR_INVALID_VALUE;
    if (vgpu_image_size(image, &size, why, sizeof(why))) {
        vgpu_log("cuModuleLoadData: %s", why);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    m = calloc(1, sizeof(*m));
    if (!m)
        return CUDA_ERROR_OUT_OF_MEMORY;
    r = load_remote(image, size, &id);
    if (r) {
        free(m);
        return r;
    }
    m->obj = (struct vgpu_object){VGPU_KIND_MODULE, id, ctx, free_module};
    r = vgpu_kernels_fetch(id, &m->kernels);
    if (!r) {
        vgpu_lock();
        if (vgpu_objects_add(&m->obj))
            r = CUDA_ERROR_OUT_OF_MEMORY;
        vgpu_unlock();
    }
    if (r) {
        unload_remote(id);
        free_module(&m->obj);
        return r;
    }
    *module = m;
    return CUDA_SUCCESS;
}

/* The fatbin (or the wrapper nvcc embeds around it) is passed as is; gpu-proxy picks the entry
 * for its GPU. */
VGPU_API CUresult CUDAAPI cuModuleLoadFatBinary(CUmodule *module, const void *fatCubin)
{
    return cuModuleLoadData(module, vgpu_image_unwrap(fatCubin));
}

VGPU_API CUresult CUDAAPI cuModuleLoad(CUmodule *module, const char *fname)
{
    FILE *f;
    char *image = NULL;
    long size;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!fname)
        return CUDA_ERROR_INVALID_VALUE;
    f = fopen(fname, "rb");
    if (!f)
        return CUDA_ERROR_FILE_NOT_FOUND;
    if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (image = malloc((size_t)size + 1)) && fread(image, 1, (size_t)size, f) == (size_t)size) {
        image[size] = '\0'; /* a PTX file has no terminator of its own */
        r = cuModuleLoadData(module, image);
    } else {
        r = image ? CUDA_ERROR_FILE_NOT_FOUND : CUDA_ERROR_OUT_OF_MEMORY;
    }
    free(image);
    fclose(f);
    return r;
}

VGPU_API CUresult CUDAAPI cuModuleUnload(CUmodule hmod)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct CUmod_st *m;
    struct iovec iov = {req, 0};
    uint64_t id = 0;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    vgpu_lock();
    m = live_module(hmod);
    if (m)
        id = m->obj.id;
    vgpu_unlock();
    if (!m)
        return CUDA_ERROR_INVALID_HANDLE;
    iov.iov_len = (size_t)vgpu_marshal_cuModuleUnload(req, sizeof(req), id);
    r = vgpu_call(VGPU_OP_cuModuleUnload, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    /* Whoever takes it out of the table frees it (and its functions, which go with it). */
    vgpu_lock();
    m = live_module(hmod);
    if (m) {
        vgpu_objects_remove(&m->obj);
        for (size_t i = 0; i < m->nfunctions; i++)
            vgpu_objects_remove(&m->functions[i]->obj);
        vgpu_allocations_remove_module(m);
    }
    vgpu_unlock();
    if (m) {
        for (size_t i = 0; i < m->nfunctions; i++)
            free_function(&m->functions[i]->obj);
        free_module(&m->obj);
    }
    return CUDA_SUCCESS;
}

/* The function object for `name` in m, or NULL. vgpu_lock held. */
static struct CUfunc_st *known_function(const struct CUmod_st *m, const char *name)
{
    for (size_t i = 0; i < m->nfunctions; i++)
        if (strcmp(m->functions[i]->name, name) == 0)
            return m->functions[i];
    return NULL;
}

/* Record a function gpu-proxy found in m (kernel: its table entry); vgpu_lock held. NULL when
 * out of memory. */
static struct CUfunc_st *add_function(struct CUmod_st *m, uint64_t id, const char *name,
                                      const struct vgpu_kernel *kernel)
{
    struct CUfunc_st *f = calloc(1, sizeof(*f));

    if (!f || !(f->name = strdup(name)))
        goto fail;
    f->obj = (struct vgpu_object){VGPU_KIND_FUNCTION, id, m->obj.ctx, free_function};
    f->module = m;
    f->max_dynamic_shared = -1;
    f->carveout = -1;
    f->kernel = kernel;
    if (m->nfunctions == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 8;
        struct CUfunc_st **grown = realloc(m->functions, cap * sizeof(*grown));
        if (!grown)
            goto fail;
        m->functions = grown;
        m->cap = cap;
    }
    if (vgpu_objects_add(&f->obj))
        goto fail;
    m->functions[m->nfunctions++] = f;
    return f;
fail:
    if (f)
        free(f->name);
    free(f);
    return NULL;
}

VGPU_API CUresult CUDAAPI cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name)
{
    uint8_t req[8 + 4 + VGPU_MAX_cuModuleGetFunction_name], rep[8];
    size_t len;
    uint64_t module_id = 0, id;
    struct CUmod_st *m;
    struct CUfunc_st *f;
    const struct vgpu_kernel *kernel = NULL;
    struct iovec iov = {req, 0};
    int n;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!hfunc || !name)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    m = live_module(hmod);
    f = m ? known_function(m, name) : NULL;
    if (m) {
        module_id = m->obj.id;
        kernel = vgpu_kernels_find(&m->kernels, name);
    }
    vgpu_unlock();
    if (!m)
        return CUDA_ERROR_INVALID_HANDLE;
    if (f) {
        *hfunc = f;
        return CUDA_SUCCESS;
    }
    if (!kernel)
        return CUDA_ERROR_NOT_FOUND; /* not in the module's kernel table */
    n = vgpu_marshal_cuModuleGetFunction(req, sizeof(req), module_id, name);
    if (n < 0)
        return CUDA_ERROR_NOT_FOUND; /* longer than any kernel name gpu-proxy accepts */
    iov.iov_len = (size_t)n;
    r = vgpu_call(VGPU_OP_cuModuleGetFunction, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    if (vgpu_unmarshal_cuModuleGetFunction_reply(rep, len, &id) < 0)
        return CUDA_ERROR_UNKNOWN;
    vgpu_lock();
    m = live_module(hmod);
    if (!m)
        r = CUDA_ERROR_INVALID_HANDLE; /* unloaded meanwhile, and its functions with it */
    else if (!(f = known_function(m, name)) && !(f = add_function(m, id, name, kernel)))
        r = CUDA_ERROR_OUT_OF_MEMORY;
    vgpu_unlock();
    if (!r)
        *hfunc = f;
    return r;
}

/* A __device__/__constant__ variable: its address and size come from gpu-proxy, which allocated
 * it with the module (and charged it to the zone). The range is then recorded as the module's, so
 * copies to it are checked like any allocation's and cuMemFree refuses it. */
VGPU_API CUresult CUDAAPI cuModuleGetGlobal_v2(CUdeviceptr *dptr, size_t *bytes, CUmodule hmod,
                                               const char *name)
{
    uint8_t req[8 + 4 + VGPU_MAX_cuModuleGetGlobal_v2_name], rep[16];
    size_t len, size;
    uint64_t module_id = 0;
    CUdeviceptr ptr;
    CUcontext ctx = NULL;
    CUdevice dev = 0;
    struct CUmod_st *m;
    struct iovec iov = {req, 0};
    int n;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!name || (!dptr && !bytes))
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    m = live_module(hmod);
    if (m) {
        module_id = m->obj.id;
        ctx = m->obj.ctx;
    }
    vgpu_unlock();
    if (!m)
        return CUDA_ERROR_INVALID_HANDLE;
    r = vgpu_context_or_current(ctx, &dev);
    if (r)
        return r;
    n = vgpu_marshal_cuModuleGetGlobal_v2(req, sizeof(req), module_id, name);
    if (n < 0)
        return CUDA_ERROR_NOT_FOUND; /* longer than any name gpu-proxy accepts */
    iov.iov_len = (size_t)n;
    r = vgpu_call(VGPU_OP_cuModuleGetGlobal_v2, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    if (vgpu_unmarshal_cuModuleGetGlobal_v2_reply(rep, len, &ptr, &size) < 0)
        return CUDA_ERROR_UNKNOWN;
    vgpu_lock();
    if (!live_module(hmod)) {
        r = CUDA_ERROR_INVALID_HANDLE; /* unloaded meanwhile, and its variables with it */
    } else {
        const struct vgpu_allocation *a = vgpu_allocations_find(ptr);
        if (!(a && a->base == ptr && a->module == m) &&
            vgpu_allocations_add(ptr, size, ctx, dev, m))
            r = CUDA_ERROR_OUT_OF_MEMORY;
    }
    vgpu_unlock();
    if (r)
        return r;
    if (dptr)
        *dptr = ptr;
    if (bytes)
        *bytes = size;
    return CUDA_SUCCESS;
}

/* A device attribute from the snapshot (never fails once a function exists). */
static int device_attribute(CUdevice_attribute attrib, CUdevice dev)
{
    int value = 0;
    (void)cuDeviceGetAttribute(&value, attrib, dev);
    return value;
}

CUresult vgpu_function_attributes(CUfunction f, struct vgpu_function_info *out)
{
    struct CUfunc_st *fn;
    CUdevice dev = 0;
    int regs_per_block, per_warp;
    CUresult r = vgpu_context_or_current(NULL, &dev);

    if (r)
        return r;
    r = vgpu_kernel_function(&f);
    if (r)
        return r;
    vgpu_lock();
    fn = (struct CUfunc_st *)vgpu_objects_find(f, VGPU_KIND_FUNCTION);
    if (fn) {
        out->attrs = fn->kernel->attrs;
        out->max_dynamic_shared = fn->max_dynamic_shared;
        out->carveout = fn->carveout;
    }
    vgpu_unlock();
    if (!fn)
        return CUDA_ERROR_INVALID_HANDLE;
    out->device = dev;
    if (!out->attrs.arch)
        out->attrs.arch = (uint32_t)vgpu_device_arch(dev);
    /* Threads per block: the launch bounds, the device's limit, and the registers a block of
     * that many threads needs (allocated per warp in units of 256). */
    out->max_threads = (uint32_t)device_attribute(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, dev);
    if (out->attrs.max_threads && out->attrs.max_threads < out->max_threads)
        out->max_threads = out->attrs.max_threads;
    regs_per_block = device_attribute(CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK, dev);
    per_warp = (int)((out->attrs.num_regs * 32 + 255) / 256 * 256);
    if (per_warp && (uint32_t)(regs_per_block / per_warp) * 32 < out->max_threads)
        out->max_threads = (uint32_t)(regs_per_block / per_warp) * 32;
    if (out->max_dynamic_shared < 0) {
        int per_block = device_attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK, dev);
        out->max_dynamic_shared = per_block > (int)out->attrs.shared_static
                                      ? per_block - (int)out->attrs.shared_static
                                      : 0;
    }
    return CUDA_SUCCESS;
}

/* Answered from the module's kernel table (a cubin's registers, shared, constant and local
 * memory, launch bounds) and the device snapshot: no call to gpu-proxy. */
VGPU_API CUresult CUDAAPI cuFuncGetAttribute(int *pi, CUfunction_attribute attrib,
                                             CUfunction hfunc)
{
    struct vgpu_function_info f;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!pi)
        return CUDA_ERROR_INVALID_VALUE;
    r = vgpu_function_attributes(hfunc, &f);
    if (r)
        return r;
    switch (attrib) {
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK:
        *pi = (int)f.max_threads;
        break;
    case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES:
        *pi = (int)f.attrs.shared_static;
        break;
    case CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES:
        *pi = (int)f.attrs.const_bytes;
        break;
    case CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES:
        *pi = (int)f.attrs.local_bytes;
        break;
    case CU_FUNC_ATTRIBUTE_NUM_REGS:
        *pi = (int)f.attrs.num_regs;
        break;
    case CU_FUNC_ATTRIBUTE_PTX_VERSION:
    case CU_FUNC_ATTRIBUTE_BINARY_VERSION:
        *pi = (int)f.attrs.arch;
        break;
    case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES:
        *pi = f.max_dynamic_shared;
        break;
    case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT:
        *pi = f.carveout;
        break;
    case CU_FUNC_ATTRIBUTE_CACHE_MODE_CA:
    case CU_FUNC_ATTRIBUTE_CLUSTER_SIZE_MUST_BE_SET:
    case CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH:
    case CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_HEIGHT:
    case CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_DEPTH:
    case CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED:
    case CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE:
        *pi = 0; /* no cluster requirements: libvgpu launches no clusters */
        break;
    default:
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

/* The dynamic shared memory limit goes to gpu-proxy (it checks launches against it); the
 * carveout is a preference kept here. Cluster attributes are refused: libvgpu launches no
 * clusters. */
VGPU_API CUresult CUDAAPI cuFuncSetAttribute(CUfunction hfunc, CUfunction_attribute attrib,
                                             int value)
{
    uint8_t req[24], rep[8];
    size_t len;
    uint64_t id;
    const struct vgpu_kernel *kernel;
    struct vgpu_function_info f;
    struct CUfunc_st *fn;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    r = vgpu_kernel_function(&hfunc);
    if (!r)
        r = vgpu_function_attributes(hfunc, &f);
    if (r)
        return r;
    switch (attrib) {
    case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: {
        int optin = device_attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                                     f.device);
        if (value < 0 || value > optin - (int)f.attrs.shared_static)
            return CUDA_ERROR_INVALID_VALUE;
        vgpu_lock();
        r = vgpu_function_find(hfunc, &id, &kernel);
        vgpu_unlock();
        if (r)
            return r;
        iov.iov_len =
            (size_t)vgpu_marshal_cuFuncSetAttribute(req, sizeof(req), id, (int)attrib, value);
        r = vgpu_call(VGPU_OP_cuFuncSetAttribute, &iov, 1, rep, sizeof(rep), &len);
        break;
    }
    case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT:
        if (value < -1 || value > 100)
            return CUDA_ERROR_INVALID_VALUE;
        break;
    case CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH:
    case CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_HEIGHT:
    case CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_DEPTH:
    case CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED:
    case CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE:
        return CUDA_ERROR_NOT_SUPPORTED;
    default:
        return CUDA_ERROR_INVALID_VALUE; /* read-only */
    }
    if (r)
        return r;
    vgpu_lock();
    fn = (struct CUfunc_st *)vgpu_objects_find(hfunc, VGPU_KIND_FUNCTION);
    if (fn && attrib == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        fn->max_dynamic_shared = value;
    else if (fn)
        fn->carveout = value;
    vgpu_unlock();
    return fn ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

/* Answered from the module's kernel table (CUDA 12.4+). */
VGPU_API CUresult CUDAAPI cuFuncGetParamInfo(CUfunction func, size_t paramIndex,
                                             size_t *paramOffset, size_t *paramSize)
{
    uint64_t id;
    const struct vgpu_kernel *kernel;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    vgpu_lock();
    r = vgpu_function_find(func, &id, &kernel);
    if (!r && paramIndex >= kernel->nparams)
        r = CUDA_ERROR_INVALID_VALUE;
    else if (!r) {
        if (paramOffset)
            *paramOffset = kernel->params[paramIndex].offset;
        if (paramSize)
            *paramSize = kernel->params[paramIndex].size;
    }
    vgpu_unlock();
    return r;
}
