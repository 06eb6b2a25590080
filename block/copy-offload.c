/* SPDX-License-Identifier: MIT */
/*
 * copy-offload.c - raw -> raw conversion without moving the data through
 * user space: the kernel copies (or shares) the blocks.
 *
 *   1. FICLONE (reflink): the whole target shares the source's extents.
 *      Used for one source into a target that reads as zeroes, when the
 *      filesystem supports it (btrfs, xfs with reflink, bcachefs...).
 *      Nothing is written, so zero runs of the source take no new space
 *      and -S needs no scan.
 *   2. copy_file_range per allocated extent (SEEK_DATA/SEEK_HOLE), into a
 *      target that reads as zeroes, sources concatenated at their target
 *      offsets.  The kernel copies the extents as they are: zero runs
 *      inside an allocated extent are not detected.  So it is only used
 *      when asked for (-C, VDK_COPY_OFFLOAD_ON), like qemu-img's -C.
 *
 * Offload is only tried when it is plainly equivalent to the normal
 * pipeline: raw sources and target on regular files (no block devices,
 * no backing chain), a target known to read as zeroes, a sparse target
 * allowed (-S > 0), no rate limit, no compression.  Errors meaning "not
 * here" (EXDEV, EOPNOTSUPP, ENOSYS, EINVAL, ...) make the caller fall back
 * to the normal pipeline, which rewrites every data range from the start,
 * so a partial offload never leaves anything wrong behind.  The target is
 * flushed at the end like the normal path (unless cache=unsafe).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/block.h"

/* One copy_file_range call moves at most this much, so progress and
 * cancellation are seen often enough. */
#define OFFLOAD_STEP (256ULL << 20)

static bool
offload_plain_raw(VdkImage *img)
{
    VdkNode *n = img->top;
    return n->drv == &vdk_format_raw && n->backing == NULL && n->file && !n->file->is_blockdev;
}

/* Errors that say "this kernel/filesystem pair cannot offload this":
 * fall back to the normal path. */
static bool
offload_unsupported(int err)
{
    return err == EXDEV || err == EOPNOTSUPP || err == ENOTSUP || err == ENOSYS || err == EINVAL ||
           err == EBADF || err == ETXTBSY || err == EPERM || err == ENOTTY;
}

static bool
offload_progress(const VdkCopyParams *p, uint64_t done, uint64_t total)
{
    return !p->progress || p->progress(p->opaque, done, total);
}

/* Returns 1 when cloned, 0 when reflink does not apply here, -errno. */
static int
offload_reflink(const VdkCopyParams *p)
{
    if (p->nsrc != 1) {
        return 0;
    }
    VdkFile *sf = p->src[0]->top->file;
    VdkFile *df = p->dst->top->file;
    struct stat st;
    if (fstat(df->fd, &st) < 0) {
        return -errno;
    }
    uint64_t dsize = vdk_image_get_size(p->dst);
    /* FICLONE replaces the whole target: only a target of exactly the
     * source's guest size (what convert creates) qualifies. */
    if ((uint64_t)st.st_size != dsize || vdk_image_get_size(p->src[0]) != dsize) {
        return 0;
    }
    /* A target that already owns blocks was preallocated on purpose
     * (-o preallocation=falloc/full): a clone would give them back. */
    if (st.st_blocks != 0) {
        return 0;
    }
    /* A source whose length is not whole blocks can only be cloned into
     * a target that ends where the clone ends: start from an empty file
     * (it reads as zeroes, so nothing is lost) and restore the size if
     * the clone is refused. */
    if (ftruncate(df->fd, 0) < 0) {
        return offload_unsupported(errno) ? 0 : -errno;
    }
    if (ioctl(df->fd, FICLONE, sf->fd) < 0) {
        int err = errno;
        if (ftruncate(df->fd, (off_t)dsize) < 0) {
            return -errno;
        }
        return offload_unsupported(err) ? 0 : -err;
    }
    /* The source's length may stop short of its last whole sector. */
    if (fstat(df->fd, &st) < 0) {
        return -errno;
    }
    if ((uint64_t)st.st_size < dsize && ftruncate(df->fd, (off_t)dsize) < 0) {
        return -errno;
    }
    df->size = MAX(dsize, (uint64_t)st.st_size);
    return 1;
}

