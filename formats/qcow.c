/* SPDX-License-Identifier: MIT */
/*
 * qcow.c - legacy qcow (version 1) images, read-only.
 *
 * The format before qcow2 (still found in old archives).  Layout, all
 * big-endian:
 *
 *   0  magic "QFI\xfb"          28 size (guest bytes, u64)
 *   4  version = 1              36 cluster_bits (u8), 37 l2_bits (u8)
 *   8  backing_file_offset      38 padding (u16)
 *  16  backing_file_size (u32)  40 crypt_method (u32: 0 none, 1 AES)
 *  20  mtime (u32)              44 l1_table_offset (u64)
 *
 * A two-level table maps clusters: the L1 table (one u64 per 2^(cluster_bits
 * + l2_bits) guest bytes) holds L2 table offsets, an L2 table (2^l2_bits
 * u64 entries) holds cluster offsets.  0 means unallocated (backing file
 * or zeroes); bit 63 marks a compressed cluster, whose byte length sits in
 * the cluster_bits bits below it and whose offset in the bits below those;
 * the data is a raw deflate stream.  There are no refcounts, no zero
 * clusters and no header extensions; the backing file has no recorded
 * format (it is probed).
 *
 * vdk reads these images (including compressed clusters and the backing
 * file) so they can be converted; writes are refused at open with a
 * message saying so.  The legacy AES encryption is refused too: it is
 * broken by design (qemu refuses to create such images), and reading it
 * would need the key.
 *
 * Hostile images: every header field is checked before use; the L1 table
 * is bounded (QCOW_MAX_L1_BYTES) and read whole at open; L2 tables are
 * read on demand into the metadata cache (a miss parks the request, it
 * never blocks the queue); entries pointing past the end of the file, at
 * unaligned offsets or with compressed lengths that cannot be are -EIO
 * with a warning naming the entry.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <string.h>

#include <libdeflate.h>

#include "block/block.h"
#include "block/metacache.h"

#define QCOW_MAGIC "QFI\xfb"
#define QCOW_HEADER_SIZE 48
#define QCOW_CRYPT_NONE 0
#define QCOW_CRYPT_AES 1
#define QCOW_OFLAG_COMPRESSED (1ULL << 63)
/* qemu's limits: clusters of 512 B .. 64 KiB, L2 tables of 512 B .. 64 KiB,
 * a backing file name of at most 1023 bytes. */
#define QCOW_MIN_CLUSTER_BITS 9
#define QCOW_MAX_CLUSTER_BITS 16
#define QCOW_MIN_L2_BITS (9 - 3)
#define QCOW_MAX_L2_BITS (16 - 3)
#define QCOW_MAX_BACKING_NAME 1023
/* The L1 table is read whole at open: 32 MiB (qcow2's limit) covers 8 TiB
 * with the cluster and L2 sizes qemu creates (4 KiB, 512 entries). */
#define QCOW_MAX_L1_BYTES (32u << 20)
/* L2 cache: 1 MiB covers 1 GiB with qemu's default geometry; more is a
 * cache miss, never an error. */
#define QCOW_L2_CACHE_BYTES (1u << 20)

typedef struct {
    VdkNode *node;
    VdkFile *file;
    uint32_t cluster_bits;
    uint32_t cluster_size;
    uint32_t l2_bits;
    uint64_t l2_bytes;      /* bytes of one L2 table */
    uint32_t slice_size;    /* cache slice: min(L2 table, cluster) */
    uint64_t l1_size;       /* entries */
    uint64_t *l1;           /* host order */
    VdkMetaCache *l2c;
    uint64_t offset_mask;   /* compressed: offset bits */
} Qcow;

static uint64_t
be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

static uint32_t
be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int
qcow_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    if (len >= 8 && memcmp(buf, QCOW_MAGIC, 4) == 0 && be32(buf + 4) == 1) {
        return 100;
    }
    return 0;
}

static bool
qcow_fail(GError **error, int code, const char *fmt, ...) G_GNUC_PRINTF(3, 4);

static bool
qcow_fail(GError **error, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_set_error(error, VDK_ERROR, code, "qcow: %s", msg);
    g_free(msg);
    return false;
}

