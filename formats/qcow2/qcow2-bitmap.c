/* SPDX-License-Identifier: MIT */
/*
 * qcow2-bitmap.c - persistent dirty bitmaps (QEMU's docs/interop/qcow2.txt,
 * "Bitmaps extension" and "Bitmaps"): loading and validating the bitmap
 * directory, tracking enabled bitmaps while the image is written, storing
 * them on close, the qemu-img bitmap actions, and info's listing.
 *
 * The directory counts only while the autoclear bit 0 is set (the spec:
 * a program that does not maintain bitmaps clears it, and then every
 * bitmap is inconsistent).  A read-write open loads every enabled ("auto")
 * bitmap into memory and sets its in_use flag on disk, synced, before any
 * write can reach the image; every write, write-zeroes and discard then
 * sets bits in memory (an atomic OR, no I/O).  Closing stores the bits in
 * new clusters, writes a new directory, makes both durable, switches the
 * header extension to it and only then frees the old clusters: a crash
 * leaves either the old directory (the tracked bitmaps still flagged in
 * use, i.e. inconsistent, as the spec requires) or the new one, at worst
 * with leaked clusters.
 *
 * Bitmaps vdk cannot maintain (granularity outside 2^9..2^31, extra data
 * without the extra_data_compatible flag) are kept byte for byte; if one
 * of them is enabled, a read-write open clears the autoclear bit instead
 * (all bitmaps inconsistent, as the spec says a program must).  Malformed
 * directories (reserved flags or types, bad sizes, offsets outside the
 * file or over other metadata, duplicate names) fail the open with a
 * one-line error naming the field and value.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"

#define BM_TABLE_RESERVED 0xff000000000001feULL /* bits 1-8, 56-63 */
#define BM_TABLE_OFFSET 0x00fffffffffffe00ULL
#define BM_TABLE_ONES 1ULL

/* Bits a bitmap of 2^@g bytes per bit needs for the disk. */
static uint64_t
bm_nbits(uint64_t size, unsigned g)
{
    uint64_t n = g >= 64 ? 0 : size >> g;
    if (g >= 64 ? size != 0 : (size & ((1ULL << g) - 1)) != 0) {
        n++;
    }
    return n;
}

static uint64_t
bm_bytes(uint64_t nbits)
{
    return nbits / 8 + (nbits % 8 != 0);
}

static uint64_t
bm_clusters(const Qcow2 *s, uint64_t nbits)
{
    uint64_t b = bm_bytes(nbits);
    return (b + s->cluster_size - 1) >> s->cluster_bits;
}

static void
bm_clear_one(Qcow2Bitmap *bm)
{
    g_free(bm->name);
    g_free(bm->extra);
    g_free(bm->bits);
    memset(bm, 0, sizeof(*bm));
}

void
qcow2_bitmaps_free(Qcow2 *s)
{
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        bm_clear_one(&s->bitmaps[i]);
    }
    g_free(s->bitmaps);
    g_free(s->bm_track);
    g_free(s->bm_error);
    s->bitmaps = NULL;
    s->bm_track = NULL;
    s->bm_error = NULL;
    s->nb_bitmaps = s->nb_track = 0;
}

/* The hot-path list: the tracked bitmaps.  Called with no I/O in flight. */
static void
rebuild_track(Qcow2 *s)
{
    g_free(s->bm_track);
    s->bm_track = NULL;
    uint32_t n = 0;
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        n += s->bitmaps[i].tracking;
    }
    if (n) {
        s->bm_track = g_new(Qcow2Bitmap *, n);
        n = 0;
        for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
            if (s->bitmaps[i].tracking) {
                s->bm_track[n++] = &s->bitmaps[i];
            }
        }
    }
    __atomic_store_n(&s->nb_track, n, __ATOMIC_RELEASE);
}

/* [off, off+len) overlaps the header cluster, the active L1 table, the
 * refcount table or the snapshot table. */
static bool
overlaps_meta(const Qcow2 *s, uint64_t off, uint64_t len)
{
    struct {
        uint64_t o, l;
    } m[3] = {
        {0, s->cluster_size},
        {s->l1_offset, (uint64_t)s->l1_size * 8},
        {s->reftable_offset, (uint64_t)s->reftable_clusters << s->cluster_bits},
    };
    for (int i = 0; i < 3; i++) {
        if (m[i].l && off < m[i].o + m[i].l && m[i].o < off + len) {
            return true;
        }
    }
    return false;
}

/* An on-disk range: aligned, inside the file, clear of other metadata. */
static bool
range_ok(const Qcow2 *s, uint64_t off, uint64_t len)
{
    uint64_t end;
    return !(off & (s->cluster_size - 1)) && off >= s->cluster_size && !vdk_add_overflows(off, len, &end) &&
           end <= s->file->size && !overlaps_meta(s, off, len);
}

/* ------------------------------------------------------------------------ */
/* The directory                                                             */
/* ------------------------------------------------------------------------ */

static uint64_t
entry_len(const Qcow2Bitmap *bm)
{
    return (24 + (uint64_t)bm->extra_len + strlen(bm->name) + 7) & ~7ULL;
}

static uint64_t
dir_len(const Qcow2 *s)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        n += entry_len(&s->bitmaps[i]);
    }
    return n;
}

static void
dir_fill(const Qcow2 *s, uint8_t *buf)
{
    uint64_t p = 0;
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        const Qcow2Bitmap *bm = &s->bitmaps[i];
        uint8_t *e = buf + p;
        size_t nl = strlen(bm->name);
        memset(e, 0, entry_len(bm));
        qput64(e, bm->table_offset);
        qput32(e + 8, bm->table_size);
        qput32(e + 12, bm->flags);
        e[16] = bm->type;
        e[17] = bm->gran_bits;
        qput16(e + 18, (uint16_t)nl);
        qput32(e + 20, bm->extra_len);
        if (bm->extra_len) {
            memcpy(e + 24, bm->extra, bm->extra_len);
        }
        memcpy(e + 24 + bm->extra_len, bm->name, nl);
        p += entry_len(bm);
    }
}

