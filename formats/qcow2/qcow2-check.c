/* SPDX-License-Identifier: MIT */
/*
 * qcow2-check.c - consistency check and repair (qemu-img check), the
 * refcount rebuild used for dirty lazy-refcount images, and resize.
 *
 * The check walks every structure that references host clusters (header,
 * active and snapshot L1 tables, their L2 tables and data clusters,
 * compressed clusters, the snapshot table, the refcount table and blocks,
 * the bitmap directory, tables and data) and counts the references in an
 * array with one entry per cluster of the file (the file's real size, not a
 * claimed one, bounds it).  Then it compares with the stored refcounts:
 * more stored than referenced is a leak, fewer is an error (the cluster may
 * be handed out again while in use).  COPIED flags must say "refcount is 1".
 * Messages and counters follow qemu-img.
 *
 * Repair: leaks alone are fixed in place (-r leaks); anything else
 * (-r all) rebuilds the refcount structure from the references: new blocks
 * and a new table are written past the end of the file, synced, and only
 * then does the header switch to them, so a crash during repair leaves the
 * old, consistent-as-before structure in place.  COPIED flags are fixed in
 * the L1/L2 tables afterwards.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"

/* Clusters the reference array may cover (2 bytes each: 512 MiB). */
#define QCOW2_CHECK_MAX_CLUSTERS (1ULL << 28)

typedef struct {
    Qcow2 *s;
    uint64_t file_size;
    uint64_t nb;       /* clusters compared: the file's, or one more if referenced */
    uint64_t cap;      /* entries in ref[] */
    uint16_t *ref;     /* references counted */
    VdkCheckResult *res;
    uint64_t next_contig;
    bool need_rebuild;
    bool copied_errors;
    uint8_t *buf;      /* one cluster */
} Chk;

static void
msg(Chk *c, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static void
msg(Chk *c, const char *fmt, ...)
{
    if (!c->res->messages) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    g_ptr_array_add(c->res->messages, g_strdup_vprintf(fmt, ap));
    va_end(ap);
}

/* Count one reference to every cluster in [off, off+len).  A region
 * ending a cluster or more past the end of the file is an error and not
 * counted; one ending within a cluster past it is (the file may be short
 * by a partial cluster), as qemu-img does. */
static void
ref_range(Chk *c, uint64_t off, uint64_t len)
{
    if (len == 0) {
        return;
    }
    uint32_t cb = c->s->cluster_bits;
    uint64_t end = off + len;
    if (end < off || (end > c->file_size && end - c->file_size >= c->s->cluster_size)) {
        msg(c, "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x%"
            G_GINT64_MODIFIER "x size 0x%" G_GINT64_MODIFIER "x", off, len);
        c->res->corruptions++;
        return;
    }
    uint64_t first = off >> cb;
    uint64_t last = (end - 1) >> cb;
    for (uint64_t i = first; i <= last; i++) {
        if (i >= c->cap) {
            continue; /* cannot happen: cap covers the file plus a cluster */
        }
        if (c->ref[i] == UINT16_MAX) {
            msg(c, "ERROR: overflow cluster offset=0x%" G_GINT64_MODIFIER "x", i << cb);
            c->res->corruptions++;
            continue;
        }
        c->ref[i]++;
        if (i >= c->nb) {
            c->nb = i + 1;
        }
    }
}

static int
read_cluster(Chk *c, uint64_t off)
{
    return vdk_file_pread_sync(c->s->file, c->buf, c->s->cluster_size, off);
}

/* One L2 table: count its clusters; active tables also give statistics
 * and COPIED checks (done later, once refcounts are known). */
static int
scan_l2(Chk *c, uint64_t l2_off, bool active, uint64_t l1_idx)
{
    Qcow2 *s = c->s;
    c->next_contig = 0; /* fragmentation is counted within each table, as qemu-img does */
    int r = read_cluster(c, l2_off);
    if (r < 0) {
        msg(c, "ERROR: I/O error reading L2 table at offset %" G_GUINT64_FORMAT ": %s", l2_off, g_strerror(-r));
        c->res->check_errors++;
        return r;
    }
    for (uint64_t i = 0; i < s->l2_entries; i++) {
        uint64_t bm;
        uint64_t e = qcow2_l2_get(s, c->buf, i, &bm);
        uint64_t guest = ((l1_idx << s->l2_bits) + i) << s->cluster_bits;
        if (e & QCOW2_OFLAG_COMPRESSED) {
            uint64_t off, len;
            qcow2_compressed_range(s, e, &off, &len);
            if (e & QCOW2_OFLAG_COPIED) {
                msg(c, "ERROR: compressed cluster %" G_GUINT64_FORMAT " has the COPIED flag", guest >> s->cluster_bits);
                c->res->corruptions++;
            }
            ref_range(c, off, len);
            if (active) {
                /* compressed clusters count as fragmented, as in qemu-img:
                 * neighbours share sectors that are read again */
                c->res->allocated_clusters++;
                c->res->compressed_clusters++;
                c->res->fragmented_clusters++;
            }
            continue;
        }
        uint64_t host = e & QCOW2_OFFSET_MASK;
        if (e & QCOW2_L2_STD_RESERVED) {
            msg(c, "ERROR: L2 entry 0x%" G_GINT64_MODIFIER "x for guest offset %" G_GUINT64_FORMAT " has reserved bits set", e,
                guest);
            c->res->corruptions++;
        }
        if (s->extl2 && ((uint32_t)bm & (uint32_t)(bm >> 32))) {
            msg(c, "ERROR: invalid subcluster bitmap 0x%" G_GINT64_MODIFIER "x for guest offset %" G_GUINT64_FORMAT, bm, guest);
            c->res->corruptions++;
        }
        if (!host) {
            if (s->extl2 && (uint32_t)bm) {
                msg(c, "ERROR: allocated subclusters without a host cluster at guest offset %" G_GUINT64_FORMAT, guest);
                c->res->corruptions++;
            }
            continue;
        }
        if (host & (s->cluster_size - 1)) {
            /* reported, and still counted where it points, as qemu-img */
            bool has_data = s->extl2 ? ((uint32_t)bm != 0) : !(e & QCOW2_OFLAG_ZERO);
            msg(c, "ERROR offset=%" G_GINT64_MODIFIER "x: %s cluster is not properly aligned; L2 entry corrupted.", host,
                has_data ? "Data" : "Preallocated");
            c->res->corruptions++;
        }
        ref_range(c, host, s->cluster_size);
        if (active) {
            c->res->allocated_clusters++;
            if (c->next_contig && host != c->next_contig) {
                c->res->fragmented_clusters++;
            }
            c->next_contig = host + s->cluster_size;
        }
    }
    return 0;
}

static int
scan_l1(Chk *c, uint64_t l1_off, uint32_t l1_size, const uint64_t *mem_l1, bool active)
{
    Qcow2 *s = c->s;
    ref_range(c, l1_off, (uint64_t)l1_size * 8);
    uint64_t *l1 = NULL;
    if (!mem_l1) {
        uint8_t *raw = g_try_malloc((size_t)l1_size * 8 + 1);
        l1 = g_try_new(uint64_t, (gsize)l1_size + 1);
        if (!raw || !l1) {
            g_free(raw);
            g_free(l1);
            c->res->check_errors++;
            return -ENOMEM;
        }
        int r = vdk_file_pread_sync(s->file, raw, (size_t)l1_size * 8, l1_off);
        if (r < 0) {
            g_free(raw);
            g_free(l1);
            msg(c, "ERROR: I/O error reading an L1 table: %s", g_strerror(-r));
            c->res->check_errors++;
            return r;
        }
        for (uint32_t i = 0; i < l1_size; i++) {
            l1[i] = qbe64(raw + (size_t)i * 8);
        }
        g_free(raw);
        mem_l1 = l1;
    }
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t e = mem_l1[i];
        uint64_t t = e & QCOW2_OFFSET_MASK;
        if (!e) {
            continue;
        }
        if (e & QCOW2_L1_RESERVED) {
            msg(c, "ERROR found L1 entry with reserved bits set: %" G_GINT64_MODIFIER "x", e);
            c->res->corruptions++;
        }
        ref_range(c, t, s->cluster_size);
        if (t & (s->cluster_size - 1)) {
            msg(c, "ERROR l2_offset=%" G_GINT64_MODIFIER "x: Table is not cluster aligned; L1 entry corrupted", t);
            c->res->corruptions++;
        }
        /* read where it points (past the end of the file reads zeroes) */
        scan_l2(c, t, active, i);
    }
    g_free(l1);
    return 0;
}

