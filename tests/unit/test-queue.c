/* SPDX-License-Identifier: MIT */
/*
 * test-queue.c - the public asynchronous API (vdk_queue_*) and the sync
 * calls on raw images, once per engine and cache mode: byte-granular I/O
 * (O_DIRECT included), many requests in flight against an in-memory model,
 * -EAGAIN at depth, completions only from reap, the eventfd contract,
 * bounds and read-only checks, write_zeroes/discard/flush/block status,
 * overlapping read-modify-writes, several queues on several threads.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/block.h"
#include "testutil.h"

#define IMG_SIZE (8u << 20)

static char *
make_image(const char *name, uint64_t size)
{
    char *p = test_path(name);
    test_make_sparse(p, size);
    return p;
}

static bool
fd_readable(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) == 1;
}

/* Reap exactly @n completions, polling the eventfd. */
static void
reap_n(VdkQueue *q, VdkCompletion *out, unsigned n)
{
    unsigned got = 0;
    int fd = vdk_queue_get_fd(q);
    int spins = 0;
    while (got < n) {
        int r = vdk_queue_reap(q, out + got, n - got);
        g_assert_cmpint(r, >=, 0);
        got += (unsigned)r;
        if (got < n) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            g_assert_cmpint(poll(&p, 1, 10000), ==, 1);
        }
        g_assert_cmpint(++spins, <, 1000000);
    }
}

static void
test_roundtrip(const TestVariant *v)
{
    char *path = make_image("rt.raw", IMG_SIZE);
    VdkImage *img = test_open(path, "raw", v, false);
    GError *err = NULL;
    VdkQueue *q = vdk_queue_new(img, 32, &err);
    g_assert_no_error(err);
    uint64_t seed = 7;
    /* Byte-granular offsets and lengths, including the ones the issue names. */
    static const struct {
        uint64_t off, len;
    } cases[] = {
        {1000, 3000}, {0, 1}, {4095, 2}, {511, 513}, {65536, 65536}, {12345, 100000}, {IMG_SIZE - 7, 7},
    };
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        size_t len = (size_t)cases[i].len;
        uint8_t *w = g_malloc(len + 1);
        uint8_t *r = g_malloc(len + 1);
        test_fill_random(w + 1, len, &seed); /* +1: a misaligned buffer */
        g_assert_cmpint(vdk_queue_write(q, cases[i].off, w + 1, len, 0, 100 + i), ==, 0);
        g_assert_cmpint(vdk_queue_submit(q), ==, 1);
        VdkCompletion c;
        reap_n(q, &c, 1);
        g_assert_cmpuint(c.user_data, ==, 100 + i);
        g_assert_cmpint(c.result, ==, (int64_t)len);
        memset(r, 0, len + 1);
        g_assert_cmpint(vdk_queue_read(q, cases[i].off, r + 1, len, 200 + i), ==, 0);
        vdk_queue_submit(q);
        reap_n(q, &c, 1);
        g_assert_cmpuint(c.user_data, ==, 200 + i);
        g_assert_cmpint(c.result, ==, (int64_t)len);
        g_assert_cmpmem(r + 1, len, w + 1, len);
        g_free(w);
        g_free(r);
    }
    vdk_queue_free(q);
    g_assert_true(vdk_image_close(img, &err));
    /* What the file holds, read without vdk. */
    GBytes *b = test_read_file(path);
    g_assert_cmpuint(g_bytes_get_size(b), ==, IMG_SIZE);
    g_bytes_unref(b);
    g_free(path);
}

