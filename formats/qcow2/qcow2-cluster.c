/* SPDX-License-Identifier: MIT */
/*
 * qcow2-cluster.c - guest to host mapping: L1/L2 lookups for reads and
 * block status, allocation plans for writes, zero clusters and discard.
 *
 * Reads map each guest range to DATA (host offset), ZERO, UNALLOC (backing
 * file or zeroes) or COMPRESSED extents, merging neighbours with the same
 * status (and contiguous host space).  A miss in the L2 cache parks the
 * request until the slice is read.
 *
 * Writes go in place to clusters that are allocated, not compressed and
 * owned by this image alone (the COPIED flag).  Anything else becomes an
 * allocation: new clusters at the end of the image, the rest of each cluster
 * filled by copy-on-write from what the guest saw before (backing file, the
 * old shared or compressed cluster) unless it is known to read as zeroes,
 * and the L2 entries switched only after the data is written
 * (qcow2_alloc_done).  With extended L2 entries the unit is the subcluster:
 * a 4 KiB write into an empty 64 KiB cluster writes 4 KiB (rounded to the
 * 2 KiB subclusters) and copies nothing.  Overlapping allocations are
 * serialised per cluster.
 *
 * Every entry is checked before use: reserved bits, alignment, offsets in
 * the header or the L1/refcount tables, offsets past the end of the image
 * mark the image corrupt and fail the request (-EIO) instead of reading or
 * writing through them.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"

/* Limit on the clusters one allocation covers (bounds the old-entries
 * array and keeps one write's metadata change small). */
#define QCOW2_MAX_ALLOC_CLUSTERS 512u

typedef enum {
    ST_UNALLOC,
    ST_ZERO,
    ST_DATA,
    ST_COMPRESSED,
} Status;

/* ------------------------------------------------------------------------ */
/* Validation                                                                */
/* ------------------------------------------------------------------------ */

static bool
overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

