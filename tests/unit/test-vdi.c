/* SPDX-License-Identifier: MIT */
/*
 * test-vdi.c - the vdi driver.
 *
 *   model        random reads, writes, zero writes and discards with many
 *                requests in flight (several to the same new block, so
 *                allocations wait for each other), compared with an
 *                in-memory model after flushes and after reopening; the
 *                image then passes check.  Once per engine and cache mode,
 *                dynamic and static.
 *   alloc        a write into a new block takes the next index, extends
 *                the file by exactly one block, allocates only what it
 *                wrote on the host, and reaches the on-disk map only at
 *                flush (header count first).
 *   header/...   every validated header field broken one at a time: the
 *                parser refuses it naming the field.
 *   map/bad-entry  an out-of-range map entry: writable opens refused,
 *                read-only reads of that block fail with EIO, check
 *                counts it and -r all repairs it.
 *   fault/...    a failure at each step of a flush (header write, sync, map
 *                write, sync) leaves the on-disk map within the on-disk
 *                count, and a later flush completes it; a failed data write
 *                of a new block leaves nothing mapped and no hole.
 *   crash        a writer killed with SIGKILL: the image is never worse
 *                than a counted-but-unused block (repairable), and every
 *                write completed before the last flush reads back.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "block/block.h"
#include "io/io.h"
#include "testutil.h"

#define MODEL_SIZE (24u << 20)
#define MiB (1u << 20)

bool vdk_vdi_parse_header(const uint8_t *h, uint64_t *disk_size, uint32_t *blocks, GError **error);

static void
create_vdi(const char *path, uint64_t size, const char *opts)
{
    GError *err = NULL;
    VdkCreateOptions *o = vdk_create_options_new("vdi", &err);
    g_assert_no_error(err);
    char *sz = g_strdup_printf("%" G_GUINT64_FORMAT, size);
    g_assert_true(vdk_create_options_set(o, "size", sz, &err));
    g_free(sz);
    if (opts) {
        char **pair = g_strsplit(opts, "=", 2);
        g_assert_true(vdk_create_options_set(o, pair[0], pair[1], &err));
        g_strfreev(pair);
    }
    vdk_create_options_set_overwrite(o, true);
    if (!vdk_image_create(path, o, &err)) {
        g_error("create %s: %s", path, err->message);
    }
    vdk_create_options_free(o);
}

static VdkImage *
open_vdi(const char *path, const TestVariant *v, bool ro, GError **error)
{
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_format(o, "vdi");
    vdk_open_options_set_read_only(o, ro);
    if (v) {
        g_assert_true(vdk_open_options_set_engine(o, v->engine, NULL));
        g_assert_true(vdk_open_options_set_cache(o, v->cache, NULL));
    }
    VdkImage *img = vdk_image_open(path, o, error);
    vdk_open_options_free(o);
    return img;
}

static VdkImage *
open_ok(const char *path, const TestVariant *v, bool ro)
{
    GError *err = NULL;
    VdkImage *img = open_vdi(path, v, ro, &err);
    if (!img) {
        g_error("open %s: %s", path, err->message);
    }
    return img;
}

static void
run_check(VdkImage *img, int fix, VdkCheckResult *res)
{
    memset(res, 0, sizeof(*res));
    res->messages = g_ptr_array_new_with_free_func(g_free);
    GError *err = NULL;
    g_assert_true(img->top->drv->check(img->top, fix, res, &err));
    g_assert_no_error(err);
}

static void
check_clean(VdkImage *img)
{
    VdkCheckResult res;
    run_check(img, 0, &res);
    for (guint i = 0; i < res.messages->len; i++) {
        g_printerr("%s\n", (char *)res.messages->pdata[i]);
    }
    g_assert_cmpuint(res.corruptions, ==, 0);
    g_ptr_array_unref(res.messages);
}

static void
compare_image(VdkImage *img, const uint8_t *model, uint64_t size)
{
    uint8_t *buf = g_malloc(MiB);
    for (uint64_t off = 0; off < size; off += MiB) {
        size_t n = (size_t)MIN((uint64_t)MiB, size - off);
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

static void
run_model(const TestVariant *v, const char *create_opts)
{
    char *path = test_path("model.vdi");
    uint8_t *model = g_malloc0(MODEL_SIZE);
    uint64_t seed = 0x7d1 + (create_opts ? 1 : 0);
    create_vdi(path, MODEL_SIZE, create_opts);
    VdkImage *img = open_ok(path, v, false);
    GError *err = NULL;
    enum { DEPTH = 16 };
    VdkQueue *q = vdk_queue_new(img, DEPTH, &err);
    g_assert_no_error(err);
    struct {
        uint64_t off, len;
        int kind;
        uint8_t *buf;
    } ops[DEPTH];
    for (unsigned round = 0; round < 150; round++) {
        unsigned n = 1 + (unsigned)(test_rand(&seed) % DEPTH);
        uint64_t slot = MODEL_SIZE / DEPTH; /* 1.5 MiB: neighbours share blocks */
        for (unsigned i = 0; i < n; i++) {
            uint64_t off = slot * i + test_rand(&seed) % (slot / 2);
            uint64_t len = 1 + test_rand(&seed) % (slot / 2);
            int kind = (int)(test_rand(&seed) % 10);
            kind = kind < 3 ? 0 : kind < 7 ? 1 : kind < 8 ? 2 : kind < 9 ? 3 : 4;
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
            case 4:
                r = vdk_queue_discard(q, off, len, i);
                break;
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
                g_error("round %u op %u (kind %d) failed: %s", round, i, ops[i].kind,
                        g_strerror((int)-c[k].result));
            }
            if (ops[i].kind == 0) {
                g_assert_cmpmem(ops[i].buf, ops[i].len, model + ops[i].off, ops[i].len);
            }
        }
        for (unsigned i = 0; i < n; i++) {
            if (ops[i].kind == 4) {
                /* discard: whatever the image reads now is the truth */
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
    img = open_ok(path, v, true);
    compare_image(img, model, MODEL_SIZE);
    check_clean(img);
    vdk_image_close(img, NULL);
    char *qemu_img = g_find_program_in_path("qemu-img");
    if (qemu_img) {
        char *cmd = g_strdup_printf("'%s' check -q -f vdi '%s'", qemu_img, path);
        g_assert_cmpint(test_sh(cmd), ==, 0);
        g_free(cmd);
        g_free(qemu_img);
    }
    g_free(model);
    g_free(path);
}

static void
test_model_dynamic(const TestVariant *v)
{
    run_model(v, NULL);
}

static void
test_model_static(const TestVariant *v)
{
    run_model(v, "static=on");
}

/* ------------------------------------------------------------------------ */

static uint32_t
file_u32(const char *path, uint64_t off)
{
    uint8_t b[4];
    int fd = open(path, O_RDONLY);
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(pread(fd, b, 4, (off_t)off), ==, 4);
    close(fd);
    return (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
}

static void
file_put_u32(const char *path, uint64_t off, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    int fd = open(path, O_WRONLY);
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(pwrite(fd, b, 4, (off_t)off), ==, 4);
    close(fd);
}

static uint64_t
file_size(const char *path)
{
    GBytes *b = test_read_file(path);
    uint64_t n = g_bytes_get_size(b);
    g_bytes_unref(b);
    return n;
}

static void
test_alloc(const TestVariant *v)
{
    char *path = test_path("alloc.vdi");
    create_vdi(path, 64 * MiB, NULL);
    uint32_t data = file_u32(path, 0x158);
    uint32_t bmap = file_u32(path, 0x154);
    g_assert_cmpuint(data % MiB, ==, 0);
    g_assert_cmpuint(file_size(path), ==, data);
    VdkImage *img = open_ok(path, v, false);
    uint8_t *buf = NULL;
    g_assert_cmpint(posix_memalign((void **)&buf, 4096, 8192), ==, 0);
    memset(buf, 0xa5, 8192);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 8192, 5 * MiB + 4096, 0), ==, 0);
    memset(buf, 0x5a, 4096);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 4096, 2 * MiB, 0), ==, 0);
    /* in memory only until the flush */
    g_assert_cmpuint(file_u32(path, bmap + 5 * 4), ==, 0xffffffffu);
    g_assert_cmpuint(file_u32(path, 0x184), ==, 0);
    VdkBlockStatus bs;
    g_assert_cmpint(vdk_image_block_status(img, 5 * MiB, MiB, &bs), ==, 0);
    g_assert_true(bs.flags & VDK_BS_DATA);
    g_assert_cmpuint(bs.host_offset, ==, data);
    g_assert_cmpuint(bs.length, ==, MiB);
    g_assert_cmpint(vdk_image_block_status(img, 0, 2 * MiB, &bs), ==, 0);
    g_assert_false(bs.flags & VDK_BS_DATA);
    g_assert_true(bs.flags & VDK_BS_ZERO);
    g_assert_cmpuint(bs.length, ==, 2 * MiB);
    g_assert_cmpint(vdk_image_flush(img), ==, 0);
    g_assert_cmpuint(file_u32(path, bmap + 5 * 4), ==, 0);
    g_assert_cmpuint(file_u32(path, bmap + 2 * 4), ==, 1);
    g_assert_cmpuint(file_u32(path, 0x184), ==, 2);
    /* two blocks, no more (the unwritten rest of each is a hole or an
     * fallocated zero range, depending on the file system) */
    g_assert_cmpuint(file_size(path), ==, data + 2 * MiB);
    g_assert_cmpuint(test_allocated(path), <=, (uint64_t)data + 2 * MiB + 64 * 1024);
    /* the rest of the new blocks reads as zeroes */
    uint8_t *rb = g_malloc(MiB);
    g_assert_cmpint(vdk_image_pread(img, rb, MiB, 5 * MiB), ==, 0);
    for (uint32_t i = 0; i < MiB; i++) {
        uint8_t want = (i >= 4096 && i < 4096 + 8192) ? 0xa5 : 0;
        if (rb[i] != want) {
            g_error("byte %u of block 5 is 0x%02x", i, rb[i]);
        }
    }
    /* write_zeroes on an allocated block keeps it mapped and zeroes it */
    g_assert_cmpint(vdk_image_write_zeroes(img, 5 * MiB, MiB, VDK_REQ_MAY_UNMAP), ==, 0);
    g_assert_cmpint(vdk_image_pread(img, rb, MiB, 5 * MiB), ==, 0);
    g_assert_true(vdk_buffer_is_zero(rb, MiB));
    /* discard of a partial block does nothing; of a whole one, zeroes */
    g_assert_cmpint(vdk_image_discard(img, 2 * MiB, 4096), ==, 0);
    g_assert_cmpint(vdk_image_pread(img, rb, 4096, 2 * MiB), ==, 0);
    g_assert_cmpuint(rb[0], ==, 0x5a);
    g_assert_cmpint(vdk_image_discard(img, 2 * MiB, MiB), ==, 0);
    g_assert_cmpint(vdk_image_pread(img, rb, MiB, 2 * MiB), ==, 0);
    g_assert_true(vdk_buffer_is_zero(rb, MiB));
    g_assert_cmpint(vdk_image_block_status(img, 2 * MiB, MiB, &bs), ==, 0);
    g_assert_false(bs.flags & VDK_BS_DATA);
    g_assert_true(bs.flags & VDK_BS_ZERO);
    check_clean(img);
    /* still mapped on disk while open (the count must name it) ... */
    g_assert_cmpuint(file_u32(path, bmap + 2 * 4), ==, 1);
    g_assert_true(vdk_image_close(img, NULL));
    /* ... and unmapped at close, the file cut after the one block left */
    g_assert_cmpuint(file_u32(path, bmap + 2 * 4), ==, 0xffffffffu);
    g_assert_cmpuint(file_u32(path, bmap + 5 * 4), ==, 0);
    g_assert_cmpuint(file_u32(path, 0x184), ==, 1);
    g_assert_cmpuint(file_size(path), ==, data + MiB);
    free(buf);
    g_free(rb);
    g_free(path);
}

