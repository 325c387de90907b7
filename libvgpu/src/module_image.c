/*
 * What cuModuleLoadData is handed: an ELF cubin, a fatbin container, or NUL-terminated PTX.
 *
 * The driver API passes only a pointer, so libvgpu sizes the image from its own headers (the
 * call table carries the size); gpu-proxy parses it (gpu_proxy/modules) and returns its kernels
 * (kernel_table.c). A fatbin starts with a 16-byte header: u32 magic, u16 version, u16 header
 * size, u64 size of the entries that follow.
 */
#include "vgpu.h"

#include "vgpu_calls.h"

#include <elf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FATBIN_MAGIC 0xBA55ED50u
#define FATBIN_HEADER 16u
#define MAX_IMAGE VGPU_MAX_cuModuleLoadData_image

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
    if (vgpu_rd32(p) == FATBIN_MAGIC) {
        uint64_t header = vgpu_rd16(p + 6), entries = vgpu_rd64(p + 8);
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
