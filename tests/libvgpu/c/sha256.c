/*
 * libvgpu's SHA-256 (libvgpu/src/sha256.c) on stdin: prints the hex digest. Linked with that
 * file alone; VGPU_SHA256_PORTABLE picks the portable rounds where the CPU has SHA extensions.
 */
#include "vgpu.h"

#include <stdio.h>
#include <stdlib.h>

int main(void)
{
    size_t cap = 1 << 16, len = 0, n;
    uint8_t *buf = malloc(cap), digest[VGPU_SHA256_BYTES];

    while (buf && (n = fread(buf + len, 1, cap - len, stdin)) > 0) {
        len += n;
        if (len == cap && !(buf = realloc(buf, cap *= 2)))
            break;
    }
    if (!buf)
        return 1;
    vgpu_sha256(buf, len, digest);
    for (int i = 0; i < VGPU_SHA256_BYTES; i++)
        printf("%02x", digest[i]);
    printf("\n");
    free(buf);
    return 0;
}
