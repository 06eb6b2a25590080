/* SPDX-License-Identifier: MIT */
/*
 * qcow2.h - internal definitions of the qcow2 driver (see qcow2.c for what
 * is supported).  Layout follows QEMU's docs/interop/qcow2.txt; all
 * on-disk numbers are big endian and are converted at the edges.
 */
#ifndef VDK_QCOW2_H
#define VDK_QCOW2_H

#include <stdbool.h>
#include <stdint.h>

#include "block/block.h"
#include "block/metacache.h"

#define QCOW2_MAGIC 0x514649fbu /* "QFI\xfb" */

/* Limits.  QEMU's are the floor (images it makes must open here):
 * cluster 512 B .. 2 MiB (QEMU's implementation limit), L1 table <= 32 MiB,
 * refcount table <= 8 MiB, <= 65536 snapshots with a table <= 64 MiB,
 * backing file names <= 1023 bytes (the spec), feature names 46 bytes. */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_L1_BYTES (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOT_TABLE (64u << 20)
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_V3_HEADER_MIN 104
/* Virtual sizes up to 2^61 (with 2 MiB clusters; smaller clusters are
 * bounded by the L1 limit): offsets and products stay within int64. */
#define QCOW2_MAX_VIRTUAL_SIZE (1ULL << 61)

/* Header extension types */
#define QCOW2_EXT_END 0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857u
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_EXT_CRYPTO 0x0537be77u
#define QCOW2_EXT_DATA_FILE 0x44415441u

/* Feature bits */
#define QCOW2_INCOMPAT_DIRTY (1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ULL << 4)
#define QCOW2_INCOMPAT_SUPPORTED                                                                              \
    (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ULL << 0)
#define QCOW2_AUTOCLEAR_BITMAPS (1ULL << 0)

/* L1 / L2 / refcount table entries */
#define QCOW2_OFFSET_MASK 0x00fffffffffffe00ULL
#define QCOW2_L1_RESERVED 0x7f000000000001ffULL
#define QCOW2_L2_STD_RESERVED 0x3f000000000001feULL
#define QCOW2_REFT_RESERVED 0x00000000000001ffULL
#define QCOW2_OFLAG_COPIED (1ULL << 63)
#define QCOW2_OFLAG_COMPRESSED (1ULL << 62)
#define QCOW2_OFLAG_ZERO (1ULL << 0)

enum {
    QCOW2_COMPRESSION_ZLIB = 0,
    QCOW2_COMPRESSION_ZSTD = 1,
};

typedef struct Qcow2Snapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint64_t disk_size;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t icount;
    bool has_icount;
    uint32_t extra_len;  /* extra data as stored (kept byte for byte on rewrite) */
    uint8_t *extra;
} Qcow2Snapshot;

typedef struct Qcow2Alloc Qcow2Alloc;
typedef struct Qcow2Crypto Qcow2Crypto;

/* Persistent dirty bitmaps (qcow2-bitmap.c).  Limits: QEMU's (65535
 * bitmaps, a directory of at most 64 MiB, names of at most 1023 bytes,
 * bitmap data of at most 512 MiB, granularity 2^9 .. 2^31). */
#define QCOW2_BM_MAX_BITMAPS 65535
#define QCOW2_BM_MAX_DIR_SIZE (1024u * QCOW2_BM_MAX_BITMAPS)
#define QCOW2_BM_MAX_NAME 1023
#define QCOW2_BM_MAX_TABLE 0x8000000u
#define QCOW2_BM_MAX_PHYS (512ULL << 20)
#define QCOW2_BM_MIN_GRAN_BITS 9
#define QCOW2_BM_MAX_GRAN_BITS 31
#define QCOW2_BM_IN_USE (1u << 0)
#define QCOW2_BM_AUTO (1u << 1)
#define QCOW2_BM_EXTRA_COMPAT (1u << 2)
#define QCOW2_BM_KNOWN_FLAGS 7u

