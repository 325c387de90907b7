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
#define EIATTR_MAX_THREADS 0x05      /* SVAL: u32 x, y, z (__launch_bounds__) */
#define EIATTR_FRAME_SIZE 0x11       /* SVAL in .nv.info: u32 symbol, u32 bytes per thread */
#define EIATTR_REGCOUNT 0x2F         /* SVAL in .nv.info: u32 symbol, u32 registers per thread */
#define NO_SIZE UINT32_MAX
#define RESERVED_SHARED 1024u /* shared memory the hardware keeps per block (sm_80 and later) */

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

/* The bytes of the .nv.info section called `name`: none (*len 0) when there is no such
 * section, -1 when it lies outside the image. */
static int info_section(const struct elf *e, const char *name, const uint8_t **info,
                        size_t *len, char *why, size_t why_len)
{
    long idx = find_section(e, name);
    Elf64_Shdr sh;

    *info = NULL;
    *len = 0;
    if (idx < 0)
        return 0;
    sh = section(e, (size_t)idx);
    if (!in_image(e, sh.sh_offset, sh.sh_size))
        return fail(why, why_len, ".nv.info section outside the image");
    *info = e->data + sh.sh_offset;
    *len = sh.sh_size;
    return 0;
}

/* One kernel's layout from its .nv.info section (absent: no parameters). */
static int read_layout(const struct elf *e, struct vgpu_kernel *k, char *why, size_t why_len)
{
    char name[512];
    const uint8_t *info;
    size_t len, pos, count = 0;
    uint32_t cbank = NO_SIZE, declared = NO_SIZE, end = 0;

    if (snprintf(name, sizeof(name), ".nv.info.%s", k->name) >= (int)sizeof(name))
        return fail(why, why_len, "kernel name too long");
    if (info_section(e, name, &info, &len, why, why_len))
        return -1;
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
            } else if (pass == 1 && attr == EIATTR_MAX_THREADS && fmt == EIFMT_SVAL) {
                uint64_t threads;
                if (field < 12)
                    return fail(why, why_len, "short MAX_THREADS");
                threads = (uint64_t)rd32(value) * rd32(value + 4) * rd32(value + 8);
                k->attrs.max_threads = threads > UINT32_MAX ? UINT32_MAX : (uint32_t)threads;
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

/* The size of the section called `prefix` + `name` (0 when there is none). */
static uint32_t section_size(const struct elf *e, const char *prefix, const char *name)
{
    char full[600];
    long idx;

    if (snprintf(full, sizeof(full), "%s%s", prefix, name) >= (int)sizeof(full))
        return 0;
    idx = find_section(e, full);
    return idx < 0 ? 0 : (uint32_t)section(e, (size_t)idx).sh_size;
}

/* Whether the module has a .nv.shared.reserved.N section. */
static int has_reserved_window(const struct elf *e)
{
    static const char prefix[] = ".nv.shared.reserved.";

    for (size_t i = 1; i < e->shnum; i++) {
        Elf64_Shdr sh = section(e, i);
        const char *s = string_at(e, &e->strtab_hdr, sh.sh_name);
        if (s && strncmp(s, prefix, sizeof(prefix) - 1) == 0)
            return 1;
    }
    return 0;
}

/* Registers and frame sizes from the module's .nv.info, by symbol index (syms[i] is kernel
 * i's); the rest of each kernel's attributes from its sections. */
static int read_attributes(const struct elf *e, struct vgpu_kernels *out, const size_t *syms,
                           uint32_t arch, char *why, size_t why_len)
{
    uint32_t constants = section_size(e, ".nv.constant3", "");
    const uint8_t *info;
    size_t len;

    if (info_section(e, ".nv.info", &info, &len, why, why_len))
        return -1;
    for (size_t i = 0; i < out->count; i++) {
        struct vgpu_func_attrs *a = &out->kernels[i].attrs;
        a->known = 1;
        a->arch = arch;
        a->const_bytes = constants;
        a->shared_static = section_size(e, ".nv.shared.", out->kernels[i].name);
        /* nvcc 13 for sm_90 places a kernel's shared variables after the 1 KiB the hardware
         * reserves per block, and says so with a .nv.shared.reserved.N section: the kernel's
         * section then spans that window too, which is not the kernel's own memory. */
        if (has_reserved_window(e) && a->shared_static >= RESERVED_SHARED)
            a->shared_static -= RESERVED_SHARED;
    }
    for (size_t pos = 0; pos + 4 <= len;) {
        uint8_t fmt = info[pos], attr = info[pos + 1];
        uint16_t field = rd16(info + pos + 2);
        const uint8_t *value = info + pos + 4;

        if (fmt != EIFMT_SVAL) {
            pos += 4;
            continue;
        }
        if (field > len - pos - 4)
            return fail(why, why_len, ".nv.info attribute runs past its section");
        pos += 4u + field;
        if ((attr != EIATTR_REGCOUNT && attr != EIATTR_FRAME_SIZE) || field < 8)
            continue;
        for (size_t i = 0; i < out->count; i++) {
            if (syms[i] != rd32(value))
                continue;
            if (attr == EIATTR_REGCOUNT)
                out->kernels[i].attrs.num_regs = rd32(value + 4);
            else
                out->kernels[i].attrs.local_bytes = rd32(value + 4);
        }
    }
    return 0;
}

int vgpu_cubin_kernels(const uint8_t *data, size_t size, struct vgpu_kernels *out, char *why,
                       size_t why_len)
{
    struct elf e;
    Elf64_Shdr symtab, strtab;
    Elf64_Ehdr eh;
    long symtab_idx = -1;
    size_t nsyms, *syms;
    uint32_t arch;
    int rc = 0;

    if (open_elf(&e, data, size, why, why_len))
        return -1;
    /* The SM: e_flags bits 8-15 since ELF ABI version 8, bits 0-7 before. */
    memcpy(&eh, data, sizeof(eh));
    arch = eh.e_ident[EI_ABIVERSION] >= 8 ? (eh.e_flags >> 8) & 0xFF : eh.e_flags & 0xFF;
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
    syms = calloc(nsyms ? nsyms : 1, sizeof(*syms));
    if (!out->kernels || !syms) {
        free(syms);
        return fail(why, why_len, "out of memory");
    }
    for (size_t i = 0; i < nsyms; i++) {
        Elf64_Sym sym;
        const char *name;
        struct vgpu_kernel *k;

        memcpy(&sym, data + symtab.sh_offset + i * sizeof(sym), sizeof(sym));
        if (ELF64_ST_TYPE(sym.st_info) != STT_FUNC || !(sym.st_other & STO_CUDA_ENTRY))
            continue;
        name = string_at(&e, &strtab, sym.st_name);
        if (!name)
            rc = fail(why, why_len, "symbol name outside its string table");
        else if (vgpu_kernels_find(out, name))
            rc = fail(why, why_len, "kernel defined twice");
        if (rc)
            break;
        syms[out->count] = i;
        k = &out->kernels[out->count++];
        k->name = strdup(name);
        if (!k->name)
            rc = fail(why, why_len, "out of memory");
        else
            rc = read_layout(&e, k, why, why_len);
        if (rc)
            break;
    }
    if (!rc)
        rc = read_attributes(&e, out, syms, arch, why, why_len);
    free(syms);
    return rc;
}
