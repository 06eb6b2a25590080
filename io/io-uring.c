/* SPDX-License-Identifier: MIT */
/*
 * io-uring.c - the io_uring engine (liburing).
 *
 * One ring per queue.  queue() fills SQEs, submit() hands the whole batch to
 * the kernel with one io_uring_submit(), the ring's registered eventfd wakes
 * the owner, and reap() walks the CQ.  Short reads and writes are re-queued
 * from reap() onto an overflow list that the next submit() sends (the block
 * layer always submits after reaping), so the caller only ever sees whole
 * transfers.  Block-device ioctls, which io_uring cannot express here, go to
 * a one-thread worker pool signalling the same eventfd.
 *
 * The CQ must never overflow: the kernel then parks completions on an
 * internal list that only io_uring_enter(GETEVENTS) flushes, and the
 * eventfd signal for them may already have been consumed, so a caller
 * sleeping in poll() on the fd would wait forever.  queue() therefore
 * refuses (-EAGAIN) once the SQEs in flight would fill the CQ, and reap()
 * still flushes the kernel's list if the ring says it holds anything.
 */
#include "config.h"

#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

#include "io/io.h"
#include "vdk/vdk.h"

/* Ring size bounds: deeper queues share the ring (the block layer keeps a
 * backlog), and 4096 SQEs is liburing's usual ceiling for one ring. */
#define URING_MIN_ENTRIES 8
#define URING_MAX_ENTRIES 4096

/* user_data of the POLL_ADD watching the eventfd during wait(). */
#define URING_EFD_POLL ((uint64_t)1)

struct VdkIoCtx {
    struct io_uring ring;
    int efd;
    bool notify;
    bool efd_poll_armed;
    VdkIoReq *overflow_head, **overflow_tail;
    unsigned noverflow;
    unsigned inflight;   /* SQEs prepared whose CQE has not been reaped */
    unsigned cq_limit;   /* CQ entries: inflight never exceeds it */
    VdkIoWorkers *workers;
};

static bool
uring_available(GError **error)
{
    static gsize once;
    static int probe_err;
    if (g_once_init_enter(&once)) {
        struct io_uring ring;
        int r = io_uring_queue_init(2, &ring, 0);
        if (r == 0) {
            io_uring_queue_exit(&ring);
        }
        probe_err = r < 0 ? -r : 0;
        g_once_init_leave(&once, 1);
    }
    if (probe_err) {
        g_set_error(error, VDK_ERROR, probe_err, "io_uring: the kernel refused to set up a ring: %s",
                    g_strerror(probe_err));
        return false;
    }
    return true;
}

static VdkIoCtx *
uring_ctx_new(unsigned depth, int efd, GError **error)
{
    VdkIoCtx *ctx = g_new0(VdkIoCtx, 1);
    unsigned entries = URING_MIN_ENTRIES;
    while (entries < depth && entries < URING_MAX_ENTRIES) {
        entries *= 2;
    }
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    int r = io_uring_queue_init_params(entries, &ctx->ring, &p);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "io_uring: cannot set up a ring of %u entries: %s", entries,
                    g_strerror(-r));
        g_free(ctx);
        return NULL;
    }
    r = io_uring_register_eventfd(&ctx->ring, efd);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "io_uring: cannot register the eventfd: %s", g_strerror(-r));
        io_uring_queue_exit(&ctx->ring);
        g_free(ctx);
        return NULL;
    }
    ctx->efd = efd;
    ctx->cq_limit = p.cq_entries ? p.cq_entries : entries;
    ctx->notify = true;
    ctx->overflow_tail = &ctx->overflow_head;
    ctx->workers = vdk_io_workers_new(1, efd);
    return ctx;
}

static void
uring_ctx_free(VdkIoCtx *ctx)
{
    vdk_io_workers_free(ctx->workers);
    io_uring_queue_exit(&ctx->ring);
    g_free(ctx);
}

