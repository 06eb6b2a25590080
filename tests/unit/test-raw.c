/* SPDX-License-Identifier: MIT */
/*
 * test-raw.c - the raw driver and image creation: sparse by default,
 * falloc/full preallocation with a free-space check, atomic create (no
 * half-made file under the final name, no overwrite unless asked), parallel
 * creates (the MicroVM.nix scenario), resize, qemu's probed-raw sector 0
 * rule, and raw images on a block device (a loop device, when one can be
 * set up).
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "block/block.h"
#include "testutil.h"

static bool
create_raw(const char *path, uint64_t size, const char *prealloc, bool overwrite, GError **error)
{
    GError *err = NULL;
    VdkCreateOptions *o = vdk_create_options_new("raw", &err);
    g_assert_no_error(err);
    char *s = g_strdup_printf("%" G_GUINT64_FORMAT, size);
    g_assert_true(vdk_create_options_set(o, "size", s, &err));
    g_free(s);
    if (prealloc) {
        g_assert_true(vdk_create_options_set(o, "preallocation", prealloc, &err));
    }
    vdk_create_options_set_overwrite(o, overwrite);
    bool ok = vdk_image_create(path, o, error);
    vdk_create_options_free(o);
    return ok;
}

/* Names in @dir other than . and .. */
static int
count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    g_assert_nonnull(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
            n++;
        }
    }
    closedir(d);
    return n;
}

static char *
fresh_dir(const char *name)
{
    char *d = test_path(name);
    g_assert_cmpint(g_mkdir_with_parents(d, 0755), ==, 0);
    return d;
}

static void
test_create_modes(void)
{
    char *dir = fresh_dir("modes");
    char *off = g_build_filename(dir, "off.raw", NULL);
    char *fa = g_build_filename(dir, "falloc.raw", NULL);
    char *full = g_build_filename(dir, "full.raw", NULL);
    GError *err = NULL;

    g_assert_true(create_raw(off, 64 << 20, NULL, false, &err));
    g_assert_no_error(err);
    struct stat st;
    g_assert_cmpint(stat(off, &st), ==, 0);
    g_assert_cmpint(st.st_size, ==, 64 << 20);
    g_assert_cmpint(st.st_blocks, ==, 0); /* sparse: truncate, not fallocate */
    g_assert_cmpint(st.st_mode & 0777, ==, 0644 & ~0);

    g_assert_true(create_raw(fa, 8 << 20, "falloc", false, &err));
    g_assert_cmpuint(test_allocated(fa), >=, 8 << 20);
    g_assert_true(create_raw(full, 8 << 20, "full", false, &err));
    g_assert_cmpuint(test_allocated(full), >=, 8 << 20);
    GBytes *b = test_read_file(full);
    g_assert_true(vdk_buffer_is_zero(g_bytes_get_data(b, NULL), g_bytes_get_size(b)));
    g_bytes_unref(b);

    /* Sizes round up to whole sectors, like qemu-img. */
    char *odd = g_build_filename(dir, "odd.raw", NULL);
    g_assert_true(create_raw(odd, 100, NULL, false, &err));
    g_assert_cmpint(stat(odd, &st), ==, 0);
    g_assert_cmpint(st.st_size, ==, 512);

    /* Nothing else appeared in the directory: no temporary files left. */
    g_assert_cmpint(count_entries(dir), ==, 4);
    g_free(odd);
    g_free(off);
    g_free(fa);
    g_free(full);
    g_free(dir);
}

