/* SPDX-License-Identifier: MIT */
/*
 * io-fault.c - the "fault" engine: wraps a real engine and fails chosen
 * requests, so tests can drive every error path (EIO on a read or write,
 * ENOSPC, a failed flush) through the same queue code as production.
 *
 * Rules are process-global (tests set them with vdk_io_fault_set()): fail
 * the Nth request of a kind counted from when the rule was set, optionally
 * every one after it too.  A failed request never reaches the inner engine;
 * its completion is delivered on the next reap, with the eventfd signalled,
 * like any other.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>

#include "io/io.h"
#include "vdk/vdk.h"

typedef struct {
    int op;          /* VdkIoOp, or -1 for any */
    uint64_t nth;    /* 1-based */
    int error;       /* negative errno */
    bool sticky;     /* keep failing after the first */
    uint64_t seen;
    bool active;
} FaultRule;

static GMutex fault_lock;
static FaultRule fault_rule;
static const VdkIoEngine *fault_inner;
static uint64_t fault_hits;

void
vdk_io_fault_set(int op, uint64_t nth, int error, bool sticky)
{
    g_mutex_lock(&fault_lock);
    fault_rule = (FaultRule){.op = op, .nth = nth, .error = error, .sticky = sticky, .active = nth > 0};
    fault_hits = 0;
    g_mutex_unlock(&fault_lock);
}

uint64_t
vdk_io_fault_hits(void)
{
    g_mutex_lock(&fault_lock);
    uint64_t h = fault_hits;
    g_mutex_unlock(&fault_lock);
    return h;
}

void
vdk_io_fault_set_inner(const VdkIoEngine *inner)
{
    g_mutex_lock(&fault_lock);
    fault_inner = inner;
    g_mutex_unlock(&fault_lock);
}

/* Should @req fail, and with what? */
static int
fault_check(const VdkIoReq *req)
{
    int err = 0;
    g_mutex_lock(&fault_lock);
    FaultRule *r = &fault_rule;
    if (r->active && (r->op < 0 || r->op == req->op)) {
        r->seen++;
        if (r->seen == r->nth || (r->sticky && r->seen > r->nth)) {
            err = r->error;
            fault_hits++;
        }
    }
    g_mutex_unlock(&fault_lock);
    return err;
}

/* ------------------------------------------------------------------------ */
/* Recording                                                                 */
/* ------------------------------------------------------------------------ */

static GMutex rec_lock;
static GPtrArray *rec_log;
static uint64_t rec_next_id;
static GHashTable *rec_paths; /* fd -> path, per recording */

typedef struct {
    VdkIoComplete *complete;
    void *opaque;
    uint64_t id;
} RecTramp;

static void
rec_free(gpointer p)
{
    VdkRecord *r = p;
    g_free(r->path);
    g_free(r->data);
    g_free(r);
}

void
vdk_io_record_start(void)
{
    g_mutex_lock(&rec_lock);
    if (rec_log) {
        g_ptr_array_unref(rec_log);
    }
    rec_log = g_ptr_array_new_with_free_func(rec_free);
    if (rec_paths) {
        g_hash_table_unref(rec_paths);
    }
    rec_paths = g_hash_table_new_full(g_direct_hash, g_direct_equal, NULL, g_free);
    g_mutex_unlock(&rec_lock);
}

GPtrArray *
vdk_io_record_stop(void)
{
    g_mutex_lock(&rec_lock);
    GPtrArray *log = rec_log;
    rec_log = NULL;
    if (rec_paths) {
        g_hash_table_unref(rec_paths);
        rec_paths = NULL;
    }
    g_mutex_unlock(&rec_lock);
    return log;
}

static VdkRecord *
rec_append(VdkRecKind kind, uint64_t id)
{
    VdkRecord *r = g_new0(VdkRecord, 1);
    r->kind = kind;
    r->id = id;
    g_ptr_array_add(rec_log, r);
    return r;
}

