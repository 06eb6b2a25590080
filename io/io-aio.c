/* SPDX-License-Identifier: MIT */
/*
 * io-aio.c - the "native" engine (Linux AIO through libaio), qemu's
 * aio=native.
 *
 * One aio context per queue with every iocb bound to the queue's eventfd.
 * queue() collects iocbs into a batch that submit() sends with io_submit()
 * (which may take only part of it; the rest stays for the next submit).
 * Linux AIO is only asynchronous for O_DIRECT files: on a buffered file
 * io_submit() does the copy itself, which is correct but blocks, exactly as
 * with qemu.  fdatasync uses IOCB_CMD_FDSYNC (Linux 4.18+) and falls back to
 * a worker thread when the file refuses it; fallocate and block-device
 * ioctls, which Linux AIO cannot express, always run on that worker.
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <libaio.h>
#include <string.h>
#include <time.h>

#include "io/io.h"
#include "vdk/vdk.h"

#define AIO_MAX_EVENTS 4096

G_STATIC_ASSERT(sizeof(struct iocb) <= sizeof(((VdkIoReq *)0)->priv));

struct VdkIoCtx {
    io_context_t aio;
    int efd;
    unsigned depth;
    struct iocb **batch; /* iocbs queued, not yet accepted by io_submit */
    unsigned nbatch;
    unsigned inflight;
    struct io_event *events;
    VdkIoWorkers *workers;
    bool fdsync_unsupported;
};

static bool
aio_available(GError **error)
{
    static gsize once;
    static int probe_err;
    if (g_once_init_enter(&once)) {
        io_context_t c = 0;
        int r = io_setup(1, &c);
        if (r == 0) {
            io_destroy(c);
        }
        probe_err = r < 0 ? -r : 0;
        g_once_init_leave(&once, 1);
    }
    if (probe_err) {
        g_set_error(error, VDK_ERROR, probe_err, "native: the kernel refused io_setup: %s",
                    g_strerror(probe_err));
        return false;
    }
    return true;
}

static VdkIoCtx *
aio_ctx_new(unsigned depth, int efd, GError **error)
{
    VdkIoCtx *ctx = g_new0(VdkIoCtx, 1);
    ctx->depth = CLAMP(depth, 8, AIO_MAX_EVENTS);
    int r = io_setup((int)ctx->depth, &ctx->aio);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "native: io_setup(%u) failed: %s%s", ctx->depth, g_strerror(-r),
                    r == -EAGAIN ? " (fs.aio-max-nr exhausted?)" : "");
        g_free(ctx);
        return NULL;
    }
    ctx->efd = efd;
    ctx->batch = g_new0(struct iocb *, ctx->depth);
    ctx->events = g_new0(struct io_event, ctx->depth);
    ctx->workers = vdk_io_workers_new(1, efd);
    return ctx;
}

static void
aio_ctx_free(VdkIoCtx *ctx)
{
    vdk_io_workers_free(ctx->workers);
    io_destroy(ctx->aio);
    g_free(ctx->batch);
    g_free(ctx->events);
    g_free(ctx);
}

/* Build the iocb for @req (continuing at req->done) and add it to the batch. */
static void
aio_prep(VdkIoCtx *ctx, VdkIoReq *req)
{
    struct iocb *cb = (struct iocb *)req->priv.bytes;
    long long off = (long long)(req->offset + req->done);
    switch (req->op) {
    case VDK_IO_READV:
        io_prep_preadv2(cb, req->fd, req->iov, req->iovcnt, off, (int)req->rw_flags);
        break;
    case VDK_IO_WRITEV:
        io_prep_pwritev2(cb, req->fd, req->iov, req->iovcnt, off, (int)req->rw_flags);
        break;
    case VDK_IO_FDATASYNC:
        io_prep_fdsync(cb, req->fd);
        break;
    default:
        g_assert_not_reached();
    }
    cb->data = req;
    io_set_eventfd(cb, ctx->efd);
    ctx->batch[ctx->nbatch++] = cb;
}

