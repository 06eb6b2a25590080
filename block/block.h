/* SPDX-License-Identifier: MIT */
/*
 * block.h - the block layer's internal types: host files, format nodes,
 * requests and queues, and the contract format drivers implement.
 *
 * Layering (see DESIGN.md):
 *   VdkImage   what the user opened: a chain of nodes plus options.
 *   VdkNode    one layer of the chain: a format driver instance over a file
 *              (and a backing node, for formats that have one).
 *   VdkFile    a host file or block device: fd, O_DIRECT alignment, the
 *              bounce/read-modify-write machinery.
 *   VdkQueue   per-thread request machinery on top of one engine context.
 *
 * A request is split by the node's map() into extents.  DATA extents become
 * engine operations on a file (children), ZERO extents are filled in
 * memory, UNALLOC extents are read from the backing node (or zero-filled).
 */
#ifndef VDK_BLOCK_H
#define VDK_BLOCK_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include <glib.h>

#include "io/io.h"
#include "vdk/vdk.h"

typedef struct VdkFile VdkFile;
typedef struct VdkNode VdkNode;
typedef struct VdkFormat VdkFormat;
typedef struct VdkRequest VdkRequest;
typedef struct VdkChild VdkChild;
typedef struct VdkOptionDesc VdkOptionDesc;
typedef struct VdkInfo VdkInfo;
typedef struct VdkCheckResult VdkCheckResult;
typedef struct VdkCipher VdkCipher;

/* An encrypted node's data cipher (block/crypt-io.c). */
typedef struct VdkNodeCrypt {
    VdkCipher *cipher; /* owned */
    bool host_iv;      /* IVs count host sectors (qcow2 LUKS), else guest sectors */
    GMutex lock;
    GThreadPool *pool; /* cipher workers, created at first use */
} VdkNodeCrypt;

/* Requests larger than this are refused with -EINVAL (NBD's and virtio's
 * usual limits are far below; it bounds bounce-buffer allocations). */
#define VDK_MAX_REQUEST_BYTES (1ULL << 30)
/* Longest backing chain followed (qemu has no fixed limit; a loop or a
 * hostile chain must not exhaust fds or stack). */
#define VDK_MAX_CHAIN_DEPTH 64

typedef enum {
    VDK_CACHE_WRITEBACK = 0,
    VDK_CACHE_NONE,
    VDK_CACHE_WRITETHROUGH,
    VDK_CACHE_DIRECTSYNC,
    VDK_CACHE_UNSAFE,
} VdkCacheMode;

struct VdkOpenOptions {
    char *format;
    bool read_only;
    VdkCacheMode cache;
    char *engine; /* NULL = auto */
    bool repair;  /* "repair": a corrupt image may be opened read-write to fix it */
    bool check;   /* "check": opened to be checked: inconsistencies the check
                   * reports do not refuse the open */
    bool force_share; /* "force-share": read-only, no image locks checked or taken */
    bool no_io;       /* "no-io": only metadata is looked at (info): an
                       * encrypted image opens without its key */
    VdkLocking locking; /* "locking" ("file.locking"): on, off, auto */
    char *bad_locking;  /* an invalid "locking" value, refused by the open */
    bool rebase_force_share; /* "rebase.force-share": rebase's new backing file, -U */
    GHashTable *extra; /* key -> value, driver options */
    GHashTable *secrets; /* secret id -> GBytes (passphrases; never logged) */
};

/* The secret named @id in @secrets (NULL table or unknown id: NULL). */
GBytes *vdk_secret_lookup(GHashTable *secrets, const char *id);

const char *vdk_cache_mode_name(VdkCacheMode mode);
bool vdk_cache_mode_parse(const char *s, VdkCacheMode *out, GError **error);

/* ------------------------------------------------------------------------ */
/* Host files                                                                */
/* ------------------------------------------------------------------------ */

struct VdkFile {
    int fd;
    int buffered_fd;      /* lazily opened non-O_DIRECT twin, for the unaligned EOF tail */
    char *filename;
    bool read_only;
    bool direct;          /* O_DIRECT */
    bool dsync;           /* writes durable at completion (O_DSYNC) */
    bool no_flush;        /* cache=unsafe */
    bool is_blockdev;
    uint32_t buf_align;   /* memory alignment for I/O buffers (1 when buffered) */
    uint32_t req_align;   /* offset/length alignment (1 when buffered) */
    uint32_t logical_block_size; /* block devices: BLKSSZGET; else 512 */
    gint zero_range_state;  /* 0 unknown, 1 works, -1 unsupported */
    gint punch_hole_state;
    uint64_t size;          /* current length (tracked across writes) */
    int flush_error;        /* a failed fdatasync: every later flush fails too */
    /* In-flight writes on direct files, for read-modify-write serialisation. */
    GMutex lock;
    VdkChild *tracked;
};

