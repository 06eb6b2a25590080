/* SPDX-License-Identifier: MIT */
/*
 * vdk.h - the public API of libvdk, the virtual disk kit.
 *
 * libvdk opens disk images (raw, qcow2, vdi, vmdk; legacy qcow read-only)
 * and moves data in and out of them through an asynchronous queue backed by
 * io_uring, libaio or a thread pool; vdk_queue_source_new() puts a queue in
 * a GLib main loop.  A reference generated from this header: docs/api.md.  It is meant to sit under a
 * VMM's virtio-blk device, a storage daemon or a conversion tool.
 *
 * Threading model
 *   - A VdkImage may be shared by several threads.  Control-path calls on one
 *     image (resize, close, info getters) must not race with each other.
 *   - A VdkQueue belongs to one thread at a time: every vdk_queue_* call for
 *     a given queue must come from the same thread (or be externally
 *     serialised).  Create one queue per thread / per virtqueue.
 *   - The sync calls (vdk_image_pread() ...) run on a private queue owned by
 *     the image and serialise with each other; they are convenience calls for
 *     control paths and tools, not for a VMM's hot path.
 *
 * Errors
 *   - Control-path calls take a GError ** last and return bool / pointer.
 *     Errors are in the VDK_ERROR domain with a positive errno value as code;
 *     messages start with the module ("raw: ...", "io_uring: ...").
 *   - Data-path calls return 0 / -errno and never allocate per request for
 *     the common case.
 *
 * Completion contract (the liburing / libblkio model)
 *   - vdk_queue_readv() and friends only queue a request; nothing reaches
 *     the kernel until vdk_queue_submit().  They return -EAGAIN when the
 *     queue already holds `depth` requests that were not yet reaped.
 *   - vdk_queue_get_fd() is an eventfd; it becomes readable when
 *     vdk_queue_reap() may have something to do.  vdk_queue_reap() never
 *     blocks, clears the fd before harvesting, and is the only place
 *     completions appear (never from inside submit).
 *   - Buffers stay owned by the caller until the request is reaped.  The
 *     iovec array itself is copied at queue time and may be reused at once.
 */
#ifndef VDK_VDK_H
#define VDK_VDK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <glib.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define VDK_API __attribute__((visibility("default")))
#else
#define VDK_API
#endif

#define VDK_VERSION_MAJOR 0
#define VDK_VERSION_MINOR 1
#define VDK_VERSION_MICRO 0

/** The library's version string, e.g. "0.1.0". */
VDK_API const char *vdk_version(void);

/** Error domain of every GError set by libvdk; codes are positive errno values. */
#define VDK_ERROR (vdk_error_quark())
VDK_API GQuark vdk_error_quark(void);

typedef struct VdkImage VdkImage;
typedef struct VdkQueue VdkQueue;
typedef struct VdkOpenOptions VdkOpenOptions;
typedef struct VdkCreateOptions VdkCreateOptions;

/* ------------------------------------------------------------------------ */
/* Open options                                                              */
/* ------------------------------------------------------------------------ */

/**
 * vdk_open_options_new: options for vdk_image_open(), all at their defaults:
 * format probed, read-write, cache "writeback", engine "auto".
 * Free with vdk_open_options_free().
 */
VDK_API VdkOpenOptions *vdk_open_options_new(void);
VDK_API void vdk_open_options_free(VdkOpenOptions *opts);

/**
 * vdk_open_options_set_format: the image's format ("raw", ...), or NULL to
 * probe.  Probing never picks raw for a writable open without restricting
 * writes to the first sector (see vdk_image_open()).
 */
VDK_API void vdk_open_options_set_format(VdkOpenOptions *opts, const char *format);

/** vdk_open_options_set_read_only: open without write access. */
VDK_API void vdk_open_options_set_read_only(VdkOpenOptions *opts, bool read_only);

/**
 * vdk_open_options_set_cache: qemu's cache modes.
 *   "writeback"    page cache; flush = fdatasync (the default)
 *   "none"         O_DIRECT; flush = fdatasync
 *   "writethrough" page cache; every write durable on completion
 *   "directsync"   O_DIRECT and every write durable on completion
 *   "unsafe"       page cache; flush does nothing
 * Returns false with an error naming the value if it is not one of these.
 */
