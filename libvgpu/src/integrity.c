/*
 * The integrity check cudart runs at start-up through a private export table (export_table.c):
 * it hands the driver its version and the time, and compares the answer with a keyed hash it
 * computes itself over the same facts: driver version, that version, process and thread ids, the
 * addresses of the driver's cudart table, of this table and of this function, the time, and each
 * device's UUID and PCI location. The hash is HMAC over MD2 (RFC 1319, RFC 2104) with a fixed
 * 16-byte key; its inputs and layout are as public reverse-engineering work (ZLUDA) found them.
 * cudart 13 asks three times, with version 13000, 13001 and 13002: for versions ending in 0 and
 * 1 the driver answers fixed values (also found by that work), for the others the hash.
 * Everything it hashes is known in the zone, so it is computed here.
 */
#include "vgpu.h"

#include <pthread.h>
#include <string.h>
#include <unistd.h>

/* RFC 1319's substitution table (a permutation of 0..255 derived from the digits of pi). */
static const unsigned char S[256] = {
    41,  46,  67,  201, 162, 216, 124, 1,   61,  54,  84,  161, 236, 240, 6,   19,
    98,  167, 5,   243, 192, 199, 115, 140, 152, 147, 43,  217, 188, 76,  130, 202,
    30,  155, 87,  60,  253, 212, 224, 22,  103, 66,  111, 24,  138, 23,  229, 18,
    190, 78,  196, 214, 218, 158, 222, 73,  160, 251, 245, 142, 187, 47,  238, 122,
    169, 104, 121, 145, 21,  178, 7,   63,  148, 194, 16,  137, 11,  34,  95,  33,
    128, 127, 93,  154, 90,  144, 50,  39,  53,  62,  204, 231, 191, 247, 151, 3,
    255, 25,  48,  179, 72,  165, 181, 209, 215, 94,  146, 42,  172, 86,  170, 198,
    79,  184, 56,  210, 150, 164, 125, 182, 118, 252, 107, 226, 156, 116, 4,   241,
    69,  157, 112, 89,  100, 113, 135, 32,  134, 91,  207, 101, 230, 45,  168, 2,
    27,  96,  37,  173, 174, 176, 185, 246, 28,  70,  97,  105, 52,  64,  126, 15,
    85,  71,  163, 35,  221, 81,  175, 58,  195, 92,  249, 206, 186, 197, 234, 38,
    44,  83,  13,  110, 133, 40,  132, 9,   211, 223, 205, 244, 65,  129, 77,  82,
    106, 220, 55,  200, 108, 193, 171, 250, 36,  225, 123, 8,   12,  189, 177, 74,
    120, 136, 149, 139, 227, 99,  232, 109, 233, 203, 213, 254, 59,  0,   29,  57,
    242, 239, 183, 14,  102, 88,  208, 228, 166, 119, 114, 248, 235, 117, 75,  10,
    49,  68,  80,  180, 143, 237, 31,  26,  219, 153, 141, 51,  159, 17,  131, 20,
};

struct md2 {
    unsigned char x[48], checksum[16], block[16];
    size_t used; /* bytes in block */
};

static void md2_block(struct md2 *m, const unsigned char *b)
{
    unsigned char t = 0, l = m->checksum[15];

    for (int j = 0; j < 16; j++) {
        m->x[16 + j] = b[j];
        m->x[32 + j] = (unsigned char)(b[j] ^ m->x[j]);
        l = m->checksum[j] ^= S[b[j] ^ l];
    }
    for (int j = 0; j < 18; j++) {
        for (int k = 0; k < 48; k++)
            t = m->x[k] ^= S[t];
        t = (unsigned char)(t + j);
    }
}

static void md2_update(struct md2 *m, const void *data, size_t len)
{
    const unsigned char *p = data;
    while (len--) {
        m->block[m->used++] = *p++;
        if (m->used == 16) {
            md2_block(m, m->block);
            m->used = 0;
        }
    }
}

static void md2_final(struct md2 *m, unsigned char out[16])
{
    unsigned char pad = (unsigned char)(16 - m->used), sum[16];

    memset(m->block + m->used, pad, pad);
    md2_block(m, m->block);
    memcpy(sum, m->checksum, 16);
    md2_block(m, sum);
    memcpy(out, m->x, 16);
}

static const unsigned char key[16] = {0x14, 0x6a, 0xdd, 0xae, 0x53, 0xa9, 0xa7, 0x52,
                                      0xaa, 0x08, 0x41, 0x36, 0x0b, 0xf5, 0x5a, 0x9f};

static void hmac_start(struct md2 *m, unsigned char pad)
{
    unsigned char k[16];
    for (int i = 0; i < 16; i++)
        k[i] = key[i] ^ pad;
    memset(m, 0, sizeof(*m));
    md2_update(m, k, 16);
}

struct facts {
    uint32_t driver_version, version, pid, tid;
    const void *cudart_table, *integrity_table, *function;
    uint64_t unix_seconds;
};

struct device_facts {
    CUuuid uuid;
    int32_t pci_domain, pci_bus, pci_device;
};

CUresult vgpu_integrity_check(unsigned int version, uint64_t unix_seconds, uint64_t result[2])
{
    struct md2 m;
    struct facts f = {0};
    unsigned char inner[16], out[16];
    int count;
    CUresult r;

    if (!result)
        return CUDA_ERROR_INVALID_VALUE;
    if (version % 10 < 2) {
        result[0] = version % 10 ? 0x1841181c03cb675cull : 0x3341181c03cb675cull;
        result[1] = 0x8ed383aa1f4cd1e8ull;
        return CUDA_SUCCESS;
    }
    r = cuDeviceGetCount(&count);
    if (r)
        return r;
    f.driver_version = CUDA_VERSION;
    f.version = version;
    f.pid = (uint32_t)getpid();
    f.tid = (uint32_t)(uintptr_t)pthread_self();
    f.cudart_table = vgpu_export_table("CUDART_INTERFACE");
    f.integrity_table = vgpu_export_table("INTEGRITY_CHECK");
    f.function = (const void *)vgpu_integrity_check;
    f.unix_seconds = unix_seconds;
    hmac_start(&m, 0x36);
    md2_update(&m, &f, sizeof(f));
    for (CUdevice dev = 0; dev < count; dev++) {
        struct device_facts d;
        memset(&d, 0, sizeof(d));
        r = cuDeviceGetUuid_v2(&d.uuid, dev);
        if (r)
            return r;
        /* A location gpu-proxy does not report hashes as 0, as cudart's own query leaves it. */
        (void)cuDeviceGetAttribute(&d.pci_domain, CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID, dev);
        (void)cuDeviceGetAttribute(&d.pci_bus, CU_DEVICE_ATTRIBUTE_PCI_BUS_ID, dev);
        (void)cuDeviceGetAttribute(&d.pci_device, CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID, dev);
        md2_update(&m, &d, sizeof(d));
    }
    md2_final(&m, inner);
    hmac_start(&m, 0x5c);
    md2_update(&m, inner, 16);
    md2_final(&m, out);
    memcpy(result, out, 16);
    return CUDA_SUCCESS;
}
