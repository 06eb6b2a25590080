/* SPDX-License-Identifier: MIT */
/*
 * create.c - creating images atomically.
 *
 * The driver writes the new image into an unnamed file (O_TMPFILE) in the
 * target directory, or a hidden temporary name where the filesystem lacks
 * O_TMPFILE.  Only when the driver succeeded and the data is on disk is the
 * file linked under its final name (linkat/link, which fails instead of
 * replacing an existing file) or renamed over it (when overwriting was
 * asked for), and the directory synced.  A failure or an interruption at any
 * point leaves nothing under the final name; with O_TMPFILE it leaves
 * nothing at all.
 *
 * Existing block devices are formatted in place (they cannot be renamed),
 * like qemu-img does.
 *
 * Sizes are rounded up to 512 bytes, as qemu-img does for every format.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "block/block.h"

typedef struct CreateExtra CreateExtra;

struct VdkCreateCtx {
    const char *filename;
    char *dir;
    VdkFile *file;
    bool in_place;
    char *tmpname; /* named temporary (no O_TMPFILE), or NULL */
    CreateExtra *extras; /* further files of a multi-file image (vmdk extents) */
    bool overwrite;      /* existing files are replaced */
};

/* A further file: built like the main one, published just before it. */
struct CreateExtra {
    VdkCreateCtx cc;   /* filename (owned), dir (shared), file, tmpname */
    bool linked;       /* published under its final name */
    VdkFile *old;      /* the file it replaces, locked (hold_old_file) */
    CreateExtra *next;
};

/* An existing file about to be replaced may be an image another process
 * has open (a VM, qemu-img, another vdk).  qemu-img create refuses then (it
 * takes the image locks on the old file first), and so do we: the old file
 * gets writer locks, held until the new file has replaced it, so a QEMU
 * starting meanwhile finds it busy too.  A file we cannot read has nothing to
 * tell; the replace itself decides. */
static bool
hold_old_file(const char *filename, VdkFile **held, GError **error)
{
    *held = NULL;
    VdkFile *f = vdk_file_open(filename, true, VDK_CACHE_WRITEBACK, NULL);
    if (!f) {
        return true;
    }
    if (!vdk_file_lock(f, true, VDK_LOCK_META, false, error)) {
        vdk_file_close(f);
        return false;
    }
    *held = f;
    return true;
}

VdkCreateOptions *
vdk_create_options_new(const char *format, GError **error)
{
    const VdkFormat *drv = vdk_format_find(format);
    if (!drv) {
        g_set_error(error, VDK_ERROR, EINVAL, "unknown format '%s'", format);
        return NULL;
    }
    if (!drv->create) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "%s: format does not support image creation", format);
        return NULL;
    }
    VdkCreateOptions *o = g_new0(VdkCreateOptions, 1);
    o->drv = drv;
    o->kv = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
    o->order = g_ptr_array_new_with_free_func(g_free);
    return o;
}

void
vdk_create_options_free(VdkCreateOptions *o)
{
    if (!o) {
        return;
    }
    g_hash_table_unref(o->kv);
    g_ptr_array_unref(o->order);
    if (o->secrets) {
        g_hash_table_unref(o->secrets);
    }
    g_free(o);
}

void
vdk_create_options_set_overwrite(VdkCreateOptions *o, bool overwrite)
{
    o->overwrite = overwrite;
}

void
vdk_create_options_set_open_backing(VdkCreateOptions *o, bool open)
{
    o->no_backing_open = !open;
}

bool
vdk_create_backing_probe(const VdkCreateOptions *o, const char *filename, uint64_t *size, GError **error)
{
    const char *backing = vdk_create_opt(o, "backing_file");
    const char *fmt = vdk_create_opt(o, "backing_fmt");
    if (!backing) {
        return true;
    }
    if (o->no_backing_open) {
        if (!fmt) {
            g_set_error(error, VDK_ERROR, EINVAL,
                        "Backing file specified without backing format (give it with -F or -o backing_fmt=)");
            return false;
        }
        return true;
    }
    char *path = vdk_backing_path(filename, backing);
    VdkOpenOptions *bo = vdk_open_options_new();
    vdk_open_options_set_read_only(bo, true);
    vdk_open_options_set(bo, "no-io", "on"); /* its size only: an encrypted one needs no passphrase */
    if (fmt) {
        vdk_open_options_set_format(bo, fmt);
    }
    GError *err = NULL;
    VdkImage *b = vdk_image_open(path, bo, &err);
    vdk_open_options_free(bo);
    if (!b) {
        g_set_error(error, VDK_ERROR, err->code, "Could not open backing file '%s': %s", path, err->message);
        g_error_free(err);
        g_free(path);
        return false;
    }
    g_free(path);
    bool ok = true;
    if (!fmt) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "Backing file specified without backing format (detected format of %s; use -F %s)",
                    vdk_image_get_format(b), vdk_image_get_format(b));
        ok = false;
    } else if (size) {
        *size = vdk_image_get_size(b);
    }
    vdk_image_close(b, NULL);
    return ok;
}