static void
qcow_free(Qcow *s)
{
    if (!s) {
        return;
    }
    if (s->l2c) {
        vdk_mc_free(s->l2c);
    }
    g_free(s->l1);
    g_free(s);
}

static bool
qcow_open(VdkNode *n, GError **error)
{
    uint8_t h[QCOW_HEADER_SIZE];
    VdkFile *f = n->file;
    if (f->size < QCOW_HEADER_SIZE) {
        return qcow_fail(error, EINVAL, "file too short for a header (%" PRIu64 " bytes, %d needed)", f->size,
                         QCOW_HEADER_SIZE);
    }
    int r = vdk_file_pread_sync(f, h, sizeof(h), 0);
    if (r < 0) {
        return qcow_fail(error, -r, "cannot read the header: %s", g_strerror(-r));
    }
    if (memcmp(h, QCOW_MAGIC, 4) != 0) {
        return qcow_fail(error, EINVAL, "bad magic %08" PRIx32, be32(h));
    }
    uint32_t version = be32(h + 4);
    if (version != 1) {
        return qcow_fail(error, ENOTSUP, "unsupported version %" PRIu32 " (this driver reads version 1)", version);
    }
    uint64_t backing_off = be64(h + 8);
    uint32_t backing_len = be32(h + 16);
    uint64_t size = be64(h + 24);
    uint32_t cluster_bits = h[32];
    uint32_t l2_bits = h[33];
    uint32_t crypt = be32(h + 36);
    uint64_t l1_off = be64(h + 40);

    if (cluster_bits < QCOW_MIN_CLUSTER_BITS || cluster_bits > QCOW_MAX_CLUSTER_BITS) {
        return qcow_fail(error, EINVAL, "invalid cluster_bits %" PRIu32 " (cluster size must be 512 B to 64 KiB)",
                         cluster_bits);
    }
    if (l2_bits < QCOW_MIN_L2_BITS || l2_bits > QCOW_MAX_L2_BITS) {
        return qcow_fail(error, EINVAL, "invalid l2_bits %" PRIu32 " (L2 tables must be 512 B to 64 KiB)", l2_bits);
    }
    if (crypt == QCOW_CRYPT_AES) {
        return qcow_fail(error, ENOTSUP,
                         "the image uses the legacy qcow AES encryption (crypt_method 1), which vdk does not "
                         "support: it is insecure; decrypt it with qemu-img convert first");
    }
    if (crypt != QCOW_CRYPT_NONE) {
        return qcow_fail(error, EINVAL, "invalid crypt_method %" PRIu32, crypt);
    }
    uint32_t shift = cluster_bits + l2_bits;
    uint64_t l1_size = (size >> shift) + ((size & ((1ULL << shift) - 1)) != 0);
    uint64_t l1_bytes;
    if (vdk_mul_overflows(l1_size, 8, &l1_bytes) || l1_bytes > QCOW_MAX_L1_BYTES) {
        return qcow_fail(error, EFBIG,
                         "image too large: size %" PRIu64 " needs %" PRIu64 " L1 entries (at most %u supported)", size,
                         l1_size, QCOW_MAX_L1_BYTES / 8);
    }
    uint64_t l1_end;
    if (l1_size && (l1_off % 8 != 0 || l1_off < QCOW_HEADER_SIZE || vdk_add_overflows(l1_off, l1_bytes, &l1_end) ||
                    l1_end > f->size)) {
        return qcow_fail(error, EINVAL,
                         "invalid l1_table_offset 0x%" PRIx64 " (%" PRIu64 " entries; the file has %" PRIu64 " bytes)",
                         l1_off, l1_size, f->size);
    }
    if (!n->read_only) {
        return qcow_fail(error, EROFS,
                         "legacy qcow (version 1) images are read-only in vdk; convert it (vdk convert -O qcow2 "
                         "%s NEW.qcow2) or open it read-only",
                         n->filename);
    }

    Qcow *s = g_new0(Qcow, 1);
    s->node = n;
    s->file = f;
    s->cluster_bits = cluster_bits;
    s->cluster_size = 1u << cluster_bits;
    s->l2_bits = l2_bits;
    s->l2_bytes = 8ULL << l2_bits;
    s->slice_size = (uint32_t)MIN(s->l2_bytes, (uint64_t)s->cluster_size);
    s->l1_size = l1_size;
    s->offset_mask = (1ULL << (63 - cluster_bits)) - 1;

    if (backing_off || backing_len) {
        uint64_t bend;
        if (backing_len == 0 || backing_len > QCOW_MAX_BACKING_NAME) {
            qcow_free(s);
            return qcow_fail(error, EINVAL, "invalid backing_file_size %" PRIu32 " (1 to %d bytes)", backing_len,
                             QCOW_MAX_BACKING_NAME);
        }
        if (backing_off < QCOW_HEADER_SIZE || vdk_add_overflows(backing_off, backing_len, &bend) || bend > f->size) {
            qcow_free(s);
            return qcow_fail(error, EINVAL, "invalid backing_file_offset 0x%" PRIx64 " (%" PRIu32
                             " bytes; the file has %" PRIu64 " bytes)", backing_off, backing_len, f->size);
        }
        char name[QCOW_MAX_BACKING_NAME + 1];
        r = vdk_file_pread_sync(f, name, backing_len, backing_off);
        if (r < 0) {
            qcow_free(s);
            return qcow_fail(error, -r, "cannot read the backing file name: %s", g_strerror(-r));
        }
        if (memchr(name, 0, backing_len)) {
            qcow_free(s);
            return qcow_fail(error, EINVAL, "the backing file name contains a NUL byte");
        }
        n->backing_name = g_strndup(name, backing_len);
    }

    if (l1_size) {
        s->l1 = g_try_malloc((gsize)l1_bytes);
        uint8_t *raw = g_try_malloc((gsize)l1_bytes);
        if (!s->l1 || !raw) {
            g_free(raw);
            qcow_free(s);
            return qcow_fail(error, ENOMEM, "cannot allocate the L1 table (%" PRIu64 " bytes)", l1_bytes);
        }
        r = vdk_file_pread_sync(f, raw, (size_t)l1_bytes, l1_off);
        if (r < 0) {
            g_free(raw);
            qcow_free(s);
            return qcow_fail(error, -r, "cannot read the L1 table: %s", g_strerror(-r));
        }
        for (uint64_t i = 0; i < l1_size; i++) {
            s->l1[i] = be64(raw + 8 * i);
        }
        g_free(raw);
    }
    s->l2c = vdk_mc_new(n, f, s->slice_size, QCOW_L2_CACHE_BYTES);
    n->size = size;
    n->opaque = s;
    return true;
}

