/* SPDX-License-Identifier: MIT */
/*
 * vmdk-desc.c - the VMDK text descriptor and the hosted sparse extent
 * header ("KDMV"), decoded from untrusted bytes.
 *
 * Layout from VMware's "Virtual Disk Format 5.0" technote.  The descriptor
 * is a list of lines: comments (#...), key = value pairs (version, CID,
 * parentCID, createType, parentFileNameHint, ddb.*, anything else kept as
 * text) and extent lines "ACCESS SECTORS TYPE ["FILE" [OFFSET]]".  A line
 * that is none of these is an error naming the line, so a damaged
 * descriptor is refused rather than half understood.  The text is kept by
 * the driver and rewritten byte for byte except for the values it changes
 * (vdk_vmdk_desc_set_key).
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "block/block.h"
#include "formats/vmdk.h"

static inline uint32_t
le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t
le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32);
}

static inline void
put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void
put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

/* ------------------------------------------------------------------------ */
/* Descriptor                                                                */
/* ------------------------------------------------------------------------ */

static void
desc_extent_clear(gpointer p)
{
    VmdkDescExtent *e = p;
    g_free(e->fname);
    g_free(e->type_name);
}

void
vdk_vmdk_desc_clear(VmdkDesc *d)
{
    g_free(d->create_type);
    g_free(d->parent_hint);
    if (d->extents) {
        g_array_unref(d->extents);
    }
    memset(d, 0, sizeof(*d));
}

/* A decimal number that fits in 64 bits, the whole token. */
static bool
parse_u64(const char *s, size_t len, uint64_t *out)
{
    if (len == 0 || len > 20) {
        return false;
    }
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return false;
        }
        if (vdk_mul_overflows(v, 10, &v) || vdk_add_overflows(v, (uint64_t)(s[i] - '0'), &v)) {
            return false;
        }
    }
    *out = v;
    return true;
}

static bool
parse_hex32(const char *s, uint32_t *out)
{
    size_t len = strlen(s);
    if (len == 0 || len > 8) {
        return false;
    }
    uint32_t v = 0;
    for (size_t i = 0; i < len; i++) {
        int x = g_ascii_xdigit_value(s[i]);
        if (x < 0) {
            return false;
        }
        v = (v << 4) | (uint32_t)x;
    }
    *out = v;
    return true;
}

static const char *
skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t')) {
        p++;
    }
    return p;
}

static const char *
token_end(const char *p, const char *end)
{
    while (p < end && *p != ' ' && *p != '\t') {
        p++;
    }
    return p;
}

static bool
is_access(const char *p, size_t n, VmdkAccess *a)
{
    if (n == 2 && !memcmp(p, "RW", 2)) {
        *a = VMDK_ACCESS_RW;
    } else if (n == 6 && !memcmp(p, "RDONLY", 6)) {
        *a = VMDK_ACCESS_RDONLY;
    } else if (n == 8 && !memcmp(p, "NOACCESS", 8)) {
        *a = VMDK_ACCESS_NOACCESS;
    } else {
        return false;
    }
    return true;
}

