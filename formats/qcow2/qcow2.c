/* SPDX-License-Identifier: MIT */
/*
 * qcow2.c - the qcow2 driver: probing, opening (header validation),
 * closing, info, compression, and the driver table.
 *
 * Supported: versions 2 and 3; cluster sizes 512 B to 2 MiB; refcount
 * widths 1 to 64 bits; header extensions (backing format, feature-name
 * table, persistent bitmaps (qcow2-bitmap.c), unknown ones preserved byte for byte
 * because the header cluster is patched in place, never rebuilt); zero
 * clusters; compressed clusters (deflate and zstd) for reading and
 * whole-cluster writing; extended L2 entries (subclusters); backing files
 * of any format; lazy refcounts with repair of a dirty image on the next
 * read-write open; the corrupt bit; LUKS encryption (qcow2-crypto.c).
 * Not supported (refused at open with the feature's name): external data
 * files, the legacy AES encryption, unknown incompatible features.
 *
 * Files: qcow2-cluster.c maps guest ranges (reads, allocating writes,
 * zeroes, discard); qcow2-refcount.c allocates and counts host clusters;
 * qcow2-flush.c writes dirty metadata back in crash-safe order;
 * qcow2-create.c makes images; qcow2-check.c checks and repairs them.
 */
#include "config.h"

#include <errno.h>
#include <libdeflate.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "formats/qcow2/qcow2.h"

/* Default cache budgets: enough L2 to map a whole 256 GiB image with
 * 64 KiB clusters (4M entries x 8 bytes), refcounts for the same. */
#define QCOW2_DEFAULT_L2_CACHE (32ULL << 20)
#define QCOW2_DEFAULT_REFCOUNT_CACHE (8ULL << 20)
/* Slice size when the L2 cache cannot hold whole tables for the image. */
#define QCOW2_SMALL_SLICE 4096u

static int
qcow2_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    if (len >= 8 && qbe32(buf) == QCOW2_MAGIC && qbe32(buf + 4) >= 2) {
        return 100;
    }
    return 0;
}

int
qcow2_signal_corruption(Qcow2 *s, const char *fmt, ...)
{
    if (!s->corrupt) {
        va_list ap;
        va_start(ap, fmt);
        char *why = g_strdup_vprintf(fmt, ap);
        va_end(ap);
        g_log("vdk", G_LOG_LEVEL_WARNING, "qcow2: %s: marking the image corrupt: %s; further writes are refused",
              s->node->filename, why);
        g_free(why);
        s->corrupt = true;
        if (s->version >= 3 && !s->node->read_only) {
            s->incompatible |= QCOW2_INCOMPAT_CORRUPT;
            qcow2_update_header_buf(s);
            s->hdr_dirty = true;
        }
    }
    return -EIO;
}

void
qcow2_update_header_buf(Qcow2 *s)
{
    uint8_t *h = s->hdr;
    qput64(h + 24, s->size);
    qput32(h + 36, s->l1_size);
    qput64(h + 40, s->l1_offset);
    qput64(h + 48, s->reftable_offset);
    qput32(h + 56, s->reftable_clusters);
    qput32(h + 60, s->nb_snapshots);
    qput64(h + 64, s->snapshots_offset);
    if (s->version >= 3) {
        qput64(h + 72, s->incompatible);
        qput64(h + 80, s->compatible);
        qput64(h + 88, s->autoclear);
        qput32(h + 96, s->refcount_order);
    }
}

/* ------------------------------------------------------------------------ */
/* Compression                                                               */
/* ------------------------------------------------------------------------ */

