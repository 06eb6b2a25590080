/* SPDX-License-Identifier: MIT */
/*
 * test-qcow2.c - the qcow2 driver.
 *
 *   model        thousands of random reads, writes, zero writes and
 *                discards with many requests in flight, compared with an
 *                in-memory model after every flush and after reopening;
 *                the image then passes vdk's check with no errors or leaks.
 *                Once per engine and cache mode, and in variants: small
 *                caches (evictions and writebacks mid-workload), extended L2
 *                over a backing file, lazy refcounts, version 2, 512-byte
 *                clusters with 1-bit refcounts.
 *   header/...   every header field the driver validates, broken one at a
 *                time: the open fails with an error naming the field.
 *   runtime-corruption  an L2 entry pointing into the header fails the
 *                read with EIO and marks the image corrupt; writes are
 *                refused; the image reopens read-only only.
 *   compressed-packing  compressed data fills the free tails of earlier
 *                packing clusters, never one freed at a flush.
 *   crash        a writer killed with SIGKILL at random moments: the image
 *                has no corruption (leaks allowed) and every write completed
 *                before the last completed flush reads back.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "block/block.h"
#include "formats/qcow2/qcow2.h"
#include "testutil.h"

#define MODEL_SIZE (24u << 20)

static void
create_qcow2(const char *path, uint64_t size, const char *opts, const char *backing)
{
    GError *err = NULL;
    VdkCreateOptions *o = vdk_create_options_new("qcow2", &err);
    g_assert_no_error(err);
    char *sz = g_strdup_printf("%" G_GUINT64_FORMAT, size);
    g_assert_true(vdk_create_options_set(o, "size", sz, &err));
    g_free(sz);
    if (opts && *opts) {
        char **kv = g_strsplit(opts, ",", -1);
        for (char **p = kv; *p; p++) {
            char **pair = g_strsplit(*p, "=", 2);
            if (!vdk_create_options_set(o, pair[0], pair[1], &err)) {
                g_error("option %s: %s", *p, err->message);
            }
            g_strfreev(pair);
        }
        g_strfreev(kv);
    }
    if (backing) {
        g_assert_true(vdk_create_options_set(o, "backing_file", backing, &err));
        g_assert_true(vdk_create_options_set(o, "backing_fmt", "raw", &err));
    }
    vdk_create_options_set_overwrite(o, true);
    if (!vdk_image_create(path, o, &err)) {
        g_error("create %s: %s", path, err->message);
    }
    vdk_create_options_free(o);
}

static VdkImage *
open_with(const char *path, const TestVariant *v, bool ro, const char *cache_opts)
{
    VdkOpenOptions *o = vdk_open_options_new();
    GError *err = NULL;
    vdk_open_options_set_format(o, "qcow2");
    vdk_open_options_set_read_only(o, ro);
    if (v) {
        g_assert_true(vdk_open_options_set_engine(o, v->engine, &err));
        g_assert_true(vdk_open_options_set_cache(o, v->cache, &err));
    }
    if (cache_opts) {
        char **kv = g_strsplit(cache_opts, ",", -1);
        for (char **p = kv; *p; p++) {
            char **pair = g_strsplit(*p, "=", 2);
            vdk_open_options_set(o, pair[0], pair[1]);
            g_strfreev(pair);
        }
        g_strfreev(kv);
    }
    VdkImage *img = vdk_image_open(path, o, &err);
    vdk_open_options_free(o);
    if (!img) {
        g_error("open %s: %s", path, err->message);
    }
    return img;
}

static void
check_image(VdkImage *img, bool allow_leaks)
{
    VdkCheckResult res;
    memset(&res, 0, sizeof(res));
    res.messages = g_ptr_array_new_with_free_func(g_free);
    GError *err = NULL;
    bool ok = img->top->drv->check(img->top, 0, &res, &err);
    if (!ok || res.corruptions || (res.leaks && !allow_leaks) || res.check_errors) {
        for (guint i = 0; i < res.messages->len; i++) {
            g_printerr("%s\n", (char *)res.messages->pdata[i]);
        }
        g_error("check: ok=%d corruptions=%" G_GUINT64_FORMAT " leaks=%" G_GUINT64_FORMAT " errors=%" G_GUINT64_FORMAT " %s",
                ok, res.corruptions, res.leaks, res.check_errors, err ? err->message : "");
    }
    g_ptr_array_unref(res.messages);
}

static void
check_clean(VdkImage *img)
{
    check_image(img, false);
}

static void
compare_image(VdkImage *img, const uint8_t *model, uint64_t size)
{
    uint8_t *buf = g_malloc(1 << 20);
    for (uint64_t off = 0; off < size; off += 1 << 20) {
        size_t n = (size_t)MIN((uint64_t)1 << 20, size - off);
        g_assert_cmpint(vdk_image_pread(img, buf, n, off), ==, 0);
        if (memcmp(buf, model + off, n) != 0) {
            for (size_t i = 0; i < n; i++) {
                if (buf[i] != model[off + i]) {
                    g_error("mismatch at %" G_GUINT64_FORMAT ": image 0x%02x model 0x%02x", off + i, buf[i],
                            model[off + i]);
                }
            }
        }
    }
    g_free(buf);
}

typedef struct {
    const char *create_opts;
    const char *open_opts;
    bool backing;
    unsigned rounds;
    uint64_t cluster;
} ModelCfg;

static void
run_model(const TestVariant *v, const ModelCfg *cfg)
{
    char *path = test_path("model.qcow2");
    char *bpath = test_path("model-base.raw");
    uint8_t *model = g_malloc0(MODEL_SIZE);
    uint64_t seed = 0x5eed + (uint64_t)cfg->rounds;
    if (cfg->backing) {
        /* a base with data in patches */
        test_make_sparse(bpath, MODEL_SIZE);
        VdkImage *b = test_open(bpath, "raw", NULL, false);
        for (uint64_t off = 0; off < MODEL_SIZE; off += 3 << 20) {
            uint64_t len = 1 << 20;
            test_fill_random(model + off, len, &seed);
            g_assert_cmpint(vdk_image_pwrite(b, model + off, len, off, 0), ==, 0);
        }
        vdk_image_close(b, NULL);
    }
    create_qcow2(path, MODEL_SIZE, cfg->create_opts, cfg->backing ? "model-base.raw" : NULL);
    VdkImage *img = open_with(path, v, false, cfg->open_opts);
    GError *err = NULL;
    enum { DEPTH = 16 };
    VdkQueue *q = vdk_queue_new(img, DEPTH, &err);
    g_assert_no_error(err);
    uint64_t cs = cfg->cluster ? cfg->cluster : 65536;
    struct {
        uint64_t off, len;
        int kind; /* 0 read, 1 write, 2 zero, 3 zero-unmap, 4 discard */
        uint8_t *buf;
    } ops[DEPTH];

    for (unsigned round = 0; round < cfg->rounds; round++) {
        /* non-overlapping ranges within a round */
        unsigned n = 1 + (unsigned)(test_rand(&seed) % DEPTH);
        uint64_t slot = MODEL_SIZE / DEPTH;
        for (unsigned i = 0; i < n; i++) {
            uint64_t base = slot * i;
            uint64_t off = base + test_rand(&seed) % (slot / 2);
            uint64_t len = 1 + test_rand(&seed) % (slot / 4);
            int kind = (int)(test_rand(&seed) % 10);
            kind = kind < 3 ? 0 : kind < 7 ? 1 : kind < 8 ? 2 : kind < 9 ? 3 : 4;
            if (test_rand(&seed) % 3 == 0) {
                off = vdk_align_down(off, cs);
                len = vdk_align_up(len, cs);
            }
            ops[i].off = off;
            ops[i].len = len;
            ops[i].kind = kind;
            ops[i].buf = NULL;
            int r = 0;
            switch (kind) {
            case 0:
                ops[i].buf = g_malloc(len);
                r = vdk_queue_read(q, off, ops[i].buf, len, i);
                break;
            case 1:
                ops[i].buf = g_malloc(len);
                test_fill_random(ops[i].buf, len, &seed);
                memcpy(model + off, ops[i].buf, len);
                r = vdk_queue_write(q, off, ops[i].buf, len, test_rand(&seed) % 8 == 0 ? VDK_REQ_FUA : 0, i);
                break;
            case 2:
            case 3:
                memset(model + off, 0, len);
                r = vdk_queue_write_zeroes(q, off, len, kind == 3 ? VDK_REQ_MAY_UNMAP : 0, i);
                break;
            case 4: {
                /* discard content is unspecified: only whole clusters, and
                 * the model learns what the image says afterwards */
                uint64_t a0 = vdk_align_up(off, cs), a1 = vdk_align_down(off + len, cs);
                if (a1 <= a0) {
                    a0 = vdk_align_down(off, cs);
                    a1 = a0 + cs;
                }
                ops[i].off = a0;
                ops[i].len = a1 - a0;
                r = vdk_queue_discard(q, a0, a1 - a0, i);
                break;
            }
            }
            g_assert_cmpint(r, ==, 0);
        }
        vdk_queue_submit(q);
        VdkCompletion c[DEPTH];
        unsigned got = 0;
        while (got < n) {
            int m = vdk_queue_wait(q, c + got, n - got, 1, 20000);
            g_assert_cmpint(m, >, 0);
            got += (unsigned)m;
        }
        for (unsigned k = 0; k < n; k++) {
            unsigned i = (unsigned)c[k].user_data;
            if (c[k].result < 0) {
                g_error("round %u op %u (kind %d, %" G_GUINT64_FORMAT "+%" G_GUINT64_FORMAT ") failed: %s", round, i,
                        ops[i].kind, ops[i].off, ops[i].len, g_strerror((int)-c[k].result));
            }
            if (ops[i].kind == 0) {
                g_assert_cmpmem(ops[i].buf, ops[i].len, model + ops[i].off, ops[i].len);
            }
        }
        for (unsigned i = 0; i < n; i++) {
            if (ops[i].kind == 4) {
                /* whatever the image reads now is the truth for the model */
                g_assert_cmpint(vdk_image_pread(img, model + ops[i].off, ops[i].len, ops[i].off), ==, 0);
            }
            g_free(ops[i].buf);
        }
        if (round % 25 == 24) {
            g_assert_cmpint(vdk_image_flush(img), ==, 0);
            compare_image(img, model, MODEL_SIZE);
        }
    }
    vdk_queue_free(q);
    g_assert_true(vdk_image_close(img, &err));
    g_assert_no_error(err);
    img = open_with(path, v, true, cfg->open_opts);
    compare_image(img, model, MODEL_SIZE);
    check_clean(img);
    vdk_image_close(img, NULL);
    g_free(model);
    g_free(path);
    g_free(bpath);
}