static void
test_create_errors(void)
{
    char *dir = fresh_dir("errors");
    char *p = g_build_filename(dir, "exists.raw", NULL);
    GError *err = NULL;
    g_assert_true(g_file_set_contents(p, "precious", -1, NULL));

    /* An existing file is not overwritten unless asked. */
    g_assert_false(create_raw(p, 1 << 20, NULL, false, &err));
    g_assert_error(err, VDK_ERROR, EEXIST);
    g_assert_nonnull(strstr(err->message, "exists"));
    g_clear_error(&err);
    gchar *content = NULL;
    g_assert_true(g_file_get_contents(p, &content, NULL, NULL));
    g_assert_cmpstr(content, ==, "precious");
    g_free(content);

    g_assert_true(create_raw(p, 1 << 20, NULL, true, &err));
    struct stat st;
    g_assert_cmpint(stat(p, &st), ==, 0);
    g_assert_cmpint(st.st_size, ==, 1 << 20);

    /* Preallocating more than the filesystem has: a clear error naming both
     * sizes, and nothing left behind. */
    struct statvfs sv;
    g_assert_cmpint(statvfs(dir, &sv), ==, 0);
    uint64_t avail = (uint64_t)sv.f_bavail * sv.f_frsize;
    char *big = g_build_filename(dir, "big.raw", NULL);
    uint64_t want = avail + (1ULL << 40);
    g_assert_false(create_raw(big, want, "falloc", false, &err));
    g_assert_error(err, VDK_ERROR, ENOSPC);
    char *want_s = g_strdup_printf("%" G_GUINT64_FORMAT, want);
    g_assert_nonnull(strstr(err->message, want_s));
    g_assert_nonnull(strstr(err->message, "available"));
    g_free(want_s);
    g_clear_error(&err);
    g_assert_false(g_file_test(big, G_FILE_TEST_EXISTS));
    g_assert_cmpint(count_entries(dir), ==, 1);

    /* Bad options. */
    VdkCreateOptions *o = vdk_create_options_new("raw", &err);
    g_assert_false(vdk_create_options_set(o, "cluster_size", "65536", &err));
    g_assert_nonnull(strstr(err->message, "cluster_size"));
    g_clear_error(&err);
    g_assert_false(vdk_create_options_set(o, "size", "12x", &err));
    g_clear_error(&err);
    g_assert_true(vdk_create_options_set(o, "preallocation", "metadata", &err));
    g_assert_true(vdk_create_options_set(o, "size", "1M", &err));
    g_assert_false(vdk_image_create(big, o, &err));
    g_assert_nonnull(strstr(err->message, "metadata"));
    g_clear_error(&err);
    vdk_create_options_free(o);
    o = vdk_create_options_new("raw", &err);
    g_assert_false(vdk_image_create(big, o, &err)); /* no size */
    g_assert_nonnull(strstr(err->message, "size"));
    g_clear_error(&err);
    vdk_create_options_free(o);
    g_assert_null(vdk_create_options_new("nosuchformat", &err));
    g_clear_error(&err);
    /* A directory that does not exist */
    g_assert_false(create_raw("/nonexistent-dir-vdk/x.raw", 1 << 20, NULL, false, &err));
    g_assert_error(err, VDK_ERROR, ENOENT);
    g_clear_error(&err);
    g_assert_false(g_file_test(big, G_FILE_TEST_EXISTS));
    g_free(big);
    g_free(p);
    g_free(dir);
}

typedef struct {
    char *path;
    uint64_t size;
    const char *prealloc;
    bool ok;
    int code;
} CreateJob;

static gpointer
create_job(gpointer data)
{
    CreateJob *j = data;
    GError *err = NULL;
    j->ok = create_raw(j->path, j->size, j->prealloc, false, &err);
    j->code = err ? err->code : 0;
    g_clear_error(&err);
    return NULL;
}

static void
run_parallel(CreateJob *jobs, int n)
{
    GThread *t[16];
    g_assert_cmpint(n, <=, 16);
    for (int i = 0; i < n; i++) {
        t[i] = g_thread_new("create", create_job, &jobs[i]);
    }
    for (int i = 0; i < n; i++) {
        g_thread_join(t[i]);
    }
}

/* The MicroVM.nix scenario: 8 x 256 GiB sparse disks in parallel on this
 * machine's disk all succeed, whatever the free space. */
static void
test_parallel_sparse(void)
{
    char *dir = fresh_dir("parallel");
    CreateJob jobs[8];
    for (int i = 0; i < 8; i++) {
        jobs[i] = (CreateJob){g_strdup_printf("%s/disk%d.raw", dir, i), 256ULL << 30, NULL, false, 0};
    }
    run_parallel(jobs, 8);
    for (int i = 0; i < 8; i++) {
        g_assert_true(jobs[i].ok);
        struct stat st;
        g_assert_cmpint(stat(jobs[i].path, &st), ==, 0);
        g_assert_cmpuint((uint64_t)st.st_size, ==, 256ULL << 30);
        g_assert_cmpint(st.st_blocks, ==, 0);
        unlink(jobs[i].path);
        g_free(jobs[i].path);
    }
    g_free(dir);
}

/* falloc in parallel where not all fit: those that fail report ENOSPC and
 * leave nothing; those that succeed are fully allocated.  Runs on a
 * private small filesystem (tmpfs, or ext4 on a loop device) so the sizes
 * are chosen relative to its free space and the host disk is never filled. */