int
qcow2_decompress(VdkNode *n, const void *in, size_t in_len, void *out, size_t out_len)
{
    Qcow2 *s = n->opaque;
    if (s->compression_type == QCOW2_COMPRESSION_ZSTD) {
        size_t frame = ZSTD_findFrameCompressedSize(in, in_len);
        if (ZSTD_isError(frame)) {
            return -EIO;
        }
        ZSTD_DCtx *d = ZSTD_createDCtx();
        if (!d) {
            return -ENOMEM;
        }
        size_t got = ZSTD_decompressDCtx(d, out, out_len, in, frame);
        ZSTD_freeDCtx(d);
        return (!ZSTD_isError(got) && got == out_len) ? 0 : -EIO;
    }
    /* Raw deflate (qcow2's "zlib" clusters carry no zlib header); the data
     * may be followed by slack up to the sector end, which is ignored. */
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

/* zlib level for compressed clusters.  qemu uses 6 (zlib's default); 5
 * compresses about 15% faster for +0.5% bytes on an ext4 of system files
 * (4 is another 5-10% faster but +1.9% there and +5% on repetitive text,
 * past the 3% the converter issue allows).  Any level inflates with
 * QEMU's reader. */
#ifndef QCOW2_ZLIB_LEVEL
#define QCOW2_ZLIB_LEVEL 5
#endif

static void
qcow2_zstream_free(gpointer p)
{
    z_stream *z = p;
    deflateEnd(z);
    g_free(z);
}

ssize_t
qcow2_compress(const Qcow2 *s, const void *in, size_t in_len, void *out, size_t out_cap)
{
    if (s->compression_type == QCOW2_COMPRESSION_ZSTD) {
        size_t n = ZSTD_compress(out, out_cap, in, in_len, ZSTD_CLEVEL_DEFAULT);
        if (ZSTD_isError(n)) {
            return 0; /* does not fit: store uncompressed */
        }
        return n < in_len ? (ssize_t)n : 0;
    }
    /* A 4 KiB window (windowBits -12): QEMU inflates with that window, so
     * streams with longer back-references would not read there.  One
     * stream per thread, reset for each cluster: setting one up allocates
     * and faults in ~270 KiB, a tenth of the cost of compressing a 64 KiB
     * cluster. */
    static GPrivate zkey = G_PRIVATE_INIT(qcow2_zstream_free);
    z_stream *z = g_private_get(&zkey);
    if (!z) {
        z = g_new0(z_stream, 1);
        if (deflateInit2(z, QCOW2_ZLIB_LEVEL, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
            g_free(z);
            return -ENOMEM;
        }
        g_private_set(&zkey, z);
    } else if (deflateReset(z) != Z_OK) {
        return -EIO;
    }
    z->next_in = (Bytef *)in;
    z->avail_in = (uInt)in_len;
    z->next_out = out;
    z->avail_out = (uInt)out_cap;
    int r = deflate(z, Z_FINISH);
    size_t n = out_cap - z->avail_out;
    if (r != Z_STREAM_END || n >= in_len) {
        return 0;
    }
    return (ssize_t)n;
}

/* ------------------------------------------------------------------------ */
/* Opening                                                                   */
/* ------------------------------------------------------------------------ */

static const char *
compression_name(uint8_t t)
{
    return t == QCOW2_COMPRESSION_ZSTD ? "zstd" : "zlib";
}

/* Name an incompatible feature bit: from the image's feature table if it
 * has one, else from what we know, else "bit N". */
static char *
feature_name(const Qcow2 *s, int type, int bit)
{
    uint32_t off = s->version >= 3 ? s->header_length : 72;
    while (off + 8 <= s->cluster_size) {
        uint32_t t = qbe32(s->hdr + off);
        uint32_t len = qbe32(s->hdr + off + 4);
        if (t == QCOW2_EXT_END || len > s->cluster_size - off - 8) {
            break;
        }
        if (t == QCOW2_EXT_FEATURE_TABLE) {
            for (uint32_t i = 0; i + 48 <= len; i += 48) {
                const uint8_t *e = s->hdr + off + 8 + i;
                if (e[0] == type && e[1] == bit) {
                    return g_strndup((const char *)e + 2, 46);
                }
            }
        }
        off += 8 + ((len + 7) & ~7u);
    }
    if (type == 0) {
        switch (bit) {
        case 2:
            return g_strdup("external data file");
        default:
            break;
        }
    }
    return g_strdup_printf("bit %d", bit);
}

static bool
read_table(Qcow2 *s, uint64_t offset, uint64_t entries, uint64_t **out, const char *what, GError **error)
{
    uint64_t bytes = entries * 8;
    uint8_t *raw = g_try_malloc(MAX(bytes, (uint64_t)1));
    uint64_t *t = g_try_new(uint64_t, MAX(entries, (uint64_t)1));
    if (!raw || !t) {
        g_free(raw);
        g_free(t);
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: cannot allocate the %s (%" G_GUINT64_FORMAT " bytes)", what,
                    bytes);
        return false;
    }
    int r = bytes ? vdk_file_pread_sync(s->file, raw, (size_t)bytes, offset) : 0;
    if (r < 0) {
        g_free(raw);
        g_free(t);
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read the %s: %s", what, g_strerror(-r));
        return false;
    }
    for (uint64_t i = 0; i < entries; i++) {
        t[i] = qbe64(raw + i * 8);
    }
    g_free(raw);
    *out = t;
    return true;
}

void
qcow2_snapshots_free(Qcow2 *s)
{
    if (!s->snapshots) {
        return;
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        g_free(s->snapshots[i].id);
        g_free(s->snapshots[i].name);
        g_free(s->snapshots[i].extra);
    }
    g_free(s->snapshots);
    s->snapshots = NULL;
}

static bool
read_snapshots(Qcow2 *s, GError **error)
{
    if (s->nb_snapshots == 0) {
        return true;
    }
    s->snapshots = g_new0(Qcow2Snapshot, s->nb_snapshots);
    uint64_t off = s->snapshots_offset;
    uint64_t end;
    if (vdk_add_overflows(off, QCOW2_MAX_SNAPSHOT_TABLE, &end)) {
        end = UINT64_MAX;
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        uint8_t h[40];
        if (off + sizeof(h) > end) {
            g_set_error(error, VDK_ERROR, EFBIG, "qcow2: snapshot table is larger than %u bytes",
                        QCOW2_MAX_SNAPSHOT_TABLE);
            return false;
        }
        int r = vdk_file_pread_sync(s->file, h, sizeof(h), off);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read snapshot %u: %s", i, g_strerror(-r));
            return false;
        }
        Qcow2Snapshot *sn = &s->snapshots[i];
        sn->l1_offset = qbe64(h);
        sn->l1_size = qbe32(h + 8);
        uint16_t id_len = qbe16(h + 12);
        uint16_t name_len = qbe16(h + 14);
        sn->date_sec = qbe32(h + 16);
        sn->date_nsec = qbe32(h + 20);
        sn->vm_clock_nsec = qbe64(h + 24);
        sn->vm_state_size = qbe32(h + 32);
        uint32_t extra = qbe32(h + 36);
        if (extra > 1024) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: snapshot %u: extra data size %u is too large", i, extra);
            return false;
        }
        if (sn->l1_offset & (s->cluster_size - 1)) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: snapshot %u: L1 table offset 0x%" G_GINT64_MODIFIER "x is not cluster aligned",
                        i, sn->l1_offset);
            return false;
        }
        if ((uint64_t)sn->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
            g_set_error(error, VDK_ERROR, EFBIG, "qcow2: snapshot %u: L1 table too large (%u entries, max %u)", i,
                        sn->l1_size, QCOW2_MAX_L1_BYTES / 8);
            return false;
        }
        uint8_t *var = g_malloc((size_t)extra + id_len + name_len + 1);
        r = vdk_file_pread_sync(s->file, var, (size_t)extra + id_len + name_len, off + sizeof(h));
        if (r < 0) {
            g_free(var);
            g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read snapshot %u: %s", i, g_strerror(-r));
            return false;
        }
        sn->disk_size = s->size;
        if (extra >= 8) {
            sn->vm_state_size = qbe64(var);
        }
        if (extra >= 16) {
            sn->disk_size = qbe64(var + 8);
        }
        if (extra >= 24) {
            sn->icount = qbe64(var + 16);
            sn->has_icount = sn->icount != UINT64_MAX;
        }
        sn->extra_len = extra;
        sn->extra = extra ? g_memdup2(var, extra) : NULL;
        sn->id = g_strndup((const char *)var + extra, id_len);
        sn->name = g_strndup((const char *)var + extra + id_len, name_len);
        g_free(var);
        off += sizeof(h) + extra + id_len + name_len;
        off = (off + 7) & ~7ULL;
    }
    return true;
}

