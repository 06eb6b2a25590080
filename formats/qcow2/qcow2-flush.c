/* SPDX-License-Identifier: MIT */
/*
 * qcow2-flush.c - writing dirty metadata back in an order that survives a
 * crash at any point with, at worst, leaked clusters.
 *
 * One writeback runs at a time per image (others wait for it and then run
 * their own, since more may have become dirty).  Its steps, each issued as
 * a batch of writes and finished before the next starts:
 *
 *   refcount blocks        counts raised for new clusters reach the disk...
 *   sync
 *   refcount table         ...before anything points at new blocks / table
 *   sync, header           (a grown table: switched to in the header, then
 *                           the old table's clusters are freed)
 *   dirty bit              lazy refcounts: set on disk before any L2 entry
 *                           that relies on counts not yet written
 *   sync                   when the L2 slices hold entries of allocations
 *                           that no sync has covered (alloc_gen): data and
 *                           copy-on-write completed before their entries
 *                           changed in memory, so this sync makes them
 *                           durable before any entry points at them
 *   L2 slices
 *   sync
 *   L1 entries, header     new L2 tables are written before L1 points there
 *   sync                   the flush's durability point
 *   frees                  only now may counts drop for references that the
 *                           durable metadata no longer holds; clusters at
 *                           zero are punched out of the file
 *
 * With lazy refcounts the first two steps are skipped (the dirty bit says
 * the counts may be behind) until the image is closed, when they run and
 * the dirty bit is cleared.  With cache=unsafe a flush does nothing, but
 * closing still writes everything back (without syncing).
 */
#include "config.h"

#include <errno.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"

enum {
    WB_REFBLOCKS = 0,
    WB_SYNC1,
    WB_REFTABLE,
    WB_SYNC2,
    WB_HEADER_RT,
    WB_DIRTY_BIT,
    WB_L2,
    WB_L2_WRITE,
    WB_SYNC3,
    WB_L1,
    WB_SYNC4,
    WB_FREES,
    WB_CLEAN_CLOSE,
    WB_DONE,
};

typedef struct {
    Qcow2 *s;
    VdkRequest *r;
    int step;
    bool final;
    bool skip_refcounts; /* lazy refcounts, not closing */
    bool wrote;          /* the previous step wrote something */
    int passes;
    bool frees_loaded;   /* the refcount blocks the frees need were fetched */
    uint64_t frees_left; /* closing: clusters still to free after the last pass */
    void *buf;           /* a table or header copy being written */
    VdkMcWrite *l2_list; /* L2 slices collected, written after a sync */
    uint64_t sync_gen;   /* alloc_gen when the sync in flight was issued */
    bool syncing;
} Wb;

static void wb_run(Wb *wb);

static void
wb_sub_done(VdkRequest *sub)
{
    Wb *wb = sub->done_opaque;
    free(wb->buf);
    wb->buf = NULL;
    if (wb->syncing) {
        wb->syncing = false;
        if (!sub->error) {
            Qcow2 *s = wb->s;
            g_mutex_lock(&s->node->lock);
            s->synced_gen = MAX(s->synced_gen, wb->sync_gen);
            g_mutex_unlock(&s->node->lock);
        }
    }
    if (sub->error) {
        /* Stop here: later steps depend on this one.  What was not written
         * stays dirty for the next flush. */
        wb->step = WB_DONE;
    }
    wb_run(wb);
}

/* Write @len bytes of @buf (taken over) at @off as the step's work. */
static void
wb_write(Wb *wb, void *buf, uint64_t off, uint64_t len)
{
    wb->buf = buf;
    wb->wrote = true;
    VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
    struct iovec v = {buf, (size_t)len};
    vdk_req_file_rw(sub, wb->s->file, true, off, &v, 1, len, 0);
    vdk_subreq_launch(sub);
}

static void
wb_sync(Wb *wb)
{
    Qcow2 *s = wb->s;
    g_mutex_lock(&s->node->lock);
    wb->sync_gen = s->alloc_gen;
    g_mutex_unlock(&s->node->lock);
    wb->syncing = true;
    VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
    vdk_req_file_flush(sub, wb->s->file);
    vdk_subreq_launch(sub);
}

