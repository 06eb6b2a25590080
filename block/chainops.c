/* SPDX-License-Identifier: MIT */
/*
 * chainops.c - operations on backing chains: commit (an overlay's data
 * into a backing file) and rebase (another backing file, with the guest
 * view unchanged), as qemu-img commit / rebase do them.
 *
 * Both run on the sync API in large chunks driven by block status, so
 * they read only what is allocated where it matters.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "block/block.h"

#define CHAIN_CHUNK (4u << 20)

static void *
chunk_buffer(GError **error)
{
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, CHAIN_CHUNK) != 0) {
        g_set_error(error, VDK_ERROR, ENOMEM, "cannot allocate a %u-byte buffer", CHAIN_CHUNK);
        return NULL;
    }
    return buf;
}

static bool
same_file(const char *path, VdkNode *n)
{
    struct stat a, b;
    if (stat(path, &a) != 0 || fstat(n->file->fd, &b) != 0) {
        return false;
    }
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* This process holds @n read-only (reader locks) and now opens it to
 * write: its reader locks go first so they do not count as another user's;
 * the writable open then takes writer locks (and finds any other user). */
static VdkImage *
open_node_rw(VdkImage *img, VdkNode *n, GError **error)
{
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_format(o, n->drv->name);
    vdk_open_options_set_read_only(o, false);
    o->cache = img->opts.cache;
    o->locking = img->opts.locking;
    if (img->opts.engine && !vdk_open_options_set_engine(o, img->opts.engine, error)) {
        vdk_open_options_free(o);
        return NULL;
    }
    bool relock = vdk_open_options_locks(&img->opts);
    if (relock) {
        vdk_file_unlock(n->file);
    }
    VdkImage *r = vdk_image_open(n->filename, o, error);
    vdk_open_options_free(o);
    if (!r && relock) {
        (void)vdk_file_lock(n->file, false, n->drv == &vdk_format_raw ? 0 : VDK_LOCK_META, false, NULL);
    }
    return r;
}

/* The writable copy of @n is closed: @n's reader locks again. */
static void
close_node_rw(VdkImage *img, VdkNode *n, VdkImage *r, GError **error)
{
    (void)vdk_image_close(r, error);
    if (vdk_open_options_locks(&img->opts)) {
        (void)vdk_file_lock(n->file, false, n->drv == &vdk_format_raw ? 0 : VDK_LOCK_META, false, NULL);
    }
}

bool
vdk_image_commit(VdkImage *img, const char *base_name, bool keep_overlay,
                 bool (*progress)(void *opaque, uint64_t done, uint64_t total), void *opaque, GError **error)
{
    VdkNode *top = img->top;
    if (!top->backing) {
        g_set_error(error, VDK_ERROR, EINVAL, "Image does not have a backing file");
        return false;
    }
    if (top->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    VdkNode *base = top->backing;
    if (base_name) {
        for (base = top->backing; base && !same_file(base_name, base); base = base->backing) {
        }
        if (!base) {
            g_set_error(error, VDK_ERROR, ENOENT, "Did not find '%s' in the backing chain of '%s'", base_name,
                        top->filename);
            return false;
        }
        /* the images between would be left inconsistent: the top keeps its
         * data (qemu: -b implies -d) */
        keep_overlay = true;
    }
    void *buf = chunk_buffer(error);
    if (!buf) {
        return false;
    }
    GError *err = NULL;
    VdkImage *bimg = open_node_rw(img, base, &err);
    if (!bimg) {
        g_set_error(error, VDK_ERROR, err->code, "cannot open the base image '%s' for writing: %s", base->filename,
                    err->message);
        g_error_free(err);
        free(buf);
        return false;
    }
    bool ok = false;
    uint64_t size = top->size;
    int r = 0;
    if (vdk_image_get_size(bimg) < size && !vdk_image_resize(bimg, size, false, VDK_PREALLOC_OFF, &err)) {
        g_set_error(error, VDK_ERROR, err->code, "cannot grow the base image to %" G_GUINT64_FORMAT " bytes: %s",
                    size, err->message);
        g_error_free(err);
        goto out;
    }
    for (uint64_t off = 0; off < size;) {
        VdkBlockStatus bs;
        r = vdk_image_block_status(img, off, size - off, &bs);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "block status failed at offset %" G_GUINT64_FORMAT ": %s", off,
                        g_strerror(-r));
            goto out;
        }
        uint64_t len = MIN(bs.length, (uint64_t)CHAIN_CHUNK);
        if ((bs.flags & VDK_BS_ALLOCATED) && bs.depth < base->depth) {
            if ((bs.flags & VDK_BS_ZERO) && !(bs.flags & VDK_BS_DATA)) {
                r = vdk_image_write_zeroes(bimg, off, len, 0);
            } else {
                r = vdk_image_pread(img, buf, (size_t)len, off);
                if (r >= 0) {
                    r = vdk_image_pwrite(bimg, buf, (size_t)len, off, 0);
                }
            }
            if (r < 0) {
                g_set_error(error, VDK_ERROR, -r, "copying to the base failed at offset %" G_GUINT64_FORMAT ": %s",
                            off, g_strerror(-r));
                goto out;
            }
        }
        off += len;
        if (progress && !progress(opaque, off, size)) {
            g_set_error(error, VDK_ERROR, ECANCELED, "cancelled");
            goto out;
        }
    }
    r = vdk_image_flush(bimg);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "flushing the base image failed: %s", g_strerror(-r));
        goto out;
    }
    ok = true;