/* ------------------------------------------------------------------------ */

typedef struct {
    const char *name;
    uint32_t off;
    int bytes;
    uint64_t value;
    const char *needle;
} HeaderCase;

static const HeaderCase header_cases[] = {
    {"signature", 0x40, 4, 0xdeadbeef, "signature"},
    {"version-1.0", 0x44, 4, 0x00010000, "version 1.0"},
    {"version-2.1", 0x44, 4, 0x00020001, "version"},
    {"header-size-small", 0x48, 4, 0x100, "header size"},
    {"header-size-huge", 0x48, 4, 0x10000, "header size"},
    {"image-type-undo", 0x4c, 4, 3, "undo"},
    {"image-type-0", 0x4c, 4, 0, "image type"},
    {"image-type-5", 0x4c, 4, 5, "image type"},
    {"bmap-offset-unaligned", 0x154, 4, 0x204, "block map offset"},
    {"bmap-offset-in-header", 0x154, 4, 0x0, "block map offset"},
    {"data-offset-unaligned", 0x158, 4, 0x100001, "data offset"},
    {"data-offset-before-map-end", 0x158, 4, 0x200, "data offset"},
    {"sector-size", 0x168, 4, 4096, "sector size"},
    {"disk-size-too-large", 0x170, 8, 65 * (uint64_t)MiB, "disk size"},
    {"block-size-2M", 0x178, 4, 2 * MiB, "block size"},
    {"block-size-0", 0x178, 4, 0, "block size"},
    {"block-extra", 0x17c, 4, 512, "extra data"},
    {"blocks-too-many", 0x180, 4, 0xffffffffu, "blocks in image"},
    {"blocks-fewer-than-size", 0x180, 4, 3, "disk size"},
    {"blocks-allocated", 0x184, 4, 65, "blocks allocated"},
};

