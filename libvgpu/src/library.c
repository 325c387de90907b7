/*
 * The library API (cuLibraryLoadData and friends), how cudart 12+ loads the fatbins compiled into
 * a program. A library belongs to no context: libvgpu keeps a copy of the image and loads it as a
 * module (module.c) in the current context when a module or function is first asked for, and
 * again when another context is current or that one went away. A CUkernel names a kernel of the
 * library; its CUfunction is the module's, and cuLaunchKernel accepts the CUkernel itself (cudart
 * launches that way). A kernel's name is checked against the module's kernel table when a context
 * is current (cudart's case), else when its function is first asked for.
 */
#include "vgpu.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

struct CUlib_st {
    struct vgpu_object obj;
    void *image;
    size_t size;
    pthread_mutex_t load_lock; /* one load at a time; taken before the channel's lock */
    CUmodule module;           /* the image loaded as a module, or NULL; vgpu_lock */
    struct CUkern_st **handles;
    size_t nhandles, cap;
};

struct CUkern_st {
    struct vgpu_object obj;
    struct CUlib_st *library;
    char *name;
};

static void free_library(struct vgpu_object *obj)
{
    struct CUlib_st *l = (struct CUlib_st *)obj;
    pthread_mutex_destroy(&l->load_lock);
    free(l->handles);
    free(l->image);
    free(l);
}

static void free_kernel(struct vgpu_object *obj)
{
    struct CUkern_st *k = (struct CUkern_st *)obj;
    free(k->name);
    free(k);
}

/* Options (JIT and library) only tune how the real driver loads: accepted and not needed. */
VGPU_API CUresult CUDAAPI cuLibraryLoadData(CUlibrary *library, const void *code,
                                            CUjit_option *jitOptions, void **jitOptionsValues,
                                            unsigned int numJitOptions,
                                            CUlibraryOption *libraryOptions,
                                            void **libraryOptionValues,
                                            unsigned int numLibraryOptions)
{
    char why[160];
    struct CUlib_st *l;
    CUresult r = vgpu_require_init();

    (void)jitOptions, (void)jitOptionsValues, (void)numJitOptions;
    (void)libraryOptions, (void)libraryOptionValues, (void)numLibraryOptions;
    if (r)
        return r;
    if (!library || !code)
        return CUDA_ERROR_INVALID_VALUE;
    code = vgpu_image_unwrap(code);
    l = calloc(1, sizeof(*l));
    if (!l)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_init(&l->load_lock, NULL);
    l->obj = (struct vgpu_object){VGPU_KIND_LIBRARY, 0, NULL, free_library};
    if (vgpu_image_size(code, &l->size, why, sizeof(why))) {
        vgpu_log("cuLibraryLoadData: %s", why);
        free_library(&l->obj);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    l->image = malloc(l->size);
    if (!l->image) {
        free_library(&l->obj);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memcpy(l->image, code, l->size);
    vgpu_lock();
    if (vgpu_objects_add(&l->obj))
        r = CUDA_ERROR_OUT_OF_MEMORY;
    vgpu_unlock();
    if (r) {
        free_library(&l->obj);
        return r;
    }
    *library = l;
    return CUDA_SUCCESS;
}

/* The library's module in the current context, loaded now if it has none there. */
static CUresult library_module(CUlibrary library, CUmodule *out)
{
    struct CUlib_st *l;
    struct vgpu_object *m;
    CUcontext ctx;
    CUmodule loaded;
    CUresult r = vgpu_current_context(&ctx, NULL);

    if (r)
        return r;
    vgpu_lock();
    l = (struct CUlib_st *)vgpu_objects_find(library, VGPU_KIND_LIBRARY);
    vgpu_unlock();
    if (!l)
        return CUDA_ERROR_INVALID_HANDLE;
    /* cuLibraryUnload while this runs is the caller's race, as with the real driver. */
    pthread_mutex_lock(&l->load_lock);
    vgpu_lock();
    m = l->module ? vgpu_objects_find(l->module, VGPU_KIND_MODULE) : NULL;
    vgpu_unlock();
    if (m && m->ctx == ctx) {
        *out = l->module;
    } else {
        /* A module loaded in another context stays there until that context goes. */
        r = cuModuleLoadData(&loaded, l->image);
        if (!r) {
            vgpu_lock();
            l->module = loaded;
            vgpu_unlock();
            *out = loaded;
        }
    }
    pthread_mutex_unlock(&l->load_lock);
    return r;
}

VGPU_API CUresult CUDAAPI cuLibraryGetModule(CUmodule *pMod, CUlibrary library)
{
    if (!pMod)
        return CUDA_ERROR_INVALID_VALUE;
    return library_module(library, pMod);
}

/* The kernel handle for name in l, made on first use; vgpu_lock held. NULL: out of memory. */
static struct CUkern_st *kernel_handle(struct CUlib_st *l, const char *name)
{
    struct CUkern_st *k;

    for (size_t i = 0; i < l->nhandles; i++)
        if (strcmp(l->handles[i]->name, name) == 0)
            return l->handles[i];
    k = calloc(1, sizeof(*k));
    if (!k || !(k->name = strdup(name)))
        goto fail;
    k->obj = (struct vgpu_object){VGPU_KIND_KERNEL, 0, NULL, free_kernel};
    k->library = l;
    if (l->nhandles == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 8;
        struct CUkern_st **grown = realloc(l->handles, cap * sizeof(*grown));
        if (!grown)
            goto fail;
        l->handles = grown;
        l->cap = cap;
    }
    if (vgpu_objects_add(&k->obj))
        goto fail;
    l->handles[l->nhandles++] = k;
    return k;
fail:
    if (k)
        free(k->name);
    free(k);
    return NULL;
}

/* The variable in the library's module in the current context (loaded now if need be). */
VGPU_API CUresult CUDAAPI cuLibraryGetGlobal(CUdeviceptr *dptr, size_t *bytes, CUlibrary library,
                                             const char *name)
{
    CUmodule module;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!name || (!dptr && !bytes))
        return CUDA_ERROR_INVALID_VALUE;
    r = library_module(library, &module);
    return r ? r : cuModuleGetGlobal_v2(dptr, bytes, module, name);
}

VGPU_API CUresult CUDAAPI cuLibraryGetKernel(CUkernel *pKernel, CUlibrary library,
                                             const char *name)
{
    struct CUlib_st *l;
    struct CUkern_st *k = NULL;
    CUcontext ctx;
    CUmodule module;
    CUfunction function;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!pKernel || !name)
        return CUDA_ERROR_INVALID_VALUE;
    if (!vgpu_current_context(&ctx, NULL)) {
        /* The library's module in this context has the kernel table that says. */
        r = library_module(library, &module);
        if (!r)
            r = cuModuleGetFunction(&function, module, name);
        if (r)
            return r;
    }
    vgpu_lock();
    l = (struct CUlib_st *)vgpu_objects_find(library, VGPU_KIND_LIBRARY);
    if (!l)
        r = CUDA_ERROR_INVALID_HANDLE;
    else if (!(k = kernel_handle(l, name)))
        r = CUDA_ERROR_OUT_OF_MEMORY;
    vgpu_unlock();
    if (!r)
        *pKernel = (CUkernel)k;
    return r;
}

