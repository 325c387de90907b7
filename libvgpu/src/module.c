/*
 * Modules and their functions. The image goes to gpu-proxy, which loads it in the zone's
 * context; libvgpu keeps the parameter layouts of the code the device will run (module_image.c),
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
    int reported; /* unknown layouts were reported on stderr */
};

struct CUfunc_st {
    struct vgpu_object obj;
    struct CUmod_st *module;
    const struct vgpu_kernel *kernel; /* NULL: layout unknown */
    char *name;
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
    if (!fn->kernel && !fn->module->reported) {
        fn->module->reported = 1;
        vgpu_log("parameter layout of kernel %s unknown (%s): launches with kernelParams are "
                 "refused",
                 fn->name, fn->module->kernels.known ? "not in the image" : fn->module->kernels.why);
    }
    return CUDA_SUCCESS;
}

static void unload_remote(uint64_t id)
{
    uint8_t req[8], rep[8];
    size_t len;
    struct iovec iov = {req, (size_t)vgpu_marshal_cuModuleUnload(req, sizeof(req), id)};
    (void)vgpu_call(VGPU_OP_cuModuleUnload, &iov, 1, rep, sizeof(rep), &len);
}

VGPU_API CUresult CUDAAPI cuModuleLoadData(CUmodule *module, const void *image)
{
    uint8_t head[VGPU_HEAD_MAX], rep[8];
    char why[160];
    size_t size, len;
    uint64_t id;
    CUcontext ctx;
    CUdevice dev;
    struct CUmod_st *m;
    struct iovec iov[2];
    CUresult r = vgpu_current_context(&ctx, &dev);

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
    vgpu_image_kernels(image, size, vgpu_device_arch(dev), &m->kernels);
    iov[0] = (struct iovec){head, vgpu_head_cuModuleLoadData(head, size)};
    iov[1] = (struct iovec){(void *)image, size};
    r = vgpu_call(VGPU_OP_cuModuleLoadData, iov, 2, rep, sizeof(rep), &len);
    if (!r && vgpu_unmarshal_cuModuleLoadData_reply(rep, len, &id) < 0)
        r = CUDA_ERROR_UNKNOWN;
    if (r) {
        free_module(&m->obj);
        return r;
    }
    m->obj = (struct vgpu_object){VGPU_KIND_MODULE, id, ctx, free_module};
    vgpu_lock();
    if (vgpu_objects_add(&m->obj))
        r = CUDA_ERROR_OUT_OF_MEMORY;
    vgpu_unlock();
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

/* Record a function gpu-proxy found in m; vgpu_lock held. NULL when out of memory. */
static struct CUfunc_st *add_function(struct CUmod_st *m, uint64_t id, const char *name)
{
    struct CUfunc_st *f = calloc(1, sizeof(*f));

    if (!f || !(f->name = strdup(name)))
        goto fail;
    f->obj = (struct vgpu_object){VGPU_KIND_FUNCTION, id, m->obj.ctx, free_function};
    f->module = m;
    f->kernel = vgpu_kernels_find(&m->kernels, name);
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
    if (m)
        module_id = m->obj.id;
    vgpu_unlock();
    if (!m)
        return CUDA_ERROR_INVALID_HANDLE;
    if (f) {
        *hfunc = f;
        return CUDA_SUCCESS;
    }
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
    else if (!(f = known_function(m, name)) && !(f = add_function(m, id, name)))
        r = CUDA_ERROR_OUT_OF_MEMORY;
    vgpu_unlock();
    if (!r)
        *hfunc = f;
    return r;
}

VGPU_API CUresult CUDAAPI cuFuncGetAttribute(int *pi, CUfunction_attribute attrib,
                                             CUfunction hfunc)
{
    uint8_t req[16], rep[8];
    size_t len;
    uint64_t id;
    const struct vgpu_kernel *kernel;
    struct iovec iov = {req, 0};
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!pi)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    r = vgpu_function_find(hfunc, &id, &kernel);
    vgpu_unlock();
    if (r)
        return r;
    iov.iov_len = (size_t)vgpu_marshal_cuFuncGetAttribute(req, sizeof(req), attrib, id);
    r = vgpu_call(VGPU_OP_cuFuncGetAttribute, &iov, 1, rep, sizeof(rep), &len);
    if (r)
        return r;
    return vgpu_unmarshal_cuFuncGetAttribute_reply(rep, len, pi) < 0 ? CUDA_ERROR_UNKNOWN
                                                                     : CUDA_SUCCESS;
}

/* Answered from the layout libvgpu read from the image (CUDA 12.4+). */
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
    if (!r && !kernel)
        r = CUDA_ERROR_NOT_SUPPORTED;
    else if (!r && paramIndex >= kernel->nparams)
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