/* The bitmap directory, tables and data, as qemu-img check counts them:
 * only while the autoclear bit says the extension is valid. */
static void
scan_bitmaps(Chk *c)
{
    Qcow2 *s = c->s;
    if (!s->bm_ext || !(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) || s->version < 3) {
        return;
    }
    if (s->bm_error) {
        msg(c, "ERROR %s", s->bm_error);
        c->res->corruptions++;
        return;
    }
    ref_range(c, s->bm_dir_offset, s->bm_dir_size);
    uint8_t *tbl = NULL;
    for (uint32_t i = 0; i < s->nb_bitmaps; i++) {
        const Qcow2Bitmap *bm = &s->bitmaps[i];
        if (!bm->table_offset) {
            continue; /* added in this session: not on disk yet */
        }
        uint64_t bytes = (uint64_t)bm->table_size * 8;
        ref_range(c, bm->table_offset, bytes);
        tbl = g_try_malloc(bytes);
        if (!tbl || vdk_file_pread_sync(s->file, tbl, bytes, bm->table_offset) < 0) {
            msg(c, "ERROR cannot read the table of bitmap '%s'", bm->name);
            c->res->check_errors++;
            g_free(tbl);
            tbl = NULL;
            continue;
        }
        for (uint32_t k = 0; k < bm->table_size; k++) {
            uint64_t e = qbe64(tbl + (uint64_t)k * 8);
            uint64_t o = e & 0x00fffffffffffe00ULL;
            if ((e & 0xff000000000001feULL) || (o && (e & 1))) {
                msg(c, "ERROR bitmap '%s': table entry %u has reserved bits set (0x%" G_GINT64_MODIFIER "x)", bm->name,
                    k, e);
                c->res->corruptions++;
                continue;
            }
            if (o & (s->cluster_size - 1)) {
                msg(c, "ERROR bitmap '%s': table entry %u points to an unaligned offset 0x%" G_GINT64_MODIFIER "x",
                    bm->name, k, o);
                c->res->corruptions++;
                continue;
            }
            if (o) {
                ref_range(c, o, s->cluster_size);
            }
        }
        g_free(tbl);
        tbl = NULL;
    }
}

