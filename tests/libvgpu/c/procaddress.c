/*
 * cuGetProcAddress and cuGetExportTable as cudart uses them: entry points by base name and CUDA
 * version (the per-thread-stream variant on request), refusals with their query results, the
 * private tables by UUID, context-local storage with its destructor, and the integrity check's
 * fixed answers.
 */
#define _GNU_SOURCE
#include "check.h"

#include <dlfcn.h>
#include <string.h>

static void *sym(const char *name)
{
    void *p = dlsym(RTLD_DEFAULT, name);
    REQUIRE(p != NULL);
    return p;
}

static void *lookup(const char *name, int version, cuuint64_t flags)
{
    void *fn = NULL;
    CUdriverProcAddressQueryResult status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    CHECK(cuGetProcAddress(name, &fn, version, flags, &status));
    REQUIRE(status == CU_GET_PROC_ADDRESS_SUCCESS && fn != NULL);
    return fn;
}

static void refused(const char *name, int version, CUdriverProcAddressQueryResult want)
{
    void *fn = (void *)1;
    CUdriverProcAddressQueryResult status = CU_GET_PROC_ADDRESS_SUCCESS;
    EXPECT(cuGetProcAddress(name, &fn, version, 0, &status), CUDA_ERROR_NOT_FOUND);
    REQUIRE(fn == NULL && status == want);
}

static const CUuuid cudart_interface = {{(char)0x6b, (char)0xd5, (char)0xfb, (char)0x6c, 0x5b,
                                         (char)0xf4, (char)0xe7, 0x4a, (char)0x89, (char)0x87,
                                         (char)0xd9, 0x39, 0x12, (char)0xfd, (char)0x9d,
                                         (char)0xf9}};
static const CUuuid context_storage = {{(char)0xc6, (char)0x93, 0x33, 0x6e, 0x11, 0x21,
                                        (char)0xdf, 0x11, (char)0xa8, (char)0xc3, 0x68,
                                        (char)0xf3, 0x55, (char)0xd8, (char)0x95, (char)0x93}};
static const CUuuid integrity = {{(char)0xd4, 0x08, 0x20, 0x55, (char)0xbd, (char)0xe6, 0x70,
                                  0x4b, (char)0x8d, 0x34, (char)0xba, 0x12, 0x3c, 0x66,
                                  (char)0xe1, (char)0xf2}};
static const CUuuid bootstrap = {{(char)0xf8, (char)0xcf, (char)0xf9, 0x51, 0x21, 0x46,
                                  (char)0x8b, 0x4e, (char)0xb9, (char)0xe2, (char)0xfb, 0x46,
                                  (char)0x9e, 0x7c, 0x0d, (char)0xd9}};
static const CUuuid made_up = {{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}};

typedef CUresult (*primary_fn)(CUcontext *, CUdevice);
typedef void (*dtor_fn)(CUcontext, void *, void *);
typedef CUresult (*insert_fn)(CUcontext, void *, void *, dtor_fn);
typedef CUresult (*remove_fn)(CUcontext, void *);
typedef CUresult (*get_fn)(void **, CUcontext, void *);
typedef CUresult (*integrity_fn)(unsigned int, uint64_t, uint64_t *);

static int key, value, destroyed;
static CUcontext destroyed_ctx;

static void destructor(CUcontext ctx, void *k, void *v)
{
    REQUIRE(k == &key && v == &value);
    destroyed_ctx = ctx;
    destroyed++;
}