/* Random reads and writes, many in flight, against a model. */
static void
test_model(const TestVariant *v)
{
    char *path = make_image("model.raw", IMG_SIZE);
    VdkImage *img = test_open(path, "raw", v, false);
    GError *err = NULL;
    enum { DEPTH = 24, ROUNDS = 40 };
    VdkQueue *q = vdk_queue_new(img, DEPTH, &err);
    g_assert_no_error(err);
    uint8_t *model = g_malloc0(IMG_SIZE);
    uint64_t seed = 1234567;
    struct {
        uint64_t off;
        size_t len;
        uint8_t *alloc; /* what g_malloc returned */
        uint8_t *buf;   /* 0..2 bytes into it: misaligned on purpose */
        bool write;
    } ops[DEPTH];

    for (int round = 0; round < ROUNDS; round++) {
        /* Non-overlapping ranges within a round (overlapping concurrent
         * writes have no defined order), all sorts of alignments. */
        unsigned n = 1 + (unsigned)(test_rand(&seed) % DEPTH);
        uint64_t slot = IMG_SIZE / DEPTH;
        for (unsigned i = 0; i < n; i++) {
            uint64_t base = slot * i;
            uint64_t off = base + test_rand(&seed) % (slot / 2);
            size_t len = 1 + (size_t)(test_rand(&seed) % (slot / 2 - 1));
            if (test_rand(&seed) % 4 == 0) {
                off = vdk_align_down(off, 4096);
                len = (size_t)vdk_align_up(len, 4096);
            }
            ops[i].off = off;
            ops[i].len = len;
            ops[i].write = test_rand(&seed) % 2;
            ops[i].alloc = g_malloc(len + 3);
            uint8_t *b = ops[i].alloc + (test_rand(&seed) % 3);
            if (ops[i].write) {
                test_fill_random(b, len, &seed);
                memcpy(model + off, b, len);
                g_assert_cmpint(vdk_queue_write(q, off, b, len, 0, i), ==, 0);
            } else {
                g_assert_cmpint(vdk_queue_read(q, off, b, len, i), ==, 0);
            }
            ops[i].buf = b;
        }
        g_assert_cmpint(vdk_queue_pending(q), ==, n);
        vdk_queue_submit(q);
        VdkCompletion comps[DEPTH];
        reap_n(q, comps, n);
        g_assert_cmpint(vdk_queue_pending(q), ==, 0);
        bool seen[DEPTH] = {false};
        for (unsigned k = 0; k < n; k++) {
            unsigned i = (unsigned)comps[k].user_data;
            g_assert_cmpuint(i, <, n);
            g_assert_false(seen[i]);
            seen[i] = true;
            g_assert_cmpint(comps[k].result, ==, (int64_t)ops[i].len);
            if (!ops[i].write) {
                g_assert_cmpmem(ops[i].buf, ops[i].len, model + ops[i].off, ops[i].len);
            }
        }
        for (unsigned i = 0; i < n; i++) {
            g_free(ops[i].alloc);
        }
    }
    /* Whole-image check through the sync API. */
    uint8_t *all = g_malloc(IMG_SIZE);
    g_assert_cmpint(vdk_image_pread(img, all, IMG_SIZE, 0), ==, 0);
    g_assert_cmpmem(all, IMG_SIZE, model, IMG_SIZE);
    g_free(all);
    vdk_queue_free(q);
    g_assert_true(vdk_image_close(img, &err));
    GBytes *b = test_read_file(path);
    g_assert_cmpmem(g_bytes_get_data(b, NULL), IMG_SIZE, model, IMG_SIZE);
    g_bytes_unref(b);
    g_free(model);
    g_free(path);
}

static void
test_eagain_and_fd(const TestVariant *v)
{
    char *path = make_image("eagain.raw", IMG_SIZE);
    VdkImage *img = test_open(path, "raw", v, false);
    GError *err = NULL;
    VdkQueue *q = vdk_queue_new(img, 4, &err);
    g_assert_no_error(err);
    int fd = vdk_queue_get_fd(q);
    static uint8_t buf[4][4096];
    VdkCompletion c[4];
    /* Nothing queued: reap returns at once with nothing. */
    g_assert_cmpint(vdk_queue_reap(q, c, 4), ==, 0);
    for (int i = 0; i < 4; i++) {
        g_assert_cmpint(vdk_queue_read(q, (uint64_t)i * 4096, buf[i], 4096, i), ==, 0);
    }
    g_assert_cmpint(vdk_queue_read(q, 0, buf[0], 4096, 9), ==, -EAGAIN);
    /* Queued but not submitted: nothing happens, nothing to reap. */
    g_assert_cmpint(vdk_queue_reap(q, c, 4), ==, 0);
    g_assert_cmpint(vdk_queue_submit(q), ==, 4);
    /* Still full until reaped, even once complete. */
    g_assert_cmpint(vdk_queue_read(q, 0, buf[0], 4096, 9), ==, -EAGAIN);
    reap_n(q, c, 2);
    g_assert_cmpint(vdk_queue_pending(q), ==, 2);
    g_assert_cmpint(vdk_queue_read(q, 0, buf[0], 4096, 10), ==, 0);
    vdk_queue_submit(q);
    reap_n(q, c, 3);
    /* Everything reaped: the eventfd is not left readable. */
    g_assert_cmpint(vdk_queue_reap(q, c, 4), ==, 0);
    g_assert_false(fd_readable(fd));
    /* Reaping fewer than are ready keeps the fd readable. */
    for (int i = 0; i < 3; i++) {
        g_assert_cmpint(vdk_queue_read(q, 0, buf[i], 4096, i), ==, 0);
    }
    vdk_queue_submit(q);
    reap_n(q, c, 1);
    while (vdk_queue_pending(q) > 0) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        g_assert_cmpint(poll(&p, 1, 10000), ==, 1);
        g_assert_cmpint(vdk_queue_reap(q, c, 1), <=, 1);
    }
    vdk_queue_free(q);
    vdk_image_close(img, NULL);
    g_free(path);
}