static void
test_header_case(gconstpointer data)
{
    const HeaderCase *c = data;
    char *path = test_path("hdr.vdi");
    create_vdi(path, 64 * MiB, NULL);
    GBytes *b = test_read_file(path);
    uint8_t h[512];
    memcpy(h, g_bytes_get_data(b, NULL), 512);
    g_bytes_unref(b);
    uint64_t ds;
    uint32_t blocks;
    GError *err = NULL;
    g_assert_true(vdk_vdi_parse_header(h, &ds, &blocks, &err));
    g_assert_cmpuint(ds, ==, 64 * MiB);
    g_assert_cmpuint(blocks, ==, 64);
    for (int i = 0; i < c->bytes; i++) {
        h[c->off + i] = (uint8_t)(c->value >> (8 * i));
    }
    g_assert_false(vdk_vdi_parse_header(h, &ds, &blocks, &err));
    g_assert_nonnull(err);
    if (!strstr(err->message, c->needle) || strncmp(err->message, "vdi: ", 5) != 0) {
        g_error("%s: error '%s' does not name '%s'", c->name, err->message, c->needle);
    }
    g_clear_error(&err);
    /* and the same through a real open (no crash, one error) */
    int fd = open(path, O_WRONLY);
    g_assert_cmpint(pwrite(fd, h, 512, 0), ==, 512);
    close(fd);
    g_assert_null(open_vdi(path, NULL, true, &err));
    g_assert_nonnull(err);
    g_assert_null(strchr(err->message, '\n'));
    g_clear_error(&err);
    g_free(path);
}

