/*
 * Kernel parameter layouts from an ELF cubin, as gpu-proxy reads them (gpu_proxy/modules/elf.py):
 * kernels are the function symbols nvcc marks as entry points (STO_CUDA_ENTRY), and each
 * kernel's `.nv.info.<name>` section lists its parameters (EIATTR_KPARAM_INFO: ordinal, offset,
 * size packed in bits 18-31; nvcc 12.x+ writes EIATTR_KPARAM_INFO_V2 with a plain u16 size for
 * kernels with large parameters) and the parameter buffer's size (EIATTR_PARAM_CBANK or
 * EIATTR_CBANK_PARAM_SIZE).
 * cuLaunchKernel's kernelParams carry no sizes; these layouts are how they are packed.
 *
 * Every offset and count read from the image is checked against its size.
 */
#include "vgpu.h"

#include <elf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STO_CUDA_ENTRY 0x10
#define EIFMT_NVAL 0x01
#define EIFMT_BVAL 0x02
#define EIFMT_HVAL 0x03
#define EIFMT_SVAL 0x04
#define EIATTR_PARAM_CBANK 0x0A      /* SVAL: u32 bank symbol, u16 offset, u16 parameter bytes */
#define EIATTR_KPARAM_INFO 0x17      /* SVAL: u32 index, u16 ordinal, u16 offset, u32 size << 18 */
#define EIATTR_CBANK_PARAM_SIZE 0x19 /* HVAL: parameter bytes */
#define EIATTR_KPARAM_INFO_V2 0x45   /* SVAL: u32 index, u16 ordinal, u16 offset, u16 size, u16 */
#define NO_SIZE UINT32_MAX

struct elf {
    const uint8_t *data;
    size_t size;
    size_t shnum;
    uint64_t shoff;
    Elf64_Shdr strtab_hdr; /* section names */
};

static uint16_t rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int fail(char *why, size_t why_len, const char *what)
{
    snprintf(why, why_len, "cubin: %s", what);
    return -1;
}

static int in_image(const struct elf *e, uint64_t off, uint64_t len)
{
    return off <= e->size && len <= e->size - off;
}

static Elf64_Shdr section(const struct elf *e, size_t i)
{
    Elf64_Shdr sh;
    memcpy(&sh, e->data + e->shoff + i * sizeof(sh), sizeof(sh));
    return sh;
}

/* The NUL-terminated string at `off` of a string table, or NULL. */
static const char *string_at(const struct elf *e, const Elf64_Shdr *table, uint64_t off)
{
    const char *s;
    if (!in_image(e, table->sh_offset, table->sh_size) || off >= table->sh_size)
        return NULL;
    s = (const char *)e->data + table->sh_offset + off;
    return memchr(s, '\0', table->sh_size - off) ? s : NULL;
}

static int open_elf(struct elf *e, const uint8_t *data, size_t size, char *why, size_t why_len)
{
    Elf64_Ehdr eh;
    size_t shstrndx;

    if (size < sizeof(eh))
        return fail(why, why_len, "shorter than an ELF header");
    memcpy(&eh, data, sizeof(eh));
    if (eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_ident[EI_DATA] != ELFDATA2LSB)
        return fail(why, why_len, "not ELF64 little-endian");
    if (eh.e_shentsize != sizeof(Elf64_Shdr) || eh.e_shoff == 0)
        return fail(why, why_len, "no section header table");
    e->data = data;
    e->size = size;
    e->shoff = eh.e_shoff;
    if (!in_image(e, e->shoff, sizeof(Elf64_Shdr)))
        return fail(why, why_len, "section header table outside the image");
    e->shnum = eh.e_shnum ? eh.e_shnum : section(e, 0).sh_size; /* extended numbering */
    shstrndx = eh.e_shstrndx == SHN_XINDEX ? section(e, 0).sh_link : eh.e_shstrndx;
    if (e->shnum > size / sizeof(Elf64_Shdr) ||
        !in_image(e, e->shoff, (uint64_t)e->shnum * sizeof(Elf64_Shdr)))
        return fail(why, why_len, "section header table outside the image");
    if (shstrndx == 0 || shstrndx >= e->shnum)
        return fail(why, why_len, "section name table index out of range");
    e->strtab_hdr = section(e, shstrndx);
    return 0;
}

/* The section called `name`, or -1. */
static long find_section(const struct elf *e, const char *name)
{
    for (size_t i = 1; i < e->shnum; i++) {
        Elf64_Shdr sh = section(e, i);
        const char *s = string_at(e, &e->strtab_hdr, sh.sh_name);
        if (s && strcmp(s, name) == 0)
            return (long)i;
    }
    return -1;
}

