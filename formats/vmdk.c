/* SPDX-License-Identifier: MIT */
/*
 * vmdk.c - VMware virtual disks (VMware "Virtual Disk Format 5.0").
 *
 * Supported:
 *   - createType monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
 *     twoGbMaxExtentFlat, streamOptimized, vmfs (flat) and any descriptor
 *     mixing FLAT/VMFS, SPARSE (hosted "KDMV" extents) and ZERO extents;
 *   - the descriptor embedded in a sparse extent or in a file of its own;
 *     kept as text and rewritten byte for byte except CID on the first
 *     write (so delta disks made from the image notice the change, as
 *     VMware and qemu do);
 *   - sparse extents: grain directory in memory (bounded), grain tables
 *     loaded on demand through the metadata cache (a miss is a VDK_WAIT step),
 *     the redundant grain directory and tables kept identical, zeroed-grain
 *     entries (GTE 1 with the zeroed-grain flag);
 *   - writes: many in flight; a write to an unallocated grain appends the
 *     grain at the end of the extent file and points the grain table at it
 *     only after the data is written; grain tables are written back before
 *     a grain directory that points at new tables (crash-safe order);
 *   - streamOptimized: compressed grains with markers, header or footer
 *     (gdOffset = -1) grain directory.  An empty streamOptimized image
 *     opened read-write (what `convert` does) collects the data in an
 *     unnamed scratch file and writes the compressed stream when it is
 *     closed, compressing on every core;
 *   - delta disks: parentFileNameHint is the backing file (parentCID is
 *     shown by info);
 *   - extent file names are resolved against the descriptor's directory;
 *     absolute names and names with a ".." component are refused unless the
 *     open option allow-extent-paths=on is given.
 * Not supported: VMFSSPARSE/SESPARSE/RDM extents, the old "COWD" format,
 * rewriting compressed grains (streamOptimized images are written once).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <libdeflate.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "block/block.h"
#include "block/metacache.h"
#include "formats/vmdk.h"

/* Grain-table cache per sparse extent: GTs are read in 512-byte slices
 * (they start on any sector); 4 MiB of slices covers 64 GiB of 64 KiB
 * grains. */
#define VMDK_GT_SLICE 512u
#define VMDK_GT_CACHE_BYTES (4u << 20)
/* Grains one allocation covers at most (one GT slice holds 128). */
#define VMDK_MAX_ALLOC_GRAINS 128u
/* The marker in front of a compressed grain: lba (8), size (4). */
#define VMDK_MARKER_HDR 12u

enum {
    VMDK_MARKER_EOS = 0,
    VMDK_MARKER_GT = 1,
    VMDK_MARKER_GD = 2,
    VMDK_MARKER_FOOTER = 3,
};

typedef struct VmdkExt VmdkExt;
typedef struct Vmdk Vmdk;

typedef struct VmdkAllocation {
    VdkAlloc base;
    VmdkExt *e;
    VdkMetaEntry *gt, *rgt; /* pinned slices */
    uint32_t idx;           /* first entry within the slice */
    uint32_t n;             /* grains */
    VdkRequest *waiters;
    struct VmdkAllocation *next;
} VmdkAllocation;

struct VmdkExt {
    VmdkExtentType type;
    VdkFile *file;
    bool own_file;
    char *fname;     /* as in the descriptor (NULL: the image file itself) */
    char *type_name; /* NULL: the monolithic sparse file itself */
    uint64_t start;  /* guest bytes */
    uint64_t len;
    uint64_t flat_offset;
    bool read_only;
    /* sparse */
    VmdkHeader h;
    uint64_t grain_bytes;
    uint32_t grain_shift;
    uint64_t gd_entries;
    uint32_t *gd, *rgd;
    uint64_t gd_off, rgd_off; /* bytes (rgd_off 0: none) */
    bool gd_dirty;
    bool rgd_dirty; /* the primary directory was written, the redundant one not yet */
    bool compressed, zeroed_grain;
    uint32_t gt_bytes;
    VdkMetaCache *gtc;  /* primary grain tables */
    VdkMetaCache *rgtc; /* redundant grain tables (written after the primary ones) */
    uint64_t next_free;
    VmdkAllocation *allocs;
};

struct Vmdk {
    VdkNode *node;
    VmdkDesc desc;
    char *desc_text;   /* NUL-terminated */
    bool desc_embedded; /* in the first sparse extent at desc_off */
    uint64_t desc_off, desc_cap; /* bytes */
    bool cid_updated;
    bool desc_dirty;
    int parent_ok; /* 0 not checked yet, 1 parent CID matches, -1 it does not */
    VmdkExt *ext;
    size_t n_ext;
    bool corrupt;
    bool wb_running;
    VdkRequest *wb_waiters;
    /* streamOptimized written in one pass on close */
    VdkFile *scratch;
    bool stream_write;
    bool stream_written; /* something was written into the scratch file */
};

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */
/* ------------------------------------------------------------------------ */

static inline uint32_t
rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void
wr32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void
wr64(uint8_t *p, uint64_t v)
{
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

static int
vmdk_corrupt(Vmdk *s, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static int
vmdk_corrupt(Vmdk *s, const char *fmt, ...)
{
    if (!s->corrupt) {
        va_list ap;
        va_start(ap, fmt);
        char *msg = g_strdup_vprintf(fmt, ap);
        va_end(ap);
        g_log("vdk", G_LOG_LEVEL_WARNING, "vmdk: %s: %s; further writes are refused", s->node->filename, msg);
        g_free(msg);
        s->corrupt = true;
    }
    return -EIO;
}

static VmdkExt *
find_ext(Vmdk *s, uint64_t off)
{
    size_t lo = 0, hi = s->n_ext;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        VmdkExt *e = &s->ext[mid];
        if (off < e->start) {
            hi = mid;
        } else if (off >= e->start + e->len) {
            lo = mid + 1;
        } else {
            return e;
        }
    }
    return NULL;
}

static bool
read_exact(VdkFile *f, void *buf, size_t len, uint64_t off, const char *what, GError **error)
{
    int r = vdk_file_pread_sync(f, buf, len, off);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "vmdk: cannot read %s of '%s': %s", what, f->filename, g_strerror(-r));
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------------ */
/* Probe                                                                     */
/* ------------------------------------------------------------------------ */

static int
vmdk_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    if (len >= 4 && rd32(buf) == VMDK4_MAGIC) {
        return 100;
    }
    /* A text descriptor: the usual first line, or createType early on. */
    static const char sig[] = "# Disk DescriptorFile";
    if (len >= sizeof(sig) - 1 && memcmp(buf, sig, sizeof(sig) - 1) == 0) {
        return 100;
    }
    if (len > 0 && g_strstr_len((const char *)buf, (gssize)MIN(len, 512), "createType=") &&
        !memchr(buf, '\0', MIN(len, 64))) {
        return 50;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Open                                                                      */
/* ------------------------------------------------------------------------ */

static void
ext_clear(VmdkExt *e)
{
    vdk_mc_free(e->gtc);
    vdk_mc_free(e->rgtc);
    if (e->own_file) {
        vdk_file_close(e->file);
    }
    g_free(e->gd);
    g_free(e->rgd);
    g_free(e->fname);
    g_free(e->type_name);
}

static void
vmdk_free(Vmdk *s)
{
    for (size_t i = 0; i < s->n_ext; i++) {
        ext_clear(&s->ext[i]);
    }
    g_free(s->ext);
    vdk_vmdk_desc_clear(&s->desc);
    g_free(s->desc_text);
    if (s->scratch) {
        vdk_file_close(s->scratch);
    }
    g_free(s);
}

static bool
load_gd(VmdkExt *e, uint64_t off, uint32_t **out, const char *what, GError **error)
{
    size_t bytes = (size_t)(e->gd_entries * 4);
    uint8_t *raw = g_try_malloc(MAX(bytes, (size_t)1));
    uint32_t *gd = g_try_new(uint32_t, MAX(e->gd_entries, (uint64_t)1));
    if (!raw || !gd) {
        g_free(raw);
        g_free(gd);
        g_set_error(error, VDK_ERROR, ENOMEM, "vmdk: cannot allocate the %s (%zu bytes)", what, bytes);
        return false;
    }
    if (!read_exact(e->file, raw, bytes, off, what, error)) {
        g_free(raw);
        g_free(gd);
        return false;
    }
    for (uint64_t i = 0; i < e->gd_entries; i++) {
        gd[i] = rd32(raw + i * 4);
    }
    g_free(raw);
    *out = gd;
    return true;
}

/* Open a hosted sparse extent: header (or footer), grain directories. */
static bool
open_sparse(Vmdk *s, VmdkExt *e, bool check, GError **error)
{
    uint8_t *hb = g_malloc(512);
    bool ok = false;
    uint64_t fsize = e->file->size;
    if (fsize < 512) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: '%s' is too short for a sparse extent (%" G_GUINT64_FORMAT " bytes)",
                    e->file->filename, fsize);
        goto out;
    }
    if (!read_exact(e->file, hb, 512, 0, "the sparse header", error)) {
        goto out;
    }
    if (rd32(hb) != VMDK4_MAGIC) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: '%s': bad magic 0x%08x in the sparse extent header (expected KDMV)",
                    e->file->filename, rd32(hb));
        goto out;
    }
    vdk_vmdk_header_decode(hb, &e->h);
    if ((e->h.flags & VMDK4_FLAG_NL_DETECT) && (hb[73] != '\n' || hb[74] != ' ' || hb[75] != '\r' || hb[76] != '\n')) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: '%s': the header's newline check bytes are damaged "
                    "(transferred in text mode?)", e->file->filename);
        goto out;
    }
    if (!vdk_vmdk_header_check(&e->h, fsize, false, error)) {
        goto out;
    }
    if (e->h.gd_offset == VMDK_GD_AT_END) {
        /* streamOptimized: the real header is the footer, 1024 bytes before
         * the end (footer marker, footer, end-of-stream marker). */
        if (fsize < 1536 + 512) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: '%s': gdOffset is at the end but the file has no footer",
                        e->file->filename);
            goto out;
        }
        if (!read_exact(e->file, hb, 512, vdk_align_down(fsize, 512) - 1024, "the footer", error)) {
            goto out;
        }
        if (rd32(hb) != VMDK4_MAGIC) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: '%s': bad magic 0x%08x in the footer", e->file->filename,
                        rd32(hb));
            goto out;
        }
        VmdkHeader f;
        vdk_vmdk_header_decode(hb, &f);
        if (!vdk_vmdk_header_check(&f, fsize, true, error)) {
            goto out;
        }
        if (f.capacity != e->h.capacity || f.grain_size != e->h.grain_size || f.num_gtes != e->h.num_gtes) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: '%s': the footer does not match the header", e->file->filename);
            goto out;
        }
        e->h.gd_offset = f.gd_offset;
        e->h.rgd_offset = f.rgd_offset;
        e->h.flags = f.flags;
    }
    e->grain_bytes = e->h.grain_size * 512;
    e->grain_shift = (uint32_t)__builtin_ctzll(e->grain_bytes);
    e->gd_entries = vdk_vmdk_gd_entries(&e->h);
    e->gt_bytes = e->h.num_gtes * 4;
    e->compressed = (e->h.flags & VMDK4_FLAG_COMPRESS) != 0;
    e->zeroed_grain = (e->h.flags & VMDK4_FLAG_ZERO_GRAIN) != 0;
    e->gd_off = e->h.gd_offset * 512;
    if (!load_gd(e, e->gd_off, &e->gd, "grain directory", error)) {
        goto out;
    }
    if ((e->h.flags & VMDK4_FLAG_RGD) && e->h.rgd_offset && !e->compressed) {
        e->rgd_off = e->h.rgd_offset * 512;
        if (!load_gd(e, e->rgd_off, &e->rgd, "redundant grain directory", error)) {
            goto out;
        }
    }
    for (uint64_t i = 0; i < e->gd_entries && !check; i++) {
        for (int k = 0; k < 2; k++) {
            uint32_t *t = k ? e->rgd : e->gd;
            if (!t || !t[i]) {
                continue;
            }
            uint64_t gt_end = (uint64_t)t[i] * 512 + e->gt_bytes;
            if (gt_end > vdk_align_up(fsize, 512) || t[i] == 0) {
                g_set_error(error, VDK_ERROR, EINVAL,
                            "vmdk: '%s': %sgrain directory entry %" G_GUINT64_FORMAT " (sector %u) points beyond the end "
                            "of the file", e->file->filename, k ? "redundant " : "", i, t[i]);
                goto out;
            }
        }
    }
    if ((uint64_t)e->len > e->h.capacity * 512) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vmdk: '%s': the descriptor gives the extent %" G_GUINT64_FORMAT " sectors, its header %"
                    G_GUINT64_FORMAT, e->file->filename, e->len / 512, e->h.capacity);
        goto out;
    }
    e->gtc = vdk_mc_new(s->node, e->file, VMDK_GT_SLICE, VMDK_GT_CACHE_BYTES);
    if (e->rgd) {
        e->rgtc = vdk_mc_new(s->node, e->file, VMDK_GT_SLICE, VMDK_GT_CACHE_BYTES / 2);
    }
    e->next_free = vdk_align_up(fsize, 512);
    ok = true;
out:
    g_free(hb);
    return ok;
}

/* May the extent name @name be opened (relative, inside the descriptor's
 * directory)? */
