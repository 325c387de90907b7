/*
 * libvgpu internals. libvgpu is a zone's libcuda.so.1: every CUDA driver API entry point it
 * exports either answers from what the zone already knows (device snapshot, context stack,
 * allocations, error strings) or forwards the call over the IDM channel to gpu-proxy, which runs
 * it in the zone's context on Dom0 (docs/libvgpu.md).
 *
 * Locking: `vgpu_lock` guards every local table (objects, allocations, contexts); the channel
 * has its own lock (channel.c). The channel lock may be taken before the state lock, never
 * after it: no code holds the state lock across a call to gpu-proxy.
 */
#ifndef VGPU_H
#define VGPU_H

/* POSIX and Linux interfaces (memfd, strndup, ...) next to C11. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

/* cuda.h declares every exported name with its true prototype (legacy unversioned names and the
 * _v2/_ptds/_ptsz variants) only for the driver's own build, which is what this is: the compiler
 * then checks each definition below against NVIDIA's prototype. */
#define __CUDA_API_VERSION_INTERNAL 1
#include <cuda.h>

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define VGPU_API __attribute__((visibility("default")))
/* Another exported name for the same function (legacy names, per-thread-stream variants). */
#define VGPU_ALIAS(target) __attribute__((visibility("default"), alias(#target)))

/* Device ordinals a zone can see: gpu-proxy gives each zone one GPU; a few more are tolerated. */
#define VGPU_MAX_DEVICES 8

/* ---- channel.c: the connection to gpu-proxy --------------------------------------------- */

/* One line on stderr, prefixed "libvgpu: " (a refused connection, a lost channel, ...). */
void vgpu_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Connect now if this process has no channel yet (cuInit; the child of a fork connects lazily). */
CUresult vgpu_channel_connect(void);

/* A synchronous call: the request is the concatenation of req[0..n); on CUDA_SUCCESS the reply
 * payload (at most cap bytes) is in rep and its length in *rep_len. Other statuses are gpu-proxy's
 * CUresult (including an earlier fire-and-forget call's error), or the channel's own failure. */
CUresult vgpu_call(uint32_t opcode, const struct iovec *req, int n, void *rep, size_t cap,
                   size_t *rep_len);

/* A fire-and-forget call (the call table's async mode): returns once the request is in the ring. */
CUresult vgpu_call_async(uint32_t opcode, const struct iovec *req, int n);

/* A synchronous call whose reply is one variable blob (u32 length, bytes) of exactly `len`
 * bytes: they are received straight into dst, with no intermediate copy. */
CUresult vgpu_call_blob(uint32_t opcode, const struct iovec *req, int n, void *dst, size_t len);

/* Several small synchronous calls sent back to back and answered in order: one round trip's
 * latency for all of them (the device snapshot). */
struct vgpu_batch_call {
    uint32_t opcode;
    uint32_t req_len;
    uint8_t req[32];
    CUresult status;
    uint32_t rep_len;
    uint8_t rep[264];
};
CUresult vgpu_call_batch(struct vgpu_batch_call *calls, size_t n);

/* The largest payload one message may carry on this channel (the hello's agreed limit). */
size_t vgpu_channel_max_payload(void);
/* Pass a pinned allocation's memfd to gpu-proxy as `arena` (LocalLink only, channel.c). */
CUresult vgpu_channel_share_fd(int fd, uint64_t arena, uint64_t size);
/* Under the grant link: `len` bytes (whole pages) granted to gpu-proxy's domain through the
 * link's gntalloc fd, mapped at *base and shared with gpu-proxy as `arena`
 * (vgpuHostShareGrants); *index is gntalloc's name for them (vgpu_channel_ungrant).
 * CUDA_ERROR_NOT_SUPPORTED on another link, or when no more pages can be granted (said once). */
CUresult vgpu_channel_share_grants(size_t len, uint64_t arena, void **base, uint64_t *index);
/* Unmap granted pages; they are given back once gpu-proxy has unmapped them too. */
void vgpu_channel_ungrant(void *base, size_t len, uint64_t index);

/* ---- pinned.c: pinned host memory ---------------------------------------------------------- */

/* Whether [p, p + n) lies in one pinned allocation shared with gpu-proxy; if so its arena and
 * the offset of p in it. Takes vgpu_lock. */
int vgpu_pinned_shared(const void *p, size_t n, uint64_t *arena, uint64_t *offset);
/* fork child: the parent's arenas belong to the parent's channel (vgpu_lock held). */
void vgpu_pinned_reset(void);

