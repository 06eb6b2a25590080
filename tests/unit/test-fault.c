/* SPDX-License-Identifier: MIT */
/*
 * test-fault.c - errors reach the caller.  The fault engine wraps each real
 * engine and fails chosen requests: a failed read or write completes with
 * its errno (and only that request fails), ENOSPC is reported as ENOSPC, a
 * failed flush stays failed, and a conversion whose target fails reports
 * the error and offset.  A sweep fails every request of a workload in turn
 * and checks that each failure surfaces and nothing hangs.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "block/block.h"
#include "io/io.h"
#include "testutil.h"

static VdkImage *
open_fault(const char *path, const TestVariant *v, bool ro)
{
    GError *err = NULL;
    const VdkIoEngine *inner = vdk_io_engine_select(v->engine, NULL, &err);
    g_assert_no_error(err);
    vdk_io_fault_set_inner(inner);
    TestVariant fv = {"fault", v->cache};
    return test_open(path, "raw", &fv, ro);
}

static void
test_rw_errors(const TestVariant *v)
{
    char *p = test_path("fault.raw");
    test_make_sparse(p, 4 << 20);
    VdkImage *img = open_fault(p, v, false);
    uint8_t buf[8192];
    memset(buf, 0x61, sizeof(buf));

    vdk_io_fault_set(VDK_IO_WRITEV, 2, -EIO, false);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 4096, 0, 0), ==, 0);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 4096, 4096, 0), ==, -EIO);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 4096, 8192, 0), ==, 0);
    g_assert_cmpuint(vdk_io_fault_hits(), ==, 1);

    vdk_io_fault_set(VDK_IO_WRITEV, 1, -ENOSPC, false);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 100, 100000, 0), ==, -ENOSPC);

    vdk_io_fault_set(VDK_IO_READV, 1, -EIO, false);
    g_assert_cmpint(vdk_image_pread(img, buf, 4096, 0), ==, -EIO);
    g_assert_cmpint(vdk_image_pread(img, buf, 4096, 0), ==, 0);
    g_assert_cmpint(buf[0], ==, 0x61);

    /* An unaligned write under O_DIRECT is a read then a write: a failure of
     * either reaches the caller. */
    vdk_io_fault_set(-1, 1, -EIO, false);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 3000, 1000, 0), ==, -EIO);
    vdk_io_fault_set(-1, 2, -EIO, false);
    int r = vdk_image_pwrite(img, buf, 3000, 1000, 0);
    if (g_str_equal(v->cache, "none")) {
        g_assert_cmpint(r, ==, -EIO); /* RMW: the write after the read */
    } else {
        g_assert_cmpint(r, ==, 0); /* a single write, the rule never fired */
    }

    /* Failed write_zeroes (fallocate) */
    vdk_io_fault_set(VDK_IO_FALLOCATE, 1, -EIO, false);
    g_assert_cmpint(vdk_image_write_zeroes(img, 0, 65536, 0), ==, -EIO);
    vdk_io_fault_set(0, 0, 0, false);
    vdk_image_close(img, NULL);
    g_free(p);
}

static void
test_flush_sticky(const TestVariant *v)
{
    char *p = test_path("flush.raw");
    test_make_sparse(p, 1 << 20);
    VdkImage *img = open_fault(p, v, false);
    uint8_t buf[4096] = {1};
    g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), 0, 0), ==, 0);
    vdk_io_fault_set(VDK_IO_FDATASYNC, 1, -EIO, false);
    int expect = g_str_equal(v->cache, "unsafe") ? 0 : -EIO;
    g_assert_cmpint(vdk_image_flush(img), ==, expect);
    /* The rule fired once, but the image must not pretend later flushes
     * succeeded: the data of the failed one may be gone. */
    g_assert_cmpint(vdk_image_flush(img), ==, expect);
    g_assert_cmpint(vdk_image_flush(img), ==, expect);
    vdk_io_fault_set(0, 0, 0, false);
    vdk_image_close(img, NULL);
    /* A fresh open starts clean. */
    img = open_fault(p, v, false);
    g_assert_cmpint(vdk_image_flush(img), ==, 0);
    vdk_image_close(img, NULL);
    g_free(p);
}