/* Open options snapshot.id / snapshot.name / snapshot (ID or name): the
 * top image shows that snapshot's disk, read-only (qemu-img convert -l). */
static bool
open_snapshot(VdkNode *n, Qcow2 *s, GError **error)
{
    GHashTable *kv = n->img->opts.extra;
    const char *id = g_hash_table_lookup(kv, "snapshot.id");
    const char *name = g_hash_table_lookup(kv, "snapshot.name");
    const char *either = g_hash_table_lookup(kv, "snapshot");
    if (n->depth != 0 || (!id && !name && !either)) {
        return true;
    }
    if (!n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "qcow2: a snapshot can only be opened read-only");
        return false;
    }
    int idx = -1;
    for (uint32_t i = 0; i < s->nb_snapshots && idx < 0; i++) {
        const Qcow2Snapshot *sn = &s->snapshots[i];
        if (either ? !strcmp(sn->id, either) : ((!id || !strcmp(sn->id, id)) && (!name || !strcmp(sn->name, name)))) {
            idx = (int)i;
        }
    }
    for (uint32_t i = 0; either && i < s->nb_snapshots && idx < 0; i++) {
        if (!strcmp(s->snapshots[i].name, either)) {
            idx = (int)i;
        }
    }
    if (idx < 0) {
        g_set_error(error, VDK_ERROR, ENOENT, "Failed to load snapshot: Can't find snapshot");
        return false;
    }
    const Qcow2Snapshot *sn = &s->snapshots[idx];
    uint64_t *l1 = qcow2_snapshot_load_l1(s, sn, error);
    if (!l1) {
        return false;
    }
    if (sn->disk_size > QCOW2_MAX_VIRTUAL_SIZE ||
        sn->l1_size < ((sn->disk_size + (s->l2_entries << s->cluster_bits) - 1) >> (s->l2_bits + s->cluster_bits))) {
        g_free(l1);
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: snapshot '%s': its L1 table (%u entries) cannot map its disk size %"
                    G_GUINT64_FORMAT, sn->name, sn->l1_size, sn->disk_size);
        return false;
    }
    g_free(s->l1);
    s->l1 = l1;
    s->l1_size = sn->l1_size;
    s->size = sn->disk_size;
    return true;
}

static uint64_t
opt_size(VdkNode *n, const char *key, uint64_t def, GError **error, bool *ok)
{
    const char *v = g_hash_table_lookup(n->img->opts.extra, key);
    if (!v) {
        return def;
    }
    uint64_t out;
    GError *err = NULL;
    if (!vdk_parse_size(v, &out, &err)) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: option %s: %s", key, err->message);
        g_error_free(err);
        *ok = false;
        return def;
    }
    return out;
}