VDK_API bool vdk_open_options_set_cache(VdkOpenOptions *opts, const char *mode, GError **error);

/**
 * vdk_open_options_set_engine: "io_uring", "native" (libaio), "threads" or
 * "auto" (io_uring when the kernel allows it, else threads).  An engine that
 * was compiled out or is refused by the kernel makes vdk_image_open() fail
 * when named explicitly; "auto" never fails for that reason.
 */
VDK_API bool vdk_open_options_set_engine(VdkOpenOptions *opts, const char *engine, GError **error);

/**
 * vdk_open_options_set_force_share: (qemu-img -U) open a read-only image
 * without checking or taking image locks, to peek at an image another
 * process may be writing (what is read may be inconsistent).  With a
 * read-write open, vdk_image_open() fails with EINVAL.
 */
VDK_API void vdk_open_options_set_force_share(VdkOpenOptions *opts, bool force_share);

/** Image locking modes (QEMU's file.locking). */
typedef enum {
    VDK_LOCKING_AUTO = 0, /* lock where the file system has OFD locks (the default) */
    VDK_LOCKING_ON,       /* lock; fail the open (ENOTSUP) where it cannot */
    VDK_LOCKING_OFF,      /* take and check no locks at all */
} VdkLocking;

/**
 * vdk_open_options_set_locking: every file of the image (the image, its
 * backing files, vmdk extents) is locked the way QEMU locks it: OFD locks
 * on byte 100 + n of the file for "uses permission n" and 200 + n for "does
 * not share permission n" (n: 0 consistent read, 1 write, 3 resize).  A
 * writer uses read, write and resize and shares neither write nor resize; a
 * reader uses read and, through a format other than raw, shares neither
 * either.  So a vdk writer and a QEMU, qemu-img, qemu-nbd or vdk user of the
 * same image see each other: the later open fails with EAGAIN and
 * "image is in use by another process (failed to get ... lock)".
 */
VDK_API void vdk_open_options_set_locking(VdkOpenOptions *opts, VdkLocking locking);

/**
 * vdk_open_options_set: a driver or block-layer option by name, e.g.
 * ("l2-cache-size", "4M").  Unknown keys make vdk_image_open() fail with an
 * error that names them.  ("repair", "on") lets a read-write open proceed
 * on an image marked corrupt, to repair it; ("check", "on") opens an image
 * for vdk_image_check(): metadata the check reports (invalid refcount table
 * entries) does not refuse the open.
 *
 * Image locking: every file of the image is locked the way QEMU locks it
 * (OFD locks on bytes 100.. and 200.. of the file), so a vdk writer and a
 * QEMU or qemu-img writer see each other; a conflict fails the open with
 * EAGAIN and "image is in use by another process".  ("force-share", "on")
 * is vdk_open_options_set_force_share(); ("locking", "on" | "off" | "auto")
 * (also spelt "file.locking") is vdk_open_options_set_locking();
 * ("rebase.force-share", "on") makes vdk_image_rebase() open the new backing
 * file with force-share (qemu-img rebase -U).
 */
VDK_API void vdk_open_options_set(VdkOpenOptions *opts, const char *key, const char *value);

/**
 * vdk_open_options_set_secret: a secret (a passphrase: @len bytes, copied)
 * under the name @id, as qemu's --object secret,id=ID: the open option
 * "encrypt.key-secret" names the one that unlocks a LUKS-encrypted qcow2
 * image ("backing.encrypt.key-secret" for its backing file, and so on).
 */
VDK_API void vdk_open_options_set_secret(VdkOpenOptions *opts, const char *id, const void *data, size_t len);

/* ------------------------------------------------------------------------ */
/* Images                                                                    */
/* ------------------------------------------------------------------------ */

/**
 * vdk_image_open: open @filename.  With no format set the format is
 * probed; if probing finds only raw and the open is writable, writes that
 * would make sector 0 look like another format are refused with -EPERM
 * (qemu's rule) and a warning is logged.  Returns NULL with @error set on
 * failure.  Blocking; control path.
 */