static void *
aligned_copy(const void *src, size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, MAX(len, (size_t)512)) != 0) {
        return NULL;
    }
    memcpy(p, src, len);
    return p;
}

/* Serialise table entries [lo, hi) big endian. */
static void *
table_bytes(const uint64_t *t, uint64_t lo, uint64_t hi)
{
    void *p = NULL;
    size_t len = (size_t)((hi - lo) * 8);
    if (posix_memalign(&p, 4096, MAX(len, (size_t)512)) != 0) {
        return NULL;
    }
    for (uint64_t i = lo; i < hi; i++) {
        qput64((uint8_t *)p + (i - lo) * 8, t[i]);
    }
    return p;
}

static bool
l1_or_header_dirty(const Qcow2 *s)
{
    return s->l1_dirty_lo != UINT64_MAX || s->hdr_dirty;
}

/* Refcount blocks fetched ahead of one free step (more wait for the next
 * writeback; the cache holds at least this many at its minimum size). */
#define WB_FREE_PREFETCH 8

static void
wb_noop_done(VdkRequest *sub)
{
    (void)sub;
}

/* Start loading (asynchronously) the refcount blocks the pending frees
 * need that are not cached.  Returns the gathering sub-request to launch
 * once the lock is dropped (its completion runs the free step again), or
 * NULL when everything needed is cached. */
static VdkRequest *
wb_prefetch_frees(Wb *wb)
{
    Qcow2 *s = wb->s;
    VdkRequest *gather = NULL;
    uint64_t asked[WB_FREE_PREFETCH];
    unsigned nasked = 0;
    for (guint i = 0; i < s->frees->len && nasked < WB_FREE_PREFETCH; i++) {
        Qcow2Free *f = &g_array_index(s->frees, Qcow2Free, i);
        uint64_t first = f->offset >> s->cluster_bits;
        uint64_t last = first + f->count - 1;
        for (uint64_t idx = first >> s->refblock_bits; idx <= (last >> s->refblock_bits) && nasked < WB_FREE_PREFETCH;
             idx++) {
            if (idx >= s->reftable_size || !s->reftable[idx]) {
                continue;
            }
            uint64_t off = s->reftable[idx] & ~QCOW2_REFT_RESERVED;
            bool dup = false;
            for (unsigned k = 0; k < nasked; k++) {
                dup |= asked[k] == off;
            }
            if (dup || vdk_mc_peek(s->rc, off)) {
                continue;
            }
            asked[nasked++] = off;
            if (!gather) {
                gather = vdk_subreq(wb->r, wb_sub_done, wb);
            }
            VdkRequest *one = vdk_subreq(gather, wb_noop_done, NULL);
            int ret = 0;
            if (vdk_mc_get(s->rc, off, one, &ret) || ret != VDK_WAIT) {
                vdk_subreq_launch(one); /* ready after all, or failed: the free step copes */
            }
            /* else parked on the load: resumed (and finished) when it lands */
        }
    }
    return gather;
}

/* Apply the deferred decrements; punch clusters that reach zero.  Runs on
 * the queue thread with the lock held.  Refcount blocks were fetched ahead
 * (wb_prefetch_frees); a free whose block is not cached waits for the next
 * writeback, except when closing, where the block is read synchronously. */