/* Open @filename.  @flags: O_RDONLY or O_RDWR (plus O_CREAT etc. not
 * allowed).  The cache mode picks O_DIRECT / O_DSYNC; alignment is probed. */
VdkFile *vdk_file_open(const char *filename, bool read_only, VdkCacheMode cache, GError **error);
/* Wrap an fd the caller owns from now on (used by create). */
VdkFile *vdk_file_new_from_fd(int fd, const char *filename, bool read_only, VdkCacheMode cache,
                              GError **error);
void vdk_file_close(VdkFile *f);
/*
 * Image locking, compatible with QEMU's: OFD locks on single bytes of the
 * file, 100 + n for "uses permission n" and 200 + n for "does not share
 * permission n" (n: 0 consistent read, 1 write, 3 resize).  A writer uses
 * read, write and resize, a reader read; @unshare (VDK_LOCK_*) is what the
 * opener does not let others do.  Conflicts give "image is in use by
 * another process".  Where the file system has no OFD locks the file stays
 * unlocked, or with @required the call fails (ENOTSUP).
 */
enum { VDK_LOCK_WRITE = 1u << 1, VDK_LOCK_RESIZE = 1u << 3 };
/* What QEMU does not share on a file holding metadata (qcow2, vdi, sparse
 * vmdk, the file of a raw writer): write and resize.  A raw reader shares
 * both (0); a vmdk flat extent (data only) shares write, not resize. */
#define VDK_LOCK_META (VDK_LOCK_WRITE | VDK_LOCK_RESIZE)
bool vdk_file_lock(VdkFile *f, bool write, unsigned unshare, bool required, GError **error);
/* Whether an image opened with @o checks and takes locks at all. */
static inline bool
vdk_open_options_locks(const VdkOpenOptions *o)
{
    return !o->force_share && o->locking != VDK_LOCKING_OFF;
}
/* Drop this file's image locks (before this process reopens it to write). */
void vdk_file_unlock(VdkFile *f);
/* Current length (BLKGETSIZE64 for devices), refreshed from the kernel. */
bool vdk_file_refresh_size(VdkFile *f, GError **error);
/* Bytes allocated on the host. */
uint64_t vdk_file_allocated_bytes(VdkFile *f);
/* The descriptor an engine operation on [off, off+len) with a 4 KiB
 * aligned buffer can use: the file's own, or its buffered twin when
 * O_DIRECT alignment does not allow it.  -1 on failure. */
int vdk_file_fd_for(VdkFile *f, uint64_t off, uint64_t len);
/* Synchronous helpers for control paths (open/create/resize). */
int vdk_file_pread_sync(VdkFile *f, void *buf, size_t len, uint64_t off);
int vdk_file_pwrite_sync(VdkFile *f, const void *buf, size_t len, uint64_t off);
int vdk_file_flush_sync(VdkFile *f);
bool vdk_file_truncate(VdkFile *f, uint64_t size, VdkPrealloc prealloc, GError **error);
/* SEEK_DATA/SEEK_HOLE: is @off in data; *pnum = bytes with that status
 * (bounded by @len).  Returns 1 data, 0 hole, -errno. */
int vdk_file_seek_status(VdkFile *f, uint64_t off, uint64_t len, uint64_t *pnum);

/* ------------------------------------------------------------------------ */
/* Format drivers                                                            */
/* ------------------------------------------------------------------------ */

typedef enum {
    VDK_EXT_DATA = 1,   /* bytes at ext->file + ext->host_offset */
    VDK_EXT_ZERO,       /* reads as zeroes in this layer */
    VDK_EXT_UNALLOC,    /* not in this layer: backing node, or zero without one */
    VDK_EXT_COMPRESSED, /* read, decompress a unit, copy the part asked for */
    VDK_EXT_ALLOC,      /* (writes) needs allocation: see VdkAlloc */
} VdkExtentKind;

typedef struct VdkAlloc VdkAlloc;

typedef struct VdkExtent {
    uint8_t kind;
    bool host_valid;  /* ZERO extents: host_offset/file are meaningful (map output) */
    bool recurse;     /* block status of DATA: holes in the file read as zeroes (ask it) */
    uint64_t len;     /* guest bytes covered, from the offset asked, >= 1 */
    VdkFile *file;
    uint64_t host_offset;
    /* COMPRESSED: the compressed unit holding the range */
    uint64_t comp_len;    /* bytes to read at host_offset (may include slack) */
    uint64_t unit_offset; /* guest offset of the unit's first byte */
    uint32_t unit_size;   /* bytes the unit decompresses to */
    /* ALLOC */
    VdkAlloc *alloc;
} VdkExtent;