static bool
extent_name_allowed(const char *name)
{
    if (g_path_is_absolute(name)) {
        return false;
    }
    char **parts = g_strsplit(name, "/", -1);
    bool ok = true;
    for (char **p = parts; *p; p++) {
        if (!strcmp(*p, "..")) {
            ok = false;
        }
    }
    g_strfreev(parts);
    return ok;
}

static bool
allow_paths(VdkNode *n)
{
    const char *v = g_hash_table_lookup(n->img->opts.extra, "allow-extent-paths");
    return v && (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "1") || !strcmp(v, "yes"));
}

static bool
open_extents(Vmdk *s, GError **error)
{
    VdkNode *n = s->node;
    bool check = n->img->opts.check;
    s->ext = g_new0(VmdkExt, MAX(s->desc.extents->len, 1u));
    uint64_t pos = 0;
    for (guint i = 0; i < s->desc.extents->len; i++) {
        VmdkDescExtent *d = &g_array_index(s->desc.extents, VmdkDescExtent, i);
        VmdkExt *e = &s->ext[s->n_ext++];
        e->type = d->type;
        e->type_name = g_strdup(d->type_name);
        e->start = pos;
        e->len = d->sectors * 512;
        e->flat_offset = d->offset * 512;
        e->read_only = n->read_only || d->access != VMDK_ACCESS_RW;
        pos += e->len;
        if (d->access == VMDK_ACCESS_NOACCESS) {
            g_set_error(error, VDK_ERROR, EACCES, "vmdk: extent %u ('%s') is NOACCESS", i + 1,
                        d->fname ? d->fname : "");
            return false;
        }
        if (d->type == VMDK_ET_ZERO) {
            continue;
        }
        e->fname = g_strdup(d->fname);
        if (!extent_name_allowed(d->fname) && !allow_paths(n)) {
            g_set_error(error, VDK_ERROR, EPERM,
                        "vmdk: extent file '%s' is outside the descriptor's directory (open with "
                        "-o allow-extent-paths=on to allow it)", d->fname);
            return false;
        }
        char *path = vdk_backing_path(n->filename, d->fname);
        struct stat st;
        if (stat(path, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
            /* a FIFO would block the open itself; nothing else holds data */
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: extent file '%s' is not a regular file or block device",
                        path);
            g_free(path);
            return false;
        }
        GError *ferr = NULL;
        e->file = vdk_file_open(path, e->read_only, n->img->opts.cache, &ferr);
        /* a flat extent holds only data: others may write it (as QEMU
         * shares it), not resize it; a sparse one has metadata */
        unsigned unshare = d->type == VMDK_ET_FLAT ? VDK_LOCK_RESIZE : VDK_LOCK_META;
        if (e->file && vdk_open_options_locks(&n->img->opts) &&
            !vdk_file_lock(e->file, !e->read_only, unshare, n->img->opts.locking == VDK_LOCKING_ON, &ferr)) {
            vdk_file_close(e->file);
            e->file = NULL;
        }
        if (!e->file) {
            g_set_error(error, VDK_ERROR, ferr->code, "vmdk: extent file '%s': %s", path, ferr->message);
            g_error_free(ferr);
            g_free(path);
            return false;
        }
        g_free(path);
        e->own_file = true;
        if (d->type == VMDK_ET_FLAT) {
            uint64_t end;
            if (vdk_add_overflows(e->flat_offset, e->len, &end)) {
                g_set_error(error, VDK_ERROR, EINVAL, "vmdk: extent %u: offset and size overflow", i + 1);
                return false;
            }
            continue;
        }
        if (!open_sparse(s, e, check, error)) {
            return false;
        }
    }
    n->size = pos;
    return true;
}

static bool
parse_descriptor(Vmdk *s, const char *buf, size_t len, GError **error)
{
    const char *nul = memchr(buf, '\0', len);
    s->desc_text = g_strndup(buf, nul ? (gsize)(nul - buf) : len);
    return vdk_vmdk_desc_parse(s->desc_text, strlen(s->desc_text), &s->desc, error);
}

static bool
stream_empty(Vmdk *s, VmdkExt *e, GError **error)
{
    /* Every grain table entry zero (tables are bounded by the file). */
    uint8_t *buf = g_malloc(e->gt_bytes);
    bool empty = true;
    for (uint64_t i = 0; i < e->gd_entries && empty; i++) {
        if (!e->gd[i]) {
            continue;
        }
        if (!read_exact(e->file, buf, e->gt_bytes, (uint64_t)e->gd[i] * 512, "a grain table", error)) {
            g_free(buf);
            return false;
        }
        empty = vdk_buffer_is_zero(buf, e->gt_bytes);
    }
    g_free(buf);
    (void)s;
    if (!empty) {
        g_set_error(error, VDK_ERROR, ENOTSUP,
                    "vmdk: a streamOptimized image that holds data cannot be opened for writing (it is written "
                    "once: convert it instead)");
    }
    return empty;
}

static bool
start_stream_write(Vmdk *s, GError **error)
{
    VdkNode *n = s->node;
    char *dir = g_path_get_dirname(n->filename);
    int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) {
        fd = open(g_get_tmp_dir(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    }
    g_free(dir);
    if (fd < 0) {
        g_set_error(error, VDK_ERROR, errno, "vmdk: cannot create a scratch file for the stream: %s",
                    g_strerror(errno));
        return false;
    }
    if (ftruncate(fd, (off_t)n->size) < 0) {
        int e = errno;
        close(fd);
        g_set_error(error, VDK_ERROR, e, "vmdk: cannot size the scratch file: %s", g_strerror(e));
        return false;
    }
    s->scratch = vdk_file_new_from_fd(fd, "(vmdk stream scratch)", false, VDK_CACHE_WRITEBACK, error);
    if (!s->scratch) {
        close(fd);
        return false;
    }
    s->stream_write = true;
    return true;
}

static bool
vmdk_open(VdkNode *n, GError **error)
{
    Vmdk *s = g_new0(Vmdk, 1);
    s->node = n;
    uint8_t *hb = g_malloc0(512);
    uint64_t fsize = n->file->size;
    if (!read_exact(n->file, hb, MIN((uint64_t)512, fsize), 0, "the header", error)) {
        goto fail;
    }
    if (fsize >= 4 && rd32(hb) == VMDK4_MAGIC) {
        /* A monolithic sparse file: one extent, the file itself; the
         * embedded descriptor gives CID, createType and the parent. */
        VmdkHeader h;
        vdk_vmdk_header_decode(hb, &h);
        if (h.desc_offset) {
            if (!vdk_vmdk_header_check(&h, fsize, false, error)) {
                goto fail;
            }
            size_t dlen = (size_t)(h.desc_size * 512);
            char *db = g_malloc(dlen);
            if (!read_exact(n->file, db, dlen, h.desc_offset * 512, "the embedded descriptor", error)) {
                g_free(db);
                goto fail;
            }
            bool ok = parse_descriptor(s, db, dlen, error);
            g_free(db);
            if (!ok) {
                goto fail;
            }
            s->desc_embedded = true;
            s->desc_off = h.desc_offset * 512;
            s->desc_cap = dlen;
        } else {
            s->desc_text = g_strdup("");
            vdk_vmdk_desc_parse("", 0, &s->desc, NULL);
        }
        s->ext = g_new0(VmdkExt, 1);
        s->n_ext = 1;
        VmdkExt *e = &s->ext[0];
        e->type = VMDK_ET_SPARSE;
        e->file = n->file;
        e->read_only = n->read_only;
        e->len = h.capacity * 512;
        if (!open_sparse(s, e, n->img->opts.check, error)) {
            goto fail;
        }
        e->len = e->h.capacity * 512;
        n->size = e->len;
    } else {
        /* qemu pads descriptors it rewrote with NULs: text up to the first
         * NUL is fine, control bytes in it are not */
        bool binary = fsize >= 4 && hb[0] == '\0';
        for (size_t i = 0; i < (size_t)MIN(fsize, (uint64_t)512) && hb[i]; i++) {
            binary |= hb[i] < 0x20 && hb[i] != '\t' && hb[i] != '\r' && hb[i] != '\n';
        }
        if (binary) {
            /* binary: neither a sparse extent nor a text descriptor */
            g_set_error(error, VDK_ERROR, EINVAL,
                        "vmdk: bad magic 0x%08x (neither a sparse extent \"KDMV\" nor a text descriptor)", rd32(hb));
            goto fail;
        }
        if (fsize > VMDK_MAX_DESC_BYTES) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: descriptor file too large (%" G_GUINT64_FORMAT " bytes, max %u)",
                        fsize, VMDK_MAX_DESC_BYTES);
            goto fail;
        }
        if (fsize >= 4 && !memcmp(hb, "COWD", 4)) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: the old COWD (VMware 3) format is not supported");
            goto fail;
        }
        char *db = g_malloc(fsize + 1);
        if (!read_exact(n->file, db, fsize, 0, "the descriptor", error)) {
            g_free(db);
            goto fail;
        }
        bool ok = parse_descriptor(s, db, fsize, error);
        g_free(db);
        if (!ok) {
            goto fail;
        }
        if (!s->desc.create_type) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: the descriptor has no createType");
            goto fail;
        }
        if (s->desc.extents->len == 0) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: the descriptor lists no extents");
            goto fail;
        }
        if (!open_extents(s, error)) {
            goto fail;
        }
    }
    if (s->desc.parent_hint) {
        /* a delta disk's parent is a vmdk, as in qemu */
        n->backing_name = g_strdup(s->desc.parent_hint);
        n->backing_fmt = g_strdup("vmdk");
    }
    n->opaque = s;
    g_free(hb);
    /* An empty streamOptimized image opened for writing is filled once. */
    if (!n->read_only && s->n_ext == 1 && s->ext[0].type == VMDK_ET_SPARSE && s->ext[0].compressed &&
        !n->img->opts.check) {
        if (!stream_empty(s, &s->ext[0], error) || !start_stream_write(s, error)) {
            n->opaque = NULL;
            g_free(n->backing_name);
            n->backing_name = NULL;
            g_free(n->backing_fmt);
            n->backing_fmt = NULL;
            vmdk_free(s);
            return false;
        }
    }
    return true;
fail:
    g_free(hb);
    vmdk_free(s);
    return false;
}

static bool stream_write_out(Vmdk *s, GError **error);

static bool
vmdk_close(VdkNode *n, GError **error)
{
    Vmdk *s = n->opaque;
    if (!s) {
        return true;
    }
    bool ok = true;
    if (s->stream_write && s->stream_written) {
        ok = stream_write_out(s, error);
    }
    vmdk_free(s);
    n->opaque = NULL;
    return ok;
}

/* ------------------------------------------------------------------------ */
/* Mapping                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct {
    uint64_t gi;       /* grain index in the extent */
    uint64_t gdi, gti; /* directory entry, entry in its table */
    uint64_t slice_off;
    uint32_t in_slice;  /* index within the slice */
    uint32_t slice_n;   /* entries of this table in the slice from in_slice's slice start */
} GLoc;

static void
gloc(VmdkExt *e, uint64_t rel, GLoc *l)
{
    l->gi = rel >> e->grain_shift;
    l->gdi = l->gi / e->h.num_gtes;
    l->gti = l->gi % e->h.num_gtes;
    uint64_t per = VMDK_GT_SLICE / 4;
    l->in_slice = (uint32_t)(l->gti % per);
    uint64_t first = l->gti - l->in_slice;
    l->slice_n = (uint32_t)MIN(per, e->h.num_gtes - first);
}

/* Validate a GD entry for use. */
static int
gt_offset(Vmdk *s, VmdkExt *e, uint32_t *gd, uint64_t gdi, uint64_t *out)
{
    if (gdi >= e->gd_entries) {
        return vmdk_corrupt(s, "grain directory index %" G_GUINT64_FORMAT " out of range", gdi);
    }
    uint64_t t = gd[gdi];
    if (t && (uint64_t)t * 512 + e->gt_bytes > vdk_align_up(MAX(e->file->size, e->next_free), 512)) {
        return vmdk_corrupt(s, "grain directory entry %" G_GUINT64_FORMAT " (sector %" G_GUINT64_FORMAT
                            ") points beyond the end of the file", gdi, t);
    }
    *out = t * 512;
    return 0;
}

typedef enum { G_UNALLOC, G_ZERO, G_DATA, G_COMP } GStatus;

static int
classify(Vmdk *s, VmdkExt *e, uint32_t v, uint64_t guest, GStatus *st, uint64_t *host)
{
    *host = 0;
    if (v == 0) {
        *st = G_UNALLOC;
        return 0;
    }
    if (v == 1 && e->zeroed_grain) {
        *st = G_ZERO;
        return 0;
    }
    uint64_t h = (uint64_t)v * 512;
    uint64_t limit = MAX(vdk_align_up(e->file->size, 512), e->next_free);
    if (e->compressed) {
        if (h + VMDK_MARKER_HDR > limit) {
            return vmdk_corrupt(s, "compressed grain for guest offset %" G_GUINT64_FORMAT
                                " at sector %u is beyond the end of the file", guest, v);
        }
        *st = G_COMP;
        *host = h;
        return 0;
    }
    if (h + e->grain_bytes > vdk_align_up(limit, e->grain_bytes) || (v < e->h.overhead && e->h.overhead)) {
        return vmdk_corrupt(s, "grain for guest offset %" G_GUINT64_FORMAT " at sector %u is %s", guest, v,
                            h + e->grain_bytes > vdk_align_up(limit, e->grain_bytes) ? "beyond the end of the file"
                                                                                    : "inside the metadata");
    }
    *st = G_DATA;
    *host = h;
    return 0;
}