static void
wb_apply_frees(Wb *wb)
{
    Qcow2 *s = wb->s;
    GArray *punch = g_array_new(FALSE, FALSE, sizeof(Qcow2Free));
    GArray *frees = s->frees;
    s->frees = g_array_new(FALSE, FALSE, sizeof(Qcow2Free));
    for (guint i = 0; i < frees->len; i++) {
        Qcow2Free *f = &g_array_index(frees, Qcow2Free, i);
        for (uint32_t k = 0; k < f->count; k++) {
            uint64_t off = f->offset + ((uint64_t)k << s->cluster_bits);
            uint64_t idx = off >> (s->cluster_bits + s->refblock_bits);
            if (!wb->final && idx < s->reftable_size && s->reftable[idx] &&
                !vdk_mc_peek(s->rc, s->reftable[idx] & ~QCOW2_REFT_RESERVED)) {
                qcow2_defer_free(s, off, 1); /* its block is not cached: next writeback */
                continue;
            }
            int ret = qcow2_update_refcount(s, off, 1, -1, NULL);
            if (ret == -ENOBUFS || ret == -EBUSY || ret == -ENOMEM) {
                qcow2_defer_free(s, off, 1); /* next writeback */
                continue;
            }
            if (ret < 0) {
                continue; /* corruption was signalled: leak rather than guess */
            }
            uint64_t rc = 1;
            if (qcow2_get_refcount(s, off, &rc, NULL) == 0 && rc == 0) {
                qcow2_comp_forget(s, off);
                if (punch->len) {
                    Qcow2Free *p = &g_array_index(punch, Qcow2Free, punch->len - 1);
                    if (p->offset + ((uint64_t)p->count << s->cluster_bits) == off) {
                        p->count++;
                        continue;
                    }
                }
                Qcow2Free p = {off, 1};
                g_array_append_val(punch, p);
            }
        }
    }
    g_array_free(frees, TRUE);
    wb->buf = punch;
}

static void
wb_finish(Wb *wb)
{
    Qcow2 *s = wb->s;
    VdkNode *n = s->node;
    if (wb->l2_list) {
        /* the sync before them failed: they stay dirty */
        vdk_mc_cancel_writes(wb->l2_list);
        wb->l2_list = NULL;
    }
    g_mutex_lock(&n->lock);
    s->wb_running = false;
    VdkRequest *w = s->wb_waiters;
    s->wb_waiters = NULL;
    g_mutex_unlock(&n->lock);
    while (w) {
        VdkRequest *next = w->wait_next;
        w->wait_next = NULL;
        vdk_request_resume(w, wb->r->q);
        w = next;
    }
    g_free(wb);
}