/* Stored refcount of cluster @i (reading blocks as needed, one cached). */
typedef struct {
    uint64_t blk_off;
    uint8_t *blk;
} RbReader;

static uint64_t
stored_refcount(Chk *c, RbReader *rb, uint64_t i, bool *err)
{
    Qcow2 *s = c->s;
    uint64_t idx = i >> s->refblock_bits;
    if (idx >= s->reftable_size || s->reftable[idx] == 0) {
        return 0;
    }
    uint64_t off = s->reftable[idx] & ~QCOW2_REFT_RESERVED;
    if (rb->blk_off != off) {
        if (vdk_file_pread_sync(s->file, rb->blk, s->cluster_size, off) < 0) {
            *err = true;
            return 0;
        }
        rb->blk_off = off;
    }
    uint64_t pos = i & ((1ULL << s->refblock_bits) - 1);
    uint32_t bits = s->refcount_bits;
    if (bits >= 8) {
        const uint8_t *p = rb->blk + pos * (bits / 8);
        return bits == 8 ? p[0] : bits == 16 ? qbe16(p) : bits == 32 ? qbe32(p) : qbe64(p);
    }
    uint64_t bit = pos * bits;
    return (rb->blk[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
}

static void
put_refcount(const Qcow2 *s, uint8_t *blk, uint64_t pos, uint64_t v)
{
    uint32_t bits = s->refcount_bits;
    if (bits >= 8) {
        uint8_t *p = blk + pos * (bits / 8);
        if (bits == 8) {
            p[0] = (uint8_t)v;
        } else if (bits == 16) {
            qput16(p, (uint16_t)v);
        } else if (bits == 32) {
            qput32(p, (uint32_t)v);
        } else {
            qput64(p, v);
        }
        return;
    }
    uint64_t bit = pos * bits;
    uint8_t mask = (uint8_t)(((1u << bits) - 1) << (bit % 8));
    blk[bit / 8] = (uint8_t)((blk[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
}

/* Count everything but the refcount structure itself. */
static int
count_references(Chk *c, bool with_refcount_structure)
{
    Qcow2 *s = c->s;
    ref_range(c, 0, s->cluster_size);
    scan_l1(c, s->l1_offset, s->l1_size, s->l1, true);
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        scan_l1(c, s->snapshots[i].l1_offset, s->snapshots[i].l1_size, NULL, false);
    }
    if (s->nb_snapshots) {
        /* the snapshot table's extent: walk the entries again for its size */
        uint64_t off = s->snapshots_offset;
        for (uint32_t i = 0; i < s->nb_snapshots; i++) {
            uint8_t h[40];
            if (vdk_file_pread_sync(s->file, h, sizeof(h), off) < 0) {
                break;
            }
            off += sizeof(h) + qbe32(h + 36) + qbe16(h + 12) + qbe16(h + 14);
            off = (off + 7) & ~7ULL;
        }
        ref_range(c, s->snapshots_offset, off - s->snapshots_offset);
    }
    if (with_refcount_structure) {
        ref_range(c, s->reftable_offset, (uint64_t)s->reftable_clusters << s->cluster_bits);
    }
    scan_bitmaps(c);
    if (s->has_crypt_ext && s->crypto) {
        ref_range(c, s->crypt_ext_off, s->crypt_ext_len); /* LUKS header and key material */
    }
    if (with_refcount_structure) {
        /* the blocks last: each must then be referenced exactly once */
        uint64_t disk_entries = ((uint64_t)s->reftable_clusters << s->cluster_bits) / 8;
        for (uint64_t i = 0; i < MIN(s->reftable_size, disk_entries); i++) {
            uint64_t raw = s->reftable[i];
            uint64_t off = raw & ~QCOW2_REFT_RESERVED;
            uint64_t cl = off >> s->cluster_bits;
            if (raw & QCOW2_REFT_RESERVED) {
                msg(c, "ERROR refcount table entry %" G_GUINT64_FORMAT " has reserved bits set", i);
                c->res->corruptions++;
                c->need_rebuild = true;
                continue;
            }
            if (!off) {
                continue;
            }
            if (cl >= c->nb) {
                /* the rebuild (-r all) leaves it out of the new structure */
                msg(c, "ERROR refcount block %" G_GUINT64_FORMAT " is outside image", i);
                c->res->corruptions++;
                c->need_rebuild = true;
                continue;
            }
            ref_range(c, off, s->cluster_size);
            if (c->ref[cl] != 1) {
                msg(c, "ERROR refcount block %" G_GUINT64_FORMAT " refcount=%u", i, (unsigned)c->ref[cl]);
                c->res->corruptions++;
                c->need_rebuild = true;
            }
        }
    }
    return 0;
}

static bool
chk_init(Chk *c, Qcow2 *s, VdkCheckResult *res, GError **error)
{
    memset(c, 0, sizeof(*c));
    c->s = s;
    c->res = res;
    if (!vdk_file_refresh_size(s->file, error)) {
        return false;
    }
    c->file_size = s->file->size;
    c->nb = qcow2_align(s, s->file->size) >> s->cluster_bits;
    c->cap = c->nb + 1;
    if (c->nb > QCOW2_CHECK_MAX_CLUSTERS) {
        g_set_error(error, VDK_ERROR, EFBIG,
                    "qcow2: the image has %" G_GUINT64_FORMAT " clusters, more than this check can count (%llu)", c->nb,
                    (unsigned long long)QCOW2_CHECK_MAX_CLUSTERS);
        return false;
    }
    c->ref = g_try_new0(uint16_t, c->cap);
    if (posix_memalign((void **)&c->buf, 4096, s->cluster_size) != 0) {
        c->buf = NULL;
    }
    if (!c->ref || !c->buf) {
        g_free(c->ref);
        free(c->buf);
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: not enough memory to check %" G_GUINT64_FORMAT " clusters", c->nb);
        return false;
    }
    return true;
}

static void
chk_free(Chk *c)
{
    g_free(c->ref);
    free(c->buf);
}

/* Rewrite COPIED flags in the active L1 and L2 tables from @counts. */
static int
fix_copied(Chk *c, const uint16_t *counts)
{
    Qcow2 *s = c->s;
    bool l1_changed = false;
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t e = s->l1[i];
        uint64_t t = e & QCOW2_OFFSET_MASK;
        if (!t || (t >> s->cluster_bits) >= c->nb) {
            continue;
        }
        bool want = counts[t >> s->cluster_bits] == 1;
        if (want != !!(e & QCOW2_OFLAG_COPIED)) {
            s->l1[i] = want ? (e | QCOW2_OFLAG_COPIED) : (e & ~QCOW2_OFLAG_COPIED);
            l1_changed = true;
        }
        if (read_cluster(c, t) < 0) {
            return -EIO;
        }
        bool changed = false;
        for (uint64_t k = 0; k < s->l2_entries; k++) {
            uint64_t bm;
            uint64_t l2e = qcow2_l2_get(s, c->buf, k, &bm);
            uint64_t h = l2e & QCOW2_OFFSET_MASK;
            if ((l2e & QCOW2_OFLAG_COMPRESSED) || !h || (h >> s->cluster_bits) >= c->nb) {
                continue;
            }
            bool w = counts[h >> s->cluster_bits] == 1;
            if (w != !!(l2e & QCOW2_OFLAG_COPIED)) {
                qcow2_l2_set(s, c->buf, k, w ? (l2e | QCOW2_OFLAG_COPIED) : (l2e & ~QCOW2_OFLAG_COPIED), bm);
                changed = true;
            }
        }
        if (changed && vdk_file_pwrite_sync(s->file, c->buf, s->cluster_size, t) < 0) {
            return -EIO;
        }
    }
    if (l1_changed) {
        uint8_t *raw = g_malloc((size_t)s->l1_size * 8);
        for (uint32_t i = 0; i < s->l1_size; i++) {
            qput64(raw + (size_t)i * 8, s->l1[i]);
        }
        int r = vdk_file_pwrite_sync(s->file, raw, (size_t)s->l1_size * 8, s->l1_offset);
        g_free(raw);
        if (r < 0) {
            return r;
        }
    }
    return 0;
}

static inline uint64_t
counts_get(const uint16_t *a, uint64_t i)
{
    return a[i];
}

/* Write a new refcount structure past the end of the file holding
 * @counts (which do not include the old structure), then switch the
 * header to it. */
static int
rebuild(Chk *c)
{
    Qcow2 *s = c->s;
    uint32_t cb = s->cluster_bits;
    uint64_t cs = s->cluster_size;
    uint64_t rb_entries = 1ULL << s->refblock_bits;
    uint64_t start = c->nb; /* first cluster past the end of the file */
    uint64_t nrb = 0, nrt = 1, total = 0;
    for (int i = 0; i < 64; i++) {
        total = start + nrt + nrb;
        uint64_t want_rb = (total + rb_entries - 1) / rb_entries;
        uint64_t want_rt = MAX((want_rb * 8 + cs - 1) / cs, (uint64_t)1);
        if (want_rb == nrb && want_rt == nrt) {
            break;
        }
        nrb = want_rb;
        nrt = want_rt;
    }
    if ((nrt << cb) > QCOW2_MAX_REFTABLE_BYTES) {
        return -EFBIG;
    }
    uint64_t rt_off = start << cb;
    uint64_t rb_off = (start + nrt) << cb;
    uint8_t *blk = c->buf;
    int r = 0;
    for (uint64_t b = 0; b < nrb && r == 0; b++) {
        memset(blk, 0, cs);
        for (uint64_t k = 0; k < rb_entries; k++) {
            uint64_t i = b * rb_entries + k;
            uint64_t v = i < c->nb ? counts_get(c->ref, i) : (i < total ? 1 : 0);
            if (v) {
                put_refcount(s, blk, k, v);
            }
        }
        r = vdk_file_pwrite_sync(s->file, blk, cs, rb_off + (b << cb));
    }
    uint64_t *rt = g_new0(uint64_t, nrt << (cb - 3));
    for (uint64_t b = 0; b < nrb; b++) {
        rt[b] = rb_off + (b << cb);
    }
    for (uint64_t k = 0; k < nrt && r == 0; k++) {
        memset(blk, 0, cs);
        for (uint64_t e = 0; e < cs / 8; e++) {
            qput64(blk + e * 8, rt[k * (cs / 8) + e]);
        }
        r = vdk_file_pwrite_sync(s->file, blk, cs, rt_off + (k << cb));
    }
    if (r == 0) {
        r = vdk_file_flush_sync(s->file);
    }
    if (r < 0) {
        g_free(rt);
        return r;
    }
    /* switch */
    g_free(s->reftable);
    s->reftable = rt;
    s->reftable_size = nrt << (cb - 3);
    s->reftable_offset = rt_off;
    s->reftable_clusters = (uint32_t)nrt;
    s->reftable_dirty_lo = UINT64_MAX;
    s->reftable_moved = false;
    g_hash_table_remove_all(s->refblocks);
    for (uint64_t b = 0; b < nrb; b++) {
        g_hash_table_add(s->refblocks, GSIZE_TO_POINTER((rb_off >> cb) + b));
    }
    s->next_free = MAX(s->next_free, total << cb);
    qcow2_update_header_buf(s);
    r = vdk_file_pwrite_sync(s->file, s->hdr, s->hdr_used, 0);
    if (r == 0) {
        r = vdk_file_flush_sync(s->file);
    }
    /* cached refcount blocks belong to the old structure */
    vdk_mc_free(s->rc);
    s->rc = vdk_mc_new(s->node, s->file, s->cluster_size, 8u << 20);
    if (s->frees) {
        g_array_set_size(s->frees, 0);
    }
    return r;
}


/* Forget cached metadata in [off, off+len) after an in-place repair. */
static void
forget_range(VdkMetaCache *mc, uint64_t off, uint64_t len)
{
    uint32_t ss = vdk_mc_slice_size(mc);
    for (uint64_t o = off & ~((uint64_t)ss - 1); o < off + len; o += ss) {
        vdk_mc_forget(mc, o);
    }
}

/*
 * Compare the stored refcounts with the references counted.  Without @fix
 * every difference is reported ("Leaked" / "ERROR"); with @fix the ones
 * allowed are corrected in place in their refcount block ("Repairing") and
 * counted as fixed.  A referenced cluster with a stored refcount of 0
 * cannot be fixed in place (its refcount block may not even exist): it asks
 * for a rebuild of the whole structure.
 */
static void
compare_refcounts(Chk *c, int fix, uint64_t *highest)
{
    Qcow2 *s = c->s;
    RbReader rb = {.blk_off = UINT64_MAX, .blk = NULL};
    if (posix_memalign((void **)&rb.blk, 4096, s->cluster_size) != 0) {
        c->res->check_errors++;
        return;
    }
    *highest = 0;
    for (uint64_t i = 0; i < c->nb; i++) {
        bool err = false;
        uint64_t stored = stored_refcount(c, &rb, i, &err);
        if (err) {
            c->res->check_errors++;
            continue;
        }
        uint64_t want = c->ref[i];
        if (stored > 0 || want > 0) {
            *highest = i;
        }
        if (stored == want) {
            continue;
        }
        int kind = 0; /* 1: fix a leak, 2: fix an error */
        if (stored == 0) {
            c->need_rebuild = true;
        } else if (stored > want && (fix & VDK_CHECK_FIX_LEAKS)) {
            kind = 1;
        } else if (stored < want && (fix & VDK_CHECK_FIX_ERRORS)) {
            kind = 2;
        }
        msg(c, "%s cluster %" G_GUINT64_FORMAT " refcount=%" G_GUINT64_FORMAT " reference=%" G_GUINT64_FORMAT,
            kind ? "Repairing" : stored < want ? "ERROR" : "Leaked", i, stored, want);
        if (kind && want <= s->refcount_max) {
            /* stored > 0: the block holding this refcount is in rb */
            put_refcount(s, rb.blk, i & ((1ULL << s->refblock_bits) - 1), want);
            if (vdk_file_pwrite_sync(s->file, rb.blk, s->cluster_size, rb.blk_off) == 0) {
                forget_range(s->rc, rb.blk_off, s->cluster_size);
                if (kind == 1) {
                    c->res->leaks_fixed++;
                } else {
                    c->res->corruptions_fixed++;
                }
                continue;
            }
            rb.blk_off = UINT64_MAX; /* unknown state: read it again */
        }
        if (stored < want) {
            c->res->corruptions++;
        } else {
            c->res->leaks++;
        }
    }
    free(rb.blk);
}

/* COPIED must be set exactly where the refcount is 1 (active tables only). */
static int
check_copied(Chk *c, int fix)
{
    Qcow2 *s = c->s;
    bool repair = fix & VDK_CHECK_FIX_ERRORS;
    RbReader rb = {.blk_off = UINT64_MAX, .blk = NULL};
    if (posix_memalign((void **)&rb.blk, 4096, s->cluster_size) != 0) {
        c->res->check_errors++;
        return -ENOMEM;
    }
    int ret = 0;
    for (uint32_t i = 0; i < s->l1_size && ret == 0; i++) {
        uint64_t e = s->l1[i];
        uint64_t t = e & QCOW2_OFFSET_MASK;
        if (!t) {
            continue;
        }
        bool err = false;
        uint64_t rc = stored_refcount(c, &rb, t >> s->cluster_bits, &err);
        if (!err && (rc == 1) != !!(e & QCOW2_OFLAG_COPIED)) {
            msg(c, "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" G_GINT64_MODIFIER "x refcount=%" G_GUINT64_FORMAT,
                repair ? "Repairing" : "ERROR", i, e, rc);
            if (repair) {
                uint64_t ne = rc == 1 ? (e | QCOW2_OFLAG_COPIED) : (e & ~QCOW2_OFLAG_COPIED);
                uint8_t raw[8];
                qput64(raw, ne);
                if (vdk_file_pwrite_sync(s->file, raw, 8, s->l1_offset + (uint64_t)i * 8) < 0) {
                    c->res->check_errors++;
                    ret = -EIO;
                    break;
                }
                s->l1[i] = ne;
                c->res->corruptions_fixed++;
            } else {
                c->res->corruptions++;
                c->copied_errors = true;
            }
        }
        if (read_cluster(c, t) < 0) {
            continue;
        }
        bool changed = false;
        for (uint64_t k = 0; k < s->l2_entries; k++) {
            uint64_t bm;
            uint64_t l2e = qcow2_l2_get(s, c->buf, k, &bm);
            uint64_t h = l2e & QCOW2_OFFSET_MASK;
            if ((l2e & QCOW2_OFLAG_COMPRESSED) || !h) {
                continue;
            }
            uint64_t hrc = stored_refcount(c, &rb, h >> s->cluster_bits, &err);
            if (err || (hrc == 1) == !!(l2e & QCOW2_OFLAG_COPIED)) {
                continue;
            }
            msg(c, "%s OFLAG_COPIED data cluster: l2_entry=%" G_GINT64_MODIFIER "x refcount=%" G_GUINT64_FORMAT,
                repair ? "Repairing" : "ERROR", l2e, hrc);
            if (repair) {
                qcow2_l2_set(s, c->buf, k, hrc == 1 ? (l2e | QCOW2_OFLAG_COPIED) : (l2e & ~QCOW2_OFLAG_COPIED), bm);
                changed = true;
                c->res->corruptions_fixed++;
            } else {
                c->res->corruptions++;
                c->copied_errors = true;
            }
        }
        if (changed) {
            if (vdk_file_pwrite_sync(s->file, c->buf, s->cluster_size, t) < 0) {
                c->res->check_errors++;
                ret = -EIO;
            }
            forget_range(s->l2c, t, s->cluster_size);
        }
    }
    free(rb.blk);
    return ret;
}

/*
 * The check proper.  The order and the counting follow qemu-img, so the
 * report and the messages are the same:
 *  1. count every reference (the refcount structure included);
 *  2. compare with the stored refcounts, reporting only;
 *  3. if a referenced cluster has refcount 0 the structure must be rebuilt
 *     (-r all): a new one holding the counted references is written past
 *     the end of the file and the header switched to it; the old one is
 *     then leaked, and those leaks are repaired in place;
 *     otherwise, with -r, compare again and repair in place what -r allows;
 *  4. check (and with -r all repair) the COPIED flags.
 */
static bool
run_check(Qcow2 *s, int fix, VdkCheckResult *res, GError **error)
{
    Chk c;
    if (!chk_init(&c, s, res, error)) {
        return false;
    }
    count_references(&c, true);
    VdkCheckResult pre = *res;
    uint64_t highest = 0;
    compare_refcounts(&c, 0, &highest);

    bool ok = true;
    if (c.need_rebuild && (fix & VDK_CHECK_FIX_ERRORS)) {
        VdkCheckResult old = *res;
        msg(&c, "Rebuilding refcount structure");
        int rr = rebuild(&c);
        if (rr < 0) {
            g_set_error(error, VDK_ERROR, -rr, "qcow2: rebuilding the refcount structure failed: %s", g_strerror(-rr));
            chk_free(&c);
            return false;
        }
        /* recount against the new structure */
        res->corruptions = 0;
        res->leaks = 0;
        chk_free(&c);
        if (!chk_init(&c, s, res, error)) {
            return false;
        }
        count_references(&c, true);
        uint64_t fresh_leaks = 0;
        if (fix & VDK_CHECK_FIX_LEAKS) {
            /* the old structure is leaked now: repair that quietly in the
             * counters (the messages are printed, as qemu-img does) */
            VdkCheckResult saved = *res;
            VdkCheckResult scratch;
            memset(&scratch, 0, sizeof(scratch));
            scratch.messages = res->messages;
            c.res = &scratch;
            c.need_rebuild = false;
            compare_refcounts(&c, VDK_CHECK_FIX_LEAKS, &highest);
            if (c.need_rebuild) {
                msg(&c, "ERROR rebuilt refcount structure is still broken");
            }
            fresh_leaks = scratch.leaks;
            *res = saved;
            c.res = res;
        }
        if (res->corruptions < old.corruptions) {
            res->corruptions_fixed += old.corruptions - res->corruptions;
        }
        if (res->leaks < old.leaks) {
            res->leaks_fixed += old.leaks - res->leaks;
        }
        res->leaks += fresh_leaks;
    } else if (fix) {
        if (c.need_rebuild) {
            msg(&c, "ERROR need to rebuild refcount structures");
            res->check_errors++;
            g_set_error(error, VDK_ERROR, EIO, "Check failed: Input/output error");
            chk_free(&c);
            return false;
        }
        if (res->leaks || res->corruptions) {
            VdkCheckResult keep_msgs = pre;
            keep_msgs.messages = res->messages;
            *res = keep_msgs;
            compare_refcounts(&c, fix, &highest);
        }
    }
    if (check_copied(&c, fix) < 0) {
        ok = false;
        g_set_error(error, VDK_ERROR, EIO, "qcow2: repairing the COPIED flags failed");
    }
    res->total_clusters = (s->size + s->cluster_size - 1) >> s->cluster_bits;
    res->image_end_offset = (highest + 1) << s->cluster_bits;
    res->has_stats = true;
    chk_free(&c);
    return ok;
}

bool
qcow2_check(VdkNode *n, int fix, VdkCheckResult *res, GError **error)
{
    Qcow2 *s = n->opaque;
    bool ok = run_check(s, fix, res, error);
    if (ok && fix && res->check_errors == 0 && res->corruptions == 0 &&
        (s->incompatible & (QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY))) {
        /* consistent now: clear the dirty and corrupt bits, as qemu-img does */
        s->incompatible &= ~(QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DIRTY);
        s->corrupt = false;
        s->dirty_on_disk = false;
        qcow2_update_header_buf(s);
        if (vdk_file_flush_sync(s->file) < 0 || vdk_file_pwrite_sync(s->file, s->hdr, s->hdr_used, 0) < 0 ||
            vdk_file_flush_sync(s->file) < 0) {
            g_set_error(error, VDK_ERROR, EIO, "qcow2: cannot update the header after the check");
            ok = false;
        }
    }
    if (ok && fix && (res->leaks_fixed || res->corruptions_fixed)) {
        /* Double check, as qemu-img does: the report is of the fixed
         * image, with the repair counts kept. */
        VdkCheckResult again;
        memset(&again, 0, sizeof(again));
        again.messages = res->messages;
        ok = run_check(s, 0, &again, error);
        again.leaks_fixed = res->leaks_fixed;
        again.corruptions_fixed = res->corruptions_fixed;
        *res = again;
    }
    return ok;
}

bool
qcow2_repair_refcounts(Qcow2 *s, GError **error)
{
    Chk c;
    if (!chk_init(&c, s, NULL, error)) {
        return false;
    }
    VdkCheckResult scratch;
    memset(&scratch, 0, sizeof(scratch));
    c.res = &scratch;
    count_references(&c, false);
    int r = rebuild(&c);
    if (r == 0) {
        r = fix_copied(&c, c.ref);
    }
    chk_free(&c);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: repairing the refcounts of a dirty image failed: %s", g_strerror(-r));
        return false;
    }
    g_log("vdk", G_LOG_LEVEL_MESSAGE, "qcow2: %s: repaired refcounts after an unclean shutdown (lazy refcounts)",
          s->node->filename);
    return true;
}

/* ------------------------------------------------------------------------ */
/* Resize                                                                    */
/* ------------------------------------------------------------------------ */

bool
qcow2_truncate(VdkNode *n, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error)
{
    (void)shrink;
    Qcow2 *s = n->opaque;
    if (prealloc != VDK_PREALLOC_OFF) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: resize with preallocation is not supported yet");
        return false;
    }
    if (s->nb_snapshots && size < s->size) {
        /* growing leaves the snapshots alone (they keep their own size) */
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: cannot shrink an image with internal snapshots");
        return false;
    }
    if (size > QCOW2_MAX_VIRTUAL_SIZE) {
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: size %" G_GUINT64_FORMAT " is too large", size);
        return false;
    }
    /* Everything in memory goes to disk first, so the steps below work on
     * the on-disk state and the caches stay valid. */
    int r = vdk_image_sync_request(n->img, VDK_OP_FLUSH, 0, NULL, 0, 0, NULL);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: flush before resize failed: %s", g_strerror(-r));
        return false;
    }
    uint64_t per_l1 = s->l2_entries << s->cluster_bits;
    uint64_t new_l1 = (size + per_l1 - 1) / per_l1;
    if (size < s->size) {
        /* Drop the clusters past the new end (whole clusters only; the
         * rest of a partial last cluster stays and reads as before). */
        uint64_t from = qcow2_align(s, size);
        if (from < s->size) {
            r = vdk_image_sync_request(n->img, VDK_OP_DISCARD, from, NULL, s->size - from, 0, NULL);
            if (r < 0) {
                g_set_error(error, VDK_ERROR, -r, "qcow2: discarding past the new end failed: %s", g_strerror(-r));
                return false;
            }
        }
        g_mutex_lock(&n->lock);
        s->size = size;
        n->size = size;
        s->hdr_dirty = true;
        g_mutex_unlock(&n->lock);
    } else if (new_l1 > s->l1_size) {
        /* A bigger L1 table: written in full at the end of the image,
         * synced, then the header switches to it; the old one is freed. */
        g_mutex_lock(&n->lock);
        uint64_t bytes = new_l1 * 8;
        if (bytes > QCOW2_MAX_L1_BYTES) {
            g_mutex_unlock(&n->lock);
            g_set_error(error, VDK_ERROR, EFBIG, "qcow2: the L1 table for %" G_GUINT64_FORMAT " bytes would exceed %u bytes",
                        size, QCOW2_MAX_L1_BYTES);
            return false;
        }
        uint64_t nclusters = (bytes + s->cluster_size - 1) >> s->cluster_bits;
        int ret = 0;
        uint64_t off = qcow2_alloc_clusters(s, nclusters, NULL, &ret);
        if (!off) {
            g_mutex_unlock(&n->lock);
            g_set_error(error, VDK_ERROR, ret < 0 ? -ret : EIO, "qcow2: cannot allocate a new L1 table: %s",
                        g_strerror(ret < 0 ? -ret : EIO));
            return false;
        }
        uint64_t *l1 = g_try_renew(uint64_t, s->l1, new_l1);
        if (!l1) {
            g_mutex_unlock(&n->lock);
            g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: out of memory for the L1 table");
            return false;
        }
        memset(l1 + s->l1_size, 0, (new_l1 - s->l1_size) * 8);
        s->l1 = l1;
        uint8_t *raw = g_malloc0(nclusters << s->cluster_bits);
        for (uint64_t i = 0; i < new_l1; i++) {
            qput64(raw + i * 8, l1[i]);
        }
        g_mutex_unlock(&n->lock);
        /* the refcounts of the new table must be durable before the header
         * points at it: flush them first */
        r = vdk_image_sync_request(n->img, VDK_OP_FLUSH, 0, NULL, 0, VDK_FLUSH_EVICT, NULL);
        if (r == 0) {
            r = vdk_file_pwrite_sync(s->file, raw, nclusters << s->cluster_bits, off);
        }
        if (r == 0) {
            r = vdk_file_flush_sync(s->file);
        }
        g_free(raw);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "qcow2: cannot write the new L1 table: %s", g_strerror(-r));
            return false;
        }
        g_mutex_lock(&n->lock);
        uint64_t old_off = s->l1_offset;
        uint64_t old_clusters = ((uint64_t)s->l1_size * 8 + s->cluster_size - 1) >> s->cluster_bits;
        s->l1_offset = off;
        s->l1_size = (uint32_t)new_l1;
        s->size = size;
        n->size = size;
        s->hdr_dirty = true;
        if (old_off) {
            qcow2_defer_free(s, old_off, old_clusters);
        }
        g_mutex_unlock(&n->lock);
    } else {
        g_mutex_lock(&n->lock);
        s->size = size;
        n->size = size;
        s->hdr_dirty = true;
        g_mutex_unlock(&n->lock);
    }
    /* header (and the freed old table) */
    r = vdk_image_sync_request(n->img, VDK_OP_FLUSH, 0, NULL, 0, VDK_FLUSH_EVICT, NULL);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot write the new size: %s", g_strerror(-r));
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------------ */
/* Refcount width (amend refcount_bits=)                                     */
/* ------------------------------------------------------------------------ */