static bool
parse_extent_line(const char *p, const char *end, int lineno, VmdkDesc *d, GError **error)
{
    VmdkDescExtent e = {0};
    char *shown = g_strndup(p, (gsize)MIN(end - p, 200));
    const char *t = token_end(p, end);
    is_access(p, (size_t)(t - p), &e.access);
    p = skip_ws(t, end);
    t = token_end(p, end);
    if (!parse_u64(p, (size_t)(t - p), &e.sectors) || e.sectors > VMDK_MAX_CAPACITY_SECTORS) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: invalid extent size '%.*s' in '%s'",
                    lineno, (int)MIN(t - p, 40), p, shown);
        goto fail;
    }
    p = skip_ws(t, end);
    t = token_end(p, end);
    size_t tl = (size_t)(t - p);
    e.type_name = g_strndup(p, tl);
    if (!strcmp(e.type_name, "FLAT") || !strcmp(e.type_name, "VMFS")) {
        e.type = VMDK_ET_FLAT;
    } else if (!strcmp(e.type_name, "SPARSE")) {
        e.type = VMDK_ET_SPARSE;
    } else if (!strcmp(e.type_name, "ZERO")) {
        e.type = VMDK_ET_ZERO;
    } else if (!strcmp(e.type_name, "VMFSSPARSE") || !strcmp(e.type_name, "SESPARSE") ||
               !strcmp(e.type_name, "VMFSRDM") || !strcmp(e.type_name, "VMFSRAW")) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: descriptor line %d: extent type '%s' is not supported",
                    lineno, e.type_name);
        goto fail;
    } else {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: unknown extent type '%.*s' in '%s'", lineno,
                    (int)MIN(tl, 40), p, shown);
        goto fail;
    }
    p = skip_ws(t, end);
    if (e.type != VMDK_ET_ZERO) {
        if (p >= end || *p != '"') {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: extent file name must be quoted in '%s'",
                        lineno, shown);
            goto fail;
        }
        const char *q = memchr(p + 1, '"', (size_t)(end - p - 1));
        if (!q) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: unterminated extent file name in '%s'",
                        lineno, shown);
            goto fail;
        }
        size_t nl = (size_t)(q - p - 1);
        if (nl == 0 || nl > VMDK_MAX_NAME || memchr(p + 1, '\0', nl)) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: invalid extent file name (%zu bytes)",
                        lineno, nl);
            goto fail;
        }
        e.fname = g_strndup(p + 1, nl);
        p = skip_ws(q + 1, end);
        if (e.type == VMDK_ET_FLAT && p < end) {
            t = token_end(p, end);
            if (!parse_u64(p, (size_t)(t - p), &e.offset) || e.offset > VMDK_MAX_CAPACITY_SECTORS) {
                g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: invalid extent offset '%.*s'",
                            lineno, (int)MIN(t - p, 40), p);
                goto fail;
            }
            p = skip_ws(t, end);
        }
    }
    if (p < end) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: unexpected text '%.*s' after the extent",
                    lineno, (int)MIN(end - p, 40), p);
        goto fail;
    }
    if (d->extents->len >= VMDK_MAX_EXTENTS) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: too many extents (more than %u)", VMDK_MAX_EXTENTS);
        goto fail;
    }
    if (vdk_add_overflows(d->total_sectors, e.sectors, &d->total_sectors) ||
        d->total_sectors > VMDK_MAX_CAPACITY_SECTORS) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: extents add up to more than %" G_GUINT64_FORMAT " sectors",
                    (uint64_t)VMDK_MAX_CAPACITY_SECTORS);
        goto fail;
    }
    g_array_append_val(d->extents, e);
    g_free(shown);
    return true;
fail:
    desc_extent_clear(&e);
    g_free(shown);
    return false;
}

static char *
unquote(const char *v, size_t len)
{
    if (len >= 2 && v[0] == '"' && v[len - 1] == '"') {
        return g_strndup(v + 1, len - 2);
    }
    return g_strndup(v, len);
}

bool
vdk_vmdk_desc_parse(const char *text, size_t len, VmdkDesc *d, GError **error)
{
    memset(d, 0, sizeof(*d));
    d->extents = g_array_new(FALSE, TRUE, sizeof(VmdkDescExtent));
    g_array_set_clear_func(d->extents, desc_extent_clear);
    d->version = 1;
    const char *nul = memchr(text, '\0', len);
    const char *end = nul ? nul : text + len;
    int lineno = 0;
    for (const char *p = text; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *next = nl ? nl + 1 : end;
        lineno++;
        while (le > p && (le[-1] == '\r' || le[-1] == ' ' || le[-1] == '\t')) {
            le--;
        }
        p = skip_ws(p, le);
        if (p == le || *p == '#') {
            p = next;
            continue;
        }
        const char *t = token_end(p, le);
        VmdkAccess acc;
        if (is_access(p, (size_t)(t - p), &acc)) {
            if (!parse_extent_line(p, le, lineno, d, error)) {
                goto fail;
            }
            p = next;
            continue;
        }
        const char *eq = memchr(p, '=', (size_t)(le - p));
        if (!eq) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: cannot parse '%.*s'", lineno,
                        (int)MIN(le - p, 60), p);
            goto fail;
        }
        const char *ke = eq;
        while (ke > p && (ke[-1] == ' ' || ke[-1] == '\t')) {
            ke--;
        }
        for (const char *k = p; k < ke; k++) {
            if (!g_ascii_isalnum(*k) && *k != '.' && *k != '_' && *k != '-') {
                g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: invalid key '%.*s'", lineno,
                            (int)MIN(ke - p, 60), p);
                goto fail;
            }
        }
        if (ke == p) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: empty key", lineno);
            goto fail;
        }
        char *key = g_strndup(p, (gsize)(ke - p));
        const char *v = skip_ws(eq + 1, le);
        char *val = unquote(v, (size_t)(le - v));
        bool ok = true;
        if (!strcmp(key, "CID")) {
            ok = parse_hex32(val, &d->cid);
            d->has_cid = true;
        } else if (!strcmp(key, "parentCID")) {
            ok = parse_hex32(val, &d->parent_cid);
            d->has_parent_cid = true;
        } else if (!strcmp(key, "version")) {
            uint64_t ver = 0;
            ok = parse_u64(val, strlen(val), &ver) && ver >= 1 && ver <= 3;
            d->version = (uint32_t)ver;
        } else if (!strcmp(key, "createType")) {
            g_free(d->create_type);
            d->create_type = g_strdup(val);
        } else if (!strcmp(key, "parentFileNameHint")) {
            ok = *val && strlen(val) <= VMDK_MAX_NAME;
            g_free(d->parent_hint);
            d->parent_hint = g_strdup(val);
        }
        if (!ok) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor line %d: invalid value '%.40s' for %s", lineno,
                        val, key);
        }
        g_free(key);
        g_free(val);
        if (!ok) {
            goto fail;
        }
        p = next;
    }
    return true;