VDK_API VdkImage *vdk_image_open(const char *filename, const VdkOpenOptions *opts, GError **error);

/**
 * vdk_image_close: flush dirty metadata (not data: call vdk_image_flush()
 * for durability), release every resource and free @img.  Every queue of
 * the image must have been freed first.  Returns false with @error set if
 * writing back metadata failed; @img is freed either way.  NULL is a no-op.
 */
VDK_API bool vdk_image_close(VdkImage *img, GError **error);

/** The guest-visible size in bytes. */
VDK_API uint64_t vdk_image_get_size(VdkImage *img);
/** The format's name ("raw", ...). */
VDK_API const char *vdk_image_get_format(VdkImage *img);
/** The filename the image was opened with. */
VDK_API const char *vdk_image_get_filename(VdkImage *img);
/** The engine actually in use ("io_uring", "native" or "threads"). */
VDK_API const char *vdk_image_get_engine(VdkImage *img);
/** The cache mode in use ("writeback", "none", ...). */
VDK_API const char *vdk_image_get_cache(VdkImage *img);
VDK_API bool vdk_image_is_read_only(VdkImage *img);
/** Bytes the image's files occupy on the host (st_blocks * 512 summed). */
VDK_API uint64_t vdk_image_get_actual_size(VdkImage *img);
/** Depth of the backing chain: 1 for an image without backing file. */
VDK_API int vdk_image_get_chain_length(VdkImage *img);
/** Filename of layer @depth (0 = the image itself), or NULL. */
VDK_API const char *vdk_image_get_layer_filename(VdkImage *img, int depth);

/** Request flags. */
enum {
    VDK_REQ_FUA = 1u << 0,         /* write: durable when it completes */
    VDK_REQ_MAY_UNMAP = 1u << 1,   /* write_zeroes: may deallocate */
    VDK_REQ_NO_FALLBACK = 1u << 2, /* write_zeroes: -ENOTSUP rather than writing zero buffers */
    VDK_REQ_COMPRESS = 1u << 3,    /* write: store compressed (whole clusters; -ENOTSUP if the
                                      format cannot, -EINVAL if not cluster aligned) */
};

/** Block status flags, as in qemu-img map. */
enum {
    VDK_BS_DATA = 1u << 0,         /* reads may return non-zero data */
    VDK_BS_ZERO = 1u << 1,         /* reads return zeroes */
    VDK_BS_ALLOCATED = 1u << 2,    /* provided by the layer at `depth` (not a hole in the whole chain) */
    VDK_BS_OFFSET_VALID = 1u << 3, /* host_offset is the offset in layer `depth`'s file */
};

typedef struct VdkBlockStatus {
    uint64_t offset;      /* guest offset, equal to the request's offset */
    uint64_t length;      /* bytes with the same status, >= 1 and <= the request's length */
    uint32_t flags;       /* VDK_BS_* */
    int32_t depth;        /* backing-chain layer that provides the data (0 = top) */
    uint64_t host_offset; /* valid when VDK_BS_OFFSET_VALID */
} VdkBlockStatus;

/* ------------------------------------------------------------------------ */
/* Asynchronous queues                                                       */
/* ------------------------------------------------------------------------ */

typedef struct VdkCompletion {
    uint64_t user_data; /* as given when the request was queued */
    int64_t result;     /* >= 0: success (bytes for read/write); < 0: -errno */
} VdkCompletion;

/**
 * vdk_queue_new: a queue on @img holding up to @depth requests (1..4096;
 * 0 picks 128).  Each queue owns its own engine context (an io_uring ring,
 * an aio context or a worker pool) and eventfd.
 */
VDK_API VdkQueue *vdk_queue_new(VdkImage *img, unsigned depth, GError **error);

/**
 * vdk_queue_free: wait for every request in flight (blocking) and free the
 * queue.  Completions not yet reaped are discarded.
 */
VDK_API void vdk_queue_free(VdkQueue *q);

