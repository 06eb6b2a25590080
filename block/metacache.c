/* SPDX-License-Identifier: MIT */
/*
 * metacache.c - see metacache.h.
 *
 * Slices live in a chained hash table keyed by file offset and on an LRU
 * list.  Loads are engine operations owned by the slice (not by any
 * request), submitted on the queue of the first request that missed; their
 * completion runs on that queue's thread, takes the owner's lock, marks the
 * slice ready and resumes the parked requests.  Because nothing is issued
 * or completed while the owner's lock is held, a completion can always take
 * it.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block/metacache.h"

enum { MC_LOADING = 1, MC_READY, MC_FAILED };

struct VdkMetaCache {
    VdkNode *node;
    VdkFile *file;
    uint32_t slice_size;
    uint32_t slice_shift;
    size_t max_entries;
    size_t nentries;
    uint64_t ndirty;
    VdkMetaEntry **buckets;
    size_t nbuckets; /* power of two */
    VdkMetaEntry *lru_head, *lru_tail; /* head = most recently used */
};

struct VdkMcWrite {
    VdkMetaCache *c;
    VdkMetaEntry *e;
    void *buf;
    VdkMcWrite *next;
};

/* The hash of a slice: its index, scrambled (Fibonacci hashing). */
static size_t
mc_bucket(const VdkMetaCache *c, uint64_t offset)
{
    uint64_t k = (offset >> c->slice_shift) * 0x9E3779B97F4A7C15ULL;
    return (size_t)(k >> 32) & (c->nbuckets - 1);
}

VdkMetaCache *
vdk_mc_new(VdkNode *node, VdkFile *file, uint32_t slice_size, uint64_t max_bytes)
{
    g_assert(slice_size >= 512 && (slice_size & (slice_size - 1)) == 0);
    VdkMetaCache *c = g_new0(VdkMetaCache, 1);
    c->node = node;
    c->file = file;
    c->slice_size = slice_size;
    c->slice_shift = (uint32_t)__builtin_ctz(slice_size);
    c->max_entries = (size_t)MAX(max_bytes / slice_size, (uint64_t)4);
    c->nbuckets = 16;
    while (c->nbuckets < c->max_entries * 2 && c->nbuckets < ((size_t)1 << 24)) {
        c->nbuckets *= 2;
    }
    c->buckets = g_new0(VdkMetaEntry *, c->nbuckets);
    return c;
}

void
vdk_mc_free(VdkMetaCache *c)
{
    if (!c) {
        return;
    }
    VdkMetaEntry *e = c->lru_head;
    while (e) {
        VdkMetaEntry *next = e->lru_next;
        free(e->data);
        g_free(e);
        e = next;
    }
    g_free(c->buckets);
    g_free(c);
}

uint32_t
vdk_mc_slice_size(const VdkMetaCache *c)
{
    return c->slice_size;
}

uint64_t
vdk_mc_dirty_count(const VdkMetaCache *c)
{
    return c->ndirty;
}

static VdkMetaEntry *
mc_lookup(VdkMetaCache *c, uint64_t offset)
{
    for (VdkMetaEntry *e = c->buckets[mc_bucket(c, offset)]; e; e = e->hnext) {
        if (e->offset == offset) {
            return e;
        }
    }
    return NULL;
}

static void
lru_unlink(VdkMetaCache *c, VdkMetaEntry *e)
{
    if (e->lru_prev) {
        e->lru_prev->lru_next = e->lru_next;
    } else {
        c->lru_head = e->lru_next;
    }
    if (e->lru_next) {
        e->lru_next->lru_prev = e->lru_prev;
    } else {
        c->lru_tail = e->lru_prev;
    }
    e->lru_prev = e->lru_next = NULL;
}

static void
lru_push_front(VdkMetaCache *c, VdkMetaEntry *e)
{
    e->lru_prev = NULL;
    e->lru_next = c->lru_head;
    if (c->lru_head) {
        c->lru_head->lru_prev = e;
    } else {
        c->lru_tail = e;
    }
    c->lru_head = e;
}

static void
lru_touch(VdkMetaCache *c, VdkMetaEntry *e)
{
    if (c->lru_head != e) {
        lru_unlink(c, e);
        lru_push_front(c, e);
    }
}

static void
hash_remove(VdkMetaCache *c, VdkMetaEntry *e)
{
    for (VdkMetaEntry **p = &c->buckets[mc_bucket(c, e->offset)]; *p; p = &(*p)->hnext) {
        if (*p == e) {
            *p = e->hnext;
            e->hnext = NULL;
            return;
        }
    }
}

static bool
mc_idle(const VdkMetaEntry *e)
{
    return e->state != MC_LOADING && !e->dirty && e->writing == 0 && e->pins == 0 && e->waiters == NULL;
}

