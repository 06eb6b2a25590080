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
    int err = fault_check(req);
    if (err) {
        req->result = err;
        req->next = NULL;
        *ctx->failed_tail = req;
        ctx->failed_tail = &req->next;
        vdk_io_eventfd_signal(ctx->efd);
        return 0;
    }
    return ctx->inner->queue(ctx->ictx, req);
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
