/* SPDX-License-Identifier: MIT */
/*
 * io-threads.c - the "threads" engine: preadv2/pwritev2 and friends on a
 * lazily grown pool of worker threads.  It works everywhere (buffered or
 * O_DIRECT files, kernels and containers that refuse io_uring), which makes
 * it the fallback of "auto".
 */
#include "config.h"

#include "io/io.h"

/* Up to this many blocking syscalls run at once per queue; beyond it,
 * requests wait in the pool's list.  qemu's pool allows 64 per AioContext;
 * 16 is enough to keep a local NVMe or the page cache busy and keeps thread
 * counts sane with many queues. */
#define THREADS_MAX_PER_QUEUE 16

struct VdkIoCtx {
    VdkIoWorkers *w;
};

static bool
threads_available(GError **error)
{
    (void)error;
    return true;
}

static VdkIoCtx *
threads_ctx_new(unsigned depth, int efd, GError **error)
{
    (void)error;
    VdkIoCtx *ctx = g_new0(VdkIoCtx, 1);
    ctx->w = vdk_io_workers_new(MIN(depth ? depth : 1, THREADS_MAX_PER_QUEUE), efd);
    return ctx;
}

static void
threads_ctx_free(VdkIoCtx *ctx)
{
    vdk_io_workers_free(ctx->w);
    g_free(ctx);
}

static int
threads_queue(VdkIoCtx *ctx, VdkIoReq *req)
{
    req->done = 0;
    req->preset_error = 0;
    vdk_io_workers_push(ctx->w, req);
    return 0;
}

static int
threads_submit(VdkIoCtx *ctx)
{
    return vdk_io_workers_kick(ctx->w);
}

static int
threads_reap(VdkIoCtx *ctx)
{
    return vdk_io_workers_reap(ctx->w);
}

static unsigned
threads_queued(VdkIoCtx *ctx)
{
    return vdk_io_workers_queued(ctx->w);
}

const VdkIoEngine vdk_io_engine_threads = {
    .name = "threads",
    .available = threads_available,
    .ctx_new = threads_ctx_new,
    .ctx_free = threads_ctx_free,
    .queue = threads_queue,
    .submit = threads_submit,
    .reap = threads_reap,
    .queued = threads_queued,
};