static bool
parse_entry(Qcow2 *s, const uint8_t *dir, uint64_t dir_size, uint64_t *pos, uint32_t i, Qcow2Bitmap *bm,
            GError **error)
{
    uint64_t p = *pos;
    if (dir_size - p < 24) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: bitmap directory: entry %u starts at byte %" PRIu64 " of %" PRIu64 " (truncated)", i, p,
                    dir_size);
        return false;
    }
    const uint8_t *e = dir + p;
    uint16_t name_len = qbe16(e + 18);
    uint32_t extra = qbe32(e + 20);
    uint64_t len = (24 + (uint64_t)extra + name_len + 7) & ~7ULL;
    if (name_len == 0 || name_len > QCOW2_BM_MAX_NAME) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmap directory: entry %u: name length %u is invalid (1 to %d)",
                    i, name_len, QCOW2_BM_MAX_NAME);
        return false;
    }
    if (len > dir_size - p) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: bitmap directory: entry %u (%" PRIu64 " bytes with extra data %u) runs past the directory "
                    "(%" PRIu64 " bytes)",
                    i, len, extra, dir_size);
        return false;
    }
    bm->table_offset = qbe64(e);
    bm->table_size = qbe32(e + 8);
    bm->flags = qbe32(e + 12);
    bm->type = e[16];
    bm->gran_bits = e[17];
    bm->extra_len = extra;
    bm->extra = extra ? g_memdup2(e + 24, extra) : NULL;
    const char *name = (const char *)e + 24 + extra;
    if (memchr(name, 0, name_len)) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmap directory: entry %u: the name contains a NUL byte", i);
        return false;
    }
    bm->name = g_strndup(name, name_len);
    for (uint64_t k = 24 + (uint64_t)extra + name_len; k < len; k++) {
        if (e[k]) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmap '%s': padding byte %" PRIu64 " is not zero", bm->name,
                        k);
            return false;
        }
    }
    if (bm->flags & ~QCOW2_BM_KNOWN_FLAGS) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmap '%s': reserved flags 0x%x are set", bm->name,
                    bm->flags & ~QCOW2_BM_KNOWN_FLAGS);
        return false;
    }
    if (bm->type != 1) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmap '%s': type %u is invalid (1: dirty tracking)", bm->name,
                    bm->type);
        return false;
    }
    if (bm->gran_bits > 63) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmap '%s': granularity_bits %u is invalid (0 to 63)", bm->name,
                    bm->gran_bits);
        return false;
    }
    /* an in-use bitmap may be sized for another disk size (a resize was
     * interrupted): it can only be removed, so only its extent matters */
    uint64_t need = bm_clusters(s, bm_nbits(s->size, bm->gran_bits));
    if (bm->table_size == 0 || bm->table_size > QCOW2_BM_MAX_TABLE ||
        ((uint64_t)bm->table_size << s->cluster_bits) > QCOW2_BM_MAX_PHYS ||
        (bm->table_size < need && !(bm->flags & QCOW2_BM_IN_USE))) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: bitmap '%s': bitmap_table_size %u is invalid (%" PRIu64 " entries cover the disk; "
                    "bitmap data is limited to %llu bytes)",
                    bm->name, bm->table_size, need, (unsigned long long)QCOW2_BM_MAX_PHYS);
        return false;
    }
    if (!range_ok(s, bm->table_offset, (uint64_t)bm->table_size * 8)) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: bitmap '%s': bitmap_table_offset 0x%" PRIx64 " (%u entries) is unaligned, outside the "
                    "file or over other metadata",
                    bm->name, bm->table_offset, bm->table_size);
        return false;
    }
    bm->usable = bm->gran_bits >= QCOW2_BM_MIN_GRAN_BITS && bm->gran_bits <= QCOW2_BM_MAX_GRAN_BITS &&
                 (extra == 0 || (bm->flags & QCOW2_BM_EXTRA_COMPAT));
    *pos = p + len;
    return true;
}

bool
qcow2_bitmaps_load(Qcow2 *s, GError **error)
{
    if (s->version < 3 || !(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) || !s->bm_ext) {
        return true;
    }
    uint32_t nb = s->bm_ext_nb;
    uint64_t size = s->bm_dir_size, off = s->bm_dir_offset;
    if (nb == 0 || nb > QCOW2_BM_MAX_BITMAPS) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmaps extension: nb_bitmaps %u is invalid (1 to %d)", nb,
                    QCOW2_BM_MAX_BITMAPS);
        return false;
    }
    if (size < (uint64_t)nb * 24 || size > QCOW2_BM_MAX_DIR_SIZE) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: bitmaps extension: bitmap_directory_size %" PRIu64 " is invalid for %u bitmaps (max %u)",
                    size, nb, QCOW2_BM_MAX_DIR_SIZE);
        return false;
    }
    if (!range_ok(s, off, size)) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: bitmaps extension: bitmap_directory_offset 0x%" PRIx64 " (%" PRIu64 " bytes) is "
                    "unaligned, outside the file or over other metadata",
                    off, size);
        return false;
    }
    uint8_t *dir = g_try_malloc(size);
    if (!dir) {
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: cannot allocate the bitmap directory (%" PRIu64 " bytes)", size);
        return false;
    }
    int r = vdk_file_pread_sync(s->file, dir, size, off);
    if (r < 0) {
        g_free(dir);
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read the bitmap directory: %s", g_strerror(-r));
        return false;
    }
    Qcow2Bitmap *list = g_new0(Qcow2Bitmap, nb);
    uint64_t p = 0;
    bool ok = true;
    for (uint32_t i = 0; i < nb && ok; i++) {
        ok = parse_entry(s, dir, size, &p, i, &list[i], error);
        for (uint32_t k = 0; ok && k < i; k++) {
            if (!strcmp(list[k].name, list[i].name)) {
                g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmap directory: the name '%s' appears twice",
                            list[i].name);
                ok = false;
            }
        }
    }
    if (ok && p != size) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: bitmap directory: %" PRIu64 " bytes after the last of %u entries (size %" PRIu64 ")",
                    size - p, nb, size);
        ok = false;
    }
    g_free(dir);
    if (!ok) {
        for (uint32_t i = 0; i < nb; i++) {
            bm_clear_one(&list[i]);
        }
        g_free(list);
        return false;
    }
    s->bitmaps = list;
    s->nb_bitmaps = nb;
    return true;
}