bool
qcow2_parse_open(VdkNode *n, Qcow2 *s, GError **error)
{
    uint8_t h[QCOW2_V3_HEADER_MIN + 8];
    memset(h, 0, sizeof(h));
    int r = vdk_file_pread_sync(s->file, h, sizeof(h), 0);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read the header: %s", g_strerror(-r));
        return false;
    }
    if (qbe32(h) != QCOW2_MAGIC) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bad magic 0x%08x (not a qcow2 image)", qbe32(h));
        return false;
    }
    s->version = qbe32(h + 4);
    if (s->version < 2 || s->version > 3) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: unsupported version %u (2 and 3 are supported)", s->version);
        return false;
    }
    s->cluster_bits = qbe32(h + 20);
    if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS || s->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: cluster_bits %u out of range (%d to %d)", s->cluster_bits,
                    QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
        return false;
    }
    s->cluster_size = 1u << s->cluster_bits;
    if (s->version >= 3) {
        s->header_length = qbe32(h + 100);
        if (s->header_length < QCOW2_V3_HEADER_MIN || s->header_length % 8 != 0 ||
            s->header_length > s->cluster_size) {
            g_set_error(error, VDK_ERROR, EINVAL,
                        "qcow2: header_length %u is invalid (a multiple of 8, %d to %u)", s->header_length,
                        QCOW2_V3_HEADER_MIN, s->cluster_size);
            return false;
        }
    } else {
        s->header_length = 72;
    }
    s->hdr = g_try_malloc0(s->cluster_size);
    if (!s->hdr) {
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: cannot allocate the header cluster");
        return false;
    }
    r = vdk_file_pread_sync(s->file, s->hdr, s->cluster_size, 0);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read the header: %s", g_strerror(-r));
        return false;
    }
    const uint8_t *hd = s->hdr;
    uint64_t backing_off = qbe64(hd + 8);
    uint32_t backing_len = qbe32(hd + 16);
    s->size = qbe64(hd + 24);
    s->crypt_method = qbe32(hd + 32);
    s->l1_size = qbe32(hd + 36);
    s->l1_offset = qbe64(hd + 40);
    s->reftable_offset = qbe64(hd + 48);
    s->reftable_clusters = qbe32(hd + 56);
    s->nb_snapshots = qbe32(hd + 60);
    s->snapshots_offset = qbe64(hd + 64);
    if (s->version >= 3) {
        s->incompatible = qbe64(hd + 72);
        s->compatible = qbe64(hd + 80);
        s->autoclear = qbe64(hd + 88);
        s->refcount_order = qbe32(hd + 96);
        if (s->header_length > 104) {
            s->compression_type = hd[104];
        }
    } else {
        s->refcount_order = 4;
    }

    /* incompatible features first: their names explain most refusals */
    uint64_t unknown = s->incompatible & ~QCOW2_INCOMPAT_SUPPORTED;
    if (unknown) {
        GString *names = g_string_new(NULL);
        for (int bit = 0; bit < 64; bit++) {
            if (unknown & (1ULL << bit)) {
                char *nm = feature_name(s, 0, bit);
                g_string_append_printf(names, "%s%s", names->len ? ", " : "", nm);
                g_free(nm);
            }
        }
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: unsupported incompatible feature(s): %s", names->str);
        g_string_free(names, TRUE);
        return false;
    }
    if (s->crypt_method == 1) {
        g_set_error(error, VDK_ERROR, ENOTSUP,
                    "qcow2: legacy AES encryption (crypt_method 1) is not supported: it is insecure; decrypt the "
                    "image with qemu-img convert first");
        return false;
    }
    if (s->crypt_method > 2) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: crypt_method %u is invalid", s->crypt_method);
        return false;
    }
    if (s->refcount_order > 6) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: refcount_order %u is invalid (max 6)", s->refcount_order);
        return false;
    }
    if (s->incompatible & QCOW2_INCOMPAT_COMPRESSION) {
        if (s->header_length <= 104 || s->compression_type == 0) {
            g_set_error(error, VDK_ERROR, EINVAL,
                        "qcow2: the compression type bit is set but compression_type is %u", s->compression_type);
            return false;
        }
    } else if (s->compression_type != 0) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: compression_type %u without the compression type feature bit", s->compression_type);
        return false;
    }
    if (s->compression_type > QCOW2_COMPRESSION_ZSTD) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: unknown compression_type %u", s->compression_type);
        return false;
    }
    s->extl2 = (s->incompatible & QCOW2_INCOMPAT_EXTL2) != 0;
    if (s->extl2 && s->cluster_bits < 14) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: extended L2 entries need clusters of at least 16 KiB (cluster_bits %u)", s->cluster_bits);
        return false;
    }

    /* derived geometry */
    s->l2_entry_size = s->extl2 ? 16 : 8;
    s->l2_bits = s->cluster_bits - (s->extl2 ? 4 : 3);
    s->l2_entries = 1ULL << s->l2_bits;
    s->sc_bits = s->cluster_bits - 5;
    s->refcount_bits = 1u << s->refcount_order;
    s->refblock_bits = s->cluster_bits + 3 - s->refcount_order;
    s->refcount_max = s->refcount_bits == 64 ? UINT64_MAX : (1ULL << s->refcount_bits) - 1;
    s->csize_shift = 62 - (s->cluster_bits - 8);
    s->csize_mask = (1ULL << (s->cluster_bits - 8)) - 1;
    s->coffset_mask = (1ULL << s->csize_shift) - 1;
    s->lazy_refcounts = (s->compatible & QCOW2_COMPAT_LAZY_REFCOUNTS) != 0;

    /* sizes and offsets */
    if (s->size > QCOW2_MAX_VIRTUAL_SIZE) {
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: virtual size %" G_GUINT64_FORMAT " is too large (max %llu)",
                    s->size, (unsigned long long)QCOW2_MAX_VIRTUAL_SIZE);
        return false;
    }
    if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: L1 table too large (%u entries, max %u)", s->l1_size,
                    QCOW2_MAX_L1_BYTES / 8);
        return false;
    }
    uint64_t per_l1 = s->l2_entries << s->cluster_bits; /* bytes one L1 entry maps, <= 2^53 */
    uint64_t l1_needed = (s->size + per_l1 - 1) / per_l1;
    if (l1_needed > s->l1_size) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: L1 table too small for the virtual size (%u entries, %" G_GUINT64_FORMAT " needed)",
                    s->l1_size, l1_needed);
        return false;
    }
    if ((s->l1_offset & (s->cluster_size - 1)) ||
        (s->l1_size && (s->l1_offset < s->cluster_size || s->l1_offset > QCOW2_OFFSET_MASK))) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: L1 table offset 0x%" G_GINT64_MODIFIER "x is invalid",
                    s->l1_offset);
        return false;
    }
    if (s->reftable_clusters == 0 || (uint64_t)s->reftable_clusters << s->cluster_bits > QCOW2_MAX_REFTABLE_BYTES) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: refcount table size %u clusters is invalid (1 to %u bytes)",
                    s->reftable_clusters, QCOW2_MAX_REFTABLE_BYTES);
        return false;
    }
    if ((s->reftable_offset & (s->cluster_size - 1)) || s->reftable_offset < s->cluster_size ||
        s->reftable_offset > QCOW2_OFFSET_MASK) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: refcount table offset 0x%" G_GINT64_MODIFIER "x is invalid",
                    s->reftable_offset);
        return false;
    }
    if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: %u snapshots (max %d)", s->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
        return false;
    }
    /* alignment is required even without snapshots, as qemu does */
    if ((s->snapshots_offset & (s->cluster_size - 1)) ||
        (s->nb_snapshots && (s->snapshots_offset < s->cluster_size || s->snapshots_offset > QCOW2_OFFSET_MASK))) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: snapshot table offset 0x%" G_GINT64_MODIFIER "x is invalid",
                    s->snapshots_offset);
        return false;
    }

    /* header extensions: up to the backing file name, or the cluster end */
    uint32_t ext_end = s->cluster_size;
    if (backing_off) {
        if (backing_len > QCOW2_MAX_BACKING_NAME || backing_len == 0) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: backing file name length %u is invalid (1 to %d)",
                        backing_len, QCOW2_MAX_BACKING_NAME);
            return false;
        }
        if (backing_off > s->cluster_size || backing_len > s->cluster_size - backing_off ||
            backing_off < s->header_length) {
            g_set_error(error, VDK_ERROR, EINVAL,
                        "qcow2: backing file name at offset %" G_GUINT64_FORMAT " (%u bytes) is outside the header cluster",
                        backing_off, backing_len);
            return false;
        }
        ext_end = (uint32_t)backing_off;
    }
    uint32_t off = s->header_length;
    s->hdr_used = off;
    while (off + 8 <= ext_end) {
        uint32_t t = qbe32(hd + off);
        uint32_t len = qbe32(hd + off + 4);
        if (t == QCOW2_EXT_END) {
            s->hdr_used = off + 8;
            break;
        }
        if (len > ext_end - off - 8) {
            g_set_error(error, VDK_ERROR, EINVAL,
                        "qcow2: header extension 0x%08x at offset %u: length %u runs past the header", t, off, len);
            return false;
        }
        const uint8_t *data = hd + off + 8;
        switch (t) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (len == 0 || len > 32 || memchr(data, 0, len)) {
                g_set_error(error, VDK_ERROR, EINVAL, "qcow2: backing format extension is invalid (length %u)", len);
                return false;
            }
            g_free(n->backing_fmt);
            n->backing_fmt = g_strndup((const char *)data, len);
            break;
        case QCOW2_EXT_FEATURE_TABLE:
            if (len % 48) {
                g_set_error(error, VDK_ERROR, EINVAL,
                            "qcow2: feature name table length %u is not a multiple of 48", len);
                return false;
            }
            break;
        case QCOW2_EXT_BITMAPS:
            if (len != 24) {
                g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmaps extension length %u is invalid (24)", len);
                return false;
            }
            if (s->bm_ext) {
                g_set_error(error, VDK_ERROR, EINVAL, "qcow2: two bitmaps extensions");
                return false;
            }
            if ((s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) && qbe32(data + 4) != 0) {
                g_set_error(error, VDK_ERROR, EINVAL, "qcow2: bitmaps extension: reserved field is 0x%x (must be 0)",
                            qbe32(data + 4));
                return false;
            }
            s->has_bitmaps = true;
            s->bm_ext = true;
            s->bm_ext_nb = qbe32(data);
            s->bm_dir_size = qbe64(data + 8);
            s->bm_dir_offset = qbe64(data + 16);
            break;
        case QCOW2_EXT_CRYPTO:
            if (s->crypt_method != 2) {
                g_set_error(error, VDK_ERROR, EINVAL, "qcow2: encryption header extension in an unencrypted image");
                return false;
            }
            if (len != 16) {
                g_set_error(error, VDK_ERROR, EINVAL, "qcow2: crypto header extension length %u is invalid (16)", len);
                return false;
            }
            s->has_crypt_ext = true;
            s->crypt_ext_off = qbe64(data);
            s->crypt_ext_len = qbe64(data + 8);
            break;
        case QCOW2_EXT_DATA_FILE:
            g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: external data files are not supported");
            return false;
        default:
            break; /* unknown: preserved in the header buffer */
        }
        off += 8 + ((len + 7) & ~7u);
        s->hdr_used = off;
    }
    if (backing_off) {
        const char *name = (const char *)hd + backing_off;
        if (memchr(name, 0, backing_len)) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: backing file name contains a NUL byte");
            return false;
        }
        n->backing_name = g_strndup(name, backing_len);
        s->hdr_used = MAX(s->hdr_used, (uint32_t)(backing_off + backing_len));
    } else if (n->backing_fmt) {
        g_free(n->backing_fmt);
        n->backing_fmt = NULL;
    }
    s->hdr_used = MIN((uint32_t)vdk_align_up(s->hdr_used, 512), s->cluster_size);

    if (s->crypt_method == 2 && !qcow2_crypto_open(n, s, error)) {
        return false;
    }

    /* tables */
    if (!read_table(s, s->l1_offset, s->l1_size, &s->l1, "L1 table", error)) {
        return false;
    }
    s->reftable_size = (uint64_t)s->reftable_clusters << (s->cluster_bits - 3);
    if (!read_table(s, s->reftable_offset, s->reftable_size, &s->reftable, "refcount table", error)) {
        return false;
    }
    for (uint64_t i = 0; i < s->reftable_size; i++) {
        uint64_t e = s->reftable[i];
        if (e && ((e & QCOW2_REFT_RESERVED) || (e & (s->cluster_size - 1))) && !n->img->opts.check) {
            g_set_error(error, VDK_ERROR, EINVAL,
                        "qcow2: refcount table entry %" G_GUINT64_FORMAT " is invalid (0x%" G_GINT64_MODIFIER "x)",
                        i, e);
            return false;
        }
    }
    s->refblocks = g_hash_table_new(g_direct_hash, g_direct_equal);
    for (uint64_t i = 0; i < s->reftable_size; i++) {
        if (s->reftable[i]) {
            g_hash_table_add(s->refblocks, GSIZE_TO_POINTER(s->reftable[i] >> s->cluster_bits));
        }
    }
    if (!read_snapshots(s, error)) {
        return false;
    }
    if (!open_snapshot(n, s, error)) {
        return false;
    }
    GError *bm_err = NULL;
    if (!qcow2_bitmaps_load(s, &bm_err)) {
        if (!n->img->opts.check) {
            g_propagate_error(error, bm_err);
            return false;
        }
        s->bm_error = g_strdup(bm_err->message); /* check reports it */
        g_error_free(bm_err);
    }
    s->l1_dirty_lo = s->reftable_dirty_lo = UINT64_MAX;

    /* allocation pointer: past everything in the file */
    uint64_t fsize = __atomic_load_n(&s->file->size, __ATOMIC_RELAXED);
    s->next_free = qcow2_align(s, MAX(fsize, (uint64_t)s->cluster_size));

    /* caches */
    bool ok = true;
    uint64_t clusters = (s->size + s->cluster_size - 1) >> s->cluster_bits;
    uint64_t l2_need = MAX(clusters * s->l2_entry_size, (uint64_t)s->cluster_size);
    uint64_t l2_max = opt_size(n, "l2-cache-size", MIN(l2_need, QCOW2_DEFAULT_L2_CACHE), error, &ok);
    uint64_t rc_max = opt_size(n, "refcount-cache-size", QCOW2_DEFAULT_REFCOUNT_CACHE, error, &ok);
    uint64_t slice = opt_size(n, "l2-cache-entry-size",
                              l2_max >= l2_need ? s->cluster_size : MIN(s->cluster_size, QCOW2_SMALL_SLICE), error,
                              &ok);
    if (!ok) {
        return false;
    }
    if (slice < 512 || slice > s->cluster_size || (slice & (slice - 1)) || slice < s->l2_entry_size) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: l2-cache-entry-size %" G_GUINT64_FORMAT " must be a power of two from 512 to the cluster size",
                    slice);
        return false;
    }
    s->l2c = vdk_mc_new(n, s->file, (uint32_t)slice, l2_max);
    s->rc = vdk_mc_new(n, s->file, s->cluster_size, MAX(rc_max, (uint64_t)s->cluster_size * 4));
    s->frees = g_array_new(FALSE, FALSE, sizeof(Qcow2Free));
    return true;
}