/**
 * vdk_queue_get_fd: the queue's eventfd, for epoll/poll (POLLIN).  From the
 * first call on, every completion signals it; a queue driven only through
 * vdk_queue_wait() / vdk_queue_submit_and_wait() never needs it and sleeps
 * in the engine instead (one system call per batch with io_uring).
 */
VDK_API int vdk_queue_get_fd(VdkQueue *q);

/**
 * Queue a request.  Offsets and lengths are byte-granular; O_DIRECT
 * alignment is handled internally.  Return 0, -EAGAIN (queue full: reap
 * first), -EINVAL (bad arguments, a read or block status past the end of
 * the image, or a read/write longer than 1 GiB), -EROFS (writing to a
 * read-only image) or -ENOSPC (a write, discard or write_zeroes past the
 * end of the image).  Nothing is sent before vdk_queue_submit().
 */
VDK_API int vdk_queue_readv(VdkQueue *q, uint64_t offset, const struct iovec *iov, int iovcnt,
                            uint64_t user_data);
VDK_API int vdk_queue_writev(VdkQueue *q, uint64_t offset, const struct iovec *iov, int iovcnt,
                             unsigned flags, uint64_t user_data);
VDK_API int vdk_queue_read(VdkQueue *q, uint64_t offset, void *buf, size_t len, uint64_t user_data);
VDK_API int vdk_queue_write(VdkQueue *q, uint64_t offset, const void *buf, size_t len, unsigned flags,
                            uint64_t user_data);
/** Flush: every write completed before it is queued is durable when it completes. */
VDK_API int vdk_queue_flush(VdkQueue *q, uint64_t user_data);
/**
 * Discard: the range's content becomes unspecified (raw files: zeroes where
 * the filesystem can punch holes; otherwise unchanged).  Discard is advisory:
 * a filesystem or device that cannot do it is not an error.
 */
VDK_API int vdk_queue_discard(VdkQueue *q, uint64_t offset, uint64_t length, uint64_t user_data);
/** Write zeroes: the range reads as zeroes afterwards. Flags: VDK_REQ_MAY_UNMAP, VDK_REQ_NO_FALLBACK, VDK_REQ_FUA. */
VDK_API int vdk_queue_write_zeroes(VdkQueue *q, uint64_t offset, uint64_t length, unsigned flags,
                                   uint64_t user_data);
/**
 * Block status: fills *@out (owned by the caller until reaped) for the
 * longest prefix of [offset, offset+length) with one status.
 */
VDK_API int vdk_queue_block_status(VdkQueue *q, uint64_t offset, uint64_t length, VdkBlockStatus *out,
                                   uint64_t user_data);

/**
 * vdk_queue_submit: start every request queued since the last submit, in
 * one batch per engine.  Returns the number of requests started or -errno.
 * Never calls back and never completes requests.
 */
VDK_API int vdk_queue_submit(VdkQueue *q);

/**
 * vdk_queue_reap: harvest up to @max completions into @out without
 * blocking.  Clears the eventfd first, so an fd that becomes readable again
 * later always means new work.  Returns the number harvested (0..max).
 */
VDK_API int vdk_queue_reap(VdkQueue *q, VdkCompletion *out, unsigned max);

/**
 * vdk_queue_wait: block until at least @min completions are ready to reap
 * or @timeout_ms passes (-1: forever); a convenience for callers without an
 * event loop.  Returns the number harvested into @out (like reap), 0 on
 * timeout, or -errno.
 */
VDK_API int vdk_queue_wait(VdkQueue *q, VdkCompletion *out, unsigned max, unsigned min, int timeout_ms);

/**
 * vdk_queue_submit_and_wait: vdk_queue_submit() then vdk_queue_wait(), in
 * one system call where the engine allows it (io_uring, fd not exposed).
 */
VDK_API int vdk_queue_submit_and_wait(VdkQueue *q, VdkCompletion *out, unsigned max, unsigned min,
                                      int timeout_ms);

/** Requests queued or in flight and not yet reaped. */
VDK_API unsigned vdk_queue_pending(VdkQueue *q);