static void
test_sweep(const TestVariant *v)
{
    char *p = test_path("sweep.raw");
    test_make_sparse(p, 1 << 20);
    /* A small workload through the async API: writes, reads, zeroes,
     * discard, flush.  Fail request number k, for every k. */
    for (uint64_t k = 1; k <= 40; k++) {
        VdkImage *img = open_fault(p, v, false);
        GError *err = NULL;
        VdkQueue *q = vdk_queue_new(img, 16, &err);
        g_assert_no_error(err);
        static uint8_t bufs[8][5000];
        vdk_io_fault_set(-1, k, -EIO, false);
        unsigned n = 0;
        for (int i = 0; i < 8; i++) {
            memset(bufs[i], i + 1, sizeof(bufs[i]));
            g_assert_cmpint(vdk_queue_write(q, (uint64_t)i * 70000 + 11, bufs[i], 5000, 0, n++), ==, 0);
        }
        g_assert_cmpint(vdk_queue_write_zeroes(q, 600000, 10000, 0, n++), ==, 0);
        g_assert_cmpint(vdk_queue_discard(q, 700000, 65536, n++), ==, 0);
        g_assert_cmpint(vdk_queue_flush(q, n++), ==, 0);
        vdk_queue_submit(q);
        VdkCompletion c[16];
        unsigned got = 0, failed = 0;
        while (got < n) {
            int m = vdk_queue_wait(q, c, 16, 1, 10000);
            g_assert_cmpint(m, >, 0); /* never hangs */
            for (int i = 0; i < m; i++) {
                if (c[i].result < 0) {
                    g_assert_cmpint(c[i].result, ==, -EIO);
                    failed++;
                }
            }
            got += (unsigned)m;
        }
        /* The failure surfaced if the rule fired (flush is skipped under
         * unsafe; a discard refusal would be swallowed, but the injected
         * error is EIO, not EOPNOTSUPP). */
        g_assert_cmpuint(failed, ==, vdk_io_fault_hits());
        vdk_io_fault_set(0, 0, 0, false);
        vdk_queue_free(q);
        vdk_image_close(img, NULL);
    }
    g_free(p);
}

static void
test_copy_error(const TestVariant *v)
{
    char *sp = test_path("csrc.raw");
    char *dp = test_path("cdst.raw");
    test_make_sparse(sp, 4 << 20);
    test_make_sparse(dp, 4 << 20);
    VdkImage *src = test_open(sp, "raw", NULL, false);
    uint8_t buf[65536];
    memset(buf, 0x77, sizeof(buf));
    for (int i = 0; i < 16; i++) {
        g_assert_cmpint(vdk_image_pwrite(src, buf, sizeof(buf), (uint64_t)i * 262144, 0), ==, 0);
    }
    VdkImage *dst = open_fault(dp, v, false);
    vdk_io_fault_set(VDK_IO_WRITEV, 5, -ENOSPC, false);
    GError *err = NULL;
    VdkCopyParams p = {.src = &src, .nsrc = 1, .dst = dst, .sparse_size = 4096, .target_is_zero = true,
                       .chunk = 65536, .max_inflight = 4, .flush = true};
    g_assert_false(vdk_copy(&p, &err));
    g_assert_error(err, VDK_ERROR, ENOSPC);
    g_assert_nonnull(strstr(err->message, "offset"));
    g_clear_error(&err);
    vdk_io_fault_set(0, 0, 0, false);
    vdk_image_close(dst, NULL);
    vdk_image_close(src, NULL);
    g_free(sp);
    g_free(dp);
}

int
main(int argc, char **argv)
{
    static const char *const caches[] = {"none", "writeback", "unsafe", NULL};
    test_init(&argc, &argv);
    test_add_variants("fault", "rw-errors", test_rw_errors, NULL);
    test_add_variants("fault", "flush-stays-failed", test_flush_sticky, caches);
    test_add_variants("fault", "sweep", test_sweep, NULL);
    test_add_variants("fault", "copy-error", test_copy_error, NULL);
    return g_test_run();
}