static void
wb_run(Wb *wb)
{
    Qcow2 *s = wb->s;
    VdkNode *n = s->node;
    for (;;) {
        int step = wb->step++;
        bool wrote = wb->wrote;
        wb->wrote = false;
        switch (step) {
        case WB_REFBLOCKS: {
            if (wb->skip_refcounts || s->corrupt) {
                continue;
            }
            g_mutex_lock(&n->lock);
            VdkMcWrite *list = vdk_mc_collect_dirty(s->rc);
            g_mutex_unlock(&n->lock);
            if (list) {
                wb->wrote = true;
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                vdk_mc_issue_writes(list, sub);
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        }
        case WB_SYNC1:
            if (wrote && (s->reftable_dirty_lo != UINT64_MAX || vdk_mc_dirty_count(s->l2c) || l1_or_header_dirty(s))) {
                wb_sync(wb);
                return;
            }
            continue;
        case WB_REFTABLE: {
            if (wb->skip_refcounts || s->corrupt || s->reftable_dirty_lo == UINT64_MAX) {
                continue;
            }
            g_mutex_lock(&n->lock);
            uint64_t lo = s->reftable_moved ? 0 : s->reftable_dirty_lo;
            uint64_t hi = s->reftable_moved ? s->reftable_size : s->reftable_dirty_hi;
            void *buf = table_bytes(s->reftable, lo, hi);
            uint64_t off = s->reftable_offset + lo * 8;
            s->reftable_dirty_lo = UINT64_MAX;
            s->reftable_dirty_hi = 0;
            g_mutex_unlock(&n->lock);
            if (!buf) {
                wb->step = WB_DONE;
                vdk_req_set_error(wb->r, -ENOMEM);
                continue;
            }
            wb_write(wb, buf, off, (hi - lo) * 8);
            return;
        }
        case WB_SYNC2:
            if (wrote) {
                wb_sync(wb);
                return;
            }
            continue;
        case WB_HEADER_RT: {
            if (!s->reftable_moved || wb->skip_refcounts || s->corrupt) {
                continue;
            }
            /* The new table is durable: switch the header to it, then the
             * old table's clusters can go. */
            g_mutex_lock(&n->lock);
            qcow2_update_header_buf(s);
            void *buf = aligned_copy(s->hdr, s->hdr_used);
            uint32_t len = s->hdr_used;
            qcow2_defer_free(s, s->old_reftable_offset, s->old_reftable_clusters);
            s->reftable_moved = false;
            s->hdr_dirty = false;
            g_mutex_unlock(&n->lock);
            wb_write(wb, buf, 0, len);
            return;
        }
        case WB_DIRTY_BIT: {
            bool need = s->lazy_refcounts && wb->skip_refcounts && !s->dirty_on_disk && !s->corrupt &&
                        (vdk_mc_dirty_count(s->l2c) || s->l1_dirty_lo != UINT64_MAX);
            if (!need && !wrote) {
                continue;
            }
            if (need) {
                g_mutex_lock(&n->lock);
                s->incompatible |= QCOW2_INCOMPAT_DIRTY;
                s->dirty_on_disk = true;
                qcow2_update_header_buf(s);
                void *buf = aligned_copy(s->hdr, s->hdr_used);
                uint32_t len = s->hdr_used;
                g_mutex_unlock(&n->lock);
                /* header, then a sync before the first L2 write */
                wb->step = WB_DIRTY_BIT;
                wb_write(wb, buf, 0, len);
                return;
            }
            /* the dirty-bit header was written: sync it */
            wb_sync(wb);
            return;
        }
        case WB_L2: {
            if (s->corrupt) {
                continue;
            }
            g_mutex_lock(&n->lock);
            VdkMcWrite *list = vdk_mc_collect_dirty(s->l2c);
            /* entries of allocations no sync has covered yet: sync first
             * (their data completed before they changed in memory, so
             * before this collection and before the sync) */
            bool need_sync = list && s->alloc_gen != s->synced_gen && !s->file->no_flush;
            g_mutex_unlock(&n->lock);
            wb->l2_list = list;
            if (need_sync) {
                wb_sync(wb);
                return;
            }
            continue;
        }
        case WB_L2_WRITE: {
            VdkMcWrite *list = wb->l2_list;
            wb->l2_list = NULL;
            if (list) {
                wb->wrote = true;
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                vdk_mc_issue_writes(list, sub);
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        }
        case WB_SYNC3:
            if (wrote && l1_or_header_dirty(s)) {
                wb_sync(wb);
                return;
            }
            continue;
        case WB_L1: {
            g_mutex_lock(&n->lock);
            if (s->l1_dirty_lo != UINT64_MAX && !s->corrupt) {
                uint64_t lo = s->l1_dirty_lo, hi = s->l1_dirty_hi;
                void *buf = table_bytes(s->l1, lo, hi);
                uint64_t off = s->l1_offset + lo * 8;
                s->l1_dirty_lo = UINT64_MAX;
                s->l1_dirty_hi = 0;
                g_mutex_unlock(&n->lock);
                if (!buf) {
                    wb->step = WB_DONE;
                    vdk_req_set_error(wb->r, -ENOMEM);
                    continue;
                }
                wb->step = WB_L1; /* then the header, if it changed too */
                wb_write(wb, buf, off, (hi - lo) * 8);
                return;
            }
            if (s->hdr_dirty) {
                qcow2_update_header_buf(s);
                void *buf = aligned_copy(s->hdr, s->hdr_used);
                uint32_t len = s->hdr_used;
                s->hdr_dirty = false;
                g_mutex_unlock(&n->lock);
                wb_write(wb, buf, 0, len);
                return;
            }
            g_mutex_unlock(&n->lock);
            continue;
        }
        case WB_SYNC4:
            /* The durability point of the flush itself. */
            wb_sync(wb);
            return;
        case WB_FREES: {
            if (s->corrupt) {
                continue;
            }
            g_mutex_lock(&n->lock);
            if (!wb->frees_loaded && s->frees->len > 0) {
                wb->frees_loaded = true;
                VdkRequest *gather = wb_prefetch_frees(wb);
                if (gather) {
                    g_mutex_unlock(&n->lock);
                    wb->step = WB_FREES; /* run this step again once loaded */
                    vdk_subreq_launch(gather);
                    return;
                }
            }
            bool any = s->frees->len > 0;
            if (any) {
                wb_apply_frees(wb);
            }
            g_mutex_unlock(&n->lock);
            GArray *punch = any ? wb->buf : NULL;
            wb->buf = NULL;
            if (punch && punch->len) {
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                for (guint i = 0; i < punch->len; i++) {
                    Qcow2Free *p = &g_array_index(punch, Qcow2Free, i);
                    vdk_req_file_discard(sub, s->file, p->offset, (uint64_t)p->count << s->cluster_bits);
                }
                g_array_free(punch, TRUE);
                vdk_subreq_launch(sub);
                return;
            }
            if (punch) {
                g_array_free(punch, TRUE);
            }
            continue;
        }
        case WB_CLEAN_CLOSE:
            if (!wb->final || s->corrupt) {
                continue;
            }
            /* Closing: the frees just applied left counts dirty, and lazy
             * refcounts kept them in memory: one more full pass, then the
             * dirty bit can go. */
            /* With a small refcount cache each pass frees what fits; go on
             * while passes make progress. */
            uint64_t left = 0;
            for (guint i = 0; i < s->frees->len; i++) {
                left += g_array_index(s->frees, Qcow2Free, i).count;
            }
            bool progress = wb->passes < 3 || left < wb->frees_left || left == 0;
            wb->frees_left = left;
            if ((vdk_mc_dirty_count(s->rc) || s->reftable_dirty_lo != UINT64_MAX || left) && progress &&
                wb->passes < 1000000) {
                wb->passes++;
                wb->skip_refcounts = false;
                wb->frees_loaded = false;
                wb->step = WB_REFBLOCKS;
                continue;
            }
            if (s->dirty_on_disk) {
                g_mutex_lock(&n->lock);
                s->incompatible &= ~QCOW2_INCOMPAT_DIRTY;
                s->dirty_on_disk = false;
                qcow2_update_header_buf(s);
                void *buf = aligned_copy(s->hdr, s->hdr_used);
                uint32_t len = s->hdr_used;
                g_mutex_unlock(&n->lock);
                wb->step = WB_SYNC4; /* sync again, then finish */
                wb->final = false;
                wb_write(wb, buf, 0, len);
                return;
            }
            continue;
        default:
            wb_finish(wb);
            return;
        }
    }
}

static void
wb_start(Qcow2 *s, VdkRequest *r, bool final, bool evict)
{
    Wb *wb = g_new0(Wb, 1);
    wb->s = s;
    wb->r = r;
    wb->final = final;
    /* an eviction must empty whichever cache is full, refcounts included */
    wb->skip_refcounts = s->lazy_refcounts && !final && !evict;
    wb_run(wb);
}

int
qcow2_flush(VdkNode *n, VdkRequest *r)
{
    Qcow2 *s = n->opaque;
    bool final = (r->flags & VDK_FLUSH_FINAL) != 0;
    bool evict = (r->flags & VDK_FLUSH_EVICT) != 0;
    if (s->file->no_flush && !final && !evict) {
        return 0; /* cache=unsafe: flush is a no-op (closing still writes) */
    }
    g_mutex_lock(&n->lock);
    if (s->wb_running) {
        r->wait_next = s->wb_waiters;
        s->wb_waiters = r;
        g_mutex_unlock(&n->lock);
        return VDK_WAIT;
    }
    s->wb_running = true;
    g_mutex_unlock(&n->lock);
    wb_start(s, r, final, evict);
    return 0;
}

void
qcow2_writeback_async(Qcow2 *s, VdkQueue *q)
{
    /* An internal flush on this queue; requests that could not find a free
     * cache slot wait for it on wb_waiters. */
    VdkRequest *f = vdk_request_new_internal(q, s->node, VDK_OP_FLUSH);
    f->flags = VDK_FLUSH_EVICT;
    vdk_request_start(f);
}
