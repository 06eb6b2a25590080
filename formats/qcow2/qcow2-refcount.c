/* SPDX-License-Identifier: MIT */
/*
 * qcow2-refcount.c - host cluster allocation and reference counts.
 *
 * Allocation is at the end of the image: one pointer (next_free) moves
 * forward; clusters freed by discard or overwrite are given back to the
 * filesystem with a punched hole instead of being reused, so a freed cluster
 * can never be handed out again before the change that freed it is durable
 * (and new space always reads as zeroes until written).  `vdk compact`
 * (planned) reclaims the address space.
 *
 * An allocation lays out, from next_free: a grown refcount table if the
 * current one cannot cover the new clusters, refcount blocks for ranges
 * that have none, then the clusters asked for, and counts all of them.  It
 * first makes sure every refcount block it will touch is in the cache
 * (parking the request if one must be read), and only then changes
 * anything, so a request that waits leaves no half-made state behind.
 *
 * Decrements wait in a list until the next writeback has made the mapping
 * change durable (see qcow2-flush.c); clusters that reach zero are punched.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"

/* ------------------------------------------------------------------------ */
/* Entries of any width                                                      */
/* ------------------------------------------------------------------------ */

static uint64_t
rb_get(const Qcow2 *s, const uint8_t *blk, uint64_t i)
{
    uint32_t bits = s->refcount_bits;
    if (bits >= 8) {
        const uint8_t *p = blk + i * (bits / 8);
        switch (bits) {
        case 8:
            return p[0];
        case 16:
            return qbe16(p);
        case 32:
            return qbe32(p);
        default:
            return qbe64(p);
        }
    }
    uint64_t bit = i * bits;
    return (blk[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
}

static void
rb_set(const Qcow2 *s, uint8_t *blk, uint64_t i, uint64_t v)
{
    uint32_t bits = s->refcount_bits;
    if (bits >= 8) {
        uint8_t *p = blk + i * (bits / 8);
        switch (bits) {
        case 8:
            p[0] = (uint8_t)v;
            return;
        case 16:
            qput16(p, (uint16_t)v);
            return;
        case 32:
            qput32(p, (uint32_t)v);
            return;
        default:
            qput64(p, v);
            return;
        }
    }
    uint64_t bit = i * bits;
    uint8_t mask = (uint8_t)(((1u << bits) - 1) << (bit % 8));
    blk[bit / 8] = (uint8_t)((blk[bit / 8] & ~mask) | ((v << (bit % 8)) & mask));
}

static void
reftable_mark(Qcow2 *s, uint64_t idx)
{
    s->reftable_dirty_lo = MIN(s->reftable_dirty_lo, idx);
    s->reftable_dirty_hi = MAX(s->reftable_dirty_hi, idx + 1);
}

/* The refcount block entry for cluster @c: reftable index and position. */
static inline void
rb_locate(const Qcow2 *s, uint64_t c, uint64_t *rt_idx, uint64_t *pos)
{
    *rt_idx = c >> s->refblock_bits;
    *pos = c & ((1ULL << s->refblock_bits) - 1);
}

int
qcow2_get_refcount(Qcow2 *s, uint64_t offset, uint64_t *out, VdkRequest *r)
{
    uint64_t idx, pos;
    rb_locate(s, offset >> s->cluster_bits, &idx, &pos);
    if (idx >= s->reftable_size || s->reftable[idx] == 0) {
        *out = 0;
        return 0;
    }
    int ret = 0;
    VdkMetaEntry *e = vdk_mc_get(s->rc, s->reftable[idx] & ~QCOW2_REFT_RESERVED, r, &ret);
    if (!e) {
        return ret;
    }
    *out = rb_get(s, e->data, pos);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Changing counts                                                           */
/* ------------------------------------------------------------------------ */

#define MAX_RB_PER_OP 64

int
qcow2_update_refcount(Qcow2 *s, uint64_t offset, uint64_t n, int64_t delta, VdkRequest *r)
{
    uint64_t first = offset >> s->cluster_bits;
    uint64_t last = first + n - 1;
    uint64_t idx0 = first >> s->refblock_bits;
    uint64_t idx1 = last >> s->refblock_bits;
    if (n == 0) {
        return 0;
    }
    if (idx1 - idx0 + 1 > MAX_RB_PER_OP) {
        /* Split very long ranges (resize, repair): each part is complete. */
        uint64_t per = (uint64_t)MAX_RB_PER_OP << s->refblock_bits;
        for (uint64_t c = first; c <= last; c += per) {
            int ret = qcow2_update_refcount(s, c << s->cluster_bits, MIN(per, last - c + 1), delta, r);
            if (ret) {
                return ret;
            }
        }
        return 0;
    }
    /* Every block first (parking if one must be read), pinned, then the
     * changes: a wait leaves nothing half done. */
    VdkMetaEntry *blocks[MAX_RB_PER_OP];
    int ret = 0;
    uint64_t got = 0;
    for (uint64_t idx = idx0; idx <= idx1; idx++, got++) {
        if (idx >= s->reftable_size || s->reftable[idx] == 0) {
            ret = qcow2_signal_corruption(s, "changing the refcount of cluster %" G_GUINT64_FORMAT " which has no refcount block",
                                          idx << s->refblock_bits);
            break;
        }
        blocks[got] = vdk_mc_get(s->rc, s->reftable[idx] & ~QCOW2_REFT_RESERVED, r, &ret);
        if (!blocks[got]) {
            break;
        }
        vdk_mc_pin(blocks[got]);
    }
    if (got == idx1 - idx0 + 1) {
        /* validate before changing */
        for (uint64_t c = first; c <= last && ret == 0; c++) {
            VdkMetaEntry *e = blocks[(c >> s->refblock_bits) - idx0];
            uint64_t cur = rb_get(s, e->data, c & ((1ULL << s->refblock_bits) - 1));
            if (delta < 0 && cur < (uint64_t)-delta) {
                ret = qcow2_signal_corruption(s, "refcount of cluster %" G_GUINT64_FORMAT " would drop below zero", c);
            } else if (delta > 0 && cur > s->refcount_max - (uint64_t)delta) {
                ret = -ERANGE;
            }
        }
        for (uint64_t c = first; c <= last && ret == 0; c++) {
            VdkMetaEntry *e = blocks[(c >> s->refblock_bits) - idx0];
            uint64_t pos = c & ((1ULL << s->refblock_bits) - 1);
            rb_set(s, e->data, pos, (uint64_t)((int64_t)rb_get(s, e->data, pos) + delta));
            vdk_mc_mark_dirty(s->rc, e);
        }
    }
    for (uint64_t i = 0; i < got; i++) {
        vdk_mc_unpin(blocks[i]);
    }
    return ret;
}

void
qcow2_defer_free(Qcow2 *s, uint64_t offset, uint64_t nclusters)
{
    if (nclusters == 0) {
        return;
    }
    if (s->frees->len) {
        Qcow2Free *last = &g_array_index(s->frees, Qcow2Free, s->frees->len - 1);
        if (last->offset + ((uint64_t)last->count << s->cluster_bits) == offset &&
            (uint64_t)last->count + nclusters <= UINT32_MAX) {
            last->count += (uint32_t)nclusters;
            return;
        }
    }
    Qcow2Free f = {offset, (uint32_t)nclusters};
    g_array_append_val(s->frees, f);
}

void
qcow2_compressed_range(const Qcow2 *s, uint64_t l2e, uint64_t *off, uint64_t *len)
{
    uint64_t host = l2e & s->coffset_mask;
    uint64_t sectors = ((l2e >> s->csize_shift) & s->csize_mask) + 1;
    *off = host;
    *len = sectors * 512 - (host & 511);
}

/* ------------------------------------------------------------------------ */
/* Allocation                                                                */
/* ------------------------------------------------------------------------ */

/* Entries of a refcount table that covers @clusters clusters. */
static uint64_t
reftable_entries_for(const Qcow2 *s, uint64_t clusters)
{
    return (clusters + (1ULL << s->refblock_bits) - 1) >> s->refblock_bits;
}

uint64_t
qcow2_alloc_clusters(Qcow2 *s, uint64_t n, VdkRequest *r, int *ret)
{
    uint32_t cb = s->cluster_bits;
    uint64_t start = s->next_free;
    uint64_t end = 0, data = 0;
    uint64_t new_rt_entries = s->reftable_size; /* > reftable_size: grow */
    uint64_t new_rt_clusters = 0;

    /* 1. Plan the layout: [grown reftable][new refblocks][data].  Each
     *    round accounts for what the previous one added. */
    uint64_t nrb = 0;
    for (int round = 0; round < 16; round++) {
        uint64_t pos = start + (new_rt_clusters << cb);
        uint64_t data_start = pos + (nrb << cb);
        uint64_t e = data_start + (n << cb);
        if (e > QCOW2_OFFSET_MASK || e < start) {
            *ret = -EFBIG;
            return 0;
        }
        uint64_t last_idx = ((e - 1) >> cb) >> s->refblock_bits;
        uint64_t need_entries = MAX(s->reftable_size, last_idx + 1);
        uint64_t want_rt_entries = s->reftable_size;
        uint64_t want_rt_clusters = 0;
        if (need_entries > s->reftable_size) {
            /* Grow with headroom: double, at least what is needed. */
            want_rt_entries = MAX(need_entries, s->reftable_size * 2);
            uint64_t bytes = want_rt_entries * 8;
            if (bytes > QCOW2_MAX_REFTABLE_BYTES) {
                want_rt_entries = need_entries;
                bytes = want_rt_entries * 8;
                if (bytes > QCOW2_MAX_REFTABLE_BYTES) {
                    *ret = -EFBIG;
                    return 0;
                }
            }
            want_rt_clusters = (bytes + s->cluster_size - 1) >> cb;
            want_rt_entries = want_rt_clusters << (cb - 3);
        }
        /* refblocks missing for [start, e) */
        uint64_t idx0 = (start >> cb) >> s->refblock_bits;
        uint64_t want_nrb = 0;
        for (uint64_t idx = idx0; idx <= last_idx; idx++) {
            if (idx >= s->reftable_size || s->reftable[idx] == 0) {
                want_nrb++;
            }
        }
        if (want_rt_clusters == new_rt_clusters && want_nrb == nrb) {
            end = e;
            data = data_start;
            new_rt_entries = want_rt_entries;
            break;
        }
        new_rt_clusters = want_rt_clusters;
        new_rt_entries = want_rt_entries;
        nrb = want_nrb;
    }
    if (!end) {
        *ret = -EIO;
        return 0;
    }
    (void)reftable_entries_for;

    /* 2. Every existing refcount block the run touches, in the cache and
     *    pinned; new ones as fresh slices.  Nothing is changed yet. */
    uint64_t idx0 = (start >> cb) >> s->refblock_bits;
    uint64_t idx1 = ((end - 1) >> cb) >> s->refblock_bits;
    if (idx1 - idx0 + 1 > MAX_RB_PER_OP) {
        *ret = -EFBIG; /* one allocation never spans this many blocks */
        return 0;
    }
    VdkMetaEntry *blocks[MAX_RB_PER_OP];
    uint64_t rb_off[MAX_RB_PER_OP];
    uint64_t got = 0;
    uint64_t next_rb = start + (new_rt_clusters << cb);
    *ret = 0;
    for (uint64_t idx = idx0; idx <= idx1; idx++, got++) {
        bool exists = idx < s->reftable_size && s->reftable[idx] != 0;
        if (exists) {
            rb_off[got] = s->reftable[idx] & ~QCOW2_REFT_RESERVED;
            blocks[got] = vdk_mc_get(s->rc, rb_off[got], r, ret);
        } else {
            rb_off[got] = next_rb;
            next_rb += s->cluster_size;
            blocks[got] = vdk_mc_get_fresh(s->rc, rb_off[got], ret);
        }
        if (!blocks[got]) {
            break;
        }
        vdk_mc_pin(blocks[got]);
    }
    if (got != idx1 - idx0 + 1) {
        for (uint64_t i = 0; i < got; i++) {
            vdk_mc_unpin(blocks[i]);
            uint64_t idx = idx0 + i;
            if (!(idx < s->reftable_size && s->reftable[idx] != 0)) {
                /* a fresh block we made for nothing: it must not be written */
                vdk_mc_forget(s->rc, rb_off[i]);
            }
        }
        if (*ret == 0) {
            *ret = -EIO;
        }
        return 0;
    }

    /* 3. Commit: grow the table, hook in the new blocks, count the run. */
    if (new_rt_entries > s->reftable_size) {
        uint64_t *t = g_try_renew(uint64_t, s->reftable, new_rt_entries);
        if (!t) {
            for (uint64_t i = 0; i < got; i++) {
                vdk_mc_unpin(blocks[i]);
            }
            *ret = -ENOMEM;
            return 0;
        }
        memset(t + s->reftable_size, 0, (new_rt_entries - s->reftable_size) * 8);
        s->reftable = t;
        if (!s->reftable_moved) {
            s->old_reftable_offset = s->reftable_offset;
            s->old_reftable_clusters = s->reftable_clusters;
        } else {
            /* grown twice before a writeback: the intermediate table was
             * never written; give its clusters back after the switch */
            qcow2_defer_free(s, s->reftable_offset, s->reftable_clusters);
        }
        s->reftable_moved = true;
        s->reftable_size = new_rt_entries;
        s->reftable_offset = start;
        s->reftable_clusters = (uint32_t)new_rt_clusters;
        s->hdr_dirty = true;
        reftable_mark(s, 0);
        reftable_mark(s, new_rt_entries - 1);
    }
    for (uint64_t i = 0; i < got; i++) {
        uint64_t idx = idx0 + i;
        if (s->reftable[idx] == 0) {
            s->reftable[idx] = rb_off[i];
            g_hash_table_add(s->refblocks, GSIZE_TO_POINTER(rb_off[i] >> cb));
            reftable_mark(s, idx);
        }
    }
    for (uint64_t c = start >> cb; c < (end >> cb); c++) {
        VdkMetaEntry *e = blocks[(c >> s->refblock_bits) - idx0];
        uint64_t pos = c & ((1ULL << s->refblock_bits) - 1);
        rb_set(s, e->data, pos, rb_get(s, e->data, pos) + 1);
        vdk_mc_mark_dirty(s->rc, e);
    }
    for (uint64_t i = 0; i < got; i++) {
        vdk_mc_unpin(blocks[i]);
    }
    s->next_free = end;
    return data;
}

/* ------------------------------------------------------------------------ */
/* Metadata preallocation                                                    */
/* ------------------------------------------------------------------------ */

/*
 * Does the image look preallocated with metadata only (clusters mapped and
 * refcounted, but holes in the file)?  qemu-img map then asks the file
 * which parts of a data extent are holes and reports them as zero; vdk
 * uses the same test so both tools describe the same image the same way:
 * the image is "preallocated" when the clusters with a refcount reach
 * max(allocated clusters * 10/9, allocated clusters + 2), the allocated
 * clusters being the file's allocated bytes over the cluster size.
 * Reads the refcount blocks that are not cached (once per open).
 */
bool
qcow2_metadata_preallocated(Qcow2 *s)
{
    uint64_t cs = s->cluster_size;
    uint64_t real = vdk_file_allocated_bytes(s->file) / cs;
    uint64_t threshold = MAX(real * 10 / 9, real + 2);
    uint64_t end = (__atomic_load_n(&s->file->size, __ATOMIC_RELAXED) + cs - 1) >> s->cluster_bits;
    uint64_t per_block = 1ULL << s->refblock_bits;
    uint8_t *buf = NULL;
    uint64_t count = 0;
    for (uint64_t idx = 0; idx < s->reftable_size && (idx << s->refblock_bits) < end && count < threshold; idx++) {
        uint64_t off = s->reftable[idx] & ~QCOW2_REFT_RESERVED;
        if (!off) {
            continue;
        }
        const uint8_t *blk;
        VdkMetaEntry *e = vdk_mc_peek(s->rc, off);
        if (e) {
            blk = e->data;
        } else {
            if (!buf && posix_memalign((void **)&buf, 4096, cs) != 0) {
                return false;
            }
            if (vdk_file_pread_sync(s->file, buf, cs, off) < 0) {
                free(buf);
                return false;
            }
            blk = buf;
        }
        uint64_t n = MIN(per_block, end - (idx << s->refblock_bits));
        for (uint64_t i = 0; i < n && count < threshold; i++) {
            count += rb_get(s, blk, i) != 0;
        }
    }
    free(buf);
    return count >= threshold;
}
