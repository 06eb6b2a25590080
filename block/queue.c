/* SPDX-License-Identifier: MIT */
/*
 * queue.c - the request machinery behind vdk_queue_* and the sync API.
 *
 * Life of a user request:
 *   vdk_queue_readv()   validate, take a request from the queue's pool,
 *                       append to the `queued` list.  No I/O.
 *   vdk_queue_submit()  start each queued request: the node's map() splits
 *                       it into extents; DATA extents become file children
 *                       (engine operations), ZERO extents are memset,
 *                       UNALLOC extents go to the backing node as internal
 *                       sub-requests.  Then one engine submit for the batch.
 *   vdk_queue_reap()    clear the eventfd, reap the engine (child callbacks
 *                       run here and may queue follow-up operations),
 *                       restart woken children, submit follow-ups, and copy
 *                       finished requests out of the completion ring.
 *
 * A request's `pending` counts its children and sub-requests in flight plus
 * one while it is being stepped, so it completes exactly once, when the
 * last of them finishes.  Internal requests (backing reads, control-path
 * I/O) use the same path but call a done() hook instead of the ring.
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "block/block.h"

#define QUEUE_DEFAULT_DEPTH 128
#define QUEUE_MAX_DEPTH 4096

void vdk_queue_run_ready(VdkQueue *q);
void vdk_queue_free_children(VdkQueue *q);
void vdk_request_child_done(VdkRequest *r);

static void request_step(VdkRequest *r);
static int queue_run_resumed(VdkQueue *q);

/* ------------------------------------------------------------------------ */
/* Engine plumbing                                                           */
/* ------------------------------------------------------------------------ */

void
vdk_queue_engine_op(VdkQueue *q, VdkIoReq *io)
{
    if (q->backlog_head == NULL && q->engine->queue(q->ctx, io) == 0) {
        return;
    }
    io->next = NULL;
    *q->backlog_tail = io;
    q->backlog_tail = &io->next;
}

void
vdk_queue_complete_later(VdkQueue *q, VdkIoReq *io)
{
    io->next = q->deferred;
    q->deferred = io;
    vdk_io_eventfd_signal(q->efd);
}

static int
queue_run_deferred(VdkQueue *q)
{
    int n = 0;
    while (q->deferred) {
        VdkIoReq *list = q->deferred;
        q->deferred = NULL;
        while (list) {
            VdkIoReq *io = list;
            list = io->next;
            io->next = NULL;
            io->complete(io);
            n++;
        }
    }
    return n;
}

/* Send everything queued to the kernel, feeding the backlog into the
 * engine as the batch drains. */