/* fork.c brackets fork() with each lock's holder: prepare takes the lock (so the copy is
 * consistent), the parent releases it, the child resets what it guards and releases it. Lock
 * order: init, channel, state. */
enum vgpu_fork_phase { VGPU_FORK_PREPARE, VGPU_FORK_PARENT, VGPU_FORK_CHILD };
void vgpu_channel_atfork(enum vgpu_fork_phase phase);
void vgpu_init_atfork(enum vgpu_fork_phase phase);

/* ---- init.c ------------------------------------------------------------------------------ */

/* CUDA_SUCCESS once cuInit succeeded in this process, else CUDA_ERROR_NOT_INITIALIZED. */
CUresult vgpu_require_init(void);

/* ---- objects.c: handles the application holds --------------------------------------------- */

enum vgpu_kind {
    VGPU_KIND_CONTEXT = 1,
    VGPU_KIND_MODULE,
    VGPU_KIND_FUNCTION,
    VGPU_KIND_STREAM,
    VGPU_KIND_EVENT,
    VGPU_KIND_LIBRARY, /* no gpu-proxy id: a library lives in libvgpu (library.c) */
    VGPU_KIND_KERNEL,
};

/* First member of every CUDA handle libvgpu hands out (struct CUctx_st, CUmod_st, ...). */
struct vgpu_object {
    enum vgpu_kind kind;
    uint64_t id;                          /* gpu-proxy's handle for it */
    CUcontext ctx;                         /* owner: compared and returned, never dereferenced */
    void (*destroy)(struct vgpu_object *); /* frees the local memory only */
};

void vgpu_lock(void);
void vgpu_unlock(void);

/* All of these need vgpu_lock held. */
int vgpu_objects_add(struct vgpu_object *obj); /* 0, or -1 when out of memory */
void vgpu_objects_remove(struct vgpu_object *obj);
/* The live object behind a handle, or NULL (never created, destroyed, or of another kind). */
struct vgpu_object *vgpu_objects_find(const void *handle, enum vgpu_kind kind);
/* Remove every object ctx owns from the table; returns them (malloc'd array; *n may be 0). */
struct vgpu_object **vgpu_objects_detach_owned(CUcontext ctx, size_t *n);

/* The child of a fork owns none of its parent's GPU objects: forget them all (fork.c). */
void vgpu_objects_reset(void);

/* Remote objects created from a flags argument (remote_object.c): create one and get its id,
 * then register its local wrapper (obj NULL: it could not be allocated). On failure to register,
 * the host's object is destroyed again and CUDA_ERROR_OUT_OF_MEMORY returned. */
typedef int (*vgpu_marshal_flags_fn)(uint8_t *, size_t, unsigned int);
typedef int (*vgpu_unmarshal_id_fn)(const uint8_t *, size_t, uint64_t *);
typedef int (*vgpu_marshal_id_fn)(uint8_t *, size_t, uint64_t);
CUresult vgpu_remote_create(uint32_t opcode, vgpu_marshal_flags_fn marshal,
                            vgpu_unmarshal_id_fn unmarshal, unsigned int flags, uint64_t *id);
CUresult vgpu_remote_adopt(struct vgpu_object *obj, uint64_t id, uint32_t destroy_opcode,
                           vgpu_marshal_id_fn marshal_destroy);

/* ---- allocations.c: device memory this process allocated (vgpu_lock held) ----------------- */

struct vgpu_allocation {
    CUdeviceptr base;
    size_t size;
    CUcontext ctx;
    CUdevice device;
    unsigned long long buffer_id; /* CU_POINTER_ATTRIBUTE_BUFFER_ID: unique per allocation */
    const void *module; /* a module's variable (cuModuleGetGlobal): not freeable; else NULL */
    const void *pool;   /* the memory pool of a cuMemAllocAsync allocation, else NULL */
};

/* module: the CUmodule whose variable this is, or NULL for memory the process allocated. */
int vgpu_allocations_add(CUdeviceptr base, size_t size, CUcontext ctx, CUdevice device,
                         const void *module);
/* Note that the allocation at base came from a pool (mempool.c). */
void vgpu_allocations_set_pool(CUdeviceptr base, const void *pool);
/* A removed allocation no longer counts as its pool's (vgpu_lock held); forget every pool's
 * usage (fork child, vgpu_lock held). */