void
vdk_io_record_mark(uint64_t tag)
{
    g_mutex_lock(&rec_lock);
    if (rec_log) {
        rec_append(VDK_REC_MARK, tag);
    }
    g_mutex_unlock(&rec_lock);
}

static void
rec_complete(VdkIoReq *req)
{
    RecTramp *t = req->opaque;
    req->complete = t->complete;
    req->opaque = t->opaque;
    g_mutex_lock(&rec_lock);
    if (rec_log) {
        rec_append(VDK_REC_DONE, t->id)->result = req->result;
    }
    g_mutex_unlock(&rec_lock);
    g_free(t);
    req->complete(req);
}

static const char *
rec_path(int fd)
{
    char *path = g_hash_table_lookup(rec_paths, GINT_TO_POINTER(fd));
    if (!path) {
        char link[64];
        g_snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
        path = g_file_read_link(link, NULL);
        if (!path) {
            path = g_strdup("?");
        }
        g_hash_table_insert(rec_paths, GINT_TO_POINTER(fd), path);
    }
    return path;
}

/* Log @req (queued now) and route its completion through rec_complete(). */
static void
rec_queue(VdkIoReq *req)
{
    g_mutex_lock(&rec_lock);
    if (!rec_log || (req->op != VDK_IO_WRITEV && req->op != VDK_IO_FALLOCATE && req->op != VDK_IO_FDATASYNC)) {
        g_mutex_unlock(&rec_lock);
        return;
    }
    uint64_t id = ++rec_next_id;
    VdkRecord *r;
    if (req->op == VDK_IO_WRITEV) {
        r = rec_append(VDK_REC_WRITE, id);
        r->len = req->len;
        r->data = g_malloc(req->len ? req->len : 1);
        uint64_t at = 0;
        for (int i = 0; i < req->iovcnt && at < req->len; i++) {
            size_t n = (size_t)MIN((uint64_t)req->iov[i].iov_len, req->len - at);
            memcpy(r->data + at, req->iov[i].iov_base, n);
            at += n;
        }
    } else if (req->op == VDK_IO_FALLOCATE) {
        bool zeroing = req->mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE);
        r = rec_append(zeroing ? VDK_REC_ZERO : VDK_REC_ALLOC, id);
        r->len = req->len;
        r->keep_size = (req->mode & FALLOC_FL_KEEP_SIZE) != 0;
    } else {
        r = rec_append(VDK_REC_SYNC, id);
    }
    r->offset = req->offset;
    r->path = g_strdup(rec_path(req->fd));
    g_mutex_unlock(&rec_lock);
    RecTramp *t = g_new(RecTramp, 1);
    t->complete = req->complete;
    t->opaque = req->opaque;
    t->id = id;
    req->complete = rec_complete;
    req->opaque = t;
}

/* The inner engine refused @req (-EAGAIN: the caller retries): forget it. */
static void
rec_cancel(VdkIoReq *req)
{
    if (req->complete != rec_complete) {
        return;
    }
    RecTramp *t = req->opaque;
    req->complete = t->complete;
    req->opaque = t->opaque;
    g_mutex_lock(&rec_lock);
    for (guint i = rec_log ? rec_log->len : 0; i-- > 0;) {
        VdkRecord *r = rec_log->pdata[i];
        if (r->id == t->id && r->kind != VDK_REC_MARK && r->kind != VDK_REC_DONE) {
            g_ptr_array_remove_index(rec_log, i);
            break;
        }
    }
    g_mutex_unlock(&rec_lock);
    g_free(t);
}

struct VdkIoCtx {
    const VdkIoEngine *inner;
    VdkIoCtx *ictx;
    int efd;
    VdkIoReq *failed_head, **failed_tail;
};

static bool
fault_available(GError **error)
{
    (void)error;
    return true;
}