/* A slice structure for @offset: a recycled idle one or a new one.  NULL
 * when the cache is full of busy or dirty slices. */
static VdkMetaEntry *
mc_slot(VdkMetaCache *c, uint64_t offset, int *ret)
{
    VdkMetaEntry *e = NULL;
    if (c->nentries >= c->max_entries) {
        for (VdkMetaEntry *x = c->lru_tail; x; x = x->lru_prev) {
            if (mc_idle(x)) {
                e = x;
                break;
            }
        }
        if (!e) {
            *ret = -ENOBUFS;
            return NULL;
        }
        hash_remove(c, e);
        lru_unlink(c, e);
    } else {
        e = g_try_new0(VdkMetaEntry, 1);
        if (!e) {
            *ret = -ENOMEM;
            return NULL;
        }
        if (posix_memalign(&e->data, 4096, c->slice_size) != 0) {
            g_free(e);
            *ret = -ENOMEM;
            return NULL;
        }
        e->cache = c;
        c->nentries++;
    }
    e->offset = offset;
    e->state = MC_READY;
    e->dirty = false;
    e->writing = 0;
    e->pins = 0;
    e->error = 0;
    e->waiters = NULL;
    size_t b = mc_bucket(c, offset);
    e->hnext = c->buckets[b];
    c->buckets[b] = e;
    lru_push_front(c, e);
    return e;
}

static void
mc_drop(VdkMetaCache *c, VdkMetaEntry *e)
{
    hash_remove(c, e);
    lru_unlink(c, e);
    free(e->data);
    g_free(e);
    c->nentries--;
}

/* Load completion: runs on the loading queue's thread, without the lock. */
static void
mc_load_done(VdkIoReq *io)
{
    VdkMetaEntry *e = io->opaque;
    VdkMetaCache *c = e->cache;
    VdkNode *n = c->node;
    g_mutex_lock(&n->lock);
    if (io->result < 0) {
        e->state = MC_FAILED;
        e->error = (int)io->result;
    } else {
        e->state = MC_READY;
    }
    VdkRequest *w = e->waiters;
    e->waiters = NULL;
    VdkQueue *q = e->load_q;
    g_mutex_unlock(&n->lock);
    while (w) {
        VdkRequest *next = w->wait_next;
        w->wait_next = NULL;
        vdk_request_resume(w, q);
        w = next;
    }
}

static void
mc_park(VdkMetaEntry *e, VdkRequest *r)
{
    r->wait_next = e->waiters;
    e->waiters = r;
}

VdkMetaEntry *
vdk_mc_get(VdkMetaCache *c, uint64_t offset, VdkRequest *r, int *ret)
{
    VdkMetaEntry *e = mc_lookup(c, offset);
    if (e) {
        switch (e->state) {
        case MC_READY:
            lru_touch(c, e);
            return e;
        case MC_LOADING:
            if (!r) {
                /* A control path cannot wait for a queue: read it itself
                 * into a private copy would race; callers that pass no
                 * request run with no I/O in flight, so this is a bug. */
                *ret = -EBUSY;
                return NULL;
            }
            mc_park(e, r);
            *ret = VDK_WAIT;
            return NULL;
        case MC_FAILED:
            *ret = e->error ? e->error : -EIO;
            if (e->waiters == NULL) {
                mc_drop(c, e);
            }
            return NULL;
        }
    }
    e = mc_slot(c, offset, ret);
    if (!e) {
        return NULL;
    }
    if (!r) {
        int rr = vdk_file_pread_sync(c->file, e->data, c->slice_size, offset);
        if (rr < 0) {
            mc_drop(c, e);
            *ret = rr;
            return NULL;
        }
        return e;
    }
    e->state = MC_LOADING;
    e->load_q = r->q;
    memset(&e->io, 0, sizeof(e->io));
    e->iov.iov_base = e->data;
    e->iov.iov_len = c->slice_size;
    e->io.op = VDK_IO_READV;
    e->io.fd = vdk_file_fd_for(c->file, offset, c->slice_size);
    e->io.short_is_eof = c->file->direct;
    e->io.offset = offset;
    e->io.len = c->slice_size;
    e->io.iov = &e->iov;
    e->io.iovcnt = 1;
    e->io.complete = mc_load_done;
    e->io.opaque = e;
    if (e->io.fd < 0) {
        mc_drop(c, e);
        *ret = -EIO;
        return NULL;
    }
    mc_park(e, r);
    vdk_queue_engine_op(r->q, &e->io);
    *ret = VDK_WAIT;
    return NULL;
}