/* Returns 1 when copied, 0 when the kernel refused (fall back), -errno. */
static int
offload_copy_range(const VdkCopyParams *p, uint64_t total, uint64_t *error_off)
{
    VdkFile *df = p->dst->top->file;
    uint64_t dst_base = 0, done = 0;
    for (int i = 0; i < p->nsrc; i++) {
        VdkFile *sf = p->src[i]->top->file;
        uint64_t ssize = vdk_image_get_size(p->src[i]);
        uint64_t off = 0;
        while (off < ssize) {
            uint64_t pnum = 0;
            int st = vdk_file_seek_status(sf, off, ssize - off, &pnum);
            if (st < 0) {
                *error_off = dst_base + off;
                return st;
            }
            if (pnum == 0) {
                pnum = ssize - off;
            }
            if (st == 1) {
                uint64_t end = off + pnum;
                while (off < end) {
                    loff_t in = (loff_t)off, out = (loff_t)(dst_base + off);
                    ssize_t n = copy_file_range(sf->fd, &in, df->fd, &out, (size_t)MIN(end - off, OFFLOAD_STEP), 0);
                    if (n < 0) {
                        if (errno == EINTR) {
                            continue;
                        }
                        if (offload_unsupported(errno)) {
                            return 0;
                        }
                        *error_off = dst_base + off;
                        return -errno;
                    }
                    if (n == 0) {
                        /* End of the source file: its rounded-up tail
                         * reads as zeroes, as does the target. */
                        done += end - off;
                        off = end;
                        break;
                    }
                    off += (uint64_t)n;
                    done += (uint64_t)n;
                    if (!offload_progress(p, done, total)) {
                        *error_off = dst_base + off;
                        return -ECANCELED;
                    }
                }
            } else {
                off += pnum;
                done += pnum;
            }
        }
        dst_base += ssize;
    }
    uint64_t end = dst_base;
    if (end > df->size) {
        df->size = end;
    }
    return 1;
}

int
vdk_copy_offload(const VdkCopyParams *p, const char **used, GError **error)
{
    *used = "none";
    if (p->offload == VDK_COPY_OFFLOAD_OFF || !p->target_is_zero || p->sparse_size == 0 || p->rate_limit ||
        p->compress_unit || !offload_plain_raw(p->dst) || p->dst->top->file->read_only) {
        return 0;
    }
    uint64_t total = 0;
    for (int i = 0; i < p->nsrc; i++) {
        if (!offload_plain_raw(p->src[i])) {
            return 0;
        }
        total += vdk_image_get_size(p->src[i]);
    }
    int r = offload_reflink(p);
    uint64_t error_off = 0;
    if (r > 0) {
        *used = "reflink";
    } else if (r == 0 && p->offload == VDK_COPY_OFFLOAD_ON) {
        r = offload_copy_range(p, total, &error_off);
        if (r > 0) {
            *used = "copy_file_range";
        }
    }
    if (r == 0) {
        return 0;
    }
    if (r > 0) {
        if (!offload_progress(p, total, total)) {
            r = -ECANCELED;
        } else if (p->flush) {
            /* The kernel's copies went through the page cache (or
             * shared extents): one fdatasync makes them durable. */
            r = vdk_file_flush_sync(p->dst->top->file);
            if (r == 0) {
                return 1;
            }
            g_set_error(error, VDK_ERROR, -r, "flush failed: %s", g_strerror(-r));
            return -1;
        } else {
            return 1;
        }
    }
    g_set_error(error, VDK_ERROR, -r, "copy offload failed at offset %" PRIu64 ": %s", error_off, g_strerror(-r));
    return -1;
}