static void
qcow2_free_state(Qcow2 *s)
{
    if (s->comp_pool) {
        g_thread_pool_free(s->comp_pool, FALSE, TRUE); /* idle: nothing in flight */
    }
    qcow2_crypto_close(s);
    vdk_mc_free(s->l2c);
    vdk_mc_free(s->rc);
    if (s->refblocks) {
        g_hash_table_destroy(s->refblocks);
    }
    if (s->frees) {
        g_array_free(s->frees, TRUE);
    }
    qcow2_snapshots_free(s);
    qcow2_bitmaps_free(s);
    if (s->bm_olds) {
        g_array_free(s->bm_olds, TRUE);
    }
    g_free(s->l1);
    g_free(s->reftable);
    g_free(s->hdr);
    g_free(s);
}

static bool
write_header_sync(Qcow2 *s, GError **error)
{
    qcow2_update_header_buf(s);
    int r = vdk_file_pwrite_sync(s->file, s->hdr, s->hdr_used, 0);
    if (r == 0) {
        r = vdk_file_flush_sync(s->file);
    }
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot update the header: %s", g_strerror(-r));
        return false;
    }
    s->hdr_dirty = false;
    return true;
}

static bool
qcow2_open(VdkNode *n, GError **error)
{
    Qcow2 *s = g_new0(Qcow2, 1);
    s->meta_prealloc = -1;
    s->node = n;
    s->file = n->file;
    n->opaque = s;
    if (!qcow2_parse_open(n, s, error)) {
        n->opaque = NULL;
        qcow2_free_state(s);
        return false;
    }
    n->size = s->size;
    s->corrupt = (s->incompatible & QCOW2_INCOMPAT_CORRUPT) != 0;
    s->dirty_on_disk = (s->incompatible & QCOW2_INCOMPAT_DIRTY) != 0;
    /* check -r opens corrupt images read-write to repair them */
    bool repair = n->img->opts.repair;
    if (!n->read_only) {
        if (s->corrupt && !repair) {
            g_set_error(error, VDK_ERROR, EROFS,
                        "qcow2: the image is marked corrupt and can only be opened read-only (repair it with "
                        "vdk check -r all)");
            n->opaque = NULL;
            qcow2_free_state(s);
            return false;
        }
        if (s->dirty_on_disk) {
            /* A writer with lazy refcounts did not close cleanly: rebuild
             * the refcounts from the mapping before writing anything. */
            if (!qcow2_repair_refcounts(s, error)) {
                n->opaque = NULL;
                qcow2_free_state(s);
                return false;
            }
            s->incompatible &= ~QCOW2_INCOMPAT_DIRTY;
            s->dirty_on_disk = false;
            s->hdr_dirty = true;
        }
        /* Enabled bitmaps: in memory and marked in use on disk before
         * any write; autoclear bits vdk does not maintain are cleared. */
        if (!s->bm_error && !qcow2_bitmaps_open_rw(s, error)) {
            n->opaque = NULL;
            qcow2_free_state(s);
            return false;
        }
        if (s->bm_error && s->autoclear) {
            s->autoclear = 0; /* check -r on a broken directory: inconsistent */
            s->hdr_dirty = true;
        }
        if (s->hdr_dirty && !write_header_sync(s, error)) {
            n->opaque = NULL;
            qcow2_free_state(s);
            return false;
        }
    }
    return true;
}