/* Read a bitmap table, validated (host order; g_free). */
static uint64_t *
load_table(Qcow2 *s, const Qcow2Bitmap *bm, GError **error)
{
    uint64_t bytes = (uint64_t)bm->table_size * 8;
    uint8_t *raw = g_try_malloc(bytes);
    uint64_t *t = g_try_new(uint64_t, bm->table_size);
    if (!raw || !t) {
        g_free(raw);
        g_free(t);
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: cannot allocate the table of bitmap '%s'", bm->name);
        return NULL;
    }
    int r = vdk_file_pread_sync(s->file, raw, bytes, bm->table_offset);
    if (r < 0) {
        g_free(raw);
        g_free(t);
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read the table of bitmap '%s': %s", bm->name, g_strerror(-r));
        return NULL;
    }
    for (uint32_t i = 0; i < bm->table_size; i++) {
        uint64_t e = qbe64(raw + (uint64_t)i * 8);
        uint64_t o = e & BM_TABLE_OFFSET;
        if ((e & BM_TABLE_RESERVED) || (o && (e & BM_TABLE_ONES)) || (o && !range_ok(s, o, s->cluster_size))) {
            g_free(raw);
            g_free(t);
            g_set_error(error, VDK_ERROR, EINVAL,
                        "qcow2: bitmap '%s': table entry %u (0x%" PRIx64 ") is invalid (reserved bits, unaligned, "
                        "outside the file or over other metadata)",
                        bm->name, i, e);
            return NULL;
        }
        t[i] = e;
    }
    g_free(raw);
    return t;
}

/* The bitmap's bits from disk into bm->bits. */
static bool
load_bits(Qcow2 *s, Qcow2Bitmap *bm, GError **error)
{
    if (bm->bits) {
        return true;
    }
    uint64_t nbits = bm_nbits(s->size, bm->gran_bits);
    uint64_t bytes = bm_bytes(nbits);
    uint64_t *t = load_table(s, bm, error);
    if (!t) {
        return false;
    }
    uint8_t *bits = g_try_malloc0(MAX(bytes, (uint64_t)1));
    if (!bits) {
        g_free(t);
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: cannot allocate bitmap '%s' (%" PRIu64 " bytes)", bm->name,
                    bytes);
        return false;
    }
    uint64_t cs = s->cluster_size;
    for (uint64_t i = 0; i * cs < bytes; i++) {
        uint64_t n = MIN(cs, bytes - i * cs);
        uint64_t o = t[i] & BM_TABLE_OFFSET;
        if (o) {
            int r = vdk_file_pread_sync(s->file, bits + i * cs, n, o);
            if (r < 0) {
                g_free(t);
                g_free(bits);
                g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read bitmap '%s': %s", bm->name, g_strerror(-r));
                return false;
            }
        } else if (t[i] & BM_TABLE_ONES) {
            memset(bits + i * cs, 0xff, n);
        }
    }
    g_free(t);
    if (nbits % 8) {
        bits[bytes - 1] &= (uint8_t)((1u << (nbits % 8)) - 1); /* unused tail bits are zero */
    }
    bm->bits = bits;
    bm->nbits = nbits;
    return true;
}

static int dir_rewrite_in_place(Qcow2 *s);

/* ------------------------------------------------------------------------ */
/* Read-write open and the hot path                                          */
/* ------------------------------------------------------------------------ */

bool
qcow2_bitmaps_open_rw(Qcow2 *s, GError **error)
{
    uint64_t keep = s->bm_ext ? QCOW2_AUTOCLEAR_BITMAPS : 0;
    if (s->autoclear & ~keep) {
        /* the spec: clear the autoclear bits we do not maintain (and bit 0
         * without an extension, as qemu does) */
        s->autoclear &= keep;
        s->hdr_dirty = true;
    }
    if (!(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) || s->corrupt) {
        return true;
    }
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        const Qcow2Bitmap *bm = &s->bitmaps[i];
        if ((bm->flags & QCOW2_BM_AUTO) && !(bm->flags & QCOW2_BM_IN_USE) && !bm->usable) {
            /* an enabled bitmap we cannot keep up to date: its entry stays
             * as it is, and the autoclear bit says "all inconsistent" */
            g_log("vdk", G_LOG_LEVEL_WARNING,
                  "qcow2: %s: enabled bitmap '%s' cannot be maintained (granularity_bits %u, %u bytes of extra "
                  "data): clearing the bitmaps autoclear bit, all bitmaps become inconsistent",
                  s->node->filename, bm->name, bm->gran_bits, bm->extra_len);
            s->autoclear &= ~QCOW2_AUTOCLEAR_BITMAPS;
            s->hdr_dirty = true;
            qcow2_bitmaps_free(s);
            return true;
        }
    }
    bool any = false;
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        Qcow2Bitmap *bm = &s->bitmaps[i];
        if ((bm->flags & QCOW2_BM_AUTO) && !(bm->flags & QCOW2_BM_IN_USE)) {
            if (!load_bits(s, bm, error)) {
                return false;
            }
            bm->tracking = true;
            any = true;
        }
    }
    if (!any) {
        return true;
    }
    /* in use on disk, durable, before any write */
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        if (s->bitmaps[i].tracking) {
            s->bitmaps[i].flags |= QCOW2_BM_IN_USE;
            s->bitmaps[i].marked = true;
        }
    }
    int r = dir_rewrite_in_place(s);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot mark the bitmaps in use: %s", g_strerror(-r));
        return false;
    }
    rebuild_track(s);
    return true;
}