static bool
qcow_close(VdkNode *n, GError **error)
{
    (void)error;
    qcow_free(n->opaque);
    n->opaque = NULL;
    return true;
}

static int
qcow_corrupt(Qcow *s, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static int
qcow_corrupt(Qcow *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    g_log("vdk", G_LOG_LEVEL_WARNING, "qcow: %s: %s", s->node->filename, msg);
    g_free(msg);
    return -EIO;
}

static int
qcow_map(VdkNode *n, uint64_t offset, uint64_t len, unsigned flags, VdkExtent *ext, VdkRequest *r)
{
    Qcow *s = n->opaque;
    if (flags & VDK_MAP_WRITE) {
        return -EROFS;
    }
    uint32_t shift = s->cluster_bits + s->l2_bits;
    uint64_t l1_idx = offset >> shift;
    uint64_t table_end = (l1_idx + 1) << shift;
    uint64_t end = MIN(offset + len, table_end);
    g_assert(l1_idx < s->l1_size);
    uint64_t l2_off = s->l1[l1_idx];
    if (!l2_off) {
        ext->kind = VDK_EXT_UNALLOC;
        ext->len = end - offset;
        return 0;
    }
    uint64_t l2_end;
    if (l2_off % s->cluster_size != 0 || vdk_add_overflows(l2_off, s->l2_bytes, &l2_end) ||
        l2_end > vdk_align_up(s->file->size, s->cluster_size)) {
        return qcow_corrupt(s, "L1 entry %" PRIu64 " points at an invalid L2 table offset 0x%" PRIx64, l1_idx, l2_off);
    }
    uint64_t cmask = s->cluster_size - 1;
    uint64_t l2_idx = (offset >> s->cluster_bits) & ((1ULL << s->l2_bits) - 1);
    uint64_t byte = l2_idx * 8;
    uint64_t slice_off = l2_off + vdk_align_down(byte, s->slice_size);
    int ret = 0;
    VdkMetaEntry *sl = vdk_mc_get(s->l2c, slice_off, r, &ret);
    if (!sl) {
        return ret ? ret : -EIO;
    }
    uint32_t per_slice = s->slice_size / 8;
    uint32_t i = (uint32_t)(l2_idx % per_slice);
    uint64_t pos = offset;
    int kind = 0;      /* 0 unset, VDK_EXT_* */
    uint64_t first_host = 0, next_host = 0;
    while (pos < end && i < per_slice) {
        uint64_t e = be64((const uint8_t *)sl->data + 8 * i);
        uint64_t cend = MIN((pos | cmask) + 1, end);
        uint64_t guest_cluster = pos & ~cmask;
        if (e & QCOW_OFLAG_COMPRESSED) {
            if (kind) {
                break;
            }
            uint64_t csize = (e >> (63 - s->cluster_bits)) & cmask;
            uint64_t coff = e & s->offset_mask;
            uint64_t cend2;
            if (csize == 0 || coff < QCOW_HEADER_SIZE || vdk_add_overflows(coff, csize, &cend2) ||
                cend2 > s->file->size) {
                return qcow_corrupt(s, "compressed cluster at guest offset %" PRIu64 " has an invalid location (0x%"
                                    PRIx64 ", %" PRIu64 " bytes)", guest_cluster, coff, csize);
            }
            ext->kind = VDK_EXT_COMPRESSED;
            ext->file = s->file;
            ext->host_offset = coff;
            ext->comp_len = csize;
            ext->unit_offset = guest_cluster;
            ext->unit_size = s->cluster_size;
            ext->len = cend - offset;
            return 0;
        }
        int k;
        uint64_t host = 0;
        if (e == 0) {
            k = VDK_EXT_UNALLOC;
        } else {
            if (e % s->cluster_size != 0 || e < QCOW_HEADER_SIZE || e >= s->file->size) {
                return qcow_corrupt(s, "L2 entry for guest offset %" PRIu64 " points at an invalid cluster offset 0x%"
                                    PRIx64, guest_cluster, e);
            }
            k = VDK_EXT_DATA;
            host = e + (pos & cmask);
        }
        if (!kind) {
            kind = k;
            first_host = host;
        } else if (k != kind || (k == VDK_EXT_DATA && host != next_host)) {
            break;
        }
        next_host = host + (cend - pos);
        pos = cend;
        i++;
    }
    ext->kind = (uint8_t)kind;
    ext->len = pos - offset;
    ext->file = s->file;
    ext->host_offset = first_host;
    return 0;
}

static int
qcow_decompress(VdkNode *n, const void *in, size_t in_len, void *out, size_t out_len)
{
    (void)n;
    static GPrivate dkey = G_PRIVATE_INIT((GDestroyNotify)libdeflate_free_decompressor);
    struct libdeflate_decompressor *d = g_private_get(&dkey);
    if (!d) {
        d = libdeflate_alloc_decompressor();
        if (!d) {
            return -ENOMEM;
        }
        g_private_set(&dkey, d);
    }
    size_t in_used = 0, got = 0;
    enum libdeflate_result r = libdeflate_deflate_decompress_ex(d, in, in_len, out, out_len, &in_used, &got);
    return (r == LIBDEFLATE_SUCCESS && got == out_len) ? 0 : -EIO;
}

static int
qcow_flush(VdkNode *n, VdkRequest *r)
{
    (void)n;
    (void)r;
    return 0; /* read-only: nothing to write back */
}

static void
qcow_info(VdkNode *n, VdkInfo *info)
{
    Qcow *s = n->opaque;
    info->cluster_size = s->cluster_size;
    info->backing_filename = g_strdup(n->backing_name);
}

const VdkFormat vdk_format_qcow = {
    .name = "qcow",
    .probe = qcow_probe,
    .open = qcow_open,
    .close = qcow_close,
    .map = qcow_map,
    .decompress = qcow_decompress,
    .flush = qcow_flush,
    .info = qcow_info,
};
