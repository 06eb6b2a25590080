/* SPDX-License-Identifier: MIT */
/*
 * test-lock.c - image locking through the library API: the bytes a writer
 * and a reader lock (probed with F_OFD_GETLK from another open file, as a
 * QEMU peer sees them), writers excluding writers and readers of formatted
 * images, raw readers sharing writes, force-share, locking=on/off/auto,
 * backing files locked as readers, and create refusing to replace an image
 * that is open.  OFD locks belong to the open file, so two opens in one
 * process see each other like two processes do (the interop test covers
 * qemu-io and qemu-img as the peers).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

#define MSG "image is in use by another process"

static void
create_image(const char *path, const char *format, const char *backing)
{
    GError *err = NULL;
    VdkCreateOptions *o = vdk_create_options_new(format, &err);
    g_assert_no_error(err);
    g_assert_true(vdk_create_options_set(o, "size", "1M", &err));
    if (backing) {
        g_assert_true(vdk_create_options_set(o, "backing_file", backing, &err));
        g_assert_true(vdk_create_options_set(o, "backing_fmt", format, &err));
    }
    vdk_create_options_set_overwrite(o, true);
    g_assert_true(vdk_image_create(path, o, &err));
    g_assert_no_error(err);
    vdk_create_options_free(o);
}

typedef struct {
    bool read_only;
    bool force_share;
    const char *locking; /* NULL: default */
} OpenHow;

static VdkImage *
open_how(const char *path, const char *format, OpenHow how, GError **error)
{
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_format(o, format);
    vdk_open_options_set_read_only(o, how.read_only);
    vdk_open_options_set_force_share(o, how.force_share);
    if (how.locking) {
        vdk_open_options_set(o, "locking", how.locking);
    }
    VdkImage *img = vdk_image_open(path, o, error);
    vdk_open_options_free(o);
    return img;
}

static VdkImage *
open_ok(const char *path, const char *format, OpenHow how)
{
    GError *err = NULL;
    VdkImage *img = open_how(path, format, how, &err);
    g_assert_no_error(err);
    g_assert_nonnull(img);
    return img;
}

static void
open_refused(const char *path, const char *format, OpenHow how)
{
    GError *err = NULL;
    VdkImage *img = open_how(path, format, how, &err);
    g_assert_null(img);
    g_assert_error(err, VDK_ERROR, EAGAIN);
    g_assert_nonnull(strstr(err->message, MSG));
    g_error_free(err);
}

static void
close_ok(VdkImage *img)
{
    GError *err = NULL;
    g_assert_true(vdk_image_close(img, &err));
    g_assert_no_error(err);
}

/* The lock bytes in 100..104 and 200..204 that some other open file holds,
 * as a bit set: bit n for byte 100 + n, bit 8 + n for byte 200 + n. */
static unsigned
held_bytes(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    g_assert_cmpint(fd, >=, 0);
    unsigned set = 0;
    for (int base = 0; base < 2; base++) {
        for (int n = 0; n <= 4; n++) {
            struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 100 + 100 * base + n, .l_len = 1};
            g_assert_cmpint(fcntl(fd, F_OFD_GETLK, &fl), ==, 0);
            if (fl.l_type != F_UNLCK) {
                set |= 1u << (8 * base + n);
            }
        }
    }
    close(fd);
    return set;
}

#define USE(n) (1u << (n))
#define UNSHARE(n) (1u << (8 + (n)))