static inline void
set_bits_byte(uint8_t *p, uint8_t mask)
{
    if ((__atomic_load_n(p, __ATOMIC_RELAXED) & mask) != mask) {
        __atomic_fetch_or(p, mask, __ATOMIC_RELAXED);
    }
}

/* Set bits [first, last] (inclusive). */
static void
set_range(uint8_t *bits, uint64_t first, uint64_t last)
{
    uint64_t fb = first / 8, lb = last / 8;
    if (fb == lb) {
        set_bits_byte(bits + fb, (uint8_t)((0xffu << (first % 8)) & (0xffu >> (7 - last % 8))));
        return;
    }
    set_bits_byte(bits + fb, (uint8_t)(0xffu << (first % 8)));
    for (uint64_t b = fb + 1; b < lb; b++) {
        if (__atomic_load_n(bits + b, __ATOMIC_RELAXED) != 0xff) {
            __atomic_store_n(bits + b, 0xff, __ATOMIC_RELAXED); /* only ever set: a plain store is enough */
        }
    }
    set_bits_byte(bits + lb, (uint8_t)(0xffu >> (7 - last % 8)));
}

void
qcow2_bitmaps_mark_slow(Qcow2 *s, uint64_t off, uint64_t len)
{
    uint32_t n = __atomic_load_n(&s->nb_track, __ATOMIC_ACQUIRE);
    if (len == 0 || off >= s->size) {
        return;
    }
    uint64_t end = MIN(s->size, off + len);
    if (!__atomic_load_n(&s->bm_written, __ATOMIC_RELAXED)) {
        __atomic_store_n(&s->bm_written, true, __ATOMIC_RELAXED);
    }
    for (uint32_t i = 0; i < n; i++) {
        Qcow2Bitmap *bm = s->bm_track[i];
        set_range(bm->bits, off >> bm->gran_bits, (end - 1) >> bm->gran_bits);
    }
}

/* ------------------------------------------------------------------------ */
/* Storing                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct {
    uint64_t off, n;
} Range;

/* The clusters a bitmap's table and data use, for freeing. */
static void
collect_clusters(Qcow2 *s, const Qcow2Bitmap *bm, GArray *out)
{
    Range tr = {bm->table_offset, qcow2_align(s, (uint64_t)bm->table_size * 8) >> s->cluster_bits};
    GError *e = NULL;
    uint64_t *t = load_table(s, bm, &e);
    if (!t) {
        /* validated at open: only a read error; leak rather than guess */
        g_log("vdk", G_LOG_LEVEL_WARNING, "qcow2: %s: %s (its clusters are leaked)", s->node->filename, e->message);
        g_error_free(e);
        return;
    }
    g_array_append_val(out, tr);
    for (uint32_t i = 0; i < bm->table_size; i++) {
        uint64_t o = t[i] & BM_TABLE_OFFSET;
        if (o) {
            Range r = {o, 1};
            g_array_append_val(out, r);
        }
    }
    g_free(t);
}