/* ------------------------------------------------------------------------ */
/* Checking and repairing (qemu-img check)                                   */
/* ------------------------------------------------------------------------ */

/** What vdk_image_check() may repair. */
enum {
    VDK_CHECK_FIX_LEAKS = 1,  /* clusters counted but unused (qemu-img check -r leaks) */
    VDK_CHECK_FIX_ERRORS = 2, /* corruptions too (-r all, with FIX_LEAKS) */
};

/** qemu-img check's counters and messages. */
typedef struct VdkCheckReport {
    uint64_t corruptions, leaks, check_errors; /* found (after the repair, if any) */
    uint64_t corruptions_fixed, leaks_fixed;
    bool has_stats; /* the next fields are valid */
    uint64_t image_end_offset;
    uint64_t total_clusters, allocated_clusters, fragmented_clusters, compressed_clusters;
    char **messages; /* NULL-terminated; one line per problem, in qemu-img's words */
} VdkCheckReport;

/**
 * vdk_image_check: check the top image's metadata and, with @fix
 * (VDK_CHECK_FIX_*; the image must be writable), repair it.  Open a damaged
 * image with the option ("check", "on") (and ("repair", "on") to repair one
 * marked corrupt) so that what the check reports does not refuse the open.
 * Fills *@out (clear it with vdk_check_report_clear()); false with an error
 * when the check could not run: ENOTSUP for a format without checks (raw),
 * EROFS for a repair of a read-only image, or an I/O error.  A writable
 * image is flushed first (its cached metadata written back), so the check
 * sees what the image holds now.  Blocking; no queue of the image may have
 * requests in flight.
 */
VDK_API bool vdk_image_check(VdkImage *img, unsigned fix, VdkCheckReport *out, GError **error);
/** Free what vdk_image_check() put in @report. */
VDK_API void vdk_check_report_clear(VdkCheckReport *report);

/** A completion handed to a vdk_queue_source_new() callback. */
typedef void (*VdkQueueCompletionFunc)(VdkQueue *q, const VdkCompletion *completion, gpointer user_data);

/**
 * vdk_queue_source_new: a GSource for GLib main loops.  It watches the
 * queue's eventfd and, when it is readable, reaps every completion and
 * calls the callback set with g_source_set_callback() (cast the
 * VdkQueueCompletionFunc with G_SOURCE_FUNC) once per completion.
 * Attach it to the GMainContext that the queue's thread iterates (a queue
 * belongs to one thread); requests are still queued and submitted with
 * vdk_queue_*().  Destroying the source leaves the queue alone; free the
 * queue only after the source is destroyed.  Returns a new reference.
 */
VDK_API GSource *vdk_queue_source_new(VdkQueue *q);

/* ------------------------------------------------------------------------ */
/* Synchronous calls (a private queue: submit + poll loop)                   */
/* ------------------------------------------------------------------------ */

/** Read/write exactly @len bytes. Return 0 or -errno. */
VDK_API int vdk_image_pread(VdkImage *img, void *buf, size_t len, uint64_t offset);
VDK_API int vdk_image_pwrite(VdkImage *img, const void *buf, size_t len, uint64_t offset, unsigned flags);
VDK_API int vdk_image_flush(VdkImage *img);
VDK_API int vdk_image_discard(VdkImage *img, uint64_t offset, uint64_t length);
VDK_API int vdk_image_write_zeroes(VdkImage *img, uint64_t offset, uint64_t length, unsigned flags);
VDK_API int vdk_image_block_status(VdkImage *img, uint64_t offset, uint64_t length, VdkBlockStatus *out);

/** Preallocation modes for create and resize. */
typedef enum {
    VDK_PREALLOC_OFF = 0, /* sparse (truncate) */
    VDK_PREALLOC_METADATA,
    VDK_PREALLOC_FALLOC, /* posix_fallocate: space reserved, reads as zero */
    VDK_PREALLOC_FULL,   /* zeroes written */
} VdkPrealloc;

/**
 * vdk_image_resize: change the guest-visible size.  Shrinking requires
 * @shrink (it discards data past the new end).  @prealloc applies to the
 * grown part.  Blocking; no queue of the image may have requests in flight.
 */