VGPU_API CUresult CUDAAPI cuKernelGetFunction(CUfunction *pFunc, CUkernel kernel)
{
    struct CUkern_st *k;
    CUlibrary library = NULL;
    char *name = NULL;
    CUmodule module;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!pFunc)
        return CUDA_ERROR_INVALID_VALUE;
    vgpu_lock();
    k = (struct CUkern_st *)vgpu_objects_find(kernel, VGPU_KIND_KERNEL);
    if (k) {
        library = k->library;
        name = strdup(k->name);
    }
    vgpu_unlock();
    if (!k)
        return CUDA_ERROR_INVALID_HANDLE;
    if (!name)
        return CUDA_ERROR_OUT_OF_MEMORY;
    r = library_module(library, &module);
    if (!r)
        r = cuModuleGetFunction(pFunc, module, name);
    free(name);
    return r;
}

/* cuKernelGet/SetAttribute's checks: the library initialised, dev valid, kernel a live
 * CUkernel. */
static CUresult check_kernel_attribute(CUkernel kernel, CUdevice dev)
{
    int live;
    CUresult r = vgpu_require_init();

    if (!r)
        r = vgpu_device_check(dev);
    if (r)
        return r;
    vgpu_lock();
    live = vgpu_objects_find(kernel, VGPU_KIND_KERNEL) != NULL;
    vgpu_unlock();
    return live ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

CUresult vgpu_kernel_function(CUfunction *f)
{
    struct vgpu_object *k;

    vgpu_lock();
    k = vgpu_objects_find(*f, VGPU_KIND_KERNEL);
    vgpu_unlock();
    return k ? cuKernelGetFunction(f, (CUkernel)k) : CUDA_SUCCESS;
}

/* A kernel's attributes are its function's in the current context (cudart 13 asks this way). */
VGPU_API CUresult CUDAAPI cuKernelGetAttribute(int *pi, CUfunction_attribute attrib,
                                               CUkernel kernel, CUdevice dev)
{
    CUresult r = check_kernel_attribute(kernel, dev);

    return r ? r : cuFuncGetAttribute(pi, attrib, (CUfunction)kernel);
}

VGPU_API CUresult CUDAAPI cuKernelSetAttribute(CUfunction_attribute attrib, int val,
                                               CUkernel kernel, CUdevice dev)
{
    CUresult r = check_kernel_attribute(kernel, dev);

    return r ? r : cuFuncSetAttribute((CUfunction)kernel, attrib, val);
}

VGPU_API CUresult CUDAAPI cuLibraryUnload(CUlibrary library)
{
    struct CUlib_st *l;
    CUmodule module = NULL;
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    vgpu_lock();
    l = (struct CUlib_st *)vgpu_objects_find(library, VGPU_KIND_LIBRARY);
    if (l) {
        vgpu_objects_remove(&l->obj);
        for (size_t i = 0; i < l->nhandles; i++)
            vgpu_objects_remove(&l->handles[i]->obj);
        module = l->module;
    }
    vgpu_unlock();
    if (!l)
        return CUDA_ERROR_INVALID_HANDLE;
    if (module)
        (void)cuModuleUnload(module); /* already gone with its context: nothing to unload */
    for (size_t i = 0; i < l->nhandles; i++)
        free_kernel(&l->handles[i]->obj);
    free_library(&l->obj);
    return CUDA_SUCCESS;
}

/* Libraries are loaded as modules when first used, as the driver's lazy loading (its default
 * since CUDA 12.2) loads functions: cudart asks at start-up. */
VGPU_API CUresult CUDAAPI cuModuleGetLoadingMode(CUmoduleLoadingMode *mode)
{
    CUresult r = vgpu_require_init();

    if (r)
        return r;
    if (!mode)
        return CUDA_ERROR_INVALID_VALUE;
    *mode = CU_MODULE_LAZY_LOADING;
    return CUDA_SUCCESS;
}