static bool
cluster_zero(const uint8_t *p, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

/* Write @bm's bits to new clusters and point it at its new table. */
static int
write_bitmap(Qcow2 *s, Qcow2Bitmap *bm)
{
    uint64_t cs = s->cluster_size;
    uint64_t bytes = bm_bytes(bm->nbits);
    uint64_t nclusters = (bytes + cs - 1) / cs;
    uint64_t nonzero = 0;
    for (uint64_t i = 0; i < nclusters; i++) {
        nonzero += !cluster_zero(bm->bits + i * cs, MIN(cs, bytes - i * cs));
    }
    uint64_t tbl_clusters = qcow2_align(s, nclusters * 8) >> s->cluster_bits;
    int r = 0;
    uint64_t toff = qcow2_ctl_alloc(s, tbl_clusters, &r);
    if (!toff) {
        return r;
    }
    uint64_t doff = 0;
    if (nonzero) {
        doff = qcow2_ctl_alloc(s, nonzero, &r);
        if (!doff) {
            return r;
        }
    }
    uint8_t *tbl = g_malloc0(tbl_clusters * cs);
    uint8_t *buf = g_malloc0(cs);
    uint64_t k = 0;
    for (uint64_t i = 0; i < nclusters && r == 0; i++) {
        uint64_t n = MIN(cs, bytes - i * cs);
        if (cluster_zero(bm->bits + i * cs, n)) {
            continue;
        }
        memset(buf, 0, cs);
        memcpy(buf, bm->bits + i * cs, n);
        uint64_t o = doff + k * cs;
        k++;
        qput64(tbl + i * 8, o);
        r = vdk_file_pwrite_sync(s->file, buf, cs, o);
    }
    if (r == 0) {
        r = vdk_file_pwrite_sync(s->file, tbl, tbl_clusters * cs, toff);
    }
    g_free(buf);
    g_free(tbl);
    if (r == 0) {
        bm->table_offset = toff;
        bm->table_size = (uint32_t)nclusters;
    }
    return r;
}

/* Put the bitmaps extension into the header buffer (or take it out):
 * the other extensions keep their order, the backing name follows. */
static bool
hdr_set_ext(Qcow2 *s, bool present, uint32_t nb, uint64_t size, uint64_t off, GError **error)
{
    uint32_t cs = s->cluster_size;
    uint64_t boff = qbe64(s->hdr + 8);
    uint32_t blen = qbe32(s->hdr + 16);
    uint32_t limit = boff && boff < cs ? (uint32_t)boff : cs;
    uint8_t *nh = g_malloc0(cs);
    memcpy(nh, s->hdr, s->header_length);
    uint32_t pos = s->header_length;
    bool fits = true;
    for (uint32_t o = s->header_length; o + 8 <= limit;) {
        uint32_t t = qbe32(s->hdr + o);
        uint32_t len = qbe32(s->hdr + o + 4);
        if (t == QCOW2_EXT_END || len > limit - o - 8) {
            break;
        }
        uint32_t whole = 8 + ((len + 7) & ~7u);
        if (t != QCOW2_EXT_BITMAPS) {
            if (pos + whole > cs) {
                fits = false;
                break;
            }
            memcpy(nh + pos, s->hdr + o, MIN(whole, limit - o));
            pos += whole;
        }
        o += whole;
    }
    if (present && fits) {
        if (pos + 32 > cs) {
            fits = false;
        } else {
            qput32(nh + pos, QCOW2_EXT_BITMAPS);
            qput32(nh + pos + 4, 24);
            qput32(nh + pos + 8, nb);
            qput32(nh + pos + 12, 0);
            qput64(nh + pos + 16, size);
            qput64(nh + pos + 24, off);
            pos += 32;
        }
    }
    pos += 8; /* end marker */
    if (!fits || pos + (boff ? blen : 0) > cs) {
        g_free(nh);
        g_set_error(error, VDK_ERROR, ENOSPC,
                    "qcow2: the header extensions and the backing file name do not fit in one cluster (%u bytes)", cs);
        return false;
    }
    if (boff) {
        memcpy(nh + pos, s->hdr + boff, blen);
        qput64(nh + 8, pos);
        pos += blen;
    }
    memcpy(s->hdr, nh, cs);
    g_free(nh);
    s->hdr_used = MIN((uint32_t)vdk_align_up(pos, 512), cs);
    s->bm_ext = present;
    s->bm_ext_nb = nb;
    s->bm_dir_size = size;
    s->bm_dir_offset = off;
    s->has_bitmaps = present;
    s->hdr_dirty = true;
    return true;
}

static bool
fail_r(GError **error, int r, const char *what)
{
    g_set_error(error, VDK_ERROR, -r, "qcow2: %s: %s", what, g_strerror(-r));
    return false;
}

/* Lock held.  The crash-safe switch to the in-memory directory. */
static bool
store_locked(Qcow2 *s, GArray *olds, GError **error)
{
    int r = 0;
    /* 1. the bits of tracked/changed bitmaps in new clusters */
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        Qcow2Bitmap *bm = &s->bitmaps[i];
        /* bits change through actions, or through writes while tracked */
        bool changed = bm->rewrite || ((bm->tracking || bm->marked) && s->bm_written);
        if (bm->marked) {
            bm->flags &= ~QCOW2_BM_IN_USE; /* we set it: the new directory is consistent */
        }
        if (!changed || !bm->bits) {
            continue;
        }
        if (bm->table_offset) {
            collect_clusters(s, bm, olds);
        }
        r = write_bitmap(s, bm);
        if (r < 0) {
            return fail_r(error, r, "cannot write the bitmaps");
        }
        bm->flags &= ~QCOW2_BM_IN_USE;
        if (bm->tracking) {
            bm->flags |= QCOW2_BM_AUTO;
        }
    }
    /* 2. the new directory */
    uint64_t dsize = dir_len(s), doff = 0;
    if (dsize > QCOW2_BM_MAX_DIR_SIZE) {
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: the bitmap directory would exceed %u bytes", QCOW2_BM_MAX_DIR_SIZE);
        return false;
    }
    if (s->nb_bitmaps) {
        uint64_t dcl = qcow2_align(s, dsize) >> s->cluster_bits;
        doff = qcow2_ctl_alloc(s, dcl, &r);
        if (!doff) {
            return fail_r(error, r, "cannot allocate the bitmap directory");
        }
        uint8_t *dir = g_malloc0(dcl << s->cluster_bits);
        dir_fill(s, dir);
        r = vdk_file_pwrite_sync(s->file, dir, dcl << s->cluster_bits, doff);
        g_free(dir);
        if (r < 0) {
            return fail_r(error, r, "cannot write the bitmap directory");
        }
    }
    /* 3. everything it points at durable, with its refcounts */
    r = qcow2_ctl_flush(s);
    if (r < 0) {
        return fail_r(error, r, "cannot write the bitmaps");
    }
    /* 4. the switch */
    bool had_ext = s->bm_ext && (s->autoclear & QCOW2_AUTOCLEAR_BITMAPS);
    uint64_t old_doff = s->bm_dir_offset, old_dsize = s->bm_dir_size;
    if (!hdr_set_ext(s, s->nb_bitmaps != 0, s->nb_bitmaps, dsize, doff, error)) {
        return false;
    }
    if (s->nb_bitmaps) {
        s->autoclear |= QCOW2_AUTOCLEAR_BITMAPS;
    } else {
        s->autoclear &= ~QCOW2_AUTOCLEAR_BITMAPS;
    }
    r = qcow2_ctl_flush(s);
    if (r < 0) {
        return fail_r(error, r, "cannot update the header");
    }
    /* 5. the old clusters, freed once the switch is durable */
    if (had_ext && old_doff) {
        qcow2_defer_free(s, old_doff, qcow2_align(s, old_dsize) >> s->cluster_bits);
    }
    for (guint i = 0; i < olds->len; i++) {
        Range *x = &g_array_index(olds, Range, i);
        qcow2_defer_free(s, x->off, x->n);
    }
    g_array_set_size(olds, 0);
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        s->bitmaps[i].rewrite = false;
        s->bitmaps[i].marked = false;
    }
    s->bm_dirty = false;
    s->bm_written = false;
    r = qcow2_ctl_flush(s);
    if (r < 0) {
        return fail_r(error, r, "cannot free the old bitmap clusters");
    }
    return true;
}

bool
qcow2_bitmaps_store(VdkNode *n, GError **error)
{
    Qcow2 *s = n->opaque;
    if (!s || (!s->bm_dirty && !s->nb_track)) {
        return true;
    }
    if (s->corrupt) {
        return true; /* nothing more is written: the bitmaps stay in use (inconsistent) */
    }
    g_mutex_lock(&n->lock);
    GArray *olds = s->bm_olds ? s->bm_olds : g_array_new(FALSE, FALSE, sizeof(Range));
    s->bm_olds = NULL;
    /* writes are over: nothing sets bits any more */
    __atomic_store_n(&s->nb_track, 0, __ATOMIC_RELEASE);
    bool ok;
    if (!s->bm_dirty && !s->bm_written && olds->len == 0) {
        /* nothing changed since the open marked them in use: the same
         * directory, in place, with the flags as they were */
        for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
            if (s->bitmaps[i].marked) {
                s->bitmaps[i].flags &= ~QCOW2_BM_IN_USE;
                s->bitmaps[i].marked = false;
            }
        }
        int r = dir_rewrite_in_place(s);
        ok = r == 0 || fail_r(error, r, "cannot write the bitmap directory");
    } else {
        ok = store_locked(s, olds, error);
    }
    g_array_free(olds, TRUE);
    g_mutex_unlock(&n->lock);
    return ok;
}

