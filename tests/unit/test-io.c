/* SPDX-License-Identifier: MIT */
/*
 * test-io.c - the engine contract, once per engine: batched submission,
 * completions only from reap (never inside queue or submit), eventfd
 * signalling, short reads at end of file zero-filled, errors reported as
 * -errno, full batches answered with -EAGAIN, fdatasync and fallocate.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "io/io.h"
#include "testutil.h"

typedef struct {
    const VdkIoEngine *eng;
    VdkIoCtx *ctx;
    int efd;
    unsigned completed;
    bool in_call; /* inside queue()/submit(): a completion now breaks the contract */
} Fix;

static const VdkIoEngine *
engine_by_name(const char *name)
{
    GError *err = NULL;
    const VdkIoEngine *e = vdk_io_engine_select(name, NULL, &err);
    g_assert_no_error(err);
    return e;
}

static void
fix_init(Fix *f, const TestVariant *v, unsigned depth)
{
    memset(f, 0, sizeof(*f));
    f->eng = engine_by_name(v->engine);
    f->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    g_assert_cmpint(f->efd, >=, 0);
    GError *err = NULL;
    f->ctx = f->eng->ctx_new(depth, f->efd, &err);
    g_assert_no_error(err);
    g_assert_nonnull(f->ctx);
    if (f->eng->set_notify) {
        f->eng->set_notify(f->ctx, true);
    }
}

static void
fix_free(Fix *f)
{
    f->eng->ctx_free(f->ctx);
    close(f->efd);
}

static void
on_complete(VdkIoReq *req)
{
    Fix *f = req->opaque;
    g_assert_false(f->in_call);
    f->completed++;
}

static void
fix_queue(Fix *f, VdkIoReq *req)
{
    req->complete = on_complete;
    req->opaque = f;
    f->in_call = true;
    int r = f->eng->queue(f->ctx, req);
    f->in_call = false;
    g_assert_cmpint(r, ==, 0);
}

static void
fix_submit(Fix *f)
{
    f->in_call = true;
    int r = f->eng->submit(f->ctx);
    f->in_call = false;
    g_assert_cmpint(r, >=, 0);
}

/* Wait on the eventfd until @n completions have been reaped. */
static void
fix_wait(Fix *f, unsigned n)
{
    int rounds = 0;
    while (f->completed < n) {
        struct pollfd p = {.fd = f->efd, .events = POLLIN};
        int r = poll(&p, 1, 10000);
        g_assert_cmpint(r, ==, 1); /* a completion must signal the eventfd */
        uint64_t v;
        g_assert_cmpint(read(f->efd, &v, sizeof(v)), ==, 8);
        f->eng->reap(f->ctx);
        if (f->eng->queued(f->ctx) > 0) {
            fix_submit(f); /* re-queued short transfers */
        }
        g_assert_cmpint(++rounds, <, 100000);
    }
}

static int
open_tmp(const char *name, int flags)
{
    char *p = test_path(name);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | flags, 0644);
    g_free(p);
    g_assert_cmpint(fd, >=, 0);
    return fd;
}

static void
prep_rw(VdkIoReq *r, VdkIoOp op, int fd, uint64_t off, struct iovec *iov, int cnt)
{
    memset(r, 0, sizeof(*r));
    r->op = op;
    r->fd = fd;
    r->offset = off;
    r->iov = iov;
    r->iovcnt = cnt;
    for (int i = 0; i < cnt; i++) {
        r->len += iov[i].iov_len;
    }
}

static void
test_batch_rw(const TestVariant *v)
{
    Fix f;
    fix_init(&f, v, 16);
    int fd = open_tmp("batch", 0);
    enum { N = 64, BS = 4096 };
    uint8_t *wbuf = g_malloc(N * BS);
    uint8_t *rbuf = g_malloc0(N * BS);
    uint64_t seed = 42;
    test_fill_random(wbuf, N * BS, &seed);

    /* 64 writes through a depth-16 context: queue until -EAGAIN, submit,
     * reap, continue. */
    VdkIoReq reqs[N];
    struct iovec iov[N];
    unsigned queued = 0;
    while (queued < N) {
        iov[queued].iov_base = wbuf + queued * BS;
        iov[queued].iov_len = BS;
        prep_rw(&reqs[queued], VDK_IO_WRITEV, fd, (uint64_t)queued * BS, &iov[queued], 1);
        reqs[queued].complete = on_complete;
        reqs[queued].opaque = &f;
        f.in_call = true;
        int r = f.eng->queue(f.ctx, &reqs[queued]);
        f.in_call = false;
        if (r == -EAGAIN) {
            fix_submit(&f);
            fix_wait(&f, f.completed + 1);
            continue;
        }
        g_assert_cmpint(r, ==, 0);
        queued++;
    }
    fix_submit(&f);
    fix_wait(&f, N);
    for (unsigned i = 0; i < N; i++) {
        g_assert_cmpint(reqs[i].result, ==, BS);
    }

    /* Read back with vectored reads of 2 segments each. */
    f.completed = 0;
    struct iovec riov[N][2];
    for (unsigned i = 0; i < N / 2; i++) {
        riov[i][0].iov_base = rbuf + i * 2 * BS;
        riov[i][0].iov_len = BS + 100;
        riov[i][1].iov_base = rbuf + i * 2 * BS + BS + 100;
        riov[i][1].iov_len = BS - 100;
        prep_rw(&reqs[i], VDK_IO_READV, fd, (uint64_t)i * 2 * BS, riov[i], 2);
        fix_queue(&f, &reqs[i]);
        if (i % 8 == 7) {
            fix_submit(&f);
            fix_wait(&f, i + 1);
        }
    }
    fix_submit(&f);
    fix_wait(&f, N / 2);
    for (unsigned i = 0; i < N / 2; i++) {
        g_assert_cmpint(reqs[i].result, ==, 2 * BS);
    }
    g_assert_cmpmem(rbuf, N * BS, wbuf, N * BS);
    close(fd);
    g_free(wbuf);
    g_free(rbuf);
    fix_free(&f);
}

