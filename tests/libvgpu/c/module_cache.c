/*
 * A module image loaded twice by one process and again by the next process of the zone: libvgpu
 * asks gpu-proxy by the image's SHA-256 first, so the test can count how often the image itself
 * travelled. Each module gets its own kernel table, and launches with kernelParams use it.
 * Usage: module_cache IMAGE
 */
#include "check.h"

int main(int argc, char **argv)
{
    CUmodule first, second;
    CUfunction f1, f2;
    CUdeviceptr x;
    float k = 2.0f;
    int n = 64, attr;
    void *params[] = {&x, &k, &n};
    size_t offset, size;

    REQUIRE(argc == 2);
    primary_context();
    CHECK(cuMemAlloc(&x, 256));
    CHECK(cuModuleLoad(&first, argv[1]));
    CHECK(cuModuleLoad(&second, argv[1]));
    REQUIRE(first != second);
    CHECK(cuModuleGetFunction(&f1, first, "scale"));
    CHECK(cuModuleGetFunction(&f2, second, "scale"));
    REQUIRE(f1 != f2);
    EXPECT(cuModuleGetFunction(&f2, second, "not_a_kernel"), CUDA_ERROR_NOT_FOUND);
    CHECK(cuFuncGetParamInfo(f2, 1, &offset, &size));
    REQUIRE(offset == 8 && size == 4);
    CHECK(cuFuncGetAttribute(&attr, CU_FUNC_ATTRIBUTE_NUM_REGS, f2));
    REQUIRE(attr > 0); /* cubin code: gpu-proxy read its registers */
    CHECK(cuLaunchKernel(f1, 1, 1, 1, 32, 1, 1, 0, NULL, params, NULL));
    CHECK(cuLaunchKernel(f2, 1, 1, 1, 32, 1, 1, 0, NULL, params, NULL));
    CHECK(cuCtxSynchronize());
    CHECK(cuModuleUnload(first));
    CHECK(cuModuleUnload(second));
    CHECK(cuMemFree(x));
    printf("ok\n");
    return 0;
}
