/*
 * cuGetExportTable: the driver's private tables, asked for by UUID. cudart (static or shared)
 * asks for them at start-up and uses them to find the primary context, keep per-context state
 * and hand tools their hooks. They are undocumented; the slots filled here are those cudart 13 was
 * seen to call (docs/libvgpu.md says how), with their meaning as public reverse-engineering work
 * (ZLUDA's dark API) describes it. Every other slot of a table libvgpu returns is a stub that says
 * on stderr which slot was called and answers CUDA_ERROR_NOT_SUPPORTED, so that a new use shows
 * up by name instead of as a jump through NULL. An unknown UUID is refused with
 * CUDA_ERROR_NOT_FOUND, as the driver refuses tables it does not have.
 */
#include "vgpu.h"

#include <string.h>

struct table {
    const char *name;
    unsigned char uuid[16];
    const void *const *slots; /* NULL: refused (the table exists, libvgpu declines it) */
};

static CUresult unknown_slot(const char *table, int slot)
{
    vgpu_log("cuGetExportTable: %s slot %d is not implemented", table, slot);
    return CUDA_ERROR_NOT_SUPPORTED;
}

#define STUB(table, slot)                                                                     \
    static CUresult table##_##slot(void) { return unknown_slot(#table, slot); }
#define SIZE(n) ((const void *)(uintptr_t)((n) * sizeof(void *)))

/* ---- cudart's interface: slot 2 gives a device's primary context ---------------------------- */

static CUresult cudart_primary_context(CUcontext *pctx, CUdevice dev)
{
    return vgpu_primary_context(pctx, dev);
}

STUB(CUDART_INTERFACE, 1) STUB(CUDART_INTERFACE, 3) STUB(CUDART_INTERFACE, 4)
STUB(CUDART_INTERFACE, 5) STUB(CUDART_INTERFACE, 6) STUB(CUDART_INTERFACE, 7)
STUB(CUDART_INTERFACE, 8) STUB(CUDART_INTERFACE, 9) STUB(CUDART_INTERFACE, 10)
STUB(CUDART_INTERFACE, 11) STUB(CUDART_INTERFACE, 12)
static const void *const cudart_interface[13] = {
    SIZE(13), CUDART_INTERFACE_1, cudart_primary_context, CUDART_INTERFACE_3,
    CUDART_INTERFACE_4, CUDART_INTERFACE_5, CUDART_INTERFACE_6, CUDART_INTERFACE_7,
    CUDART_INTERFACE_8, CUDART_INTERFACE_9, CUDART_INTERFACE_10, CUDART_INTERFACE_11,
    CUDART_INTERFACE_12,
};

/* ---- tools' runtime callback hooks: two buffers cudart reads callback switches from --------- */

/* All zero: no tool subscribed to any callback. cudart checks the sizes (1024 and 14 bytes). */
static unsigned char callback_words[1024];
static unsigned char callback_bytes[14];

static void callback_hooks_words(void **ptr, size_t *size)
{
    *ptr = callback_words;
    *size = sizeof(callback_words);
}

static void callback_hooks_bytes(void **ptr, size_t *size)
{
    *ptr = callback_bytes;
    *size = sizeof(callback_bytes);
}

STUB(TOOLS_RUNTIME_CALLBACK_HOOKS, 1) STUB(TOOLS_RUNTIME_CALLBACK_HOOKS, 3)
STUB(TOOLS_RUNTIME_CALLBACK_HOOKS, 4) STUB(TOOLS_RUNTIME_CALLBACK_HOOKS, 5)
static const void *const callback_hooks[7] = {
    SIZE(7), TOOLS_RUNTIME_CALLBACK_HOOKS_1, callback_hooks_words,
    TOOLS_RUNTIME_CALLBACK_HOOKS_3, TOOLS_RUNTIME_CALLBACK_HOOKS_4,
    TOOLS_RUNTIME_CALLBACK_HOOKS_5, callback_hooks_bytes,
};

/* ---- tools' thread-local state ---------------------------------------------------------------- */

STUB(TOOLS_TLS, 1) STUB(TOOLS_TLS, 2) STUB(TOOLS_TLS, 3)
static const void *const tools_tls[4] = {SIZE(4), TOOLS_TLS_1, TOOLS_TLS_2, TOOLS_TLS_3};

/* ---- context-local storage (context_storage.c); this table has no size slot ---------------- */

STUB(CONTEXT_LOCAL_STORAGE, 3)
static const void *const context_storage[4] = {
    vgpu_cls_insert, vgpu_cls_remove, vgpu_cls_get, CONTEXT_LOCAL_STORAGE_3,
};