VdkMetaEntry *
vdk_mc_get_fresh(VdkMetaCache *c, uint64_t offset, int *ret)
{
    VdkMetaEntry *e = mc_lookup(c, offset);
    if (e && e->state == MC_LOADING) {
        *ret = -EBUSY; /* fresh space is never being loaded */
        return NULL;
    }
    if (e && e->state == MC_FAILED) {
        if (e->waiters) {
            *ret = -EBUSY;
            return NULL;
        }
        mc_drop(c, e);
        e = NULL;
    }
    if (!e) {
        e = mc_slot(c, offset, ret);
        if (!e) {
            return NULL;
        }
    } else {
        lru_touch(c, e);
    }
    memset(e->data, 0, c->slice_size);
    vdk_mc_mark_dirty(c, e);
    return e;
}

VdkMetaEntry *
vdk_mc_peek(VdkMetaCache *c, uint64_t offset)
{
    VdkMetaEntry *e = mc_lookup(c, offset);
    return e && e->state == MC_READY ? e : NULL;
}

void
vdk_mc_mark_dirty(VdkMetaCache *c, VdkMetaEntry *e)
{
    if (!e->dirty) {
        e->dirty = true;
        c->ndirty++;
    }
}

void
vdk_mc_pin(VdkMetaEntry *e)
{
    e->pins++;
}

void
vdk_mc_unpin(VdkMetaEntry *e)
{
    g_assert(e->pins > 0);
    e->pins--;
}

void
vdk_mc_forget(VdkMetaCache *c, uint64_t offset)
{
    VdkMetaEntry *e = mc_lookup(c, offset);
    if (e && e->state != MC_LOADING && e->writing == 0 && e->pins == 0 && !e->waiters) {
        if (e->dirty) {
            c->ndirty--;
        }
        mc_drop(c, e);
    }
}

static int
write_cmp(const void *a, const void *b)
{
    const VdkMcWrite *x = *(VdkMcWrite *const *)a;
    const VdkMcWrite *y = *(VdkMcWrite *const *)b;
    return x->e->offset < y->e->offset ? -1 : x->e->offset > y->e->offset;
}

VdkMcWrite *
vdk_mc_collect_dirty(VdkMetaCache *c)
{
    if (c->ndirty == 0) {
        return NULL;
    }
    GPtrArray *arr = g_ptr_array_new();
    for (VdkMetaEntry *e = c->lru_head; e; e = e->lru_next) {
        if (!e->dirty) {
            continue;
        }
        VdkMcWrite *w = g_new0(VdkMcWrite, 1);
        if (posix_memalign(&w->buf, 4096, c->slice_size) != 0) {
            g_free(w);
            continue; /* stays dirty: written by a later flush */
        }
        memcpy(w->buf, e->data, c->slice_size);
        w->c = c;
        w->e = e;
        e->dirty = false;
        e->writing++;
        c->ndirty--;
        g_ptr_array_add(arr, w);
    }
    /* In offset order: sequential metadata writes. */
    g_ptr_array_sort(arr, write_cmp);
    VdkMcWrite *head = NULL;
    for (guint i = arr->len; i > 0; i--) {
        VdkMcWrite *w = arr->pdata[i - 1];
        w->next = head;
        head = w;
    }
    g_ptr_array_free(arr, TRUE);
    return head;
}

static void
mc_write_done(VdkRequest *sub)
{
    VdkMcWrite *w = sub->done_opaque;
    VdkMetaCache *c = w->c;
    g_mutex_lock(&c->node->lock);
    w->e->writing--;
    if (sub->error) {
        vdk_mc_mark_dirty(c, w->e);
    }
    g_mutex_unlock(&c->node->lock);
    free(w->buf);
    g_free(w);
}

void
vdk_mc_issue_writes(VdkMcWrite *list, VdkRequest *parent)
{
    while (list) {
        VdkMcWrite *w = list;
        list = w->next;
        VdkRequest *sub = vdk_subreq(parent, mc_write_done, w);
        struct iovec v = {w->buf, w->c->slice_size};
        vdk_req_file_rw(sub, w->c->file, true, w->e->offset, &v, 1, w->c->slice_size, 0);
        vdk_subreq_launch(sub);
    }
}

void
vdk_mc_cancel_writes(VdkMcWrite *list)
{
    while (list) {
        VdkMcWrite *w = list;
        list = w->next;
        VdkMetaCache *c = w->c;
        g_mutex_lock(&c->node->lock);
        w->e->writing--;
        vdk_mc_mark_dirty(c, w->e);
        g_mutex_unlock(&c->node->lock);
        free(w->buf);
        g_free(w);
    }
}

int
vdk_mc_write_dirty_sync(VdkMetaCache *c)
{
    for (VdkMetaEntry *e = c->lru_head; e; e = e->lru_next) {
        if (!e->dirty) {
            continue;
        }
        int r = vdk_file_pwrite_sync(c->file, e->data, c->slice_size, e->offset);
        if (r < 0) {
            return r;
        }
        e->dirty = false;
        c->ndirty--;
    }
    return 0;
}