VDK_API bool vdk_image_resize(VdkImage *img, uint64_t size, bool shrink, VdkPrealloc prealloc,
                              GError **error);

/* ------------------------------------------------------------------------ */
/* Creating images                                                           */
/* ------------------------------------------------------------------------ */

/** Options for vdk_image_create(): @format is "raw", ... */
VDK_API VdkCreateOptions *vdk_create_options_new(const char *format, GError **error);
VDK_API void vdk_create_options_free(VdkCreateOptions *opts);
/**
 * vdk_create_options_set: a format option as in qemu-img's -o ("size",
 * "preallocation", ...).  Fails with an error naming the key if the format
 * has no such option or the value does not parse.
 */
VDK_API bool vdk_create_options_set(VdkCreateOptions *opts, const char *key, const char *value,
                                    GError **error);
/** Overwrite an existing regular file (default: refuse with EEXIST). */
VDK_API void vdk_create_options_set_overwrite(VdkCreateOptions *opts, bool overwrite);
/** vdk_create_options_set_secret: a secret for encrypt.key-secret=@id (qcow2 LUKS). */
VDK_API void vdk_create_options_set_secret(VdkCreateOptions *opts, const char *id, const void *data, size_t len);
/**
 * Open the backing file while creating (default true): it must exist, its
 * format (backing_fmt) is checked and its size is the image size when no
 * "size" is given.  false is qemu-img create -u: the name is recorded as
 * given, and "size" and "backing_fmt" are then required.
 */
VDK_API void vdk_create_options_set_open_backing(VdkCreateOptions *opts, bool open);
/**
 * vdk_create_options_check_backing: what vdk_image_create() will check of
 * the backing file, done now (qemu-img create does it before printing its
 * "Formatting" line): opens it relative to @filename's directory unless
 * disabled, checks backing_fmt, and sets "size" from it when not given.
 * True when there is no backing file.
 */
VDK_API bool vdk_create_options_check_backing(VdkCreateOptions *opts, const char *filename, GError **error);

/**
 * vdk_image_create: create @filename.  The image is built under a
 * temporary name in the same directory and renamed into place only when it
 * is complete, so a failed or interrupted create never leaves a half-made
 * file under @filename.  Preallocation "falloc" and "full" first check the
 * free space and fail with an error naming the bytes needed and available.
 * Existing block devices are written in place (no rename) and must be large
 * enough.
 */
VDK_API bool vdk_image_create(const char *filename, const VdkCreateOptions *opts, GError **error);

/* ------------------------------------------------------------------------ */
/* Internal snapshots                                                        */
/* ------------------------------------------------------------------------ */

/** One internal snapshot (qemu-img snapshot -l's columns). */
typedef struct VdkSnapshotInfo {
    char *id;               /* unique ID ("1", "2", ...) */
    char *name;             /* tag; several snapshots may share one */
    uint64_t vm_state_size; /* bytes of saved VM state (0 for disk-only snapshots) */
    uint32_t date_sec, date_nsec; /* creation time (Unix time) */
    uint64_t vm_clock_nsec; /* guest clock at creation */
    uint64_t icount;        /* instruction count, or UINT64_MAX when not recorded */
    uint64_t disk_size;     /* virtual size when it was taken */
} VdkSnapshotInfo;

/**
 * vdk_image_snapshot_list: the top image's internal snapshots in table
 * order, in *@out (free with vdk_snapshot_list_free); returns the count
 * (0 for formats without snapshots), or -1 with @error set.
 */
VDK_API int vdk_image_snapshot_list(VdkImage *img, VdkSnapshotInfo **out, GError **error);
VDK_API void vdk_snapshot_list_free(VdkSnapshotInfo *list, int count);
/**
 * vdk_image_snapshot_create / _apply / _delete: qemu-img snapshot -c / -a /
 * -d on the top image, which must be writable.  create records the current
 * disk state under @name (names need not be unique; IDs are); apply
 * reverts the disk to the first snapshot whose ID or else name is @name;
 * delete removes the first snapshot named @name.  Crash-safe: an
 * interruption leaves the old or the new state, at worst with leaked
 * clusters.  Blocking; no queue of the image may have requests in flight.
 * ENOTSUP for formats without internal snapshots, ENOENT when not found.
 */