/*
 * An allocating write, planned by the driver's map(VDK_MAP_WRITE) and
 * carried out by the block layer:
 *   1. if @cow, the parts of [guest_start, guest_end) outside the request's
 *      bytes are read through the node as it is now (backing file, old
 *      cluster, compressed data or zeroes) into bounce buffers;
 *   2. one write puts head + the request's bytes + tail at host_offset
 *      (without @cow only the request's bytes are written, at
 *      host_offset + (offset - guest_start): the rest of the new space
 *      already reads as zeroes or keeps data that stays valid);
 *   3. the driver's alloc_done() is called with the outcome and makes the
 *      new mapping visible (or releases the reservation on error).
 * The driver keeps the VdkAlloc alive until alloc_done() and makes other
 * writes to the same guest range wait for it.
 */
struct VdkAlloc {
    uint64_t guest_start, guest_end;
    VdkFile *file;
    uint64_t host_offset;
    bool cow;
    /* when set, these bytes (a compressed cluster) are written at
     * host_offset instead of the request's, without copy-on-write */
    const void *payload;
    size_t payload_len;
    /* when prezero_len is set, [prezero_off, +prezero_len) is new space the
     * write covers only in part: it is allocated as zeroes in one go
     * first (fallocate), so the data writes that follow do not each extend
     * the file.  Best effort: a filesystem that cannot is not an error. */
    uint64_t prezero_off, prezero_len;
    void *opaque; /* driver */
};

/* map() flags */
enum {
    VDK_MAP_WRITE = 1u << 0, /* the caller will write the range */
};

/* map() and the stepped driver hooks return this (positive) when they had
 * to wait for metadata: the driver keeps the request and calls
 * vdk_request_resume() when the step can be retried. */
#define VDK_WAIT 1
/* write_compressed(): the data does not compress; write it normally. */
#define VDK_NOT_COMPRESSIBLE 2

/* Option descriptions (create options, -o help). */
typedef enum {
    VDK_OPT_SIZE,
    VDK_OPT_BOOL,
    VDK_OPT_STRING,
    VDK_OPT_NUMBER,
} VdkOptType;

struct VdkOptionDesc {
    const char *name;
    VdkOptType type;
    const char *help;
    const char *def; /* default shown by -o help, or NULL */
    bool show;       /* create: qemu-img's "Formatting" line shows the default when not given */
};

/* Create: the block layer gives the driver temporary files that become
 * visible under their final names only when the whole create succeeds. */
typedef struct VdkCreateCtx VdkCreateCtx;
struct VdkCreateOptions {
    const VdkFormat *drv;
    GHashTable *kv;     /* key -> value as given */
    GPtrArray *order;   /* keys in the order given, for the "Formatting" line */
    bool overwrite;
    bool no_backing_open; /* qemu-img create -u */
    GHashTable *secrets;  /* secret id -> GBytes (encrypt.key-secret) */
};
/* Where a backing name recorded in @image points: absolute names as they
 * are, relative ones joined textually to @image's directory (as qemu). */
char *vdk_backing_path(const char *image, const char *backing_name);
/* Checks the backing file of a create (see vdk_create_options_check_backing);
 * *size gets its size when @size is not NULL. */
bool vdk_create_backing_probe(const VdkCreateOptions *o, const char *filename, uint64_t *size, GError **error);
/* The option's value or NULL. */
const char *vdk_create_opt(const VdkCreateOptions *o, const char *key);
bool vdk_create_opt_size(const VdkCreateOptions *o, const char *key, uint64_t *out, bool *present,
                         GError **error);
bool vdk_create_opt_bool(const VdkCreateOptions *o, const char *key, bool def, bool *out, GError **error);
bool vdk_create_opt_prealloc(const VdkCreateOptions *o, VdkPrealloc *out, GError **error);
/* The main file being created (already open, empty, under a temporary
 * name or unnamed); for an existing block device, the device itself. */
VdkFile *vdk_create_main_file(VdkCreateCtx *cc);
const char *vdk_create_filename(VdkCreateCtx *cc);
/* A further file of a multi-file image (vmdk extents): @name is a plain
 * file name in the main file's directory.  It is built like the main file
 * (unnamed or hidden until the create succeeds) and published just before
 * it; a failed create leaves neither. */
