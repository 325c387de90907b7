/*
 * What cuModuleLoadData is handed: an ELF cubin, a fatbin container, or NUL-terminated PTX.
 *
 * The driver API passes only a pointer, so libvgpu sizes the image from its own headers (the
 * call table carries the size). And it picks, from a fatbin, the entry a device of the zone's SM
 * would run, exactly as gpu-proxy does (gpu_proxy/modules/fatbin.py: a cubin of the same major
 * and no newer minor, else PTX no newer), to read the parameter layouts of that code.
 *
 * Fatbin layout (nvcc 13): a 16-byte header (u32 magic, u16 version, u16 header size, u64 size
 * of the entries), then entries, each a 64-byte header (u16 kind: 1 PTX / 2 ELF, u16 version,
 * u32 header size, u64 payload size, u32 compressed size, u32, u16 minor, u16 major, u32 SM,
 * u32 + u32 name, u64 flags, u64, u64 uncompressed size) and its payload.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <elf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FATBIN_MAGIC 0xBA55ED50u
#define FATBIN_HEADER 16u
#define ENTRY_HEADER 64u
#define ENTRY_PTX 1
#define ENTRY_ELF 2
#define FLAG_LZ4 0x2000u
#define FLAG_ZSTD 0x8000u
#define MAX_IMAGE VGPU_MAX_cuModuleLoadData_image

static uint16_t rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const uint8_t *p)
{
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

static int too_large(char *why, size_t why_len, const char *what)
{
    snprintf(why, why_len, "%s extends past the %u-byte limit of one module image", what,
             MAX_IMAGE);
    return -1;
}

/* An ELF image ends where the last of its headers, sections and segments ends. */
static int elf_size(const uint8_t *p, size_t *size, char *why, size_t why_len)
{
    Elf64_Ehdr eh;
    uint64_t end = sizeof(eh);

    memcpy(&eh, p, sizeof(eh));
    if (eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_ident[EI_DATA] != ELFDATA2LSB) {
        snprintf(why, why_len, "ELF image is not ELF64 little-endian");
        return -1;
    }
    if (eh.e_shoff) {
        Elf64_Shdr sh;
        uint64_t count = eh.e_shnum;
        if (eh.e_shentsize != sizeof(sh) || eh.e_shoff > MAX_IMAGE)
            return too_large(why, why_len, "ELF section header table");
        if (!count) { /* extended numbering: the count is in section 0 */
            memcpy(&sh, p + eh.e_shoff, sizeof(sh));
            count = sh.sh_size;
        }
        if (count > MAX_IMAGE / sizeof(sh) || eh.e_shoff + count * sizeof(sh) > MAX_IMAGE)
            return too_large(why, why_len, "ELF section header table");
        end = eh.e_shoff + count * sizeof(sh) > end ? eh.e_shoff + count * sizeof(sh) : end;
        for (uint64_t i = 0; i < count; i++) {
            memcpy(&sh, p + eh.e_shoff + i * sizeof(sh), sizeof(sh));
            if (sh.sh_type == SHT_NOBITS)
                continue;
            if (sh.sh_offset > MAX_IMAGE || sh.sh_size > MAX_IMAGE - sh.sh_offset)
                return too_large(why, why_len, "an ELF section");
            end = sh.sh_offset + sh.sh_size > end ? sh.sh_offset + sh.sh_size : end;
        }
    }
    if (eh.e_phoff) {
        Elf64_Phdr ph;
        if (eh.e_phentsize != sizeof(ph) || eh.e_phoff > MAX_IMAGE ||
            eh.e_phoff + (uint64_t)eh.e_phnum * sizeof(ph) > MAX_IMAGE)
            return too_large(why, why_len, "ELF program header table");
        end = eh.e_phoff + (uint64_t)eh.e_phnum * sizeof(ph) > end
                  ? eh.e_phoff + (uint64_t)eh.e_phnum * sizeof(ph)
                  : end;
        for (uint64_t i = 0; i < eh.e_phnum; i++) {
            memcpy(&ph, p + eh.e_phoff + i * sizeof(ph), sizeof(ph));
            if (ph.p_offset > MAX_IMAGE || ph.p_filesz > MAX_IMAGE - ph.p_offset)
                return too_large(why, why_len, "an ELF segment");
            end = ph.p_offset + ph.p_filesz > end ? ph.p_offset + ph.p_filesz : end;
        }
    }
    if (end > MAX_IMAGE)
        return too_large(why, why_len, "the ELF image");
    *size = (size_t)end;
    return 0;
}