static void
test_model_default(const TestVariant *v)
{
    ModelCfg c = {.create_opts = NULL, .rounds = 150};
    run_model(v, &c);
}

static void
test_model_small_cache(const TestVariant *v)
{
    /* 4 KiB clusters, caches of a few slices: every workload evicts and
     * writes back in the middle of requests */
    ModelCfg c = {.create_opts = "cluster_size=4096",
                  .open_opts = "l2-cache-size=16K,refcount-cache-size=16K,l2-cache-entry-size=4K",
                  .rounds = 100,
                  .cluster = 4096};
    run_model(v, &c);
}

static void
test_model_extl2_backing(const TestVariant *v)
{
    ModelCfg c = {.create_opts = "extended_l2=on", .backing = true, .rounds = 120};
    run_model(v, &c);
}

static void
test_model_lazy(const TestVariant *v)
{
    ModelCfg c = {.create_opts = "lazy_refcounts=on", .rounds = 100};
    run_model(v, &c);
}

static void
test_model_v2(const TestVariant *v)
{
    ModelCfg c = {.create_opts = "compat=0.10,cluster_size=16384", .backing = true, .rounds = 100, .cluster = 16384};
    run_model(v, &c);
}

static void
test_model_tiny_clusters(const TestVariant *v)
{
    ModelCfg c = {.create_opts = "cluster_size=512,refcount_bits=1", .rounds = 60, .cluster = 512};
    run_model(v, &c);
}