static void
test_parallel_falloc(void)
{
    if (geteuid() != 0) {
        g_test_skip("needs root to mount a private filesystem");
        return;
    }
    char *mnt = fresh_dir("smallfs");
    if (mount("vdk-test", mnt, "tmpfs", 0, "size=64m") != 0) {
        char *msg = g_strdup_printf("cannot mount a tmpfs: %s", g_strerror(errno));
        g_test_skip(msg);
        g_free(msg);
        g_free(mnt);
        return;
    }
    struct statvfs sv;
    g_assert_cmpint(statvfs(mnt, &sv), ==, 0);
    uint64_t avail = (uint64_t)sv.f_bavail * sv.f_frsize;
    /* Each image takes 2/9 of the free space: 4 of 8 fit, a fifth cannot. */
    uint64_t each = vdk_align_down(avail * 2 / 9, 1 << 20);
    CreateJob jobs[8];
    for (int i = 0; i < 8; i++) {
        jobs[i] = (CreateJob){g_strdup_printf("%s/disk%d.raw", mnt, i), each, "falloc", false, 0};
    }
    run_parallel(jobs, 8);
    int ok = 0;
    for (int i = 0; i < 8; i++) {
        if (jobs[i].ok) {
            ok++;
            g_assert_cmpuint(test_allocated(jobs[i].path), >=, each);
        } else {
            g_assert_cmpint(jobs[i].code, ==, ENOSPC);
            g_assert_false(g_file_test(jobs[i].path, G_FILE_TEST_EXISTS));
        }
    }
    g_assert_cmpint(ok, >=, 1);
    g_assert_cmpint(ok, <=, 4);
    /* Only the finished images are in the directory. */
    g_assert_cmpint(count_entries(mnt), ==, ok);
    for (int i = 0; i < 8; i++) {
        g_free(jobs[i].path);
    }
    g_assert_cmpint(umount(mnt), ==, 0);
    g_free(mnt);
}

static void
test_resize(void)
{
    char *p = test_path("resize.raw");
    GError *err = NULL;
    g_assert_true(create_raw(p, 1 << 20, NULL, false, &err));
    VdkImage *img = test_open(p, "raw", NULL, false);
    uint8_t buf[4096];
    memset(buf, 0x11, sizeof(buf));
    g_assert_cmpint(vdk_image_pwrite(img, buf, sizeof(buf), (1 << 20) - 4096, 0), ==, 0);
    g_assert_true(vdk_image_resize(img, 2 << 20, false, VDK_PREALLOC_OFF, &err));
    g_assert_cmpuint(vdk_image_get_size(img), ==, 2 << 20);
    g_assert_cmpint(vdk_image_pread(img, buf, sizeof(buf), (2 << 20) - 4096), ==, 0);
    g_assert_true(vdk_buffer_is_zero(buf, sizeof(buf)));
    /* Shrinking needs the flag. */
    g_assert_false(vdk_image_resize(img, 512 << 10, false, VDK_PREALLOC_OFF, &err));
    g_assert_nonnull(strstr(err->message, "shrink"));
    g_clear_error(&err);
    g_assert_cmpuint(vdk_image_get_size(img), ==, 2 << 20);
    g_assert_true(vdk_image_resize(img, 512 << 10, true, VDK_PREALLOC_OFF, &err));
    g_assert_cmpuint(vdk_image_get_size(img), ==, 512 << 10);
    /* Requests past the new end are refused. */
    g_assert_cmpint(vdk_image_pread(img, buf, 1, 512 << 10), ==, -EINVAL);
    g_assert_true(vdk_image_resize(img, 4 << 20, false, VDK_PREALLOC_FALLOC, &err));
    g_assert_true(vdk_image_resize(img, 8 << 20, false, VDK_PREALLOC_FULL, &err));
    vdk_image_close(img, NULL);
    g_assert_cmpuint(test_allocated(p), >=, (8 << 20) - (512 << 10));
    struct stat st;
    g_assert_cmpint(stat(p, &st), ==, 0);
    g_assert_cmpint(st.st_size, ==, 8 << 20);
    g_free(p);
}

/* qemu's rule: probing chose raw for a writable open, so writes that would
 * turn sector 0 into another format's header fail with EPERM, whether or
 * not this build has a driver for that format. */
