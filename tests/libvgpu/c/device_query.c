/*
 * Device query, as deviceQuery-style tools and frameworks do it at start-up: count, name, UUID,
 * memory, attributes, the driver version, then the context stack. Prints key=value lines for the
 * test to compare with the sim's model; every CUresult is checked here.
 */
#include "check.h"

#include <string.h>

int main(void)
{
    int count, value, version, major, minor, active;
    unsigned int flags;
    char name[256], tiny[8];
    CUuuid uuid, uuid_legacy;
    size_t total;
    CUdevice dev;
    CUcontext primary, created, current, popped;

    /* Before cuInit: the version is known, everything else is not initialised. */
    CHECK(cuDriverGetVersion(&version));
    EXPECT(cuDeviceGetCount(&count), CUDA_ERROR_NOT_INITIALIZED);
    EXPECT(cuCtxGetCurrent(&current), CUDA_ERROR_NOT_INITIALIZED);
    EXPECT(cuInit(1), CUDA_ERROR_INVALID_VALUE);
    CHECK(cuInit(0));
    CHECK(cuInit(0)); /* again: harmless */

    CHECK(cuDeviceGetCount(&count));
    CHECK(cuDeviceGet(&dev, 0));
    EXPECT(cuDeviceGet(&dev, count), CUDA_ERROR_INVALID_DEVICE);
    EXPECT(cuDeviceGetName(name, sizeof(name), 7), CUDA_ERROR_INVALID_DEVICE);
    CHECK(cuDeviceGetName(name, sizeof(name), dev));
    CHECK(cuDeviceGetName(tiny, sizeof(tiny), dev));
    REQUIRE(strlen(tiny) == sizeof(tiny) - 1 && strncmp(tiny, name, sizeof(tiny) - 1) == 0);
    CHECK(cuDeviceGetUuid(&uuid, dev));
    CHECK(cuDeviceGetUuid_v2(&uuid_legacy, dev));
    REQUIRE(memcmp(uuid.bytes, uuid_legacy.bytes, sizeof(uuid.bytes)) == 0);
    CHECK(cuDeviceTotalMem(&total, dev));
    CHECK(cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev));
    CHECK(cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev));
    printf("version=%d\ncount=%d\nname=%s\ntotal=%zu\ncc=%d.%d\nuuid=", version, count, name,
           total, major, minor);
    for (size_t i = 0; i < sizeof(uuid.bytes); i++)
        printf("%02x", (unsigned char)uuid.bytes[i]);
    printf("\n");
    /* Every attribute the device reports, as attr<N>=value; the others must be refused. */
    for (int a = 1; a < CU_DEVICE_ATTRIBUTE_MAX; a++) {
        CUresult r = cuDeviceGetAttribute(&value, (CUdevice_attribute)a, dev);
        if (r == CUDA_SUCCESS)
            printf("attr%d=%d\n", a, value);
        else
            EXPECT(r, CUDA_ERROR_INVALID_VALUE);
    }
    EXPECT(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_MAX, dev), CUDA_ERROR_INVALID_VALUE);

    /* The context stack: empty, then the primary context, then a created one on top. */
    CHECK(cuCtxGetCurrent(&current));
    REQUIRE(current == NULL);
    EXPECT(cuCtxSynchronize(), CUDA_ERROR_INVALID_CONTEXT);
    EXPECT(cuCtxPopCurrent(&popped), CUDA_ERROR_INVALID_CONTEXT);
    CHECK(cuDevicePrimaryCtxGetState(dev, &flags, &active));
    REQUIRE(active == 0);
    CHECK(cuDevicePrimaryCtxRetain(&primary, dev));
    CHECK(cuDevicePrimaryCtxGetState(dev, &flags, &active));
    REQUIRE(active == 1);
    CHECK(cuCtxSetCurrent(primary));
    CHECK(cuCtxGetCurrent(&current));
    REQUIRE(current == primary);
    CHECK(cuCtxSynchronize());
    CHECK(cuCtxCreate(&created, NULL, 0, dev)); /* pushed */
    REQUIRE(created != primary);
    CHECK(cuCtxGetCurrent(&current));
    REQUIRE(current == created);
    CHECK(cuCtxGetDevice(&dev));
    REQUIRE(dev == 0);
    CHECK(cuCtxPopCurrent(&popped));
    REQUIRE(popped == created);
    CHECK(cuCtxGetCurrent(&current));
    REQUIRE(current == primary);
    /* NULL replaces the top: nothing is current until it is popped. */
    CHECK(cuCtxPushCurrent(created));
    CHECK(cuCtxSetCurrent(NULL));
    CHECK(cuCtxGetCurrent(&current));
    REQUIRE(current == NULL);
    EXPECT(cuCtxSynchronize(), CUDA_ERROR_INVALID_CONTEXT);
    CHECK(cuCtxPopCurrent(&popped));
    REQUIRE(popped == NULL);
    CHECK(cuCtxGetCurrent(&current));
    REQUIRE(current == primary);
    CHECK(cuCtxPushCurrent(created));
    CHECK(cuCtxDestroy(created)); /* current: popped with it */
    CHECK(cuCtxGetCurrent(&current));
    REQUIRE(current == primary);
    EXPECT(cuCtxPushCurrent(created), CUDA_ERROR_INVALID_CONTEXT);
    EXPECT(cuCtxDestroy(primary), CUDA_ERROR_INVALID_CONTEXT); /* primary: released, not destroyed */
    CHECK(cuDevicePrimaryCtxRelease(dev));
    CHECK(cuDevicePrimaryCtxGetState(dev, &flags, &active));
    REQUIRE(active == 0);
    EXPECT(cuCtxSynchronize(), CUDA_ERROR_INVALID_CONTEXT); /* still on the stack, but inactive */
    EXPECT(cuDevicePrimaryCtxRelease(dev), CUDA_ERROR_INVALID_CONTEXT);
    CHECK(cuCtxSetCurrent(NULL));
    CHECK(cuCtxGetCurrent(&current));
    REQUIRE(current == NULL);
    printf("ok\n");
    return 0;
}