out:
    close_node_rw(img, base, bimg, ok ? &err : NULL);
    if (err && ok) {
        g_set_error(error, VDK_ERROR, err->code, "closing the base image failed: %s", err->message);
        ok = false;
    }
    g_clear_error(&err);
    free(buf);
    if (!ok || keep_overlay) {
        return ok;
    }
    /* The base has the data durably: the overlay can let it show through. */
    r = vdk_image_sync_request(img, VDK_OP_DISCARD, 0, NULL, size, VDK_DISCARD_UNALLOC, NULL);
    if (r == 0) {
        r = vdk_image_flush(img);
    }
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "emptying the image after the commit failed: %s", g_strerror(-r));
        return false;
    }
    return true;
}

bool
vdk_image_rebase(VdkImage *img, const char *backing, const char *backing_fmt, bool unsafe,
                 bool (*progress)(void *opaque, uint64_t done, uint64_t total), void *opaque, GError **error)
{
    VdkNode *top = img->top;
    if (top->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    if (!top->drv->change_backing) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "%s: this format has no backing file", top->drv->name);
        return false;
    }
    bool none = !backing || !*backing;
    if (!none && !backing_fmt) {
        g_set_error(error, VDK_ERROR, EINVAL, "Could not change the backing file to '%s': backing format must be specified",
                    backing);
        return false;
    }
    if (!unsafe) {
        VdkImage *nb = NULL;
        if (!none) {
            char *path = vdk_backing_path(top->filename, backing);
            VdkOpenOptions *o = vdk_open_options_new();
            vdk_open_options_set_format(o, backing_fmt);
            vdk_open_options_set_read_only(o, true);
            o->locking = img->opts.locking; /* file.locking=off covers it too */
            o->force_share = img->opts.rebase_force_share;
            GError *err = NULL;
            nb = vdk_image_open(path, o, &err);
            vdk_open_options_free(o);
            if (!nb) {
                g_set_error(error, VDK_ERROR, err->code, "Could not open new backing file '%s': %s", path,
                            err->message);
                g_error_free(err);
                g_free(path);
                return false;
            }
            g_free(path);
        }
        void *a = chunk_buffer(error);
        void *b = a ? chunk_buffer(error) : NULL;
        if (!b) {
            free(a);
            vdk_image_close(nb, NULL);
            return false;
        }
        uint64_t size = top->size;
        uint64_t nb_size = nb ? vdk_image_get_size(nb) : 0;
        int r = 0;
        /* Every range the top layer does not provide: where the old chain
         * and the new backing file differ, the old content goes into the
         * top (compared and written in 4 KiB blocks). */
        for (uint64_t off = 0; off < size && r >= 0;) {
            VdkBlockStatus bs;
            r = vdk_image_block_status(img, off, size - off, &bs);
            if (r < 0) {
                g_set_error(error, VDK_ERROR, -r, "block status failed at offset %" G_GUINT64_FORMAT ": %s", off,
                            g_strerror(-r));
                break;
            }
            uint64_t len = MIN(bs.length, (uint64_t)CHAIN_CHUNK);
            bool in_top = (bs.flags & VDK_BS_ALLOCATED) && bs.depth == 0;
            if (!in_top) {
                r = vdk_image_pread(img, a, (size_t)len, off);
                if (r >= 0) {
                    memset(b, 0, (size_t)len);
                    if (off < nb_size) {
                        r = vdk_image_pread(nb, b, (size_t)MIN(len, nb_size - off), off);
                    }
                }
                for (uint64_t p = 0; p < len && r >= 0;) {
                    uint64_t blk = MIN(4096 - (off + p) % 4096, len - p);
                    if (memcmp((char *)a + p, (char *)b + p, (size_t)blk) == 0) {
                        p += blk;
                        continue;
                    }
                    uint64_t q = p + blk;
                    while (q < len) {
                        uint64_t blk2 = MIN((uint64_t)4096, len - q);
                        if (memcmp((char *)a + q, (char *)b + q, (size_t)blk2) == 0) {
                            break;
                        }
                        q += blk2;
                    }
                    r = vdk_image_pwrite(img, (char *)a + p, (size_t)(q - p), off + p, 0);
                    p = q;
                }
                if (r < 0) {
                    g_set_error(error, VDK_ERROR, -r, "copying the old content failed at offset %" G_GUINT64_FORMAT
                                ": %s", off, g_strerror(-r));
                    break;
                }
            }
            off += len;
            if (progress && !progress(opaque, off, size)) {
                g_set_error(error, VDK_ERROR, ECANCELED, "cancelled");
                r = -ECANCELED;
            }
        }
        free(a);
        free(b);
        vdk_image_close(nb, NULL);
        if (r < 0) {
            return false;
        }
        r = vdk_image_flush(img);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "flush failed: %s", g_strerror(-r));
            return false;
        }
    }
    GError *err = NULL;
    if (!top->drv->change_backing(top, none ? NULL : backing, none ? NULL : backing_fmt, &err)) {
        g_set_error(error, VDK_ERROR, err->code, "Could not change the backing file to '%s': %s", none ? "" : backing,
                    err->message);
        g_error_free(err);
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------------ */
/* allocate: a sparse image made physically allocated                        */
/* ------------------------------------------------------------------------ */

typedef struct {
    uint64_t file_holes;  /* bytes of mapped ranges that are holes in the file */
    uint64_t unmapped;    /* bytes not allocated in the image at all */
} AllocPlan;

static bool
allocate_walk(VdkImage *img, bool apply, VdkPrealloc mode, AllocPlan *plan, void *zbuf,
              bool (*progress)(void *opaque, uint64_t done, uint64_t total), void *opaque, GError **error)
{
    VdkNode *top = img->top;
    uint64_t size = top->size;
    memset(plan, 0, sizeof(*plan));
    for (uint64_t off = 0; off < size;) {
        VdkBlockStatus bs;
        int r = vdk_image_block_status(img, off, size - off, &bs);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "block status failed at offset %" G_GUINT64_FORMAT ": %s", off,
                        g_strerror(-r));
            return false;
        }
        uint64_t len = MIN(bs.length, (uint64_t)CHAIN_CHUNK);
        bool mapped = (bs.flags & VDK_BS_OFFSET_VALID) && bs.depth == 0;
        if (mapped && (bs.flags & VDK_BS_ZERO)) {
            /* a hole of the file behind a mapped range */
            plan->file_holes += len;
            if (apply) {
                if (mode == VDK_PREALLOC_FULL) {
                    r = vdk_file_pwrite_sync(top->file, zbuf, (size_t)len, bs.host_offset);
                } else if (fallocate(top->file->fd, 0, (off_t)bs.host_offset, (off_t)len) != 0) {
                    r = -errno;
                }
            }
        } else if (!(bs.flags & VDK_BS_ALLOCATED) || (!mapped && (bs.flags & VDK_BS_ZERO))) {
            /* not in the file at all: written as zeroes through the image */
            plan->unmapped += len;
            if (apply) {
                r = vdk_image_pwrite(img, zbuf, (size_t)len, off, 0);
            }
        }
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "allocating at offset %" G_GUINT64_FORMAT " failed: %s", off,
                        g_strerror(-r));
            return false;
        }
        off += len;
        if (apply && progress && !progress(opaque, off, size)) {
            g_set_error(error, VDK_ERROR, ECANCELED, "cancelled");
            return false;
        }
    }
    return true;
}