static void
test_probed_raw_sector0(void)
{
    char *p = test_path("probed.raw");
    test_make_sparse(p, 1 << 20);
    GError *err = NULL;
    VdkOpenOptions *o = vdk_open_options_new();
    VdkImage *img = vdk_image_open(p, o, &err);
    g_assert_no_error(err);
    g_assert_cmpstr(vdk_image_get_format(img), ==, "raw");
    g_assert_cmpint(vdk_image_pwrite(img, "hello", 5, 0, 0), ==, 0);
    char back[5];
    g_assert_cmpint(vdk_image_pread(img, back, 5, 0), ==, 0);
    g_assert_cmpmem(back, 5, "hello", 5);

    static const struct {
        const char *what;
        uint64_t off;
        const char *bytes;
        size_t len;
    } headers[] = {
        {"qcow2", 0, "QFI\xfb\0\0\0\3", 8},
        {"qcow", 0, "QFI\xfb\0\0\0\1", 8},
        {"vmdk", 0, "KDMV", 4},
        {"vmdk-text", 0, "# Disk DescriptorFile\n", 22},
        {"vdi", 0x40, "\x7f\x10\xda\xbe\x01\x00\x01\x00", 8},
        {"vpc", 0, "conectix", 8},
        {"vhdx", 0, "vhdxfile", 8},
        {"qed", 0, "QED\0", 4},
    };
    uint8_t sec[512];
    for (size_t i = 0; i < G_N_ELEMENTS(headers); i++) {
        memset(sec, 0, sizeof(sec));
        memcpy(sec + headers[i].off, headers[i].bytes, headers[i].len);
        /* the whole sector at once */
        if (vdk_image_pwrite(img, sec, sizeof(sec), 0, 0) != -EPERM) {
            g_error("a %s header in sector 0 was not refused", headers[i].what);
        }
        /* and byte by byte, back to front: only the first byte completes
         * the header (the checks merge each write into sector 0) */
        for (size_t k = headers[i].len - 1; k > 0; k--) {
            g_assert_cmpint(vdk_image_pwrite(img, headers[i].bytes + k, 1, headers[i].off + k, 0), ==, 0);
        }
        g_assert_cmpint(vdk_image_pwrite(img, headers[i].bytes, 1, headers[i].off, 0), ==, -EPERM);
        /* clear the prefix again */
        g_assert_cmpint(vdk_image_write_zeroes(img, 0, 512, 0), ==, 0);
    }
    /* qcow2's magic alone (version 0) is not a qcow2 header */
    g_assert_cmpint(vdk_image_pwrite(img, "QFI\xfb", 4, 0, 0), ==, 0);
    vdk_image_close(img, NULL);

    /* With the format named, no restriction. */
    vdk_open_options_set_format(o, "raw");
    img = vdk_image_open(p, o, &err);
    memset(sec, 0, sizeof(sec));
    memcpy(sec, "QFI\xfb\0\0\0\3", 8);
    g_assert_cmpint(vdk_image_pwrite(img, sec, sizeof(sec), 0, 0), ==, 0);
    vdk_image_close(img, NULL);

    /* Now the file looks like qcow2: probing opens it as qcow2 (whose
     * header checks then refuse this one), never as raw. */
    vdk_open_options_set_format(o, NULL);
    g_assert_null(vdk_image_open(p, o, &err));
    g_assert_nonnull(strstr(err->message, "qcow2"));
    g_clear_error(&err);
    /* A format this build cannot open is refused by name. */
    vdk_open_options_set_format(o, "raw");
    img = vdk_image_open(p, o, &err);
    memset(sec, 0, sizeof(sec));
    memcpy(sec, "conectix", 8);
    g_assert_cmpint(vdk_image_pwrite(img, sec, sizeof(sec), 0, 0), ==, 0);
    vdk_image_close(img, NULL);
    vdk_open_options_set_format(o, NULL);
    g_assert_null(vdk_image_open(p, o, &err));
    g_assert_error(err, VDK_ERROR, ENOTSUP);
    g_assert_nonnull(strstr(err->message, "vpc"));
    g_clear_error(&err);
    vdk_open_options_free(o);
    g_free(p);
}

/* write_zeroes on filesystems that lack the fast paths: tmpfs has no
 * ZERO_RANGE (punch a hole, then allocate again unless unmapping is
 * allowed), ramfs has no fallocate at all (write zero buffers; NO_FALLBACK
 * refuses; discard is advisory and succeeds). */