static bool
qcow2_close(VdkNode *n, GError **error)
{
    (void)error;
    Qcow2 *s = n->opaque;
    if (s) {
        qcow2_free_state(s);
    }
    n->opaque = NULL;
    return true;
}

static void
qcow2_info(VdkNode *n, VdkInfo *info)
{
    Qcow2 *s = n->opaque;
    info->cluster_size = s->cluster_size;
    info->encrypted = s->crypt_method != 0;
    info->dirty = (s->incompatible & QCOW2_INCOMPAT_DIRTY) != 0;
    info->backing_filename = g_strdup(n->backing_name);
    info->backing_format = g_strdup(n->backing_fmt);
    GString *j = g_string_new(NULL);
    GPtrArray *l = g_ptr_array_new_with_free_func(g_free);
    const char *compat = s->version >= 3 ? "1.1" : "0.10";
    if (s->version >= 3) {
        g_string_append_printf(j,
                               "{\n                \"compat\": \"%s\",\n"
                               "                \"compression-type\": \"%s\",\n"
                               "                \"lazy-refcounts\": %s,\n",
                               compat, compression_name(s->compression_type), s->lazy_refcounts ? "true" : "false");
        g_ptr_array_add(l, g_strdup_printf("compat: %s", compat));
        g_ptr_array_add(l, g_strdup_printf("compression type: %s", compression_name(s->compression_type)));
        g_ptr_array_add(l, g_strdup_printf("lazy refcounts: %s", s->lazy_refcounts ? "true" : "false"));
        qcow2_bitmaps_info(s, j, l);
        g_string_append_printf(j, "                \"refcount-bits\": %u,\n", s->refcount_bits);
        GPtrArray *el = g_ptr_array_new_with_free_func(g_free);
        if (s->crypto) {
            g_string_append(j, "                \"encrypt\": ");
            qcow2_crypto_info(s, j, el);
            g_string_append(j, ",\n");
        }
        g_string_append_printf(j,
                               "                \"corrupt\": %s,\n"
                               "                \"extended-l2\": %s\n            }",
                               s->corrupt ? "true" : "false", s->extl2 ? "true" : "false");
        g_ptr_array_add(l, g_strdup_printf("refcount bits: %u", s->refcount_bits));
        for (guint i = 0; i < el->len; i++) {
            g_ptr_array_add(l, g_strdup(el->pdata[i]));
        }
        g_ptr_array_unref(el);
        g_ptr_array_add(l, g_strdup_printf("corrupt: %s", s->corrupt ? "true" : "false"));
        g_ptr_array_add(l, g_strdup_printf("extended l2: %s", s->extl2 ? "true" : "false"));
    } else {
        g_string_append_printf(j,
                               "{\n                \"compat\": \"%s\",\n"
                               "                \"compression-type\": \"%s\",\n"
                               "                \"refcount-bits\": %u",
                               compat, compression_name(s->compression_type), s->refcount_bits);
        g_ptr_array_add(l, g_strdup_printf("compat: %s", compat));
        g_ptr_array_add(l, g_strdup_printf("compression type: %s", compression_name(s->compression_type)));
        g_ptr_array_add(l, g_strdup_printf("refcount bits: %u", s->refcount_bits));
        if (s->crypto) {
            g_string_append(j, ",\n                \"encrypt\": ");
            qcow2_crypto_info(s, j, l);
        }
        g_string_append(j, "\n            }");
    }
    info->specific_json = j;
    info->specific_lines = l;
}