static void
test_differencing_refused(void)
{
    char *path = test_path("diff.vdi");
    create_vdi(path, 4 * MiB, NULL);
    file_put_u32(path, 0x4c, 4);
    GError *err = NULL;
    g_assert_null(open_vdi(path, NULL, true, &err));
    g_assert_nonnull(strstr(err->message, "differencing"));
    g_clear_error(&err);
    g_free(path);
}

static void
test_bad_entry(void)
{
    char *path = test_path("bad.vdi");
    create_vdi(path, 4 * MiB, NULL);
    VdkImage *img = open_ok(path, NULL, false);
    uint8_t buf[4096];
    memset(buf, 0x33, sizeof(buf));
    g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), 0, 0), ==, 0);
    g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), MiB, 0), ==, 0);
    g_assert_true(vdk_image_close(img, NULL));
    uint32_t bmap = file_u32(path, 0x154);
    file_put_u32(path, bmap, 1000);
    GError *err = NULL;
    g_assert_null(open_vdi(path, NULL, false, &err));
    g_assert_nonnull(strstr(err->message, "out of range"));
    g_clear_error(&err);
    img = open_ok(path, NULL, true);
    g_assert_cmpint(vdk_image_pread(img, buf, sizeof(buf), 0), ==, -EIO);
    g_assert_cmpint(vdk_image_pread(img, buf, sizeof(buf), MiB), ==, 0);
    g_assert_cmpuint(buf[0], ==, 0x33);
    VdkCheckResult res;
    run_check(img, 0, &res);
    g_assert_cmpuint(res.corruptions, ==, 2); /* the entry, and the count */
    g_ptr_array_unref(res.messages);
    vdk_image_close(img, NULL);
    /* repair */
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_format(o, "vdi");
    vdk_open_options_set(o, "check", "on");
    vdk_open_options_set(o, "repair", "on");
    img = vdk_image_open(path, o, &err);
    vdk_open_options_free(o);
    g_assert_no_error(err);
    run_check(img, VDK_CHECK_FIX_LEAKS | VDK_CHECK_FIX_ERRORS, &res);
    g_assert_cmpuint(res.corruptions, ==, 0);
    g_assert_cmpuint(res.corruptions_fixed, ==, 2);
    g_ptr_array_unref(res.messages);
    g_assert_true(vdk_image_close(img, NULL));
    img = open_ok(path, NULL, false);
    g_assert_cmpint(vdk_image_pread(img, buf, sizeof(buf), MiB), ==, 0);
    g_assert_cmpuint(buf[0], ==, 0x33);
    g_assert_cmpint(vdk_image_pread(img, buf, sizeof(buf), 0), ==, 0);
    g_assert_cmpuint(buf[0], ==, 0);
    check_clean(img);
    vdk_image_close(img, NULL);
    g_free(path);
}