typedef struct Qcow2Bitmap {
    char *name;
    uint32_t flags;           /* as they will be stored */
    uint8_t type;
    uint8_t gran_bits;
    uint64_t table_offset;
    uint32_t table_size;
    uint32_t extra_len;
    uint8_t *extra;           /* kept byte for byte */
    bool usable;              /* vdk can track and rewrite it (granularity 2^9..2^31, no unknown extra data) */
    uint8_t *bits;            /* content in memory (bit i: byte i/8, bit i%8), or NULL: the disk's is current */
    uint64_t nbits;
    bool tracking;            /* enabled: every write sets bits (hot path, atomic) */
    bool rewrite;             /* bits to be stored in new clusters at close */
    bool marked;              /* in use on disk because of this session (cleared by the store) */
} Qcow2Bitmap;

/* Compression of one cluster for a compressed write, run on the pool. */
typedef struct Qcow2 Qcow2;
typedef struct {
    Qcow2 *s;
    VdkRequest *r;
    uint64_t offset; /* guest offset of the cluster */
    uint8_t *in;     /* the cluster's bytes (freed once compressed) */
    uint8_t *out;    /* compressed bytes, or NULL */
    ssize_t clen;    /* their length; 0: does not compress; <0: -errno */
} Qcow2CompJob;
/* Compression threads per image (at most; one per core up to this). */
#define QCOW2_MAX_COMP_THREADS 64

/* Reference-count changes that wait until the metadata that dropped the
 * references is durable (freeing in reverse order of allocation). */
typedef struct {
    uint64_t offset; /* host cluster offset */
    uint32_t count;  /* clusters */
} Qcow2Free;

#define QCOW2_COMP_OPEN 8 /* partly used compressed-data clusters kept */

struct Qcow2 {
    /* Allocating writes whose entries changed in memory (counted at
     * alloc_done), and how many of them a completed sync covers: L2 slices
     * holding newer entries are written only after another sync, so an
     * entry never reaches the disk before the data it points at. */
    uint64_t alloc_gen, synced_gen;
    VdkNode *node;
    VdkFile *file;

    /* header */
    uint32_t version;
    uint32_t cluster_bits;
    uint32_t cluster_size;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_offset;
    uint64_t reftable_offset;
    uint32_t reftable_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t incompatible, compatible, autoclear;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;
    uint8_t *hdr;       /* the header cluster as read (patched in place) */
    uint32_t hdr_used;  /* bytes of it that hold header, extensions, backing name */
    bool hdr_dirty;

    /* derived */
    bool extl2;
    uint32_t l2_entry_size;   /* 8 or 16 */
    uint32_t l2_bits;         /* log2(entries per L2 table) */
    uint64_t l2_entries;
    uint32_t sc_bits;         /* log2(subcluster size) (extended L2) */
    uint32_t refcount_bits;
    uint32_t refblock_bits;   /* log2(entries per refcount block) */
    uint64_t refcount_max;
    uint32_t csize_shift;     /* compressed descriptors */
    uint64_t csize_mask;
    uint64_t coffset_mask;
    bool lazy_refcounts;
    bool has_bitmaps;
    /* LUKS (crypt_method 2): the crypto header extension and the volume */
    bool has_crypt_ext;
    uint64_t crypt_ext_off, crypt_ext_len;
    Qcow2Crypto *crypto;

    /* tables */
    uint64_t *l1;             /* host order */
    uint64_t l1_dirty_lo, l1_dirty_hi; /* dirty index range [lo, hi) */
    uint64_t *reftable;       /* host order */
    uint64_t reftable_size;   /* entries in memory (may exceed the disk table) */
    uint64_t reftable_dirty_lo, reftable_dirty_hi;
    bool reftable_moved;      /* grown: to be written at reftable_offset */
    uint64_t old_reftable_offset;
    uint32_t old_reftable_clusters;
    Qcow2Snapshot *snapshots;

    /* persistent bitmaps: the extension as parsed, the directory as loaded
     * (only with the autoclear bit set, as QEMU), the ones writes update */
    bool bm_ext;
    uint32_t bm_ext_nb;
    uint64_t bm_dir_size, bm_dir_offset;
    Qcow2Bitmap *bitmaps;
    uint32_t nb_bitmaps;
    Qcow2Bitmap **bm_track;
    uint32_t nb_track;
    bool bm_dirty;            /* the directory changes at close */
    bool bm_written;          /* a tracked bitmap got bits (a write) */
    GArray *bm_olds;          /* clusters of removed/cleared bitmaps: freed after the next store */
    char *bm_error;           /* check mode: why the directory did not load */