VdkFile *vdk_create_extra_file(VdkCreateCtx *cc, const char *name, GError **error);
/* Measuring: bytes of @src's data, each @unit-sized unit holding data
 * counted whole once (qemu's rule: zero ranges and unallocated ones are
 * free, data ranges are rounded out to whole units). */
bool vdk_measure_allocated(VdkImage *src, uint64_t unit, uint64_t *out, GError **error);
/* Free bytes on the filesystem that will hold the image. */
bool vdk_create_check_space(VdkCreateCtx *cc, uint64_t need, GError **error);

/* Format-specific information for `info`. */
/* qemu-img check's counters (and JSON keys). */
typedef struct VdkCheckResult {
    uint64_t corruptions, leaks, check_errors;
    uint64_t corruptions_fixed, leaks_fixed;
    uint64_t image_end_offset;
    uint64_t total_clusters, allocated_clusters, fragmented_clusters, compressed_clusters;
    bool has_stats;
    GPtrArray *messages; /* one line per problem, in qemu-img's wording */
} VdkCheckResult;


struct VdkInfo {
    uint64_t cluster_size; /* 0: none */
    bool encrypted;
    bool dirty;
    char *backing_filename;
    char *backing_format;
    /* JSON object text for "format-specific" "data" (NULL: none) and the
     * same as (key, value) text lines for the human output. */
    GString *specific_json;
    GPtrArray *specific_lines;
};