static void
test_bounds_and_readonly(const TestVariant *v)
{
    char *path = make_image("bounds.raw", IMG_SIZE);
    VdkImage *img = test_open(path, "raw", v, false);
    GError *err = NULL;
    VdkQueue *q = vdk_queue_new(img, 8, &err);
    uint8_t buf[512];
    g_assert_cmpint(vdk_queue_read(q, IMG_SIZE - 100, buf, 512, 0), ==, -EINVAL);
    g_assert_cmpint(vdk_queue_write(q, IMG_SIZE, buf, 1, 0, 0), ==, -ENOSPC);
    g_assert_cmpint(vdk_queue_write_zeroes(q, UINT64_MAX - 10, 100, 0, 0), ==, -ENOSPC);
    g_assert_cmpint(vdk_queue_discard(q, 0, IMG_SIZE + 1, 0), ==, -ENOSPC);
    g_assert_cmpint(vdk_queue_write(q, 0, buf, 1, 0x100, 0), ==, -EINVAL);
    g_assert_cmpint(vdk_queue_readv(q, 0, NULL, 2, 0), ==, -EINVAL);
    g_assert_cmpint(vdk_queue_block_status(q, 0, 0, NULL, 0), ==, -EINVAL);
    /* zero-length requests are fine */
    g_assert_cmpint(vdk_queue_read(q, 0, buf, 0, 5), ==, 0);
    VdkCompletion c;
    vdk_queue_submit(q);
    reap_n(q, &c, 1);
    g_assert_cmpint(c.result, ==, 0);
    vdk_queue_free(q);
    vdk_image_close(img, NULL);

    img = test_open(path, "raw", v, true);
    g_assert_true(vdk_image_is_read_only(img));
    q = vdk_queue_new(img, 8, &err);
    g_assert_cmpint(vdk_queue_write(q, 0, buf, 1, 0, 0), ==, -EROFS);
    g_assert_cmpint(vdk_queue_discard(q, 0, 512, 0), ==, -EROFS);
    g_assert_cmpint(vdk_queue_write_zeroes(q, 0, 512, 0, 0), ==, -EROFS);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 1, 0, 0), ==, -EROFS);
    g_assert_cmpint(vdk_image_pread(img, buf, 512, 0), ==, 0);
    g_assert_cmpint(vdk_image_flush(img), ==, 0);
    vdk_queue_free(q);
    vdk_image_close(img, NULL);
    g_free(path);
}