/* A new refcount structure of width 2^@order bits, built from the
 * references the metadata holds, written past the end of the file; one
 * header write switches both the table and the width. */
bool
qcow2_change_refcount_width(Qcow2 *s, uint32_t order, GError **error)
{
    VdkNode *n = s->node;
    g_mutex_lock(&n->lock);
    Chk c;
    if (!chk_init(&c, s, NULL, error)) {
        g_mutex_unlock(&n->lock);
        return false;
    }
    VdkCheckResult scratch;
    memset(&scratch, 0, sizeof(scratch));
    c.res = &scratch;
    count_references(&c, false);
    uint32_t bits = 1u << order;
    uint64_t max = bits == 64 ? UINT64_MAX : (1ULL << bits) - 1;
    for (uint64_t i = 0; i < c.nb; i++) {
        uint64_t v = counts_get(c.ref, i);
        if (v > max) {
            chk_free(&c);
            g_mutex_unlock(&n->lock);
            g_set_error(error, VDK_ERROR, EINVAL,
                        "Cannot decrease refcount entry width to %u bits: Cluster at offset %#" G_GINT64_MODIFIER
                        "x has a refcount of %" G_GUINT64_FORMAT, bits, i << s->cluster_bits, v);
            return false;
        }
    }
    uint32_t o_order = s->refcount_order, o_bits = s->refcount_bits, o_rbb = s->refblock_bits;
    uint64_t o_max = s->refcount_max;
    s->refcount_order = order;
    s->refcount_bits = bits;
    s->refblock_bits = s->cluster_bits + 3 - order;
    s->refcount_max = max;
    int r = rebuild(&c);
    chk_free(&c);
    if (r < 0) {
        s->refcount_order = o_order;
        s->refcount_bits = o_bits;
        s->refblock_bits = o_rbb;
        s->refcount_max = o_max;
        g_mutex_unlock(&n->lock);
        g_set_error(error, VDK_ERROR, -r, "qcow2: writing the new refcount structure failed: %s", g_strerror(-r));
        return false;
    }
    g_mutex_unlock(&n->lock);
    return true;
}
