/* SPDX-License-Identifier: MIT */
/*
 * io.h - the I/O engine interface.
 *
 * An engine moves bytes between file descriptors and memory; it knows
 * nothing about formats or guest offsets.  Each queue owns one engine
 * context and uses it from one thread: queue requests, submit them in one
 * batch, and later reap completions (which calls each request's complete()
 * callback on the reaping thread).  Every context signals the queue's
 * eventfd when completions may be ready.
 *
 * Contract for every engine:
 *   - queue() never performs I/O and never calls complete().
 *   - submit() sends everything queued; it never calls complete() either:
 *     a request the kernel refuses synchronously is completed on the next
 *     reap() (and the eventfd is signalled), so completions only ever appear
 *     in reap().
 *   - reap() never blocks.
 *   - Short reads and writes are continued inside the engine until the
 *     request is done, fails, or a read hits end of file (a read returning 0,
 *     or any short read when short_is_eof is set); the rest of a read at end
 *     of file is zero-filled (a file shorter than its metadata says reads as
 *     zeroes, as in qemu).  The engine may modify the request's iovec array
 *     while doing so.
 */
#ifndef VDK_IO_H
#define VDK_IO_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include <glib.h>

typedef enum {
    VDK_IO_READV = 0,
    VDK_IO_WRITEV,
    VDK_IO_FDATASYNC,
    VDK_IO_FALLOCATE,    /* mode = fallocate mode, offset, len */
    VDK_IO_BLKDISCARD,   /* block device: BLKDISCARD ioctl */
    VDK_IO_BLKZEROOUT,   /* block device: BLKZEROOUT ioctl */
    VDK_IO_NOP,          /* completes with 0; used to defer a completion to reap */
} VdkIoOp;

typedef struct VdkIoReq VdkIoReq;
typedef void VdkIoComplete(VdkIoReq *req);

struct VdkIoReq {
    uint8_t op;          /* VdkIoOp */
    int fd;
    int mode;            /* fallocate mode */
    uint32_t rw_flags;   /* RWF_* for readv/writev (RWF_DSYNC for FUA) */
    bool short_is_eof;   /* a short read means end of file (O_DIRECT: the
                          * continuation would be misaligned) */
    uint64_t offset;
    uint64_t len;        /* fallocate / ioctl length; for readv/writev the iov total */
    struct iovec *iov;
    int iovcnt;
    int64_t result;      /* on completion: bytes (readv/writev) or 0, or -errno */
    VdkIoComplete *complete;
    void *opaque;        /* owner's */
    /* engine private */
    uint64_t done;       /* bytes completed so far (short I/O) */
    int preset_error;    /* non-zero: a worker completes the request with it */
    VdkIoReq *next;      /* engine lists */
    union {
        uint64_t align;
        unsigned char bytes[64];
    } priv;
};

typedef struct VdkIoCtx VdkIoCtx;

typedef struct VdkIoEngine {
    const char *name;
    /* Can this engine run here?  On false, *error says why (used for -v). */
    bool (*available)(GError **error);
    /* New context for up to @depth requests in flight; signals @efd. */
    VdkIoCtx *(*ctx_new)(unsigned depth, int efd, GError **error);
    /* Free a context with nothing in flight (the caller drains first). */
    void (*ctx_free)(VdkIoCtx *ctx);
    /* Add @req to the next batch: 0, or -EAGAIN when the batch is full
     * (submit and reap, then retry). */
    int (*queue)(VdkIoCtx *ctx, VdkIoReq *req);
    /* Send the batch: number sent (>= 0) or -errno. */
    int (*submit)(VdkIoCtx *ctx);
    /* Complete finished requests (calls complete()); never blocks.
     * Returns the number completed. */
    int (*reap)(VdkIoCtx *ctx);
    /* Requests queued but not yet submitted. */
    unsigned (*queued)(VdkIoCtx *ctx);
    /*
     * Optional fast path for callers that block (sync calls, bench,
     * vdk_queue_wait without an exposed fd): submit what is queued and
     * sleep in the kernel until a completion or a signal on the eventfd
     * (another thread's wake-up) is pending, or @timeout_ms passes (-1: no
     * limit).  Completions are not processed here; reap() does that.
     * Returns 0, -ETIME or -errno.  NULL: the caller polls the eventfd.
     */
    int (*wait)(VdkIoCtx *ctx, int timeout_ms);
    /*
     * Optional: whether completions signal the eventfd.  Engines that
     * support it start with notifications off and the queue turns them on
     * when the user asks for the fd (an eventfd write per completion costs a
     * wake-up nobody needs when the queue is driven through wait()).
     */
    void (*set_notify)(VdkIoCtx *ctx, bool on);
} VdkIoEngine;