/* What nvcc embeds in a program and cudart registers: {magic, version, the fatbin, ...}. */
struct fatbin_wrapper {
    uint32_t magic;
    uint32_t version;
    const void *data;
    const void *filenames;
};

#define FATBIN_WRAPPER_MAGIC 0x466243B1u

const void *vgpu_image_unwrap(const void *image)
{
    const struct fatbin_wrapper *w = image;
    return image && w->magic == FATBIN_WRAPPER_MAGIC ? w->data : image;
}

int vgpu_image_size(const void *image, size_t *size, char *why, size_t why_len)
{
    const uint8_t *p = image;
    size_t n;

    if (!image) {
        snprintf(why, why_len, "no image");
        return -1;
    }
    if (memcmp(p, ELFMAG, SELFMAG) == 0)
        return elf_size(p, size, why, why_len);
    if (rd32(p) == FATBIN_MAGIC) {
        uint64_t header = rd16(p + 6), entries = rd64(p + 8);
        if (header < FATBIN_HEADER || entries > MAX_IMAGE || header + entries > MAX_IMAGE)
            return too_large(why, why_len, "the fatbin");
        *size = (size_t)(header + entries);
        return 0;
    }
    /* Anything else is PTX text, which ends at its NUL. */
    n = strnlen(image, MAX_IMAGE);
    if (n == MAX_IMAGE)
        return too_large(why, why_len, "PTX text (or no NUL terminator)");
    *size = n + 1;
    return 0;
}

struct entry {
    const uint8_t *payload;
    uint64_t size;         /* bytes stored */
    uint64_t uncompressed; /* bytes once decompressed */
    uint32_t arch, flags;
    uint16_t kind;
};

/* The entry the driver would load on SM `arch` (0: the newest), or -1. */
static long select_entry(const struct entry *entries, size_t n, int arch)
{
    long best = -1;

    for (size_t i = 0; i < n; i++) {
        const struct entry *e = &entries[i];
        int ok;
        if (e->kind == ENTRY_ELF)
            ok = !arch || ((int)e->arch / 10 == arch / 10 && (int)e->arch <= arch);
        else if (e->kind == ENTRY_PTX)
            ok = !arch || (int)e->arch <= arch;
        else
            continue;
        /* Prefer a cubin to PTX, then the newest SM; the first of equals wins. */
        if (ok && (best < 0 || (e->kind == ENTRY_ELF) > (entries[best].kind == ENTRY_ELF) ||
                   ((e->kind == ENTRY_ELF) == (entries[best].kind == ENTRY_ELF) &&
                    e->arch > entries[best].arch)))
            best = (long)i;
    }
    return best;
}

/* Every entry of the fatbin into *entries (malloc'd); their count, or -1 with why filled. */
static long fatbin_entries(const uint8_t *p, size_t size, struct entry **entries, char *why,
                           size_t why_len)
{
    size_t n = 0, cap = 0, pos = rd16(p + 6);

    *entries = NULL;
    while (pos < size) {
        const uint8_t *h = p + pos;
        struct entry e;
        uint32_t header;
        uint64_t payload;

        if (size - pos < ENTRY_HEADER) {
            snprintf(why, why_len, "fatbin entry header at %zu is truncated", pos);
            return -1;
        }
        header = rd32(h + 4), payload = rd64(h + 8);
        if (header < ENTRY_HEADER || header > size - pos || payload > size - pos - header) {
            snprintf(why, why_len, "fatbin entry at %zu overruns the image", pos);
            return -1;
        }
        e = (struct entry){h + header, payload, rd64(h + 56), rd32(h + 28),
                           (uint32_t)rd64(h + 40), rd16(h)};
        if (e.flags & (FLAG_LZ4 | FLAG_ZSTD)) {
            if (rd32(h + 16) > payload || e.uncompressed > MAX_IMAGE) {
                snprintf(why, why_len, "fatbin entry at %zu: bad compressed sizes", pos);
                return -1;
            }
            e.size = rd32(h + 16);
        } else {
            e.uncompressed = payload;
        }
        if (n == cap) {
            struct entry *grown = realloc(*entries, (cap = cap ? cap * 2 : 16) * sizeof(e));
            if (!grown) {
                snprintf(why, why_len, "out of memory");
                return -1;
            }
            *entries = grown;
        }
        (*entries)[n++] = e;
        pos += header + payload;
    }
    return (long)n;
}