static void
test_zero_discard_status(const TestVariant *v)
{
    char *path = make_image("zero.raw", IMG_SIZE);
    VdkImage *img = test_open(path, "raw", v, false);
    uint8_t *buf = g_malloc(1 << 20);
    memset(buf, 0xaa, 1 << 20);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 1 << 20, 1 << 20, 0), ==, 0);
    g_assert_cmpint(vdk_image_flush(img), ==, 0);

    VdkBlockStatus bs;
    g_assert_cmpint(vdk_image_block_status(img, 0, IMG_SIZE, &bs), ==, 0);
    g_assert_cmpuint(bs.offset, ==, 0);
    g_assert_cmpuint(bs.length, ==, 1 << 20);
    g_assert_cmpuint(bs.flags, ==, VDK_BS_ZERO | VDK_BS_ALLOCATED | VDK_BS_OFFSET_VALID);
    g_assert_cmpint(vdk_image_block_status(img, 1 << 20, IMG_SIZE - (1 << 20), &bs), ==, 0);
    g_assert_cmpuint(bs.length, ==, 1 << 20);
    g_assert_cmpuint(bs.flags, ==, VDK_BS_DATA | VDK_BS_ALLOCATED | VDK_BS_OFFSET_VALID);
    g_assert_cmpuint(bs.host_offset, ==, 1 << 20);
    g_assert_cmpint(bs.depth, ==, 0);

    /* write_zeroes in the middle, unaligned; may-unmap and not */
    g_assert_cmpint(vdk_image_write_zeroes(img, (1 << 20) + 1000, 5000, 0), ==, 0);
    g_assert_cmpint(vdk_image_write_zeroes(img, (1 << 20) + 100000, 200000, VDK_REQ_MAY_UNMAP), ==, 0);
    g_assert_cmpint(vdk_image_write_zeroes(img, (1 << 20) + 400000, 3, VDK_REQ_FUA), ==, 0);
    /* discard an aligned chunk */
    g_assert_cmpint(vdk_image_discard(img, (1 << 20) + 512 * 1024, 256 * 1024), ==, 0);
    g_assert_cmpint(vdk_image_pread(img, buf, 1 << 20, 1 << 20), ==, 0);
    for (size_t i = 0; i < (1 << 20); i++) {
        bool zero = (i >= 1000 && i < 6000) || (i >= 100000 && i < 300000) || (i >= 400000 && i < 400003) ||
                    (i >= 512 * 1024 && i < 768 * 1024);
        if (buf[i] != (zero ? 0 : 0xaa)) {
            g_error("byte %zu is 0x%02x, expected 0x%02x", i, buf[i], zero ? 0 : 0xaa);
        }
    }
    /* The discarded range is a hole again. */
    g_assert_cmpint(vdk_image_block_status(img, (1 << 20) + 512 * 1024, 4096, &bs), ==, 0);
    g_assert_true(bs.flags & VDK_BS_ZERO);
    vdk_image_close(img, NULL);
    g_free(buf);
    g_free(path);
}

static void
test_vectors(const TestVariant *v)
{
    char *path = make_image("vec.raw", IMG_SIZE);
    VdkImage *img = test_open(path, "raw", v, false);
    GError *err = NULL;
    VdkQueue *q = vdk_queue_new(img, 4, &err);
    uint64_t seed = 99;
    /* 40 segments of odd sizes and addresses, spanning block boundaries */
    enum { SEGS = 40 };
    struct iovec w[SEGS], r[SEGS];
    size_t total = 0;
    for (int i = 0; i < SEGS; i++) {
        size_t len = 1 + (size_t)(test_rand(&seed) % 5000);
        w[i].iov_base = g_malloc(len);
        r[i].iov_base = g_malloc0(len);
        w[i].iov_len = r[i].iov_len = len;
        test_fill_random(w[i].iov_base, len, &seed);
        total += len;
    }
    g_assert_cmpint(vdk_queue_writev(q, 777, w, SEGS, VDK_REQ_FUA, 1), ==, 0);
    vdk_queue_submit(q);
    VdkCompletion c;
    reap_n(q, &c, 1);
    g_assert_cmpint(c.result, ==, (int64_t)total);
    g_assert_cmpint(vdk_queue_readv(q, 777, r, SEGS, 2), ==, 0);
    vdk_queue_submit(q);
    reap_n(q, &c, 1);
    g_assert_cmpint(c.result, ==, (int64_t)total);
    for (int i = 0; i < SEGS; i++) {
        g_assert_cmpmem(r[i].iov_base, r[i].iov_len, w[i].iov_base, w[i].iov_len);
        g_free(w[i].iov_base);
        g_free(r[i].iov_base);
    }
    vdk_queue_free(q);
    vdk_image_close(img, NULL);
    g_free(path);
}

/* Writes that share O_DIRECT blocks without overlapping bytes, all in
 * flight together: each needs a read-modify-write of the same block, and
 * none may be lost. */
