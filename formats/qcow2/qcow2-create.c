/* SPDX-License-Identifier: MIT */
/*
 * qcow2-create.c - making new qcow2 images.
 *
 * Layout (QEMU's): header cluster, refcount table, refcount blocks, L1
 * table; with preallocation also every L2 table and data cluster, in that
 * order, so the data area is contiguous.  The header carries the feature
 * name table QEMU writes, so tools that do not know a feature can name it.
 *
 * Options as qemu-img's: size, compat (0.10/v2, 1.1/v3), cluster_size,
 * refcount_bits, lazy_refcounts, extended_l2, compression_type (zlib,
 * zstd), preallocation (off, metadata, falloc, full), backing_file,
 * backing_fmt.  A backing file is opened (read-only) to check it and to
 * take the size from when none is given.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"

/* In the order qemu-img prints them in its "Formatting" line. */
const VdkOptionDesc qcow2_create_opts[] = {
    {"encrypt.format", VDK_OPT_STRING, "Encrypt the image, format choices: 'aes', 'luks' (luks is supported)", NULL, false},
    {"encrypt.key-secret", VDK_OPT_STRING, "ID of secret providing qcow AES key or LUKS passphrase", NULL, false},
    {"encrypt.cipher-alg", VDK_OPT_STRING, "Name of encryption cipher algorithm (aes-256, aes-128)", NULL, false},
    {"encrypt.cipher-mode", VDK_OPT_STRING, "Name of encryption cipher mode (xts)", NULL, false},
    {"encrypt.ivgen-alg", VDK_OPT_STRING, "Name of IV generator algorithm (plain64)", NULL, false},
    {"encrypt.ivgen-hash-alg", VDK_OPT_STRING, "Name of IV generator hash algorithm", NULL, false},
    {"encrypt.hash-alg", VDK_OPT_STRING, "Name of encryption hash algorithm (sha256)", NULL, false},
    {"encrypt.iter-time", VDK_OPT_NUMBER, "Time to spend in PBKDF in milliseconds", "2000", false},
    {"encryption", VDK_OPT_BOOL, "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
     NULL, false},
    {"cluster_size", VDK_OPT_SIZE, "qcow2 cluster size", "65536", true},
    {"extended_l2", VDK_OPT_BOOL, "Extended L2 tables", "off", true},
    {"preallocation", VDK_OPT_STRING, "Preallocation mode (allowed values: off, metadata, falloc, full)", NULL, false},
    {"compression_type", VDK_OPT_STRING, "Compression method used for image cluster compression", "zlib", true},
    {"size", VDK_OPT_SIZE, "Virtual disk size", NULL, false},
    {"backing_file", VDK_OPT_STRING, "File name of a base image", NULL, false},
    {"backing_fmt", VDK_OPT_STRING, "Image format of the base image", NULL, false},
    {"compat", VDK_OPT_STRING, "Compatibility level (v2 [0.10] or v3 [1.1])", NULL, false},
    {"lazy_refcounts", VDK_OPT_BOOL, "Postpone refcount updates", "off", true},
    {"refcount_bits", VDK_OPT_NUMBER, "Width of a reference count entry in bits", "16", true},
    {NULL, 0, NULL, NULL, false},
};

typedef struct {
    uint32_t version;
    uint32_t cluster_bits;
    uint32_t refcount_order;
    bool lazy;
    bool extl2;
    uint8_t ctype;
    VdkPrealloc prealloc;
    uint64_t size;
    const char *backing;
    const char *backing_fmt;
} Params;