/* VDK_FAULT="OP:NTH:ERRNO[:sticky]", read once. */
static void
fault_from_env(void)
{
    static gsize once;
    if (!g_once_init_enter(&once)) {
        return;
    }
    const char *spec = g_getenv("VDK_FAULT");
    if (spec) {
        char **f = g_strsplit(spec, ":", 4);
        if (f[0] && f[1] && f[2]) {
            int op = -1;
            if (!strcmp(f[0], "read")) {
                op = VDK_IO_READV;
            } else if (!strcmp(f[0], "write")) {
                op = VDK_IO_WRITEV;
            } else if (!strcmp(f[0], "flush")) {
                op = VDK_IO_FDATASYNC;
            } else if (!strcmp(f[0], "fallocate")) {
                op = VDK_IO_FALLOCATE;
            }
            vdk_io_fault_set(op, g_ascii_strtoull(f[1], NULL, 10), -(int)g_ascii_strtoll(f[2], NULL, 10),
                             f[3] && !strcmp(f[3], "sticky"));
        }
        g_strfreev(f);
    }
    const char *inner = g_getenv("VDK_FAULT_INNER");
    if (inner) {
        const VdkIoEngine *e = vdk_io_engine_select(inner, NULL, NULL);
        if (e && e != &vdk_io_engine_fault) {
            vdk_io_fault_set_inner(e);
        }
    }
    g_once_init_leave(&once, 1);
}

static VdkIoCtx *
fault_ctx_new(unsigned depth, int efd, GError **error)
{
    fault_from_env();
    g_mutex_lock(&fault_lock);
    const VdkIoEngine *inner = fault_inner ? fault_inner : &vdk_io_engine_threads;
    g_mutex_unlock(&fault_lock);
    VdkIoCtx *ictx = inner->ctx_new(depth, efd, error);
    if (!ictx) {
        return NULL;
    }
    VdkIoCtx *ctx = g_new0(VdkIoCtx, 1);
    ctx->inner = inner;
    ctx->ictx = ictx;
    ctx->efd = efd;
    ctx->failed_tail = &ctx->failed_head;
    if (inner->set_notify) {
        inner->set_notify(ictx, true); /* the fault engine has no wait() */
    }
    return ctx;
}

static void
fault_ctx_free(VdkIoCtx *ctx)
{
    ctx->inner->ctx_free(ctx->ictx);
    g_free(ctx);
}

static int
fault_queue(VdkIoCtx *ctx, VdkIoReq *req)
{
    rec_queue(req);
    int err = fault_check(req);
    if (err) {
        req->result = err;
        req->next = NULL;
        *ctx->failed_tail = req;
        ctx->failed_tail = &req->next;
        vdk_io_eventfd_signal(ctx->efd);
        return 0;
    }
    int r = ctx->inner->queue(ctx->ictx, req);
    if (r < 0) {
        rec_cancel(req);
    }
    return r;
}

static int
fault_submit(VdkIoCtx *ctx)
{
    return ctx->inner->submit(ctx->ictx);
}

static int
fault_reap(VdkIoCtx *ctx)
{
    int n = 0;
    VdkIoReq *list = ctx->failed_head;
    ctx->failed_head = NULL;
    ctx->failed_tail = &ctx->failed_head;
    while (list) {
        VdkIoReq *req = list;
        list = req->next;
        req->next = NULL;
        req->complete(req);
        n++;
    }
    return n + ctx->inner->reap(ctx->ictx);
}

static unsigned
fault_queued(VdkIoCtx *ctx)
{
    return ctx->inner->queued(ctx->ictx);
}

const VdkIoEngine vdk_io_engine_fault = {
    .name = "fault",
    .available = fault_available,
    .ctx_new = fault_ctx_new,
    .ctx_free = fault_ctx_free,
    .queue = fault_queue,
    .submit = fault_submit,
    .reap = fault_reap,
    .queued = fault_queued,
};
