/*
 * Kernel parameter layouts from PTX text, as gpu-proxy reads them (gpu_proxy/modules/fatbin.py):
 * each `.entry name(...)` lists `.param [.align N] .<u|s|b|f><bits> [qualifiers] name[[count]]`,
 * and the driver lays parameters out in order, each at the next multiple of its alignment (the
 * element size unless `.align` says otherwise).
 */
#include "vgpu.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct cursor {
    const char *p, *end;
};

static int fail(char *why, size_t why_len, const char *what, const char *kernel)
{
    snprintf(why, why_len, "PTX%s%s: %s", kernel ? " kernel " : "", kernel ? kernel : "", what);
    return -1;
}

/* The text with comments blanked out (same length, so offsets agree); NULL when out of memory. */
static char *strip_comments(const char *text, size_t len)
{
    char *out = malloc(len + 1);

    if (!out)
        return NULL;
    memcpy(out, text, len);
    out[len] = '\0';
    for (size_t i = 0; i + 1 < len; i++) {
        if (out[i] == '/' && out[i + 1] == '/') {
            while (i < len && out[i] != '\n')
                out[i++] = ' ';
        } else if (out[i] == '/' && out[i + 1] == '*') {
            out[i] = out[i + 1] = ' ';
            for (i += 2; i < len && !(out[i] == '*' && i + 1 < len && out[i + 1] == '/'); i++)
                out[i] = ' ';
            if (i < len)
                out[i] = out[i + 1] = ' '; /* an unterminated comment runs to the end */
        }
    }
    return out;
}

static int skip_space(struct cursor *c)
{
    const char *start = c->p;
    while (c->p < c->end && isspace((unsigned char)*c->p))
        c->p++;
    return c->p > start;
}

static int word(struct cursor *c, const char *w)
{
    size_t n = strlen(w);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, w, n) != 0)
        return 0;
    c->p += n;
    return 1;
}

static int number(struct cursor *c, unsigned long *v)
{
    char *stop;
    if (c->p == c->end || !isdigit((unsigned char)*c->p))
        return 0;
    *v = strtoul(c->p, &stop, 10);
    c->p = stop < c->end ? stop : c->end;
    return 1;
}

static int ident_start(char ch)
{
    return isalpha((unsigned char)ch) || ch == '_' || ch == '$' || ch == '%';
}

static int ident_char(char ch)
{
    return ident_start(ch) || isdigit((unsigned char)ch);
}

static int identifier(struct cursor *c)
{
    if (c->p == c->end || !ident_start(*c->p))
        return 0;
    while (c->p < c->end && ident_char(*c->p))
        c->p++;
    return 1;
}

/* One declaration of a parameter list: its size and alignment; -1 if it is not one. */
static int parse_param(struct cursor *c, uint32_t *size, uint32_t *align)
{
    unsigned long explicit_align = 0, bits = 0, count = 1;

    skip_space(c);
    if (!word(c, ".param") || !skip_space(c))
        return -1;
    if (word(c, ".align")) {
        if (!skip_space(c) || !number(c, &explicit_align) || !skip_space(c))
            return -1;
    }
    if (!word(c, ".") || c->p == c->end || !strchr("usbf", *c->p))
        return -1;
    c->p++;
    if (!number(c, &bits) || (bits != 8 && bits != 16 && bits != 32 && bits != 64))
        return -1;
    /* Qualifiers such as `.ptr .global .align 8`, then the parameter's name. */
    for (;;) {
        if (!skip_space(c))
            return -1;
        if (!word(c, "."))
            break;
        if (!identifier(c))
            return -1;
        {
            struct cursor peek = *c;
            unsigned long ignored;
            if (skip_space(&peek) && number(&peek, &ignored))
                *c = peek;
        }
    }
    if (!identifier(c))
        return -1;
    skip_space(c);
    if (word(c, "[")) {
        skip_space(c);
        if (!number(c, &count))
            return -1;
        skip_space(c);
        if (!word(c, "]"))
            return -1;
        skip_space(c);
    }
    if (c->p != c->end || count > 0xFFFF)
        return -1;
    *align = (uint32_t)(explicit_align ? explicit_align : bits / 8);
    *size = (uint32_t)(bits / 8 * count);
    return *align && !(*align & (*align - 1)) ? 0 : -1;
}

/* The parameter list between `(` and `)` of one kernel. */
static int parse_params(const char *list, size_t len, struct vgpu_kernel *k, char *why,
                        size_t why_len)
{
    uint32_t offset = 0, n = 0;
    const char *p = list, *end = list + len;

    k->params = malloc((len / 2 + 1) * sizeof(*k->params)); /* every declaration has a comma */
    if (!k->params)
        return fail(why, why_len, "out of memory", k->name);
    while (p < end) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        struct cursor c = {p, comma ? comma : end};
        uint32_t size, align;

        skip_space(&c);
        if (c.p < c.end) {
            if (parse_param(&c, &size, &align))
                return fail(why, why_len, "cannot parse a parameter", k->name);
            offset = (offset + align - 1) / align * align;
            k->params[n++] = (struct vgpu_param){offset, size};
            offset += size;
        }
        p = comma ? comma + 1 : end;
    }
    k->nparams = n;
    k->param_bytes = offset;
    return 0;
}

int vgpu_ptx_kernels(const char *text, size_t len, struct vgpu_kernels *out, char *why,
                     size_t why_len)
{
    const char *nul = memchr(text, '\0', len);
    char *src = strip_comments(text, nul ? (size_t)(nul - text) : len);
    size_t cap = 0;
    int rc = 0;

    if (!src)
        return fail(why, why_len, "out of memory", NULL);
    for (const char *p = src; (p = strstr(p, ".entry")) != NULL && !rc;) {
        struct cursor c = {p + 6, src + strlen(src)};
        const char *name;
        struct vgpu_kernel *k;

        p += 6;
        if (!skip_space(&c) || (name = c.p, !identifier(&c)))
            continue;
        if (out->count == cap) {
            struct vgpu_kernel *grown;
            cap = cap ? cap * 2 : 8;
            grown = realloc(out->kernels, cap * sizeof(*grown));
            if (!grown) {
                rc = fail(why, why_len, "out of memory", NULL);
                break;
            }
            out->kernels = grown;
        }
        k = &out->kernels[out->count];
        memset(k, 0, sizeof(*k));
        k->name = strndup(name, (size_t)(c.p - name));
        if (!k->name) {
            rc = fail(why, why_len, "out of memory", NULL);
            break;
        }
        out->count++;
        if (vgpu_kernels_find(out, k->name) != k) {
            rc = fail(why, why_len, "defined twice", k->name);
            break;
        }
        skip_space(&c);
        if (word(&c, "(")) {
            const char *close = memchr(c.p, ')', (size_t)(c.end - c.p));
            if (!close) {
                rc = fail(why, why_len, "parameter list is not closed", k->name);
                break;
            }
            rc = parse_params(c.p, (size_t)(close - c.p), k, why, why_len);
            p = close + 1;
        }
    }
    free(src);
    return rc;
}