static void
test_bytes(void)
{
    char *q = test_path("bytes.qcow2");
    char *r = test_path("bytes.raw");
    create_image(q, "qcow2", NULL);
    create_image(r, "raw", NULL);
    g_assert_cmphex(held_bytes(q), ==, 0);
    /* QEMU's writer: uses consistent read, write, resize; shares neither
     * write nor resize.  Its reader through qcow2: uses consistent read,
     * shares neither; through raw: shares everything. */
    VdkImage *img = open_ok(q, "qcow2", (OpenHow){0});
    g_assert_cmphex(held_bytes(q), ==, USE(0) | USE(1) | USE(3) | UNSHARE(1) | UNSHARE(3));
    close_ok(img);
    g_assert_cmphex(held_bytes(q), ==, 0);
    img = open_ok(q, "qcow2", (OpenHow){.read_only = true});
    g_assert_cmphex(held_bytes(q), ==, USE(0) | UNSHARE(1) | UNSHARE(3));
    close_ok(img);
    img = open_ok(r, "raw", (OpenHow){.read_only = true});
    g_assert_cmphex(held_bytes(r), ==, USE(0));
    close_ok(img);
    img = open_ok(r, "raw", (OpenHow){0});
    g_assert_cmphex(held_bytes(r), ==, USE(0) | USE(1) | USE(3) | UNSHARE(1) | UNSHARE(3));
    close_ok(img);
    /* force-share and locking=off take nothing; locking=on the same as auto */
    img = open_ok(q, "qcow2", (OpenHow){.read_only = true, .force_share = true});
    g_assert_cmphex(held_bytes(q), ==, 0);
    close_ok(img);
    img = open_ok(q, "qcow2", (OpenHow){.locking = "off"});
    g_assert_cmphex(held_bytes(q), ==, 0);
    close_ok(img);
    img = open_ok(q, "qcow2", (OpenHow){.locking = "on"});
    g_assert_cmphex(held_bytes(q), ==, USE(0) | USE(1) | USE(3) | UNSHARE(1) | UNSHARE(3));
    close_ok(img);
    g_free(q);
    g_free(r);
}

static void
test_writers(void)
{
    char *q = test_path("w.qcow2");
    create_image(q, "qcow2", NULL);
    VdkImage *a = open_ok(q, "qcow2", (OpenHow){0});
    open_refused(q, "qcow2", (OpenHow){0});
    open_refused(q, "qcow2", (OpenHow){.read_only = true});
    open_refused(q, "qcow2", (OpenHow){.locking = "on"});
    /* -U peeks; locking=off does not look at all */
    VdkImage *b = open_ok(q, "qcow2", (OpenHow){.read_only = true, .force_share = true});
    close_ok(b);
    b = open_ok(q, "qcow2", (OpenHow){.read_only = true, .locking = "off"});
    close_ok(b);
    close_ok(a);
    /* the writer gone, the next one gets in */
    a = open_ok(q, "qcow2", (OpenHow){0});
    close_ok(a);
    g_free(q);
}

static void
test_readers(void)
{
    char *q = test_path("r.qcow2");
    char *r = test_path("r.raw");
    create_image(q, "qcow2", NULL);
    create_image(r, "raw", NULL);
    VdkImage *a = open_ok(q, "qcow2", (OpenHow){.read_only = true});
    VdkImage *b = open_ok(q, "qcow2", (OpenHow){.read_only = true});
    open_refused(q, "qcow2", (OpenHow){0});
    close_ok(a);
    open_refused(q, "qcow2", (OpenHow){0});
    close_ok(b);
    close_ok(open_ok(q, "qcow2", (OpenHow){0}));
    /* a raw reader shares writes (qemu-img's rule): a writer may come in,
     * and a raw reader may open beside a writer */
    a = open_ok(r, "raw", (OpenHow){.read_only = true});
    b = open_ok(r, "raw", (OpenHow){0});
    VdkImage *c = open_ok(r, "raw", (OpenHow){.read_only = true});
    open_refused(r, "raw", (OpenHow){0});
    close_ok(c);
    close_ok(b);
    close_ok(a);
    g_free(q);
    g_free(r);
}