static void
test_short_read_eof(const TestVariant *v)
{
    Fix f;
    fix_init(&f, v, 8);
    int fd = open_tmp("short", 0);
    g_assert_cmpint(pwrite(fd, "abcdefghij", 10, 0), ==, 10);
    uint8_t buf[100];
    memset(buf, 0xee, sizeof(buf));
    struct iovec iov = {buf, sizeof(buf)};
    VdkIoReq r;
    prep_rw(&r, VDK_IO_READV, fd, 0, &iov, 1);
    fix_queue(&f, &r);
    fix_submit(&f);
    fix_wait(&f, 1);
    /* The rest past end of file reads as zeroes and the request is whole. */
    g_assert_cmpint(r.result, ==, 100);
    g_assert_cmpmem(buf, 10, "abcdefghij", 10);
    for (int i = 10; i < 100; i++) {
        g_assert_cmpint(buf[i], ==, 0);
    }
    /* Entirely past end of file. */
    memset(buf, 0xee, sizeof(buf));
    iov.iov_base = buf;
    iov.iov_len = sizeof(buf);
    prep_rw(&r, VDK_IO_READV, fd, 1 << 20, &iov, 1);
    fix_queue(&f, &r);
    fix_submit(&f);
    fix_wait(&f, 2);
    g_assert_cmpint(r.result, ==, 100);
    for (int i = 0; i < 100; i++) {
        g_assert_cmpint(buf[i], ==, 0);
    }
    close(fd);
    fix_free(&f);
}

static void
test_errors(const TestVariant *v)
{
    Fix f;
    fix_init(&f, v, 8);
    char *p = test_path("ro");
    int wfd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0644);
    g_assert_cmpint(wfd, >=, 0);
    close(wfd);
    int rofd = open(p, O_RDONLY);
    g_assert_cmpint(rofd, >=, 0);
    g_free(p);
    char buf[512] = {0};
    struct iovec iov = {buf, sizeof(buf)};
    VdkIoReq r;
    prep_rw(&r, VDK_IO_WRITEV, rofd, 0, &iov, 1);
    fix_queue(&f, &r);
    fix_submit(&f);
    fix_wait(&f, 1);
    g_assert_cmpint(r.result, ==, -EBADF);

    /* A closed descriptor */
    VdkIoReq r2;
    prep_rw(&r2, VDK_IO_READV, 1000000, 0, &iov, 1);
    fix_queue(&f, &r2);
    fix_submit(&f);
    fix_wait(&f, 2);
    g_assert_cmpint(r2.result, ==, -EBADF);
    close(rofd);
    fix_free(&f);
}

static void
test_sync_and_fallocate(const TestVariant *v)
{
    Fix f;
    fix_init(&f, v, 8);
    int fd = open_tmp("falloc", 0);
    g_assert_cmpint(ftruncate(fd, 1 << 20), ==, 0);
    char buf[4096];
    memset(buf, 0x77, sizeof(buf));
    g_assert_cmpint(pwrite(fd, buf, sizeof(buf), 8192), ==, 4096);

    VdkIoReq r[3];
    memset(r, 0, sizeof(r));
    r[0].op = VDK_IO_FDATASYNC;
    r[0].fd = fd;
    r[1].op = VDK_IO_FALLOCATE;
    r[1].fd = fd;
    r[1].mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    r[1].offset = 8192;
    r[1].len = 4096;
    r[2].op = VDK_IO_NOP;
    for (int i = 0; i < 3; i++) {
        fix_queue(&f, &r[i]);
    }
    fix_submit(&f);
    fix_wait(&f, 3);
    for (int i = 0; i < 3; i++) {
        g_assert_cmpint(r[i].result, ==, 0);
    }
    g_assert_cmpint(pread(fd, buf, sizeof(buf), 8192), ==, 4096);
    for (int i = 0; i < 4096; i++) {
        g_assert_cmpint(buf[i], ==, 0);
    }
    close(fd);
    fix_free(&f);
}