static bool
parse_params(VdkCreateCtx *cc, const VdkCreateOptions *o, Params *p, GError **error)
{
    memset(p, 0, sizeof(*p));
    const char *v;
    p->version = 3;
    if ((v = vdk_create_opt(o, "compat"))) {
        if (!strcmp(v, "0.10") || !strcmp(v, "v2")) {
            p->version = 2;
        } else if (!strcmp(v, "1.1") || !strcmp(v, "v3")) {
            p->version = 3;
        } else {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: invalid compatibility level '%s' (0.10 or 1.1)", v);
            return false;
        }
    }
    uint64_t cs = 65536;
    bool present;
    if (!vdk_create_opt_size(o, "cluster_size", &cs, &present, error)) {
        return false;
    }
    if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1))) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: cluster size %" G_GUINT64_FORMAT " is invalid (a power of two from 512 to 2M)", cs);
        return false;
    }
    p->cluster_bits = (uint32_t)__builtin_ctzll(cs);
    uint64_t bits = 16;
    if ((v = vdk_create_opt(o, "refcount_bits"))) {
        bits = g_ascii_strtoull(v, NULL, 10);
    }
    if (bits == 0 || bits > 64 || (bits & (bits - 1))) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: refcount_bits %" G_GUINT64_FORMAT " is invalid (1, 2, 4 ... 64)",
                    bits);
        return false;
    }
    if (p->version < 3 && bits != 16) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: refcount widths other than 16 bits need compatibility level 1.1 or above (use compat=1.1)");
        return false;
    }
    p->refcount_order = (uint32_t)__builtin_ctzll(bits);
    if (!vdk_create_opt_bool(o, "lazy_refcounts", false, &p->lazy, error) ||
        !vdk_create_opt_bool(o, "extended_l2", false, &p->extl2, error)) {
        return false;
    }
    if (p->lazy && p->version < 3) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: lazy refcounts need compatibility level 1.1 or above (use compat=1.1)");
        return false;
    }
    if (p->extl2 && p->version < 3) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: extended L2 entries need compatibility level 1.1 or above (use compat=1.1)");
        return false;
    }
    if (p->extl2 && cs < 16384) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
        return false;
    }
    if ((v = vdk_create_opt(o, "compression_type"))) {
        if (!strcmp(v, "zlib")) {
            p->ctype = QCOW2_COMPRESSION_ZLIB;
        } else if (!strcmp(v, "zstd")) {
            p->ctype = QCOW2_COMPRESSION_ZSTD;
        } else {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: unknown compression type '%s' (zlib or zstd)", v);
            return false;
        }
    }
    if (p->ctype != 0 && p->version < 3) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: compression type '%s' needs compatibility level 1.1 or above (use compat=1.1)", v);
        return false;
    }
    if (!vdk_create_opt_prealloc(o, &p->prealloc, error)) {
        return false;
    }
    p->backing = vdk_create_opt(o, "backing_file");
    p->backing_fmt = vdk_create_opt(o, "backing_fmt");
    if (p->backing_fmt && !p->backing) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: backing_fmt given without backing_file");
        return false;
    }
    if (p->backing && strlen(p->backing) > QCOW2_MAX_BACKING_NAME) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: backing file name is longer than %d bytes",
                    QCOW2_MAX_BACKING_NAME);
        return false;
    }
    if (p->backing && p->prealloc != VDK_PREALLOC_OFF && !p->extl2) {
        /* without subcluster bits a preallocated cluster would hide the
         * backing file's data */
        g_set_error(error, VDK_ERROR, EINVAL,
                    "Backing file and preallocation can only be used at the same time if extended_l2 is on");
        return false;
    }
    if (!vdk_create_opt_size(o, "size", &p->size, &present, error)) {
        return false;
    }
    if (p->backing && cc) {
        /* Open the backing file as the new image will (relative to its
         * name): it must exist, its format must be known, and it gives the
         * size when none was asked for (not with -u).  (Measuring, cc is
         * NULL: only the presence of a backing file matters.) */
        uint64_t bsize = 0;
        if (!vdk_create_backing_probe(o, vdk_create_filename(cc), &bsize, error)) {
            return false;
        }
        if (!present && !o->no_backing_open) {
            p->size = bsize;
            present = true;
        }
    }
    if (!present && cc) {
        g_set_error(error, VDK_ERROR, EINVAL, "Image creation needs a size parameter");
        return false;
    }
    if (p->size > QCOW2_MAX_VIRTUAL_SIZE) {
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: image size %" G_GUINT64_FORMAT " is too large (max %llu)",
                    p->size, (unsigned long long)QCOW2_MAX_VIRTUAL_SIZE);
        return false;
    }
    return true;
}

static void
put_feature(uint8_t *e, uint8_t type, uint8_t bit, const char *name)
{
    memset(e, 0, 48);
    e[0] = type;
    e[1] = bit;
    memcpy(e + 2, name, strlen(name));
}

/* Refcount metadata (blocks and table clusters) needed to count @clusters
 * clusters plus itself: the fixed point of the recursion. */
static uint64_t
refcount_metadata_clusters(uint64_t clusters, uint64_t cs, uint32_t refcount_order)
{
    uint64_t per_block = cs * 8 / (1ULL << refcount_order);
    uint64_t per_table = cs / 8;
    uint64_t blocks = 0, table = 0, n = 0, last;
    do {
        last = n;
        blocks = (clusters + table + blocks + per_block - 1) / per_block;
        table = (blocks + per_table - 1) / per_table;
        n = clusters + blocks + table;
    } while (n != last);
    return blocks + table;
}