/* ------------------------------------------------------------------------ */
/* qemu-img bitmap actions                                                   */
/* ------------------------------------------------------------------------ */

static Qcow2Bitmap *
find(Qcow2 *s, const char *name)
{
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        if (!strcmp(s->bitmaps[i].name, name)) {
            return &s->bitmaps[i];
        }
    }
    return NULL;
}

static Qcow2Bitmap *
find_usable(Qcow2 *s, const char *name, GError **error)
{
    Qcow2Bitmap *bm = find(s, name);
    if (!bm) {
        g_set_error(error, VDK_ERROR, ENOENT, "Dirty bitmap '%s' not found", name);
        return NULL;
    }
    if ((bm->flags & QCOW2_BM_IN_USE) && !bm->tracking) {
        g_set_error(error, VDK_ERROR, EBUSY, "Bitmap '%s' is inconsistent and cannot be used", name);
        return NULL;
    }
    if (!bm->usable) {
        g_set_error(error, VDK_ERROR, ENOTSUP,
                    "Bitmap '%s' cannot be used by vdk (granularity_bits %u, %u bytes of extra data)", name,
                    bm->gran_bits, bm->extra_len);
        return NULL;
    }
    return bm;
}

static bool
op_add(Qcow2 *s, const VdkBitmapOp *op, GError **error)
{
    if (s->version < 3) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "Cannot store dirty bitmaps in qcow2 v2 files");
        return false;
    }
    if (strlen(op->name) > QCOW2_BM_MAX_NAME) {
        g_set_error(error, VDK_ERROR, EINVAL, "Name length exceeds maximum (%d characters)", QCOW2_BM_MAX_NAME);
        return false;
    }
    uint64_t g = op->granularity;
    if (g == 0) {
        g = MIN(65536u, MAX(4096u, s->cluster_size)); /* qemu's default */
    }
    if (g < 512 || (g & (g - 1)) || g > (1ULL << QCOW2_BM_MAX_GRAN_BITS)) {
        g_set_error(error, VDK_ERROR, EINVAL, "Granularity must be power of 2 and at least 512");
        return false;
    }
    if (find(s, op->name)) {
        g_set_error(error, VDK_ERROR, EEXIST, "Bitmap already exists: %s", op->name);
        return false;
    }
    if (s->nb_bitmaps >= QCOW2_BM_MAX_BITMAPS) {
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: the image already has %u bitmaps (the maximum)", s->nb_bitmaps);
        return false;
    }
    unsigned gb = (unsigned)__builtin_ctzll(g);
    uint64_t nbits = bm_nbits(s->size, gb);
    uint64_t bytes = bm_bytes(nbits);
    if (qcow2_align(s, bytes) > QCOW2_BM_MAX_PHYS) {
        g_set_error(error, VDK_ERROR, EFBIG,
                    "qcow2: a bitmap with granularity %" PRIu64 " would need %" PRIu64 " bytes (max %llu)", g, bytes,
                    (unsigned long long)QCOW2_BM_MAX_PHYS);
        return false;
    }
    uint8_t *bits = g_try_malloc0(MAX(bytes, (uint64_t)1));
    if (!bits) {
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: cannot allocate a bitmap of %" PRIu64 " bytes", bytes);
        return false;
    }
    s->bitmaps = g_renew(Qcow2Bitmap, s->bitmaps, s->nb_bitmaps + 1);
    Qcow2Bitmap *bm = &s->bitmaps[s->nb_bitmaps++];
    memset(bm, 0, sizeof(*bm));
    bm->name = g_strdup(op->name);
    bm->flags = QCOW2_BM_AUTO;
    bm->type = 1;
    bm->gran_bits = (uint8_t)gb;
    bm->usable = true;
    bm->bits = bits;
    bm->nbits = nbits;
    bm->tracking = true;
    bm->rewrite = true;
    return true;
}

static bool
op_remove(Qcow2 *s, const VdkBitmapOp *op, GError **error)
{
    Qcow2Bitmap *bm = find(s, op->name);
    if (!bm) {
        g_set_error(error, VDK_ERROR, ENOENT, "Dirty bitmap '%s' not found", op->name);
        return false;
    }
    if (bm->table_offset) {
        if (!s->bm_olds) {
            s->bm_olds = g_array_new(FALSE, FALSE, sizeof(Range));
        }
        collect_clusters(s, bm, s->bm_olds);
    }
    uint32_t i = (uint32_t)(bm - s->bitmaps);
    bm_clear_one(bm);
    memmove(&s->bitmaps[i], &s->bitmaps[i + 1], (s->nb_bitmaps - i - 1) * sizeof(Qcow2Bitmap));
    s->nb_bitmaps--;
    return true;
}

/* OR @src (granularity 2^@sg, covering the same disk size) into @dst. */
static void
merge_bits(Qcow2 *s, Qcow2Bitmap *dst, const uint8_t *src, unsigned sg)
{
    if (sg == dst->gran_bits) {
        for (uint64_t i = 0; i < bm_bytes(dst->nbits); i++) {
            dst->bits[i] |= src[i];
        }
        return;
    }
    uint64_t sbits = bm_nbits(s->size, sg);
    for (uint64_t j = 0; j < sbits; j++) {
        if (j % 8 == 0 && !src[j / 8]) {
            j += 7; /* a clear byte: skip its bits */
            continue;
        }
        if (src[j / 8] & (1u << (j % 8))) {
            uint64_t a = j << sg;
            uint64_t b = MIN(s->size, (j + 1) << sg);
            set_range(dst->bits, a >> dst->gran_bits, (b - 1) >> dst->gran_bits);
        }
    }
}