static void export_tables(void)
{
    const void *const *t;
    void *got;
    CUcontext primary, retained;
    uint64_t hash[2];

    EXPECT(cuGetExportTable((const void **)&t, &made_up), CUDA_ERROR_NOT_FOUND);
    EXPECT(cuGetExportTable((const void **)&t, &bootstrap), CUDA_ERROR_NOT_FOUND);

    CHECK(cuGetExportTable((const void **)&t, &cudart_interface));
    REQUIRE((uintptr_t)t[0] == 13 * sizeof(void *));
    CHECK(((primary_fn)(uintptr_t)t[2])(&primary, 0));
    CHECK(cuDevicePrimaryCtxRetain(&retained, 0));
    REQUIRE(primary == retained);
    CHECK(cuCtxSetCurrent(primary));

    CHECK(cuGetExportTable((const void **)&t, &context_storage));
    EXPECT(((get_fn)(uintptr_t)t[2])(&got, primary, &key), CUDA_ERROR_INVALID_HANDLE);
    CHECK(((insert_fn)(uintptr_t)t[0])(NULL, &key, &value, destructor)); /* NULL: current */
    CHECK(((get_fn)(uintptr_t)t[2])(&got, primary, &key));
    REQUIRE(got == &value);
    CHECK(((remove_fn)(uintptr_t)t[1])(primary, &key));
    EXPECT(((get_fn)(uintptr_t)t[2])(&got, primary, &key), CUDA_ERROR_INVALID_HANDLE);
    CHECK(((insert_fn)(uintptr_t)t[0])(primary, &key, &value, destructor));
    REQUIRE(destroyed == 0);
    CHECK(cuDevicePrimaryCtxRelease(0)); /* the last release: the value's destructor runs */
    REQUIRE(destroyed == 1 && destroyed_ctx == primary);

    CHECK(cuGetExportTable((const void **)&t, &integrity));
    CHECK(((integrity_fn)(uintptr_t)t[1])(13000, 0, hash));
    REQUIRE(hash[0] == 0x3341181c03cb675cull && hash[1] == 0x8ed383aa1f4cd1e8ull);
    CHECK(((integrity_fn)(uintptr_t)t[1])(13002, 1700000000, hash));
    printf("integrity=%016llx%016llx\n", (unsigned long long)hash[0],
           (unsigned long long)hash[1]);
}

int main(void)
{
    typedef CUresult (*v1_fn)(const char *, void **, int, cuuint64_t);
    void *fn = NULL;

    /* Needs no cuInit, as cudart looks its entry points up before calling cuInit. */
    REQUIRE(lookup("cuInit", 2000, 0) == sym("cuInit"));
    REQUIRE(lookup("cuMemAlloc", 13000, 0) == sym("cuMemAlloc_v2"));
    REQUIRE(lookup("cuCtxCreate", 3020, 0) == sym("cuCtxCreate_v2"));
    REQUIRE(lookup("cuCtxCreate", 13000, 0) == sym("cuCtxCreate_v4"));
    REQUIRE(lookup("cuEventElapsedTime", 12000, 0) == sym("cuEventElapsedTime"));
    REQUIRE(lookup("cuEventElapsedTime", 12080, 0) == sym("cuEventElapsedTime_v2"));
    REQUIRE(lookup("cuMemcpyHtoD", 13000, CU_GET_PROC_ADDRESS_LEGACY_STREAM) ==
            sym("cuMemcpyHtoD_v2"));
    REQUIRE(lookup("cuMemcpyHtoD", 13000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) ==
            sym("cuMemcpyHtoD_v2_ptds"));
    REQUIRE(lookup("cuLaunchKernel", 13000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) ==
            sym("cuLaunchKernel_ptsz"));
    /* No per-thread variant: the one variant there is. */
    REQUIRE(lookup("cuMemAlloc", 13000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) ==
            sym("cuMemAlloc_v2"));
    REQUIRE(lookup("cuGetProcAddress", 13000, 0) == sym("cuGetProcAddress_v2"));
    REQUIRE(lookup("cuGetProcAddress", 11030, 0) == sym("cuGetProcAddress"));

    /* CUDA 11.3's entry point, without the status. */
    CHECK(((v1_fn)(uintptr_t)sym("cuGetProcAddress"))("cuMemFree", &fn, 3020, 0));
    REQUIRE(fn == sym("cuMemFree_v2"));

    refused("cuNoSuchFunction", 13000, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
    refused("cuFuncGetParamInfo", 12030, CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT);
    /* cuCtxCreate_v3 (11.4) is not implemented: asking at 11.4 must not give _v2's ABI. */
    refused("cuCtxCreate", 11040, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
    /* CUDA 13's variants that name their context, and the library API cudart 12+ loads with. */
    REQUIRE(lookup("cuCtxSynchronize", 13000, 0) == sym("cuCtxSynchronize_v2"));
    REQUIRE(lookup("cuCtxSynchronize", 12090, 0) == sym("cuCtxSynchronize"));
    REQUIRE(lookup("cuCtxGetDevice", 13000, 0) == sym("cuCtxGetDevice_v2"));
    REQUIRE(lookup("cuLibraryLoadData", 13000, 0) == sym("cuLibraryLoadData"));
    REQUIRE(lookup("cuMemcpyAsync", 13000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) ==
            sym("cuMemcpyAsync_ptsz"));
    EXPECT(cuGetProcAddress("cuInit", &fn, CUDA_VERSION + 10, 0, NULL), CUDA_ERROR_INVALID_VALUE);
    EXPECT(cuGetProcAddress("cuInit", &fn, 2000, 4, NULL), CUDA_ERROR_INVALID_VALUE);

    CHECK(cuInit(0));
    export_tables();
    printf("ok\n");
    return 0;
}