bool
vdk_create_options_check_backing(VdkCreateOptions *o, const char *filename, GError **error)
{
    uint64_t size = 0;
    if (!vdk_create_backing_probe(o, filename, &size, error)) {
        return false;
    }
    if (vdk_create_opt(o, "backing_file") && !o->no_backing_open && !vdk_create_opt(o, "size")) {
        char *v = g_strdup_printf("%" G_GUINT64_FORMAT, size);
        bool ok = vdk_create_options_set(o, "size", v, error);
        g_free(v);
        return ok;
    }
    return true;
}

static bool
parse_bool(const char *v, bool *out)
{
    if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "1")) {
        *out = true;
        return true;
    }
    if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "0")) {
        *out = false;
        return true;
    }
    return false;
}

bool
vdk_create_options_set(VdkCreateOptions *o, const char *key, const char *value, GError **error)
{
    const VdkOptionDesc *d = o->drv->create_opts;
    for (; d && d->name; d++) {
        if (strcmp(d->name, key) == 0) {
            break;
        }
    }
    if (!d || !d->name) {
        g_set_error(error, VDK_ERROR, EINVAL, "%s: invalid parameter '%s' (see -o help)", o->drv->name, key);
        return false;
    }
    switch (d->type) {
    case VDK_OPT_SIZE: {
        uint64_t v;
        GError *err = NULL;
        if (!vdk_parse_size(value, &v, &err)) {
            g_set_error(error, VDK_ERROR, EINVAL, "%s: parameter '%s': %s", o->drv->name, key, err->message);
            g_error_free(err);
            return false;
        }
        break;
    }
    case VDK_OPT_BOOL: {
        bool b;
        if (!parse_bool(value, &b)) {
            g_set_error(error, VDK_ERROR, EINVAL, "%s: parameter '%s' expects 'on' or 'off', not '%s'",
                        o->drv->name, key, value);
            return false;
        }
        break;
    }
    case VDK_OPT_NUMBER: {
        char *end = NULL;
        errno = 0;
        unsigned long long v = g_ascii_strtoull(value, &end, 10);
        (void)v;
        if (!*value || *end || errno) {
            g_set_error(error, VDK_ERROR, EINVAL, "%s: parameter '%s' expects a number, not '%s'",
                        o->drv->name, key, value);
            return false;
        }
        break;
    }
    case VDK_OPT_STRING:
        break;
    }
    if (!g_hash_table_contains(o->kv, key)) {
        g_ptr_array_add(o->order, g_strdup(key));
    }
    g_hash_table_replace(o->kv, g_strdup(key), g_strdup(value));
    return true;
}

const char *
vdk_create_opt(const VdkCreateOptions *o, const char *key)
{
    return g_hash_table_lookup(o->kv, key);
}

bool
vdk_create_opt_size(const VdkCreateOptions *o, const char *key, uint64_t *out, bool *present, GError **error)
{
    const char *v = vdk_create_opt(o, key);
    *present = v != NULL;
    if (!v) {
        return true;
    }
    return vdk_parse_size(v, out, error);
}

bool
vdk_create_opt_bool(const VdkCreateOptions *o, const char *key, bool def, bool *out, GError **error)
{
    const char *v = vdk_create_opt(o, key);
    if (!v) {
        *out = def;
        return true;
    }
    if (!parse_bool(v, out)) {
        g_set_error(error, VDK_ERROR, EINVAL, "parameter '%s' expects 'on' or 'off', not '%s'", key, v);
        return false;
    }
    return true;
}

