/*
 * The smallest end-to-end check of a channel: cuInit, the primary context, one allocation, a
 * host -> device -> host round trip of SIZE bytes (default 1 MiB) compared by checksum. Prints
 * the checksum of the data sent, so the test can compare it with its own, then "ok".
 *   round_trip [SIZE]
 */
#include "check.h"

#include <string.h>

int main(int argc, char **argv)
{
    size_t size = argc > 1 ? strtoull(argv[1], NULL, 0) : (size_t)1 << 20;
    uint8_t *src = xmalloc(size), *back = xmalloc(size);
    CUdeviceptr dev;

    primary_context();
    fill(src, size, 7);
    memset(back, 0, size);
    CHECK(cuMemAlloc(&dev, size));
    CHECK(cuMemcpyHtoD(dev, src, size));
    CHECK(cuMemcpyDtoH(back, dev, size));
    REQUIRE(checksum(back, size) == checksum(src, size));
    CHECK(cuMemFree(dev));
    printf("checksum=%016llx\n", (unsigned long long)checksum(src, size));
    printf("ok\n");
    free(src);
    free(back);
    return 0;
}