static int
map_sparse_read(Vmdk *s, VmdkExt *e, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r)
{
    uint64_t rel = offset - e->start;
    GLoc l;
    gloc(e, rel, &l);
    uint64_t t;
    int ret = gt_offset(s, e, e->gd, l.gdi, &t);
    if (ret < 0) {
        return ret;
    }
    uint64_t end = MIN(offset + len, e->start + e->len);
    if (!t) {
        uint64_t gt_end = e->start + ((l.gdi + 1) * e->h.num_gtes << e->grain_shift);
        ext->kind = VDK_EXT_UNALLOC;
        ext->len = MIN(end, gt_end) - offset;
        return 0;
    }
    uint64_t slice_off = t + ((l.gti * 4) & ~(uint64_t)(VMDK_GT_SLICE - 1));
    VdkMetaEntry *sl = vdk_mc_get(e->gtc, slice_off, r, &ret);
    if (!sl) {
        return ret ? ret : -EIO;
    }
    const uint8_t *gt = sl->data;
    uint64_t pos = offset;
    uint32_t idx = l.in_slice;
    GStatus first = G_UNALLOC;
    uint64_t first_host = 0, next_host = 0;
    bool started = false;
    while (pos < end && idx < l.slice_n) {
        uint32_t v = rd32(gt + idx * 4);
        uint64_t gstart = e->start + (((rel >> e->grain_shift) + (idx - l.in_slice)) << e->grain_shift);
        uint64_t gend = gstart + e->grain_bytes;
        GStatus st;
        uint64_t host;
        ret = classify(s, e, v, pos, &st, &host);
        if (ret < 0) {
            return ret;
        }
        uint64_t piece = host ? host + (pos - gstart) : 0;
        if (!started) {
            started = true;
            first = st;
            first_host = piece;
            if (st == G_COMP) {
                uint64_t fend = vdk_align_up(e->file->size, 512);
                uint64_t clen = e->grain_bytes + e->grain_bytes / 64 + 1024 + VMDK_MARKER_HDR;
                clen = MIN(clen, fend > host ? fend - host : 0);
                ext->kind = VDK_EXT_COMPRESSED;
                ext->file = e->file;
                ext->host_offset = host;
                ext->comp_len = clen;
                ext->unit_offset = gstart;
                ext->unit_size = (uint32_t)e->grain_bytes;
                ext->len = MIN(end, gend) - offset;
                return 0;
            }
        } else if (st != first || st == G_COMP || (st == G_DATA && piece != next_host)) {
            break;
        }
        uint64_t stop = MIN(end, gend);
        next_host = piece + (stop - pos);
        pos = stop;
        idx++;
    }
    ext->len = pos - offset;
    ext->file = e->file;
    switch (first) {
    case G_DATA:
        ext->kind = VDK_EXT_DATA;
        ext->host_offset = first_host;
        break;
    case G_ZERO:
        ext->kind = VDK_EXT_ZERO;
        break;
    default:
        ext->kind = VDK_EXT_UNALLOC;
        break;
    }
    return 0;
}

static VmdkAllocation *
alloc_conflict(VmdkExt *e, uint64_t gs, uint64_t ge)
{
    for (VmdkAllocation *a = e->allocs; a; a = a->next) {
        if (gs < a->base.guest_end && a->base.guest_start < ge) {
            return a;
        }
    }
    return NULL;
}

/* Give directory entry @gdi a (zeroed) grain table, and its redundant
 * copy, at the end of the file. */
static int
new_gt(Vmdk *s, VmdkExt *e, uint64_t gdi)
{
    (void)s;
    uint64_t gt_sectors = vdk_align_up(e->gt_bytes, 512) / 512;
    for (int k = 0; k < 2; k++) {
        uint32_t *gd = k ? e->rgd : e->gd;
        if (!gd) {
            continue;
        }
        uint64_t off = e->next_free;
        if (off / 512 + gt_sectors > UINT32_MAX) {
            return -EFBIG;
        }
        for (uint64_t o = 0; o < gt_sectors * 512; o += VMDK_GT_SLICE) {
            int ret = 0;
            if (!vdk_mc_get_fresh(k ? e->rgtc : e->gtc, off + o, &ret)) {
                return ret ? ret : -ENOBUFS;
            }
        }
        e->next_free += gt_sectors * 512;
        gd[gdi] = (uint32_t)(off / 512);
    }
    e->gd_dirty = true;
    return 0;
}

static int
map_sparse_write(Vmdk *s, VmdkExt *e, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r)
{
    if (e->compressed) {
        return -ENOTSUP;
    }
    uint64_t rel = offset - e->start;
    GLoc l;
    gloc(e, rel, &l);
    uint64_t gstart = e->start + (l.gi << e->grain_shift);
    uint64_t end = MIN(offset + len, e->start + e->len);
    VmdkAllocation *busy = alloc_conflict(e, gstart, MIN(end, gstart + e->grain_bytes));
    if (busy) {
        r->wait_next = busy->waiters;
        busy->waiters = r;
        return VDK_WAIT;
    }
    uint64_t t, rt = 0;
    int ret = gt_offset(s, e, e->gd, l.gdi, &t);
    if (ret < 0) {
        return ret;
    }
    if (e->rgd && (ret = gt_offset(s, e, e->rgd, l.gdi, &rt)) < 0) {
        return ret;
    }
    if (!t || (e->rgd && !rt)) {
        if (t || rt) {
            return vmdk_corrupt(s, "grain directory entry %" G_GUINT64_FORMAT " differs from its redundant copy",
                                l.gdi);
        }
        ret = new_gt(s, e, l.gdi);
        if (ret < 0) {
            return ret;
        }
        t = (uint64_t)e->gd[l.gdi] * 512;
        rt = e->rgd ? (uint64_t)e->rgd[l.gdi] * 512 : 0;
    }
    uint64_t soff = (l.gti * 4) & ~(uint64_t)(VMDK_GT_SLICE - 1);
    VdkMetaEntry *sl = vdk_mc_get(e->gtc, t + soff, r, &ret);
    if (!sl) {
        return ret ? ret : -EIO;
    }
    uint32_t v = rd32((uint8_t *)sl->data + l.in_slice * 4);
    GStatus st;
    uint64_t host;
    ret = classify(s, e, v, offset, &st, &host);
    if (ret < 0) {
        return ret;
    }
    if (st == G_DATA) {
        /* in place, over following grains contiguous on the host */
        uint64_t stop = MIN(end, gstart + e->grain_bytes);
        uint32_t idx = l.in_slice + 1;
        uint64_t next = host + e->grain_bytes;
        while (stop < end && idx < l.slice_n && stop == gstart + (uint64_t)(idx - l.in_slice) * e->grain_bytes) {
            uint32_t v2 = rd32((uint8_t *)sl->data + idx * 4);
            if ((uint64_t)v2 * 512 != next || v2 < 2 || alloc_conflict(e, stop, stop + e->grain_bytes)) {
                break;
            }
            stop = MIN(end, stop + e->grain_bytes);
            next += e->grain_bytes;
            idx++;
        }
        ext->kind = VDK_EXT_DATA;
        ext->file = e->file;
        ext->host_offset = host + (offset - gstart);
        ext->len = stop - offset;
        return 0;
    }
    vdk_mc_pin(sl);
    VdkMetaEntry *rsl = NULL;
    if (rt) {
        rsl = vdk_mc_get(e->rgtc, rt + soff, r, &ret);
        if (!rsl) {
            vdk_mc_unpin(sl);
            return ret ? ret : -EIO;
        }
        vdk_mc_pin(rsl);
    }
    /* Allocation: this grain and the following unallocated ones the write
     * covers, appended at the end of the file. */
    uint32_t k = 1;
    while (l.in_slice + k < l.slice_n && gstart + (uint64_t)k * e->grain_bytes < end && k < VMDK_MAX_ALLOC_GRAINS) {
        uint64_t g2 = gstart + (uint64_t)k * e->grain_bytes;
        uint32_t v2 = rd32((uint8_t *)sl->data + (l.in_slice + k) * 4);
        if (!(v2 == 0 || (v2 == 1 && e->zeroed_grain)) || alloc_conflict(e, g2, g2 + e->grain_bytes)) {
            break;
        }
        k++;
    }
    uint64_t gend = MIN(gstart + (uint64_t)k * e->grain_bytes, e->start + e->len);
    uint64_t last_v = rd32((uint8_t *)sl->data + (l.in_slice + k - 1) * 4);
    bool backing = s->node->backing != NULL;
    uint64_t wend = MIN(end, gend);
    bool head_old = offset != gstart && v == 0 && backing;
    bool tail_old = wend != gend && last_v == 0 && backing;
    uint64_t host_new = vdk_align_up(e->next_free, 512);
    if (host_new / 512 + (uint64_t)k * e->h.grain_size > UINT32_MAX) {
        vdk_mc_unpin(sl);
        if (rsl) {
            vdk_mc_unpin(rsl);
        }
        return -EFBIG; /* grain table entries are 32-bit sector numbers */
    }
    VmdkAllocation *a = g_new0(VmdkAllocation, 1);
    a->e = e;
    a->gt = sl;
    a->rgt = rsl;
    a->idx = l.in_slice;
    a->n = k;
    a->base.guest_start = gstart;
    a->base.guest_end = gend;
    a->base.file = e->file;
    a->base.host_offset = host_new;
    a->base.cow = head_old || tail_old;
    a->base.opaque = s;
    if (!a->base.cow && (offset != gstart || wend != gend)) {
        a->base.prezero_off = host_new;
        a->base.prezero_len = (uint64_t)k * e->grain_bytes;
    }
    e->next_free = host_new + (uint64_t)k * e->grain_bytes;
    a->next = e->allocs;
    e->allocs = a;
    ext->kind = VDK_EXT_ALLOC;
    ext->alloc = &a->base;
    ext->len = wend - offset;
    return 0;
}

/* A delta disk is valid only over the parent it was made from: the
 * parent's CID must still be the parentCID recorded (a parent written
 * since has a new CID).  Checked on first use, as qemu does (its reads
 * then fail with EINVAL). */
static bool
parent_matches(Vmdk *s)
{
    if (s->parent_ok == 0) {
        VdkNode *b = s->node->backing;
        s->parent_ok = 1;
        if (b && b->drv == &vdk_format_vmdk && s->desc.has_parent_cid && b->opaque) {
            Vmdk *ps = b->opaque;
            if (ps->desc.cid != s->desc.parent_cid) {
                s->parent_ok = -1;
                g_log("vdk", G_LOG_LEVEL_WARNING,
                      "vmdk: %s: the parent '%s' was modified since this delta disk was made (parentCID %08x, "
                      "parent CID %08x)",
                      s->node->filename, b->filename, s->desc.parent_cid, ps->desc.cid);
            }
        }
    }
    return s->parent_ok > 0;
}

static int
map_locked(Vmdk *s, uint64_t offset, uint64_t len, unsigned flags, VdkExtent *ext, VdkRequest *r)
{
    if (!parent_matches(s)) {
        return -EINVAL;
    }
    VmdkExt *e = find_ext(s, offset);
    if (!e) {
        return -EIO;
    }
    bool write = (flags & VDK_MAP_WRITE) != 0;
    uint64_t avail = MIN(len, e->start + e->len - offset);
    if (s->stream_write) {
        ext->kind = VDK_EXT_DATA;
        ext->file = s->scratch;
        ext->host_offset = offset;
        ext->len = len;
        ext->recurse = true;
        if (write) {
            s->stream_written = true;
        }
        return 0;
    }
    if (write && (s->corrupt || e->read_only)) {
        return s->corrupt ? -EIO : -EACCES;
    }
    switch (e->type) {
    case VMDK_ET_ZERO:
        if (write) {
            return -EACCES;
        }
        ext->kind = VDK_EXT_ZERO;
        ext->len = avail;
        return 0;
    case VMDK_ET_FLAT:
        ext->kind = VDK_EXT_DATA;
        ext->file = e->file;
        ext->host_offset = e->flat_offset + (offset - e->start);
        ext->len = avail;
        ext->recurse = true;
        return 0;
    case VMDK_ET_SPARSE:
        if (write) {
            if (!r) {
                return -EAGAIN;
            }
            return map_sparse_write(s, e, offset, avail, ext, r);
        }
        return map_sparse_read(s, e, offset, avail, ext, r);
    }
    return -EIO;
}

static void vmdk_writeback_async(Vmdk *s, VdkQueue *q);

/* A new content id in the descriptor (first write after open; lock held). */
static void
vmdk_new_cid(Vmdk *s)
{
    s->cid_updated = true;
    uint32_t cid;
    do {
        cid = g_random_int();
    } while (cid == s->desc.cid || cid == 0xffffffffu);
    s->desc.cid = cid;
    char v[16];
    g_snprintf(v, sizeof(v), "%08x", cid);
    char *t = vdk_vmdk_desc_set_key(s->desc_text, "CID", v);
    g_free(s->desc_text);
    s->desc_text = t;
    s->desc_dirty = true;
}

