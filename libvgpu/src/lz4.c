/*
 * Raw LZ4 block decoding (no frame): nvcc 13 compresses fatbin entries this way with
 * `-compress-mode=speed`. Every length is checked against both buffers; the output must come to
 * exactly the size the fatbin entry declares.
 */
#include "vgpu.h"

#include <string.h>

/* A run length: 4 bits in the token, extended by bytes while they are 255. */
static int run_length(const uint8_t *src, size_t len, size_t *pos, size_t base, size_t *out)
{
    if (base == 15) {
        uint8_t byte;
        do {
            if (*pos >= len)
                return -1;
            byte = src[(*pos)++];
            base += byte;
        } while (byte == 255);
    }
    *out = base;
    return 0;
}

int vgpu_lz4_decode(const uint8_t *src, size_t src_len, uint8_t *dst, size_t size)
{
    size_t pos = 0, out = 0;

    while (pos < src_len) {
        uint8_t token = src[pos++];
        size_t literals, match, back;

        if (run_length(src, src_len, &pos, token >> 4, &literals) ||
            literals > src_len - pos || literals > size - out)
            return -1;
        memcpy(dst + out, src + pos, literals);
        pos += literals;
        out += literals;
        if (pos == src_len)
            break; /* the last sequence has literals only */
        if (src_len - pos < 2)
            return -1;
        back = (size_t)src[pos] | (size_t)src[pos + 1] << 8;
        pos += 2;
        if (run_length(src, src_len, &pos, token & 15, &match))
            return -1;
        match += 4;
        if (back == 0 || back > out || match > size - out)
            return -1;
        /* Byte by byte: a match may overlap the bytes it produces (back < match). */
        for (size_t i = 0; i < match; i++, out++)
            dst[out] = dst[out - back];
    }
    return out == size ? 0 : -1;
}