struct VdkFormat {
    const char *name;
    /* 0 = not this format, higher = more certain; raw returns 1. */
    int (*probe)(const uint8_t *buf, size_t len, const char *filename);
    /* Open: n->file is open; set n->size, n->opaque, and n->backing_name /
     * n->backing_fmt when the image has a backing file (the block layer
     * opens it).  Blocking (control path). */
    bool (*open)(VdkNode *n, GError **error);
    /* Free n->opaque.  Dirty metadata was written back before (a final
     * flush, VDK_FLUSH_FINAL, ran through flush()).  Blocking. */
    bool (*close)(VdkNode *n, GError **error);
    /*
     * map: translate the guest range [offset, offset+len) (len >= 1, inside
     * the node) into its first extent.  Called on the queue's thread; must
     * not block.  Returns 0 with *ext filled (ext->len <= len), VDK_WAIT
     * after parking @r on metadata being loaded (then @r is resumed), or
     * -errno.  @r is NULL for callers that cannot wait (they get -EAGAIN).
     * With VDK_MAP_WRITE the extent is DATA (write in place) or ALLOC.
     */
    int (*map)(VdkNode *n, uint64_t offset, uint64_t len, unsigned flags, VdkExtent *ext, VdkRequest *r);
    /* ALLOC extents: the data and copy-on-write are written (err = 0) or
     * failed (err < 0); @q is the queue running this (for wake-ups). */
    void (*alloc_done)(VdkNode *n, VdkAlloc *a, int err, VdkQueue *q);
    /*
     * write_compressed: plan a compressed write of the cluster at @offset,
     * whose bytes the driver copies from @r (vdk_req_copy_out) and
     * compresses.  Returns 0 with an ALLOC extent whose payload is the
     * compressed data, VDK_NOT_COMPRESSIBLE with ext->len = the unit it
     * looked at (the block layer writes that much normally and tries the
     * next unit again), VDK_WAIT, or -errno.  NULL: -ENOTSUP.
     */
    int (*write_compressed)(VdkNode *n, VdkRequest *r, uint64_t offset, uint64_t len, VdkExtent *ext);
    /* COMPRESSED extents: decompress @in into exactly @out_len bytes. */
    int (*decompress)(VdkNode *n, const void *in, size_t in_len, void *out, size_t out_len);
    /*
     * block_status: like map for reading, but may cost a syscall (raw asks
     * SEEK_DATA/SEEK_HOLE) and distinguishes holes as ZERO with host_valid.
     * NULL: map() is used.
     */
    int (*block_status)(VdkNode *n, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r);
    /*
     * discard / write_zeroes: stepped like map.  Work from r->cursor to the
     * end of the request, advancing r->cursor, issuing file operations
     * (vdk_req_file_*) as needed; return 0 when all is issued, VDK_WAIT
     * when parked, or -errno.  NULL: discard is a no-op and write_zeroes is
     * emulated by writing zero buffers (so is -ENOTSUP from write_zeroes).
     */
    int (*discard)(VdkNode *n, VdkRequest *r);
    int (*write_zeroes)(VdkNode *n, VdkRequest *r);
    /*
     * flush: write back dirty metadata and make everything durable,
     * including the node's own fdatasync (the block layer syncs files
     * itself only for drivers without this hook).  Issue the work as
     * children and sub-requests of @r; return 0 (the request completes when
     * they do), VDK_WAIT (parked), or -errno.  r->flags & VDK_FLUSH_FINAL:
     * the image is being closed (write everything a clean close needs).
     */
    int (*flush)(VdkNode *n, VdkRequest *r);
    /* Change the virtual size.  Blocking; no I/O in flight. */
    bool (*truncate)(VdkNode *n, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error);
    /* Create an image in the context's main file. */
    bool (*create)(VdkCreateCtx *cc, const VdkCreateOptions *opts, GError **error);
    /* NULL-terminated option tables: create (-o) and open. */
    const VdkOptionDesc *create_opts;
    const VdkOptionDesc *open_opts;
    /* Fill format-specific info. NULL: nothing beyond size. */
    void (*info)(VdkNode *n, VdkInfo *info);
    /* qemu-img check.  NULL: "This image format does not support checks". */
    bool (*check)(VdkNode *n, int fix, VdkCheckResult *res, GError **error);
    /* qemu-img measure: the size of a new image of this format created with
     * @opts, holding @src's content (NULL: empty) of @size guest bytes.
     * Blocking.  NULL: the format cannot measure. */
    bool (*measure)(const VdkCreateOptions *opts, VdkImage *src, uint64_t size, VdkMeasure *out, GError **error);
    /* Internal snapshots (qemu-img snapshot).  Blocking; no I/O in flight;
     * the node is writable for create/apply/delete.  NULL: the format has
     * none (list returns 0). */
    bool (*snapshot_create)(VdkNode *n, const char *name, GError **error);
    bool (*snapshot_apply)(VdkNode *n, const char *name, GError **error);
    bool (*snapshot_delete)(VdkNode *n, const char *name, GError **error);
    /* The snapshots, newly allocated (vdk_snapshot_list_free); the count. */
    int (*snapshot_list)(VdkNode *n, VdkSnapshotInfo **out);
    /* Record another backing file name and format (rebase) durably; NULL
     * or "" name: none.  Blocking; no I/O in flight.  NULL: unsupported. */
    bool (*change_backing)(VdkNode *n, const char *name, const char *fmt, GError **error);
    /* qemu-img amend -o KEY=VALUE... (@kv: key -> value).  Blocking; no
     * I/O in flight.  NULL: the format cannot amend. */
    bool (*amend)(VdkNode *n, GHashTable *kv, GError **error);
    /* Move clusters into holes and cut the file (vdk compact); the file
     * sizes before and after.  Blocking; no I/O in flight.  NULL: not
     * supported. */
    bool (*compact)(VdkNode *n, uint64_t *before, uint64_t *after, GError **error);
    /* Persistent bitmap action (vdk_image_bitmap).  Blocking; no I/O in
     * flight.  NULL: the format has no bitmaps. */
    bool (*bitmap)(VdkNode *n, const VdkBitmapOp *op, GError **error);
    /* The stored bitmaps (vdk_image_list_bitmaps): a count, or -ENOTSUP
     * when this image cannot hold any.  NULL: the format has no bitmaps. */
    int (*bitmap_list)(VdkNode *n, VdkBitmapInfo **out);
    /* Called on every writable node before the final flush of a close
     * (store what the format keeps in memory); may do control-path I/O.
     * NULL: nothing to do. */
    bool (*before_close)(VdkNode *n, GError **error);
};

extern const VdkFormat vdk_format_raw;
extern const VdkFormat vdk_format_qcow2;
extern const VdkFormat vdk_format_vmdk;
extern const VdkFormat vdk_format_qcow;
extern const VdkFormat vdk_format_vdi;

/* Every driver, in probe order. */
extern const VdkFormat *const vdk_formats[];
extern const size_t vdk_formats_count;
const VdkFormat *vdk_format_find(const char *name);

/* ------------------------------------------------------------------------ */
/* Nodes and images                                                          */
/* ------------------------------------------------------------------------ */

struct VdkNode {
    const VdkFormat *drv;
    void *opaque;
    VdkImage *img;
    VdkFile *file;
    VdkNode *backing; /* NULL: unallocated reads as zeroes */
    char *backing_name; /* as recorded in the image (driver sets at open) */
    char *backing_fmt;  /* recorded backing format, or NULL */
    char *filename;
    uint64_t size;    /* guest-visible bytes */
    bool read_only;
    int depth;        /* 0 = top of the chain */
    /* probed raw on a writable open: refuse writes that would change what
     * sector 0 probes as (qemu's rule) */
    bool probed_raw;
    uint8_t sector0[512];
    GMutex lock; /* driver metadata; never held across I/O */
    /* encrypted data (set by the driver at open; see crypt-io.c) */
    VdkNodeCrypt *crypt;
    bool crypt_locked; /* encrypted, opened without its key: no data I/O */
};