    VdkMetaCache *l2c;
    VdkMetaCache *rc;
    GHashTable *refblocks;    /* cluster indexes holding refcount blocks */

    /* allocation: at the end of the image (freed clusters are given back
     * to the filesystem by punching holes, not reused) */
    uint64_t next_free;
    uint64_t comp_cluster;    /* cluster holding packed compressed data, or 0 */
    uint64_t comp_used;       /* bytes used in it */
    uint64_t comp_span_next;  /* the cluster right after comp_cluster, allocated
                               * for compressed data that continues into it
                               * (while the old cluster's reference is taken), or 0 */
    /* Earlier packing clusters whose tails are still free: compressed
     * data that fits goes there before a new cluster is taken, so
     * clusters written uncompressed between compressed ones (out of
     * order, from several workers) do not leave their tails unused. */
    struct {
        uint64_t cluster, used;
    } comp_open[QCOW2_COMP_OPEN];
    int comp_nopen;
    Qcow2Alloc *allocs;       /* allocating writes in flight */
    GThreadPool *comp_pool;   /* compressed writes: compression workers (lazy) */
    GArray *frees;            /* Qcow2Free, applied after the next durable flush */

    /* state */
    bool dirty_on_disk;       /* the header says dirty (lazy refcounts) */
    bool corrupt;
    int meta_prealloc;        /* block status: -1 not checked yet, 0 no, 1 yes */
    bool wb_running;
    VdkRequest *wb_waiters;
};

struct Qcow2Alloc {
    VdkAlloc base;
    uint64_t slice_off;       /* L2 slice holding the entries */
    VdkMetaEntry *slice;      /* pinned */
    uint64_t first_index;     /* index of the first entry within the slice */
    uint32_t nclusters;
    bool fresh_host;          /* host clusters allocated for this write */
    bool compressed;          /* payload is a compressed cluster */
    uint64_t comp_entry;      /* its L2 descriptor */
    void *payload;            /* owned */
    uint32_t sc_mask;         /* extended L2: subclusters written (one cluster) */
    uint64_t *old;            /* old L2 entries (first words) */
    VdkRequest *waiters;
    Qcow2Alloc *next;
};

/* ------------------------------------------------------------------------ */
/* Endian helpers                                                            */
/* ------------------------------------------------------------------------ */

static inline uint16_t
qbe16(const uint8_t *p)
{
    return (uint16_t)(((unsigned)p[0] << 8) | p[1]);
}

static inline uint32_t
qbe32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t
qbe64(const uint8_t *p)
{
    return ((uint64_t)qbe32(p) << 32) | qbe32(p + 4);
}

static inline void
qput16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static inline void
qput32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline void
qput64(uint8_t *p, uint64_t v)
{
    qput32(p, (uint32_t)(v >> 32));
    qput32(p + 4, (uint32_t)v);
}

static inline uint64_t
qcow2_align(const Qcow2 *s, uint64_t v)
{
    return (v + s->cluster_size - 1) & ~(uint64_t)(s->cluster_size - 1);
}

/* ------------------------------------------------------------------------ */
/* Cross-file functions                                                      */
/* ------------------------------------------------------------------------ */

/* qcow2.c */
int qcow2_decompress(VdkNode *n, const void *in, size_t in_len, void *out, size_t out_len);
/* Compress one cluster into @out (capacity @out_cap): the size, 0 if it
 * does not shrink, or -errno. */
ssize_t qcow2_compress(const Qcow2 *s, const void *in, size_t in_len, void *out, size_t out_cap);
/* Mark the image corrupt (lock held): no more writes; header updated at
 * the next writeback.  Logs @why once.  Returns -EIO. */