static int
vmdk_map(VdkNode *n, uint64_t offset, uint64_t len, unsigned flags, VdkExtent *ext, VdkRequest *r)
{
    Vmdk *s = n->opaque;
    g_mutex_lock(&n->lock);
    int ret = map_locked(s, offset, len, flags, ext, r);
    bool evict = ret == -ENOBUFS && r && !s->wb_running;
    if (ret == -ENOBUFS && r) {
        r->wait_next = s->wb_waiters;
        s->wb_waiters = r;
        ret = VDK_WAIT;
    }
    if (ret == 0 && (flags & VDK_MAP_WRITE) && !s->cid_updated && !s->stream_write && s->desc_text &&
        s->desc.has_cid) {
        vmdk_new_cid(s); /* the first write gives the image a new content id */
    }
    g_mutex_unlock(&n->lock);
    if (evict) {
        vmdk_writeback_async(s, r->q);
    }
    return ret;
}

static int
vmdk_block_status(VdkNode *n, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r)
{
    return vmdk_map(n, offset, len, 0, ext, r);
}

/* ------------------------------------------------------------------------ */
/* Zero writes                                                               */
/* ------------------------------------------------------------------------ */

/* Ranges to fill with zero buffers once the lock is dropped (the normal
 * write path maps them, which takes the lock). */
typedef struct {
    uint64_t off[VMDK_MAX_ALLOC_GRAINS + 1];
    uint64_t len[VMDK_MAX_ALLOC_GRAINS + 1];
    unsigned n;
} ZeroList;

static void
zero_later(ZeroList *zl, uint64_t off, uint64_t len)
{
    if (zl->n && zl->off[zl->n - 1] + zl->len[zl->n - 1] == off) {
        zl->len[zl->n - 1] += len;
        return;
    }
    zl->off[zl->n] = off;
    zl->len[zl->n] = len;
    zl->n++;
}

/* Write zero buffers over the listed ranges through the normal write path. */
static void
zero_buffers(VdkNode *n, VdkRequest *r, const ZeroList *zl)
{
    size_t zlen;
    const void *z = vdk_zero_buffer(&zlen);
    for (unsigned i = 0; i < zl->n; i++) {
        uint64_t off = zl->off[i], len = zl->len[i];
        while (len) {
            uint64_t k = MIN(len, (uint64_t)zlen);
            struct iovec v = {(void *)z, (size_t)k};
            vdk_request_io_node(r, n, VDK_OP_WRITE, off, &v, 1, k);
            off += k;
            len -= k;
        }
    }
}

/* One step on a sparse extent with zeroed-grain entries, from r->cursor to
 * @end (inside the extent): whole grains that hold no data of their own
 * become zeroed grains (GTE 1); allocated grains and partial grains are
 * written with zero buffers (no grain is dropped, so nothing leaks).
 * Lock held.  Returns 0 (cursor advanced), VDK_WAIT or -errno. */
static int
zero_sparse_step(Vmdk *s, VmdkExt *e, VdkRequest *r, uint64_t end, ZeroList *zl)
{
    uint64_t pos = r->cursor;
    uint64_t gstart = vdk_align_down(pos - e->start, e->grain_bytes) + e->start;
    uint64_t gend = MIN(gstart + e->grain_bytes, e->start + e->len);
    if (pos != gstart || gend > end) {
        uint64_t stop = MIN(end, gend);
        zero_later(zl, pos, stop - pos);
        r->cursor = stop;
        return 0;
    }
    VmdkAllocation *busy = alloc_conflict(e, gstart, gend);
    if (busy) {
        r->wait_next = busy->waiters;
        busy->waiters = r;
        return VDK_WAIT;
    }
    GLoc l;
    gloc(e, pos - e->start, &l);
    uint64_t t, rt = 0;
    int ret = gt_offset(s, e, e->gd, l.gdi, &t);
    if (ret < 0) {
        return ret;
    }
    if (e->rgd && (ret = gt_offset(s, e, e->rgd, l.gdi, &rt)) < 0) {
        return ret;
    }
    if (!t || (e->rgd && !rt)) {
        if (t || rt) {
            return vmdk_corrupt(s, "grain directory entry %" G_GUINT64_FORMAT " differs from its redundant copy",
                                l.gdi);
        }
        if ((ret = new_gt(s, e, l.gdi)) < 0) {
            return ret;
        }
        t = (uint64_t)e->gd[l.gdi] * 512;
        rt = e->rgd ? (uint64_t)e->rgd[l.gdi] * 512 : 0;
    }
    uint64_t soff = (l.gti * 4) & ~(uint64_t)(VMDK_GT_SLICE - 1);
    VdkMetaEntry *sl = vdk_mc_get(e->gtc, t + soff, r, &ret);
    if (!sl) {
        return ret ? ret : -EIO;
    }
    vdk_mc_pin(sl);
    VdkMetaEntry *rsl = NULL;
    if (rt) {
        rsl = vdk_mc_get(e->rgtc, rt + soff, r, &ret);
        if (!rsl) {
            vdk_mc_unpin(sl);
            return ret ? ret : -EIO;
        }
    }
    bool changed = false;
    uint32_t idx = l.in_slice;
    while (idx < l.slice_n && pos < end) {
        uint64_t g0 = e->start + (((pos - e->start) >> e->grain_shift) << e->grain_shift);
        uint64_t g1 = MIN(g0 + e->grain_bytes, e->start + e->len);
        if (g1 > end || alloc_conflict(e, g0, g1)) {
            break;
        }
        uint32_t v = rd32((uint8_t *)sl->data + idx * 4);
        if (v > 1) {
            zero_later(zl, g0, g1 - g0); /* keep the grain, write zeroes into it */
        } else if (v == 0) {
            wr32((uint8_t *)sl->data + idx * 4, 1);
            if (rsl) {
                wr32((uint8_t *)rsl->data + idx * 4, 1);
            }
            changed = true;
        }
        pos = g1;
        idx++;
    }
    if (changed) {
        vdk_mc_mark_dirty(e->gtc, sl);
        if (rsl) {
            vdk_mc_mark_dirty(e->rgtc, rsl);
        }
    }
    vdk_mc_unpin(sl);
    r->cursor = pos;
    return 0;
}

static int
vmdk_write_zeroes(VdkNode *n, VdkRequest *r)
{
    Vmdk *s = n->opaque;
    uint64_t end = r->offset + r->len;
    if (r->drv_state == 0) {
        /* Only flat extents and sparse extents with zeroed grains do better
         * than zero buffers; anything else is left to the block layer. */
        g_mutex_lock(&n->lock);
        bool ok = !s->corrupt && !s->stream_write;
        for (uint64_t p = r->offset; p < end && ok;) {
            VmdkExt *e = find_ext(s, p);
            ok = e && !e->read_only &&
                 (e->type == VMDK_ET_FLAT || (e->type == VMDK_ET_SPARSE && e->zeroed_grain && !e->compressed));
            p = e ? e->start + e->len : end;
        }
        g_mutex_unlock(&n->lock);
        if (!ok) {
            return -ENOTSUP;
        }
        r->drv_state = 1;
        r->cursor = r->offset;
    }
    while (r->cursor < end) {
        g_mutex_lock(&n->lock);
        VmdkExt *e = find_ext(s, r->cursor);
        if (!e) {
            g_mutex_unlock(&n->lock);
            return -EIO;
        }
        uint64_t stop = MIN(end, e->start + e->len);
        int ret = 0;
        ZeroList zl;
        zl.n = 0;
        VdkFile *flat_file = NULL;
        uint64_t flat_off = 0, flat_len = 0;
        if (e->type == VMDK_ET_FLAT) {
            flat_file = e->file;
            flat_off = e->flat_offset + (r->cursor - e->start);
            flat_len = stop - r->cursor;
            r->cursor = stop;
        } else {
            ret = zero_sparse_step(s, e, r, stop, &zl);
        }
        bool evict = ret == -ENOBUFS && !s->wb_running;
        if (ret == -ENOBUFS) {
            r->wait_next = s->wb_waiters;
            s->wb_waiters = r;
            ret = VDK_WAIT;
        }
        if (ret == 0 && !s->cid_updated && s->desc.has_cid) {
            vmdk_new_cid(s);
        }
        g_mutex_unlock(&n->lock);
        if (flat_file) {
            vdk_req_file_zero(r, flat_file, flat_off, flat_len, r->flags & ~(uint32_t)VDK_REQ_NO_FALLBACK);
        }
        zero_buffers(n, r, &zl);
        if (evict) {
            vmdk_writeback_async(s, r->q);
        }
        if (ret) {
            return ret;
        }
    }
    return 0;
}

static void
vmdk_alloc_done(VdkNode *n, VdkAlloc *base, int err, VdkQueue *q)
{
    VmdkAllocation *a = (VmdkAllocation *)base;
    VmdkExt *e = a->e;
    g_mutex_lock(&n->lock);
    for (VmdkAllocation **p = &e->allocs; *p; p = &(*p)->next) {
        if (*p == a) {
            *p = a->next;
            break;
        }
    }
    if (err == 0) {
        for (uint32_t i = 0; i < a->n; i++) {
            uint32_t v = (uint32_t)(base->host_offset / 512 + (uint64_t)i * e->h.grain_size);
            wr32((uint8_t *)a->gt->data + (a->idx + i) * 4, v);
            if (a->rgt) {
                wr32((uint8_t *)a->rgt->data + (a->idx + i) * 4, v);
            }
        }
        vdk_mc_mark_dirty(e->gtc, a->gt);
        if (a->rgt) {
            vdk_mc_mark_dirty(e->rgtc, a->rgt);
        }
    }
    /* (a failed write leaves its appended space unused: a leak check
     * reports it) */
    vdk_mc_unpin(a->gt);
    if (a->rgt) {
        vdk_mc_unpin(a->rgt);
    }
    VdkRequest *w = a->waiters;
    g_mutex_unlock(&n->lock);
    while (w) {
        VdkRequest *next = w->wait_next;
        w->wait_next = NULL;
        vdk_request_resume(w, q);
        w = next;
    }
    g_free(a);
}

static int
vmdk_decompress(VdkNode *n, const void *in, size_t in_len, void *out, size_t out_len)
{
    (void)n;
    const uint8_t *p = in;
    size_t clen = in_len;
    if (in_len < VMDK_MARKER_HDR) {
        return -EIO;
    }
    /* compressed grains always start with lba (8) and size (4) */
    clen = rd32(p + 8);
    p += VMDK_MARKER_HDR;
    if (clen == 0 || clen > in_len - VMDK_MARKER_HDR) {
        return -EIO;
    }
    static GPrivate dkey = G_PRIVATE_INIT((GDestroyNotify)libdeflate_free_decompressor);
    struct libdeflate_decompressor *d = g_private_get(&dkey);
    if (!d) {
        d = libdeflate_alloc_decompressor();
        if (!d) {
            return -ENOMEM;
        }
        g_private_set(&dkey, d);
    }
    size_t got = 0;
    enum libdeflate_result r = libdeflate_zlib_decompress(d, p, clen, out, out_len, &got);
    if (r != LIBDEFLATE_SUCCESS && r != LIBDEFLATE_SHORT_OUTPUT) {
        return -EIO;
    }
    if (got < out_len) {
        memset((uint8_t *)out + got, 0, out_len - got);
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Writeback                                                                 */
/* ------------------------------------------------------------------------ */

/* Steps of a writeback.  Data is durable before the grain tables that
 * point at it; primary tables are durable before the redundant copies (so
 * after a crash the redundant copy is never ahead of the primary one);
 * tables before the directories that point at new tables; the primary
 * directory before the redundant one. */
enum {
    WB_SYNC_DATA = 0,
    WB_GT,
    WB_SYNC_RGT,
    WB_RGT,
    WB_SYNC_GT,
    WB_GD,
    WB_SYNC_RGD,
    WB_RGD,
    WB_DESC,
    WB_SYNC_ALL,
    WB_DONE,
};

typedef struct {
    Vmdk *s;
    VdkRequest *r;
    int step;
    bool final;
    bool wrote; /* the previous step wrote something */
    GPtrArray *bufs;
} Wb;

static void wb_run(Wb *wb);

static void
wb_sub_done(VdkRequest *sub)
{
    Wb *wb = sub->done_opaque;
    g_ptr_array_set_size(wb->bufs, 0);
    if (sub->error) {
        wb->step = WB_DONE;
    }
    wb_run(wb);
}

static bool
any_gt_dirty(Vmdk *s)
{
    for (size_t i = 0; i < s->n_ext; i++) {
        if (s->ext[i].gtc && (vdk_mc_dirty_count(s->ext[i].gtc) || s->ext[i].gd_dirty || s->ext[i].rgd_dirty ||
                              (s->ext[i].rgtc && vdk_mc_dirty_count(s->ext[i].rgtc)))) {
            return true;
        }
    }
    return false;
}

static void *
abuf(Wb *wb, size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, vdk_align_up(MAX(len, (size_t)512), 512)) != 0) {
        return NULL;
    }
    memset(p, 0, vdk_align_up(MAX(len, (size_t)512), 512));
    g_ptr_array_add(wb->bufs, p);
    return p;
}