/*
 * qemu-img measure for qcow2 (the same numbers as qemu's): the fully
 * allocated size is header + every L2 table + the L1 table + refcount
 * metadata for all of it + every data cluster; "required" replaces the data
 * clusters by those the source has allocated (all of them with a backing
 * file, which may share nothing, or with falloc/full preallocation).
 */
bool
qcow2_measure(const VdkCreateOptions *o, VdkImage *src, uint64_t size, VdkMeasure *m, GError **error)
{
    Params p;
    if (!parse_params(NULL, o, &p, error)) {
        return false;
    }
    uint64_t cs = 1ULL << p.cluster_bits;
    uint64_t l2e = p.extl2 ? 16 : 8;
    if (size > QCOW2_MAX_VIRTUAL_SIZE) {
        g_set_error(error, VDK_ERROR, EFBIG, "The image size is too large (try using a larger cluster size)");
        return false;
    }
    uint64_t vsize = vdk_align_up(size, cs);
    uint64_t per_l2 = cs / l2e;
    uint64_t l2_tables = (vsize / cs + per_l2 - 1) / per_l2;
    if (l2_tables * 8 > QCOW2_MAX_L1_BYTES) {
        g_set_error(error, VDK_ERROR, EFBIG, "The image size is too large (try using a larger cluster size)");
        return false;
    }
    uint64_t required = 0;
    if (src) {
        if (p.backing) {
            required = vsize;
        } else if (!vdk_measure_allocated(src, cs, &required, error)) {
            return false;
        }
    }
    if (p.prealloc == VDK_PREALLOC_FULL || p.prealloc == VDK_PREALLOC_FALLOC) {
        required = vsize;
    }
    uint64_t luks = 0;
    if (!qcow2_crypto_measure(o, cs, &luks, error)) {
        return false;
    }
    uint64_t meta = cs + luks;               /* header (and LUKS header area) */
    uint64_t nl2e = vdk_align_up(vsize / cs, per_l2);
    meta += nl2e * l2e;                      /* L2 tables */
    uint64_t nl1e = vdk_align_up(nl2e * l2e / cs, cs / 8);
    meta += nl1e * 8;                        /* L1 table */
    meta += refcount_metadata_clusters((meta + vsize) / cs, cs, p.refcount_order) * cs;
    m->fully_allocated = meta + vsize;
    m->required = m->fully_allocated - vsize + required;
    /* qemu shows the bitmaps' size when both images can have bitmaps */
    m->has_bitmaps = p.version >= 3 && src && qcow2_image_supports_bitmaps(src);
    m->bitmaps = 0;
    if (m->has_bitmaps) {
        m->bitmaps = qcow2_bitmaps_measure(src, cs);
    }
    return true;
}