/* Layouts of the code one fatbin entry holds. */
static void entry_kernels(const struct entry *e, struct vgpu_kernels *out)
{
    uint8_t *decoded = NULL;
    const uint8_t *code = e->payload;

    if (e->flags & FLAG_ZSTD) {
        snprintf(out->why, sizeof(out->why),
                 "the fatbin's %s for sm_%u is zstd-compressed, which libvgpu does not decode "
                 "(build with nvcc -compress-mode=none or =speed, or launch with `extra`)",
                 e->kind == ENTRY_ELF ? "cubin" : "PTX", e->arch);
        return;
    }
    if (e->flags & FLAG_LZ4) {
        decoded = malloc(e->uncompressed ? e->uncompressed : 1);
        if (!decoded || vgpu_lz4_decode(e->payload, e->size, decoded, e->uncompressed)) {
            snprintf(out->why, sizeof(out->why), "the fatbin's LZ4 entry for sm_%u is corrupt",
                     e->arch);
            free(decoded);
            return;
        }
        code = decoded;
    }
    if (e->kind == ENTRY_ELF)
        out->known = !vgpu_cubin_kernels(code, e->uncompressed, out, out->why, sizeof(out->why));
    else
        out->known = !vgpu_ptx_kernels((const char *)code, e->uncompressed, out, out->why,
                                       sizeof(out->why));
    free(decoded);
}

static void fatbin_kernels(const uint8_t *p, size_t size, int arch, struct vgpu_kernels *out)
{
    struct entry *entries;
    long n = fatbin_entries(p, size, &entries, out->why, sizeof(out->why)), chosen;

    if (n >= 0) {
        chosen = select_entry(entries, (size_t)n, arch);
        if (chosen >= 0)
            entry_kernels(&entries[chosen], out);
        else
            snprintf(out->why, sizeof(out->why), "the fatbin has no code for sm_%d", arch);
    }
    free(entries);
}

void vgpu_image_kernels(const uint8_t *image, size_t size, int arch, struct vgpu_kernels *out)
{
    memset(out, 0, sizeof(*out));
    if (size >= SELFMAG && memcmp(image, ELFMAG, SELFMAG) == 0)
        out->known = !vgpu_cubin_kernels(image, size, out, out->why, sizeof(out->why));
    else if (size >= FATBIN_HEADER && rd32(image) == FATBIN_MAGIC)
        fatbin_kernels(image, size, arch, out);
    else
        out->known = !vgpu_ptx_kernels((const char *)image, size, out, out->why,
                                       sizeof(out->why));
    if (!out->known) {
        /* Half-read layouts must not be used: drop them all. */
        struct vgpu_kernels none = {0};
        memcpy(none.why, out->why, sizeof(none.why));
        vgpu_kernels_free(out);
        *out = none;
    }
}

void vgpu_kernels_free(struct vgpu_kernels *k)
{
    for (size_t i = 0; i < k->count; i++) {
        free(k->kernels[i].name);
        free(k->kernels[i].params);
    }
    free(k->kernels);
    k->kernels = NULL;
    k->count = 0;
}

const struct vgpu_kernel *vgpu_kernels_find(const struct vgpu_kernels *k, const char *name)
{
    for (size_t i = 0; i < k->count; i++)
        if (strcmp(k->kernels[i].name, name) == 0)
            return &k->kernels[i];
    return NULL;
}
