/*
 * What a program sees when gpu-proxy cannot be reached (or goes away): it prints the name of
 * every result for the test to compare.
 *   init_only           cuInit twice, then calls that need it
 *   init_only wait      cuInit and an allocation, "ready", then (after a line on stdin) two
 *                       more allocations: the test kills gpu-proxy in between
 */
#include "check.h"

#include <string.h>

int main(int argc, char **argv)
{
    int count, version;
    CUcontext ctx;
    CUdeviceptr p;

    if (argc > 1 && !strcmp(argv[1], "wait")) {
        char line[16];
        primary_context();
        CHECK(cuMemAlloc(&p, 4096));
        printf("ready\n");
        fflush(stdout);
        if (!fgets(line, sizeof(line), stdin))
            return 2;
        printf("alloc=%s\n", result_name(cuMemAlloc(&p, 4096)));
        printf("alloc=%s\n", result_name(cuMemAlloc(&p, 4096)));
        printf("sync=%s\n", result_name(cuCtxSynchronize()));
        return 0;
    }
    printf("init=%s\n", result_name(cuInit(0)));
    printf("init=%s\n", result_name(cuInit(0)));
    printf("count=%s\n", result_name(cuDeviceGetCount(&count)));
    printf("retain=%s\n", result_name(cuDevicePrimaryCtxRetain(&ctx, 0)));
    printf("version=%s\n", result_name(cuDriverGetVersion(&version)));
    return 0;
}