fail:
    vdk_vmdk_desc_clear(d);
    return false;
}

char *
vdk_vmdk_desc_set_key(const char *text, const char *key, const char *value)
{
    GString *out = g_string_new(NULL);
    size_t klen = strlen(key);
    bool done = false;
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        const char *next = nl ? nl + 1 : p + strlen(p);
        const char *q = skip_ws(p, next);
        if (!done && !strncmp(q, key, klen)) {
            const char *r = skip_ws(q + klen, next);
            if (r < next && *r == '=') {
                /* keep the line's own spacing and line ending */
                const char *v = skip_ws(r + 1, next);
                const char *ve = nl ? nl : next;
                bool cr = ve > v && ve[-1] == '\r';
                g_string_append_len(out, p, v - p);
                bool quoted = v < ve && *v == '"';
                g_string_append_printf(out, quoted ? "\"%s\"" : "%s", value);
                if (cr) {
                    g_string_append_c(out, '\r');
                }
                if (nl) {
                    g_string_append_c(out, '\n');
                }
                done = true;
                p = next;
                continue;
            }
        }
        if (!done && !strncmp(q, "# Extent description", 20)) {
            g_string_append_printf(out, "%s=%s\n", key, value);
            done = true;
        }
        g_string_append_len(out, p, next - p);
        p = next;
    }
    if (!done) {
        if (out->len && out->str[out->len - 1] != '\n') {
            g_string_append_c(out, '\n'); /* the last line had no line end */
        }
        g_string_append_printf(out, "%s=%s\n", key, value);
    }
    return g_string_free(out, FALSE);
}

/* ------------------------------------------------------------------------ */
/* Sparse extent header                                                      */
/* ------------------------------------------------------------------------ */

void
vdk_vmdk_header_decode(const uint8_t *b, VmdkHeader *h)
{
    h->version = le32(b + 4);
    h->flags = le32(b + 8);
    h->capacity = le64(b + 12);
    h->grain_size = le64(b + 20);
    h->desc_offset = le64(b + 28);
    h->desc_size = le64(b + 36);
    h->num_gtes = le32(b + 44);
    h->rgd_offset = le64(b + 48);
    h->gd_offset = le64(b + 56);
    h->overhead = le64(b + 64);
    h->unclean = b[72];
    h->compress = (uint16_t)(b[77] | (b[78] << 8));
}

void
vdk_vmdk_header_encode(const VmdkHeader *h, uint8_t *b)
{
    memset(b, 0, 512);
    put32(b, VMDK4_MAGIC);
    put32(b + 4, h->version);
    put32(b + 8, h->flags);
    put64(b + 12, h->capacity);
    put64(b + 20, h->grain_size);
    put64(b + 28, h->desc_offset);
    put64(b + 36, h->desc_size);
    put32(b + 44, h->num_gtes);
    put64(b + 48, h->rgd_offset);
    put64(b + 56, h->gd_offset);
    put64(b + 64, h->overhead);
    b[72] = h->unclean;
    b[73] = '\n';
    b[74] = ' ';
    b[75] = '\r';
    b[76] = '\n';
    b[77] = (uint8_t)h->compress;
    b[78] = (uint8_t)(h->compress >> 8);
}

uint64_t
vdk_vmdk_gd_entries(const VmdkHeader *h)
{
    uint64_t grains = (h->capacity + h->grain_size - 1) / h->grain_size;
    return (grains + h->num_gtes - 1) / h->num_gtes;
}

/* [off, off + len) sectors lies within @file_size bytes. */
static bool
sectors_within(uint64_t off, uint64_t bytes, uint64_t file_size)
{
    uint64_t start, e;
    if (vdk_mul_overflows(off, 512, &start) || vdk_add_overflows(start, bytes, &e)) {
        return false;
    }
    return e <= file_size;
}