static void
test_rmw_same_block(const TestVariant *v)
{
    char *path = make_image("rmw.raw", IMG_SIZE);
    VdkImage *img = test_open(path, "raw", v, false);
    GError *err = NULL;
    enum { N = 32 };
    VdkQueue *q = vdk_queue_new(img, N, &err);
    static uint8_t bytes[N][100];
    for (int round = 0; round < 20; round++) {
        uint64_t base = (uint64_t)round * 8192 + 100;
        for (int i = 0; i < N; i++) {
            memset(bytes[i], (uint8_t)(round * N + i + 1), sizeof(bytes[i]));
            /* 32 x 100 bytes = 3200 bytes, within and across one 4 KiB block */
            g_assert_cmpint(vdk_queue_write(q, base + (uint64_t)i * 100, bytes[i], 100, 0, i), ==, 0);
        }
        vdk_queue_submit(q);
        VdkCompletion c[N];
        reap_n(q, c, N);
        for (int i = 0; i < N; i++) {
            g_assert_cmpint(c[i].result, ==, 100);
        }
        uint8_t back[N * 100];
        g_assert_cmpint(vdk_image_pread(img, back, sizeof(back), base), ==, 0);
        for (int i = 0; i < N; i++) {
            for (int k = 0; k < 100; k++) {
                g_assert_cmpint(back[i * 100 + k], ==, (uint8_t)(round * N + i + 1));
            }
        }
    }
    vdk_queue_free(q);
    vdk_image_close(img, NULL);
    g_free(path);
}

/* A raw file whose length is not a multiple of the O_DIRECT alignment (nor
 * of 512): like qemu, the disk is the next whole sector; writes below the
 * file's end must not grow it, a write into the last partial sector grows it
 * to exactly the end of that write, and the tail reads as zeroes. */
static void
test_unaligned_size(const TestVariant *v)
{
    char *path = make_image("odd.raw", 1000000);
    VdkImage *img = test_open(path, "raw", v, false);
    g_assert_cmpuint(vdk_image_get_size(img), ==, 1000448);
    uint8_t buf[3000];
    memset(buf, 0x42, sizeof(buf));
    g_assert_cmpint(vdk_image_pwrite(img, buf, 3000, 1000000 - 3000, 0), ==, 0);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 1, 1000000 - 1, 0), ==, 0);
    memset(buf, 0, sizeof(buf));
    g_assert_cmpint(vdk_image_pread(img, buf, 3000, 1000000 - 3000), ==, 0);
    for (int i = 0; i < 3000; i++) {
        g_assert_cmpint(buf[i], ==, 0x42);
    }
    struct stat st;
    g_assert_cmpint(stat(path, &st), ==, 0);
    g_assert_cmpint(st.st_size, ==, 1000000);
    /* the tail sector past the file's end */
    memset(buf, 0xff, sizeof(buf));
    g_assert_cmpint(vdk_image_pread(img, buf, 448, 1000000), ==, 0);
    g_assert_true(vdk_buffer_is_zero(buf, 448));
    memset(buf, 0x43, 100);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 100, 999990, 0), ==, 0);
    g_assert_cmpint(stat(path, &st), ==, 0);
    g_assert_cmpint(st.st_size, ==, 1000090);
    g_assert_cmpint(vdk_image_pread(img, buf, 200, 999990), ==, 0);
    for (int i = 0; i < 200; i++) {
        g_assert_cmpint(buf[i], ==, i < 100 ? 0x43 : 0);
    }
    vdk_image_close(img, NULL);
    g_free(path);
}

typedef struct {
    VdkImage *img;
    int id;
    const TestVariant *v;
} ThreadArg;

static gpointer
thread_worker(gpointer data)
{
    ThreadArg *a = data;
    GError *err = NULL;
    VdkQueue *q = vdk_queue_new(a->img, 8, &err);
    g_assert_no_error(err);
    /* Each thread owns a 1 MiB stripe; unaligned writes at stripe edges
     * share blocks with the neighbours' edges. */
    uint64_t base = (uint64_t)a->id << 20;
    uint8_t *w = g_malloc(1 << 20);
    uint8_t *r = g_malloc(1 << 20);
    memset(w, a->id + 1, 1 << 20);
    for (int i = 0; i < 16; i++) {
        g_assert_cmpint(vdk_queue_write(q, base + (uint64_t)i * 65536, w + i * 65536, 65536, 0, i), ==, 0);
        if (i % 4 == 3) {
            vdk_queue_submit(q);
            VdkCompletion c[4];
            reap_n(q, c, 4);
        }
    }
    g_assert_cmpint(vdk_queue_read(q, base, r, 1 << 20, 99), ==, 0);
    vdk_queue_submit(q);
    VdkCompletion c;
    reap_n(q, &c, 1);
    g_assert_cmpint(c.result, ==, 1 << 20);
    g_assert_cmpmem(r, 1 << 20, w, 1 << 20);
    vdk_queue_free(q);
    g_free(w);
    g_free(r);
    return NULL;
}