/* Is the cluster at @host a legal place for data or an L2 table? */
static int
check_host_cluster(Qcow2 *s, uint64_t host, const char *what, uint64_t guest)
{
    if (host & (s->cluster_size - 1)) {
        return qcow2_signal_corruption(s, "%s for guest offset %" G_GUINT64_FORMAT " at unaligned host offset 0x%" G_GINT64_MODIFIER "x",
                                       what, guest, host);
    }
    if (host < s->cluster_size) {
        return qcow2_signal_corruption(s, "%s for guest offset %" G_GUINT64_FORMAT " points into the header", what,
                                       guest);
    }
    if (host >= s->next_free) {
        return qcow2_signal_corruption(s, "%s for guest offset %" G_GUINT64_FORMAT " at 0x%" G_GINT64_MODIFIER "x is past the end of the image",
                                       what, guest, host);
    }
    if (overlaps(host, s->cluster_size, s->l1_offset, (uint64_t)s->l1_size * 8)) {
        return qcow2_signal_corruption(s, "%s for guest offset %" G_GUINT64_FORMAT " overlaps the L1 table", what,
                                       guest);
    }
    if (overlaps(host, s->cluster_size, s->reftable_offset, (uint64_t)s->reftable_clusters << s->cluster_bits)) {
        return qcow2_signal_corruption(s, "%s for guest offset %" G_GUINT64_FORMAT " overlaps the refcount table",
                                       what, guest);
    }
    if (g_hash_table_contains(s->refblocks, GSIZE_TO_POINTER(host >> s->cluster_bits))) {
        return qcow2_signal_corruption(s, "%s for guest offset %" G_GUINT64_FORMAT " points into a refcount block",
                                       what, guest);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Lookups                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct {
    uint64_t l1_idx;
    uint64_t l2_idx;    /* within the table */
    uint64_t table;     /* L2 table offset, 0 if none */
    uint64_t slice_off; /* slice holding l2_idx */
    uint64_t in_slice;  /* index within the slice */
    uint64_t slice_entries;
} Loc;

static void
locate(const Qcow2 *s, uint64_t guest, Loc *l)
{
    uint64_t c = guest >> s->cluster_bits;
    l->l1_idx = c >> s->l2_bits;
    l->l2_idx = c & (s->l2_entries - 1);
    uint32_t slice = vdk_mc_slice_size(s->l2c);
    l->slice_entries = slice / s->l2_entry_size;
    l->in_slice = l->l2_idx & (l->slice_entries - 1);
    l->table = 0;
    l->slice_off = 0;
}

/* The L2 table offset for l->l1_idx (0 if unallocated), validated. */
static int
l1_lookup(Qcow2 *s, Loc *l, uint64_t guest, bool *copied)
{
    if (l->l1_idx >= s->l1_size) {
        return qcow2_signal_corruption(s, "guest offset %" G_GUINT64_FORMAT " is beyond the L1 table", guest);
    }
    uint64_t e = s->l1[l->l1_idx];
    if (copied) {
        *copied = (e & QCOW2_OFLAG_COPIED) != 0;
    }
    uint64_t t = e & QCOW2_OFFSET_MASK;
    if (e & QCOW2_L1_RESERVED) {
        return qcow2_signal_corruption(s, "L1 entry %" G_GUINT64_FORMAT " has reserved bits set (0x%" G_GINT64_MODIFIER "x)",
                                       l->l1_idx, e);
    }
    if (t) {
        int ret = check_host_cluster(s, t, "L2 table", guest);
        if (ret < 0) {
            return ret;
        }
    }
    l->table = t;
    l->slice_off = t + ((l->l2_idx * s->l2_entry_size) & ~(uint64_t)(vdk_mc_slice_size(s->l2c) - 1));
    return 0;
}

/* Status of one (sub)cluster-aligned unit described by an L2 entry.
 * Extended L2: @sc is the subcluster index; *run_sc = subclusters from sc
 * with the same status.  Returns -EIO for a corrupt entry. */
static int
classify(Qcow2 *s, uint64_t e, uint64_t bm, uint32_t sc, uint64_t guest, Status *st, uint64_t *host,
         uint32_t *run_sc)
{
    *run_sc = 32 - sc;
    if (e & QCOW2_OFLAG_COMPRESSED) {
        if (s->extl2 && bm) {
            return qcow2_signal_corruption(s, "compressed cluster at guest offset %" G_GUINT64_FORMAT " has a subcluster bitmap",
                                           guest);
        }
        uint64_t off, len;
        qcow2_compressed_range(s, e, &off, &len);
        if (off < s->cluster_size || off + len > s->next_free + s->cluster_size) {
            return qcow2_signal_corruption(s, "compressed cluster for guest offset %" G_GUINT64_FORMAT " at 0x%" G_GINT64_MODIFIER "x is out of bounds",
                                           guest, off);
        }
        *st = ST_COMPRESSED;
        *host = off;
        return 0;
    }
    if (e & QCOW2_L2_STD_RESERVED) {
        return qcow2_signal_corruption(s, "L2 entry for guest offset %" G_GUINT64_FORMAT " has reserved bits set (0x%" G_GINT64_MODIFIER "x)",
                                       guest, e);
    }
    uint64_t h = e & QCOW2_OFFSET_MASK;
    if (!s->extl2) {
        if (e & QCOW2_OFLAG_ZERO) {
            if (s->version < 3) {
                return qcow2_signal_corruption(s, "zero flag in a version 2 image at guest offset %" G_GUINT64_FORMAT,
                                               guest);
            }
            *st = ST_ZERO;
        } else {
            *st = h ? ST_DATA : ST_UNALLOC;
        }
        *host = h;
        if (h) {
            return check_host_cluster(s, h, "data", guest);
        }
        return 0;
    }
    if (e & QCOW2_OFLAG_ZERO) {
        return qcow2_signal_corruption(s, "zero flag in an extended L2 entry at guest offset %" G_GUINT64_FORMAT, guest);
    }
    uint32_t alloc = (uint32_t)bm;
    uint32_t zero = (uint32_t)(bm >> 32);
    if (alloc & zero) {
        return qcow2_signal_corruption(s, "subclusters both allocated and zero at guest offset %" G_GUINT64_FORMAT,
                                       guest);
    }
    if (alloc && !h) {
        return qcow2_signal_corruption(s, "allocated subclusters without a host cluster at guest offset %" G_GUINT64_FORMAT,
                                       guest);
    }
    if (h) {
        int ret = check_host_cluster(s, h, "data", guest);
        if (ret < 0) {
            return ret;
        }
    }
    uint32_t bit = 1u << sc;
    *st = (alloc & bit) ? ST_DATA : (zero & bit) ? ST_ZERO : ST_UNALLOC;
    /* with a host cluster, every subcluster has its place in it (block
     * status reports it even for zero and unallocated ones, like qemu) */
    *host = h ? h + ((uint64_t)sc << s->sc_bits) : 0;
    uint32_t n = 1;
    while (sc + n < 32) {
        uint32_t b = 1u << (sc + n);
        Status s2 = (alloc & b) ? ST_DATA : (zero & b) ? ST_ZERO : ST_UNALLOC;
        if (s2 != *st) {
            break;
        }
        n++;
    }
    *run_sc = n;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Reads and block status                                                    */
/* ------------------------------------------------------------------------ */

static int
map_read(Qcow2 *s, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r)
{
    Loc l;
    locate(s, offset, &l);
    int ret = l1_lookup(s, &l, offset, NULL);
    if (ret < 0) {
        return ret;
    }
    uint64_t table_end = ((l.l1_idx + 1) * s->l2_entries) << s->cluster_bits;
    if (!l.table) {
        ext->kind = VDK_EXT_UNALLOC;
        ext->len = MIN(len, table_end - offset);
        return 0;
    }
    VdkMetaEntry *sl = vdk_mc_get(s->l2c, l.slice_off, r, &ret);
    if (!sl) {
        return ret == -ENOBUFS ? ret : (ret ? ret : -EIO);
    }
    uint64_t end = offset + len;
    uint64_t pos = offset;
    Status first = ST_UNALLOC;
    uint64_t first_host = 0, next_host = 0;
    uint64_t idx = l.in_slice;
    bool started = false;
    uint64_t unit = s->extl2 ? (1ULL << s->sc_bits) : s->cluster_size;
    while (pos < end && idx < l.slice_entries) {
        uint64_t bm;
        uint64_t e = qcow2_l2_get(s, sl->data, idx, &bm);
        uint32_t sc = s->extl2 ? (uint32_t)((pos >> s->sc_bits) & 31) : 0;
        Status st;
        uint64_t host;
        uint32_t run_sc;
        ret = classify(s, e, bm, sc, pos, &st, &host, &run_sc);
        if (ret < 0) {
            return ret;
        }
        uint64_t unit_start = pos & ~(unit - 1);
        uint64_t run_end = s->extl2 ? unit_start + ((uint64_t)run_sc << s->sc_bits)
                                    : (pos | (s->cluster_size - 1)) + 1;
        uint64_t piece_host = host ? host + (pos - unit_start) : 0;
        if (!s->extl2 && st == ST_ZERO && host) {
            piece_host = host + (pos - unit_start);
        }
        if (!started) {
            first = st;
            first_host = piece_host;
            started = true;
            if (st == ST_COMPRESSED) {
                uint64_t coff, clen;
                qcow2_compressed_range(s, e, &coff, &clen);
                ext->kind = VDK_EXT_COMPRESSED;
                ext->file = s->file;
                ext->host_offset = coff;
                ext->comp_len = clen;
                ext->unit_offset = pos & ~(uint64_t)(s->cluster_size - 1);
                ext->unit_size = s->cluster_size;
                ext->len = MIN(end, run_end) - offset;
                return 0;
            }
        } else if (st != first || st == ST_COMPRESSED || (first_host != 0) != (piece_host != 0) ||
                   (piece_host && piece_host != next_host)) {
            break;
        }
        uint64_t stop = MIN(end, run_end);
        next_host = piece_host + (stop - pos);
        pos = stop;
        if (pos >= run_end && (!s->extl2 || ((pos >> s->sc_bits) & 31) == 0)) {
            idx++;
        }
    }
    ext->len = pos - offset;
    ext->file = s->file;
    switch (first) {
    case ST_DATA:
        ext->kind = VDK_EXT_DATA;
        ext->host_offset = first_host;
        break;
    case ST_ZERO:
        ext->kind = VDK_EXT_ZERO;
        /* a preallocated zero cluster reports its offset, like qemu */
        if (first_host) {
            ext->host_valid = true;
            ext->host_offset = first_host;
        }
        break;
    default:
        ext->kind = VDK_EXT_UNALLOC;
        if (first_host) {
            ext->host_valid = true;
            ext->host_offset = first_host;
        }
        break;
    }
    return 0;
}

int
qcow2_block_status(VdkNode *n, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r)
{
    Qcow2 *s = n->opaque;
    int ret = qcow2_map(n, offset, len, 0, ext, r);
    if (ret == 0 && ext->kind == VDK_EXT_DATA) {
        int mp = __atomic_load_n(&s->meta_prealloc, __ATOMIC_RELAXED);
        if (mp < 0) {
            mp = qcow2_metadata_preallocated(s) ? 1 : 0;
            __atomic_store_n(&s->meta_prealloc, mp, __ATOMIC_RELAXED);
        }
        ext->recurse = mp == 1;
    }
    return ret;
}

/* ------------------------------------------------------------------------ */
/* Writes                                                                    */
/* ------------------------------------------------------------------------ */

static Qcow2Alloc *
alloc_conflict(Qcow2 *s, uint64_t guest_cluster_start, uint64_t guest_end)
{
    for (Qcow2Alloc *a = s->allocs; a; a = a->next) {
        uint64_t gs = a->base.guest_start & ~(uint64_t)(s->cluster_size - 1);
        uint64_t ge = qcow2_align(s, a->base.guest_end);
        if (guest_cluster_start < ge && gs < guest_end) {
            return a;
        }
    }
    return NULL;
}

/* Give the L2 table for l->l1_idx a cluster of its own (allocate one, or
 * copy a table shared with a snapshot).  Returns 0, VDK_WAIT, -errno. */
static int
l2_table_prepare(Qcow2 *s, Loc *l, uint64_t guest, VdkRequest *r)
{
    bool copied;
    int ret = l1_lookup(s, l, guest, &copied);
    if (ret < 0) {
        return ret;
    }
    if (l->table && copied) {
        return 0;
    }
    uint32_t slice = vdk_mc_slice_size(s->l2c);
    uint64_t nslices = s->cluster_size / slice;
    VdkMetaEntry **old = NULL;
    if (l->table) {
        old = g_new(VdkMetaEntry *, nslices);
        /* Shared with a snapshot: every slice of the old table first. */
        for (uint64_t i = 0; i < nslices; i++) {
            old[i] = vdk_mc_get(s->l2c, l->table + i * slice, r, &ret);
            if (!old[i]) {
                for (uint64_t k = 0; k < i; k++) {
                    vdk_mc_unpin(old[k]);
                }
                g_free(old);
                return ret;
            }
            vdk_mc_pin(old[i]);
        }
    }
    uint64_t t = qcow2_alloc_clusters(s, 1, r, &ret);
    if (!t) {
        if (l->table) {
            for (uint64_t i = 0; i < nslices; i++) {
                vdk_mc_unpin(old[i]);
            }
        }
        g_free(old);
        return ret;
    }
    /* A new table starts as zeroes: fresh space at the end of the image
     * reads as zeroes, so only slices that change are ever written. */
    if (l->table) {
        for (uint64_t i = 0; i < nslices; i++) {
            VdkMetaEntry *ne = vdk_mc_get_fresh(s->l2c, t + i * slice, &ret);
            if (!ne) {
                /* cannot happen often: the old slices are pinned, so the
                 * cache has room only if it is not full of dirty ones */
                for (uint64_t k = 0; k < nslices; k++) {
                    vdk_mc_unpin(old[k]);
                }
                g_free(old);
                qcow2_defer_free(s, t, 1);
                return ret;
            }
            memcpy(ne->data, old[i]->data, slice);
        }
        for (uint64_t i = 0; i < nslices; i++) {
            vdk_mc_unpin(old[i]);
        }
        g_free(old);
        qcow2_defer_free(s, l->table, 1);
    }
    s->l1[l->l1_idx] = t | QCOW2_OFLAG_COPIED;
    s->l1_dirty_lo = MIN(s->l1_dirty_lo, l->l1_idx);
    s->l1_dirty_hi = MAX(s->l1_dirty_hi, l->l1_idx + 1);
    l->table = t;
    l->slice_off = t + ((l->l2_idx * s->l2_entry_size) & ~(uint64_t)(slice - 1));
    return 0;
}

/* Does the guest-visible content of the unit starting at @e matter for a
 * partial write (i.e. must the untouched part be copied)? */
static bool
has_old_content(Qcow2 *s, uint64_t e, uint64_t bm, bool extl2_whole_cluster)
{
    if (e & QCOW2_OFLAG_COMPRESSED) {
        return true;
    }
    if (s->node->crypt) {
        return true; /* encrypted: zeroes on disk do not decrypt to zeroes */
    }
    if (s->node->backing) {
        return true; /* unallocated parts read from the backing file */
    }
    if (s->extl2) {
        return extl2_whole_cluster ? (uint32_t)bm != 0 : false;
    }
    if (e & QCOW2_OFLAG_ZERO) {
        return false;
    }
    return (e & QCOW2_OFFSET_MASK) != 0;
}

static int
map_write(Qcow2 *s, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r)
{
    if (s->corrupt) {
        return -EIO;
    }
    Loc l;
    locate(s, offset, &l);
    int ret = l2_table_prepare(s, &l, offset, r);
    if (ret) {
        return ret;
    }
    uint64_t cs = s->cluster_size;
    uint64_t cstart = offset & ~(cs - 1);
    uint64_t end = offset + len;
    Qcow2Alloc *busy = alloc_conflict(s, cstart, MIN(end, cstart + cs));
    if (busy) {
        r->wait_next = busy->waiters;
        busy->waiters = r;
        return VDK_WAIT;
    }
    VdkMetaEntry *sl = vdk_mc_get(s->l2c, l.slice_off, r, &ret);
    if (!sl) {
        return ret;
    }
    uint64_t bm;
    uint64_t e = qcow2_l2_get(s, sl->data, l.in_slice, &bm);
    Status st;
    uint64_t host;
    uint32_t run_sc;
    uint32_t sc = s->extl2 ? (uint32_t)((offset >> s->sc_bits) & 31) : 0;
    ret = classify(s, e, bm, sc, offset, &st, &host, &run_sc);
    if (ret < 0) {
        return ret;
    }
    bool owned = (e & QCOW2_OFLAG_COPIED) && !(e & QCOW2_OFLAG_COMPRESSED) && (e & QCOW2_OFFSET_MASK);

    /* In place: allocated, owned, and (extended L2) every subcluster
     * touched in this cluster already allocated. */
    if (owned && st == ST_DATA) {
        /* (extended L2: the run of allocated subclusters; what follows
         * comes back as its own extent) */
        uint64_t stop = MIN(end, s->extl2 ? cstart + ((uint64_t)(sc + run_sc) << s->sc_bits) : cstart + cs);
        uint64_t host_at = s->extl2 ? host + (offset & ((1ULL << s->sc_bits) - 1))
                                    : (e & QCOW2_OFFSET_MASK) + (offset - cstart);
        /* extend over following clusters that are also owned data and
         * contiguous on the host (not for extended L2: per cluster) */
        uint64_t idx = l.in_slice + 1;
        uint64_t next_host = (e & QCOW2_OFFSET_MASK) + cs;
        while (!s->extl2 && stop == cstart + cs * (idx - l.in_slice) && stop < end && idx < l.slice_entries) {
            uint64_t e2 = qcow2_l2_get(s, sl->data, idx, NULL);
            if ((e2 & (QCOW2_OFLAG_COPIED | QCOW2_OFLAG_COMPRESSED | QCOW2_OFLAG_ZERO | QCOW2_L2_STD_RESERVED)) !=
                    QCOW2_OFLAG_COPIED ||
                (e2 & QCOW2_OFFSET_MASK) != next_host || alloc_conflict(s, stop, stop + cs)) {
                break;
            }
            stop = MIN(end, stop + cs);
            next_host += cs;
            idx++;
        }
        ext->kind = VDK_EXT_DATA;
        ext->file = s->file;
        ext->host_offset = host_at;
        ext->len = stop - offset;
        return 0;
    }

    /* Allocation. */
    Qcow2Alloc *a = g_new0(Qcow2Alloc, 1);
    a->slice_off = l.slice_off;
    a->first_index = l.in_slice;
    if (s->extl2 && owned) {
        /* The cluster has a host cluster of its own: allocate the touched
         * subclusters within it. */
        uint64_t sc_size = 1ULL << s->sc_bits;
        uint64_t wend = MIN(end, cstart + cs);
        a->base.guest_start = offset & ~(sc_size - 1);
        a->base.guest_end = vdk_align_up(wend, sc_size);
        a->base.cow = (offset != a->base.guest_start) || (wend != a->base.guest_end);
        a->base.host_offset = (e & QCOW2_OFFSET_MASK) + (a->base.guest_start - cstart);
        a->nclusters = 1;
        a->fresh_host = false;
        uint32_t s0 = (uint32_t)((a->base.guest_start - cstart) >> s->sc_bits);
        uint32_t s1 = (uint32_t)((a->base.guest_end - cstart) >> s->sc_bits);
        a->sc_mask = (uint32_t)(((1ULL << s1) - 1) & ~((1ULL << s0) - 1));
        ext->len = wend - offset;
    } else if (s->extl2) {
        /* No host cluster of its own.  Compressed or shared clusters are
         * copied whole; otherwise only the touched subclusters. */
        bool whole = (e & QCOW2_OFLAG_COMPRESSED) || (e & QCOW2_OFFSET_MASK);
        uint64_t sc_size = 1ULL << s->sc_bits;
        uint64_t wend = MIN(end, cstart + cs);
        if (whole) {
            a->base.guest_start = cstart;
            a->base.guest_end = cstart + cs;
            a->base.cow = true;
            a->sc_mask = 0xffffffffu;
        } else {
            a->base.guest_start = offset & ~(sc_size - 1);
            a->base.guest_end = vdk_align_up(wend, sc_size);
            a->base.cow = (offset != a->base.guest_start) || (wend != a->base.guest_end);
            uint32_t s0 = (uint32_t)((a->base.guest_start - cstart) >> s->sc_bits);
            uint32_t s1 = (uint32_t)((a->base.guest_end - cstart) >> s->sc_bits);
            a->sc_mask = (uint32_t)(((1ULL << s1) - 1) & ~((1ULL << s0) - 1));
        }
        a->nclusters = 1;
        a->fresh_host = true;
        ext->len = wend - offset;
    } else {
        /* Whole clusters: from this one on, while they need allocating
         * too, are in this slice, and are covered by the write. */
        uint32_t k = 1;
        while (l.in_slice + k < l.slice_entries && cstart + (uint64_t)k * cs < end && k < QCOW2_MAX_ALLOC_CLUSTERS) {
            uint64_t e2 = qcow2_l2_get(s, sl->data, l.in_slice + k, NULL);
            bool owned2 = (e2 & QCOW2_OFLAG_COPIED) && !(e2 & (QCOW2_OFLAG_COMPRESSED | QCOW2_OFLAG_ZERO)) &&
                          (e2 & QCOW2_OFFSET_MASK);
            uint64_t g2 = cstart + (uint64_t)k * cs;
            if (owned2 || alloc_conflict(s, g2, g2 + cs)) {
                break;
            }
            k++;
        }
        a->base.guest_start = cstart;
        a->base.guest_end = cstart + (uint64_t)k * cs;
        uint64_t wend = MIN(end, a->base.guest_end);
        uint64_t last_e = qcow2_l2_get(s, sl->data, l.in_slice + k - 1, NULL);
        a->base.cow = (offset != cstart && has_old_content(s, e, 0, true)) ||
                      (wend != a->base.guest_end && has_old_content(s, last_e, 0, true));
        a->nclusters = k;
        a->fresh_host = true;
        ext->len = wend - offset;
    }
    if (a->fresh_host) {
        uint64_t h = qcow2_alloc_clusters(s, a->nclusters, r, &ret);
        if (!h) {
            g_free(a);
            return ret;
        }
        a->base.host_offset = h + (s->extl2 ? a->base.guest_start - cstart : 0);
        /* New clusters the write covers only in part: allocate them whole
         * first (as qemu does), so the writes that fill them later do not
         * each extend the file. */
        uint64_t wend = offset + ext->len;
        if (!a->base.cow && (offset != cstart || wend != cstart + (uint64_t)a->nclusters * cs)) {
            a->base.prezero_off = h;
            a->base.prezero_len = (uint64_t)a->nclusters * cs;
        }
    }
    a->old = g_new(uint64_t, a->nclusters * 2);
    for (uint32_t i = 0; i < a->nclusters; i++) {
        a->old[i * 2] = qcow2_l2_get(s, sl->data, l.in_slice + i, &a->old[i * 2 + 1]);
    }
    a->base.file = s->file;
    a->base.opaque = s;
    a->slice = sl;
    vdk_mc_pin(sl);
    a->next = s->allocs;
    s->allocs = a;
    ext->kind = VDK_EXT_ALLOC;
    ext->alloc = &a->base;
    return 0;
}

/* Give back what an old L2 entry referenced (after the next writeback). */
static void
release_entry(Qcow2 *s, uint64_t e)
{
    if (e & QCOW2_OFLAG_COMPRESSED) {
        uint64_t off, len;
        qcow2_compressed_range(s, e, &off, &len);
        uint64_t first = off >> s->cluster_bits;
        uint64_t last = (off + len - 1) >> s->cluster_bits;
        qcow2_defer_free(s, first << s->cluster_bits, last - first + 1);
        return;
    }
    uint64_t h = e & QCOW2_OFFSET_MASK;
    if (h) {
        qcow2_defer_free(s, h, 1);
    }
}

void
qcow2_alloc_done(VdkNode *n, VdkAlloc *base, int err, VdkQueue *q)
{
    Qcow2 *s = n->opaque;
    Qcow2Alloc *a = (Qcow2Alloc *)base;
    g_mutex_lock(&n->lock);
    for (Qcow2Alloc **p = &s->allocs; *p; p = &(*p)->next) {
        if (*p == a) {
            *p = a->next;
            break;
        }
    }
    uint64_t cs = s->cluster_size;
    if (err >= 0) {
        s->alloc_gen++;
    }
    if (a->compressed) {
        if (err < 0) {
            release_entry(s, a->comp_entry); /* the bytes were counted */
        } else {
            release_entry(s, a->old[0]);
            qcow2_l2_set(s, a->slice->data, a->first_index, a->comp_entry, 0);
            vdk_mc_mark_dirty(s->l2c, a->slice);
        }
    } else if (err < 0) {
        if (a->fresh_host) {
            /* counted but never referenced */
            qcow2_defer_free(s, base->host_offset & ~(cs - 1), a->nclusters);
        }
    } else {
        uint64_t host = base->host_offset & ~(cs - 1);
        if (s->extl2 && !a->fresh_host) {
            host = a->old[0] & QCOW2_OFFSET_MASK;
        }
        for (uint32_t i = 0; i < a->nclusters; i++) {
            uint64_t old = a->old[i * 2];
            uint64_t old_bm = a->old[i * 2 + 1];
            uint64_t ne = (host + (uint64_t)i * cs) | QCOW2_OFLAG_COPIED;
            uint64_t nbm = 0;
            if (s->extl2) {
                /* The written subclusters become allocated and stop reading
                 * as zero.  With a fresh host cluster the old entry had no
                 * allocated subclusters unless the whole cluster was copied
                 * (then sc_mask covers everything). */
                uint32_t alloc = a->fresh_host ? 0 : (uint32_t)old_bm;
                uint32_t zero = (uint32_t)(old_bm >> 32);
                alloc |= a->sc_mask;
                zero &= ~a->sc_mask;
                nbm = ((uint64_t)zero << 32) | alloc;
            }
            if (a->fresh_host) {
                release_entry(s, old);
            }
            qcow2_l2_set(s, a->slice->data, a->first_index + i, ne, nbm);
        }
        vdk_mc_mark_dirty(s->l2c, a->slice);
    }
    vdk_mc_unpin(a->slice);
    VdkRequest *w = a->waiters;
    g_mutex_unlock(&n->lock);
    while (w) {
        VdkRequest *next = w->wait_next;
        w->wait_next = NULL;
        vdk_request_resume(w, q);
        w = next;
    }
    g_free(a->old);
    g_free(a->payload);
    g_free(a);
}

/* Forget every partly used packing cluster: after a snapshot, a compact
 * or anything else that changes who references them. */
void
qcow2_comp_reset(Qcow2 *s)
{
    s->comp_cluster = 0;
    s->comp_used = 0;
    s->comp_nopen = 0;
}

/* @cluster's refcount dropped to zero (it is about to be freed and may be
 * reused): no compressed data may be packed into it any more. */
void
qcow2_comp_forget(Qcow2 *s, uint64_t cluster)
{
    if (s->comp_cluster == cluster) {
        s->comp_cluster = 0;
        s->comp_used = 0;
    }
    for (int i = 0; i < s->comp_nopen; i++) {
        if (s->comp_open[i].cluster == cluster) {
            s->comp_open[i] = s->comp_open[--s->comp_nopen];
            i--;
        }
    }
}

/* Keep the tail of the packing cluster being left for later data (the
 * one with the least room left makes way when all slots are taken). */
static void
comp_keep_open(Qcow2 *s)
{
    if (!s->comp_cluster || s->comp_used + 512 > s->cluster_size || s->refcount_bits == 1) {
        return;
    }
    int slot = s->comp_nopen;
    if (slot == QCOW2_COMP_OPEN) {
        slot = 0;
        for (int i = 1; i < s->comp_nopen; i++) {
            if (s->comp_open[i].used > s->comp_open[slot].used) {
                slot = i;
            }
        }
        if (s->comp_open[slot].used <= s->comp_used) {
            return;
        }
    } else {
        s->comp_nopen++;
    }
    s->comp_open[slot].cluster = s->comp_cluster;
    s->comp_open[slot].used = s->comp_used;
}

/* Space for @len bytes of compressed data: packed after the previous
 * compressed data when it fits in the rest of that host cluster; else in
 * the first earlier packing cluster whose free tail it fits; else, when
 * the next allocation would be the cluster right after the packing
 * cluster, the data continues into it (both clusters gain a reference),
 * as qemu packs them; otherwise it starts a new cluster and the tail of
 * the old one is kept for later data.  Restartable: a wait (a refcount
 * block to load) leaves the state so that calling again finishes the
 * same step. */
static uint64_t
alloc_bytes(Qcow2 *s, uint64_t len, VdkRequest *r, int *ret)
{
    uint64_t cs = s->cluster_size;
    uint64_t off;
    *ret = -ERANGE;
    if (s->comp_span_next && (!s->comp_cluster || s->comp_span_next != s->comp_cluster + cs)) {
        /* stale (the packing cluster was reset meanwhile): a fresh cluster */
        s->comp_cluster = s->comp_span_next;
        s->comp_used = 0;
        s->comp_span_next = 0;
    }
    if (s->comp_cluster && s->comp_used + len <= cs) {
        *ret = qcow2_update_refcount(s, s->comp_cluster, 1, 1, r);
        if (*ret != 0 && *ret != -ERANGE) {
            return 0;
        }
        if (*ret == 0) {
            off = s->comp_cluster + s->comp_used;
            s->comp_used += len;
            return off;
        }
    }
    if (!s->comp_span_next) {
        for (int i = 0; i < s->comp_nopen; i++) {
            if (s->comp_open[i].used + len > cs) {
                continue;
            }
            *ret = qcow2_update_refcount(s, s->comp_open[i].cluster, 1, 1, r);
            if (*ret == -ERANGE) {
                /* its refcount is at the maximum the width allows */
                s->comp_open[i--] = s->comp_open[--s->comp_nopen];
                continue;
            }
            if (*ret != 0) {
                return 0;
            }
            off = s->comp_open[i].cluster + s->comp_open[i].used;
            s->comp_open[i].used += len;
            if (s->comp_open[i].used + 512 > cs) {
                s->comp_open[i] = s->comp_open[--s->comp_nopen];
            }
            return off;
        }
        *ret = -ERANGE;
    }
    if (s->comp_cluster && s->comp_used < cs && len <= cs &&
        (s->comp_span_next || s->next_free == s->comp_cluster + cs)) {
        if (!s->comp_span_next) {
            uint64_t next = qcow2_alloc_clusters(s, 1, r, ret);
            if (!next) {
                return 0;
            }
            if (next != s->comp_cluster + cs) {
                /* not contiguous after all (refcount structures went
                 * first): pack from the start of the new cluster */
                comp_keep_open(s);
                s->comp_cluster = next;
                s->comp_used = len;
                *ret = 0;
                return next;
            }
            s->comp_span_next = next;
        }
        *ret = qcow2_update_refcount(s, s->comp_cluster, 1, 1, r);
        if (*ret != 0 && *ret != -ERANGE) {
            return 0;
        }
        if (*ret == 0) {
            off = s->comp_cluster + s->comp_used;
            s->comp_used = s->comp_used + len - cs;
        } else {
            /* the old cluster's refcount is at its maximum (1-bit
             * refcounts): start at the new cluster */
            off = s->comp_span_next;
            s->comp_used = len;
            *ret = 0;
        }
        s->comp_cluster = s->comp_span_next;
        s->comp_span_next = 0;
        return off;
    }
    /* no packing cluster yet, or no room anywhere and no contiguous
     * cluster, or its refcount is at the maximum the width allows */
    off = qcow2_alloc_clusters(s, 1, r, ret);
    if (!off) {
        return 0;
    }
    comp_keep_open(s);
    s->comp_cluster = off;
    s->comp_used = len;
    return off;
}

void
qcow2_comp_job_free(Qcow2CompJob *job)
{
    g_free(job->in);
    g_free(job->out);
    g_free(job);
}

void
qcow2_comp_run(Qcow2CompJob *job)
{
    Qcow2 *s = job->s;
    job->out = g_malloc(s->cluster_size);
    job->clen = qcow2_compress(s, job->in, s->cluster_size, job->out, s->cluster_size - 1);
    g_free(job->in);
    job->in = NULL;
    if (job->clen <= 0) {
        g_free(job->out);
        job->out = NULL;
    }
}

static void
comp_worker(gpointer data, gpointer user)
{
    (void)user;
    Qcow2CompJob *job = data;
    VdkRequest *r = job->r;
    qcow2_comp_run(job);
    vdk_request_resume(r, NULL); /* continues on its queue's thread */
}

bool
qcow2_comp_submit(Qcow2 *s, Qcow2CompJob *job)
{
    g_mutex_lock(&s->node->lock);
    if (!s->comp_pool) {
        int threads = MAX(1, MIN((int)g_get_num_processors(), QCOW2_MAX_COMP_THREADS));
        s->comp_pool = g_thread_pool_new(comp_worker, NULL, threads, FALSE, NULL);
    }
    GThreadPool *pool = s->comp_pool;
    g_mutex_unlock(&s->node->lock);
    return pool && g_thread_pool_push(pool, job, NULL);
}

int
qcow2_write_compressed(VdkNode *n, VdkRequest *r, uint64_t offset, uint64_t len, VdkExtent *ext)
{
    Qcow2 *s = n->opaque;
    uint64_t cs = s->cluster_size;
    if (offset & (cs - 1)) {
        return -EINVAL;
    }
    uint64_t unit = MIN(cs, s->size - offset);
    if (len < unit) {
        return -EINVAL;
    }
    qcow2_bitmaps_mark(s, offset, unit);
    /* Compression runs on a worker pool (one thread per core): the
     * request parks while its cluster is compressed, so the clusters of
     * many requests in flight compress in parallel; the result is kept on
     * the request until the cluster is allocated. */
    Qcow2CompJob *job = r->driver_data;
    if (!job || job->offset != offset) {
        if (job) {
            qcow2_comp_job_free(job);
        }
        job = g_new0(Qcow2CompJob, 1);
        job->s = s;
        job->r = r;
        job->offset = offset;
        job->in = g_malloc0(cs);
        vdk_req_copy_out(r, offset, job->in, unit);
        r->driver_data = job;
        if (qcow2_comp_submit(s, job)) {
            return VDK_WAIT;
        }
        /* no pool: compress here */
        qcow2_comp_run(job);
    }
    ssize_t clen = job->clen;
    uint8_t *out = job->out;
    if (clen <= 0) {
        r->driver_data = NULL;
        qcow2_comp_job_free(job);
        ext->len = unit; /* just this cluster is written uncompressed */
        return clen < 0 ? (int)clen : VDK_NOT_COMPRESSIBLE;
    }
    g_mutex_lock(&n->lock);
    int ret = 0;
    Qcow2Alloc *a = NULL;
    Loc l;
    locate(s, offset, &l);
    if (s->corrupt) {
        ret = -EIO;
        goto out;
    }
    ret = l2_table_prepare(s, &l, offset, r);
    if (ret) {
        goto out;
    }
    Qcow2Alloc *busy = alloc_conflict(s, offset, offset + cs);
    if (busy) {
        r->wait_next = busy->waiters;
        busy->waiters = r;
        ret = VDK_WAIT;
        goto out;
    }
    VdkMetaEntry *sl = vdk_mc_get(s->l2c, l.slice_off, r, &ret);
    if (!sl) {
        goto out;
    }
    uint64_t host = alloc_bytes(s, (uint64_t)clen, r, &ret);
    if (!host) {
        goto out;
    }
    uint64_t sectors = ((host + (uint64_t)clen - 1) >> 9) - (host >> 9);
    a = g_new0(Qcow2Alloc, 1);
    a->compressed = true;
    a->comp_entry = QCOW2_OFLAG_COMPRESSED | (sectors << s->csize_shift) | host;
    a->payload = out;
    job->out = NULL; /* the payload belongs to the allocation now */
    r->driver_data = NULL;
    qcow2_comp_job_free(job);
    job = NULL;
    a->base.payload = a->payload;
    a->base.payload_len = (size_t)clen;
    a->base.guest_start = offset;
    a->base.guest_end = offset + cs;
    a->base.host_offset = host;
    a->base.file = s->file;
    a->base.opaque = s;
    a->slice_off = l.slice_off;
    a->first_index = l.in_slice;
    a->nclusters = 1;
    a->old = g_new(uint64_t, 2);
    a->old[0] = qcow2_l2_get(s, sl->data, l.in_slice, &a->old[1]);
    a->slice = sl;
    vdk_mc_pin(sl);
    a->next = s->allocs;
    s->allocs = a;
    ext->kind = VDK_EXT_ALLOC;
    ext->alloc = &a->base;
    ext->len = unit;
out:;
    bool evict = ret == -ENOBUFS && !s->wb_running;
    if (ret == -ENOBUFS) {
        r->wait_next = s->wb_waiters;
        s->wb_waiters = r;
        ret = VDK_WAIT;
    }
    g_mutex_unlock(&n->lock);
    if (job && ret != VDK_WAIT) {
        /* failed: nothing comes back for this cluster */
        r->driver_data = NULL;
        qcow2_comp_job_free(job);
    }
    if (evict) {
        qcow2_writeback_async(s, r->q);
    }
    return ret;
}

int
qcow2_map(VdkNode *n, uint64_t offset, uint64_t len, unsigned flags, VdkExtent *ext, VdkRequest *r)
{
    Qcow2 *s = n->opaque;
    if (flags & VDK_MAP_WRITE) {
        /* before the data can land: a bit set in memory, no I/O */
        qcow2_bitmaps_mark(s, offset, len);
    }
    g_mutex_lock(&n->lock);
    int ret = (flags & VDK_MAP_WRITE) ? map_write(s, offset, len, ext, r) : map_read(s, offset, len, ext, r);
    bool evict = ret == -ENOBUFS && r && !s->wb_running;
    if (ret == -ENOBUFS && r) {
        /* every cached slice is dirty: write back, then retry */
        r->wait_next = s->wb_waiters;
        s->wb_waiters = r;
        ret = VDK_WAIT;
    }
    g_mutex_unlock(&n->lock);
    if (evict) {
        qcow2_writeback_async(s, r->q);
    }
    return ret;
}

/* ------------------------------------------------------------------------ */
/* Zeroes and discard                                                        */
/* ------------------------------------------------------------------------ */

typedef enum {
    CHANGE_DISCARD,
    CHANGE_ZERO,        /* may unmap */
    CHANGE_ZERO_KEEP,   /* keep the allocation */
    CHANGE_UNALLOC,     /* unallocated: the backing file shows through */
} ChangeKind;

/* Apply @kind to whole clusters from r->cursor, within one L2 slice.
 * Returns 0 (cursor advanced), VDK_WAIT or -errno. */
static int
change_clusters(Qcow2 *s, VdkRequest *r, uint64_t end, ChangeKind kind)
{
    uint64_t cs = s->cluster_size;
    uint64_t pos = r->cursor;
    Loc l;
    locate(s, pos, &l);
    int ret = l1_lookup(s, &l, pos, NULL);
    if (ret < 0) {
        return ret;
    }
    uint64_t table_end = ((l.l1_idx + 1) * s->l2_entries) << s->cluster_bits;
    if (!l.table && (kind == CHANGE_UNALLOC || !s->node->backing || (kind == CHANGE_DISCARD && s->version < 3))) {
        /* Nothing allocated in this whole table: it reads as zeroes (or, for
         * a v2 discard, may keep showing the backing file). */
        r->cursor = MIN(vdk_align_down(end, cs), table_end);
        if (r->cursor <= pos) {
            r->cursor = pos + cs;
        }
        return 0;
    }
    if (!l.table || !(s->l1[l.l1_idx] & QCOW2_OFLAG_COPIED)) {
        ret = l2_table_prepare(s, &l, pos, r);
        if (ret) {
            return ret;
        }
    }
    Qcow2Alloc *busy = alloc_conflict(s, pos, MIN(end, table_end));
    if (busy) {
        r->wait_next = busy->waiters;
        busy->waiters = r;
        return VDK_WAIT;
    }
    VdkMetaEntry *sl = vdk_mc_get(s->l2c, l.slice_off, r, &ret);
    if (!sl) {
        return ret;
    }
    bool changed = false;
    uint64_t idx = l.in_slice;
    while (pos + cs <= end && idx < l.slice_entries) {
        uint64_t bm;
        uint64_t e = qcow2_l2_get(s, sl->data, idx, &bm);
        uint64_t ne, nbm = 0;
        bool keep = kind == CHANGE_ZERO_KEEP && (e & QCOW2_OFLAG_COPIED) && !(e & QCOW2_OFLAG_COMPRESSED) &&
                    (e & QCOW2_OFFSET_MASK);
        if (kind == CHANGE_UNALLOC || (kind == CHANGE_DISCARD && !(s->version >= 3 && s->node->backing))) {
            ne = 0; /* unallocated: zeroes, or the backing file */
        } else if (s->extl2) {
            ne = keep ? (e & (QCOW2_OFFSET_MASK | QCOW2_OFLAG_COPIED)) : 0;
            nbm = 0xffffffffULL << 32;
        } else {
            ne = QCOW2_OFLAG_ZERO | (keep ? (e & (QCOW2_OFFSET_MASK | QCOW2_OFLAG_COPIED)) : 0);
        }
        if (ne != e || nbm != bm) {
            if (!keep) {
                release_entry(s, e);
            }
            qcow2_l2_set(s, sl->data, idx, ne, nbm);
            changed = true;
        }
        pos += cs;
        idx++;
    }
    if (changed) {
        vdk_mc_mark_dirty(s->l2c, sl);
    }
    r->cursor = pos;
    return 0;
}

static int
zero_or_discard(VdkNode *n, VdkRequest *r, bool discard)
{
    Qcow2 *s = n->opaque;
    uint64_t cs = s->cluster_size;
    uint64_t end = r->offset + r->len;
    if (s->corrupt) {
        return -EIO;
    }
    qcow2_bitmaps_mark(s, r->offset, r->len);
    if (r->drv_state == 0 && !discard) {
        /* Unaligned head and tail: written as zero buffers (through the
         * normal write path), the whole clusters in between as metadata. */
        r->drv_state = 1;
        uint64_t a0 = vdk_align_up(r->offset, cs);
        uint64_t a1 = vdk_align_down(end, cs);
        size_t zlen;
        const void *z = vdk_zero_buffer(&zlen);
        if (a0 >= a1) {
            r->cursor = end;
            for (uint64_t p = r->offset; p < end;) {
                uint64_t k = MIN(end - p, (uint64_t)zlen);
                struct iovec v = {(void *)z, (size_t)k};
                vdk_request_io_node(r, n, VDK_OP_WRITE, p, &v, 1, k);
                p += k;
            }
            return 0;
        }
        if (a0 > r->offset) {
            struct iovec v = {(void *)z, (size_t)(a0 - r->offset)};
            vdk_request_io_node(r, n, VDK_OP_WRITE, r->offset, &v, 1, a0 - r->offset);
        }
        if (end > a1) {
            struct iovec v = {(void *)z, (size_t)(end - a1)};
            vdk_request_io_node(r, n, VDK_OP_WRITE, a1, &v, 1, end - a1);
        }
        r->cursor = a0;
        end = a1;
    } else if (r->drv_state == 0) {
        r->drv_state = 1;
        r->cursor = vdk_align_up(r->offset, cs); /* discard: whole clusters only */
    }
    if (!discard) {
        end = vdk_align_down(end, cs);
    }
    ChangeKind kind = discard ? CHANGE_DISCARD : (r->flags & VDK_REQ_MAY_UNMAP) ? CHANGE_ZERO : CHANGE_ZERO_KEEP;
    if (discard && (r->flags & VDK_DISCARD_UNALLOC)) {
        kind = CHANGE_UNALLOC;
        if (end >= s->size) {
            end = qcow2_align(s, end); /* the image's last, partial cluster too */
        }
    }
    int ret = 0;
    while (r->cursor + cs <= end) {
        g_mutex_lock(&n->lock);
        ret = change_clusters(s, r, end, kind);
        bool evict = ret == -ENOBUFS && !s->wb_running;
        if (ret == -ENOBUFS) {
            r->wait_next = s->wb_waiters;
            s->wb_waiters = r;
            ret = VDK_WAIT;
        }
        g_mutex_unlock(&n->lock);
        if (evict) {
            qcow2_writeback_async(s, r->q);
        }
        if (ret) {
            return ret;
        }
    }
    r->cursor = r->offset + r->len;
    return 0;
}

int
qcow2_discard(VdkNode *n, VdkRequest *r)
{
    return zero_or_discard(n, r, true);
}

int
qcow2_write_zeroes(VdkNode *n, VdkRequest *r)
{
    Qcow2 *s = n->opaque;
    if (s->version < 3) {
        return -ENOTSUP; /* no zero flag: the block layer writes zeroes */
    }
    return zero_or_discard(n, r, false);
}
