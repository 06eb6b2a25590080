/* SPDX-License-Identifier: MIT */
/*
 * test-copy.c - the convert pipeline (vdk_copy), once per engine and cache
 * mode: content copied exactly, holes never read and never allocated in a
 * fresh target, zero runs detected at the -S granularity, -S 0 fully
 * allocating, several sources concatenated, ordered writes, a target too
 * small refused, cancellation through the progress callback.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/block.h"
#include "testutil.h"

#define SRC_SIZE (16u << 20)

/* A sparse source: random data in a few places, explicit zero blocks in
 * others (allocated zeroes, which zero detection should skip). */
static char *
make_source(const char *name, uint64_t size, uint64_t seed, uint8_t **model_out)
{
    char *p = test_path(name);
    test_make_sparse(p, size);
    uint8_t *model = g_malloc0(size);
    VdkImage *img = test_open(p, "raw", NULL, false);
    static const struct {
        uint64_t off, len;
        bool zero;
    } runs[] = {
        {0, 4096, false},
        {1 << 20, 300000, false},
        {3 << 20, 1 << 20, true}, /* allocated zeroes */
        {5 << 20, 12345, false},
        {(5 << 20) + 65536, 65536, true},
        {(8 << 20) + 1000, 3000, false},
    };
    for (size_t i = 0; i < G_N_ELEMENTS(runs); i++) {
        if (runs[i].off + runs[i].len > size) {
            continue;
        }
        uint8_t *buf = g_malloc0(runs[i].len);
        if (!runs[i].zero) {
            test_fill_random(buf, runs[i].len, &seed);
        }
        g_assert_cmpint(vdk_image_pwrite(img, buf, runs[i].len, runs[i].off, 0), ==, 0);
        memcpy(model + runs[i].off, buf, runs[i].len);
        g_free(buf);
    }
    /* data at the very end too */
    uint8_t tail[700];
    test_fill_random(tail, sizeof(tail), &seed);
    g_assert_cmpint(vdk_image_pwrite(img, tail, sizeof(tail), size - sizeof(tail), 0), ==, 0);
    memcpy(model + size - sizeof(tail), tail, sizeof(tail));
    vdk_image_close(img, NULL);
    *model_out = model;
    return p;
}

static VdkImage *
make_target(const char *name, uint64_t size, const TestVariant *v)
{
    char *p = test_path(name);
    unlink(p);
    test_make_sparse(p, size);
    VdkImage *img = test_open(p, "raw", v, false);
    g_free(p);
    return img;
}

static void
check_file(const char *name, const uint8_t *model, uint64_t size)
{
    char *p = test_path(name);
    GBytes *b = test_read_file(p);
    g_assert_cmpuint(g_bytes_get_size(b), ==, size);
    g_assert_cmpmem(g_bytes_get_data(b, NULL), size, model, size);
    g_bytes_unref(b);
    g_free(p);
}

static void
test_sparse_copy(const TestVariant *v)
{
    uint8_t *model;
    char *src_path = make_source("src.raw", SRC_SIZE, 1, &model);
    VdkImage *src = test_open(src_path, "raw", v, true);
    VdkImage *dst = make_target("dst.raw", SRC_SIZE, v);
    GError *err = NULL;
    VdkCopyParams p = {
        .src = &src, .nsrc = 1, .dst = dst, .sparse_size = 4096, .target_is_zero = true, .flush = true,
    };
    g_assert_true(vdk_copy(&p, &err));
    g_assert_no_error(err);
    vdk_image_close(dst, NULL);
    vdk_image_close(src, NULL);
    check_file("dst.raw", model, SRC_SIZE);
    /* Only data is allocated: the 1 MiB of explicit zeroes and the holes
     * are not (4 KiB granules around the unaligned runs aside). */
    char *dp = test_path("dst.raw");
    uint64_t data = 4096 + 300000 + 12345 + 3000 + 700;
    g_assert_cmpuint(test_allocated(dp), <=, data + 10 * 4096);
    g_assert_cmpuint(test_allocated(dp), >=, data);
    g_free(dp);
    g_free(model);
    g_free(src_path);
}

static void
test_no_sparse(const TestVariant *v)
{
    uint8_t *model;
    char *src_path = make_source("src0.raw", 4u << 20, 2, &model);
    VdkImage *src = test_open(src_path, "raw", v, true);
    VdkImage *dst = make_target("dst0.raw", 4u << 20, v);
    GError *err = NULL;
    VdkCopyParams p = {.src = &src, .nsrc = 1, .dst = dst, .sparse_size = 0, .target_is_zero = true};
    g_assert_true(vdk_copy(&p, &err));
    vdk_image_close(dst, NULL);
    vdk_image_close(src, NULL);
    check_file("dst0.raw", model, 4u << 20);
    char *dp = test_path("dst0.raw");
    /* -S 0: everything allocated */
    g_assert_cmpuint(test_allocated(dp), >=, 4u << 20);
    g_free(dp);
    g_free(model);
    g_free(src_path);
}