/* ------------------------------------------------------------------------ */
/* Header corruption                                                         */
/* ------------------------------------------------------------------------ */

static void
put_be(uint8_t *p, int bytes, uint64_t v)
{
    for (int i = bytes - 1; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

typedef struct {
    const char *name;
    uint32_t off;
    int bytes;
    uint64_t value;
    const char *expect; /* substring of the error */
    uint32_t off2;      /* a second field to patch (0: none) */
    int bytes2;
    uint64_t value2;
} HeaderCase;

/* The first header extension (the feature table vdk writes) is at 112. */
#define EXT0 112

static const HeaderCase header_cases[] = {
    {"magic", 0, 4, 0x51464900, "magic"},
    {"version-1", 4, 4, 1, "version"},
    {"version-4", 4, 4, 4, "version"},
    {"cluster-bits-8", 20, 4, 8, "cluster_bits"},
    {"cluster-bits-22", 20, 4, 22, "cluster_bits"},
    {"cluster-bits-huge", 20, 4, 0xffffffff, "cluster_bits"},
    {"size-huge", 24, 8, 0xffffffffffffffffULL, "virtual size"},
    {"size-exceeds-l1", 24, 8, 1ULL << 40, "L1 table too small"},
    {"crypt-aes", 32, 4, 1, "AES"},
    {"crypt-luks", 32, 4, 2, "LUKS"},
    {"crypt-bad", 32, 4, 7, "crypt_method"},
    {"l1-size-huge", 36, 4, 0xffffffff, "L1 table too large"},
    {"l1-size-zero", 36, 4, 0, "L1 table too small"},
    {"l1-offset-unaligned", 40, 8, 0x30001, "L1 table offset"},
    {"l1-offset-header", 40, 8, 0, "L1 table offset"},
    {"l1-offset-huge", 40, 8, 0xffffffffffff0000ULL, "L1 table offset"},
    {"reftable-offset-unaligned", 48, 8, 0x10200, "refcount table offset"},
    {"reftable-offset-zero", 48, 8, 0, "refcount table offset"},
    {"reftable-clusters-zero", 56, 4, 0, "refcount table size"},
    {"reftable-clusters-huge", 56, 4, 0xffffffff, "refcount table size"},
    {"snapshots-many", 60, 4, 65537, "snapshots"},
    {"snapshots-offset-unaligned", 64, 8, 0x12345, "snapshot table offset"},
    {"incompat-unknown", 72, 8, 1ULL << 40, "bit 40"},
    {"incompat-data-file", 72, 8, 1ULL << 2, "external data file"},
    {"refcount-order-7", 96, 4, 7, "refcount_order"},
    {"header-length-small", 100, 4, 96, "header_length"},
    {"header-length-odd", 100, 4, 113, "header_length"},
    {"header-length-huge", 100, 4, 0x100000, "header_length"},
    {"compression-type-no-bit", 104, 1, 1, "compression_type"},
    {"backing-offset-beyond", 8, 8, 0x20000, "backing file name"},
    {"backing-length-huge", 16, 4, 5000, "backing file name"},
    {"compression-type-unknown", 72, 8, 1ULL << 3, "compression_type 2", 104, 1, 2},
    {"extl2-small-clusters", 72, 8, 1ULL << 4, "extended L2", 20, 4, 13},
    {"ext-length-past-header", EXT0 + 4, 4, 0x10000, "runs past the header"},
    {"ext-feature-table-length", EXT0 + 4, 4, 47, "feature name table"},
    {"ext-backing-format-long", EXT0, 4, 0xe2792aca, "backing format extension", EXT0 + 4, 4, 40},
    {"ext-bitmaps-short", EXT0, 4, 0x23852875, "bitmaps extension", EXT0 + 4, 4, 16},
    {"ext-crypto-unencrypted", EXT0, 4, 0x0537be77, "encryption header extension"},
    {"ext-data-file", EXT0, 4, 0x44415441, "external data file"},
    {"backing-name-nul", 8, 8, 600, "NUL", 16, 4, 4},
};

static void
test_header_case(gconstpointer data)
{
    const HeaderCase *hc = data;
    char *path = test_path("hdr.qcow2");
    create_qcow2(path, 64 << 20, NULL, NULL);
    int fd = open(path, O_RDWR);
    g_assert_cmpint(fd, >=, 0);
    uint8_t h[1024];
    g_assert_cmpint(pread(fd, h, sizeof(h), 0), ==, sizeof(h));
    put_be(h + hc->off, hc->bytes, hc->value);
    if (hc->off2) {
        put_be(h + hc->off2, hc->bytes2, hc->value2);
    }
    if (g_str_equal(hc->name, "backing-name-nul")) {
        memset(h + 600, 0, 4);
    }
    if (g_str_equal(hc->name, "backing-length-huge")) {
        put_be(h + 8, 8, 600); /* a backing file name offset, then the length */
    }
    g_assert_cmpint(pwrite(fd, h, sizeof(h), 0), ==, sizeof(h));
    close(fd);
    struct stat before;
    g_assert_cmpint(stat(path, &before), ==, 0);
    GBytes *content = test_read_file(path);
    for (int ro = 1; ro >= 0; ro--) {
        VdkOpenOptions *o = vdk_open_options_new();
        vdk_open_options_set_format(o, "qcow2");
        vdk_open_options_set_read_only(o, ro);
        GError *err = NULL;
        VdkImage *img = vdk_image_open(path, o, &err);
        vdk_open_options_free(o);
        if (img) {
            g_error("%s: opened despite the broken header", hc->name);
        }
        if (!strstr(err->message, hc->expect)) {
            g_error("%s: error '%s' does not mention '%s'", hc->name, err->message, hc->expect);
        }
        g_assert_null(strchr(err->message, '\n'));
        g_clear_error(&err);
    }
    /* the file is untouched */
    GBytes *after = test_read_file(path);
    g_assert_true(g_bytes_equal(content, after));
    g_bytes_unref(content);
    g_bytes_unref(after);
    g_free(path);
}

/* A snapshot table entry with a broken field: refused with its name. */
typedef struct {
    const char *name;
    uint64_t l1_offset;
    uint32_t l1_size;
    uint32_t extra;
    const char *expect;
} SnapCase;

static const SnapCase snap_cases[] = {
    {"snapshot-extra-huge", 0x10000, 1, 2000, "extra data size 2000"},
    {"snapshot-l1-unaligned", 0x12345, 1, 16, "not cluster aligned"},
    {"snapshot-l1-huge", 0x10000, 0x10000000, 16, "L1 table too large"},
};

static void
test_snapshot_case(gconstpointer data)
{
    const SnapCase *sc = data;
    char *path = test_path("snap.qcow2");
    create_qcow2(path, 64 << 20, NULL, NULL);
    int fd = open(path, O_RDWR);
    g_assert_cmpint(fd, >=, 0);
    const uint64_t table = 0x100000; /* past everything the create wrote */
    uint8_t e[64];
    memset(e, 0, sizeof(e));
    put_be(e, 8, sc->l1_offset);
    put_be(e + 8, 4, sc->l1_size);
    put_be(e + 12, 2, 1); /* id "1" */
    put_be(e + 36, 4, sc->extra);
    g_assert_cmpint(pwrite(fd, e, sizeof(e), (off_t)table), ==, sizeof(e));
    uint8_t h[8];
    put_be(h, 4, 1);
    g_assert_cmpint(pwrite(fd, h, 4, 60), ==, 4);
    put_be(h, 8, table);
    g_assert_cmpint(pwrite(fd, h, 8, 64), ==, 8);
    close(fd);
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_read_only(o, true);
    GError *err = NULL;
    VdkImage *img = vdk_image_open(path, o, &err);
    vdk_open_options_free(o);
    if (img) {
        g_error("%s: opened despite the broken snapshot table", sc->name);
    }
    if (!strstr(err->message, sc->expect)) {
        g_error("%s: error '%s' does not mention '%s'", sc->name, err->message, sc->expect);
    }
    g_assert_null(strchr(err->message, '\n'));
    g_clear_error(&err);
    g_free(path);
}

static void
test_header_feature_name(void)
{
    /* an unknown incompatible bit named in the image's feature table */
    char *path = test_path("feat.qcow2");
    create_qcow2(path, 1 << 20, NULL, NULL);
    int fd = open(path, O_RDWR);
    uint8_t h[4096];
    g_assert_cmpint(pread(fd, h, sizeof(h), 0), ==, sizeof(h));
    put_be(h + 72, 8, 1ULL << 9);
    /* the feature table is the first extension: rename entry 0 to bit 9 */
    uint32_t ext = 112;
    g_assert_cmpuint((h[ext] << 24) | (h[ext + 1] << 16) | (h[ext + 2] << 8) | h[ext + 3], ==, 0x6803f857);
    uint8_t *e = h + ext + 8;
    e[0] = 0;
    e[1] = 9;
    memset(e + 2, 0, 46);
    memcpy(e + 2, "time travel", 11);
    g_assert_cmpint(pwrite(fd, h, sizeof(h), 0), ==, sizeof(h));
    close(fd);
    VdkOpenOptions *o = vdk_open_options_new();
    GError *err = NULL;
    g_assert_null(vdk_image_open(path, o, &err));
    g_assert_nonnull(strstr(err->message, "time travel"));
    g_clear_error(&err);
    vdk_open_options_free(o);
    g_free(path);
}

static void
patch_l1_entry(const char *path, uint32_t idx, uint64_t value)
{
    int fd = open(path, O_RDWR);
    uint8_t h[64];
    g_assert_cmpint(pread(fd, h, sizeof(h), 0), ==, sizeof(h));
    uint64_t l1 = 0;
    for (int i = 0; i < 8; i++) {
        l1 = (l1 << 8) | h[40 + i];
    }
    uint8_t e[8];
    put_be(e, 8, value);
    g_assert_cmpint(pwrite(fd, e, 8, (off_t)(l1 + idx * 8)), ==, 8);
    close(fd);
}

static uint64_t
read_l1_entry(const char *path, uint32_t idx)
{
    int fd = open(path, O_RDONLY);
    uint8_t h[64];
    g_assert_cmpint(pread(fd, h, sizeof(h), 0), ==, sizeof(h));
    uint64_t l1 = 0;
    for (int i = 0; i < 8; i++) {
        l1 = (l1 << 8) | h[40 + i];
    }
    uint8_t e[8];
    g_assert_cmpint(pread(fd, e, 8, (off_t)(l1 + idx * 8)), ==, 8);
    close(fd);
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) {
        v = (v << 8) | e[i];
    }
    return v;
}

/* Corruption found while running: EIO, the corrupt bit, read-only after. */
static void
test_runtime_corruption(void)
{
    char *path = test_path("rt.qcow2");
    create_qcow2(path, 1 << 30, NULL, NULL); /* two L1 entries (512 MiB each) */
    VdkImage *img = open_with(path, NULL, false, NULL);
    uint8_t buf[4096];
    memset(buf, 0x77, sizeof(buf));
    g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), 0, 0), ==, 0);
    vdk_image_close(img, NULL);
    /* Point L1 entry 0 (the L2 table) into the header. */
    uint64_t e = read_l1_entry(path, 0);
    g_assert_cmpuint(e & 0x00fffffffffffe00ULL, !=, 0);
    patch_l1_entry(path, 0, 0x8000000000000000ULL | 0); /* offset 0 with COPIED: unallocated, fine */
    img = open_with(path, NULL, false, NULL);
    g_assert_cmpint(vdk_image_pread(img, buf, sizeof(buf), 0), ==, 0);
    vdk_image_close(img, NULL);
    patch_l1_entry(path, 0, 0x8000000000000000ULL | (512 * 3)); /* unaligned table */
    img = open_with(path, NULL, false, NULL);
    g_assert_cmpint(vdk_image_pread(img, buf, sizeof(buf), 0), ==, -EIO);
    g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), 10 << 20, 0), ==, -EIO);
    vdk_image_close(img, NULL);
    /* The corrupt bit is on disk: read-write opens are refused. */
    VdkOpenOptions *o = vdk_open_options_new();
    GError *err = NULL;
    g_assert_null(vdk_image_open(path, o, &err));
    g_assert_nonnull(strstr(err->message, "corrupt"));
    g_clear_error(&err);
    vdk_open_options_set_read_only(o, true);
    img = vdk_image_open(path, o, &err);
    g_assert_no_error(err);
    g_assert_cmpint(vdk_image_pread(img, buf, 512, 600 << 20), ==, 0); /* under the other L1 entry */
    g_assert_cmpint(vdk_image_pread(img, buf, 512, 20 << 20), ==, -EIO); /* under the broken one */
    vdk_image_close(img, NULL);
    vdk_open_options_free(o);
    g_free(path);
}