static const VdkOptionDesc qcow2_open_opts[] = {
    {"l2-cache-size", VDK_OPT_SIZE, "Maximum L2 table cache size", "32M or what maps the image", false},
    {"refcount-cache-size", VDK_OPT_SIZE, "Maximum refcount block cache size", "8M", false},
    {"l2-cache-entry-size", VDK_OPT_SIZE, "L2 cache slice size", "cluster size", false},
    {"snapshot.id", VDK_OPT_STRING, "Open this internal snapshot (by ID), read-only", NULL, false},
    {"snapshot.name", VDK_OPT_STRING, "Open this internal snapshot (by name), read-only", NULL, false},
    {"snapshot", VDK_OPT_STRING, "Open this internal snapshot (by ID, else name), read-only", NULL, false},
    {"encrypt.key-secret", VDK_OPT_STRING, "ID of the secret (--object secret) holding the LUKS passphrase", NULL,
     false},
    {"backing.encrypt.key-secret", VDK_OPT_STRING, "The same for an encrypted backing file", NULL, false},
    {NULL, 0, NULL, NULL, false},
};

/*
 * Rebuild the header cluster in memory for @version (2: 72-byte header, 3:
 * 112 bytes with the compression type), with @name/@fmt as the backing
 * file: the backing format extension first (as qemu writes it), the other
 * extensions kept in their order (the feature name table only for v3),
 * then the end marker and the name.  Marks the header dirty; the next
 * flush writes it in one piece.  Lock held.
 */