VDK_API bool vdk_image_snapshot_create(VdkImage *img, const char *name, GError **error);
VDK_API bool vdk_image_snapshot_apply(VdkImage *img, const char *name, GError **error);
VDK_API bool vdk_image_snapshot_delete(VdkImage *img, const char *name, GError **error);

/* ------------------------------------------------------------------------ */
/* Backing chains                                                            */
/* ------------------------------------------------------------------------ */

/**
 * vdk_image_commit: qemu-img commit.  Writes the data of the top image
 * (and of the images between it and @base) into @base, a file of @img's
 * backing chain (NULL: the top's backing file), growing it if it is
 * smaller; then, unless @keep_overlay or @base is given, empties the top
 * image so the backing file shows through.  @img must be writable; the
 * base is opened read-write for the copy.  @progress (may be NULL) gets
 * bytes done and total and may return false to cancel (ECANCELED).
 * Blocking; no request may be in flight on @img.
 */
VDK_API bool vdk_image_commit(VdkImage *img, const char *base, bool keep_overlay,
                              bool (*progress)(void *opaque, uint64_t done, uint64_t total), void *opaque,
                              GError **error);
/**
 * vdk_image_rebase: qemu-img rebase.  Records @backing (format
 * @backing_fmt, required unless @backing is NULL or "": no backing file)
 * as the top image's backing file.  Unless @unsafe, first copies into the
 * top image every range where the old chain and the new backing file
 * differ, so the guest-visible content stays the same.  Relative names are
 * resolved against the image's directory and recorded as given.  Close
 * and reopen @img afterwards to read through the new chain.  Blocking.
 */
VDK_API bool vdk_image_rebase(VdkImage *img, const char *backing, const char *backing_fmt, bool unsafe,
                              bool (*progress)(void *opaque, uint64_t done, uint64_t total), void *opaque,
                              GError **error);

/**
 * vdk_image_amend: qemu-img amend -o.  @kv is a NULL-terminated list of
 * key, value, key, value ...: for qcow2 compat (0.10 / 1.1; a downgrade
 * expands zero clusters and refuses v3-only features with the reason),
 * lazy_refcounts, refcount_bits and size.  The top image must be
 * writable.  Blocking; no I/O in flight.
 */
VDK_API bool vdk_image_amend(VdkImage *img, const char *const *kv, GError **error);

/**
 * vdk_image_allocate: make a sparse image physically allocated ("allocate
 * when it matters"): ranges mapped to holes of the file (raw holes, qcow2
 * preallocation=metadata) are allocated with fallocate (@mode
 * VDK_PREALLOC_FALLOC) or written with zeroes (VDK_PREALLOC_FULL); ranges
 * the image does not map at all are written with zeroes.  The free space
 * is checked first (ENOSPC with the numbers, nothing changed).  Images
 * with a backing file are refused (the zeroes would hide it).  Blocking.
 */
VDK_API bool vdk_image_allocate(VdkImage *img, VdkPrealloc mode,
                                bool (*progress)(void *opaque, uint64_t done, uint64_t total), void *opaque,
                                GError **error);

/**
 * vdk_image_compact: move the clusters at the end of the file into the
 * holes freed clusters left, then cut the file (qcow2), in place and
 * crash-safe; the guest view does not change.  *@before and *@after get
 * the file sizes.  Blocking; no I/O in flight.  ENOTSUP for formats (and
 * images, e.g. with internal snapshots) it cannot compact.
 */
VDK_API bool vdk_image_compact(VdkImage *img, uint64_t *before, uint64_t *after, GError **error);