int qcow2_signal_corruption(Qcow2 *s, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
/* Patch the in-memory header fields from the state. */
void qcow2_update_header_buf(Qcow2 *s);
bool qcow2_parse_open(VdkNode *n, Qcow2 *s, GError **error);
bool qcow2_change_backing(VdkNode *n, const char *name, const char *fmt, GError **error);
bool qcow2_rebuild_header(Qcow2 *s, uint32_t version, const char *name, const char *fmt, GError **error);

/* qcow2-refcount.c */
/* Allocate @n contiguous clusters at the end of the image with refcount
 * 1.  Returns the offset, 0 with *ret = VDK_WAIT (r parked) or -errno. */
uint64_t qcow2_alloc_clusters(Qcow2 *s, uint64_t n, VdkRequest *r, int *ret);
/* Refcount of the cluster at @offset (r NULL: load synchronously). */
int qcow2_get_refcount(Qcow2 *s, uint64_t offset, uint64_t *out, VdkRequest *r);
bool qcow2_metadata_preallocated(Qcow2 *s);
/* Add @delta to the refcount of every cluster in [offset, offset+n*cs). */
int qcow2_update_refcount(Qcow2 *s, uint64_t offset, uint64_t n, int64_t delta, VdkRequest *r);
/* Queue a decrement for after the next durable writeback. */
void qcow2_defer_free(Qcow2 *s, uint64_t offset, uint64_t nclusters);
/* Compressed cluster descriptor -> host clusters it touches. */
void qcow2_compressed_range(const Qcow2 *s, uint64_t l2e, uint64_t *off, uint64_t *len);

/* qcow2-cluster.c */
int qcow2_map(VdkNode *n, uint64_t offset, uint64_t len, unsigned flags, VdkExtent *ext, VdkRequest *r);
void qcow2_alloc_done(VdkNode *n, VdkAlloc *a, int err, VdkQueue *q);
int qcow2_block_status(VdkNode *n, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r);
int qcow2_discard(VdkNode *n, VdkRequest *r);
int qcow2_write_zeroes(VdkNode *n, VdkRequest *r);
int qcow2_write_compressed(VdkNode *n, VdkRequest *r, uint64_t offset, uint64_t len, VdkExtent *ext);
void qcow2_comp_reset(Qcow2 *s);
void qcow2_comp_forget(Qcow2 *s, uint64_t cluster);
void qcow2_comp_job_free(Qcow2CompJob *job);
void qcow2_comp_run(Qcow2CompJob *job);
bool qcow2_comp_submit(Qcow2 *s, Qcow2CompJob *job);
/* Read an L2 entry pair (entry, bitmap) from a slice buffer. */
static inline uint64_t
qcow2_l2_get(const Qcow2 *s, const void *slice, uint64_t i, uint64_t *bitmap)
{
    const uint8_t *p = (const uint8_t *)slice + i * s->l2_entry_size;
    if (bitmap) {
        *bitmap = s->extl2 ? qbe64(p + 8) : 0;
    }
    return qbe64(p);
}
static inline void
qcow2_l2_set(const Qcow2 *s, void *slice, uint64_t i, uint64_t entry, uint64_t bitmap)
{
    uint8_t *p = (uint8_t *)slice + i * s->l2_entry_size;
    qput64(p, entry);
    if (s->extl2) {
        qput64(p + 8, bitmap);
    }
}

/* qcow2-flush.c */
int qcow2_flush(VdkNode *n, VdkRequest *r);
/* Start a writeback (eviction) from a queue's thread, lock not held. */
void qcow2_writeback_async(Qcow2 *s, VdkQueue *q);
/* Synchronous writeback for control paths (no I/O in flight). */
int qcow2_writeback_sync(Qcow2 *s, bool final);

/* qcow2-create.c */
bool qcow2_create(VdkCreateCtx *cc, const VdkCreateOptions *opts, GError **error);
bool qcow2_measure(const VdkCreateOptions *o, VdkImage *src, uint64_t size, VdkMeasure *m, GError **error);
/* @img's top layer is a qcow2 v3 image (it can hold persistent bitmaps). */
bool qcow2_image_supports_bitmaps(VdkImage *img);
extern const VdkOptionDesc qcow2_create_opts[];

/* qcow2-snapshot.c */
/* Control-path helpers (snapshot, compact): called with the node lock held;
 * when a metadata cache is full of dirty entries they drop the lock, flush
 * (VDK_FLUSH_EVICT) and retry.  qcow2_ctl_flush() itself drops the lock
 * around a full flush. */
int qcow2_ctl_flush(Qcow2 *s);
int qcow2_ctl_refcount(Qcow2 *s, uint64_t off, uint64_t n, int64_t delta);
int qcow2_ctl_get_refcount(Qcow2 *s, uint64_t off, uint64_t *rc);
VdkMetaEntry *qcow2_ctl_slice(Qcow2 *s, uint64_t off, int *ret);
uint64_t qcow2_ctl_alloc(Qcow2 *s, uint64_t nclusters, int *ret);
bool qcow2_snapshot_create(VdkNode *n, const char *name, GError **error);
bool qcow2_snapshot_apply(VdkNode *n, const char *name, GError **error);
bool qcow2_snapshot_delete(VdkNode *n, const char *name, GError **error);
int qcow2_snapshot_list(VdkNode *n, VdkSnapshotInfo **out);
void qcow2_snapshots_free(Qcow2 *s);
/* A snapshot's L1 table, validated, in host order (g_free). */
uint64_t *qcow2_snapshot_load_l1(Qcow2 *s, const Qcow2Snapshot *sn, GError **error);

/* qcow2-bitmap.c */
/* Load and validate the bitmap directory (autoclear bit set) into
 * s->bitmaps; a clear one-line error for anything malformed. */
bool qcow2_bitmaps_load(Qcow2 *s, GError **error);
/* Read-write open: track the enabled bitmaps in memory and mark them
 * in use on disk (synced) before any write; clear autoclear bits vdk does
 * not maintain.  May set s->hdr_dirty. */
bool qcow2_bitmaps_open_rw(Qcow2 *s, GError **error);
/* Closing: write the tracked/changed bitmaps to new clusters, a new
 * directory, switch the header, free the old clusters. */
bool qcow2_bitmaps_store(VdkNode *n, GError **error);
void qcow2_bitmaps_free(Qcow2 *s);
/* measure: bytes the source's bitmaps need in an image of @cs clusters
 * (qemu's estimate: every bitmap cluster allocated, tables, directory). */
uint64_t qcow2_bitmaps_measure(VdkImage *src, uint64_t cs);
void qcow2_bitmaps_info(Qcow2 *s, GString *json, GPtrArray *lines);
bool qcow2_bitmap_op(VdkNode *n, const VdkBitmapOp *op, GError **error);
int qcow2_bitmap_list(VdkNode *n, VdkBitmapInfo **out);
/* Every tracked bitmap covers [off, off+len) as dirty. */
void qcow2_bitmaps_mark_slow(Qcow2 *s, uint64_t off, uint64_t len);
static inline void
qcow2_bitmaps_mark(Qcow2 *s, uint64_t off, uint64_t len)
{
    if (G_UNLIKELY(s->nb_track)) {
        qcow2_bitmaps_mark_slow(s, off, len);
    }
}
/* The bitmaps make the image refuse an operation (resize, compact):
 * error set, true. */
bool qcow2_bitmaps_block(Qcow2 *s, const char *what, GError **error);
/* Driver slots wrapping resize and snapshot apply for the bitmaps. */
bool qcow2_truncate_bitmaps(VdkNode *n, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error);
bool qcow2_snapshot_apply_bitmaps(VdkNode *n, const char *name, GError **error);

/* qcow2-check.c */
bool qcow2_check(VdkNode *n, int fix, VdkCheckResult *res, GError **error);
/* New refcount structure with entries of 2^@order bits (amend). */
bool qcow2_change_refcount_width(Qcow2 *s, uint32_t order, GError **error);
/* qcow2-compact.c */
bool qcow2_compact(VdkNode *n, uint64_t *before, uint64_t *after, GError **error);
/* qcow2-amend.c */
bool qcow2_amend(VdkNode *n, GHashTable *kv, GError **error);
/* Rebuild refcounts from the L1/L2 tables (lazy-refcount repair). */
bool qcow2_repair_refcounts(Qcow2 *s, GError **error);

/* qcow2-crypto.c */
bool qcow2_crypto_open(VdkNode *n, Qcow2 *s, GError **error);
void qcow2_crypto_close(Qcow2 *s);
void qcow2_crypto_info(Qcow2 *s, GString *json, GPtrArray *lines);
/* The LUKS header area a create asks for (none: *region NULL). */
bool qcow2_crypto_create_region(const VdkCreateOptions *o, uint8_t **region, size_t *len, GError **error);
bool qcow2_crypto_amend_wanted(GHashTable *kv);
bool qcow2_crypto_measure(const VdkCreateOptions *o, uint64_t cluster_size, uint64_t *bytes, GError **error);
bool qcow2_crypto_amend(VdkNode *n, GHashTable *kv, GError **error);

/* qcow2-resize */
bool qcow2_truncate(VdkNode *n, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error);

#endif