struct VdkImage {
    VdkNode *top;
    VdkOpenOptions opts; /* private copy */
    const VdkIoEngine *engine;
    char *engine_reason;
    GMutex sync_lock;
    VdkQueue *sync_q; /* lazily created, for the sync API */
    gint queues;      /* live queues */
};

void vdk_info_clear(VdkInfo *info);

/* ------------------------------------------------------------------------ */
/* Requests and queues                                                       */
/* ------------------------------------------------------------------------ */

typedef enum {
    VDK_OP_READ = 0,
    VDK_OP_WRITE,
    VDK_OP_FLUSH,
    VDK_OP_DISCARD,
    VDK_OP_WRITE_ZEROES,
    VDK_OP_BLOCK_STATUS,
    VDK_OP_NONE, /* internal: only children and sub-requests (vdk_subreq) */
} VdkOp;

/* Flush flags (internal). */
enum {
    VDK_FLUSH_FINAL = 1u << 8, /* closing: write what a clean close needs */
    VDK_FLUSH_EVICT = 1u << 9, /* a metadata cache is full: write it back, even with cache=unsafe */
    /* discard: leave the range unallocated in this layer (the backing file
     * shows through again), the partial cluster at the image's end too
     * (commit empties an overlay with it) */
    VDK_DISCARD_UNALLOC = 1u << 10,
};

#define VDK_REQ_INLINE_IOV 4

typedef void VdkRequestDone(VdkRequest *r);

struct VdkRequest {
    VdkQueue *q;
    VdkNode *node;
    uint8_t op;
    bool user;        /* counts against the queue depth; completes into the CQ */
    bool started;
    uint32_t flags;
    uint64_t offset;
    uint64_t len;
    struct iovec *iov;
    int iovcnt;
    uint64_t user_data;
    VdkBlockStatus *bs_out;
    /* progress */
    uint64_t cursor;  /* next guest byte to dispatch */
    unsigned pending; /* children and sub-requests in flight, +1 while stepping */
    int error;
    /* internal requests: called on completion instead of the CQ */
    VdkRequestDone *done;
    void *done_opaque;
    VdkRequest *parent;
    VdkRequest *next;
    VdkRequest *wait_next; /* on a driver's waiter list while parked */
    bool parked;
    uint32_t phase;        /* block layer's step within the request */
    uint32_t drv_state;    /* the driver's own step (starts at 0) */
    void *driver_data;     /* per-request driver state (driver use) */
    struct iovec iov_inline[VDK_REQ_INLINE_IOV];
    bool iov_heap;
};

/* One engine operation (plus alignment handling) on behalf of a request. */
typedef enum {
    VDK_CHILD_PLAIN = 0,
    VDK_CHILD_BOUNCE_READ,  /* read aligned into bounce, copy out */
    VDK_CHILD_RMW_READ,     /* read head/tail blocks for an unaligned write */
    VDK_CHILD_RMW_WRITE,    /* write the merged bounce */
    VDK_CHILD_ZERO,         /* write_zeroes fallback chain */
    VDK_CHILD_FLUSH,        /* fdatasync; a failure sticks to the file */
} VdkChildKind;

struct VdkChild {
    VdkIoReq io;
    VdkRequest *req;
    VdkFile *file;
    uint8_t kind;
    bool is_write;
    bool tracked;       /* on file->tracked */
    bool exclusive;     /* excludes every overlapping tracked write */
    bool waiting;       /* parked behind an overlapping tracked write */
    uint32_t flags;     /* VDK_REQ_* */
    uint64_t offset;    /* file offset of the caller's bytes */
    uint64_t len;
    uint64_t a_start, a_end; /* aligned range (tracked writes) */
    struct iovec *uiov; /* caller's bytes (slice), for bounce copies */
    int uiovcnt;
    void *bounce;
    unsigned rmw_left;  /* RMW: reads outstanding */
    int zero_step;      /* ZERO: which method is being tried */
    VdkChild *track_next;
    VdkChild *wait_next; /* children waiting on this one */
    VdkChild *waiters;
    VdkChild *next;      /* free list / ready list */
    struct iovec iov_inline[VDK_REQ_INLINE_IOV];
    struct iovec *iov_heap;
    int iov_cap;
};