/** An action on a persistent dirty bitmap (qemu-img bitmap). */
typedef enum VdkBitmapAction {
    VDK_BITMAP_ADD = 1, /* a new, empty, enabled bitmap */
    VDK_BITMAP_REMOVE,  /* delete it (also an inconsistent one) */
    VDK_BITMAP_CLEAR,   /* all bits clear */
    VDK_BITMAP_ENABLE,  /* writes through vdk (and qemu) set its bits */
    VDK_BITMAP_DISABLE, /* frozen */
    VDK_BITMAP_MERGE,   /* OR another bitmap's bits into it */
} VdkBitmapAction;

/** One bitmap action for vdk_image_bitmap(). */
typedef struct VdkBitmapOp {
    VdkBitmapAction action;
    const char *name;        /* the bitmap (at most 1023 bytes) */
    uint64_t granularity;    /* ADD: bytes per bit, a power of two from 512 to 2 GiB; 0: qemu's default */
    VdkImage *source;        /* MERGE: the image holding the source bitmap; NULL: this image */
    const char *source_name; /* MERGE: the source bitmap's name */
} VdkBitmapOp;

/**
 * vdk_image_bitmap: one action on a persistent dirty bitmap of the top
 * image (qcow2 version 3, opened read-write), with qemu-img bitmap's
 * rules and messages.  The change is written when the image is closed,
 * crash-safe (new directory and tables in new clusters, then the header
 * switch).  While a read-write image is open its enabled bitmaps are
 * marked in use on disk and every write, write-zeroes and discard sets
 * their bits in memory.  Blocking; no I/O in flight.
 */
VDK_API bool vdk_image_bitmap(VdkImage *img, const VdkBitmapOp *op, GError **error);

/** One persistent dirty bitmap as stored (vdk_image_list_bitmaps()). */
typedef struct VdkBitmapInfo {
    char *name;           /* owned by the list */
    uint64_t granularity; /* bytes per bit */
    bool enabled;         /* the "auto" flag: writes set its bits */
    bool in_use;          /* inconsistent: in use on disk when the image was opened (another writer, or a crash) */
    bool usable;          /* vdk can read and copy it (known type, granularity and extra data) */
} VdkBitmapInfo;

/**
 * vdk_image_list_bitmaps: the persistent dirty bitmaps of the top image,
 * in directory order.  Returns their number (0 for none) and stores a
 * list in *@out (NULL when 0; free with vdk_bitmap_list_free()), or
 * -ENOTSUP when the format cannot hold bitmaps (raw, vdi, vmdk, qcow2
 * version 2).  No I/O.  Thread-safe against I/O on other queues.
 */
VDK_API int vdk_image_list_bitmaps(VdkImage *img, VdkBitmapInfo **out);
/** vdk_bitmap_list_free: free a list from vdk_image_list_bitmaps(); NULL is fine. */
VDK_API void vdk_bitmap_list_free(VdkBitmapInfo *list, int n);

/** What a new image needs on disk (qemu-img measure). */
typedef struct VdkMeasure {
    uint64_t required;        /* bytes for the image with the source's data ("required size") */
    uint64_t fully_allocated; /* bytes with every cluster/block allocated */
    bool has_bitmaps;         /* @bitmaps is meaningful (both images can hold persistent bitmaps) */
    uint64_t bitmaps;         /* bytes for the source's persistent bitmaps */
} VdkMeasure;

/**
 * vdk_measure: the size of an image created with @opts (format and -o
 * options) holding the content of @src, or, with @src NULL, empty and of
 * the "size" option's size (required then).  Reads @src's block status
 * (blocking).  Fails with ENOTSUP for formats that cannot measure.
 */
VDK_API bool vdk_measure(const VdkCreateOptions *opts, VdkImage *src, VdkMeasure *out, GError **error);

/* ------------------------------------------------------------------------ */
/* Utilities                                                                 */
/* ------------------------------------------------------------------------ */

/**
 * vdk_parse_size: qemu-img's size syntax ("10G", "512", "1.5M", suffixes
 * k K M G T P E, 1024-based; a trailing 'b'/'B' is accepted).  Returns false
 * with an error on garbage, negative values or overflow.
 */
VDK_API bool vdk_parse_size(const char *str, uint64_t *out, GError **error);

#ifdef __cplusplus
}
#endif

#endif /* VDK_VDK_H */