/* Fill one SQE for @req (continuing at req->done). false if the SQ is full. */
static bool
uring_prep(VdkIoCtx *ctx, VdkIoReq *req)
{
    /* one CQE slot stays for the eventfd POLL_ADD of wait() */
    if (ctx->inflight + 1 >= ctx->cq_limit) {
        return false;
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ctx->ring);
    if (!sqe) {
        return false;
    }
    ctx->inflight++;
    uint64_t off = req->offset + req->done;
    switch (req->op) {
    case VDK_IO_READV:
        if (req->iovcnt == 1) {
            io_uring_prep_read(sqe, req->fd, req->iov[0].iov_base, (unsigned)req->iov[0].iov_len, off);
        } else {
            io_uring_prep_readv(sqe, req->fd, req->iov, (unsigned)req->iovcnt, off);
        }
        sqe->rw_flags = (__kernel_rwf_t)req->rw_flags;
        break;
    case VDK_IO_WRITEV:
        if (req->iovcnt == 1) {
            io_uring_prep_write(sqe, req->fd, req->iov[0].iov_base, (unsigned)req->iov[0].iov_len, off);
        } else {
            io_uring_prep_writev(sqe, req->fd, req->iov, (unsigned)req->iovcnt, off);
        }
        sqe->rw_flags = (__kernel_rwf_t)req->rw_flags;
        break;
    case VDK_IO_FDATASYNC:
        io_uring_prep_fsync(sqe, req->fd, IORING_FSYNC_DATASYNC);
        break;
    case VDK_IO_FALLOCATE:
        io_uring_prep_fallocate(sqe, req->fd, req->mode, req->offset, req->len);
        break;
    default:
        io_uring_prep_nop(sqe);
        break;
    }
    io_uring_sqe_set_data(sqe, req);
    return true;
}

static int
uring_queue(VdkIoCtx *ctx, VdkIoReq *req)
{
    req->done = 0;
    req->preset_error = 0;
    if (req->op == VDK_IO_BLKDISCARD || req->op == VDK_IO_BLKZEROOUT) {
        vdk_io_workers_push(ctx->workers, req);
        return 0;
    }
    if (req->iovcnt > IOV_MAX && (req->op == VDK_IO_READV || req->op == VDK_IO_WRITEV)) {
        /* The kernel would refuse it; let a worker run it in pieces. */
        vdk_io_workers_push(ctx->workers, req);
        return 0;
    }
    if (ctx->overflow_head) {
        /* Keep order with what reap() re-queued. */
        return -EAGAIN;
    }
    return uring_prep(ctx, req) ? 0 : -EAGAIN;
}

static void
uring_overflow(VdkIoCtx *ctx, VdkIoReq *req)
{
    req->next = NULL;
    *ctx->overflow_tail = req;
    ctx->overflow_tail = &req->next;
    ctx->noverflow++;
}

/* Move re-queued requests into free SQEs, oldest first. */
static void
uring_drain_overflow(VdkIoCtx *ctx)
{
    while (ctx->overflow_head) {
        VdkIoReq *req = ctx->overflow_head;
        if (!uring_prep(ctx, req)) {
            break;
        }
        ctx->overflow_head = req->next;
        if (!ctx->overflow_head) {
            ctx->overflow_tail = &ctx->overflow_head;
        }
        ctx->noverflow--;
    }
}

static int
uring_submit(VdkIoCtx *ctx)
{
    int total = 0;
    vdk_io_workers_kick(ctx->workers);
    for (;;) {
        uring_drain_overflow(ctx);
        if (io_uring_sq_ready(&ctx->ring) == 0) {
            return total;
        }
        int r = io_uring_submit(&ctx->ring);
        if (r < 0) {
            if (r == -EINTR) {
                continue;
            }
            /* -EAGAIN / -EBUSY: kernel is out of resources or the CQ is
             * backed up; the SQEs stay in the ring for the next submit. */
            return total > 0 ? total : r;
        }
        total += r;
        if (!ctx->overflow_head) {
            return total;
        }
    }
}

static void
uring_complete_one(VdkIoCtx *ctx, VdkIoReq *req, int res)
{
    if (req->op == VDK_IO_READV || req->op == VDK_IO_WRITEV) {
        if (!vdk_io_rw_progress(req, res)) {
            uring_overflow(ctx, req);
            return;
        }
    } else if (res == -EINTR) {
        uring_overflow(ctx, req);
        return;
    } else {
        req->result = res;
    }
    req->complete(req);
}