static void
sync_files(Wb *wb, VdkRequest *sub, bool sparse_only)
{
    Vmdk *s = wb->s;
    bool main_done = false;
    for (size_t i = 0; i < s->n_ext; i++) {
        VmdkExt *e = &s->ext[i];
        if (!e->file || (sparse_only && e->type != VMDK_ET_SPARSE) || e->read_only) {
            continue;
        }
        if (e->file == s->node->file) {
            main_done = true;
        }
        vdk_req_file_flush(sub, e->file);
    }
    if (!main_done && !sparse_only) {
        vdk_req_file_flush(sub, s->node->file);
    }
}

static void
wb_run(Wb *wb)
{
    Vmdk *s = wb->s;
    VdkNode *n = s->node;
    for (;;) {
        int step = wb->step++;
        bool wrote = wb->wrote;
        wb->wrote = false;
        switch (step) {
        case WB_SYNC_DATA:
            /* data written before its grain table entries reaches the disk
             * first */
            if (any_gt_dirty(s) && !s->corrupt) {
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                sync_files(wb, sub, true);
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        case WB_GT:
        case WB_RGT: {
            if (s->corrupt) {
                continue;
            }
            bool red = step == WB_RGT;
            VdkRequest *sub = NULL;
            g_mutex_lock(&n->lock);
            for (size_t i = 0; i < s->n_ext; i++) {
                VmdkExt *e = &s->ext[i];
                VdkMetaCache *c = red ? e->rgtc : e->gtc;
                if (!c) {
                    continue;
                }
                VdkMcWrite *list = vdk_mc_collect_dirty(c);
                if (list) {
                    if (!sub) {
                        sub = vdk_subreq(wb->r, wb_sub_done, wb);
                    }
                    g_mutex_unlock(&n->lock);
                    vdk_mc_issue_writes(list, sub);
                    g_mutex_lock(&n->lock);
                }
            }
            g_mutex_unlock(&n->lock);
            if (sub) {
                wb->wrote = true;
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        }
        case WB_SYNC_RGT:
        case WB_SYNC_RGD:
            if (wrote && !s->corrupt) {
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                sync_files(wb, sub, true);
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        case WB_SYNC_GT: {
            bool gd = false;
            for (size_t i = 0; i < s->n_ext; i++) {
                gd |= s->ext[i].gd_dirty;
            }
            if (gd && !s->corrupt) {
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                sync_files(wb, sub, true);
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        }
        case WB_GD:
        case WB_RGD: {
            bool red = step == WB_RGD;
            VdkRequest *sub = NULL;
            g_mutex_lock(&n->lock);
            for (size_t i = 0; i < s->n_ext && !s->corrupt; i++) {
                VmdkExt *e = &s->ext[i];
                uint32_t *gd = red ? e->rgd : e->gd;
                bool dirty = red ? e->rgd_dirty : e->gd_dirty;
                if (!dirty || !gd) {
                    continue;
                }
                if (red) {
                    e->rgd_dirty = false;
                } else {
                    e->gd_dirty = false;
                    e->rgd_dirty = e->rgd != NULL;
                }
                size_t bytes = (size_t)e->gd_entries * 4;
                uint8_t *b = abuf(wb, bytes);
                if (!b) {
                    vdk_req_set_error(wb->r, -ENOMEM);
                    continue;
                }
                for (uint64_t j = 0; j < e->gd_entries; j++) {
                    wr32(b + j * 4, gd[j]);
                }
                if (!sub) {
                    sub = vdk_subreq(wb->r, wb_sub_done, wb);
                }
                struct iovec v = {b, bytes};
                vdk_req_file_rw(sub, e->file, true, red ? e->rgd_off : e->gd_off, &v, 1, bytes, 0);
            }
            g_mutex_unlock(&n->lock);
            if (sub) {
                wb->wrote = true;
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        }
        case WB_DESC: {
            g_mutex_lock(&n->lock);
            if (!s->desc_dirty) {
                g_mutex_unlock(&n->lock);
                continue;
            }
            s->desc_dirty = false;
            size_t len = strlen(s->desc_text);
            uint64_t off = s->desc_embedded ? s->desc_off : 0;
            size_t wlen = s->desc_embedded ? (size_t)s->desc_cap : len;
            if (s->desc_embedded && len > s->desc_cap) {
                g_mutex_unlock(&n->lock);
                continue; /* cannot happen: CID keeps its length or shrinks the slack */
            }
            uint8_t *b = abuf(wb, wlen);
            if (!b) {
                g_mutex_unlock(&n->lock);
                vdk_req_set_error(wb->r, -ENOMEM);
                continue;
            }
            memcpy(b, s->desc_text, len);
            g_mutex_unlock(&n->lock);
            VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
            struct iovec v = {b, wlen};
            vdk_req_file_rw(sub, s->node->file, true, off, &v, 1, wlen, 0);
            vdk_subreq_launch(sub);
            return;
        }
        case WB_SYNC_ALL: {
            VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
            sync_files(wb, sub, false);
            if (s->scratch) {
                vdk_req_file_flush(sub, s->scratch);
            }
            vdk_subreq_launch(sub);
            return;
        }
        default: {
            g_mutex_lock(&n->lock);
            s->wb_running = false;
            VdkRequest *w = s->wb_waiters;
            s->wb_waiters = NULL;
            g_mutex_unlock(&n->lock);
            VdkQueue *q = wb->r->q;
            g_ptr_array_unref(wb->bufs);
            g_free(wb);
            while (w) {
                VdkRequest *next = w->wait_next;
                w->wait_next = NULL;
                vdk_request_resume(w, q);
                w = next;
            }
            return;
        }
        }
    }
}

static int
vmdk_flush(VdkNode *n, VdkRequest *r)
{
    Vmdk *s = n->opaque;
    bool final = (r->flags & VDK_FLUSH_FINAL) != 0;
    bool evict = (r->flags & VDK_FLUSH_EVICT) != 0;
    if (n->file->no_flush && !final && !evict) {
        return 0;
    }
    g_mutex_lock(&n->lock);
    if (s->wb_running) {
        r->wait_next = s->wb_waiters;
        s->wb_waiters = r;
        g_mutex_unlock(&n->lock);
        return VDK_WAIT;
    }
    s->wb_running = true;
    g_mutex_unlock(&n->lock);
    Wb *wb = g_new0(Wb, 1);
    wb->s = s;
    wb->r = r;
    wb->final = final;
    wb->bufs = g_ptr_array_new_with_free_func(free);
    wb_run(wb);
    return 0;
}

static void
vmdk_writeback_async(Vmdk *s, VdkQueue *q)
{
    VdkRequest *f = vdk_request_new_internal(q, s->node, VDK_OP_FLUSH);
    f->flags = VDK_FLUSH_EVICT;
    vdk_request_start(f);
}

/* ------------------------------------------------------------------------ */
/* streamOptimized: writing the stream                                       */
/* ------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *in;    /* grains of the batch */
    uint8_t **out;        /* per grain: marker + compressed data, or NULL (zero) */
    size_t *out_len;
    uint64_t first_grain;
    uint32_t n;
    uint32_t grain_bytes;
    uint64_t grain_sectors;
    gint next;
    int level;
} CompressJob;

static gpointer
compress_worker(gpointer opaque)
{
    CompressJob *j = opaque;
    uLong cap = compressBound(j->grain_bytes);
    for (;;) {
        gint i = g_atomic_int_add(&j->next, 1);
        if ((uint32_t)i >= j->n) {
            break;
        }
        const uint8_t *g = j->in + (size_t)i * j->grain_bytes;
        if (vdk_buffer_is_zero(g, j->grain_bytes)) {
            j->out[i] = NULL;
            continue;
        }
        size_t total = vdk_align_up(VMDK_MARKER_HDR + cap, 512);
        uint8_t *o = g_malloc0(total);
        uLongf clen = cap;
        if (compress2(o + VMDK_MARKER_HDR, &clen, g, j->grain_bytes, j->level) != Z_OK) {
            g_free(o);
            j->out[i] = (uint8_t *)-1;
            continue;
        }
        wr64(o, (j->first_grain + (uint64_t)i) * j->grain_sectors);
        wr32(o + 8, (uint32_t)clen);
        j->out[i] = o;
        j->out_len[i] = vdk_align_up(VMDK_MARKER_HDR + clen, 512);
    }
    return NULL;
}

static bool
pwrite_all(VdkFile *f, const void *buf, size_t len, uint64_t off, GError **error)
{
    int r = vdk_file_pwrite_sync(f, buf, len, off);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "vmdk: writing the stream failed: %s", g_strerror(-r));
        return false;
    }
    return true;
}

static void
marker(uint8_t *b, uint64_t val, uint32_t type)
{
    memset(b, 0, 512);
    wr64(b, val);
    wr32(b + 12, type);
}

/* Write the whole stream into the image file from the scratch file: header
 * (gdOffset at the end), descriptor, then per grain table its compressed
 * grains followed by the table, then the grain directory, the footer and
 * the end-of-stream marker.  Grains are compressed by one thread per core,
 * a batch at a time; the file is written strictly in order. */
static bool
stream_write_out(Vmdk *s, GError **error)
{
    VmdkExt *e = &s->ext[0];
    VdkFile *f = s->node->file;
    uint64_t gb = e->grain_bytes;
    uint64_t grains = (e->h.capacity + e->h.grain_size - 1) / e->h.grain_size;
    uint64_t ngt = e->gd_entries;
    uint32_t gtes = e->h.num_gtes;
    uint64_t gt_sectors = vdk_align_up(e->gt_bytes, 512) / 512;
    /* header, descriptor (20 sectors, as VMware's tools write it), grains
     * from the next grain boundary */
    uint64_t desc_sectors = 20;
    size_t dlen = strlen(s->desc_text);
    if (dlen > desc_sectors * 512) {
        desc_sectors = vdk_align_up(dlen, 512) / 512;
    }
    uint64_t overhead = vdk_align_up(1 + desc_sectors, e->h.grain_size);
    uint64_t pos = overhead * 512;
    uint32_t *gd = g_new0(uint32_t, MAX(ngt, (uint64_t)1));
    uint8_t *gt = g_malloc(gt_sectors * 512);
    uint32_t batch = (uint32_t)MAX((uint64_t)1, MIN((uint64_t)gtes, (16ULL << 20) / gb));
    uint8_t *in = g_malloc(batch * gb);
    uint8_t **out = g_new0(uint8_t *, batch);
    size_t *out_len = g_new0(size_t, batch);
    int nthreads = (int)MAX(1u, MIN(g_get_num_processors(), 16u));
    GThread **th = g_new0(GThread *, nthreads);
    bool ok = false;
    uint8_t mk[512];

    if (!vdk_file_truncate(f, 0, VDK_PREALLOC_OFF, error) || !vdk_file_truncate(f, pos, VDK_PREALLOC_OFF, error)) {
        goto out;
    }
    {
        char *db = g_malloc0(desc_sectors * 512);
        memcpy(db, s->desc_text, dlen);
        bool w = pwrite_all(f, db, desc_sectors * 512, 512, error);
        g_free(db);
        if (!w) {
            goto out;
        }
    }
    for (uint64_t t = 0; t < ngt; t++) {
        memset(gt, 0, gt_sectors * 512);
        bool any = false;
        uint64_t g0 = t * gtes;
        uint64_t gcount = MIN((uint64_t)gtes, grains - g0);
        for (uint64_t b = 0; b < gcount; b += batch) {
            uint32_t nb = (uint32_t)MIN((uint64_t)batch, gcount - b);
            uint64_t goff = (g0 + b) * gb;
            /* skip holes in the scratch file quickly */
            uint64_t span = MIN((uint64_t)nb * gb, s->node->size - goff);
            uint64_t pnum = 0;
            int st = vdk_file_seek_status(s->scratch, goff, span, &pnum);
            if (st == 0 && pnum >= span) {
                continue;
            }
            memset(in, 0, (size_t)nb * gb);
            int rr = vdk_file_pread_sync(s->scratch, in, span, goff);
            if (rr < 0) {
                g_set_error(error, VDK_ERROR, -rr, "vmdk: reading the scratch file failed: %s", g_strerror(-rr));
                goto out;
            }
            CompressJob job = {.in = in, .out = out, .out_len = out_len, .first_grain = g0 + b, .n = nb,
                               .grain_bytes = (uint32_t)gb, .grain_sectors = e->h.grain_size, .next = 0,
                               .level = Z_DEFAULT_COMPRESSION};
            int nt = (int)MIN((uint32_t)nthreads, nb);
            for (int k = 1; k < nt; k++) {
                th[k] = g_thread_new("vmdk-deflate", compress_worker, &job);
            }
            compress_worker(&job);
            for (int k = 1; k < nt; k++) {
                g_thread_join(th[k]);
            }
            for (uint32_t i = 0; i < nb; i++) {
                if (!out[i]) {
                    continue;
                }
                if (out[i] == (uint8_t *)-1) {
                    out[i] = NULL;
                    g_set_error(error, VDK_ERROR, EIO, "vmdk: compressing a grain failed");
                    goto out;
                }
                if (pos / 512 > UINT32_MAX) {
                    g_set_error(error, VDK_ERROR, EFBIG, "vmdk: the stream is larger than 2 TiB");
                    goto out;
                }
                wr32(gt + (b + i) * 4, (uint32_t)(pos / 512));
                any = true;
                if (!pwrite_all(f, out[i], out_len[i], pos, error)) {
                    goto out;
                }
                pos += out_len[i];
                g_free(out[i]);
                out[i] = NULL;
            }
        }
        /* every table is written, empty ones too, as VMware's own stream
         * writer does (readers may expect a table per directory entry) */
        (void)any;
        {
            marker(mk, gt_sectors, VMDK_MARKER_GT);
            if (!pwrite_all(f, mk, 512, pos, error)) {
                goto out;
            }
            pos += 512;
            gd[t] = (uint32_t)(pos / 512);
            if (!pwrite_all(f, gt, gt_sectors * 512, pos, error)) {
                goto out;
            }
            pos += gt_sectors * 512;
        }
    }
    uint64_t gd_sectors = vdk_align_up(ngt * 4, 512) / 512;
    marker(mk, gd_sectors, VMDK_MARKER_GD);
    if (!pwrite_all(f, mk, 512, pos, error)) {
        goto out;
    }
    pos += 512;
    uint64_t gd_off = pos;
    uint8_t *gdb = g_malloc0(gd_sectors * 512);
    for (uint64_t t = 0; t < ngt; t++) {
        wr32(gdb + t * 4, gd[t]);
    }
    ok = pwrite_all(f, gdb, gd_sectors * 512, pos, error);
    g_free(gdb);
    if (!ok) {
        goto out;
    }
    ok = false;
    pos += gd_sectors * 512;
    VmdkHeader h = e->h;
    h.version = 3;
    h.flags = VMDK4_FLAG_NL_DETECT | VMDK4_FLAG_COMPRESS | VMDK4_FLAG_MARKER;
    h.rgd_offset = 0;
    h.desc_offset = 1;
    h.desc_size = desc_sectors;
    h.overhead = overhead;
    h.gd_offset = gd_off / 512;
    h.compress = 1;
    marker(mk, 1, VMDK_MARKER_FOOTER);
    if (!pwrite_all(f, mk, 512, pos, error)) {
        goto out;
    }
    pos += 512;
    uint8_t hb[512];
    vdk_vmdk_header_encode(&h, hb);
    if (!pwrite_all(f, hb, 512, pos, error)) {
        goto out;
    }
    pos += 512;
    memset(mk, 0, 512);
    if (!pwrite_all(f, mk, 512, pos, error)) {
        goto out;
    }
    pos += 512;
    /* the header says "at the end" */
    h.gd_offset = VMDK_GD_AT_END;
    vdk_vmdk_header_encode(&h, hb);
    if (!pwrite_all(f, hb, 512, 0, error) || !vdk_file_truncate(f, pos, VDK_PREALLOC_OFF, error)) {
        goto out;
    }
    if (vdk_file_flush_sync(f) < 0) {
        g_set_error(error, VDK_ERROR, EIO, "vmdk: cannot sync the stream");
        goto out;
    }
    ok = true;
out:
    for (uint32_t i = 0; i < batch; i++) {
        if (out[i] && out[i] != (uint8_t *)-1) {
            g_free(out[i]);
        }
    }
    g_free(out);
    g_free(out_len);
    g_free(in);
    g_free(gt);
    g_free(gd);
    g_free(th);
    return ok;
}

/* ------------------------------------------------------------------------ */
/* Info                                                                      */
/* ------------------------------------------------------------------------ */

static void
json_str(GString *j, const char *s)
{
    g_string_append_c(j, '"');
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\') {
            g_string_append_printf(j, "\\%c", c);
        } else if (c < 0x20) {
            g_string_append_printf(j, "\\u%04x", c);
        } else {
            g_string_append_c(j, (char)c);
        }
    }
    g_string_append_c(j, '"');
}