static void
test_direct_io(const TestVariant *v)
{
    Fix f;
    fix_init(&f, v, 8);
    int fd = open_tmp("direct", O_DIRECT);
    void *buf = NULL;
    g_assert_cmpint(posix_memalign(&buf, 4096, 65536), ==, 0);
    memset(buf, 0x3c, 65536);
    struct iovec iov = {buf, 65536};
    VdkIoReq r;
    prep_rw(&r, VDK_IO_WRITEV, fd, 0, &iov, 1);
    fix_queue(&f, &r);
    fix_submit(&f);
    fix_wait(&f, 1);
    g_assert_cmpint(r.result, ==, 65536);
    /* A misaligned O_DIRECT transfer fails with -EINVAL (the block layer
     * above the engine is what makes these work). */
    struct iovec bad = {(char *)buf + 1, 511};
    prep_rw(&r, VDK_IO_READV, fd, 3, &bad, 1);
    fix_queue(&f, &r);
    fix_submit(&f);
    fix_wait(&f, 2);
    g_assert_cmpint(r.result, ==, -EINVAL);
    /* Short read at EOF with short_is_eof: zero-filled, not re-issued at a
     * misaligned offset. */
    g_assert_cmpint(ftruncate(fd, 4096 + 512), ==, 0);
    memset(buf, 0xff, 8192);
    iov.iov_base = buf;
    iov.iov_len = 8192;
    prep_rw(&r, VDK_IO_READV, fd, 0, &iov, 1);
    r.short_is_eof = true;
    fix_queue(&f, &r);
    fix_submit(&f);
    fix_wait(&f, 3);
    g_assert_cmpint(r.result, ==, 8192);
    g_assert_cmpint(((uint8_t *)buf)[4096 + 511], ==, 0x3c);
    g_assert_cmpint(((uint8_t *)buf)[4096 + 512], ==, 0);
    g_assert_cmpint(((uint8_t *)buf)[8191], ==, 0);
    free(buf);
    close(fd);
    fix_free(&f);
}

/* A burst submitted without reaping: the engine must refuse (-EAGAIN)
 * before its completion queue could overflow (an io_uring CQ overflow
 * parks completions where only io_uring_enter sees them, and a caller
 * sleeping on the eventfd would wait forever), and everything it accepted
 * completes through the eventfd alone. */
static void
test_burst_no_reap(const TestVariant *v)
{
    Fix f;
    fix_init(&f, v, 8);
    int fd = open_tmp("burst", 0);
    enum { N = 256, BS = 4096 };
    uint8_t *buf = g_malloc(BS);
    memset(buf, 0x6d, BS);
    VdkIoReq *reqs = g_new0(VdkIoReq, N);
    struct iovec iov = {buf, BS};
    unsigned accepted = 0;
    while (accepted < N) {
        prep_rw(&reqs[accepted], VDK_IO_WRITEV, fd, (uint64_t)accepted * BS, &iov, 1);
        reqs[accepted].complete = on_complete;
        reqs[accepted].opaque = &f;
        f.in_call = true;
        int r = f.eng->queue(f.ctx, &reqs[accepted]);
        f.in_call = false;
        if (r == -EAGAIN) {
            break;
        }
        g_assert_cmpint(r, ==, 0);
        accepted++;
        fix_submit(&f);
        g_usleep(200); /* let it complete, unreaped */
    }
    g_assert_cmpuint(accepted, >, 0);
    fix_wait(&f, accepted);
    g_assert_cmpuint(f.completed, ==, accepted);
    for (unsigned i = 0; i < accepted; i++) {
        g_assert_cmpint(reqs[i].result, ==, BS);
    }
    g_free(reqs);
    g_free(buf);
    close(fd);
    fix_free(&f);
}

static void
test_select(void)
{
    char *reason = NULL;
    GError *err = NULL;
    const VdkIoEngine *e = vdk_io_engine_select("auto", &reason, &err);
    g_assert_no_error(err);
    g_assert_nonnull(e);
    g_assert_nonnull(reason);
    g_free(reason);
    g_assert_null(vdk_io_engine_select("bogus", NULL, &err));
    g_assert_error(err, VDK_ERROR, EINVAL);
    g_assert_nonnull(strstr(err->message, "'bogus'"));
    g_clear_error(&err);
    e = vdk_io_engine_select("threads", NULL, &err);
    g_assert_no_error(err);
    g_assert_cmpstr(e->name, ==, "threads");
}

int
main(int argc, char **argv)
{
    static const char *const buffered[] = {"writeback", NULL};
    test_init(&argc, &argv);
    g_test_add_func("/io/select", test_select);
    test_add_variants("io", "batch-rw", test_batch_rw, buffered);
    test_add_variants("io", "burst-no-reap", test_burst_no_reap, buffered);
    test_add_variants("io", "short-read-eof", test_short_read_eof, buffered);
    test_add_variants("io", "errors", test_errors, buffered);
    test_add_variants("io", "sync-and-fallocate", test_sync_and_fallocate, buffered);
    test_add_variants("io", "direct", test_direct_io, buffered);
    return g_test_run();
}