static void
test_threads(const TestVariant *v)
{
    char *path = make_image("threads.raw", IMG_SIZE);
    VdkImage *img = test_open(path, "raw", v, false);
    enum { T = 4 };
    GThread *t[T];
    ThreadArg a[T];
    for (int i = 0; i < T; i++) {
        a[i] = (ThreadArg){img, i, v};
        t[i] = g_thread_new("worker", thread_worker, &a[i]);
    }
    for (int i = 0; i < T; i++) {
        g_thread_join(t[i]);
    }
    vdk_image_close(img, NULL);
    g_free(path);
}

static void
test_wait_api(const TestVariant *v)
{
    char *path = make_image("wait.raw", IMG_SIZE);
    VdkImage *img = test_open(path, "raw", v, false);
    GError *err = NULL;
    VdkQueue *q = vdk_queue_new(img, 16, &err);
    static uint8_t buf[16][4096];
    for (int i = 0; i < 16; i++) {
        memset(buf[i], i, 4096);
        g_assert_cmpint(vdk_queue_write(q, (uint64_t)i * 4096, buf[i], 4096, 0, i), ==, 0);
    }
    VdkCompletion c[16];
    unsigned got = 0;
    int n = vdk_queue_submit_and_wait(q, c, 16, 1, -1);
    g_assert_cmpint(n, >=, 1);
    got += (unsigned)n;
    while (got < 16) {
        n = vdk_queue_wait(q, c + got, 16 - got, 16 - got, 5000);
        g_assert_cmpint(n, >, 0);
        got += (unsigned)n;
    }
    /* Nothing in flight: wait returns at once instead of hanging. */
    g_assert_cmpint(vdk_queue_wait(q, c, 16, 1, -1), ==, 0);
    g_assert_cmpint(vdk_queue_flush(q, 77), ==, 0);
    n = vdk_queue_submit_and_wait(q, c, 1, 1, 5000);
    g_assert_cmpint(n, ==, 1);
    g_assert_cmpuint(c[0].user_data, ==, 77);
    g_assert_cmpint(c[0].result, ==, 0);
    /* Block status through the queue */
    VdkBlockStatus bs;
    g_assert_cmpint(vdk_queue_block_status(q, 0, IMG_SIZE, &bs, 5), ==, 0);
    n = vdk_queue_submit_and_wait(q, c, 1, 1, 5000);
    g_assert_cmpint(n, ==, 1);
    g_assert_cmpint(c[0].result, ==, 0);
    g_assert_true(bs.flags & VDK_BS_DATA);
    g_assert_cmpuint(bs.length, ==, 16 * 4096);
    vdk_queue_free(q);
    vdk_image_close(img, NULL);
    g_free(path);
}

int
main(int argc, char **argv)
{
    static const char *const all_caches[] = {"none", "writeback", "writethrough", "directsync", "unsafe", NULL};
    test_init(&argc, &argv);
    test_add_variants("queue", "roundtrip", test_roundtrip, all_caches);
    test_add_variants("queue", "model", test_model, all_caches);
    test_add_variants("queue", "eagain-and-eventfd", test_eagain_and_fd, NULL);
    test_add_variants("queue", "bounds-and-read-only", test_bounds_and_readonly, NULL);
    test_add_variants("queue", "zero-discard-status", test_zero_discard_status, NULL);
    test_add_variants("queue", "vectors", test_vectors, NULL);
    test_add_variants("queue", "rmw-same-block", test_rmw_same_block, NULL);
    test_add_variants("queue", "unaligned-file-size", test_unaligned_size, NULL);
    test_add_variants("queue", "threads", test_threads, NULL);
    test_add_variants("queue", "wait", test_wait_api, NULL);
    return g_test_run();
}