static bool
check_zero_fs(const char *fstype, bool has_punch)
{
    char *mnt = g_strdup_printf("%s/%s", test_dir(), fstype);
    g_assert_cmpint(g_mkdir_with_parents(mnt, 0755), ==, 0);
    if (mount("vdk-test", mnt, fstype, 0, g_str_equal(fstype, "tmpfs") ? "size=16m" : NULL) != 0) {
        char *msg = g_strdup_printf("cannot mount %s: %s", fstype, g_strerror(errno));
        g_test_skip(msg);
        g_free(msg);
        g_free(mnt);
        return false;
    }
    char *p = g_strdup_printf("%s/z.raw", mnt);
    test_make_sparse(p, 4 << 20);
    VdkImage *img = test_open(p, "raw", NULL, false);
    uint8_t *buf = g_malloc(1 << 20);
    memset(buf, 0x99, 1 << 20);
    g_assert_cmpint(vdk_image_pwrite(img, buf, 1 << 20, 0, 0), ==, 0);
    g_assert_cmpint(vdk_image_flush(img), ==, 0);
    uint64_t before = test_allocated(p);

    g_assert_cmpint(vdk_image_write_zeroes(img, 4096, 65536, 0), ==, 0);
    g_assert_cmpint(vdk_image_write_zeroes(img, 200000, 1000, 0), ==, 0); /* unaligned */
    int r = vdk_image_write_zeroes(img, 300000, 65536, VDK_REQ_NO_FALLBACK);
    g_assert_cmpint(r, ==, has_punch ? 0 : -ENOTSUP);
    g_assert_cmpint(vdk_image_pread(img, buf, 1 << 20, 0), ==, 0);
    for (size_t i = 0; i < (1 << 20); i++) {
        bool zero = (i >= 4096 && i < 4096 + 65536) || (i >= 200000 && i < 201000) ||
                    (has_punch && i >= 300000 && i < 300000 + 65536);
        if (buf[i] != (zero ? 0 : 0x99)) {
            g_error("%s: byte %zu is 0x%02x", fstype, i, buf[i]);
        }
    }
    /* Without MAY_UNMAP the range stays allocated. */
    g_assert_cmpuint(test_allocated(p), ==, before);
    if (has_punch) {
        g_assert_cmpint(vdk_image_write_zeroes(img, 512 << 10, 256 << 10, VDK_REQ_MAY_UNMAP), ==, 0);
        g_assert_cmpuint(test_allocated(p), ==, before - (256 << 10));
    }
    g_assert_cmpint(vdk_image_discard(img, 768 << 10, 64 << 10), ==, 0);
    vdk_image_close(img, NULL);
    g_free(buf);
    g_free(p);
    g_assert_cmpint(umount(mnt), ==, 0);
    g_free(mnt);
    return true;
}

static void
test_zero_fallbacks(void)
{
    if (geteuid() != 0) {
        g_test_skip("needs root to mount tmpfs and ramfs");
        return;
    }
    if (check_zero_fs("tmpfs", true)) {
        check_zero_fs("ramfs", false);
    }
}

static void
test_open_errors(void)
{
    GError *err = NULL;
    VdkOpenOptions *o = vdk_open_options_new();
    g_assert_null(vdk_image_open("/nonexistent/file.raw", o, &err));
    g_assert_error(err, VDK_ERROR, ENOENT);
    g_clear_error(&err);
    g_assert_null(vdk_image_open(test_dir(), o, &err));
    g_assert_error(err, VDK_ERROR, EISDIR);
    g_clear_error(&err);
    char *p = test_path("opt.raw");
    test_make_sparse(p, 1 << 20);
    vdk_open_options_set(o, "l2-cache-size", "1M");
    g_assert_null(vdk_image_open(p, o, &err));
    g_assert_nonnull(strstr(err->message, "l2-cache-size"));
    g_clear_error(&err);
    vdk_open_options_free(o);
    o = vdk_open_options_new();
    vdk_open_options_set_format(o, "nosuch");
    g_assert_null(vdk_image_open(p, o, &err));
    g_assert_nonnull(strstr(err->message, "nosuch"));
    g_clear_error(&err);
    g_assert_false(vdk_open_options_set_engine(o, "spdk", &err));
    g_clear_error(&err);
    g_assert_false(vdk_open_options_set_cache(o, "fast", &err));
    g_clear_error(&err);
    vdk_open_options_free(o);
    g_free(p);
}