/* The compressed-cluster entry of guest cluster @idx (64 KiB clusters, one
 * L2 table): its host byte offset, or 0 when it is not compressed. */
static uint64_t
comp_host(const char *path, uint32_t idx)
{
    uint64_t l2 = read_l1_entry(path, 0) & 0x00fffffffffffe00ULL;
    g_assert_cmpuint(l2, !=, 0);
    int fd = open(path, O_RDONLY);
    uint8_t e[8];
    g_assert_cmpint(pread(fd, e, 8, (off_t)(l2 + idx * 8)), ==, 8);
    close(fd);
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) {
        v = (v << 8) | e[i];
    }
    if (!(v & (1ULL << 62))) {
        return 0;
    }
    return v & ((1ULL << 54) - 1); /* x = 62 - (16 - 8) = 54 offset bits */
}

/* A 64 KiB cluster that deflates to roughly @incompressible bytes. */
static void
fill_part_random(uint8_t *buf, size_t incompressible, uint64_t *rng)
{
    memset(buf, 0, 65536);
    test_fill_random(buf, incompressible, rng);
}

/* Compressed data goes into the free tail of an earlier packing cluster
 * when the next one is not contiguous; a packing cluster whose refcount
 * has dropped to zero (freed at a flush) is never packed into again. */