bool
vdk_image_allocate(VdkImage *img, VdkPrealloc mode, bool (*progress)(void *opaque, uint64_t done, uint64_t total),
                   void *opaque, GError **error)
{
    VdkNode *top = img->top;
    if (top->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    if (mode != VDK_PREALLOC_FALLOC && mode != VDK_PREALLOC_FULL) {
        g_set_error(error, VDK_ERROR, EINVAL, "allocation mode must be falloc or full");
        return false;
    }
    if (top->backing) {
        g_set_error(error, VDK_ERROR, ENOTSUP,
                    "the image has a backing file: allocating its unallocated ranges would hide the backing "
                    "file's data (flatten it first: vdk rebase -b \"\")");
        return false;
    }
    if (top->file->is_blockdev) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "the image is on a block device: nothing to allocate");
        return false;
    }
    void *zbuf = NULL;
    if (posix_memalign(&zbuf, 4096, CHAIN_CHUNK) != 0) {
        g_set_error(error, VDK_ERROR, ENOMEM, "out of memory");
        return false;
    }
    memset(zbuf, 0, CHAIN_CHUNK);
    /* 1. what is missing, and is there room for it (metadata: 1/64 more) */
    AllocPlan plan;
    bool ok = allocate_walk(img, false, mode, &plan, zbuf, NULL, NULL, error);
    if (ok) {
        uint64_t need = plan.file_holes + plan.unmapped + plan.unmapped / 64;
        struct statvfs sv;
        if (fstatvfs(top->file->fd, &sv) == 0) {
            uint64_t avail = (uint64_t)sv.f_bavail * sv.f_frsize;
            if (need > avail) {
                g_set_error(error, VDK_ERROR, ENOSPC,
                            "not enough free space: %" G_GUINT64_FORMAT " bytes needed, %" G_GUINT64_FORMAT
                            " available",
                            need, avail);
                ok = false;
            }
        }
    }
    /* 2. allocate, then make it durable */
    if (ok) {
        ok = allocate_walk(img, true, mode, &plan, zbuf, progress, opaque, error);
    }
    free(zbuf);
    if (ok) {
        int r = vdk_image_flush(img);
        if (r == 0 && fsync(top->file->fd) != 0) {
            r = -errno;
        }
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "flush failed: %s", g_strerror(-r));
            ok = false;
        }
    }
    return ok;
}