/* ------------------------------------------------------------------------ */

static VdkImage *
open_fault(const char *path)
{
    GError *err = NULL;
    const VdkIoEngine *inner = vdk_io_engine_select("threads", NULL, &err);
    g_assert_no_error(err);
    vdk_io_fault_set_inner(inner);
    TestVariant fv = {"fault", "writeback"};
    return open_ok(path, &fv, false);
}

/* The on-disk state: every mapped index is below the on-disk count and
 * used once. */
static void
assert_disk_consistent(const char *path, uint32_t blocks)
{
    uint32_t bmap = file_u32(path, 0x154);
    uint32_t count = file_u32(path, 0x184);
    uint8_t seen[64] = {0};
    g_assert_cmpuint(blocks, <=, 64);
    for (uint32_t b = 0; b < blocks; b++) {
        uint32_t e = file_u32(path, bmap + 4 * b);
        if (e >= 0xfffffffeu) {
            continue;
        }
        if (e >= count) {
            g_error("block %u maps index %u but the header counts %u", b, e, count);
        }
        g_assert_false(seen[e]);
        seen[e] = 1;
    }
}

static void
test_fault_flush(void)
{
    char *path = test_path("fault.vdi");
    uint8_t buf[4096];
    for (int k = 1; k <= 4; k++) {
        create_vdi(path, 8 * MiB, NULL);
        VdkImage *img = open_fault(path);
        memset(buf, 0x10 + k, sizeof(buf));
        g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), MiB, 0), ==, 0);
        g_assert_cmpint(vdk_image_flush(img), ==, 0);
        g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), 5 * MiB, 0), ==, 0);
        g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), 3 * MiB, 0), ==, 0);
        vdk_io_fault_set(-1, (uint64_t)k, -EIO, false);
        g_assert_cmpint(vdk_image_flush(img), ==, -EIO);
        g_assert_cmpuint(vdk_io_fault_hits(), ==, 1);
        vdk_io_fault_set(0, 0, 0, false);
        assert_disk_consistent(path, 8);
        bool sync_failed = k == 2 || k == 4; /* header, sync, map, sync */
        if (sync_failed) {
            /* a failed fdatasync sticks to the file: later flushes fail
             * too (the block layer's rule), the image stays consistent */
            g_assert_cmpint(vdk_image_flush(img), ==, -EIO);
            vdk_image_close(img, NULL);
            assert_disk_consistent(path, 8);
            img = open_ok(path, NULL, true);
            VdkCheckResult res;
            run_check(img, 0, &res);
            for (guint i = 0; i < res.messages->len; i++) {
                g_assert_true(g_str_has_prefix(res.messages->pdata[i], "ERROR: allocated blocks mismatch"));
            }
            g_ptr_array_unref(res.messages);
            uint8_t back[4096];
            g_assert_cmpint(vdk_image_pread(img, back, sizeof(back), MiB), ==, 0);
            g_assert_cmpmem(back, sizeof(back), buf, sizeof(buf));
            vdk_image_close(img, NULL);
            continue;
        }
        /* the next flush writes what the failed one did not */
        g_assert_cmpint(vdk_image_flush(img), ==, 0);
        assert_disk_consistent(path, 8);
        g_assert_cmpuint(file_u32(path, 0x184), ==, 3);
        g_assert_true(vdk_image_close(img, NULL));
        img = open_ok(path, NULL, true);
        for (uint64_t off = MiB; off < 6 * MiB; off += 2 * MiB) {
            uint8_t back[4096];
            g_assert_cmpint(vdk_image_pread(img, back, sizeof(back), off), ==, 0);
            g_assert_cmpmem(back, sizeof(back), buf, sizeof(buf));
        }
        check_clean(img);
        vdk_image_close(img, NULL);
    }
    g_free(path);
}