static void
test_compressed_packing(void)
{
    char *path = test_path("pack.qcow2");
    create_qcow2(path, 64 << 20, NULL, NULL);
    VdkImage *img = open_with(path, NULL, false, NULL);
    uint8_t *buf = g_malloc(65536);
    uint64_t rng = 99;
    const uint64_t cs = 65536;
    /* A (30 KB) opens packing cluster C1 */
    fill_part_random(buf, 30000, &rng);
    g_assert_cmpint(vdk_image_pwrite(img, buf, cs, 0, VDK_REQ_COMPRESS), ==, 0);
    /* an uncompressed cluster right after C1 */
    fill_part_random(buf, 65536, &rng);
    g_assert_cmpint(vdk_image_pwrite(img, buf, cs, 1 << 20, 0), ==, 0);
    /* B (60 KB) does not fit C1's tail and cannot continue past it: C3 */
    fill_part_random(buf, 60000, &rng);
    g_assert_cmpint(vdk_image_pwrite(img, buf, cs, cs, VDK_REQ_COMPRESS), ==, 0);
    /* C (20 KB) does not fit C3's tail but fits C1's */
    fill_part_random(buf, 20000, &rng);
    g_assert_cmpint(vdk_image_pwrite(img, buf, cs, 2 * cs, VDK_REQ_COMPRESS), ==, 0);
    g_assert_cmpint(vdk_image_flush(img), ==, 0);
    uint64_t a = comp_host(path, 0), b = comp_host(path, 1), c = comp_host(path, 2);
    g_assert_cmpuint(a, !=, 0);
    g_assert_cmpuint(b, !=, 0);
    g_assert_cmpuint(c, !=, 0);
    g_assert_cmpuint(b / cs, !=, a / cs);
    g_assert_cmpuint(c / cs, ==, a / cs); /* packed into C1's tail */
    /* A and C overwritten uncompressed: C1 is freed at the next flush */
    fill_part_random(buf, 65536, &rng);
    g_assert_cmpint(vdk_image_pwrite(img, buf, cs, 0, 0), ==, 0);
    g_assert_cmpint(vdk_image_pwrite(img, buf, cs, 2 * cs, 0), ==, 0);
    g_assert_cmpint(vdk_image_flush(img), ==, 0);
    g_assert_cmpint(vdk_image_flush(img), ==, 0);
    /* D (10 KB) does not fit B's cluster; it would fit C1's old tail */
    fill_part_random(buf, 10000, &rng);
    g_assert_cmpint(vdk_image_pwrite(img, buf, cs, 3 * cs, VDK_REQ_COMPRESS), ==, 0);
    g_assert_cmpint(vdk_image_flush(img), ==, 0);
    uint64_t d = comp_host(path, 3);
    g_assert_cmpuint(d, !=, 0);
    g_assert_cmpuint(d / cs, !=, a / cs);
    /* every cluster reads back */
    rng = 99;
    uint8_t *want = g_malloc(65536);
    const size_t sizes[] = {30000, 65536, 60000, 20000, 65536, 10000};
    const uint64_t where[] = {0, 1 << 20, cs, 2 * cs, 0, 3 * cs};
    vdk_image_close(img, NULL);
    img = open_with(path, NULL, true, NULL);
    for (size_t i = 0; i < G_N_ELEMENTS(sizes); i++) {
        fill_part_random(want, sizes[i], &rng);
        if (i == 4) {
            /* the same content overwrote clusters 0 and 2 */
            g_assert_cmpint(vdk_image_pread(img, buf, cs, 2 * cs), ==, 0);
            g_assert_cmpmem(buf, cs, want, cs);
        }
        if (i == 0 || i == 3) {
            continue; /* overwritten */
        }
        g_assert_cmpint(vdk_image_pread(img, buf, cs, where[i]), ==, 0);
        g_assert_cmpmem(buf, cs, want, cs);
    }
    vdk_image_close(img, NULL);
    char *cmd = g_strdup_printf("qemu-img check -q '%s'", path);
    g_assert_cmpint(test_sh(cmd), ==, 0);
    g_free(cmd);
    g_free(want);
    g_free(buf);
    g_free(path);
}