static void
test_options(void)
{
    char *q = test_path("o.qcow2");
    create_image(q, "qcow2", NULL);
    GError *err = NULL;
    VdkImage *img = open_how(q, "qcow2", (OpenHow){.force_share = true}, &err);
    g_assert_null(img);
    g_assert_error(err, VDK_ERROR, EINVAL);
    g_assert_nonnull(strstr(err->message, "read-only"));
    g_clear_error(&err);
    img = open_how(q, "qcow2", (OpenHow){.read_only = true, .locking = "sometimes"}, &err);
    g_assert_null(img);
    g_assert_error(err, VDK_ERROR, EINVAL);
    g_assert_nonnull(strstr(err->message, "'sometimes'"));
    g_clear_error(&err);
    /* the typed setter, and the qemu spelling "file.locking" */
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_locking(o, VDK_LOCKING_OFF);
    VdkImage *a = vdk_image_open(q, o, &err);
    g_assert_no_error(err);
    VdkImage *b = vdk_image_open(q, o, &err);
    g_assert_no_error(err);
    g_assert_cmphex(held_bytes(q), ==, 0);
    close_ok(b);
    close_ok(a);
    vdk_open_options_set(o, "file.locking", "on");
    a = vdk_image_open(q, o, &err);
    g_assert_no_error(err);
    g_assert_cmphex(held_bytes(q), !=, 0);
    vdk_open_options_set_locking(o, VDK_LOCKING_AUTO);
    open_refused(q, "qcow2", (OpenHow){0});
    close_ok(a);
    vdk_open_options_free(o);
    g_free(q);
}

static void
test_backing(void)
{
    char *base = test_path("base.qcow2");
    char *top = test_path("top.qcow2");
    create_image(base, "qcow2", NULL);
    create_image(top, "qcow2", "base.qcow2");
    /* the backing file of a writer is read, locked as a reader */
    VdkImage *t = open_ok(top, "qcow2", (OpenHow){0});
    g_assert_cmphex(held_bytes(base), ==, USE(0) | UNSHARE(1) | UNSHARE(3));
    open_refused(base, "qcow2", (OpenHow){0});
    close_ok(open_ok(base, "qcow2", (OpenHow){.read_only = true}));
    close_ok(t);
    /* someone writing the backing file: the overlay cannot be opened */
    VdkImage *b = open_ok(base, "qcow2", (OpenHow){0});
    open_refused(top, "qcow2", (OpenHow){.read_only = true});
    close_ok(open_ok(top, "qcow2", (OpenHow){.read_only = true, .force_share = true}));
    close_ok(b);
    g_free(base);
    g_free(top);
}

static void
test_create_over_open_image(void)
{
    char *q = test_path("c.qcow2");
    create_image(q, "qcow2", NULL);
    struct stat before, after;
    g_assert_cmpint(stat(q, &before), ==, 0);
    for (int ro = 0; ro < 2; ro++) {
        VdkImage *img = open_ok(q, "qcow2", (OpenHow){.read_only = ro});
        GError *err = NULL;
        VdkCreateOptions *o = vdk_create_options_new("raw", &err);
        g_assert_true(vdk_create_options_set(o, "size", "2M", &err));
        vdk_create_options_set_overwrite(o, true);
        g_assert_false(vdk_image_create(q, o, &err));
        g_assert_error(err, VDK_ERROR, EAGAIN);
        g_assert_nonnull(strstr(err->message, MSG));
        g_clear_error(&err);
        vdk_create_options_free(o);
        close_ok(img);
        /* the open image is still the file under the name */
        g_assert_cmpint(stat(q, &after), ==, 0);
        g_assert_cmpuint(after.st_ino, ==, before.st_ino);
    }
    /* nobody has it open: replaced */
    create_image(q, "raw", NULL);
    g_assert_cmpint(stat(q, &after), ==, 0);
    g_assert_cmpuint(after.st_ino, !=, before.st_ino);
    g_assert_cmphex(held_bytes(q), ==, 0);
    g_free(q);
}

int
main(int argc, char **argv)
{
    test_init(&argc, &argv);
    g_test_add_func("/lock/bytes-as-qemu", test_bytes);
    g_test_add_func("/lock/writer-excludes-writers-and-readers", test_writers);
    g_test_add_func("/lock/readers-side-by-side", test_readers);
    g_test_add_func("/lock/options", test_options);
    g_test_add_func("/lock/backing-file", test_backing);
    g_test_add_func("/lock/create-over-open-image", test_create_over_open_image);
    return g_test_run();
}