bool
vdk_create_opt_prealloc(const VdkCreateOptions *o, VdkPrealloc *out, GError **error)
{
    const char *v = vdk_create_opt(o, "preallocation");
    if (!v || !strcmp(v, "off")) {
        *out = VDK_PREALLOC_OFF;
    } else if (!strcmp(v, "metadata")) {
        *out = VDK_PREALLOC_METADATA;
    } else if (!strcmp(v, "falloc")) {
        *out = VDK_PREALLOC_FALLOC;
    } else if (!strcmp(v, "full")) {
        *out = VDK_PREALLOC_FULL;
    } else {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "invalid preallocation mode '%s' (expected off, metadata, falloc or full)", v);
        return false;
    }
    return true;
}

VdkFile *
vdk_create_main_file(VdkCreateCtx *cc)
{
    return cc->file;
}

const char *
vdk_create_filename(VdkCreateCtx *cc)
{
    return cc->filename;
}

bool
vdk_create_check_space(VdkCreateCtx *cc, uint64_t need, GError **error)
{
    if (cc->file->is_blockdev) {
        return true;
    }
    struct statvfs sv;
    if (fstatvfs(cc->file->fd, &sv) < 0) {
        g_set_error(error, VDK_ERROR, errno, "cannot query free space: %s", g_strerror(errno));
        return false;
    }
    uint64_t avail;
    if (vdk_mul_overflows((uint64_t)sv.f_bavail, (uint64_t)sv.f_frsize, &avail)) {
        avail = UINT64_MAX;
    }
    uint64_t have = vdk_file_allocated_bytes(cc->file);
    uint64_t more = need > have ? need - have : 0;
    if (more > avail) {
        char *n = vdk_size_to_str(more);
        char *a = vdk_size_to_str(avail);
        g_set_error(error, VDK_ERROR, ENOSPC,
                    "not enough free space: preallocation needs %" G_GUINT64_FORMAT " bytes (%s), only %"
                    G_GUINT64_FORMAT " bytes (%s) available",
                    more, n, avail, a);
        g_free(n);
        g_free(a);
        return false;
    }
    return true;
}

static int
open_tmp(VdkCreateCtx *cc, GError **error)
{
    int fd = open(cc->dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0666);
    if (fd >= 0) {
        return fd;
    }
    int e = errno;
    if (e != EOPNOTSUPP && e != EISDIR && e != EINVAL) {
        g_set_error(error, VDK_ERROR, e, "cannot create a file in '%s': %s", cc->dir, g_strerror(e));
        return -1;
    }
    char *base = g_path_get_basename(cc->filename);
    cc->tmpname = g_strdup_printf("%s/.%s.vdk-XXXXXX", cc->dir, base);
    g_free(base);
    fd = mkostemp(cc->tmpname, O_CLOEXEC);
    if (fd < 0) {
        e = errno;
        g_set_error(error, VDK_ERROR, e, "cannot create a file in '%s': %s", cc->dir, g_strerror(e));
        g_free(cc->tmpname);
        cc->tmpname = NULL;
        return -1;
    }
    if (fchmod(fd, 0644) < 0) {
        /* keep mkostemp's 0600: safe, merely stricter */
    }
    return fd;
}

static bool
publish(VdkCreateCtx *cc, bool overwrite, GError **error)
{
    char proc[64];
    g_snprintf(proc, sizeof(proc), "/proc/self/fd/%d", cc->file->fd);
    const char *src = cc->tmpname ? cc->tmpname : proc;
    int flags = cc->tmpname ? 0 : AT_SYMLINK_FOLLOW;

    if (!overwrite) {
        if (linkat(AT_FDCWD, src, AT_FDCWD, cc->filename, flags) == 0) {
            if (cc->tmpname) {
                unlink(cc->tmpname);
            }
            return true;
        }
        int e = errno;
        if (e == EEXIST) {
            g_set_error(error, VDK_ERROR, EEXIST, "file exists (use --force to overwrite it)");
            return false;
        }
        if (!cc->tmpname || (e != EPERM && e != EOPNOTSUPP)) {
            g_set_error(error, VDK_ERROR, e, "cannot link the new image into place: %s", g_strerror(e));
            return false;
        }
        /* No hard links on this filesystem: rename, after a last check. */
        if (access(cc->filename, F_OK) == 0) {
            g_set_error(error, VDK_ERROR, EEXIST, "file exists (use --force to overwrite it)");
            return false;
        }
    }
    if (!cc->tmpname) {
        /* Give the unnamed file a hidden name, then rename it over. */
        char *base = g_path_get_basename(cc->filename);
        for (int i = 0; i < 100 && !cc->tmpname; i++) {
            char *t = g_strdup_printf("%s/.%s.vdk-%08x", cc->dir, base, g_random_int());
            if (linkat(AT_FDCWD, proc, AT_FDCWD, t, AT_SYMLINK_FOLLOW) == 0) {
                cc->tmpname = t;
            } else {
                int e = errno;
                g_free(t);
                if (e != EEXIST) {
                    g_free(base);
                    g_set_error(error, VDK_ERROR, e, "cannot link the new image into place: %s", g_strerror(e));
                    return false;
                }
            }
        }
        g_free(base);
        if (!cc->tmpname) {
            g_set_error(error, VDK_ERROR, EEXIST, "cannot find a free temporary name in '%s'", cc->dir);
            return false;
        }
    }
    if (rename(cc->tmpname, cc->filename) < 0) {
        int e = errno;
        g_set_error(error, VDK_ERROR, e, "cannot rename the new image into place: %s", g_strerror(e));
        return false;
    }
    g_free(cc->tmpname);
    cc->tmpname = NULL;
    return true;
}