static int
uring_reap(VdkIoCtx *ctx)
{
    int n = vdk_io_workers_reap(ctx->workers);
    for (;;) {
        VdkIoReq *reqs[64];
        int res[64];
        unsigned count = 0;
        unsigned head;
        struct io_uring_cqe *cqe;
        unsigned seen = 0;
        io_uring_for_each_cqe(&ctx->ring, head, cqe)
        {
            seen++;
            if (cqe->user_data == LIBURING_UDATA_TIMEOUT) {
                /* liburing's own timeout on kernels without EXT_ARG */
            } else if (cqe->user_data == URING_EFD_POLL) {
                ctx->inflight--;
                /* Someone signalled the eventfd while we slept: clear it
                 * (the queue looks at its wake lists after reaping). */
                uint64_t v;
                ctx->efd_poll_armed = false;
                if (read(ctx->efd, &v, sizeof(v)) < 0) {
                    /* already cleared */
                }
            } else {
                ctx->inflight--;
                reqs[count] = io_uring_cqe_get_data(cqe);
                res[count] = cqe->res;
                count++;
            }
            if (seen == G_N_ELEMENTS(reqs)) {
                break;
            }
        }
        if (seen == 0) {
            if (io_uring_cq_has_overflow(&ctx->ring) && io_uring_get_events(&ctx->ring) == 0 &&
                io_uring_cq_ready(&ctx->ring) > 0) {
                continue; /* completions the kernel had parked */
            }
            break;
        }
        io_uring_cq_advance(&ctx->ring, seen);
        for (unsigned i = 0; i < count; i++) {
            uring_complete_one(ctx, reqs[i], res[i]);
        }
        n += (int)count;
    }
    return n;
}

static void
uring_set_notify(VdkIoCtx *ctx, bool on)
{
    if (ctx->notify == on) {
        return;
    }
    /* IORING_CQ_EVENTFD_DISABLED lives in the shared CQ ring: no syscall.
     * Kernels before 5.8 lack it; notifications then stay on, which is
     * only slower. */
    if (io_uring_cq_eventfd_toggle(&ctx->ring, on) == 0) {
        ctx->notify = on;
    }
    if (on && io_uring_cq_ready(&ctx->ring) > 0) {
        /* Completions posted while notifications were off. */
        vdk_io_eventfd_signal(ctx->efd);
    }
}

static int
uring_wait(VdkIoCtx *ctx, int timeout_ms)
{
    vdk_io_workers_kick(ctx->workers);
    if (ctx->notify) {
        /* Every completion writes the eventfd, so a poll on it would fire
         * at once; wait for the CQ alone. */
    } else if (!ctx->efd_poll_armed) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ctx->ring);
        if (sqe) {
            io_uring_prep_poll_add(sqe, ctx->efd, POLLIN);
            sqe->user_data = URING_EFD_POLL;
            ctx->efd_poll_armed = true;
            ctx->inflight++;
        }
    }
    uring_drain_overflow(ctx);
    struct io_uring_cqe *cqe = NULL;
    int r;
    if (timeout_ms < 0) {
        r = io_uring_submit_and_wait(&ctx->ring, 1);
    } else {
        struct __kernel_timespec ts = {
            .tv_sec = timeout_ms / 1000,
            .tv_nsec = (long long)(timeout_ms % 1000) * 1000000,
        };
        r = io_uring_submit_and_wait_timeout(&ctx->ring, &cqe, 1, &ts, NULL);
    }
    if (r == -EINTR || r == -EAGAIN || r == -EBUSY) {
        return 0;
    }
    return r < 0 ? r : 0;
}

static unsigned
uring_queued(VdkIoCtx *ctx)
{
    return io_uring_sq_ready(&ctx->ring) + ctx->noverflow + vdk_io_workers_queued(ctx->workers);
}

const VdkIoEngine vdk_io_engine_uring = {
    .name = "io_uring",
    .available = uring_available,
    .ctx_new = uring_ctx_new,
    .ctx_free = uring_ctx_free,
    .queue = uring_queue,
    .submit = uring_submit,
    .reap = uring_reap,
    .queued = uring_queued,
    .wait = uring_wait,
    .set_notify = uring_set_notify,
};
