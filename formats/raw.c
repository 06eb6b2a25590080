/* SPDX-License-Identifier: MIT */
/*
 * raw.c - the raw format: guest offset == host offset.
 *
 * Files and block devices; the size is the file's length rounded up to a
 * whole 512-byte sector, as in qemu.  Block status comes from SEEK_DATA/SEEK_HOLE
 * (holes are reported as zero, allocated in this layer, with their offset,
 * like qemu-img map); discard punches holes (BLKDISCARD on devices);
 * write_zeroes uses the file layer's fallocate/BLKZEROOUT chain.  Resizing
 * grows or (with shrink) cuts the file; block devices cannot be resized.
 * Create: size (rounded up to 512 bytes), preallocation=off|falloc|full.
 * Raw has no metadata, so there is nothing to check, flush or cache.
 */
#include "config.h"

#include <errno.h>

#include "block/block.h"

static int
raw_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)buf;
    (void)len;
    (void)filename;
    return 1; /* anything can be raw: the last resort */
}

static bool
raw_open(VdkNode *n, GError **error)
{
    (void)error;
    /* Like qemu, a file whose length is not a whole number of 512-byte
     * sectors is a disk of the next whole sector: the tail reads as zeroes
     * and writing into it extends the file. */
    n->size = vdk_align_up(n->file->size, 512);
    return true;
}

static bool
raw_close(VdkNode *n, GError **error)
{
    (void)n;
    (void)error;
    return true;
}

static int
raw_map(VdkNode *n, uint64_t offset, uint64_t len, unsigned flags, VdkExtent *ext, VdkRequest *r)
{
    (void)flags;
    (void)r;
    ext->kind = VDK_EXT_DATA;
    ext->len = len;
    ext->file = n->file;
    ext->host_offset = offset;
    return 0;
}

static int
raw_block_status(VdkNode *n, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r)
{
    (void)r;
    uint64_t pnum = 0;
    int st = vdk_file_seek_status(n->file, offset, len, &pnum);
    if (st < 0) {
        return st;
    }
    ext->kind = st ? VDK_EXT_DATA : VDK_EXT_ZERO;
    ext->host_valid = true;
    ext->len = pnum;
    ext->file = n->file;
    ext->host_offset = offset;
    return 0;
}

static int
raw_discard(VdkNode *n, VdkRequest *r)
{
    vdk_req_file_discard(r, n->file, r->offset, r->len);
    r->cursor = r->offset + r->len;
    return 0;
}

static int
raw_write_zeroes(VdkNode *n, VdkRequest *r)
{
    vdk_req_file_zero(r, n->file, r->offset, r->len, r->flags);
    r->cursor = r->offset + r->len;
    return 0;
}

static bool
raw_truncate(VdkNode *n, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error)
{
    (void)shrink;
    if (n->file->is_blockdev) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "raw: cannot resize a block device (it has %" G_GUINT64_FORMAT
                    " bytes)", n->size);
        return false;
    }
    if (prealloc == VDK_PREALLOC_METADATA) {
        g_set_error(error, VDK_ERROR, EINVAL, "raw: unsupported preallocation mode 'metadata'");
        return false;
    }
    if (!vdk_file_truncate(n->file, size, prealloc, error)) {
        return false;
    }
    n->size = size;
    return true;
}

static bool
raw_create(VdkCreateCtx *cc, const VdkCreateOptions *o, GError **error)
{
    uint64_t size = 0;
    bool present;
    VdkPrealloc prealloc;
    if (!vdk_create_opt_size(o, "size", &size, &present, error)) {
        return false;
    }
    if (!present) {
        g_set_error(error, VDK_ERROR, EINVAL, "Image creation needs a size parameter");
        return false;
    }
    if (!vdk_create_opt_prealloc(o, &prealloc, error)) {
        return false;
    }
    if (prealloc == VDK_PREALLOC_METADATA) {
        g_set_error(error, VDK_ERROR, EINVAL, "raw: unsupported preallocation mode 'metadata'");
        return false;
    }
    VdkFile *f = vdk_create_main_file(cc);
    if (f->is_blockdev) {
        if (size > f->size) {
            g_set_error(error, VDK_ERROR, ENOSPC,
                        "raw: the device is too small (%" G_GUINT64_FORMAT " bytes, %" G_GUINT64_FORMAT " asked)",
                        f->size, size);
            return false;
        }
        return true;
    }
    if (prealloc != VDK_PREALLOC_OFF && !vdk_create_check_space(cc, size, error)) {
        return false;
    }
    return vdk_file_truncate(f, size, prealloc, error);
}

static bool
raw_measure(const VdkCreateOptions *o, VdkImage *src, uint64_t size, VdkMeasure *m, GError **error)
{
    VdkPrealloc prealloc;
    if (!vdk_create_opt_prealloc(o, &prealloc, error)) {
        return false;
    }
    /* every byte of a raw image is in the file (holes or not) */
    m->required = src ? size : vdk_align_up(size, 512);
    m->fully_allocated = m->required;
    return true;
}

static const VdkOptionDesc raw_create_opts[] = {
    {"size", VDK_OPT_SIZE, "Virtual disk size", NULL, false},
    {"preallocation", VDK_OPT_STRING, "Preallocation mode (allowed values: off, falloc, full)", "off", false},
    {NULL, 0, NULL, NULL, false},
};

const VdkFormat vdk_format_raw = {
    .name = "raw",
    .probe = raw_probe,
    .open = raw_open,
    .close = raw_close,
    .map = raw_map,
    .block_status = raw_block_status,
    .discard = raw_discard,
    .write_zeroes = raw_write_zeroes,
    .truncate = raw_truncate,
    .create = raw_create,
    .create_opts = raw_create_opts,
    .measure = raw_measure,
};