/* ------------------------------------------------------------------------ */
/* Crash consistency with a real SIGKILL                                     */
/* ------------------------------------------------------------------------ */

#define CRASH_SIZE (8u << 20)
#define CRASH_OPS 400

static void
test_crash(const TestVariant *v)
{
    char *path = test_path("crash.qcow2");
    for (int iter = 0; iter < 12; iter++) {
        uint64_t seed = 1000 + (uint64_t)iter;
        create_qcow2(path, CRASH_SIZE, iter % 3 == 1 ? "lazy_refcounts=on" : iter % 3 == 2 ? "cluster_size=4096" : NULL,
                     NULL);
        TestCrash c;
        test_crash_run(&c, path, "qcow2", v->engine, CRASH_SIZE, CRASH_OPS, seed, 2 + iter * 7 % 40);
        /* reopening read-write repairs a dirty lazy-refcount image */
        VdkImage *img = open_with(path, NULL, false, NULL);
        vdk_image_close(img, NULL);
        img = open_with(path, NULL, true, NULL);
        check_image(img, true); /* a crash may leak clusters, never more */
        uint8_t *buf = test_crash_verify(&c, img, iter);
        vdk_image_close(img, NULL);
        char *qemu_img = g_find_program_in_path("qemu-img");
        if (qemu_img) {
            g_free(qemu_img);
            char *cmd = g_strdup_printf("qemu-img check -q '%s' >/dev/null 2>&1", path);
            int rc = test_sh(cmd);
            g_free(cmd);
            if (rc != 0 && rc != 3) { /* 3: leaks only */
                g_error("iteration %d: qemu-img check says %d", iter, rc);
            }
        }
        g_free(buf);
        test_crash_clear(&c);
    }
    g_free(path);
}