static void
sync_dir(const char *dir)
{
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        if (fsync(dfd) < 0) {
            /* best effort: the name is in place either way */
        }
        close(dfd);
    }
}

VdkFile *
vdk_create_extra_file(VdkCreateCtx *cc, const char *name, GError **error)
{
    if (cc->in_place || !*name || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, "..")) {
        g_set_error(error, VDK_ERROR, EINVAL, "cannot create the extra file '%s' here", name);
        return NULL;
    }
    CreateExtra *x = g_new0(CreateExtra, 1);
    x->cc.filename = g_build_filename(cc->dir, name, NULL);
    x->cc.dir = cc->dir;
    GError *err = NULL;
    if (cc->overwrite && !hold_old_file(x->cc.filename, &x->old, &err)) {
        g_set_error(error, VDK_ERROR, err->code, "%s: %s", x->cc.filename, err->message);
        g_error_free(err);
        g_free((char *)x->cc.filename);
        g_free(x);
        return NULL;
    }
    int fd = open_tmp(&x->cc, error);
    if (fd < 0) {
        vdk_file_close(x->old);
        g_free((char *)x->cc.filename);
        g_free(x);
        return NULL;
    }
    x->cc.file = vdk_file_new_from_fd(fd, x->cc.filename, false, VDK_CACHE_WRITEBACK, error);
    if (!x->cc.file) {
        close(fd);
        vdk_file_close(x->old);
        if (x->cc.tmpname) {
            unlink(x->cc.tmpname);
            g_free(x->cc.tmpname);
        }
        g_free((char *)x->cc.filename);
        g_free(x);
        return NULL;
    }
    x->next = cc->extras;
    cc->extras = x;
    return x->cc.file;
}

/* Sync and publish the extra files; on failure the ones already published
 * are removed again by the caller (extras_cleanup). */
static bool
extras_publish(VdkCreateCtx *cc, bool overwrite, GError **error)
{
    for (CreateExtra *x = cc->extras; x; x = x->next) {
        if (fdatasync(x->cc.file->fd) < 0) {
            g_set_error(error, VDK_ERROR, errno, "cannot sync '%s': %s", x->cc.filename, g_strerror(errno));
            return false;
        }
        GError *err = NULL;
        if (!publish(&x->cc, overwrite, &err)) {
            g_set_error(error, VDK_ERROR, err->code, "%s: %s", x->cc.filename, err->message);
            g_error_free(err);
            return false;
        }
        x->linked = true;
    }
    return true;
}

static void
extras_cleanup(VdkCreateCtx *cc, bool ok)
{
    CreateExtra *x = cc->extras;
    while (x) {
        CreateExtra *next = x->next;
        if (!ok && x->linked) {
            unlink(x->cc.filename);
        }
        if (x->cc.tmpname) {
            unlink(x->cc.tmpname);
            g_free(x->cc.tmpname);
        }
        vdk_file_close(x->cc.file);
        vdk_file_close(x->old);
        g_free((char *)x->cc.filename);
        g_free(x);
        x = next;
    }
    cc->extras = NULL;
}