static bool
op_merge(VdkNode *n, Qcow2 *s, Qcow2Bitmap *dst, const VdkBitmapOp *op, GError **error)
{
    const char *sname = op->source_name ? op->source_name : "";
    VdkNode *sn = op->source ? op->source->top : n;
    if (sn->drv != &vdk_format_qcow2) {
        g_set_error(error, VDK_ERROR, ENOENT, "Dirty bitmap '%s' not found", sname);
        return false;
    }
    Qcow2 *ss = sn->opaque;
    if (sn != n) {
        g_mutex_lock(&sn->lock);
    }
    bool ok = false;
    Qcow2Bitmap *src = find_usable(ss, sname, error);
    if (src && ss->size != s->size) {
        g_set_error(error, VDK_ERROR, EINVAL, "Bitmaps are of different sizes (%" PRIu64 " and %" PRIu64 " bytes)",
                    ss->size, s->size);
    } else if (src && load_bits(ss, src, error)) {
        merge_bits(s, dst, src->bits, src->gran_bits);
        ok = true;
    }
    if (sn != n) {
        g_mutex_unlock(&sn->lock);
    }
    return ok;
}

bool
qcow2_bitmap_op(VdkNode *n, const VdkBitmapOp *op, GError **error)
{
    Qcow2 *s = n->opaque;
    if (s->corrupt) {
        g_set_error(error, VDK_ERROR, EIO, "qcow2: the image is marked corrupt; repair it with 'vdk check -r all' first");
        return false;
    }
    g_mutex_lock(&n->lock);
    bool ok = false;
    Qcow2Bitmap *bm = NULL;
    switch (op->action) {
    case VDK_BITMAP_ADD:
        ok = op_add(s, op, error);
        break;
    case VDK_BITMAP_REMOVE:
        ok = op_remove(s, op, error);
        break;
    case VDK_BITMAP_CLEAR:
        bm = find_usable(s, op->name, error);
        if (bm && load_bits(s, bm, error)) {
            memset(bm->bits, 0, bm_bytes(bm->nbits));
            bm->rewrite = true;
            ok = true;
        }
        break;
    case VDK_BITMAP_ENABLE:
        bm = find_usable(s, op->name, error);
        if (bm && load_bits(s, bm, error)) {
            bm->flags |= QCOW2_BM_AUTO;
            bm->tracking = true;
            bm->rewrite = true;
            ok = true;
        }
        break;
    case VDK_BITMAP_DISABLE:
        bm = find_usable(s, op->name, error);
        if (bm) {
            bm->flags &= ~QCOW2_BM_AUTO;
            bm->tracking = false;
            ok = true;
        }
        break;
    case VDK_BITMAP_MERGE:
        bm = find_usable(s, op->name, error);
        if (bm && load_bits(s, bm, error) && op_merge(n, s, bm, op, error)) {
            bm->rewrite = true;
            ok = true;
        }
        break;
    default:
        g_set_error(error, VDK_ERROR, EINVAL, "unknown bitmap action %d", (int)op->action);
        break;
    }
    if (ok) {
        s->bm_dirty = true;
        rebuild_track(s);
    }
    g_mutex_unlock(&n->lock);
    return ok;
}

int
qcow2_bitmap_list(VdkNode *n, VdkBitmapInfo **out)
{
    Qcow2 *s = n->opaque;
    *out = NULL;
    if (s->version < 3) {
        return -ENOTSUP;
    }
    g_mutex_lock(&n->lock);
    int nb = (int)s->nb_bitmaps;
    VdkBitmapInfo *l = nb ? g_new0(VdkBitmapInfo, nb) : NULL;
    for (int i = 0; i < nb; i++) {
        const Qcow2Bitmap *bm = &s->bitmaps[i];
        l[i].name = g_strdup(bm->name);
        l[i].granularity = bm->gran_bits < 64 ? (uint64_t)1 << bm->gran_bits : 0;
        l[i].enabled = (bm->flags & QCOW2_BM_AUTO) != 0;
        /* in use on disk before this session marked it */
        l[i].in_use = (bm->flags & QCOW2_BM_IN_USE) && !bm->marked;
        l[i].usable = bm->usable;
    }
    g_mutex_unlock(&n->lock);
    *out = l;
    return nb;
}

bool
qcow2_bitmaps_block(Qcow2 *s, const char *what, GError **error)
{
    if (s->nb_bitmaps == 0) {
        return false;
    }
    g_set_error(error, VDK_ERROR, ENOTSUP,
                "qcow2: cannot %s an image with persistent bitmaps (%u); remove them first (vdk bitmap --remove)", what,
                s->nb_bitmaps);
    return true;
}

/* ------------------------------------------------------------------------ */
/* info                                                                      */
/* ------------------------------------------------------------------------ */

static void
json_str(GString *j, const char *v)
{
    g_string_append_c(j, '"');
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (*p == '"' || *p == '\\') {
            g_string_append_printf(j, "\\%c", *p);
        } else if (*p < 0x20) {
            g_string_append_printf(j, "\\u%04x", *p);
        } else {
            g_string_append_c(j, (char)*p);
        }
    }
    g_string_append_c(j, '"');
}