static void
queue_kick(VdkQueue *q)
{
    for (;;) {
        while (q->backlog_head) {
            VdkIoReq *io = q->backlog_head;
            /* engines reuse io->next for their own lists: take it first */
            VdkIoReq *next = io->next;
            if (q->engine->queue(q->ctx, io) != 0) {
                break;
            }
            q->backlog_head = next;
            if (!q->backlog_head) {
                q->backlog_tail = &q->backlog_head;
            }
        }
        if (q->engine->queued(q->ctx) == 0) {
            return;
        }
        int r = q->engine->submit(q->ctx);
        if (r <= 0 || !q->backlog_head) {
            /* r < 0: the kernel is out of resources; what stays queued goes
             * out on the next reap, once completions have freed room. */
            return;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Requests                                                                  */
/* ------------------------------------------------------------------------ */

void
vdk_req_set_error(VdkRequest *r, int err)
{
    if (err < 0 && r->error == 0) {
        r->error = err;
    }
}

static void
request_release_iov(VdkRequest *r)
{
    if (r->iov_heap) {
        g_free(r->iov);
        r->iov_heap = false;
    }
    r->iov = NULL;
    r->iovcnt = 0;
}

static bool
request_set_iov(VdkRequest *r, const struct iovec *iov, int iovcnt)
{
    if (iovcnt <= VDK_REQ_INLINE_IOV) {
        r->iov = r->iov_inline;
        r->iov_heap = false;
    } else {
        r->iov = g_try_new(struct iovec, (gsize)iovcnt);
        if (!r->iov) {
            return false;
        }
        r->iov_heap = true;
    }
    if (iovcnt > 0) {
        memcpy(r->iov, iov, sizeof(*iov) * (size_t)iovcnt);
    }
    r->iovcnt = iovcnt;
    return true;
}

VdkRequest *
vdk_request_new_internal(VdkQueue *q, VdkNode *n, VdkOp op)
{
    VdkRequest *r = q->free_internal;
    if (r) {
        q->free_internal = r->next;
    } else {
        r = g_new0(VdkRequest, 1);
    }
    memset(r, 0, sizeof(*r));
    r->q = q;
    r->node = n;
    r->op = (uint8_t)op;
    return r;
}

static void
request_free(VdkRequest *r)
{
    VdkQueue *q = r->q;
    request_release_iov(r);
    if (r->user) {
        r->next = q->free_reqs;
        q->free_reqs = r;
    } else {
        r->next = q->free_internal;
        q->free_internal = r;
    }
}

static void
request_complete(VdkRequest *r)
{
    VdkQueue *q = r->q;
    if (!r->user) {
        /* done() may add work to the parent first; the parent then learns
         * the outcome and loses the pending count this request held. */
        VdkRequest *parent = r->parent;
        int err = r->error;
        if (r->done) {
            r->done(r);
        }
        request_free(r);
        if (parent) {
            vdk_req_set_error(parent, err);
            vdk_request_child_done(parent);
        }
        return;
    }
    int64_t result = r->error;
    if (result == 0 && (r->op == VDK_OP_READ || r->op == VDK_OP_WRITE)) {
        result = (int64_t)r->len;
    }
    unsigned slot = (q->cq_head + q->cq_count) % q->depth;
    q->cq[slot].user_data = r->user_data;
    q->cq[slot].result = result;
    q->cq_count++;
    request_free(r);
    if (!q->in_reap) {
        vdk_io_eventfd_signal(q->efd);
    }
}

void
vdk_request_child_done(VdkRequest *r)
{
    g_assert(r->pending > 0);
    if (--r->pending > 0) {
        return;
    }
    if ((r->flags & VDK_REQ_FUA) && r->error == 0 &&
        (r->op == VDK_OP_WRITE_ZEROES || (r->op == VDK_OP_WRITE && r->node->drv->flush))) {
        /* Durable on completion, but RWF_DSYNC does not cover zeroing by
         * fallocate nor a format's metadata: flush the node after. */
        r->flags &= ~(uint32_t)VDK_REQ_FUA;
        r->pending++;
        if (r->node->drv->flush) {
            VdkRequest *f = vdk_request_new_internal(r->q, r->node, VDK_OP_FLUSH);
            f->parent = r;
            r->pending++;
            vdk_request_start(f);
        } else {
            vdk_req_file_flush(r, r->node->file);
        }
        vdk_request_child_done(r);
        return;
    }
    request_complete(r);
}

VdkRequest *
vdk_subreq(VdkRequest *parent, VdkRequestDone *done, void *opaque)
{
    VdkRequest *sub = vdk_request_new_internal(parent->q, parent->node, VDK_OP_NONE);
    sub->parent = parent;
    sub->done = done;
    sub->done_opaque = opaque;
    sub->flags = parent->flags & VDK_REQ_FUA;
    sub->started = true;
    sub->pending = 1; /* until vdk_subreq_launch() */
    parent->pending++;
    return sub;
}

void
vdk_subreq_launch(VdkRequest *sub)
{
    vdk_request_child_done(sub);
}

/* Find the iovec slice [off, off+len) of an iovec array. Returns the
 * number of entries written to @out (at most @max), or -1 if more needed. */
static int
iov_slice(const struct iovec *iov, int cnt, uint64_t off, uint64_t len, struct iovec *out, int max)
{
    int n = 0;
    int i = 0;
    while (i < cnt && off >= iov[i].iov_len) {
        off -= iov[i].iov_len;
        i++;
    }
    while (len > 0 && i < cnt) {
        if (n == max) {
            return -1;
        }
        size_t avail = iov[i].iov_len - (size_t)off;
        size_t take = (size_t)MIN((uint64_t)avail, len);
        out[n].iov_base = (char *)iov[i].iov_base + off;
        out[n].iov_len = take;
        n++;
        len -= take;
        off = 0;
        i++;
    }
    return n;
}

static void
iov_memset(const struct iovec *iov, int cnt, uint64_t off, uint64_t len)
{
    int i = 0;
    while (i < cnt && off >= iov[i].iov_len) {
        off -= iov[i].iov_len;
        i++;
    }
    while (len > 0 && i < cnt) {
        size_t avail = iov[i].iov_len - (size_t)off;
        size_t take = (size_t)MIN((uint64_t)avail, len);
        memset((char *)iov[i].iov_base + off, 0, take);
        len -= take;
        off = 0;
        i++;
    }
}

/* Copy between a flat buffer and [off, off+len) of an iovec array. */
static void
iov_copy(const struct iovec *iov, int cnt, uint64_t off, void *buf, uint64_t len, bool to_iov)
{
    int i = 0;
    while (i < cnt && off >= iov[i].iov_len) {
        off -= iov[i].iov_len;
        i++;
    }
    char *p = buf;
    while (len > 0 && i < cnt) {
        size_t avail = iov[i].iov_len - (size_t)off;
        size_t take = (size_t)MIN((uint64_t)avail, len);
        if (to_iov) {
            memcpy((char *)iov[i].iov_base + off, p, take);
        } else {
            memcpy(p, (char *)iov[i].iov_base + off, take);
        }
        p += take;
        len -= take;
        off = 0;
        i++;
    }
}

void
vdk_iov_copy_in(const struct iovec *iov, int cnt, const void *buf, uint64_t len)
{
    iov_copy(iov, cnt, 0, (void *)buf, len, true);
}

void
vdk_iov_copy_out(const struct iovec *iov, int cnt, void *buf, uint64_t len)
{
    iov_copy(iov, cnt, 0, buf, len, false);
}

void
vdk_req_copy_out(VdkRequest *r, uint64_t off, void *buf, uint64_t len)
{
    iov_copy(r->iov, r->iovcnt, off - r->offset, buf, len, false);
}

/* A slice of @r's buffers as a temporary iovec array (stack for small,
 * heap for large vectors). */
typedef struct {
    struct iovec stack[16];
    struct iovec *v;
    int n;
} IovSlice;

static bool
slice_get(VdkRequest *r, uint64_t off, uint64_t len, IovSlice *s)
{
    s->v = s->stack;
    s->n = iov_slice(r->iov, r->iovcnt, off, len, s->stack, (int)G_N_ELEMENTS(s->stack));
    if (s->n >= 0) {
        return true;
    }
    s->v = g_try_new(struct iovec, (gsize)r->iovcnt);
    if (!s->v) {
        return false;
    }
    s->n = iov_slice(r->iov, r->iovcnt, off, len, s->v, r->iovcnt);
    return true;
}

static void
slice_free(IovSlice *s)
{
    if (s->v != s->stack) {
        g_free(s->v);
    }
}

VdkRequest *
vdk_request_io_node(VdkRequest *parent, VdkNode *n, VdkOp op, uint64_t off, const struct iovec *iov, int iovcnt,
                    uint64_t len)
{
    VdkRequest *sub = vdk_request_new_internal(parent->q, n, op);
    if (!request_set_iov(sub, iov, iovcnt)) {
        request_free(sub);
        vdk_req_set_error(parent, -ENOMEM);
        return NULL;
    }
    sub->offset = off;
    sub->len = len;
    sub->parent = parent;
    parent->pending++;
    vdk_request_start(sub);
    return sub;
}

static VdkRequest *
request_read_node(VdkRequest *parent, VdkNode *n, uint64_t off, const struct iovec *iov, int iovcnt, uint64_t len)
{
    return vdk_request_io_node(parent, n, VDK_OP_READ, off, iov, iovcnt, len);
}

/* Read [off, off+len) of the request's range from the backing node (or
 * zeroes beyond it). */
static void
request_read_backing(VdkRequest *r, uint64_t off, uint64_t len)
{
    VdkNode *b = r->node->backing;
    uint64_t rel = off - r->offset;
    if (!b || off >= b->size) {
        iov_memset(r->iov, r->iovcnt, rel, len);
        return;
    }
    uint64_t blen = MIN(len, b->size - off);
    if (blen < len) {
        iov_memset(r->iov, r->iovcnt, rel + blen, len - blen);
    }
    IovSlice s;
    if (!slice_get(r, rel, blen, &s)) {
        vdk_req_set_error(r, -ENOMEM);
        return;
    }
    request_read_node(r, b, off, s.v, s.n, blen);
    slice_free(&s);
}

/* qemu's rule for probed raw images: a write must not make sector 0 look
 * like another format.  The node keeps a copy of sector 0 to merge into. */
static int
request_check_sector0(VdkRequest *r)
{
    VdkNode *n = r->node;
    if (!n->probed_raw || r->offset >= sizeof(n->sector0)) {
        return 0;
    }
    uint8_t buf[sizeof(n->sector0)];
    g_mutex_lock(&n->lock);
    memcpy(buf, n->sector0, sizeof(buf));
    uint64_t end = MIN(r->offset + r->len, (uint64_t)sizeof(buf));
    if (r->op == VDK_OP_WRITE) {
        iov_copy(r->iov, r->iovcnt, 0, buf + r->offset, end - r->offset, false);
    } else {
        memset(buf + r->offset, 0, (size_t)(end - r->offset));
    }
    const VdkFormat *drv = vdk_probe_format(buf, sizeof(buf), n->filename);
    if (drv != &vdk_format_raw || vdk_probe_foreign(buf, sizeof(buf))) {
        g_mutex_unlock(&n->lock);
        return -EPERM;
    }
    memcpy(n->sector0, buf, sizeof(buf));
    g_mutex_unlock(&n->lock);
    return 0;
}

/* Flags for a request's data writes: FUA rides on each write (RWF_DSYNC)
 * unless the node has metadata, in which case a flush follows instead. */
static uint32_t
request_io_flags(const VdkRequest *r)
{
    return r->node->drv->flush ? (r->flags & ~(uint32_t)VDK_REQ_FUA) : r->flags;
}

/* ------------------------------------------------------------------------ */
/* Compressed extents: read, decompress, copy out                            */
/* ------------------------------------------------------------------------ */

typedef struct {
    VdkRequest *r;
    uint64_t rel;        /* where in r's buffers */
    uint64_t skip, len;  /* which bytes of the unit */
    size_t comp_len;
    uint32_t unit_size;
    void *cbuf;
    void *ubuf;
} CompOp;

static void
comp_done(VdkRequest *sub)
{
    CompOp *op = sub->done_opaque;
    VdkNode *n = op->r->node;
    if (sub->error == 0) {
        int ret = n->drv->decompress(n, op->cbuf, op->comp_len, op->ubuf, op->unit_size);
        if (ret < 0) {
            vdk_req_set_error(sub, ret);
        } else {
            iov_copy(op->r->iov, op->r->iovcnt, op->rel, (char *)op->ubuf + op->skip, op->len, true);
        }
    }
    free(op->cbuf);
    g_free(op->ubuf);
    g_free(op);
}

static void
request_read_compressed(VdkRequest *r, const VdkExtent *ext)
{
    CompOp *op = g_new0(CompOp, 1);
    op->r = r;
    op->rel = r->cursor - r->offset;
    op->skip = r->cursor - ext->unit_offset;
    op->len = ext->len;
    op->comp_len = (size_t)ext->comp_len;
    op->unit_size = ext->unit_size;
    op->ubuf = g_try_malloc(ext->unit_size);
    if (posix_memalign(&op->cbuf, 4096, MAX(op->comp_len, (size_t)1)) != 0) {
        op->cbuf = NULL;
    }
    if (!op->ubuf || !op->cbuf || op->skip + op->len > ext->unit_size) {
        free(op->cbuf);
        g_free(op->ubuf);
        g_free(op);
        vdk_req_set_error(r, op->skip + op->len > ext->unit_size ? -EIO : -ENOMEM);
        return;
    }
    VdkRequest *sub = vdk_subreq(r, comp_done, op);
    struct iovec v = {op->cbuf, op->comp_len};
    vdk_req_file_rw(sub, ext->file, false, ext->host_offset, &v, 1, op->comp_len, 0);
    vdk_subreq_launch(sub);
}

/* ------------------------------------------------------------------------ */
/* Allocating writes: copy-on-write reads, one write, driver commit          */
/* ------------------------------------------------------------------------ */

typedef struct {
    VdkRequest *r;
    VdkAlloc *a;
    uint64_t rel, len;   /* the request's bytes: r's buffers at rel */
    void *head, *tail;
    uint64_t head_len, tail_len;
} AllocOp;

static void
alloc_op_free(AllocOp *op)
{
    free(op->head);
    free(op->tail);
    g_free(op);
}

static void
alloc_write_done(VdkRequest *sub)
{
    AllocOp *op = sub->done_opaque;
    VdkNode *n = op->r->node;
    n->drv->alloc_done(n, op->a, sub->error, sub->q);
    alloc_op_free(op);
}

static void
alloc_cow_done(VdkRequest *sub)
{
    AllocOp *op = sub->done_opaque;
    VdkRequest *r = op->r;
    VdkNode *n = r->node;
    if (sub->error) {
        n->drv->alloc_done(n, op->a, sub->error, sub->q);
        alloc_op_free(op);
        return;
    }
    IovSlice s;
    if (!slice_get(r, op->rel, op->len, &s)) {
        n->drv->alloc_done(n, op->a, -ENOMEM, sub->q);
        vdk_req_set_error(sub, -ENOMEM);
        alloc_op_free(op);
        return;
    }
    struct iovec *v = g_new(struct iovec, (gsize)s.n + 2);
    int cnt = 0;
    if (op->head_len) {
        v[cnt].iov_base = op->head;
        v[cnt].iov_len = (size_t)op->head_len;
        cnt++;
    }
    memcpy(v + cnt, s.v, sizeof(*v) * (size_t)s.n);
    cnt += s.n;
    if (op->tail_len) {
        v[cnt].iov_base = op->tail;
        v[cnt].iov_len = (size_t)op->tail_len;
        cnt++;
    }
    slice_free(&s);
    VdkRequest *w = vdk_subreq(r, alloc_write_done, op);
    if (n->crypt) {
        vdk_crypt_write(w, op->a->file, op->a->host_offset, op->a->guest_start, v, cnt,
                        op->head_len + op->len + op->tail_len, request_io_flags(r));
    } else {
        vdk_req_file_rw(w, op->a->file, true, op->a->host_offset, v, cnt, op->head_len + op->len + op->tail_len,
                        request_io_flags(r));
    }
    g_free(v);
    vdk_subreq_launch(w);
}

static void request_write_alloc_data(VdkRequest *r, AllocOp *op);

static void
alloc_prezero_done(VdkRequest *sub)
{
    AllocOp *op = sub->done_opaque;
    sub->error = 0; /* only an optimisation: the data write follows anyway */
    request_write_alloc_data(op->r, op);
}

static void
request_write_alloc(VdkRequest *r, const VdkExtent *ext)
{
    VdkAlloc *a = ext->alloc;
    AllocOp *op = g_new0(AllocOp, 1);
    op->r = r;
    op->a = a;
    op->rel = r->cursor - r->offset;
    op->len = ext->len;
    if (a->prezero_len && !a->cow && !a->payload) {
        VdkRequest *z = vdk_subreq(r, alloc_prezero_done, op);
        vdk_req_file_zero(z, a->file, a->prezero_off, a->prezero_len, VDK_REQ_NO_FALLBACK);
        vdk_subreq_launch(z);
        return;
    }
    request_write_alloc_data(r, op);
}

/* The data (and copy-on-write) part of an allocating write. */
static void
request_write_alloc_data(VdkRequest *r, AllocOp *op)
{
    VdkAlloc *a = op->a;
    VdkNode *n = r->node;
    uint64_t cursor = r->offset + op->rel;
    if (a->payload) {
        VdkRequest *w = vdk_subreq(r, alloc_write_done, op);
        struct iovec v = {(void *)a->payload, a->payload_len};
        vdk_req_file_rw(w, a->file, true, a->host_offset, &v, 1, a->payload_len, r->flags & ~(uint32_t)VDK_REQ_FUA);
        vdk_subreq_launch(w);
        return;
    }
    if (!a->cow) {
        /* The rest of the new space needs nothing: write the bytes alone. */
        IovSlice s;
        if (!slice_get(r, op->rel, op->len, &s)) {
            n->drv->alloc_done(n, a, -ENOMEM, r->q);
            vdk_req_set_error(r, -ENOMEM);
            g_free(op);
            return;
        }
        VdkRequest *w = vdk_subreq(r, alloc_write_done, op);
        if (n->crypt) {
            vdk_crypt_write(w, a->file, a->host_offset + (cursor - a->guest_start), cursor, s.v, s.n, op->len,
                            request_io_flags(r));
        } else {
            vdk_req_file_rw(w, a->file, true, a->host_offset + (cursor - a->guest_start), s.v, s.n, op->len,
                            request_io_flags(r));
        }
        slice_free(&s);
        vdk_subreq_launch(w);
        return;
    }
    op->head_len = cursor - a->guest_start;
    op->tail_len = a->guest_end - (cursor + op->len);
    VdkRequest *sub = vdk_subreq(r, alloc_cow_done, op);
    if (op->head_len && posix_memalign(&op->head, 4096, (size_t)op->head_len) != 0) {
        op->head = NULL;
        vdk_req_set_error(sub, -ENOMEM);
    }
    if (op->tail_len && posix_memalign(&op->tail, 4096, (size_t)op->tail_len) != 0) {
        op->tail = NULL;
        vdk_req_set_error(sub, -ENOMEM);
    }
    if (sub->error == 0) {
        if (op->head_len) {
            struct iovec v = {op->head, (size_t)op->head_len};
            request_read_node(sub, n, a->guest_start, &v, 1, op->head_len);
        }
        if (op->tail_len) {
            struct iovec v = {op->tail, (size_t)op->tail_len};
            request_read_node(sub, n, cursor + op->len, &v, 1, op->tail_len);
        }
    }
    vdk_subreq_launch(sub);
}

/* ------------------------------------------------------------------------ */
/* Stepping requests                                                         */
/* ------------------------------------------------------------------------ */

/* Dispatch a read or write: map extent after extent.  Returns VDK_WAIT if
 * the driver parked the request. */
static int
request_step_rw(VdkRequest *r)
{
    VdkNode *n = r->node;
    bool is_write = r->op == VDK_OP_WRITE;
    uint64_t end = r->offset + r->len;

    while (r->cursor < end && r->error == 0) {
        VdkExtent ext;
        memset(&ext, 0, sizeof(ext));
        int ret = VDK_NOT_COMPRESSIBLE;
        uint64_t limit = end - r->cursor;
        if (is_write && (r->flags & VDK_REQ_COMPRESS)) {
            /* compressed clusters are not encrypted (qemu writes them in
             * plaintext): never store an encrypted image's data that way */
            ret = n->drv->write_compressed && !n->crypt
                      ? n->drv->write_compressed(n, r, r->cursor, end - r->cursor, &ext)
                      : -ENOTSUP;
            if (ret == VDK_NOT_COMPRESSIBLE && ext.len) {
                /* only this unit goes uncompressed; the next ones are
                 * tried again */
                limit = MIN(limit, ext.len);
            }
        }
        if (ret == VDK_NOT_COMPRESSIBLE) {
            /* not compressing this part: a normal write */
            memset(&ext, 0, sizeof(ext));
            ret = n->drv->map(n, r->cursor, limit, is_write ? VDK_MAP_WRITE : 0, &ext, r);
        }
        if (ret == VDK_WAIT) {
            return VDK_WAIT;
        }
        if (ret < 0) {
            vdk_req_set_error(r, ret);
            break;
        }
        if (ext.len == 0 || ext.len > end - r->cursor) {
            vdk_req_set_error(r, -EIO);
            break;
        }
        uint64_t rel = r->cursor - r->offset;
        switch (ext.kind) {
        case VDK_EXT_DATA: {
            IovSlice s;
            if (!slice_get(r, rel, ext.len, &s)) {
                vdk_req_set_error(r, -ENOMEM);
                break;
            }
            if (n->crypt && is_write) {
                vdk_crypt_write(r, ext.file, ext.host_offset, r->cursor, s.v, s.n, ext.len, request_io_flags(r));
            } else if (n->crypt) {
                vdk_crypt_read(r, ext.file, ext.host_offset, r->cursor, s.v, s.n, ext.len);
            } else {
                vdk_req_file_rw(r, ext.file, is_write, ext.host_offset, s.v, s.n, ext.len, request_io_flags(r));
            }
            slice_free(&s);
            break;
        }
        case VDK_EXT_ZERO:
            if (is_write) {
                vdk_req_set_error(r, -EIO);
            } else {
                iov_memset(r->iov, r->iovcnt, rel, ext.len);
            }
            break;
        case VDK_EXT_UNALLOC:
            if (is_write) {
                vdk_req_set_error(r, -EIO);
            } else {
                request_read_backing(r, r->cursor, ext.len);
            }
            break;
        case VDK_EXT_COMPRESSED:
            if (is_write || !n->drv->decompress) {
                vdk_req_set_error(r, -EIO);
            } else {
                request_read_compressed(r, &ext);
            }
            break;
        case VDK_EXT_ALLOC:
            if (!is_write || !ext.alloc || !n->drv->alloc_done) {
                vdk_req_set_error(r, -EIO);
            } else {
                request_write_alloc(r, &ext);
            }
            break;
        default:
            vdk_req_set_error(r, -EIO);
            break;
        }
        r->cursor += ext.len;
    }
    return 0;
}

/* Block status through the chain: the first layer that has the range. */
static int
node_block_status(VdkNode *n, uint64_t off, uint64_t len, VdkBlockStatus *out, VdkRequest *r)
{
    VdkExtent ext;
    memset(&ext, 0, sizeof(ext));
    int ret;
    if (n->drv->block_status) {
        ret = n->drv->block_status(n, off, len, &ext, r);
    } else {
        ret = n->drv->map(n, off, len, 0, &ext, r);
    }
    if (ret != 0) {
        return ret;
    }
    if (ext.len == 0 || ext.len > len) {
        return -EIO;
    }
    out->offset = off;
    out->length = ext.len;
    out->depth = n->depth;
    out->host_offset = 0;
    switch (ext.kind) {
    case VDK_EXT_DATA:
        if (n->crypt || n->crypt_locked) {
            /* encrypted: the host bytes are not the data (qemu shows no offset) */
            out->flags = VDK_BS_DATA | VDK_BS_ALLOCATED;
            return 0;
        }
        out->flags = VDK_BS_DATA | VDK_BS_ALLOCATED | VDK_BS_OFFSET_VALID;
        out->host_offset = ext.host_offset;
        if (ext.recurse && ext.file && !n->crypt) {
            /* Holes in the file read as zeroes: say so, and stop where the
             * file's status changes (errors only cost the detail). */
            uint64_t pnum = 0;
            int st = vdk_file_seek_status(ext.file, ext.host_offset, ext.len, &pnum);
            if (st >= 0 && pnum > 0) {
                out->length = pnum;
                if (st == 0) {
                    out->flags |= VDK_BS_ZERO;
                }
            }
        }
        return 0;
    case VDK_EXT_COMPRESSED:
        out->flags = VDK_BS_DATA | VDK_BS_ALLOCATED;
        return 0;
    case VDK_EXT_ZERO:
        out->flags = VDK_BS_ZERO | VDK_BS_ALLOCATED;
        if (ext.host_valid) {
            out->flags |= VDK_BS_OFFSET_VALID;
            out->host_offset = ext.host_offset;
        }
        return 0;
    case VDK_EXT_UNALLOC:
        if (n->backing && off < n->backing->size) {
            return node_block_status(n->backing, off, MIN(ext.len, n->backing->size - off), out, r);
        }
        out->flags = VDK_BS_ZERO;
        if (ext.host_valid) {
            /* space reserved in this layer (qcow2 subclusters) */
            out->flags |= VDK_BS_OFFSET_VALID;
            out->host_offset = ext.host_offset;
        }
        return 0;
    }
    return -EIO;
}

/* write_zeroes emulated with zero buffers, one chunk at a time. */
static void zero_emul_next(VdkRequest *r);

static void
zero_emul_done(VdkRequest *sub)
{
    VdkRequest *r = sub->parent;
    if (sub->error == 0 && r->cursor < r->offset + r->len) {
        zero_emul_next(r);
    }
}

static void
zero_emul_next(VdkRequest *r)
{
    size_t zlen;
    const void *z = vdk_zero_buffer(&zlen);
    uint64_t n = MIN(r->offset + r->len - r->cursor, (uint64_t)zlen);
    VdkRequest *w = vdk_request_new_internal(r->q, r->node, VDK_OP_WRITE);
    struct iovec v = {(void *)z, (size_t)n};
    request_set_iov(w, &v, 1);
    w->offset = r->cursor;
    w->len = n;
    w->flags = r->flags & VDK_REQ_FUA;
    w->parent = r;
    w->done = zero_emul_done;
    r->pending++;
    r->cursor += n;
    vdk_request_start(w);
}

/* One step of a request; VDK_WAIT if the driver parked it. */
static int
request_dispatch(VdkRequest *r)
{
    VdkNode *n = r->node;
    int ret = 0;
    if (n->crypt_locked && (r->op == VDK_OP_READ || r->op == VDK_OP_WRITE || r->op == VDK_OP_WRITE_ZEROES ||
                            r->op == VDK_OP_DISCARD)) {
        vdk_req_set_error(r, -EACCES); /* encrypted, opened without its key */
        return 0;
    }
    switch (r->op) {
    case VDK_OP_READ:
        return request_step_rw(r);
    case VDK_OP_WRITE:
        if (r->phase == 0) {
            r->phase = 1;
            ret = request_check_sector0(r);
            if (ret < 0) {
                vdk_req_set_error(r, ret);
                return 0;
            }
            if (vdk_crypt_write_unaligned(r)) {
                r->cursor = r->offset + r->len;
                return 0;
            }
        }
        return request_step_rw(r);
    case VDK_OP_FLUSH:
        /* r->cursor counts the writable nodes already handed over. */
        for (VdkNode *x = n; x; x = x->backing) {
            if (x->read_only || (uint64_t)x->depth < r->cursor) {
                continue;
            }
            if (x->drv->flush) {
                ret = x->drv->flush(x, r);
                if (ret == VDK_WAIT) {
                    return VDK_WAIT;
                }
                if (ret < 0) {
                    vdk_req_set_error(r, ret);
                    return 0;
                }
            } else if (!(r->flags & VDK_FLUSH_FINAL)) {
                /* closing writes back metadata; raw has none to write */
                vdk_req_file_flush(r, x->file);
            }
            r->cursor = (uint64_t)x->depth + 1;
        }
        return 0;
    case VDK_OP_DISCARD:
        if (n->drv->discard) {
            ret = n->drv->discard(n, r);
        }
        break;
    case VDK_OP_WRITE_ZEROES:
        if (r->phase == 0) {
            r->phase = 1;
            ret = request_check_sector0(r);
            if (ret < 0) {
                vdk_req_set_error(r, ret);
                return 0;
            }
        }
        if (r->phase == 1) {
            ret = n->drv->write_zeroes ? n->drv->write_zeroes(n, r) : -ENOTSUP;
            if (ret == -ENOTSUP && !(r->flags & VDK_REQ_NO_FALLBACK)) {
                r->phase = 2;
                ret = 0;
            }
        }
        if (r->phase == 2 && r->cursor < r->offset + r->len) {
            zero_emul_next(r);
        }
        break;
    case VDK_OP_BLOCK_STATUS:
        ret = node_block_status(n, r->offset, r->len, r->bs_out, r);
        break;
    case VDK_OP_NONE:
        break;
    default:
        ret = -EINVAL;
        break;
    }
    if (ret == VDK_WAIT) {
        return VDK_WAIT;
    }
    vdk_req_set_error(r, ret);
    return 0;
}

static void
request_step(VdkRequest *r)
{
    r->pending++; /* held while stepping, and while parked */
    if (request_dispatch(r) == VDK_WAIT) {
        r->parked = true;
        return;
    }
    vdk_request_child_done(r);
}

/* A parked request's metadata is ready: step it again (its guard is still
 * held from when it parked). */
static void
request_continue(VdkRequest *r)
{
    r->parked = false;
    if (request_dispatch(r) == VDK_WAIT) {
        r->parked = true;
        return;
    }
    vdk_request_child_done(r);
}

void
vdk_request_resume(VdkRequest *r, VdkQueue *cur)
{
    VdkQueue *q = r->q;
    if (q == cur && q->in_reap) {
        r->wait_next = q->ready_reqs;
        q->ready_reqs = r;
        return;
    }
    g_mutex_lock(&q->wake_lock);
    r->wait_next = q->woken_reqs;
    q->woken_reqs = r;
    g_mutex_unlock(&q->wake_lock);
    vdk_io_eventfd_signal(q->efd);
}

/* Run requests resumed on (or for) this queue. */
static int
queue_run_resumed(VdkQueue *q)
{
    int n = 0;
    g_mutex_lock(&q->wake_lock);
    VdkRequest *w = q->woken_reqs;
    q->woken_reqs = NULL;
    g_mutex_unlock(&q->wake_lock);
    while (w) {
        VdkRequest *next = w->wait_next;
        w->wait_next = q->ready_reqs;
        q->ready_reqs = w;
        w = next;
    }
    while (q->ready_reqs) {
        VdkRequest *r = q->ready_reqs;
        q->ready_reqs = r->wait_next;
        r->wait_next = NULL;
        request_continue(r);
        n++;
    }
    return n;
}

void
vdk_request_start(VdkRequest *r)
{
    r->started = true;
    r->cursor = r->op == VDK_OP_FLUSH ? 0 : r->offset;
    request_step(r);
}

/* ------------------------------------------------------------------------ */
/* Public queue API                                                          */
/* ------------------------------------------------------------------------ */

VdkQueue *
vdk_queue_new(VdkImage *img, unsigned depth, GError **error)
{
    if (depth == 0) {
        depth = QUEUE_DEFAULT_DEPTH;
    }
    if (depth > QUEUE_MAX_DEPTH) {
        g_set_error(error, VDK_ERROR, EINVAL, "queue depth %u is too large (max %u)", depth, QUEUE_MAX_DEPTH);
        return NULL;
    }
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0) {
        g_set_error(error, VDK_ERROR, errno, "cannot create an eventfd: %s", g_strerror(errno));
        return NULL;
    }
    VdkIoCtx *ctx = img->engine->ctx_new(depth, efd, error);
    if (!ctx) {
        close(efd);
        return NULL;
    }
    VdkQueue *q = g_new0(VdkQueue, 1);
    q->img = img;
    q->engine = img->engine;
    q->ctx = ctx;
    q->efd = efd;
    q->depth = depth;
    q->reqs = g_new0(VdkRequest, depth);
    for (unsigned i = 0; i < depth; i++) {
        q->reqs[i].next = q->free_reqs;
        q->free_reqs = &q->reqs[i];
    }
    q->cq = g_new0(VdkCompletion, depth);
    q->queued_tail = &q->queued_head;
    q->backlog_tail = &q->backlog_head;
    g_mutex_init(&q->wake_lock);
    if (q->engine->set_notify) {
        q->engine->set_notify(q->ctx, false);
    }
    g_atomic_int_inc(&img->queues);
    return q;
}

int
vdk_queue_get_fd(VdkQueue *q)
{
    if (!q->fd_exposed) {
        q->fd_exposed = true;
        if (q->engine->set_notify) {
            q->engine->set_notify(q->ctx, true);
        }
    }
    return q->efd;
}

/* Does this queue sleep in the engine rather than on its eventfd? */
static bool
queue_engine_waits(VdkQueue *q)
{
    return !q->fd_exposed && q->engine->wait != NULL;
}

/* Sleep until something may have completed. */
static int
queue_block(VdkQueue *q, int timeout_ms)
{
    if (queue_engine_waits(q)) {
        int r = q->engine->wait(q->ctx, timeout_ms);
        return r == -ETIME ? 0 : r;
    }
    struct pollfd pfd = {.fd = q->efd, .events = POLLIN};
    int r = poll(&pfd, 1, timeout_ms);
    if (r < 0 && errno != EINTR) {
        return -errno;
    }
    return 0;
}

unsigned
vdk_queue_pending(VdkQueue *q)
{
    return q->outstanding;
}

/* Requests started and not yet complete. */
static unsigned
queue_inflight(VdkQueue *q)
{
    return q->outstanding - q->cq_count - q->unsubmitted;
}

static int
queue_take(VdkQueue *q, VdkOp op, uint64_t offset, uint64_t len, VdkRequest **out)
{
    VdkNode *n = q->img->top;
    if (q->outstanding >= q->depth) {
        return -EAGAIN;
    }
    bool modifies = op == VDK_OP_WRITE || op == VDK_OP_DISCARD || op == VDK_OP_WRITE_ZEROES;
    if (modifies && n->read_only) {
        return -EROFS;
    }
    if (op != VDK_OP_FLUSH) {
        uint64_t end;
        if (vdk_add_overflows(offset, len, &end) || end > n->size) {
            return modifies ? -ENOSPC : -EINVAL;
        }
    }
    if ((op == VDK_OP_READ || op == VDK_OP_WRITE) && len > VDK_MAX_REQUEST_BYTES) {
        return -EINVAL;
    }
    VdkRequest *r = q->free_reqs;
    g_assert(r);
    q->free_reqs = r->next;
    memset(r, 0, sizeof(*r));
    r->q = q;
    r->node = n;
    r->op = (uint8_t)op;
    r->user = true;
    r->offset = offset;
    r->len = len;
    *out = r;
    return 0;
}

static void
queue_append(VdkQueue *q, VdkRequest *r)
{
    r->next = NULL;
    *q->queued_tail = r;
    q->queued_tail = &r->next;
    q->outstanding++;
    q->unsubmitted++;
}

static int
queue_rw(VdkQueue *q, VdkOp op, uint64_t offset, const struct iovec *iov, int iovcnt, unsigned flags,
         uint64_t user_data)
{
    if (iovcnt < 0 || iovcnt > IOV_MAX || (iovcnt > 0 && !iov)) {
        return -EINVAL;
    }
    uint64_t len = 0;
    for (int i = 0; i < iovcnt; i++) {
        if (vdk_add_overflows(len, iov[i].iov_len, &len)) {
            return -EINVAL;
        }
    }
    if (flags & ~(unsigned)(VDK_REQ_FUA | (op == VDK_OP_WRITE ? VDK_REQ_COMPRESS : 0))) {
        return -EINVAL;
    }
    VdkRequest *r;
    int ret = queue_take(q, op, offset, len, &r);
    if (ret < 0) {
        return ret;
    }
    if (!request_set_iov(r, iov, iovcnt)) {
        r->next = q->free_reqs;
        q->free_reqs = r;
        return -ENOMEM;
    }
    r->flags = flags;
    r->user_data = user_data;
    queue_append(q, r);
    return 0;
}

int
vdk_queue_readv(VdkQueue *q, uint64_t offset, const struct iovec *iov, int iovcnt, uint64_t user_data)
{
    return queue_rw(q, VDK_OP_READ, offset, iov, iovcnt, 0, user_data);
}

int
vdk_queue_writev(VdkQueue *q, uint64_t offset, const struct iovec *iov, int iovcnt, unsigned flags,
                 uint64_t user_data)
{
    return queue_rw(q, VDK_OP_WRITE, offset, iov, iovcnt, flags, user_data);
}

int
vdk_queue_read(VdkQueue *q, uint64_t offset, void *buf, size_t len, uint64_t user_data)
{
    struct iovec iov = {buf, len};
    return queue_rw(q, VDK_OP_READ, offset, &iov, 1, 0, user_data);
}

int
vdk_queue_write(VdkQueue *q, uint64_t offset, const void *buf, size_t len, unsigned flags, uint64_t user_data)
{
    struct iovec iov = {(void *)buf, len};
    return queue_rw(q, VDK_OP_WRITE, offset, &iov, 1, flags, user_data);
}

static int
queue_simple(VdkQueue *q, VdkOp op, uint64_t offset, uint64_t length, unsigned flags, VdkBlockStatus *bs,
             uint64_t user_data)
{
    VdkRequest *r;
    int ret = queue_take(q, op, offset, length, &r);
    if (ret < 0) {
        return ret;
    }
    r->flags = flags;
    r->bs_out = bs;
    r->user_data = user_data;
    queue_append(q, r);
    return 0;
}

int
vdk_queue_flush(VdkQueue *q, uint64_t user_data)
{
    return queue_simple(q, VDK_OP_FLUSH, 0, 0, 0, NULL, user_data);
}

int
vdk_queue_discard(VdkQueue *q, uint64_t offset, uint64_t length, uint64_t user_data)
{
    return queue_simple(q, VDK_OP_DISCARD, offset, length, 0, NULL, user_data);
}

int
vdk_queue_write_zeroes(VdkQueue *q, uint64_t offset, uint64_t length, unsigned flags, uint64_t user_data)
{
    if (flags & ~(unsigned)(VDK_REQ_FUA | VDK_REQ_MAY_UNMAP | VDK_REQ_NO_FALLBACK)) {
        return -EINVAL;
    }
    return queue_simple(q, VDK_OP_WRITE_ZEROES, offset, length, flags, NULL, user_data);
}

int
vdk_queue_block_status(VdkQueue *q, uint64_t offset, uint64_t length, VdkBlockStatus *out, uint64_t user_data)
{
    if (!out || length == 0) {
        return -EINVAL;
    }
    return queue_simple(q, VDK_OP_BLOCK_STATUS, offset, length, 0, out, user_data);
}

static int
queue_start_queued(VdkQueue *q)
{
    int n = 0;
    while (q->queued_head) {
        VdkRequest *r = q->queued_head;
        q->queued_head = r->next;
        if (!q->queued_head) {
            q->queued_tail = &q->queued_head;
        }
        r->next = NULL;
        q->unsubmitted--;
        vdk_request_start(r);
        n++;
    }
    return n;
}

int
vdk_queue_submit(VdkQueue *q)
{
    int n = queue_start_queued(q);
    queue_kick(q);
    return n;
}

/* Reap the engine and run everything that follows from it. */
static void
queue_process(VdkQueue *q)
{
    q->in_reap = true;
    for (;;) {
        int n = q->engine->reap(q->ctx);
        n += queue_run_deferred(q);
        vdk_queue_run_ready(q);
        n += queue_run_resumed(q);
        queue_kick(q);
        if (n == 0) {
            break;
        }
    }
    q->in_reap = false;
}

static int
queue_harvest(VdkQueue *q, VdkCompletion *out, unsigned max, bool clear_fd)
{
    if (clear_fd) {
        uint64_t v;
        if (read(q->efd, &v, sizeof(v)) < 0) {
            /* EAGAIN: nothing signalled; reap anyway. */
        }
    }
    queue_process(q);
    unsigned n = MIN(max, q->cq_count);
    for (unsigned i = 0; i < n; i++) {
        out[i] = q->cq[q->cq_head];
        q->cq_head = (q->cq_head + 1) % q->depth;
    }
    q->cq_count -= n;
    q->outstanding -= n;
    if (q->cq_count > 0 && clear_fd) {
        /* The caller asked for fewer than are ready: keep the fd readable. */
        vdk_io_eventfd_signal(q->efd);
    }
    return (int)n;
}

int
vdk_queue_reap(VdkQueue *q, VdkCompletion *out, unsigned max)
{
    return queue_harvest(q, out, max, !queue_engine_waits(q));
}

static int64_t
now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int
vdk_queue_wait(VdkQueue *q, VdkCompletion *out, unsigned max, unsigned min, int timeout_ms)
{
    unsigned total = 0;
    int64_t deadline = timeout_ms >= 0 ? now_ms() + timeout_ms : 0;
    if (min > max) {
        min = max;
    }
    for (;;) {
        total += (unsigned)vdk_queue_reap(q, out + total, max - total);
        if (total >= min || total >= max) {
            return (int)total;
        }
        if (queue_inflight(q) == 0 && q->cq_count == 0) {
            /* Nothing started can complete: waiting would hang. */
            return (int)total;
        }
        int wait = -1;
        if (timeout_ms >= 0) {
            int64_t left = deadline - now_ms();
            if (left <= 0) {
                return (int)total;
            }
            wait = (int)MIN(left, (int64_t)INT_MAX);
        }
        int r = queue_block(q, wait);
        if (r < 0) {
            return total > 0 ? (int)total : r;
        }
    }
}

int
vdk_queue_submit_and_wait(VdkQueue *q, VdkCompletion *out, unsigned max, unsigned min, int timeout_ms)
{
    if (queue_engine_waits(q) && !q->backlog_head && q->cq_count < min) {
        /* Start the requests but let the engine's wait send them: one
         * system call for submit and wait. */
        int n = queue_start_queued(q);
        if (n > 0 && q->cq_count < min && !q->backlog_head) {
            int r = q->engine->wait(q->ctx, timeout_ms);
            if (r < 0 && r != -ETIME) {
                queue_kick(q);
                return r;
            }
        }
        queue_kick(q);
        return vdk_queue_wait(q, out, max, min, timeout_ms);
    }
    vdk_queue_submit(q);
    return vdk_queue_wait(q, out, max, min, timeout_ms);
}

void
vdk_queue_free(VdkQueue *q)
{
    if (!q) {
        return;
    }
    /* Requests queued but never submitted are dropped. */
    while (q->queued_head) {
        VdkRequest *r = q->queued_head;
        q->queued_head = r->next;
        request_free(r);
        q->outstanding--;
        q->unsubmitted--;
    }
    q->queued_tail = &q->queued_head;
    /* Drain what is in flight. */
    while (queue_inflight(q) > 0 || q->backlog_head) {
        queue_process(q);
        if (queue_inflight(q) == 0 && !q->backlog_head) {
            break;
        }
        if (queue_block(q, 1000) < 0) {
            break;
        }
        uint64_t v;
        if (!queue_engine_waits(q) && read(q->efd, &v, sizeof(v)) < 0) {
            /* nothing signalled */
        }
    }
    q->engine->ctx_free(q->ctx);
    close(q->efd);
    while (q->free_internal) {
        VdkRequest *r = q->free_internal;
        q->free_internal = r->next;
        g_free(r);
    }
    vdk_queue_free_children(q);
    g_free(q->reqs);
    g_free(q->cq);
    g_mutex_clear(&q->wake_lock);
    g_atomic_int_dec_and_test(&q->img->queues);
    g_free(q);
}

/* ------------------------------------------------------------------------ */
/* Sync API                                                                  */
/* ------------------------------------------------------------------------ */

int
vdk_image_sync_request(VdkImage *img, VdkOp op, uint64_t offset, void *buf, uint64_t len, unsigned flags,
                       VdkBlockStatus *bs)
{
    int ret;
    g_mutex_lock(&img->sync_lock);
    if (!img->sync_q) {
        img->sync_q = vdk_queue_new(img, 8, NULL);
        if (!img->sync_q) {
            g_mutex_unlock(&img->sync_lock);
            return -ENOMEM;
        }
    }
    VdkQueue *q = img->sync_q;
    switch (op) {
    case VDK_OP_READ:
        ret = vdk_queue_read(q, offset, buf, (size_t)len, 0);
        break;
    case VDK_OP_WRITE:
        ret = vdk_queue_write(q, offset, buf, (size_t)len, flags, 0);
        break;
    case VDK_OP_FLUSH:
        ret = queue_simple(q, VDK_OP_FLUSH, 0, 0, flags & (VDK_FLUSH_FINAL | VDK_FLUSH_EVICT), NULL, 0);
        break;
    case VDK_OP_DISCARD:
        ret = queue_simple(q, VDK_OP_DISCARD, offset, len, flags & VDK_DISCARD_UNALLOC, NULL, 0);
        break;
    case VDK_OP_WRITE_ZEROES:
        ret = vdk_queue_write_zeroes(q, offset, len, flags, 0);
        break;
    case VDK_OP_BLOCK_STATUS:
        ret = vdk_queue_block_status(q, offset, len, bs, 0);
        break;
    default:
        ret = -EINVAL;
        break;
    }
    if (ret == 0) {
        VdkCompletion c;
        int n = vdk_queue_submit_and_wait(q, &c, 1, 1, -1);
        while (n == 0) {
            n = vdk_queue_wait(q, &c, 1, 1, -1);
        }
        ret = n < 0 ? n : (c.result < 0 ? (int)c.result : 0);
    }
    g_mutex_unlock(&img->sync_lock);
    return ret;
}

int
vdk_image_pread(VdkImage *img, void *buf, size_t len, uint64_t offset)
{
    return vdk_image_sync_request(img, VDK_OP_READ, offset, buf, len, 0, NULL);
}

int
vdk_image_pwrite(VdkImage *img, const void *buf, size_t len, uint64_t offset, unsigned flags)
{
    return vdk_image_sync_request(img, VDK_OP_WRITE, offset, (void *)buf, len, flags, NULL);
}

int
vdk_image_flush(VdkImage *img)
{
    return vdk_image_sync_request(img, VDK_OP_FLUSH, 0, NULL, 0, 0, NULL);
}

int
vdk_image_discard(VdkImage *img, uint64_t offset, uint64_t length)
{
    return vdk_image_sync_request(img, VDK_OP_DISCARD, offset, NULL, length, 0, NULL);
}

int
vdk_image_write_zeroes(VdkImage *img, uint64_t offset, uint64_t length, unsigned flags)
{
    return vdk_image_sync_request(img, VDK_OP_WRITE_ZEROES, offset, NULL, length, flags, NULL);
}

int
vdk_image_block_status(VdkImage *img, uint64_t offset, uint64_t length, VdkBlockStatus *out)
{
    return vdk_image_sync_request(img, VDK_OP_BLOCK_STATUS, offset, NULL, length, 0, out);
}