/* A writer killed at random moments with an enabled persistent bitmap:
 * the bitmap is marked in use on disk before any write lands, so after
 * the kill it is either in use (inconsistent) or nothing was written; the
 * image stays consistent, and the bitmap can be removed. */
static void
test_crash_bitmap(const TestVariant *v)
{
    char *path = test_path("crash-bitmap.qcow2");
    for (int iter = 0; iter < 8; iter++) {
        uint64_t seed = 2000 + (uint64_t)iter;
        create_qcow2(path, CRASH_SIZE, iter % 2 ? "cluster_size=4096" : NULL, NULL);
        GError *err = NULL;
        VdkImage *img = open_with(path, NULL, false, NULL);
        VdkBitmapOp add = {.action = VDK_BITMAP_ADD, .name = "b", .granularity = 65536};
        g_assert_true(vdk_image_bitmap(img, &add, &err));
        g_assert_no_error(err);
        g_assert_true(vdk_image_close(img, &err));
        TestCrash c;
        test_crash_run(&c, path, "qcow2", v->engine, CRASH_SIZE, CRASH_OPS, seed, 1 + iter * 9 % 40);
        img = open_with(path, NULL, true, NULL);
        Qcow2 *s = img->top->opaque;
        g_assert_cmpuint(s->nb_bitmaps, ==, 1);
        bool in_use = (s->bitmaps[0].flags & QCOW2_BM_IN_USE) != 0;
        check_image(img, true);
        uint8_t *buf = test_crash_verify(&c, img, iter);
        if (!in_use) {
            for (uint64_t i = 0; i < CRASH_SIZE; i++) {
                if (buf[i]) {
                    g_error("iteration %d: byte %" G_GUINT64_FORMAT " was written but the bitmap is not in use", iter,
                            i);
                }
            }
        }
        g_test_message("iteration %d: bitmap %s", iter, in_use ? "in use" : "clean, nothing written");
        vdk_image_close(img, NULL);
        /* a read-write open leaves an inconsistent bitmap alone; remove works */
        img = open_with(path, NULL, false, NULL);
        VdkBitmapOp clear = {.action = VDK_BITMAP_CLEAR, .name = "b"};
        bool cleared = vdk_image_bitmap(img, &clear, &err);
        g_assert_true(cleared == !in_use);
        g_clear_error(&err);
        VdkBitmapOp rm = {.action = VDK_BITMAP_REMOVE, .name = "b"};
        g_assert_true(vdk_image_bitmap(img, &rm, &err));
        g_assert_true(vdk_image_close(img, &err));
        img = open_with(path, NULL, true, NULL);
        g_assert_cmpuint(((Qcow2 *)img->top->opaque)->nb_bitmaps, ==, 0);
        check_image(img, true);
        vdk_image_close(img, NULL);
        char *qemu_img = g_find_program_in_path("qemu-img");
        if (qemu_img) {
            g_free(qemu_img);
            char *cmd = g_strdup_printf("qemu-img check -q '%s' >/dev/null 2>&1", path);
            int rc = test_sh(cmd);
            g_free(cmd);
            if (rc != 0 && rc != 3) {
                g_error("iteration %d: qemu-img check says %d", iter, rc);
            }
        }
        g_free(buf);
        test_crash_clear(&c);
    }
    g_free(path);
}