void
qcow2_bitmaps_info(Qcow2 *s, GString *j, GPtrArray *l)
{
    if (s->nb_bitmaps == 0) {
        return;
    }
    g_string_append(j, "\"bitmaps\": [\n");
    g_ptr_array_add(l, g_strdup("bitmaps:"));
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        const Qcow2Bitmap *bm = &s->bitmaps[i];
        const char *fl[2];
        int nf = 0;
        if (bm->flags & QCOW2_BM_IN_USE) {
            fl[nf++] = "in-use";
        }
        if (bm->flags & QCOW2_BM_AUTO) {
            fl[nf++] = "auto";
        }
        g_string_append(j, "{\n\"flags\": [\n");
        g_ptr_array_add(l, g_strdup_printf("    [%u]:", i));
        g_ptr_array_add(l, g_strdup("        flags:"));
        for (int k = 0; k < nf; k++) {
            g_string_append_printf(j, "\"%s\"%s\n", fl[k], k + 1 < nf ? "," : "");
            g_ptr_array_add(l, g_strdup_printf("            [%d]: %s", k, fl[k]));
        }
        g_string_append(j, "],\n\"name\": ");
        json_str(j, bm->name);
        g_string_append_printf(j, ",\n\"granularity\": %" PRIu64 "\n}%s\n",
                               bm->gran_bits < 64 ? (uint64_t)1 << bm->gran_bits : 0, i + 1 < s->nb_bitmaps ? "," : "");
        g_ptr_array_add(l, g_strdup_printf("        name: %s", bm->name));
        g_ptr_array_add(l, g_strdup_printf("        granularity: %" PRIu64,
                                           bm->gran_bits < 64 ? (uint64_t)1 << bm->gran_bits : 0));
    }
    g_string_append(j, "],\n");
}

/* ------------------------------------------------------------------------ */
/* Resize and snapshot switching                                             */
/* ------------------------------------------------------------------------ */

/* Rewrite the directory in place with the in-memory flags (only flag bits
 * differ from the disk's, so a torn write leaves a valid directory). */
static int
dir_rewrite_in_place(Qcow2 *s)
{
    uint8_t *dir = g_malloc0(s->bm_dir_size);
    dir_fill(s, dir);
    int r = vdk_file_pwrite_sync(s->file, dir, s->bm_dir_size, s->bm_dir_offset);
    g_free(dir);
    if (r == 0) {
        r = vdk_file_flush_sync(s->file);
    }
    return r;
}

/* qemu resizes the bitmaps with the disk (new bits clear).  Every bitmap
 * is marked in use on disk first: a crash before the close stores them
 * leaves them inconsistent rather than sized for the old disk. */
bool
qcow2_truncate_bitmaps(VdkNode *n, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error)
{
    Qcow2 *s = n->opaque;
    if (s->nb_bitmaps == 0 || size == s->size) {
        return qcow2_truncate(n, size, shrink, prealloc, error);
    }
    bool in_place = false;
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        Qcow2Bitmap *bm = &s->bitmaps[i];
        if (((bm->flags & QCOW2_BM_IN_USE) && !bm->tracking) || !bm->usable) {
            g_set_error(error, VDK_ERROR, ENOTSUP,
                        "qcow2: cannot resize an image with the inconsistent or unsupported bitmap '%s' (remove it "
                        "first)",
                        bm->name);
            return false;
        }
        uint64_t nbits = bm_nbits(size, bm->gran_bits);
        if (qcow2_align(s, bm_bytes(nbits)) > QCOW2_BM_MAX_PHYS) {
            g_set_error(error, VDK_ERROR, EFBIG, "qcow2: bitmap '%s' would exceed %llu bytes at the new size", bm->name,
                        (unsigned long long)QCOW2_BM_MAX_PHYS);
            return false;
        }
        if (!load_bits(s, bm, error)) {
            return false;
        }
        in_place |= bm->table_offset != 0;
    }
    if (in_place) {
        for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
            if (s->bitmaps[i].table_offset) {
                s->bitmaps[i].flags |= QCOW2_BM_IN_USE;
                s->bitmaps[i].marked = true;
            }
        }
        int r = dir_rewrite_in_place(s);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "qcow2: cannot mark the bitmaps in use: %s", g_strerror(-r));
            return false;
        }
    }
    s->bm_dirty = true;
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        s->bitmaps[i].rewrite = true; /* stored (and the in-use flag cleared) on close */
    }
    if (!qcow2_truncate(n, size, shrink, prealloc, error)) {
        return false;
    }
    g_mutex_lock(&n->lock);
    bool ok = true;
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        Qcow2Bitmap *bm = &s->bitmaps[i];
        uint64_t nbits = bm_nbits(size, bm->gran_bits);
        uint64_t old = bm_bytes(bm->nbits), now = bm_bytes(nbits);
        uint8_t *bits = g_try_realloc(bm->bits, MAX(now, (uint64_t)1));
        if (!bits) {
            g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: cannot resize bitmap '%s'", bm->name);
            ok = false;
            break;
        }
        if (now > old) {
            memset(bits + old, 0, now - old);
        }
        if (nbits < bm->nbits && nbits % 8) {
            bits[now - 1] &= (uint8_t)((1u << (nbits % 8)) - 1);
        }
        bm->bits = bits;
        bm->nbits = nbits;
    }
    g_mutex_unlock(&n->lock);
    return ok;
}

bool
qcow2_snapshot_apply_bitmaps(VdkNode *n, const char *name, GError **error)
{
    Qcow2 *s = n->opaque;
    if (s->nb_track) {
        /* as qemu: the switch would change the disk behind the bitmaps */
        g_set_error(error, VDK_ERROR, EBUSY, "Device has active dirty bitmaps");
        return false;
    }
    return qcow2_snapshot_apply(n, name, error);
}

uint64_t
qcow2_bitmaps_measure(VdkImage *src, uint64_t cs)
{
    VdkNode *n = src->top;
    if (n->drv != &vdk_format_qcow2) {
        return 0;
    }
    Qcow2 *s = n->opaque;
    uint64_t total = 0, dir = 0;
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        const Qcow2Bitmap *bm = &s->bitmaps[i];
        uint64_t clusters = (bm_bytes(bm_nbits(s->size, bm->gran_bits)) + cs - 1) / cs;
        total += clusters * cs;                  /* every data cluster allocated */
        total += vdk_align_up(clusters * 8, cs); /* the table */
        dir += (24 + strlen(bm->name) + 7) & ~7ULL;
    }
    return total + vdk_align_up(dir, cs);
}