static void
test_fault_data(void)
{
    char *path = test_path("fault-data.vdi");
    create_vdi(path, 8 * MiB, NULL);
    VdkImage *img = open_fault(path);
    uint8_t buf[4096];
    memset(buf, 0x42, sizeof(buf));
    vdk_io_fault_set(VDK_IO_WRITEV, 1, -EIO, false);
    g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), 2 * MiB, 0), ==, -EIO);
    vdk_io_fault_set(0, 0, 0, false);
    uint8_t back[4096];
    g_assert_cmpint(vdk_image_pread(img, back, sizeof(back), 2 * MiB), ==, 0);
    g_assert_true(vdk_buffer_is_zero(back, sizeof(back)));
    /* the index is given back: the next block takes index 0 */
    g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), 6 * MiB, 0), ==, 0);
    g_assert_true(vdk_image_close(img, NULL));
    g_assert_cmpuint(file_u32(path, file_u32(path, 0x154) + 6 * 4), ==, 0);
    g_assert_cmpuint(file_u32(path, 0x184), ==, 1);
    img = open_ok(path, NULL, true);
    check_clean(img);
    vdk_image_close(img, NULL);
    g_free(path);
}

/* ------------------------------------------------------------------------ */

#define CRASH_SIZE (16u << 20)
#define CRASH_OPS 300

