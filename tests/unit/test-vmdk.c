/* SPDX-License-Identifier: MIT */
/*
 * test-vmdk.c - the vmdk driver.
 *
 *   desc/...      the descriptor parser on good descriptors (qemu's,
 *                 VMware's with CRLF and comments, several extents, ZERO
 *                 and VMFS extents, a parent) and on hostile ones: every
 *                 rejected line gives an error naming the line and text.
 *   set-key       rewriting CID keeps every other byte.
 *   header/...    every header field the driver validates, broken one at a
 *                 time in a monolithicSparse image: the open fails with an
 *                 error naming the field; nothing crashes.
 *   model/...     random writes with many requests in flight (per engine
 *                 and cache mode) on monolithicSparse and twoGbMaxExtentSparse
 *                 images, compared with an in-memory model, after a reopen
 *                 too; check finds nothing.
 *   extent-path   extents outside the descriptor's directory are refused
 *                 unless allow-extent-paths=on.
 *   runtime-corruption  a grain table entry past the end of the file fails
 *                 the read with EIO.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "block/block.h"
#include "formats/vmdk.h"
#include "testutil.h"

#define MODEL_SIZE (24u << 20)

static void
create_vmdk(const char *path, uint64_t size, const char *opts)
{
    GError *err = NULL;
    VdkCreateOptions *o = vdk_create_options_new("vmdk", &err);
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
    vdk_create_options_set_overwrite(o, true);
    if (!vdk_image_create(path, o, &err)) {
        g_error("create %s: %s", path, err->message);
    }
    vdk_create_options_free(o);
}

/* ------------------------------------------------------------------------ */
/* Descriptor                                                                */
/* ------------------------------------------------------------------------ */