void vgpu_mempool_released(const struct vgpu_allocation *gone);
void vgpu_mempools_reset(void);
/* Forget every variable of a module (unloaded). */
void vgpu_allocations_remove_module(const void *module);
/* Remove the allocation starting at base into *out; -1 if no allocation starts there. */
int vgpu_allocations_remove(CUdeviceptr base, struct vgpu_allocation *out);
/* The allocation holding ptr, or NULL. */
const struct vgpu_allocation *vgpu_allocations_find(CUdeviceptr ptr);
/* Whether [ptr, ptr + len) lies inside one allocation. */
int vgpu_allocations_contain(CUdeviceptr ptr, size_t len);
/* cuMemFree's check (memory.c): CUDA_ERROR_INVALID_VALUE unless dptr starts an allocation the
 * process made (a module's variable is not freeable); takes vgpu_lock. */
CUresult vgpu_check_freeable(CUdeviceptr dptr);
/* Forget the allocation at dptr once gpu-proxy freed it (and its pool's share of it); takes
 * vgpu_lock. */
void vgpu_forget_freed(CUdeviceptr dptr);
/* Remove every allocation of ctx; returns the bases of those the process allocated, which must
 * be freed (malloc'd; *n may be 0). Modules' variables go with their modules. */
CUdeviceptr *vgpu_allocations_detach_ctx(CUcontext ctx, size_t *n);
void vgpu_allocations_reset(void);

/* ---- context.c ---------------------------------------------------------------------------- */

struct CUctx_st {
    struct vgpu_object obj;
    CUdevice device;
    unsigned int flags;
    int primary;  /* the device's primary context: lives while retained */
    int retained; /* primary contexts: cuDevicePrimaryCtxRetain count */
};

/* The calling thread's current context and its device (device may be NULL) if it is usable,
 * else CUDA_ERROR_INVALID_CONTEXT (CUDA_ERROR_NOT_INITIALIZED before cuInit). The context may be
 * destroyed by another thread as soon as this returns: keep its handle, never dereference it. */
CUresult vgpu_current_context(CUcontext *ctx, CUdevice *device);
void vgpu_contexts_reset(void);
/* ctx, or the current context when ctx is NULL, if it is usable; its device in *device. */
CUresult vgpu_context_or_current(CUcontext ctx, CUdevice *device);

/* A device's primary context, retained or not (cudart's private interface). */
CUresult vgpu_primary_context(CUcontext *pctx, CUdevice dev);

/* Release what a context owns on both sides (cuCtxDestroy, last primary release). */
void vgpu_release_owned(CUcontext ctx);

/* ---- context_storage.c: cudart's values kept per context (export_table.c) ------------------ */

typedef void (*vgpu_cls_dtor)(CUcontext ctx, void *key, void *value);
/* ctx NULL: the current context. get answers CUDA_ERROR_INVALID_HANDLE for no value. */
CUresult vgpu_cls_insert(CUcontext ctx, void *key, void *value, vgpu_cls_dtor dtor);
CUresult vgpu_cls_remove(CUcontext ctx, void *key);
CUresult vgpu_cls_get(void **value, CUcontext ctx, void *key);
/* The context is going: run and forget its values' destructors (no lock held). */
void vgpu_cls_destroy(CUcontext ctx);
void vgpu_cls_reset(void);

/* ---- export_table.c, integrity.c: cudart's private tables ---------------------------------- */

/* The slots of the export table called `name` (export_table.c's names), or NULL. */
const void *vgpu_export_table(const char *name);
CUresult vgpu_integrity_check(unsigned int version, uint64_t unix_seconds, uint64_t result[2]);

/* ---- device.c: the snapshot taken at cuInit ------------------------------------------------ */

CUresult vgpu_device_snapshot(void);
CUresult vgpu_device_check(CUdevice dev);
/* SM number (major * 10 + minor) module images are selected for; 0 when unknown. */
int vgpu_device_arch(CUdevice dev);

/* ---- stream.c / event.c: handle → gpu-proxy id (0 is the legacy default stream) ----------- */

/* The stream's id for a submission: waits first while a host function before it on that
 * stream has not returned (hostfunc.c). */
CUresult vgpu_stream_id(CUstream stream, uint64_t *id);
/* The stream's id, without waiting. */
CUresult vgpu_stream_handle_id(CUstream stream, uint64_t *id);
CUresult vgpu_event_id(CUevent event, uint64_t *id);