/* One kernel's layout from its .nv.info section (absent: no parameters). */
static int read_layout(const struct elf *e, struct vgpu_kernel *k, char *why, size_t why_len)
{
    char name[512];
    const uint8_t *info = NULL;
    size_t len = 0, pos, count = 0;
    uint32_t cbank = NO_SIZE, declared = NO_SIZE, end = 0;
    long idx;

    if (snprintf(name, sizeof(name), ".nv.info.%s", k->name) >= (int)sizeof(name))
        return fail(why, why_len, "kernel name too long");
    idx = find_section(e, name);
    if (idx >= 0) {
        Elf64_Shdr sh = section(e, (size_t)idx);
        if (!in_image(e, sh.sh_offset, sh.sh_size))
            return fail(why, why_len, ".nv.info section outside the image");
        info = e->data + sh.sh_offset;
        len = sh.sh_size;
    }
    /* Two passes over the attributes: count the parameters, then place them. */
    for (int pass = 0; pass < 2; pass++) {
        for (pos = 0; pos < len;) {
            uint8_t fmt, attr;
            uint16_t field;
            const uint8_t *value;

            if (len - pos < 4)
                return fail(why, why_len, "truncated .nv.info attribute");
            fmt = info[pos], attr = info[pos + 1], field = rd16(info + pos + 2);
            value = info + pos + 4;
            if (fmt == EIFMT_SVAL) {
                if (field > len - pos - 4)
                    return fail(why, why_len, ".nv.info attribute runs past its section");
                pos += 4u + field;
            } else if (fmt == EIFMT_NVAL || fmt == EIFMT_BVAL || fmt == EIFMT_HVAL) {
                pos += 4;
            } else {
                return fail(why, why_len, "unknown .nv.info attribute format");
            }
            if ((attr == EIATTR_KPARAM_INFO || attr == EIATTR_KPARAM_INFO_V2) &&
                fmt == EIFMT_SVAL) {
                uint16_t ordinal, offset;
                uint32_t size;
                if (field < 12)
                    return fail(why, why_len, "short KPARAM_INFO");
                if (pass == 0) {
                    count++;
                    continue;
                }
                ordinal = rd16(value + 4), offset = rd16(value + 6);
                size = attr == EIATTR_KPARAM_INFO ? (rd32(value + 8) >> 18) & 0x3FFF
                                                  : rd16(value + 8);
                if (ordinal >= count || k->params[ordinal].size != NO_SIZE)
                    return fail(why, why_len, "parameter ordinals are not 0..n-1");
                k->params[ordinal] = (struct vgpu_param){offset, size};
                if (offset + size > end)
                    end = offset + size;
            } else if (pass == 1 && attr == EIATTR_PARAM_CBANK && fmt == EIFMT_SVAL) {
                if (field < 8)
                    return fail(why, why_len, "short PARAM_CBANK");
                cbank = rd16(value + 6);
            } else if (pass == 1 && attr == EIATTR_CBANK_PARAM_SIZE && fmt == EIFMT_HVAL) {
                declared = field;
            }
        }
        if (pass == 0) {
            k->nparams = (uint32_t)count;
            k->params = malloc((count ? count : 1) * sizeof(*k->params));
            if (!k->params)
                return fail(why, why_len, "out of memory");
            for (size_t i = 0; i < count; i++)
                k->params[i].size = NO_SIZE;
        }
    }
    if (cbank != NO_SIZE && declared != NO_SIZE && cbank != declared)
        return fail(why, why_len, "PARAM_CBANK and CBANK_PARAM_SIZE disagree");
    k->param_bytes = cbank != NO_SIZE ? cbank : declared != NO_SIZE ? declared : end;
    if (end > k->param_bytes)
        return fail(why, why_len, "parameters end past the parameter buffer");
    return 0;
}

int vgpu_cubin_kernels(const uint8_t *data, size_t size, struct vgpu_kernels *out, char *why,
                       size_t why_len)
{
    struct elf e;
    Elf64_Shdr symtab, strtab;
    long symtab_idx = -1;
    size_t nsyms;

    if (open_elf(&e, data, size, why, why_len))
        return -1;
    for (size_t i = 1; i < e.shnum; i++) {
        if (section(&e, i).sh_type != SHT_SYMTAB)
            continue;
        if (symtab_idx >= 0)
            return fail(why, why_len, "more than one symbol table");
        symtab_idx = (long)i;
    }
    if (symtab_idx < 0)
        return fail(why, why_len, "no symbol table");
    symtab = section(&e, (size_t)symtab_idx);
    if (symtab.sh_entsize != sizeof(Elf64_Sym) || !in_image(&e, symtab.sh_offset, symtab.sh_size) ||
        symtab.sh_link == 0 || symtab.sh_link >= e.shnum)
        return fail(why, why_len, "malformed symbol table");
    strtab = section(&e, symtab.sh_link);
    nsyms = symtab.sh_size / sizeof(Elf64_Sym);
    out->kernels = calloc(nsyms ? nsyms : 1, sizeof(*out->kernels));
    if (!out->kernels)
        return fail(why, why_len, "out of memory");
    for (size_t i = 0; i < nsyms; i++) {
        Elf64_Sym sym;
        const char *name;
        struct vgpu_kernel *k;

        memcpy(&sym, data + symtab.sh_offset + i * sizeof(sym), sizeof(sym));
        if (ELF64_ST_TYPE(sym.st_info) != STT_FUNC || !(sym.st_other & STO_CUDA_ENTRY))
            continue;
        name = string_at(&e, &strtab, sym.st_name);
        if (!name)
            return fail(why, why_len, "symbol name outside its string table");
        if (vgpu_kernels_find(out, name))
            return fail(why, why_len, "kernel defined twice");
        k = &out->kernels[out->count++];
        k->name = strdup(name);
        if (!k->name)
            return fail(why, why_len, "out of memory");
        if (read_layout(&e, k, why, why_len))
            return -1;
    }
    return 0;
}