static void
test_desc_good(void)
{
    static const char qemu[] = "# Disk DescriptorFile\n"
                               "version=1\n"
                               "CID=165a972\n"
                               "parentCID=ffffffff\n"
                               "createType=\"twoGbMaxExtentSparse\"\n"
                               "\n"
                               "# Extent description\n"
                               "RW 4194304 SPARSE \"a-s001.vmdk\"\n"
                               "RW 2097152 SPARSE \"a-s002.vmdk\"\n"
                               "\n"
                               "# The Disk Data Base\n"
                               "#DDB\n"
                               "\n"
                               "ddb.virtualHWVersion = \"4\"\n"
                               "ddb.adapterType = \"ide\"\n";
    VmdkDesc d;
    GError *err = NULL;
    g_assert_true(vdk_vmdk_desc_parse(qemu, strlen(qemu), &d, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(d.cid, ==, 0x165a972);
    g_assert_cmpuint(d.parent_cid, ==, 0xffffffffu);
    g_assert_cmpstr(d.create_type, ==, "twoGbMaxExtentSparse");
    g_assert_cmpuint(d.extents->len, ==, 2);
    VmdkDescExtent *e = &g_array_index(d.extents, VmdkDescExtent, 1);
    g_assert_cmpstr(e->fname, ==, "a-s002.vmdk");
    g_assert_cmpuint(e->sectors, ==, 2097152);
    g_assert_cmpint(e->type, ==, VMDK_ET_SPARSE);
    g_assert_cmpuint(d.total_sectors, ==, 6291456);
    vdk_vmdk_desc_clear(&d);

    /* VMware style: CRLF, comments, spaces, flat with offsets, ZERO,
     * a parent, NUL padding after the text */
    static const char vmw[] = "# Disk DescriptorFile\r\n"
                              "version=1\r\n"
                              "encoding=\"UTF-8\"\r\n"
                              "CID=fffffffe\r\n"
                              "parentCID=12345678\r\n"
                              "isNativeSnapshot=\"no\"\r\n"
                              "createType=\"monolithicFlat\"\r\n"
                              "parentFileNameHint=\"base disk.vmdk\"\r\n"
                              "   # indented comment\r\n"
                              "RW 2048 FLAT \"with space-flat.vmdk\" 0\r\n"
                              "RDONLY 1024 VMFS \"vm.vmdk\" 2048\r\n"
                              "RW 100 ZERO\r\n"
                              "ddb.uuid = \"60 00 C2 9a\"\r\n\0\0\0garbage after NUL";
    g_assert_true(vdk_vmdk_desc_parse(vmw, sizeof(vmw) - 1, &d, &err));
    g_assert_cmpuint(d.cid, ==, 0xfffffffeu);
    g_assert_cmpuint(d.parent_cid, ==, 0x12345678u);
    g_assert_cmpstr(d.parent_hint, ==, "base disk.vmdk");
    g_assert_cmpuint(d.extents->len, ==, 3);
    e = &g_array_index(d.extents, VmdkDescExtent, 0);
    g_assert_cmpstr(e->fname, ==, "with space-flat.vmdk");
    e = &g_array_index(d.extents, VmdkDescExtent, 1);
    g_assert_cmpint(e->access, ==, VMDK_ACCESS_RDONLY);
    g_assert_cmpuint(e->offset, ==, 2048);
    g_assert_cmpint(e->type, ==, VMDK_ET_FLAT);
    e = &g_array_index(d.extents, VmdkDescExtent, 2);
    g_assert_cmpint(e->type, ==, VMDK_ET_ZERO);
    g_assert_null(e->fname);
    vdk_vmdk_desc_clear(&d);
}

typedef struct {
    const char *name;
    const char *text;
    const char *expect; /* substring of the error */
} BadDesc;

static const BadDesc bad_descs[] = {
    {"garbage-line", "createType=\"monolithicFlat\"\nthis is not a descriptor line\n", "line 2: cannot parse"},
    {"extent-size-text", "RW lots FLAT \"x\" 0\n", "invalid extent size 'lots'"},
    {"extent-size-overflow", "RW 99999999999999999999999 FLAT \"x\" 0\n", "invalid extent size"},
    {"extent-size-huge", "RW 1152921504606846976 FLAT \"x\" 0\n", "invalid extent size"},
    {"extent-sum-overflow", "RW 1099511627776 FLAT \"x\" 0\nRW 1099511627776 FLAT \"y\" 0\n", "add up to more"},
    {"extent-type", "RW 10 SPARKLY \"x\"\n", "unknown extent type 'SPARKLY'"},
    {"extent-type-sesparse", "RW 10 SESPARSE \"x\"\n", "'SESPARSE' is not supported"},
    {"extent-unquoted", "RW 10 FLAT x 0\n", "must be quoted"},
    {"extent-unterminated", "RW 10 FLAT \"x 0\n", "unterminated"},
    {"extent-empty-name", "RW 10 FLAT \"\" 0\n", "invalid extent file name"},
    {"extent-offset", "RW 10 FLAT \"x\" -5\n", "invalid extent offset '-5'"},
    {"extent-trailing", "RW 10 SPARSE \"x\" 7\n", "unexpected text '7'"},
    {"extent-no-size", "RW\n", "invalid extent size"},
    {"cid-not-hex", "CID=zzzz\n", "invalid value 'zzzz' for CID"},
    {"cid-too-long", "CID=123456789\n", "for CID"},
    {"parent-cid", "parentCID=-1\n", "for parentCID"},
    {"version", "version=7\n", "for version"},
    {"bad-key", "cr eate=1\n", "invalid key"},
    {"empty-key", "=1\n", "empty key"},
    {"parent-hint-empty", "parentFileNameHint=\"\"\n", "for parentFileNameHint"},
};

static void
test_desc_bad(gconstpointer data)
{
    const BadDesc *b = data;
    VmdkDesc d;
    GError *err = NULL;
    g_assert_false(vdk_vmdk_desc_parse(b->text, strlen(b->text), &d, &err));
    g_assert_nonnull(err);
    if (!strstr(err->message, b->expect)) {
        g_error("%s: error '%s' does not contain '%s'", b->name, err->message, b->expect);
    }
    g_assert_true(g_str_has_prefix(err->message, "vmdk: "));
    g_error_free(err);
}

static void
test_desc_too_many_extents(void)
{
    GString *s = g_string_new("createType=\"monolithicFlat\"\n");
    for (unsigned i = 0; i <= VMDK_MAX_EXTENTS; i++) {
        g_string_append_printf(s, "RW 1 FLAT \"f%u\" 0\n", i);
    }
    VmdkDesc d;
    GError *err = NULL;
    g_assert_false(vdk_vmdk_desc_parse(s->str, s->len, &d, &err));
    g_assert_nonnull(strstr(err->message, "too many extents"));
    g_error_free(err);
    g_string_free(s, TRUE);
}

static void
test_desc_set_key(void)
{
    static const char in[] = "# Disk DescriptorFile\r\nversion=1\r\nCID = 1a\r\nparentCID=ffffffff\r\n"
                             "createType=\"monolithicSparse\"\r\n# Extent description\r\nRW 8 SPARSE \"x.vmdk\"\r\n"
                             "ddb.x = \"CID=1\"\r\n";
    char *out = vdk_vmdk_desc_set_key(in, "CID", "0badcafe");
    g_assert_cmpstr(out, ==,
                    "# Disk DescriptorFile\r\nversion=1\r\nCID = 0badcafe\r\nparentCID=ffffffff\r\n"
                    "createType=\"monolithicSparse\"\r\n# Extent description\r\nRW 8 SPARSE \"x.vmdk\"\r\n"
                    "ddb.x = \"CID=1\"\r\n");
    g_free(out);
    /* missing: added before the extent section */
    out = vdk_vmdk_desc_set_key("version=1\n# Extent description\nRW 8 FLAT \"f\" 0\n", "CID", "00000001");
    g_assert_cmpstr(out, ==, "version=1\nCID=00000001\n# Extent description\nRW 8 FLAT \"f\" 0\n");
    g_free(out);
}

/* ------------------------------------------------------------------------ */
/* Header fields                                                             */
/* ------------------------------------------------------------------------ */

typedef struct {
    const char *name;
    uint32_t off;
    uint32_t width; /* bytes (1, 2, 4, 8) */
    uint64_t value;
    const char *expect;
} HeaderCase;

static const HeaderCase header_cases[] = {
    {"magic", 0, 4, 0x12345678, "bad magic"},
    {"version-0", 4, 4, 0, "unsupported version 0"},
    {"version-4", 4, 4, 4, "unsupported version 4"},
    {"flags-unknown", 8, 4, 0x3 | (1u << 5), "unknown flags 0x20"},
    {"capacity-huge", 12, 8, 1ULL << 50, "capacity"},
    {"capacity-overflow", 12, 8, UINT64_MAX, "capacity"},
    {"grain-size-zero", 20, 8, 0, "grainSize 0"},
    {"grain-size-odd", 20, 8, 100, "grainSize 100"},
    {"grain-size-huge", 20, 8, 1ULL << 40, "grainSize"},
    {"desc-offset-past-eof", 28, 8, 1ULL << 40, "descriptor location"},
    {"desc-size-huge", 36, 8, 1ULL << 30, "descriptor location"},
    {"gtes-zero", 44, 4, 0, "numGTEsPerGT 0"},
    {"gtes-huge", 44, 4, 1u << 30, "numGTEsPerGT"},
    {"rgd-offset-past-eof", 48, 8, 1ULL << 33, "rgdOffset"},
    {"rgd-offset-zero", 48, 8, 0, "rgdOffset"},
    {"gd-offset-past-eof", 56, 8, 1ULL << 33, "gdOffset"},
    {"gd-offset-zero", 56, 8, 0, "gdOffset"},
    {"gd-offset-at-end-uncompressed", 56, 8, UINT64_MAX, "gdOffset"},
    {"overhead-past-eof", 64, 8, 1ULL << 30, "overHead"},
    {"newline-check", 73, 1, 'x', "newline check"},
    {"compress-algorithm", 77, 2, 7, "compressAlgorithm"},
    {"gd-too-large", 12, 8, 1ULL << 39, "grain directory too large"},
};

static void
poke(const char *path, uint64_t off, const void *buf, size_t len)
{
    int fd = open(path, O_WRONLY);
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(pwrite(fd, buf, len, (off_t)off), ==, (ssize_t)len);
    close(fd);
}

static void
test_header_case(gconstpointer data)
{
    const HeaderCase *c = data;
    char *p = test_path("hdr.vmdk");
    /* compressed flag for the compressAlgorithm case */
    create_vmdk(p, 64 << 20, !strcmp(c->name, "compress-algorithm") ? "subformat=streamOptimized" : NULL);
    uint8_t b[8];
    for (uint32_t i = 0; i < 8; i++) {
        b[i] = (uint8_t)(c->value >> (8 * i));
    }
    poke(p, c->off, b, c->width);
    if (!strcmp(c->name, "gd-too-large")) {
        /* with 1-sector grains the directory for that capacity is huge */
        uint8_t g[8] = {1, 0, 0, 0, 0, 0, 0, 0};
        poke(p, 20, g, 8);
    }
    GError *err = NULL;
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_format(o, "vmdk");
    vdk_open_options_set_read_only(o, true);
    VdkImage *img = vdk_image_open(p, o, &err);
    vdk_open_options_free(o);
    if (img) {
        g_error("%s: the open succeeded", c->name);
    }
    if (!strstr(err->message, c->expect)) {
        g_error("%s: error '%s' does not contain '%s'", c->name, err->message, c->expect);
    }
    g_error_free(err);
    g_free(p);
}

/* ------------------------------------------------------------------------ */
/* Model                                                                     */
/* ------------------------------------------------------------------------ */

static void
model_run(const TestVariant *v, const char *opts, uint64_t seed)
{
    char *p = test_path("model.vmdk");
    create_vmdk(p, MODEL_SIZE, opts);
    uint8_t *model = g_malloc0(MODEL_SIZE);
    VdkImage *img = test_open(p, "vmdk", v, false);
    GError *err = NULL;
    VdkQueue *q = vdk_queue_new(img, 32, &err);
    g_assert_no_error(err);
    uint64_t st = seed;
    enum { N = 16, MAXLEN = 200 * 1024 };
    uint8_t *bufs[N];
    for (int i = 0; i < N; i++) {
        bufs[i] = g_malloc(MAXLEN);
    }
    for (int round = 0; round < 60; round++) {
        /* a batch of non-overlapping writes, all in flight at once */
        uint64_t offs[N], lens[N];
        int n = 0;
        for (int i = 0; i < N; i++) {
            uint64_t len = 1 + test_rand(&st) % MAXLEN;
            if (test_rand(&st) % 3 == 0) {
                len = (1 + test_rand(&st) % 3) * 65536; /* whole grains too */
            }
            uint64_t off = test_rand(&st) % (MODEL_SIZE - len);
            if (test_rand(&st) % 2) {
                off &= ~(uint64_t)511;
            }
            bool clash = false;
            for (int k = 0; k < n; k++) {
                clash |= off < offs[k] + lens[k] && offs[k] < off + len;
            }
            if (clash) {
                continue;
            }
            offs[n] = off;
            lens[n] = len;
            if (test_rand(&st) % 6 == 0) {
                /* zero writes: zeroed grains, zero buffers, flat zeroing */
                memset(model + off, 0, len);
                g_assert_cmpint(vdk_queue_write_zeroes(q, off, len, 0, (uint64_t)n), ==, 0);
            } else {
                test_fill_random(bufs[n], len, &st);
                memcpy(model + off, bufs[n], len);
                g_assert_cmpint(vdk_queue_write(q, off, bufs[n], len, 0, (uint64_t)n), ==, 0);
            }
            n++;
        }
        g_assert_cmpint(vdk_queue_submit(q), >=, 0);
        int got = 0;
        while (got < n) {
            VdkCompletion c[N];
            int r = vdk_queue_wait(q, c, N, 1, -1);
            g_assert_cmpint(r, >, 0);
            for (int i = 0; i < r; i++) {
                g_assert_cmpint(c[i].result, >=, 0);
            }
            got += r;
        }
        if (round % 20 == 19) {
            g_assert_cmpint(vdk_queue_flush(q, 99), ==, 0);
            g_assert_cmpint(vdk_queue_submit(q), >=, 0);
            VdkCompletion c;
            g_assert_cmpint(vdk_queue_wait(q, &c, 1, 1, -1), ==, 1);
            g_assert_cmpint(c.result, ==, 0);
        }
    }
    vdk_queue_free(q);
    uint8_t *back = g_malloc(MODEL_SIZE);
    g_assert_cmpint(vdk_image_pread(img, back, MODEL_SIZE, 0), ==, 0);
    g_assert_true(memcmp(back, model, MODEL_SIZE) == 0);
    g_assert_true(vdk_image_close(img, &err));
    g_assert_no_error(err);
    /* reopened: the same bytes */
    img = test_open(p, "vmdk", v, true);
    memset(back, 0, MODEL_SIZE);
    g_assert_cmpint(vdk_image_pread(img, back, MODEL_SIZE, 0), ==, 0);
    g_assert_true(memcmp(back, model, MODEL_SIZE) == 0);
    VdkCheckResult res = {0};
    res.messages = g_ptr_array_new_with_free_func(g_free);
    g_assert_true(img->top->drv->check(img->top, 0, &res, &err));
    if (res.corruptions || res.leaks) {
        g_error("check: %" G_GUINT64_FORMAT " corruptions, %" G_GUINT64_FORMAT " leaks: %s", res.corruptions,
                res.leaks, res.messages->len ? (char *)res.messages->pdata[0] : "");
    }
    g_ptr_array_unref(res.messages);
    vdk_image_close(img, NULL);
    for (int i = 0; i < N; i++) {
        g_free(bufs[i]);
    }
    g_free(back);
    g_free(model);
    g_free(p);
}

static void
test_model_sparse(const TestVariant *v)
{
    model_run(v, NULL, 1);
}

static void
test_model_two_gb(const TestVariant *v)
{
    model_run(v, "subformat=twoGbMaxExtentSparse,zeroed_grain=on", 2);
}

static void
test_model_flat(const TestVariant *v)
{
    model_run(v, "subformat=monolithicFlat", 3);
}

/* ------------------------------------------------------------------------ */
/* Extent paths, runtime corruption                                          */
/* ------------------------------------------------------------------------ */

static void
write_text(const char *path, const char *text)
{
    GError *err = NULL;
    g_assert_true(g_file_set_contents(path, text, -1, &err));
}

static void
test_extent_path(void)
{
    char *sub = test_path("sub");
    g_mkdir_with_parents(sub, 0755);
    char *flat = test_path("outside-flat.vmdk");
    test_make_sparse(flat, 1 << 20);
    char *desc = g_strdup_printf("%s/d.vmdk", sub);
    static const char *const names[] = {"../outside-flat.vmdk", NULL};
    for (int i = 0; i < 2; i++) {
        char *text = g_strdup_printf("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
                                     "createType=\"monolithicFlat\"\nRW 2048 FLAT \"%s\" 0\n",
                                     names[i] ? names[i] : flat);
        write_text(desc, text);
        g_free(text);
        GError *err = NULL;
        VdkOpenOptions *o = vdk_open_options_new();
        vdk_open_options_set_read_only(o, true);
        VdkImage *img = vdk_image_open(desc, o, &err);
        g_assert_null(img);
        g_assert_error(err, VDK_ERROR, EPERM);
        g_assert_nonnull(strstr(err->message, "allow-extent-paths"));
        g_clear_error(&err);
        vdk_open_options_set(o, "allow-extent-paths", "on");
        img = vdk_image_open(desc, o, &err);
        g_assert_no_error(err);
        g_assert_cmpuint(vdk_image_get_size(img), ==, 1 << 20);
        vdk_image_close(img, NULL);
        vdk_open_options_free(o);
    }
    g_free(desc);
    g_free(flat);
    g_free(sub);
}

static void
test_runtime_corruption(void)
{
    char *p = test_path("rc.vmdk");
    create_vmdk(p, 8 << 20, NULL);
    /* first grain table entry (qemu's layout: GT of the primary directory
     * follows it; read the directory to find it) */
    int fd = open(p, O_RDWR);
    uint8_t hb[512];
    g_assert_cmpint(pread(fd, hb, 512, 0), ==, 512);
    uint64_t gd = (uint64_t)hb[56] | ((uint64_t)hb[57] << 8) | ((uint64_t)hb[58] << 16);
    uint8_t e[4];
    g_assert_cmpint(pread(fd, e, 4, (off_t)(gd * 512)), ==, 4);
    uint64_t gt = (uint64_t)e[0] | ((uint64_t)e[1] << 8) | ((uint64_t)e[2] << 16);
    uint8_t bad[4] = {0x00, 0x00, 0x00, 0x10}; /* sector 0x10000000: far past the end */
    g_assert_cmpint(pwrite(fd, bad, 4, (off_t)(gt * 512)), ==, 4);
    close(fd);
    VdkImage *img = test_open(p, "vmdk", NULL, true);
    uint8_t buf[4096];
    g_assert_cmpint(vdk_image_pread(img, buf, sizeof(buf), 0), ==, -EIO);
    /* the rest of the disk still reads */
    g_assert_cmpint(vdk_image_pread(img, buf, sizeof(buf), 1 << 20), ==, 0);
    vdk_image_close(img, NULL);
    g_free(p);
}

/* ------------------------------------------------------------------------ */
/* Open-time validation beyond the header                                    */
/* ------------------------------------------------------------------------ */

static void
expect_open_error(const char *path, const char *want)
{
    GError *err = NULL;
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_read_only(o, true);
    vdk_open_options_set_format(o, "vmdk");
    VdkImage *img = vdk_image_open(path, o, &err);
    vdk_open_options_free(o);
    if (img) {
        g_error("%s: the open succeeded (expected '%s')", path, want);
    }
    if (!strstr(err->message, want)) {
        g_error("%s: error '%s' does not contain '%s'", path, err->message, want);
    }
    g_error_free(err);
}

static void
test_open_descriptors(void)
{
    char *d = test_path("d.vmdk");
    char *f = test_path("f.raw");
    test_make_sparse(f, 1 << 20);
    GString *big = g_string_new("# Disk DescriptorFile\n");
    while (big->len <= VMDK_MAX_DESC_BYTES) {
        g_string_append(big, "# padding padding padding padding padding padding padding padding\n");
    }
    write_text(d, big->str);
    g_string_free(big, TRUE);
    expect_open_error(d, "descriptor file too large");
    write_text(d, "# Disk DescriptorFile\nversion=1\nRW 2048 FLAT \"f.raw\" 0\n");
    expect_open_error(d, "no createType");
    write_text(d, "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n");
    expect_open_error(d, "lists no extents");
    write_text(d, "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nNOACCESS 2048 FLAT \"f.raw\" 0\n");
    expect_open_error(d, "NOACCESS");
    write_text(d, "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"f.raw\" 18446744073709551\n");
    expect_open_error(d, "invalid extent offset");
    /* a sparse extent smaller than the descriptor says */
    char *sp = test_path("sp.vmdk");
    create_vmdk(sp, 1 << 20, NULL);
    write_text(d, "# Disk DescriptorFile\ncreateType=\"twoGbMaxExtentSparse\"\nRW 4096 SPARSE \"sp.vmdk\"\n");
    expect_open_error(d, "the descriptor gives the extent 4096 sectors, its header 2048");
    /* a flat "extent" that is a text file is fine; a sparse one is not */
    write_text(d, "# Disk DescriptorFile\ncreateType=\"twoGbMaxExtentSparse\"\nRW 2048 SPARSE \"f.raw\"\n");
    expect_open_error(d, "bad magic");
    g_free(sp);
    g_free(d);
    g_free(f);
}

static uint64_t
le64_at(const char *path, uint64_t off)
{
    int fd = open(path, O_RDONLY);
    uint8_t b[8];
    g_assert_cmpint(pread(fd, b, 8, (off_t)off), ==, 8);
    close(fd);
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | b[i];
    }
    return v;
}

static void
test_open_gd_entry(void)
{
    char *p = test_path("gde.vmdk");
    create_vmdk(p, 8 << 20, NULL);
    uint64_t gd = le64_at(p, 56);
    uint8_t bad[4] = {0xff, 0xff, 0xff, 0x0f};
    poke(p, gd * 512, bad, 4);
    expect_open_error(p, "grain directory entry 0 (sector 268435455) points beyond the end of the file");
    g_free(p);
}

/* A stream written through the library (data collected, compressed on
 * close) reads back; its footer is validated. */
static void
test_stream(void)
{
    char *p = test_path("s.vmdk");
    create_vmdk(p, 8 << 20, "subformat=streamOptimized");
    VdkImage *img = test_open(p, "vmdk", NULL, false);
    uint8_t *buf = g_malloc(1 << 20);
    uint64_t st = 5;
    test_fill_random(buf, 1 << 20, &st);
    memset(buf + 65536, 0, 65536); /* a zero grain stays unallocated */
    g_assert_cmpint(vdk_image_pwrite(img, buf, 1 << 20, 3 << 20, 0), ==, 0);
    g_assert_cmpint(vdk_image_pwrite(img, "tail", 4, (8 << 20) - 4, 0), ==, 0);
    GError *err = NULL;
    g_assert_true(vdk_image_close(img, &err));
    g_assert_no_error(err);
    img = test_open(p, "vmdk", NULL, true);
    uint8_t *back = g_malloc(1 << 20);
    g_assert_cmpint(vdk_image_pread(img, back, 1 << 20, 3 << 20), ==, 0);
    g_assert_true(memcmp(back, buf, 1 << 20) == 0);
    char t[4];
    g_assert_cmpint(vdk_image_pread(img, t, 4, (8 << 20) - 4), ==, 0);
    g_assert_cmpmem(t, 4, "tail", 4);
    VdkBlockStatus bs;
    g_assert_cmpint(vdk_image_block_status(img, (3 << 20) + 65536, 65536, &bs), ==, 0);
    g_assert_false(bs.flags & VDK_BS_DATA);
    vdk_image_close(img, NULL);
    /* writing a stream that holds data is refused */
    VdkOpenOptions *o = vdk_open_options_new();
    img = vdk_image_open(p, o, &err);
    g_assert_null(img);
    g_assert_nonnull(strstr(err->message, "cannot be opened for writing"));
    g_clear_error(&err);
    vdk_open_options_free(o);
    /* footer: 1024 bytes before the end */
    struct stat sb;
    g_assert_cmpint(stat(p, &sb), ==, 0);
    uint64_t footer = (uint64_t)sb.st_size - 1024;
    g_assert_cmpuint(le64_at(p, 56), ==, UINT64_MAX);
    uint8_t cap[8] = {1, 0, 0, 0, 0, 0, 0, 0};
    uint8_t old[8];
    int fd = open(p, O_RDONLY);
    g_assert_cmpint(pread(fd, old, 8, (off_t)(footer + 12)), ==, 8);
    close(fd);
    poke(p, footer + 12, cap, 8);
    expect_open_error(p, "the footer does not match the header");
    poke(p, footer + 12, old, 8);
    poke(p, footer, "XXXX", 4);
    expect_open_error(p, "in the footer");
    g_free(buf);
    g_free(back);
    g_free(p);
}

/* ------------------------------------------------------------------------ */
/* Crash consistency with a real SIGKILL                                     */
/* ------------------------------------------------------------------------ */

#define CRASH_SIZE (8u << 20)
#define CRASH_OPS 400

static void
test_crash(const TestVariant *v)
{
    char *path = test_path("crash.vmdk");
    for (int iter = 0; iter < 12; iter++) {
        uint64_t seed = 2000 + (uint64_t)iter;
        create_vmdk(path, CRASH_SIZE, iter % 2 ? "zeroed_grain=on" : NULL);
        TestCrash c;
        test_crash_run(&c, path, "vmdk", v->engine, CRASH_SIZE, CRASH_OPS, seed, 2 + iter * 7 % 40);
        VdkImage *img = test_open(path, "vmdk", NULL, true);
        /* a crash may leak grains, never more */
        VdkCheckResult res = {0};
        res.messages = g_ptr_array_new_with_free_func(g_free);
        GError *err = NULL;
        g_assert_true(img->top->drv->check(img->top, 0, &res, &err));
        if (res.corruptions || res.check_errors) {
            g_error("iteration %d: check found %" G_GUINT64_FORMAT " corruptions: %s", iter, res.corruptions,
                    res.messages->len ? (char *)res.messages->pdata[0] : "");
        }
        g_ptr_array_unref(res.messages);
        uint8_t *buf = test_crash_verify(&c, img, iter);
        vdk_image_close(img, NULL);
        char *qemu_img = g_find_program_in_path("qemu-img");
        if (qemu_img) {
            g_free(qemu_img);
            char *cmd = g_strdup_printf("qemu-img check -q '%s' >/dev/null 2>&1", path);
            int rc = test_sh(cmd);
            g_free(cmd);
            if (rc != 0) {
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
    test_init(&argc, &argv);
    g_test_add_func("/vmdk/desc/good", test_desc_good);
    for (size_t i = 0; i < G_N_ELEMENTS(bad_descs); i++) {
        char *p = g_strdup_printf("/vmdk/desc/hostile/%s", bad_descs[i].name);
        g_test_add_data_func(p, &bad_descs[i], test_desc_bad);
        g_free(p);
    }
    g_test_add_func("/vmdk/desc/hostile/too-many-extents", test_desc_too_many_extents);
    g_test_add_func("/vmdk/desc/set-key", test_desc_set_key);
    for (size_t i = 0; i < G_N_ELEMENTS(header_cases); i++) {
        char *p = g_strdup_printf("/vmdk/header/%s", header_cases[i].name);
        g_test_add_data_func(p, &header_cases[i], test_header_case);
        g_free(p);
    }
    g_test_add_func("/vmdk/extent-path", test_extent_path);
    g_test_add_func("/vmdk/open/descriptors", test_open_descriptors);
    g_test_add_func("/vmdk/open/gd-entry-past-eof", test_open_gd_entry);
    g_test_add_func("/vmdk/stream/write-read-footer", test_stream);
    g_test_add_func("/vmdk/runtime-corruption", test_runtime_corruption);
    test_add_variants("vmdk", "model-sparse", test_model_sparse, NULL);
    test_add_variants("vmdk", "model-twogb-zeroed-grain", test_model_two_gb, NULL);
    test_add_variants("vmdk", "model-flat", test_model_flat, NULL);
    static const char *const buffered[] = {"writeback", NULL};
    test_add_variants("vmdk", "crash-sigkill", test_crash, buffered);
    return g_test_run();
}