int
main(int argc, char **argv)
{
    static const char *const direct[] = {"none", NULL};
    static const char *const buffered[] = {"writeback", NULL};
    test_init(&argc, &argv);
    test_add_variants("qcow2", "model", test_model_default, NULL);
    test_add_variants("qcow2", "model-small-cache", test_model_small_cache, direct);
    test_add_variants("qcow2", "model-extl2-backing", test_model_extl2_backing, buffered);
    test_add_variants("qcow2", "model-lazy-refcounts", test_model_lazy, direct);
    test_add_variants("qcow2", "model-v2-backing", test_model_v2, buffered);
    test_add_variants("qcow2", "model-512b-clusters", test_model_tiny_clusters, direct);
    for (size_t i = 0; i < G_N_ELEMENTS(header_cases); i++) {
        char *p = g_strdup_printf("/qcow2/header/%s", header_cases[i].name);
        g_test_add_data_func(p, &header_cases[i], test_header_case);
        g_free(p);
    }
    g_test_add_func("/qcow2/header/unknown-feature-named", test_header_feature_name);
    for (size_t i = 0; i < G_N_ELEMENTS(snap_cases); i++) {
        char *p = g_strdup_printf("/qcow2/header/%s", snap_cases[i].name);
        g_test_add_data_func(p, &snap_cases[i], test_snapshot_case);
        g_free(p);
    }
    g_test_add_func("/qcow2/runtime-corruption", test_runtime_corruption);
    g_test_add_func("/qcow2/compressed-packing", test_compressed_packing);
    test_add_variants("qcow2", "crash-sigkill", test_crash, buffered);
    test_add_variants("qcow2", "crash-sigkill-bitmap", test_crash_bitmap, buffered);
    return g_test_run();
}