bool
qcow2_rebuild_header(Qcow2 *s, uint32_t version, const char *name, const char *fmt, GError **error)
{
    uint32_t cs = s->cluster_size;
    size_t name_len = name ? strlen(name) : 0;
    size_t fmt_len = (name_len && fmt) ? strlen(fmt) : 0;
    uint32_t hlen = version >= 3 ? 112 : 72;
    uint8_t *nh = g_malloc0(cs);
    memcpy(nh, s->hdr, MIN(s->header_length, hlen));
    qput32(nh + 4, version);
    if (version >= 3) {
        if (s->header_length < 104) {
            /* upgraded: v3 fields start clean */
            s->incompatible = s->compatible = s->autoclear = 0;
            s->compression_type = QCOW2_COMPRESSION_ZLIB;
        }
        qput32(nh + 96, s->refcount_order);
        qput32(nh + 100, hlen);
        nh[104] = s->compression_type;
    }
    uint32_t pos = hlen;
    bool fits = true;
    if (fmt_len) {
        qput32(nh + pos, QCOW2_EXT_BACKING_FORMAT);
        qput32(nh + pos + 4, (uint32_t)fmt_len);
        memcpy(nh + pos + 8, fmt, fmt_len);
        pos += 8 + (uint32_t)((fmt_len + 7) & ~7u);
    }
    uint64_t old_boff = qbe64(s->hdr + 8);
    uint32_t limit = old_boff && old_boff < cs ? (uint32_t)old_boff : cs;
    for (uint32_t off = s->header_length; off + 8 <= limit;) {
        uint32_t t = qbe32(s->hdr + off);
        uint32_t len = qbe32(s->hdr + off + 4);
        if (t == QCOW2_EXT_END || len > limit - off - 8) {
            break;
        }
        uint32_t whole = 8 + ((len + 7) & ~7u);
        if (t != QCOW2_EXT_BACKING_FORMAT && !(t == QCOW2_EXT_FEATURE_TABLE && version < 3)) {
            if (pos + whole + 8 > cs) {
                fits = false;
                break;
            }
            memcpy(nh + pos, s->hdr + off, MIN(whole, limit - off));
            pos += whole;
        }
        off += whole;
    }
    pos += 8; /* end of extensions (zeroes) */
    if (!fits || pos + name_len > cs) {
        g_free(nh);
        g_set_error(error, VDK_ERROR, ENOSPC, "qcow2: the header extensions and the backing file name do not fit "
                    "in one cluster (%u bytes)", cs);
        return false;
    }
    if (name_len) {
        memcpy(nh + pos, name, name_len);
    }
    qput64(nh + 8, name_len ? pos : 0);
    qput32(nh + 16, (uint32_t)name_len);
    memcpy(s->hdr, nh, cs);
    g_free(nh);
    s->hdr_used = pos + (uint32_t)name_len;
    s->version = version;
    s->header_length = hlen;
    s->hdr_dirty = true;
    return true;
}

/*
 * Record another backing file (rebase): the header cluster is rebuilt with
 * the backing format extension first (as qemu writes it), the other
 * extensions kept in their order, and the name after them; it is written
 * in one piece and synced.  @name NULL or "": no backing file.
 */
bool
qcow2_change_backing(VdkNode *n, const char *name, const char *fmt, GError **error)
{
    Qcow2 *s = n->opaque;
    if (n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    if (s->corrupt) {
        g_set_error(error, VDK_ERROR, EIO, "qcow2: the image is marked corrupt");
        return false;
    }
    size_t name_len = name ? strlen(name) : 0;
    size_t fmt_len = (name_len && fmt) ? strlen(fmt) : 0;
    if (name_len > QCOW2_MAX_BACKING_NAME) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: backing file name is longer than %d bytes",
                    QCOW2_MAX_BACKING_NAME);
        return false;
    }
    if (fmt_len > 32) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: backing format name '%s' is too long", fmt);
        return false;
    }
    g_mutex_lock(&n->lock);
    if (!qcow2_rebuild_header(s, s->version, name_len ? name : NULL, fmt_len ? fmt : NULL, error)) {
        g_mutex_unlock(&n->lock);
        return false;
    }
    g_free(n->backing_name);
    g_free(n->backing_fmt);
    n->backing_name = name_len ? g_strdup(name) : NULL;
    n->backing_fmt = fmt_len ? g_strdup(fmt) : NULL;
    g_mutex_unlock(&n->lock);
    int r = vdk_image_sync_request(n->img, VDK_OP_FLUSH, 0, NULL, 0, VDK_FLUSH_EVICT, NULL);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot write the header: %s", g_strerror(-r));
        return false;
    }
    return true;
}

bool
qcow2_image_supports_bitmaps(VdkImage *img)
{
    VdkNode *n = img->top;
    return n->drv == &vdk_format_qcow2 && ((Qcow2 *)n->opaque)->version >= 3;
}

const VdkFormat vdk_format_qcow2 = {
    .name = "qcow2",
    .probe = qcow2_probe,
    .open = qcow2_open,
    .close = qcow2_close,
    .map = qcow2_map,
    .alloc_done = qcow2_alloc_done,
    .write_compressed = qcow2_write_compressed,
    .decompress = qcow2_decompress,
    .block_status = qcow2_block_status,
    .discard = qcow2_discard,
    .write_zeroes = qcow2_write_zeroes,
    .flush = qcow2_flush,
    .truncate = qcow2_truncate_bitmaps,
    .create = qcow2_create,
    .create_opts = qcow2_create_opts,
    .open_opts = qcow2_open_opts,
    .info = qcow2_info,
    .check = qcow2_check,
    .measure = qcow2_measure,
    .snapshot_create = qcow2_snapshot_create,
    .snapshot_apply = qcow2_snapshot_apply_bitmaps,
    .snapshot_delete = qcow2_snapshot_delete,
    .snapshot_list = qcow2_snapshot_list,
    .change_backing = qcow2_change_backing,
    .amend = qcow2_amend,
    .compact = qcow2_compact,
    .bitmap = qcow2_bitmap_op,
    .bitmap_list = qcow2_bitmap_list,
    .before_close = qcow2_bitmaps_store,
};