static void
test_crash(const TestVariant *v)
{
    char *path = test_path("crash.vdi");
    for (int iter = 0; iter < 10; iter++) {
        uint64_t seed = 2000 + (uint64_t)iter;
        create_vdi(path, CRASH_SIZE, NULL);
        TestCrash c;
        test_crash_run(&c, path, "vdi", v->engine, CRASH_SIZE, CRASH_OPS, seed, 2 + iter * 7 % 40);
        /* at worst blocks counted but not referenced: nothing else */
        VdkImage *img = open_ok(path, NULL, true);
        VdkCheckResult res;
        run_check(img, 0, &res);
        for (guint i = 0; i < res.messages->len; i++) {
            const char *m = res.messages->pdata[i];
            if (!g_str_has_prefix(m, "ERROR: allocated blocks mismatch")) {
                g_error("iteration %d: %s", iter, m);
            }
        }
        g_ptr_array_unref(res.messages);
        uint8_t *buf = test_crash_verify(&c, img, iter);
        vdk_image_close(img, NULL);
        /* the repair makes qemu-img happy and keeps the data */
        VdkOpenOptions *o = vdk_open_options_new();
        vdk_open_options_set_format(o, "vdi");
        vdk_open_options_set(o, "check", "on");
        vdk_open_options_set(o, "repair", "on");
        img = vdk_image_open(path, o, NULL);
        vdk_open_options_free(o);
        g_assert_nonnull(img);
        run_check(img, VDK_CHECK_FIX_ERRORS | VDK_CHECK_FIX_LEAKS, &res);
        g_assert_cmpuint(res.corruptions, ==, 0);
        g_ptr_array_unref(res.messages);
        uint8_t *buf2 = g_malloc(CRASH_SIZE);
        g_assert_cmpint(vdk_image_pread(img, buf2, CRASH_SIZE, 0), ==, 0);
        g_assert_true(memcmp(buf, buf2, CRASH_SIZE) == 0);
        g_assert_true(vdk_image_close(img, NULL));
        char *qemu_img = g_find_program_in_path("qemu-img");
        if (qemu_img) {
            char *cmd = g_strdup_printf("'%s' check -q -f vdi '%s'", qemu_img, path);
            int rc = test_sh(cmd);
            if (rc != 0) {
                g_error("iteration %d: qemu-img check says %d after repair", iter, rc);
            }
            g_free(cmd);
            g_free(qemu_img);
        }
        g_free(buf);
        g_free(buf2);
        test_crash_clear(&c);
    }
    g_free(path);
}

int
main(int argc, char **argv)
{
    static const char *const buffered[] = {"writeback", NULL};
    test_init(&argc, &argv);
    test_add_variants("vdi", "model-dynamic", test_model_dynamic, NULL);
    test_add_variants("vdi", "model-static", test_model_static, buffered);
    test_add_variants("vdi", "alloc", test_alloc, NULL);
    for (size_t i = 0; i < G_N_ELEMENTS(header_cases); i++) {
        char *p = g_strdup_printf("/vdi/header/%s", header_cases[i].name);
        g_test_add_data_func(p, &header_cases[i], test_header_case);
        g_free(p);
    }
    g_test_add_func("/vdi/header/differencing-needs-parent", test_differencing_refused);
    g_test_add_func("/vdi/map/bad-entry", test_bad_entry);
    g_test_add_func("/vdi/fault/flush-steps", test_fault_flush);
    g_test_add_func("/vdi/fault/data-write", test_fault_data);
    test_add_variants("vdi", "crash-sigkill", test_crash, buffered);
    return g_test_run();
}