bool
qcow2_create(VdkCreateCtx *cc, const VdkCreateOptions *o, GError **error)
{
    Params p;
    if (!parse_params(cc, o, &p, error)) {
        return false;
    }
    uint8_t *luks = NULL;
    size_t luks_len = 0;
    if (!qcow2_crypto_create_region(o, &luks, &luks_len, error)) {
        return false;
    }
    if (luks && p.prealloc != VDK_PREALLOC_OFF) {
        g_free(luks);
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: preallocation of encrypted images is not supported");
        return false;
    }
    VdkFile *f = vdk_create_main_file(cc);
    uint64_t cs = 1ULL << p.cluster_bits;
    uint64_t crypt_clusters = (luks_len + cs - 1) / cs;
    uint32_t l2_entry = p.extl2 ? 16 : 8;
    uint64_t l2_entries = cs / l2_entry;
    uint64_t clusters = (p.size + cs - 1) / cs;
    uint64_t l1_size = (clusters + l2_entries - 1) / l2_entries;
    if (l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        g_free(luks);
        g_set_error(error, VDK_ERROR, EFBIG,
                    "qcow2: the L1 table for %" G_GUINT64_FORMAT " bytes with %" G_GUINT64_FORMAT "-byte clusters would exceed %u bytes (use a larger cluster size)",
                    p.size, cs, QCOW2_MAX_L1_BYTES);
        return false;
    }
    uint64_t l1_clusters = MAX((l1_size * 8 + cs - 1) / cs, (uint64_t)1);
    bool prealloc = p.prealloc != VDK_PREALLOC_OFF;
    uint64_t l2_tables = prealloc ? l1_size : 0;
    uint64_t data_clusters = prealloc ? clusters : 0;
    uint64_t rb_entries = (cs * 8) >> p.refcount_order;

    /* refcount blocks and table must also count themselves */
    uint64_t rt_clusters = 1, rb_count = 1, total = 0;
    for (int i = 0; i < 64; i++) {
        total = 1 + rt_clusters + rb_count + l1_clusters + crypt_clusters + l2_tables + data_clusters;
        uint64_t need_rb = (total + rb_entries - 1) / rb_entries;
        uint64_t need_rt = MAX((need_rb * 8 + cs - 1) / cs, (uint64_t)1);
        if (need_rb == rb_count && need_rt == rt_clusters) {
            break;
        }
        rb_count = need_rb;
        rt_clusters = need_rt;
    }
    if (rt_clusters * cs > QCOW2_MAX_REFTABLE_BYTES) {
        g_free(luks);
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: the refcount table would exceed %u bytes",
                    QCOW2_MAX_REFTABLE_BYTES);
        return false;
    }
    uint64_t rt_off = cs;
    uint64_t rb_off = rt_off + rt_clusters * cs;
    uint64_t l1_off = rb_off + rb_count * cs;
    uint64_t crypt_off = l1_off + l1_clusters * cs;
    uint64_t l2_off = crypt_off + crypt_clusters * cs;
    uint64_t data_off = l2_off + l2_tables * cs;
    uint64_t end = data_off + data_clusters * cs;

    if (prealloc && (p.prealloc == VDK_PREALLOC_FALLOC || p.prealloc == VDK_PREALLOC_FULL) &&
        !vdk_create_check_space(cc, end, error)) {
        return false;
    }

    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, cs) != 0) {
        g_free(luks);
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: out of memory");
        return false;
    }
    int r = 0;

    /* header */
    memset(buf, 0, cs);
    qput32(buf, QCOW2_MAGIC);
    qput32(buf + 4, p.version);
    qput32(buf + 20, p.cluster_bits);
    qput64(buf + 24, p.size);
    qput32(buf + 36, (uint32_t)l1_size);
    qput64(buf + 40, l1_off);
    qput64(buf + 48, rt_off);
    qput32(buf + 56, (uint32_t)rt_clusters);
    uint32_t off = 72;
    if (p.version >= 3) {
        uint64_t incompat = (p.ctype ? QCOW2_INCOMPAT_COMPRESSION : 0) | (p.extl2 ? QCOW2_INCOMPAT_EXTL2 : 0);
        qput64(buf + 72, incompat);
        qput64(buf + 80, p.lazy ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0);
        qput32(buf + 96, p.refcount_order);
        qput32(buf + 100, 112);
        buf[104] = p.ctype;
        off = 112;
    }
    if (p.backing && p.backing_fmt) {
        size_t len = strlen(p.backing_fmt);
        qput32(buf + off, QCOW2_EXT_BACKING_FORMAT);
        qput32(buf + off + 4, (uint32_t)len);
        memcpy(buf + off + 8, p.backing_fmt, len);
        off += 8 + (uint32_t)((len + 7) & ~7u);
    }
    if (luks) {
        qput32(buf + 32, 2); /* crypt_method: LUKS */
        qput32(buf + off, QCOW2_EXT_CRYPTO);
        qput32(buf + off + 4, 16);
        qput64(buf + off + 8, crypt_off);
        qput64(buf + off + 16, luks_len);
        off += 24;
    }
    if (p.version >= 3) {
        static const struct {
            uint8_t type, bit;
            const char *name;
        } feats[] = {
            {0, 0, "dirty bit"},      {0, 1, "corrupt bit"},         {0, 2, "external data file"},
            {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
            {2, 0, "bitmaps"},        {2, 1, "raw external data"},
        };
        uint32_t len = (uint32_t)(G_N_ELEMENTS(feats) * 48);
        if (off + 8 + len + 8 <= cs) {
            qput32(buf + off, QCOW2_EXT_FEATURE_TABLE);
            qput32(buf + off + 4, len);
            for (size_t i = 0; i < G_N_ELEMENTS(feats); i++) {
                put_feature(buf + off + 8 + i * 48, feats[i].type, feats[i].bit, feats[i].name);
            }
            off += 8 + len;
        }
    }
    off += 8; /* end of extensions */
    if (p.backing) {
        size_t len = strlen(p.backing);
        if (off + len > cs) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: the backing file name does not fit in the header cluster");
            free(buf);
            g_free(luks);
            return false;
        }
        qput64(buf + 8, off);
        qput32(buf + 16, (uint32_t)len);
        memcpy(buf + off, p.backing, len);
        off += (uint32_t)len;
    }
    r = vdk_file_pwrite_sync(f, buf, (size_t)vdk_align_up(off, 512), 0);

    /* refcount table */
    for (uint64_t c = 0; c < rt_clusters && r == 0; c++) {
        memset(buf, 0, cs);
        for (uint64_t i = 0; i < cs / 8; i++) {
            uint64_t idx = c * (cs / 8) + i;
            if (idx < rb_count) {
                qput64(buf + i * 8, rb_off + idx * cs);
            }
        }
        r = vdk_file_pwrite_sync(f, buf, cs, rt_off + c * cs);
    }
    /* refcount blocks: every cluster up to `total` is in use once */
    for (uint64_t b = 0; b < rb_count && r == 0; b++) {
        memset(buf, 0, cs);
        for (uint64_t i = 0; i < rb_entries; i++) {
            uint64_t c = b * rb_entries + i;
            if (c >= total) {
                break;
            }
            uint64_t bit = i << p.refcount_order;
            uint32_t w = 1u << p.refcount_order;
            if (w >= 8) {
                buf[bit / 8 + w / 8 - 1] = 1; /* big endian 1 */
            } else {
                buf[bit / 8] |= (uint8_t)(1u << (bit % 8));
            }
        }
        r = vdk_file_pwrite_sync(f, buf, cs, rb_off + b * cs);
    }
    /* L1 (pointing at the preallocated L2 tables, if any) */
    for (uint64_t c = 0; c < l1_clusters && r == 0; c++) {
        memset(buf, 0, cs);
        for (uint64_t i = 0; i < cs / 8; i++) {
            uint64_t idx = c * (cs / 8) + i;
            if (idx < l2_tables) {
                qput64(buf + i * 8, (l2_off + idx * cs) | QCOW2_OFLAG_COPIED);
            }
        }
        uint64_t len = MIN(cs, vdk_align_up(l1_size * 8 - MIN(l1_size * 8, c * cs), 512));
        if (len) {
            r = vdk_file_pwrite_sync(f, buf, len, l1_off + c * cs);
        }
    }
    /* LUKS header and key material */
    if (luks && r == 0) {
        r = vdk_file_pwrite_sync(f, luks, luks_len, crypt_off);
        if (r == 0 && crypt_off + crypt_clusters * cs > crypt_off + luks_len) {
            /* the file covers every cluster the refcounts count */
            memset(buf, 0, cs);
            uint64_t tail = crypt_off + luks_len;
            r = vdk_file_pwrite_sync(f, buf, (size_t)(crypt_off + crypt_clusters * cs - tail), tail);
        }
    }
    if (luks) {
        memset(luks, 0, luks_len);
        g_free(luks);
    }
    /* L2 tables mapping every cluster to the data area */
    for (uint64_t t = 0; t < l2_tables && r == 0; t++) {
        memset(buf, 0, cs);
        for (uint64_t i = 0; i < l2_entries; i++) {
            uint64_t c = t * l2_entries + i;
            if (c >= clusters) {
                break;
            }
            /* extended L2: the subclusters stay "unallocated" (bitmap 0, as
             * qemu does): they read from the backing file, or as zeroes,
             * until written, and writes fill the reserved space in place */
            qput64(buf + i * l2_entry, (data_off + c * cs) | QCOW2_OFLAG_COPIED);
        }
        r = vdk_file_pwrite_sync(f, buf, cs, l2_off + t * cs);
    }
    free(buf);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot write the new image: %s", g_strerror(-r));
        return false;
    }
    /* data area: sparse (metadata), reserved (falloc) or zeroed (full) */
    VdkPrealloc mode = p.prealloc == VDK_PREALLOC_METADATA ? VDK_PREALLOC_OFF : p.prealloc;
    if (prealloc && end > f->size) {
        if (!vdk_file_truncate(f, data_off, VDK_PREALLOC_OFF, error) || !vdk_file_truncate(f, end, mode, error)) {
            return false;
        }
    }
    return true;
}