bool
vdk_vmdk_header_check(const VmdkHeader *h, uint64_t file_size, bool footer, GError **error)
{
    if (h->version < 1 || h->version > 3) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: unsupported version %u (1 to 3 are supported)", h->version);
        return false;
    }
    if (h->flags & ~VMDK4_FLAGS_KNOWN) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: unknown flags 0x%x in the header",
                    h->flags & ~VMDK4_FLAGS_KNOWN);
        return false;
    }
    if (h->capacity > VMDK_MAX_CAPACITY_SECTORS) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: capacity %" G_GUINT64_FORMAT " sectors is too large (max %"
                    G_GUINT64_FORMAT ")", h->capacity, (uint64_t)VMDK_MAX_CAPACITY_SECTORS);
        return false;
    }
    if (h->grain_size < VMDK_MIN_GRAIN_SECTORS || h->grain_size > VMDK_MAX_GRAIN_SECTORS ||
        (h->grain_size & (h->grain_size - 1))) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vmdk: invalid grainSize %" G_GUINT64_FORMAT " sectors (a power of two, 1 to %" G_GUINT64_FORMAT ")",
                    h->grain_size, (uint64_t)VMDK_MAX_GRAIN_SECTORS);
        return false;
    }
    if (h->num_gtes == 0 || h->num_gtes > VMDK_MAX_GTES) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: invalid numGTEsPerGT %u (1 to %u)", h->num_gtes, VMDK_MAX_GTES);
        return false;
    }
    if ((h->flags & VMDK4_FLAG_COMPRESS) && h->compress != 1) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: unsupported compressAlgorithm %u", h->compress);
        return false;
    }
    if (h->desc_offset) {
        if (h->desc_size == 0 || h->desc_size > VMDK_MAX_DESC_BYTES / 512 ||
            !sectors_within(h->desc_offset, h->desc_size * 512, file_size)) {
            g_set_error(error, VDK_ERROR, EINVAL,
                        "vmdk: invalid descriptor location (offset %" G_GUINT64_FORMAT ", size %" G_GUINT64_FORMAT
                        " sectors, file %" G_GUINT64_FORMAT " bytes)",
                        h->desc_offset, h->desc_size, file_size);
            return false;
        }
    }
    uint64_t gd_bytes = vdk_vmdk_gd_entries(h) * 4;
    if (gd_bytes > VMDK_MAX_GD_BYTES) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: grain directory too large (%" G_GUINT64_FORMAT " bytes, max %u)",
                    gd_bytes, VMDK_MAX_GD_BYTES);
        return false;
    }
    bool at_end = h->gd_offset == VMDK_GD_AT_END;
    if (at_end && (footer || !(h->flags & VMDK4_FLAG_COMPRESS))) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: invalid gdOffset 0x%" G_GINT64_MODIFIER "x", h->gd_offset);
        return false;
    }
    if (!at_end && (h->gd_offset == 0 || !sectors_within(h->gd_offset, gd_bytes, file_size))) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vmdk: invalid gdOffset %" G_GUINT64_FORMAT " (grain directory of %" G_GUINT64_FORMAT
                    " bytes, file %" G_GUINT64_FORMAT " bytes)",
                    h->gd_offset, gd_bytes, file_size);
        return false;
    }
    if ((h->flags & VMDK4_FLAG_RGD) && !at_end &&
        (h->rgd_offset == 0 || !sectors_within(h->rgd_offset, gd_bytes, file_size))) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vmdk: invalid rgdOffset %" G_GUINT64_FORMAT " (file %" G_GUINT64_FORMAT " bytes)", h->rgd_offset,
                    file_size);
        return false;
    }
    if (h->overhead > VMDK_MAX_CAPACITY_SECTORS || (!at_end && h->overhead * 512 > vdk_align_up(file_size, 512))) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vmdk: invalid overHead %" G_GUINT64_FORMAT " sectors (file %" G_GUINT64_FORMAT " bytes)",
                    h->overhead, file_size);
        return false;
    }
    return true;
}

void
vdk_vmdk_remove_extents(const char *path)
{
    gchar *text = NULL;
    gsize len = 0;
    if (!g_file_get_contents(path, &text, &len, NULL)) {
        return;
    }
    VmdkDesc d;
    if (len <= VMDK_MAX_DESC_BYTES && len >= 4 && memcmp(text, "KDMV", 4) != 0 &&
        vdk_vmdk_desc_parse(text, len, &d, NULL)) {
        for (guint i = 0; i < d.extents->len; i++) {
            const char *name = g_array_index(d.extents, VmdkDescExtent, i).fname;
            if (name && !strchr(name, '/') && strcmp(name, ".") && strcmp(name, "..")) {
                char *p = vdk_backing_path(path, name);
                if (strcmp(p, path)) {
                    unlink(p);
                }
                g_free(p);
            }
        }
        vdk_vmdk_desc_clear(&d);
    }
    g_free(text);
}