extern const VdkIoEngine vdk_io_engine_uring;
extern const VdkIoEngine vdk_io_engine_aio;
extern const VdkIoEngine vdk_io_engine_threads;
extern const VdkIoEngine vdk_io_engine_fault;

/* Fault engine rules (tests): fail the @nth request (1-based, counted from
 * now) whose op is @op (-1: any) with @error (negative errno); with
 * @sticky, every matching request after it too.  nth = 0 clears the rule.
 * The environment variable VDK_FAULT="OP:NTH:ERRNO[:sticky]" (OP one of
 * read, write, flush, fallocate, any) sets a rule for the CLI, and
 * VDK_FAULT_INNER names the wrapped engine (default threads). */
void vdk_io_fault_set(int op, uint64_t nth, int error, bool sticky);
void vdk_io_fault_set_inner(const VdkIoEngine *inner);
uint64_t vdk_io_fault_hits(void);

/*
 * Recording (crash-consistency tests): while on, every write, fallocate and
 * fdatasync passing through the fault engine is appended to a global log
 * with a copy of its data, and so is its completion; tests add their own
 * marks (guest-level events) to the same log, in the same order.
 */
typedef enum {
    VDK_REC_WRITE = 0,  /* data (NULL: zeroes) at offset, len; extends the file */
    VDK_REC_ZERO,       /* zeroes in [offset, offset+len); keep_size: never extends */
    VDK_REC_ALLOC,      /* fallocate mode 0: extends the file, bytes unchanged */
    VDK_REC_SYNC,       /* fdatasync queued */
    VDK_REC_DONE,       /* request @id completed with @result */
    VDK_REC_MARK,       /* a test's own event: @id is its tag */
} VdkRecKind;

typedef struct {
    VdkRecKind kind;
    uint64_t id; /* request id (WRITE/ZERO/ALLOC/SYNC/DONE) or tag (MARK) */
    char *path;  /* file (from /proc/self/fd at queue time) */
    uint64_t offset, len;
    uint8_t *data;
    bool keep_size;
    int64_t result;
} VdkRecord;

void vdk_io_record_start(void);
/* Stop and return the log (VdkRecord *, freed with the array). */
GPtrArray *vdk_io_record_stop(void);
void vdk_io_record_mark(uint64_t tag);

/* Look up an engine by qemu's name ("io_uring", "native", "threads");
 * "auto" picks io_uring if available here, else threads, and records why
 * in *reason (for -v).  Returns NULL with @error set when the named engine
 * is unknown, compiled out or unusable. */
const VdkIoEngine *vdk_io_engine_select(const char *name, char **reason, GError **error);

/* Execute @req synchronously with plain syscalls on the calling thread
 * (pread/pwrite/fdatasync/fallocate/ioctl), handling short transfers and
 * EINTR; sets req->result.  Used by the thread engine and for ops an engine
 * cannot do natively. */
void vdk_io_exec_sync(VdkIoReq *req);

/* Account @n completed bytes of a readv/writev: advance req->iov past them.
 * Returns true if the request still has bytes to transfer. */
bool vdk_io_advance(VdkIoReq *req, uint64_t n);

/* Zero-fill what remains of a read that hit end of file. */
void vdk_io_zero_rest(VdkIoReq *req);

/* Account the kernel's answer @res for one submission of a readv/writev:
 * returns true when the request is finished (req->result is set: the whole
 * length, or -errno), false when the rest must be issued again from
 * req->offset + req->done (short transfer, EINTR, EAGAIN).  A read that
 * hits end of file (0, or short with short_is_eof) is zero-filled. */
bool vdk_io_rw_progress(VdkIoReq *req, int64_t res);

/* Signal an eventfd (add 1). */
void vdk_io_eventfd_signal(int efd);

/*
 * A small pool of worker threads that run requests with vdk_io_exec_sync().
 * The thread engine is this pool; the other engines use one for operations
 * the kernel interface lacks (fallocate under libaio, block-device ioctls).
 * Threads are started lazily, up to @max_threads.  push() only collects;
 * kick() hands the collected batch to the workers under one lock.  Finished
 * requests wait on a done list until reap(), and the eventfd is signalled
 * when that list becomes non-empty.
 */
typedef struct VdkIoWorkers VdkIoWorkers;
VdkIoWorkers *vdk_io_workers_new(unsigned max_threads, int efd);
void vdk_io_workers_free(VdkIoWorkers *w);
void vdk_io_workers_push(VdkIoWorkers *w, VdkIoReq *req);
unsigned vdk_io_workers_queued(VdkIoWorkers *w);
int vdk_io_workers_kick(VdkIoWorkers *w);
int vdk_io_workers_reap(VdkIoWorkers *w);

#endif /* VDK_IO_H */