/* Issue file I/O for request @r (which gains one pending count per call and
 * progresses when it completes).  The iovec slice is copied. */
void vdk_req_file_rw(VdkRequest *r, VdkFile *f, bool is_write, uint64_t offset, const struct iovec *iov,
                     int iovcnt, uint64_t len, uint32_t flags);
void vdk_req_file_discard(VdkRequest *r, VdkFile *f, uint64_t offset, uint64_t len);
void vdk_req_file_zero(VdkRequest *r, VdkFile *f, uint64_t offset, uint64_t len, uint32_t flags);
void vdk_req_file_flush(VdkRequest *r, VdkFile *f);

/* Record an error on @r (the first one wins). */
void vdk_req_set_error(VdkRequest *r, int err);

/*
 * Sub-requests: an internal request of @parent that only groups children
 * (file I/O) and further sub-requests.  @parent waits for it.  When all its
 * work is done, @done(sub) runs (sub->error holds the first error; done may
 * start more work on the parent), then the error passes to the parent.
 * Nothing completes before vdk_subreq_launch(), so work can be added first.
 */
VdkRequest *vdk_subreq(VdkRequest *parent, VdkRequestDone *done, void *opaque);
void vdk_subreq_launch(VdkRequest *sub);
/* Read or write (@op) [off, off+len) of node @n from/into the iovec
 * (copied) on behalf of @parent, through the node's normal path. */
VdkRequest *vdk_request_io_node(VdkRequest *parent, VdkNode *n, VdkOp op, uint64_t off, const struct iovec *iov,
                                int iovcnt, uint64_t len);
/* A request a driver parked (VDK_WAIT) can go on.  @cur is the queue whose
 * thread is running now (NULL if none): the request continues on its own
 * queue's thread either way. */
void vdk_request_resume(VdkRequest *r, VdkQueue *cur);
/* Called when a child or sub-request of @r finishes. */
void vdk_request_child_done(VdkRequest *r);
/* Copy @len bytes of @r's buffers, from guest offset @off, into @buf. */
void vdk_req_copy_out(VdkRequest *r, uint64_t off, void *buf, uint64_t len);
/* Copy between a buffer and an iovec array (from its start). */
void vdk_iov_copy_in(const struct iovec *iov, int cnt, const void *buf, uint64_t len);
void vdk_iov_copy_out(const struct iovec *iov, int cnt, void *buf, uint64_t len);

/* Encrypted nodes (crypt-io.c): the node's cipher takes ownership of
 * @cipher.  Free only with no I/O in flight. */
VdkNodeCrypt *vdk_node_crypt_new(VdkCipher *cipher, bool host_iv);
void vdk_node_crypt_free(VdkNodeCrypt *nc);
/* Like vdk_req_file_rw for an encrypted node's data: decrypt after reading
 * (any alignment), encrypt before writing (whole sectors); the cipher work
 * runs on the node's pool. */
void vdk_crypt_read(VdkRequest *r, VdkFile *f, uint64_t host_off, uint64_t guest_off, const struct iovec *iov, int iovcnt,
                    uint64_t len);
void vdk_crypt_write(VdkRequest *r, VdkFile *f, uint64_t host_off, uint64_t guest_off, const struct iovec *iov, int iovcnt,
                     uint64_t len, uint32_t flags);
/* A write to an encrypted node that does not cover whole sectors: done by
 * read-merge-write of whole sectors (returns true, the request is handed
 * over); false: nothing to do here. */
bool vdk_crypt_write_unaligned(VdkRequest *r);

/* A shared, aligned, read-only buffer of zeroes and its length. */
const void *vdk_zero_buffer(size_t *len);

struct VdkQueue {
    VdkImage *img;
    const VdkIoEngine *engine;
    VdkIoCtx *ctx;
    int efd;
    unsigned depth;
    unsigned outstanding;   /* user requests not yet reaped */
    unsigned unsubmitted;
    VdkRequest *reqs;       /* user request pool [depth] */
    VdkRequest *free_reqs;
    VdkRequest *free_internal;
    VdkRequest *queued_head, **queued_tail;
    VdkCompletion *cq;      /* ring of depth */
    unsigned cq_head, cq_count;
    VdkIoReq *backlog_head, **backlog_tail; /* refused by a full engine batch */
    VdkIoReq *deferred;     /* complete on the next reap (complete_later) */
    unsigned engine_inflight;
    VdkChild *free_children;
    unsigned nchildren;
    VdkChild *ready;        /* children to (re)start on this thread */
    GMutex wake_lock;       /* cross-thread wake-ups */
    VdkChild *woken;
    VdkRequest *woken_reqs; /* resumed from other threads (wake_lock) */
    VdkRequest *ready_reqs; /* resumed on this thread */
    bool in_reap;
    bool fd_exposed;        /* vdk_queue_get_fd() was called */
};