bool
vdk_image_create(const char *filename, const VdkCreateOptions *opts, GError **error)
{
    VdkCreateOptions *o = (VdkCreateOptions *)opts;
    VdkCreateCtx cc = {.filename = filename, .overwrite = o->overwrite};
    bool ok = false;
    int fd = -1;
    VdkFile *old = NULL;

    /* qemu-img rounds every image size up to whole 512-byte sectors. */
    const char *sz = vdk_create_opt(o, "size");
    if (sz) {
        uint64_t v;
        if (!vdk_parse_size(sz, &v, error)) {
            return false;
        }
        if (v % 512) {
            v = vdk_align_up(v, 512);
            g_hash_table_replace(o->kv, g_strdup("size"), g_strdup_printf("%" G_GUINT64_FORMAT, v));
        }
    }

    struct stat st;
    if (stat(filename, &st) == 0) {
        if (S_ISBLK(st.st_mode)) {
            cc.in_place = true;
        } else if (S_ISDIR(st.st_mode)) {
            g_set_error(error, VDK_ERROR, EISDIR, "is a directory");
            return false;
        } else if (!o->overwrite) {
            g_set_error(error, VDK_ERROR, EEXIST, "file exists (use --force to overwrite it)");
            return false;
        } else if (!hold_old_file(filename, &old, error)) {
            return false;
        }
    }

    if (cc.in_place) {
        fd = open(filename, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            g_set_error(error, VDK_ERROR, errno, "cannot open: %s", g_strerror(errno));
            return false;
        }
    } else {
        cc.dir = g_path_get_dirname(filename);
        fd = open_tmp(&cc, error);
        if (fd < 0) {
            goto out;
        }
    }
    cc.file = vdk_file_new_from_fd(fd, filename, false, VDK_CACHE_WRITEBACK, error);
    if (!cc.file) {
        close(fd);
        goto out;
    }
    /* formatting a device in place: a writer of it, locked as one */
    if (cc.in_place && !vdk_file_lock(cc.file, true, VDK_LOCK_META, false, error)) {
        goto out;
    }
    if (!o->drv->create(&cc, o, error)) {
        goto out;
    }
    if (fdatasync(cc.file->fd) < 0) {
        g_set_error(error, VDK_ERROR, errno, "cannot sync the new image: %s", g_strerror(errno));
        goto out;
    }
    if (!cc.in_place) {
        if (!extras_publish(&cc, o->overwrite, error) || !publish(&cc, o->overwrite, error)) {
            goto out;
        }
        sync_dir(cc.dir);
    }
    ok = true;
out:
    extras_cleanup(&cc, ok);
    if (cc.tmpname) {
        unlink(cc.tmpname);
        g_free(cc.tmpname);
    }
    vdk_file_close(cc.file);
    vdk_file_close(old);
    g_free(cc.dir);
    return ok;
}

/* ------------------------------------------------------------------------ */
/* Measuring                                                                 */
/* ------------------------------------------------------------------------ */

bool
vdk_measure_allocated(VdkImage *src, uint64_t unit, uint64_t *out, GError **error)
{
    uint64_t size = vdk_image_get_size(src);
    uint64_t total = 0;
    uint64_t off = 0;
    while (off < size) {
        VdkBlockStatus bs;
        int r = vdk_image_block_status(src, off, size - off, &bs);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "block status failed at offset %" G_GUINT64_FORMAT ": %s", off,
                        g_strerror(-r));
            return false;
        }
        uint64_t n = bs.length;
        if (!(bs.flags & VDK_BS_ZERO) && (bs.flags & VDK_BS_DATA)) {
            /* the data's units, from the start of the first one */
            uint64_t end = MIN(vdk_align_up(off + n, unit), vdk_align_up(size, unit));
            total += off % unit + (end - off);
            n = end - off;
        }
        off += n;
    }
    *out = total;
    return true;
}

bool
vdk_measure(const VdkCreateOptions *opts, VdkImage *src, VdkMeasure *out, GError **error)
{
    memset(out, 0, sizeof(*out));
    if (!opts->drv->measure) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "%s: format does not support size measurement", opts->drv->name);
        return false;
    }
    uint64_t size;
    if (src) {
        size = vdk_image_get_size(src);
    } else {
        bool present = false;
        if (!vdk_create_opt_size(opts, "size", &size, &present, error)) {
            return false;
        }
        if (!present) {
            g_set_error(error, VDK_ERROR, EINVAL, "Either --size N or one filename must be specified.");
            return false;
        }
    }
    return opts->drv->measure(opts, src, size, out, error);
}