static void
test_existing_target(const TestVariant *v)
{
    /* A target full of garbage that is not known to be zero: holes in the
     * source must be written as zeroes. */
    uint8_t *model;
    char *src_path = make_source("src1.raw", 4u << 20, 3, &model);
    char *dp = test_path("dirty.raw");
    uint8_t *junk = g_malloc(4u << 20);
    memset(junk, 0xee, 4u << 20);
    g_assert_true(g_file_set_contents(dp, (char *)junk, 4u << 20, NULL));
    g_free(junk);
    VdkImage *src = test_open(src_path, "raw", v, true);
    VdkImage *dst = test_open(dp, "raw", v, false);
    GError *err = NULL;
    VdkCopyParams p = {.src = &src, .nsrc = 1, .dst = dst, .sparse_size = 4096, .in_order = true,
                       .max_inflight = 3, .chunk = 65536};
    g_assert_true(vdk_copy(&p, &err));
    vdk_image_close(dst, NULL);
    vdk_image_close(src, NULL);
    check_file("dirty.raw", model, 4u << 20);
    g_free(dp);
    g_free(model);
    g_free(src_path);
}

static void
test_concat(const TestVariant *v)
{
    uint8_t *m1, *m2;
    char *p1 = make_source("a.raw", 2u << 20, 4, &m1);
    char *p2 = make_source("b.raw", 9u << 20, 5, &m2);
    VdkImage *src[2] = {test_open(p1, "raw", v, true), test_open(p2, "raw", v, true)};
    VdkImage *dst = make_target("ab.raw", 11u << 20, v);
    GError *err = NULL;
    VdkCopyParams p = {.src = src, .nsrc = 2, .dst = dst, .sparse_size = 4096, .target_is_zero = true};
    g_assert_true(vdk_copy(&p, &err));
    vdk_image_close(dst, NULL);
    uint8_t *model = g_malloc(11u << 20);
    memcpy(model, m1, 2u << 20);
    memcpy(model + (2u << 20), m2, 9u << 20);
    check_file("ab.raw", model, 11u << 20);
    vdk_image_close(src[0], NULL);
    vdk_image_close(src[1], NULL);
    g_free(model);
    g_free(m1);
    g_free(m2);
    g_free(p1);
    g_free(p2);
}

static bool
cancel_after_some(void *opaque, uint64_t done, uint64_t total)
{
    unsigned *calls = opaque;
    (void)done;
    (void)total;
    return ++*calls < 3;
}

static void
test_errors(const TestVariant *v)
{
    uint8_t *model;
    char *src_path = make_source("src2.raw", 4u << 20, 6, &model);
    VdkImage *src = test_open(src_path, "raw", v, true);
    VdkImage *small = make_target("small.raw", 1u << 20, v);
    GError *err = NULL;
    VdkCopyParams p = {.src = &src, .nsrc = 1, .dst = small, .sparse_size = 4096};
    g_assert_false(vdk_copy(&p, &err));
    g_assert_error(err, VDK_ERROR, ENOSPC);
    g_clear_error(&err);
    vdk_image_close(small, NULL);

    VdkImage *dst = make_target("cancel.raw", 4u << 20, v);
    unsigned calls = 0;
    VdkCopyParams c = {.src = &src, .nsrc = 1, .dst = dst, .sparse_size = 4096, .chunk = 65536,
                       .max_inflight = 2, .progress = cancel_after_some, .opaque = &calls};
    g_assert_false(vdk_copy(&c, &err));
    g_assert_error(err, VDK_ERROR, ECANCELED);
    g_clear_error(&err);
    vdk_image_close(dst, NULL);
    vdk_image_close(src, NULL);
    g_free(model);
    g_free(src_path);
}

int
main(int argc, char **argv)
{
    test_init(&argc, &argv);
    test_add_variants("copy", "sparse", test_sparse_copy, NULL);
    test_add_variants("copy", "no-sparse", test_no_sparse, NULL);
    test_add_variants("copy", "existing-target", test_existing_target, NULL);
    test_add_variants("copy", "concatenate", test_concat, NULL);
    test_add_variants("copy", "errors", test_errors, NULL);
    return g_test_run();
}