static bool
aio_needs_worker(VdkIoCtx *ctx, VdkIoReq *req)
{
    switch (req->op) {
    case VDK_IO_READV:
    case VDK_IO_WRITEV:
        return req->iovcnt > IOV_MAX;
    case VDK_IO_FDATASYNC:
        return ctx->fdsync_unsupported;
    default:
        return true;
    }
}

static int
aio_queue(VdkIoCtx *ctx, VdkIoReq *req)
{
    req->done = 0;
    req->preset_error = 0;
    if (aio_needs_worker(ctx, req)) {
        vdk_io_workers_push(ctx->workers, req);
        return 0;
    }
    if (ctx->inflight + ctx->nbatch >= ctx->depth) {
        return -EAGAIN;
    }
    aio_prep(ctx, req);
    return 0;
}

static int
aio_submit(VdkIoCtx *ctx)
{
    vdk_io_workers_kick(ctx->workers);
    int total = 0;
    while (ctx->nbatch > 0) {
        int r = io_submit(ctx->aio, (long)ctx->nbatch, ctx->batch);
        if (r == -EINTR) {
            continue;
        }
        if (r < 0) {
            if (r == -EAGAIN) {
                return total;
            }
            /* The first iocb was refused outright (e.g. EINVAL for fdsync on
             * a file without aio fsync): hand it to the worker, which runs
             * it with the plain syscall, and go on with the rest. */
            VdkIoReq *req = ctx->batch[0]->data;
            if (req->op == VDK_IO_FDATASYNC && r == -EINVAL) {
                ctx->fdsync_unsupported = true;
                vdk_io_workers_push(ctx->workers, req);
            } else {
                /* Complete it with the error on the next reap. */
                req->preset_error = r;
                vdk_io_workers_push(ctx->workers, req);
            }
            vdk_io_workers_kick(ctx->workers);
            memmove(ctx->batch, ctx->batch + 1, (ctx->nbatch - 1) * sizeof(ctx->batch[0]));
            ctx->nbatch--;
            continue;
        }
        ctx->inflight += (unsigned)r;
        total += r;
        if ((unsigned)r < ctx->nbatch) {
            memmove(ctx->batch, ctx->batch + r, (ctx->nbatch - (unsigned)r) * sizeof(ctx->batch[0]));
        }
        ctx->nbatch -= (unsigned)r;
    }
    return total;
}

static void
aio_complete_one(VdkIoCtx *ctx, VdkIoReq *req, long res)
{
    if (req->op == VDK_IO_READV || req->op == VDK_IO_WRITEV) {
        if (!vdk_io_rw_progress(req, res)) {
            aio_prep(ctx, req);
            return;
        }
    } else if (req->op == VDK_IO_FDATASYNC && res == -EINVAL) {
        ctx->fdsync_unsupported = true;
        vdk_io_workers_push(ctx->workers, req);
        return;
    } else {
        req->result = res;
    }
    req->complete(req);
}

static int
aio_reap(VdkIoCtx *ctx)
{
    int n = vdk_io_workers_reap(ctx->workers);
    while (ctx->inflight > 0) {
        struct timespec zero = {0, 0};
        int r = io_getevents(ctx->aio, 0, (long)ctx->inflight, ctx->events, &zero);
        if (r == -EINTR) {
            continue;
        }
        if (r <= 0) {
            break;
        }
        ctx->inflight -= (unsigned)r;
        for (int i = 0; i < r; i++) {
            VdkIoReq *req = ctx->events[i].data;
            aio_complete_one(ctx, req, (long)ctx->events[i].res);
        }
        n += r;
    }
    return n;
}

static unsigned
aio_queued(VdkIoCtx *ctx)
{
    return ctx->nbatch + vdk_io_workers_queued(ctx->workers);
}

const VdkIoEngine vdk_io_engine_aio = {
    .name = "native",
    .available = aio_available,
    .ctx_new = aio_ctx_new,
    .ctx_free = aio_ctx_free,
    .queue = aio_queue,
    .submit = aio_submit,
    .reap = aio_reap,
    .queued = aio_queued,
};