static void
vmdk_info(VdkNode *n, VdkInfo *info)
{
    Vmdk *s = n->opaque;
    if (s->n_ext && s->ext[0].type == VMDK_ET_SPARSE) {
        info->cluster_size = s->ext[0].grain_bytes;
    }
    GString *j = g_string_new(NULL);
    GPtrArray *lines = g_ptr_array_new_with_free_func(g_free);
    const char *ct = s->desc.create_type ? s->desc.create_type : "monolithicSparse";
    uint32_t pcid = s->desc.has_parent_cid ? s->desc.parent_cid : 0xffffffffu;
    /* one value per line: the CLI re-indents it for its depth (qemu's
     * layout) */
    g_string_append_printf(j, "{\n\"cid\": %u,\n\"parent-cid\": %u,\n\"create-type\": ", s->desc.cid, pcid);
    json_str(j, ct);
    g_string_append(j, ",\n\"extents\": [");
    g_ptr_array_add(lines, g_strdup_printf("cid: %u", s->desc.cid));
    g_ptr_array_add(lines, g_strdup_printf("parent cid: %u", pcid));
    g_ptr_array_add(lines, g_strdup_printf("create type: %s", ct));
    g_ptr_array_add(lines, g_strdup("extents:"));
    for (size_t i = 0; i < s->n_ext; i++) {
        VmdkExt *e = &s->ext[i];
        const char *fname = e->file ? e->file->filename : "";
        /* qemu names extent files as opened (the image's own name for a
         * monolithic file) */
        char *path = e->fname ? vdk_backing_path(n->filename, e->fname) : g_strdup(n->filename);
        (void)fname;
        g_string_append(j, i ? ",\n{\n" : "\n{\n");
        g_ptr_array_add(lines, g_strdup_printf("    [%zu]:", i));
        if (e->compressed) {
            g_string_append(j, "\"compressed\": true,\n");
            g_ptr_array_add(lines, g_strdup("        compressed: true"));
        }
        g_string_append_printf(j, "\"virtual-size\": %" G_GUINT64_FORMAT ",\n\"filename\": ", e->len);
        json_str(j, path);
        g_ptr_array_add(lines, g_strdup_printf("        virtual size: %" G_GUINT64_FORMAT, e->len));
        g_ptr_array_add(lines, g_strdup_printf("        filename: %s", path));
        if (e->type == VMDK_ET_SPARSE) {
            g_string_append_printf(j, ",\n\"cluster-size\": %" G_GUINT64_FORMAT, e->grain_bytes);
            g_ptr_array_add(lines, g_strdup_printf("        cluster size: %" G_GUINT64_FORMAT, e->grain_bytes));
        }
        const char *fmt = e->type_name ? e->type_name : "";
        g_string_append(j, ",\n\"format\": ");
        json_str(j, fmt);
        g_string_append(j, "\n}");
        g_ptr_array_add(lines, g_strdup_printf("        format: %s", fmt));
        g_free(path);
    }
    g_string_append(j, s->n_ext ? "\n]\n}" : "]\n}");
    info->specific_json = j;
    info->specific_lines = lines;
    if (s->desc.parent_hint) {
        info->backing_filename = g_strdup(s->desc.parent_hint);
        info->backing_format = g_strdup("vmdk");
    }
}

/* ------------------------------------------------------------------------ */
/* Check                                                                     */
/* ------------------------------------------------------------------------ */

static void
check_msg(VdkCheckResult *res, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static void
check_msg(VdkCheckResult *res, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    g_ptr_array_add(res->messages, g_strdup_vprintf(fmt, ap));
    va_end(ap);
}

static bool
vmdk_check(VdkNode *n, int fix, VdkCheckResult *res, GError **error)
{
    Vmdk *s = n->opaque;
    (void)fix;
    for (size_t x = 0; x < s->n_ext; x++) {
        VmdkExt *e = &s->ext[x];
        if (e->type != VMDK_ET_SPARSE) {
            continue;
        }
        uint64_t fsize = e->file->size;
        uint64_t nslots = vdk_align_up(fsize, e->grain_bytes) / e->grain_bytes + 1;
        /* grains referenced, per grain-sized slot of the file (bounded by
         * the file's real size) */
        uint8_t *used = g_try_malloc0(nslots);
        if (!used) {
            g_set_error(error, VDK_ERROR, ENOMEM, "vmdk: cannot allocate the check bitmap");
            return false;
        }
        uint8_t *gt = g_malloc(e->gt_bytes);
        uint64_t grains = (e->len + e->grain_bytes - 1) / e->grain_bytes;
        for (uint64_t t = 0; t < e->gd_entries; t++) {
            uint64_t toff = (uint64_t)e->gd[t] * 512;
            if (!e->gd[t]) {
                continue;
            }
            if (toff + e->gt_bytes > vdk_align_up(fsize, 512)) {
                check_msg(res, "ERROR: grain table %" G_GUINT64_FORMAT " at sector %u points after EOF", t, e->gd[t]);
                res->corruptions++;
                continue;
            }
            /* (a redundant directory entry of 0 is a crash between the two
             * directory writes: the primary one is authoritative) */
            int rr = vdk_file_pread_sync(e->file, gt, e->gt_bytes, toff);
            if (rr < 0) {
                check_msg(res, "ERROR: cannot read grain table %" G_GUINT64_FORMAT ": %s", t, g_strerror(-rr));
                res->check_errors++;
                continue;
            }
            bool rgt_differs = false;
            if (e->rgd && e->rgd[t] && (uint64_t)e->rgd[t] * 512 + e->gt_bytes <= vdk_align_up(fsize, 512)) {
                /* the redundant table must say the same */
                uint8_t *rgt = g_malloc(e->gt_bytes);
                if (vdk_file_pread_sync(e->file, rgt, e->gt_bytes, (uint64_t)e->rgd[t] * 512) >= 0) {
                    /* the redundant copy may lag behind (written second),
                     * never disagree */
                    for (uint32_t i = 0; i < e->h.num_gtes; i++) {
                        uint32_t a = rd32(gt + i * 4), b = rd32(rgt + i * 4);
                        rgt_differs |= a != b && b != 0;
                    }
                }
                g_free(rgt);
            } else if (e->rgd && e->rgd[t]) {
                check_msg(res, "ERROR: redundant grain table %" G_GUINT64_FORMAT " at sector %u points after EOF", t,
                          e->rgd[t]);
                res->corruptions++;
            }
            for (uint32_t i = 0; i < e->h.num_gtes; i++) {
                uint64_t gi = t * e->h.num_gtes + i;
                if (gi >= grains) {
                    break;
                }
                uint32_t v = rd32(gt + i * 4);
                if (v == 0 || (v == 1 && e->zeroed_grain)) {
                    continue;
                }
                res->allocated_clusters++;
                uint64_t sector = (e->start >> 9) + gi * e->h.grain_size;
                uint64_t h = (uint64_t)v * 512;
                if (e->compressed) {
                    res->compressed_clusters++;
                    if (h + VMDK_MARKER_HDR > fsize) {
                        check_msg(res, "ERROR: cluster offset for sector %" G_GUINT64_FORMAT " points after EOF",
                                  sector);
                        res->corruptions++;
                    }
                    continue;
                }
                if (h >= fsize) {
                    check_msg(res, "ERROR: cluster offset for sector %" G_GUINT64_FORMAT " points after EOF", sector);
                    res->corruptions++;
                    continue;
                }
                if (v < e->h.overhead) {
                    check_msg(res, "ERROR: cluster offset for sector %" G_GUINT64_FORMAT
                              " points into the metadata (sector %u)", sector, v);
                    res->corruptions++;
                    continue;
                }
                if (h % e->grain_bytes == 0) {
                    uint64_t slot = h / e->grain_bytes;
                    if (used[slot]) {
                        check_msg(res, "ERROR: cluster offset for sector %" G_GUINT64_FORMAT
                                  " is used by another grain (sector %u)", sector, v);
                        res->corruptions++;
                    }
                    used[slot] = 1;
                }
            }
            if (rgt_differs) {
                /* after the entries: qemu-img's message for them comes first */
                check_msg(res, "ERROR: grain table %" G_GUINT64_FORMAT " differs from its redundant copy", t);
                res->corruptions++;
            }
        }
        if (!e->compressed) {
            /* grains appended but never referenced (an interrupted write) */
            uint64_t meta_end = e->h.overhead * 512;
            /* directories moved past the overhead by a resize */
            for (int k = 0; k < 2; k++) {
                uint64_t a = k ? e->rgd_off : e->gd_off;
                if (a && (k == 0 || e->rgd)) {
                    uint64_t bytes = e->gd_entries * 4;
                    for (uint64_t o = a / e->grain_bytes; o <= (a + bytes - 1) / e->grain_bytes && o < nslots; o++) {
                        used[o] = 1;
                    }
                }
            }
            for (uint64_t t = 0; t < e->gd_entries; t++) {
                for (int k = 0; k < 2; k++) {
                    uint32_t *gd = k ? e->rgd : e->gd;
                    if (gd && gd[t]) {
                        uint64_t a = (uint64_t)gd[t] * 512;
                        for (uint64_t o = a / e->grain_bytes; o <= (a + e->gt_bytes - 1) / e->grain_bytes && o < nslots;
                             o++) {
                            used[o] = 1;
                        }
                    }
                }
            }
            for (uint64_t slot = vdk_align_up(meta_end, e->grain_bytes) / e->grain_bytes;
                 slot * e->grain_bytes + e->grain_bytes <= fsize; slot++) {
                if (!used[slot]) {
                    res->leaks++;
                    check_msg(res, "Leaked grain at offset 0x%" G_GINT64_MODIFIER "x in '%s'", slot * e->grain_bytes,
                              e->file->filename);
                }
            }
        }
        res->total_clusters += grains;
        g_free(gt);
        g_free(used);
    }
    /* qemu-img check prints no statistics for vmdk */
    res->has_stats = false;
    return true;
}

/* ------------------------------------------------------------------------ */
/* Resize (grow)                                                             */
/* ------------------------------------------------------------------------ */

static bool
rewrite_descriptor(Vmdk *s, GError **error)
{
    size_t len = strlen(s->desc_text);
    if (s->desc_embedded) {
        if (len > s->desc_cap) {
            g_set_error(error, VDK_ERROR, ENOSPC, "vmdk: the new descriptor does not fit (%zu bytes, %" G_GUINT64_FORMAT
                        " available)", len, s->desc_cap);
            return false;
        }
        char *b = g_malloc0(s->desc_cap);
        memcpy(b, s->desc_text, len);
        int r = vdk_file_pwrite_sync(s->node->file, b, s->desc_cap, s->desc_off);
        g_free(b);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "vmdk: cannot write the descriptor: %s", g_strerror(-r));
            return false;
        }
        return true;
    }
    int r = vdk_file_pwrite_sync(s->node->file, s->desc_text, len, 0);
    if (r < 0 || !vdk_file_truncate(s->node->file, len, VDK_PREALLOC_OFF, error)) {
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "vmdk: cannot write the descriptor: %s", g_strerror(-r));
        }
        return false;
    }
    return true;
}