/* Raw on a block device: a loop device stands in for an LVM volume. */
static void
test_block_device(void)
{
    if (geteuid() != 0) {
        g_test_skip("needs root for a loop device");
        return;
    }
    char *backing = test_path("loop-backing.img");
    test_make_sparse(backing, 32 << 20);
    char *cmd = g_strdup_printf("losetup -f --show '%s' 2>/dev/null", backing);
    FILE *f = popen(cmd, "r");
    g_free(cmd);
    char dev[256] = "";
    if (!f || !fgets(dev, sizeof(dev), f) || pclose(f) != 0 || dev[0] != '/') {
        g_test_skip("no loop device could be set up here");
        g_free(backing);
        return;
    }
    g_strchomp(dev);
    GError *err = NULL;
    static const char *const caches[] = {"writeback", "none"};
    for (size_t ci = 0; ci < G_N_ELEMENTS(caches); ci++) {
        TestVariant v = {"auto", caches[ci]};
        VdkOpenOptions *o = vdk_open_options_new();
        vdk_open_options_set_format(o, "raw");
        g_assert_true(vdk_open_options_set_cache(o, v.cache, &err));
        VdkImage *img = vdk_image_open(dev, o, &err);
        vdk_open_options_free(o);
        g_assert_no_error(err);
        g_assert_cmpuint(vdk_image_get_size(img), ==, 32 << 20);
        uint8_t *buf = g_malloc(1 << 20);
        memset(buf, 0x5c, 1 << 20);
        g_assert_cmpint(vdk_image_pwrite(img, buf, 1 << 20, 1 << 20, 0), ==, 0);
        g_assert_cmpint(vdk_image_pwrite(img, buf, 3000, 1000, 0), ==, 0); /* unaligned */
        g_assert_cmpint(vdk_image_flush(img), ==, 0);
        memset(buf, 0, 1 << 20);
        g_assert_cmpint(vdk_image_pread(img, buf, 3000, 1000), ==, 0);
        for (int i = 0; i < 3000; i++) {
            g_assert_cmpint(buf[i], ==, 0x5c);
        }
        /* BLKZEROOUT (aligned) and the write fallback (unaligned) */
        g_assert_cmpint(vdk_image_write_zeroes(img, 1 << 20, 65536, 0), ==, 0);
        g_assert_cmpint(vdk_image_write_zeroes(img, (1 << 20) + 70000, 100, 0), ==, 0);
        g_assert_cmpint(vdk_image_pread(img, buf, 1 << 20, 1 << 20), ==, 0);
        for (int i = 0; i < (1 << 20); i++) {
            bool zero = i < 65536 || (i >= 70000 && i < 70100);
            g_assert_cmpint(buf[i], ==, zero ? 0 : 0x5c);
        }
        /* BLKDISCARD: accepted (content afterwards is device-defined) */
        g_assert_cmpint(vdk_image_discard(img, 4 << 20, 1 << 20), ==, 0);
        VdkBlockStatus bs;
        g_assert_cmpint(vdk_image_block_status(img, 0, 32 << 20, &bs), ==, 0);
        g_assert_true(bs.flags & VDK_BS_DATA);
        g_assert_cmpuint(bs.length, ==, 32 << 20);
        g_assert_false(vdk_image_resize(img, 64 << 20, false, VDK_PREALLOC_OFF, &err));
        g_assert_nonnull(strstr(err->message, "block device"));
        g_clear_error(&err);
        g_free(buf);
        vdk_image_close(img, NULL);
    }
    /* create on an existing device formats it in place; too big fails */
    g_assert_true(create_raw(dev, 16 << 20, NULL, false, &err));
    g_assert_no_error(err);
    g_assert_false(create_raw(dev, 64 << 20, NULL, false, &err));
    g_assert_error(err, VDK_ERROR, ENOSPC);
    g_clear_error(&err);
    cmd = g_strdup_printf("losetup -d '%s'", dev);
    g_assert_cmpint(test_sh(cmd), ==, 0);
    g_free(cmd);
    g_free(backing);
}

int
main(int argc, char **argv)
{
    test_init(&argc, &argv);
    g_test_add_func("/raw/create/modes", test_create_modes);
    g_test_add_func("/raw/create/errors-leave-nothing", test_create_errors);
    g_test_add_func("/raw/create/parallel-8x256G-sparse", test_parallel_sparse);
    g_test_add_func("/raw/create/parallel-falloc-enospc", test_parallel_falloc);
    g_test_add_func("/raw/resize", test_resize);
    g_test_add_func("/raw/probed-raw-sector0", test_probed_raw_sector0);
    g_test_add_func("/raw/open-errors", test_open_errors);
    g_test_add_func("/raw/write-zeroes-fallbacks", test_zero_fallbacks);
    g_test_add_func("/raw/block-device", test_block_device);
    return g_test_run();
}