/* ---- hostfunc.c: host functions in stream order ------------------------------------------- */

/* Block the calling application thread while a host function that work on `stream` (0: the
 * legacy default stream, which waits for all) must follow has not returned. */
void vgpu_host_funcs_wait(uint64_t stream);
/* Whether such a host function is pending (cuStreamQuery answers NOT_READY). */
int vgpu_host_funcs_pending(uint64_t stream);
void vgpu_host_funcs_atfork(enum vgpu_fork_phase phase);

/* ---- module_image.c, kernel_table.c, sha256.c: module images and their kernels ---------- */

/* Little-endian fields of what is read byte by byte: module images and kernel tables. */
static inline uint16_t vgpu_rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint32_t vgpu_rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t vgpu_rd64(const uint8_t *p)
{
    return (uint64_t)vgpu_rd32(p) | (uint64_t)vgpu_rd32(p + 4) << 32;
}

struct vgpu_param {
    uint32_t offset;
    uint32_t size;
};

/* What cuFuncGetAttribute reports, read by gpu-proxy from a cubin; a PTX kernel's are only
 * known after the driver compiles it, so they are zero (max_threads: the device's limit). */
struct vgpu_func_attrs {
    uint32_t num_regs;      /* per thread */
    uint32_t shared_static; /* bytes */
    uint32_t const_bytes;   /* user constants */
    uint32_t local_bytes;   /* per thread */
    uint32_t max_threads;   /* launch bounds, 0: none */
    uint32_t arch;          /* SM of the code, e.g. 90; 0: unknown (PTX) */
};

struct vgpu_kernel {
    char *name;
    uint32_t param_bytes; /* size of the parameter buffer cuLaunchKernel fills */
    uint32_t nparams;
    struct vgpu_param *params;
    struct vgpu_func_attrs attrs;
};

struct vgpu_kernels {
    struct vgpu_kernel *kernels;
    size_t count;
};

/* The fatbin a fatbin wrapper (nvcc's embedded __fatBinC_Wrapper_t) points to; any other image
 * as it is. */
const void *vgpu_image_unwrap(const void *image);
/* Bytes the image occupies (ELF cubin, fatbin container, or NUL-terminated PTX); -1 if the
 * image cannot be sized, with why filled. */
int vgpu_image_size(const void *image, size_t *size, char *why, size_t why_len);

#define VGPU_SHA256_BYTES 32
void vgpu_sha256(const void *data, size_t len, uint8_t out[VGPU_SHA256_BYTES]);

/* The kernel table of module `module_id` (gpu-proxy's id), fetched page by page. */
CUresult vgpu_kernels_fetch(uint64_t module_id, struct vgpu_kernels *out);
void vgpu_kernels_free(struct vgpu_kernels *k);
const struct vgpu_kernel *vgpu_kernels_find(const struct vgpu_kernels *k, const char *name);

/* ---- module.c ------------------------------------------------------------------------------ */

/* The function behind a handle (vgpu_lock held): gpu-proxy's id and the kernel's entry in its
 * module's kernel table (parameter layout, attributes). */
CUresult vgpu_function_find(CUfunction f, uint64_t *id, const struct vgpu_kernel **kernel);

/* A function's attributes as cuFuncGetAttribute reports them (module.c); f may be a CUkernel. */
struct vgpu_function_info {
    struct vgpu_func_attrs attrs;
    CUdevice device;
    uint32_t max_threads;   /* per block: launch bounds, device limit, registers */
    int max_dynamic_shared; /* bytes a launch may ask for */
    int carveout;
};
CUresult vgpu_function_attributes(CUfunction f, struct vgpu_function_info *out);

/* ---- library.c ----------------------------------------------------------------------------- */

/* A CUkernel may be used where a CUfunction is expected (cudart launches with one): *f becomes
 * its function in the current context. Any other handle is left as it is. */
CUresult vgpu_kernel_function(CUfunction *f);

/* ---- bulk_wire.c: request heads of calls whose data is gathered from the caller's buffer ---- */

#define VGPU_HEAD_MAX 32
size_t vgpu_head_cuMemcpyHtoD_v2(uint8_t *head, CUdeviceptr dst, size_t count);
size_t vgpu_head_cuMemcpyHtoDAsync_v2(uint8_t *head, CUdeviceptr dst, size_t count,
                                      uint64_t stream);
size_t vgpu_head_cuModuleLoadData(uint8_t *head, size_t image_size);

#endif