/* Replace the size field of extent line @idx (0-based) in the text. */
static char *
desc_set_extent_sectors(const char *text, guint idx, uint64_t sectors)
{
    GString *out = g_string_new(NULL);
    guint seen = 0;
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        const char *next = nl ? nl + 1 : p + strlen(p);
        const char *q = p;
        while (q < next && (*q == ' ' || *q == '\t')) {
            q++;
        }
        bool ext = !strncmp(q, "RW ", 3) || !strncmp(q, "RDONLY ", 7) || !strncmp(q, "NOACCESS ", 9) ||
                   !strncmp(q, "RW\t", 3);
        if (ext && seen++ == idx) {
            const char *a = q;
            while (a < next && *a != ' ' && *a != '\t') {
                a++;
            }
            while (a < next && (*a == ' ' || *a == '\t')) {
                a++;
            }
            const char *b = a;
            while (b < next && g_ascii_isdigit(*b)) {
                b++;
            }
            g_string_append_len(out, p, a - p);
            g_string_append_printf(out, "%" G_GUINT64_FORMAT, sectors);
            g_string_append_len(out, b, next - b);
        } else {
            g_string_append_len(out, p, next - p);
        }
        p = next;
    }
    return g_string_free(out, FALSE);
}

/* Write back an extent's dirty grain tables and directories (control
 * path, no I/O in flight). */
static bool
write_meta_sync(VmdkExt *e, GError **error)
{
    for (int k = 0; k < 2; k++) {
        VdkMetaCache *c = k ? e->rgtc : e->gtc;
        if (c && vdk_mc_dirty_count(c)) {
            int r = vdk_mc_write_dirty_sync(c);
            if (r >= 0 && vdk_file_flush_sync(e->file) < 0) {
                r = -EIO;
            }
            if (r < 0) {
                g_set_error(error, VDK_ERROR, -r, "vmdk: cannot write grain tables: %s", g_strerror(-r));
                return false;
            }
        }
    }
    if (e->gd_dirty) {
        if (vdk_file_flush_sync(e->file) < 0) {
            g_set_error(error, VDK_ERROR, EIO, "vmdk: cannot sync '%s'", e->file->filename);
            return false;
        }
        size_t bytes = (size_t)e->gd_entries * 4;
        uint8_t *b = g_malloc0(MAX(bytes, (size_t)1));
        for (int k = 0; k < 2; k++) {
            uint32_t *t = k ? e->rgd : e->gd;
            if (!t) {
                continue;
            }
            for (uint64_t i = 0; i < e->gd_entries; i++) {
                wr32(b + i * 4, t[i]);
            }
            int r = vdk_file_pwrite_sync(e->file, b, bytes, k ? e->rgd_off : e->gd_off);
            if (r < 0) {
                g_free(b);
                g_set_error(error, VDK_ERROR, -r, "vmdk: cannot write the grain directory: %s", g_strerror(-r));
                return false;
            }
        }
        g_free(b);
        e->gd_dirty = false;
        e->rgd_dirty = false;
    }
    return true;
}

static bool
vmdk_truncate(VdkNode *n, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error)
{
    Vmdk *s = n->opaque;
    if (size < n->size || shrink) {
        if (size < n->size) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: shrinking is not supported");
            return false;
        }
    }
    if (prealloc != VDK_PREALLOC_OFF) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: resize with preallocation is not supported");
        return false;
    }
    if (size % 512) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: the size must be a multiple of 512 bytes");
        return false;
    }
    VmdkExt *e = &s->ext[s->n_ext - 1];
    if (s->stream_write || (e->type == VMDK_ET_SPARSE && e->compressed)) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: streamOptimized images cannot be resized");
        return false;
    }
    uint64_t grow = size - n->size;
    uint64_t new_len = e->len + grow;
    if (e->type == VMDK_ET_FLAT) {
        uint64_t end = e->flat_offset + new_len;
        if (!e->file->is_blockdev && end > e->file->size && !vdk_file_truncate(e->file, end, VDK_PREALLOC_OFF, error)) {
            return false;
        }
    } else if (e->type == VMDK_ET_SPARSE) {
        VmdkHeader h = e->h;
        h.capacity = new_len / 512;
        uint64_t entries = vdk_vmdk_gd_entries(&h);
        uint64_t cap_bytes = vdk_align_up(e->gd_entries * 4, 512);
        if (!write_meta_sync(e, error)) {
            return false;
        }
        uint32_t *gd = g_renew(uint32_t, e->gd, entries);
        e->gd = gd;
        for (uint64_t i = e->gd_entries; i < entries; i++) {
            e->gd[i] = 0;
        }
        if (e->rgd) {
            e->rgd = g_renew(uint32_t, e->rgd, entries);
            for (uint64_t i = e->gd_entries; i < entries; i++) {
                e->rgd[i] = 0;
            }
        }
        uint64_t new_gd = e->gd_off, new_rgd = e->rgd_off;
        if (entries * 4 > cap_bytes) {
            /* The directories outgrow their sectors: new copies at the end
             * of the file, made durable, then the header switched to them
             * in one sector write (a crash leaves the old, valid image). */
            uint64_t bytes = vdk_align_up(entries * 4, 512);
            uint8_t *b = g_malloc0(bytes);
            for (int k = 0; k < 2; k++) {
                uint32_t *t = k ? e->rgd : e->gd;
                if (!t) {
                    continue;
                }
                uint64_t off = vdk_align_up(e->next_free, 512);
                if (off / 512 > UINT32_MAX) {
                    g_free(b);
                    g_set_error(error, VDK_ERROR, EFBIG, "vmdk: the extent file is too large");
                    return false;
                }
                for (uint64_t i = 0; i < entries; i++) {
                    wr32(b + i * 4, t[i]);
                }
                int r = vdk_file_pwrite_sync(e->file, b, bytes, off);
                if (r < 0) {
                    g_free(b);
                    g_set_error(error, VDK_ERROR, -r, "vmdk: cannot write the grain directory: %s", g_strerror(-r));
                    return false;
                }
                e->next_free = off + bytes;
                if (k) {
                    new_rgd = off;
                } else {
                    new_gd = off;
                }
            }
            g_free(b);
            if (vdk_file_flush_sync(e->file) < 0) {
                g_set_error(error, VDK_ERROR, EIO, "vmdk: cannot sync '%s'", e->file->filename);
                return false;
            }
        }
        /* the last existing table may cover grains past the old capacity:
         * they were never written, so they read as unallocated already */
        e->gd_entries = entries;
        e->h.capacity = h.capacity;
        uint8_t hb[512];
        int r = vdk_file_pread_sync(e->file, hb, 512, 0);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "vmdk: cannot read the header: %s", g_strerror(-r));
            return false;
        }
        /* capacity (and moved directories): every other byte stays */
        wr64(hb + 12, h.capacity);
        if (new_gd != e->gd_off) {
            wr64(hb + 56, new_gd / 512);
            e->gd_off = new_gd;
            e->h.gd_offset = new_gd / 512;
        }
        if (e->rgd && new_rgd != e->rgd_off) {
            wr64(hb + 48, new_rgd / 512);
            e->rgd_off = new_rgd;
            e->h.rgd_offset = new_rgd / 512;
        }
        r = vdk_file_pwrite_sync(e->file, hb, 512, 0);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "vmdk: cannot write the header: %s", g_strerror(-r));
            return false;
        }
    } else {
        /* ZERO extent: grows by itself */
    }
    e->len = new_len;
    if (s->desc.extents && s->desc.extents->len) {
        char *t = desc_set_extent_sectors(s->desc_text, s->desc.extents->len - 1, new_len / 512);
        g_free(s->desc_text);
        s->desc_text = t;
        if (!rewrite_descriptor(s, error)) {
            return false;
        }
    }
    for (size_t i = 0; i < s->n_ext; i++) {
        if (s->ext[i].file && !s->ext[i].read_only) {
            vdk_file_flush_sync(s->ext[i].file);
        }
    }
    n->size = size;
    return true;
}

/* ------------------------------------------------------------------------ */
/* Create                                                                    */
/* ------------------------------------------------------------------------ */

static const char *const subformats[] = {"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                                         "twoGbMaxExtentFlat", "streamOptimized", NULL};

#define VMDK_TWO_GB (2ULL << 30)

typedef struct {
    uint64_t size;
    const char *subformat;
    const char *adapter;
    const char *hwversion;
    const char *toolsversion;
    bool compat6;
    bool zeroed_grain;
    const char *backing;
    uint32_t parent_cid;
} CreateParams;

/* Write a hosted sparse extent of @sectors into @f (header, embedded
 * descriptor @desc when not NULL, redundant and primary grain directories
 * and tables). */
static bool
create_sparse(VdkFile *f, uint64_t sectors, bool stream, bool zeroed_grain, bool compat6, const char *desc,
              GError **error)
{
    VmdkHeader h = {0};
    h.version = stream ? 3 : (zeroed_grain ? 2 : 1);
    (void)compat6;
    h.flags = VMDK4_FLAG_NL_DETECT | VMDK4_FLAG_RGD;
    if (zeroed_grain) {
        h.flags |= VMDK4_FLAG_ZERO_GRAIN;
    }
    if (stream) {
        h.flags |= VMDK4_FLAG_COMPRESS | VMDK4_FLAG_MARKER;
        h.compress = 1;
    }
    h.capacity = sectors;
    h.grain_size = 128;
    h.num_gtes = 512;
    h.desc_offset = 1;
    h.desc_size = 20;
    uint64_t grains = (sectors + h.grain_size - 1) / h.grain_size;
    uint64_t gt_count = (grains + h.num_gtes - 1) / h.num_gtes;
    uint64_t gt_sectors = h.num_gtes * 4 / 512;
    uint64_t gd_sectors = vdk_align_up(gt_count * 4, 512) / 512;
    h.rgd_offset = h.desc_offset + h.desc_size;
    h.gd_offset = h.rgd_offset + gd_sectors + gt_sectors * gt_count;
    h.overhead = vdk_align_up(h.gd_offset + gd_sectors + gt_sectors * gt_count, h.grain_size);
    if (gt_count * 4 > VMDK_MAX_GD_BYTES || h.overhead + grains * h.grain_size > UINT32_MAX) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: %" G_GUINT64_FORMAT " bytes is too large for a sparse extent",
                    sectors * 512);
        return false;
    }
    if (!vdk_file_truncate(f, h.overhead * 512, VDK_PREALLOC_OFF, error)) {
        return false;
    }
    uint8_t hb[512];
    vdk_vmdk_header_encode(&h, hb);
    int r = vdk_file_pwrite_sync(f, hb, 512, 0);
    if (r >= 0 && desc) {
        char *db = g_malloc0(h.desc_size * 512);
        size_t dl = strlen(desc);
        if (dl > h.desc_size * 512) {
            g_free(db);
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: the descriptor is too long (%zu bytes)", dl);
            return false;
        }
        memcpy(db, desc, dl);
        r = vdk_file_pwrite_sync(f, db, h.desc_size * 512, h.desc_offset * 512);
        g_free(db);
    }
    uint8_t *gd = g_malloc0(gd_sectors * 512);
    for (int k = 0; k < 2 && r >= 0; k++) {
        uint64_t base = k ? h.gd_offset : h.rgd_offset;
        for (uint64_t i = 0; i < gt_count; i++) {
            wr32(gd + i * 4, (uint32_t)(base + gd_sectors + i * gt_sectors));
        }
        r = vdk_file_pwrite_sync(f, gd, gd_sectors * 512, base * 512);
    }
    g_free(gd);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "vmdk: cannot write the sparse extent: %s", g_strerror(-r));
        return false;
    }
    return true;
}