/* ---- context checks: slot 2 says whether a context wraps another (never, here) ------------- */

static CUresult context_unwrap(CUcontext ctx, unsigned int *wrapped, CUcontext *unwrapped)
{
    (void)ctx;
    (void)unwrapped;
    if (!wrapped)
        return CUDA_ERROR_INVALID_VALUE;
    *wrapped = 0;
    return CUDA_SUCCESS;
}

/* Slot 3 takes nothing; cudart 13 calls it once at start-up and goes on when it answers 0. */
static CUresult context_checks_3(void)
{
    return CUDA_SUCCESS;
}

STUB(CONTEXT_CHECKS, 1)
static const void *const context_checks[4] = {
    SIZE(4), CONTEXT_CHECKS_1, context_unwrap, context_checks_3,
};

STUB(INTEGRITY_CHECK, 2)
static const void *const integrity_check[3] = {SIZE(3), vgpu_integrity_check, INTEGRITY_CHECK_2};

static const struct table tables[] = {
    {"CUDART_INTERFACE",
     {0x6b, 0xd5, 0xfb, 0x6c, 0x5b, 0xf4, 0xe7, 0x4a, 0x89, 0x87, 0xd9, 0x39, 0x12, 0xfd, 0x9d, 0xf9},
     cudart_interface},
    {"TOOLS_RUNTIME_CALLBACK_HOOKS",
     {0xa0, 0x94, 0x79, 0x8c, 0x2e, 0x74, 0x2e, 0x74, 0x93, 0xf2, 0x08, 0x00, 0x20, 0x0c, 0x0a, 0x66},
     callback_hooks},
    {"TOOLS_TLS",
     {0x42, 0xd8, 0x5a, 0x81, 0x23, 0xf6, 0xcb, 0x47, 0x82, 0x98, 0xf6, 0xe7, 0x8a, 0x3a, 0xec, 0xdc},
     tools_tls},
    {"CONTEXT_LOCAL_STORAGE",
     {0xc6, 0x93, 0x33, 0x6e, 0x11, 0x21, 0xdf, 0x11, 0xa8, 0xc3, 0x68, 0xf3, 0x55, 0xd8, 0x95, 0x93},
     context_storage},
    {"CONTEXT_CHECKS",
     {0x26, 0x3e, 0x88, 0x60, 0x7c, 0xd2, 0x61, 0x43, 0x92, 0xf6, 0xbb, 0xd5, 0x00, 0x6d, 0xfa, 0x7e},
     context_checks},
    {"INTEGRITY_CHECK",
     {0xd4, 0x08, 0x20, 0x55, 0xbd, 0xe6, 0x70, 0x4b, 0x8d, 0x34, 0xba, 0x12, 0x3c, 0x66, 0xe1, 0xf2},
     integrity_check},
    /* Asked for first by cudart 13; having it makes cudart skip its normal start-up, which is the
     * path libvgpu implements. */
    {"CUDART_BOOTSTRAP",
     {0xf8, 0xcf, 0xf9, 0x51, 0x21, 0x46, 0x8b, 0x4e, 0xb9, 0xe2, 0xfb, 0x46, 0x9e, 0x7c, 0x0d, 0xd9},
     NULL},
};

const void *vgpu_export_table(const char *name)
{
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++)
        if (strcmp(tables[i].name, name) == 0)
            return tables[i].slots;
    return NULL;
}

VGPU_API CUresult CUDAAPI cuGetExportTable(const void **ppExportTable, const CUuuid *pExportTableId)
{
    const unsigned char *id;

    if (!ppExportTable || !pExportTableId)
        return CUDA_ERROR_INVALID_VALUE;
    *ppExportTable = NULL;
    id = (const unsigned char *)pExportTableId->bytes;
    for (size_t i = 0; i < sizeof(tables) / sizeof(tables[0]); i++) {
        if (memcmp(tables[i].uuid, id, 16) != 0)
            continue;
        if (!tables[i].slots)
            return CUDA_ERROR_NOT_FOUND;
        *ppExportTable = tables[i].slots;
        return CUDA_SUCCESS;
    }
    vgpu_log("cuGetExportTable: unknown table %02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
             "%02x%02x%02x%02x%02x%02x",
             id[0], id[1], id[2], id[3], id[4], id[5], id[6], id[7], id[8], id[9], id[10], id[11],
             id[12], id[13], id[14], id[15]);
    return CUDA_ERROR_NOT_FOUND;
}