/* Internal requests (sub-requests of a user request, or control-path I/O). */
VdkRequest *vdk_request_new_internal(VdkQueue *q, VdkNode *n, VdkOp op);
void vdk_request_start(VdkRequest *r);

/* Hand an engine operation to the queue's engine (or its backlog). */
void vdk_queue_engine_op(VdkQueue *q, VdkIoReq *io);
/* Complete @io (io->result already set) on the next reap, without I/O. */
void vdk_queue_complete_later(VdkQueue *q, VdkIoReq *io);
/* Run the queue until @r-like conditions hold: used by the sync API. */
int vdk_queue_run_until_idle(VdkQueue *q);

/* Sync helper: run one request to completion on the image's private queue.
 * @flags may include internal flags (VDK_FLUSH_FINAL). */
int vdk_image_sync_request(VdkImage *img, VdkOp op, uint64_t offset, void *buf, uint64_t len, unsigned flags,
                           VdkBlockStatus *bs);

/* ------------------------------------------------------------------------ */
/* Small utilities                                                           */
/* ------------------------------------------------------------------------ */

/* "1 GiB", "1.07 MiB", "0 B" (qemu-img's human sizes: 3 significant
 * digits in the largest binary unit that keeps the number below 1000). */
char *vdk_size_to_str(uint64_t val);

static inline bool
vdk_add_overflows(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_add_overflow(a, b, out);
}

static inline bool
vdk_mul_overflows(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}

static inline uint64_t
vdk_align_down(uint64_t v, uint64_t a)
{
    return v - (v % a);
}

static inline uint64_t
vdk_align_up(uint64_t v, uint64_t a)
{
    return vdk_align_down(v + a - 1, a);
}

/* true if every byte of @buf is zero (vectorised). */
bool vdk_buffer_is_zero(const void *buf, size_t len);

/* ------------------------------------------------------------------------ */
/* Copy pipeline (convert)                                                   */
/* ------------------------------------------------------------------------ */

typedef enum {
    VDK_COPY_OFFLOAD_AUTO = 0, /* reflink where the filesystem can (raw -> raw) */
    VDK_COPY_OFFLOAD_ON,       /* also copy_file_range per extent (-C) */
    VDK_COPY_OFFLOAD_OFF,      /* always the normal pipeline */
} VdkCopyOffload;

typedef struct VdkCopyParams {
    VdkImage **src;       /* concatenated in order */
    int nsrc;
    VdkImage *dst;        /* at least as large as the sources together */
    uint64_t sparse_size; /* -S: zero runs this long are skipped; 0 = write everything */
    unsigned max_inflight;/* -m: requests in flight (0: default) */
    uint64_t chunk;       /* bytes per request (0: default) */
    bool in_order;        /* writes in source order (no -W) */
    bool target_is_zero;  /* zero ranges need not be written */
    uint64_t rate_limit;  /* bytes per second, 0 = unlimited */
    bool flush;           /* flush the target at the end */
    uint64_t compress_unit; /* -c: write whole units of this size (the target's
                             * cluster size) compressed; 0 = no compression */
    /* Called as bytes complete; returning false cancels the copy
     * (-ECANCELED). */
    bool (*progress)(void *opaque, uint64_t done, uint64_t total);
    void *opaque;
    VdkCopyOffload offload;
    /* out: "reflink", "copy_file_range" or "none" */
    const char *offload_used;
} VdkCopyParams;

/* Copy the sources' guest content into @dst: block status drives the
 * copy (holes are never read), zero runs are skipped or written as
 * write_zeroes, data moves with many requests in flight.  Blocking. */
bool vdk_copy(VdkCopyParams *p, GError **error);
/* copy-offload.c: raw -> raw through the kernel (see there when it
 * applies).  1 done (and flushed as asked), 0 not applicable or refused
 * by the kernel (use the normal path), -1 error (set). */
int vdk_copy_offload(const VdkCopyParams *p, const char **used, GError **error);

/* Probe a buffer holding the first bytes of an image: the best driver. */
const VdkFormat *vdk_probe_format(const uint8_t *buf, size_t len, const char *filename);
/* The name of a non-raw format @buf's first sector belongs to, whether or
 * not this build has a driver for it, or NULL. */
const char *vdk_probe_foreign(const uint8_t *buf, size_t len);

#endif /* VDK_BLOCK_H */