static char *
make_descriptor(const CreateParams *p, uint32_t cid, const char *extents)
{
    uint64_t sectors = p->size / 512;
    uint64_t cyl = MIN(sectors / (16 * 63), (uint64_t)16383);
    uint32_t heads = 16;
    if (!strcmp(p->adapter, "buslogic") || !strcmp(p->adapter, "lsilogic") || !strcmp(p->adapter, "legacyESX")) {
        heads = 255;
        cyl = MIN(sectors / (255 * 63), (uint64_t)16383);
    }
    bool stream = !strcmp(p->subformat, "streamOptimized");
    GString *d = g_string_new(NULL);
    g_string_append_printf(d,
                           "# Disk DescriptorFile\n"
                           "version=1\n"
                           "%s"
                           "CID=%08x\n"
                           "parentCID=%08x\n"
                           "createType=\"%s\"\n",
                           stream ? "encoding=\"UTF-8\"\n" : "", cid, p->backing ? p->parent_cid : 0xffffffffu,
                           p->subformat);
    if (p->backing) {
        g_string_append_printf(d, "parentFileNameHint=\"%s\"\n", p->backing);
    }
    g_string_append_printf(d,
                           "\n"
                           "# Extent description\n"
                           "%s"
                           "\n"
                           "# The Disk Data Base\n"
                           "#DDB\n"
                           "\n"
                           "ddb.virtualHWVersion = \"%s\"\n"
                           "ddb.geometry.cylinders = \"%" G_GUINT64_FORMAT "\"\n"
                           "ddb.geometry.heads = \"%u\"\n"
                           "ddb.geometry.sectors = \"63\"\n"
                           "ddb.adapterType = \"%s\"\n"
                           "ddb.toolsVersion = \"%s\"\n",
                           extents, p->hwversion, cyl, heads, p->adapter, p->toolsversion);
    if (stream) {
        /* what VMware's stream writer adds (the content id, 128 bits,
         * ending with the CID) */
        g_string_append_printf(d, "ddb.longContentID = \"%08x%08x%08x%08x\"\n", g_random_int(), g_random_int(),
                               g_random_int(), cid);
    }
    return g_string_free(d, FALSE);
}

static bool
vmdk_create(VdkCreateCtx *cc, const VdkCreateOptions *o, GError **error)
{
    CreateParams p = {0};
    bool present;
    if (!vdk_create_opt_size(o, "size", &p.size, &present, error)) {
        return false;
    }
    if (!present) {
        g_set_error(error, VDK_ERROR, EINVAL, "Image creation needs a size parameter");
        return false;
    }
    p.subformat = vdk_create_opt(o, "subformat");
    if (!p.subformat) {
        p.subformat = "monolithicSparse";
    }
    bool known = false;
    for (int i = 0; subformats[i]; i++) {
        known |= !strcmp(subformats[i], p.subformat);
    }
    if (!known) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: unknown subformat '%s' (monolithicSparse, monolithicFlat, "
                    "twoGbMaxExtentSparse, twoGbMaxExtentFlat or streamOptimized)", p.subformat);
        return false;
    }
    p.adapter = vdk_create_opt(o, "adapter_type");
    if (!p.adapter) {
        p.adapter = "ide";
    }
    if (strcmp(p.adapter, "ide") && strcmp(p.adapter, "buslogic") && strcmp(p.adapter, "lsilogic") &&
        strcmp(p.adapter, "legacyESX")) {
        g_set_error(error, VDK_ERROR, EINVAL, "Unknown adapter type: '%s'", p.adapter);
        return false;
    }
    if (!vdk_create_opt_bool(o, "compat6", false, &p.compat6, error) ||
        !vdk_create_opt_bool(o, "zeroed_grain", false, &p.zeroed_grain, error)) {
        return false;
    }
    p.hwversion = vdk_create_opt(o, "hwversion");
    if (p.hwversion && p.compat6) {
        g_set_error(error, VDK_ERROR, EINVAL, "compat6 cannot be enabled with hwversion set");
        return false;
    }
    if (!p.hwversion) {
        p.hwversion = p.compat6 ? "6" : "4";
    }
    p.toolsversion = vdk_create_opt(o, "toolsversion");
    if (!p.toolsversion) {
        p.toolsversion = "2147483647";
    }
    VdkPrealloc prealloc;
    if (!vdk_create_opt_prealloc(o, &prealloc, error)) {
        return false;
    }
    if (prealloc != VDK_PREALLOC_OFF) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: preallocation is not supported yet");
        return false;
    }
    const char *bfmt = vdk_create_opt(o, "backing_fmt");
    p.backing = vdk_create_opt(o, "backing_file");
    if (bfmt && strcmp(bfmt, "vmdk")) {
        g_set_error(error, VDK_ERROR, EINVAL, "backing_file must be a vmdk image");
        return false;
    }
    const char *filename = vdk_create_filename(cc);
    if (p.backing) {
        if (!strcmp(p.subformat, "streamOptimized")) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "vmdk: a streamOptimized image cannot have a parent");
            return false;
        }
        char *path = vdk_backing_path(filename, p.backing);
        VdkOpenOptions *bo = vdk_open_options_new();
        vdk_open_options_set_read_only(bo, true);
        vdk_open_options_set_format(bo, "vmdk");
        VdkImage *b = vdk_image_open(path, bo, error);
        vdk_open_options_free(bo);
        g_free(path);
        if (!b) {
            return false;
        }
        Vmdk *bs = b->top->opaque;
        p.parent_cid = bs->desc.cid;
        if (!vdk_create_opt(o, "size")) {
            p.size = vdk_image_get_size(b);
        }
        vdk_image_close(b, NULL);
    }
    if (p.size % 512 || p.size / 512 > VMDK_MAX_CAPACITY_SECTORS) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: invalid size %" G_GUINT64_FORMAT, p.size);
        return false;
    }
    uint32_t cid;
    do {
        cid = g_random_int();
    } while (cid == 0xffffffffu);

    VdkFile *main = vdk_create_main_file(cc);
    char *base = g_path_get_basename(filename);
    char *stem = g_str_has_suffix(base, ".vmdk") ? g_strndup(base, strlen(base) - 5) : g_strdup(base);
    bool ok = false;
    GString *ext = g_string_new(NULL);
    bool sparse = strstr(p.subformat, "Sparse") != NULL || !strcmp(p.subformat, "streamOptimized");
    if (!sparse && p.zeroed_grain) {
        g_set_error(error, VDK_ERROR, EINVAL, "Flat image can't enable zeroed grain");
        g_free(base);
        g_free(stem);
        g_string_free(ext, TRUE);
        return false;
    }
    if (!strcmp(p.subformat, "monolithicSparse") || !strcmp(p.subformat, "streamOptimized")) {
        g_string_append_printf(ext, "RW %" G_GUINT64_FORMAT " SPARSE \"%s\"\n", p.size / 512, base);
        char *desc = make_descriptor(&p, cid, ext->str);
        ok = create_sparse(main, p.size / 512, !strcmp(p.subformat, "streamOptimized"), p.zeroed_grain, p.compat6,
                           desc, error);
        g_free(desc);
    } else {
        bool two = !strncmp(p.subformat, "twoGb", 5);
        uint64_t left = p.size;
        int idx = 1;
        ok = true;
        do {
            uint64_t len = two ? MIN(left, VMDK_TWO_GB) : left;
            char *name = two ? g_strdup_printf("%s-%c%03d.vmdk", stem, sparse ? 's' : 'f', idx)
                             : g_strdup_printf("%s-flat.vmdk", stem);
            VdkFile *xf = vdk_create_extra_file(cc, name, error);
            if (!xf) {
                g_free(name);
                ok = false;
                break;
            }
            if (sparse) {
                ok = create_sparse(xf, len / 512, false, p.zeroed_grain, p.compat6, NULL, error);
                g_string_append_printf(ext, "RW %" G_GUINT64_FORMAT " SPARSE \"%s\"\n", len / 512, name);
            } else {
                ok = vdk_file_truncate(xf, len, VDK_PREALLOC_OFF, error);
                g_string_append_printf(ext, "RW %" G_GUINT64_FORMAT " FLAT \"%s\" 0\n", len / 512, name);
            }
            g_free(name);
            left -= len;
            idx++;
        } while (ok && left > 0);
        if (ok) {
            char *desc = make_descriptor(&p, cid, ext->str);
            int r = vdk_file_pwrite_sync(main, desc, strlen(desc), 0);
            g_free(desc);
            if (r < 0) {
                g_set_error(error, VDK_ERROR, -r, "vmdk: cannot write the descriptor: %s", g_strerror(-r));
                ok = false;
            }
        }
    }
    g_string_free(ext, TRUE);
    g_free(base);
    g_free(stem);
    return ok;
}

/* Bytes of metadata create_sparse() lays out for an extent of @sectors. */
static uint64_t
sparse_overhead(uint64_t sectors)
{
    uint64_t grains = (sectors + 127) / 128;
    uint64_t gt_count = (grains + 511) / 512;
    uint64_t gd_sectors = vdk_align_up(gt_count * 4, 512) / 512;
    uint64_t gd_offset = 21 + gd_sectors + 4 * gt_count;
    return vdk_align_up(gd_offset + gd_sectors + 4 * gt_count, 128) * 512;
}

/*
 * measure (qemu-img has none for vmdk): the layout vmdk_create makes, plus
 * a 64 KiB grain for every grain of the source holding data (sparse
 * subformats), or the whole disk (flat).  streamOptimized: an upper bound
 * (every grain stored uncompressed with its marker sector).
 */
static bool
vmdk_measure(const VdkCreateOptions *o, VdkImage *src, uint64_t size, VdkMeasure *m, GError **error)
{
    const char *sub = vdk_create_opt(o, "subformat");
    if (!sub) {
        sub = "monolithicSparse";
    }
    bool known = false;
    for (int i = 0; subformats[i]; i++) {
        known |= !strcmp(subformats[i], sub);
    }
    if (!known) {
        g_set_error(error, VDK_ERROR, EINVAL, "vmdk: unknown subformat '%s' (monolithicSparse, monolithicFlat, "
                    "twoGbMaxExtentSparse, twoGbMaxExtentFlat or streamOptimized)", sub);
        return false;
    }
    const uint64_t grain = 65536;
    bool stream = !strcmp(sub, "streamOptimized");
    bool two = !strncmp(sub, "twoGb", 5);
    bool sparse = stream || !strcmp(sub, "monolithicSparse") || !strcmp(sub, "twoGbMaxExtentSparse");
    size = vdk_align_up(size, 512);
    uint64_t overhead = 0;
    if (!sparse) {
        overhead = 4096; /* the descriptor file */
        m->fully_allocated = m->required = overhead + size;
        return true;
    }
    uint64_t left = size;
    do {
        uint64_t len = two ? MIN(left, (uint64_t)VMDK_TWO_GB) : left;
        uint64_t sectors = len / 512;
        uint64_t ov = sparse_overhead(sectors);
        if (ov / 512 + vdk_align_up(sectors, 128) > UINT32_MAX) {
            g_set_error(error, VDK_ERROR, EINVAL, "vmdk: %" G_GUINT64_FORMAT " bytes is too large for a sparse extent",
                        len);
            return false;
        }
        overhead += ov;
        left -= len;
    } while (left > 0);
    if (two) {
        overhead += 4096; /* the descriptor file */
    }
    uint64_t used = 0;
    if (src && !vdk_measure_allocated(src, grain, &used, error)) {
        return false;
    }
    uint64_t all = vdk_align_up(size, grain);
    if (stream) {
        /* a marker sector per grain; grain tables, directory, footer, end */
        uint64_t gts = (all / grain + 511) / 512;
        overhead += gts * 2560 + 4 * 512;
        m->fully_allocated = overhead + all + all / grain * 512;
        m->required = overhead + used + used / grain * 512;
    } else {
        m->fully_allocated = overhead + all;
        m->required = overhead + used;
    }
    return true;
}

static const VdkOptionDesc vmdk_create_opts[] = {
    {"size", VDK_OPT_SIZE, "Virtual disk size", NULL, false},
    {"adapter_type", VDK_OPT_STRING,
     "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX", NULL, false},
    {"backing_file", VDK_OPT_STRING, "File name of a base image", NULL, false},
    {"backing_fmt", VDK_OPT_STRING, "Must be 'vmdk' if present", NULL, false},
    {"compat6", VDK_OPT_BOOL, "VMDK version 6 image", "off", true},
    {"hwversion", VDK_OPT_STRING, "VMDK hardware version", "undefined", true},
    {"toolsversion", VDK_OPT_STRING, "VMware guest tools version", NULL, false},
    {"preallocation", VDK_OPT_STRING, "Preallocation mode (allowed values: off)", NULL, false},
    {"subformat", VDK_OPT_STRING,
     "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | "
     "twoGbMaxExtentFlat | streamOptimized} ",
     NULL, false},
    {"zeroed_grain", VDK_OPT_BOOL, "Enable efficient zero writes using the zeroed-grain GTE feature", "off", false},
    {NULL, 0, NULL, NULL, false},
};

static const VdkOptionDesc vmdk_open_opts[] = {
    {"allow-extent-paths", VDK_OPT_BOOL,
     "Allow extent files outside the descriptor's directory (absolute names or '..')", "off", false},
    {NULL, 0, NULL, NULL, false},
};

const VdkFormat vdk_format_vmdk = {
    .name = "vmdk",
    .probe = vmdk_probe,
    .open = vmdk_open,
    .close = vmdk_close,
    .map = vmdk_map,
    .alloc_done = vmdk_alloc_done,
    .decompress = vmdk_decompress,
    .block_status = vmdk_block_status,
    .write_zeroes = vmdk_write_zeroes,
    .flush = vmdk_flush,
    .truncate = vmdk_truncate,
    .create = vmdk_create,
    .create_opts = vmdk_create_opts,
    .measure = vmdk_measure,
    .open_opts = vmdk_open_opts,
    .info = vmdk_info,
    .check = vmdk_check,
};
