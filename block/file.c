/* SPDX-License-Identifier: MIT */
/*
 * file.c - host files and block devices under the format drivers.
 *
 * Opening: the cache mode picks O_DIRECT (none, directsync) and O_DSYNC
 * (writethrough, directsync); O_DIRECT alignment comes from
 * statx(STATX_DIOALIGN), BLKSSZGET for devices, or probing reads as a last
 * resort.
 *
 * I/O on behalf of requests ("children"): aligned transfers go straight to
 * the engine with the caller's buffers.  On O_DIRECT files a misaligned read
 * goes through an aligned bounce buffer; a misaligned write reads the
 * partial head and tail blocks, merges and writes the aligned range
 * (read-modify-write).  Writes on O_DIRECT files are tracked per file so an
 * RMW never runs concurrently with another write touching the same aligned
 * blocks (otherwise one of them would write back stale bytes).  A write whose
 * aligned range would cross end of file (a file whose length is not a
 * multiple of the alignment) goes through a buffered twin fd instead, so the
 * file never grows past what was asked.
 *
 * write_zeroes tries, in order: BLKZEROOUT (devices); for files
 * FALLOC_FL_PUNCH_HOLE when MAY_UNMAP allows a hole, FALLOC_FL_ZERO_RANGE,
 * then PUNCH_HOLE followed by fallocate to allocate the range again; it
 * remembers per file what the filesystem refused, and writes zero buffers
 * as the last resort unless NO_FALLBACK.  Discard punches holes / issues BLKDISCARD and
 * treats "not supported" as success (discard is advisory).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "block/block.h"

/* Shared zero buffer for zero-writing fallbacks. */
#define ZERO_BUF_SIZE (1u << 20)
/* Zero-write fallback: bytes per engine operation. */
#define ZERO_CHUNK (16u << 20)
/* Largest O_DIRECT alignment we accept from probing. */
#define MAX_ALIGN 65536u

static const void *zero_buffer(void);

const void *
vdk_zero_buffer(size_t *len)
{
    *len = ZERO_BUF_SIZE;
    return zero_buffer();
}

static const void *
zero_buffer(void)
{
    static gsize once;
    static void *buf;
    if (g_once_init_enter(&once)) {
        void *p = NULL;
        if (posix_memalign(&p, 4096, ZERO_BUF_SIZE) != 0) {
            g_error("vdk: out of memory allocating the zero buffer");
        }
        memset(p, 0, ZERO_BUF_SIZE);
        buf = p;
        g_once_init_leave(&once, 1);
    }
    return buf;
}

static void
file_size_at_least(VdkFile *f, uint64_t end)
{
    uint64_t cur = __atomic_load_n(&f->size, __ATOMIC_RELAXED);
    while (cur < end && !__atomic_compare_exchange_n(&f->size, &cur, end, false, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED)) {
    }
}

static void
file_probe_alignment(VdkFile *f)
{
    struct statx stx;
    if (statx(f->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) &&
        stx.stx_dio_offset_align > 0) {
        f->req_align = stx.stx_dio_offset_align;
        f->buf_align = MAX(stx.stx_dio_mem_align, 1u);
    } else if (f->is_blockdev) {
        f->req_align = f->logical_block_size;
        f->buf_align = f->logical_block_size;
    } else {
        /* qemu's approach: the smallest read size the kernel accepts with a
         * maximally aligned buffer, then the smallest buffer alignment. */
        void *buf = NULL;
        f->req_align = 4096;
        f->buf_align = 4096;
        if (posix_memalign(&buf, MAX_ALIGN, 2 * MAX_ALIGN) == 0) {
            for (uint32_t a = 512; a <= MAX_ALIGN; a *= 2) {
                if (pread(f->fd, buf, a, 0) >= 0) {
                    f->req_align = a;
                    break;
                }
            }
            for (uint32_t a = 512; a <= MAX_ALIGN; a *= 2) {
                if (pread(f->fd, (char *)buf + a, f->req_align, 0) >= 0) {
                    f->buf_align = a;
                    break;
                }
            }
            free(buf);
        }
    }
    if (f->req_align == 0 || f->req_align > MAX_ALIGN || (f->req_align & (f->req_align - 1))) {
        f->req_align = 4096;
    }
    if (f->buf_align == 0 || f->buf_align > MAX_ALIGN || (f->buf_align & (f->buf_align - 1))) {
        f->buf_align = 4096;
    }
}

bool
vdk_file_refresh_size(VdkFile *f, GError **error)
{
    if (f->is_blockdev) {
        uint64_t sz = 0;
        if (ioctl(f->fd, BLKGETSIZE64, &sz) < 0) {
            g_set_error(error, VDK_ERROR, errno, "cannot get the block device's size: %s", g_strerror(errno));
            return false;
        }
        __atomic_store_n(&f->size, sz, __ATOMIC_RELAXED);
        return true;
    }
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        g_set_error(error, VDK_ERROR, errno, "cannot stat: %s", g_strerror(errno));
        return false;
    }
    __atomic_store_n(&f->size, (uint64_t)st.st_size, __ATOMIC_RELAXED);
    return true;
}

static bool
file_setup(VdkFile *f, VdkCacheMode cache, GError **error)
{
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        g_set_error(error, VDK_ERROR, errno, "cannot stat: %s", g_strerror(errno));
        return false;
    }
    if (S_ISDIR(st.st_mode)) {
        g_set_error(error, VDK_ERROR, EISDIR, "is a directory");
        return false;
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
        g_set_error(error, VDK_ERROR, EINVAL, "not a regular file or block device");
        return false;
    }
    f->is_blockdev = S_ISBLK(st.st_mode);
    f->logical_block_size = 512;
    if (f->is_blockdev) {
        int lbs = 0;
        if (ioctl(f->fd, BLKSSZGET, &lbs) == 0 && lbs >= 512 && lbs <= (int)MAX_ALIGN) {
            f->logical_block_size = (uint32_t)lbs;
        }
    }
    if (!vdk_file_refresh_size(f, error)) {
        return false;
    }
    f->direct = cache == VDK_CACHE_NONE || cache == VDK_CACHE_DIRECTSYNC;
    f->dsync = cache == VDK_CACHE_WRITETHROUGH || cache == VDK_CACHE_DIRECTSYNC;
    f->no_flush = cache == VDK_CACHE_UNSAFE;
    f->req_align = 1;
    f->buf_align = 1;
    if (f->direct) {
        file_probe_alignment(f);
    }
    return true;
}

static VdkFile *
file_alloc(int fd, const char *filename, bool read_only)
{
    VdkFile *f = g_new0(VdkFile, 1);
    f->fd = fd;
    f->buffered_fd = -1;
    f->filename = g_strdup(filename);
    f->read_only = read_only;
    g_mutex_init(&f->lock);
    return f;
}

VdkFile *
vdk_file_open(const char *filename, bool read_only, VdkCacheMode cache, GError **error)
{
    int flags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
    if (cache == VDK_CACHE_NONE || cache == VDK_CACHE_DIRECTSYNC) {
        flags |= O_DIRECT;
    }
    if (!read_only && (cache == VDK_CACHE_WRITETHROUGH || cache == VDK_CACHE_DIRECTSYNC)) {
        flags |= O_DSYNC;
    }
    int fd;
    do {
        /* O_NONBLOCK: a FIFO named by an image (backing file, vmdk extent)
         * must not block the open; it is refused just below */
        fd = open(filename, flags | O_NONBLOCK);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        int e = errno;
        if (e == EINVAL && (flags & O_DIRECT)) {
            g_set_error(error, VDK_ERROR, e,
                        "cannot open with O_DIRECT (cache mode '%s'): the filesystem does not support it",
                        vdk_cache_mode_name(cache));
        } else {
            g_set_error(error, VDK_ERROR, e, "cannot open: %s", g_strerror(e));
        }
        return NULL;
    }
    VdkFile *f = file_alloc(fd, filename, read_only);
    if (!file_setup(f, cache, error)) {
        vdk_file_close(f);
        return NULL;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) {
        (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    }
    return f;
}

VdkFile *
vdk_file_new_from_fd(int fd, const char *filename, bool read_only, VdkCacheMode cache, GError **error)
{
    VdkFile *f = file_alloc(fd, filename, read_only);
    if (!file_setup(f, cache, error)) {
        f->fd = -1;
        vdk_file_close(f);
        return NULL;
    }
    return f;
}

/* ------------------------------------------------------------------------ */
/* Image locks (QEMU's byte-range scheme)                                    */
/* ------------------------------------------------------------------------ */

#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200
enum { PERM_READ = 0, PERM_WRITE = 1, PERM_RESIZE = 3 };

static const char *
perm_name(int bit)
{
    switch (bit) {
    case PERM_READ:
        return "consistent read";
    case PERM_WRITE:
        return "write";
    case PERM_RESIZE:
        return "resize";
    default:
        return "?";
    }
}

static int
ofd_lock(int fd, off_t byte)
{
    struct flock fl = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1};
    return fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : -errno;
}

/* 1: another open file holds @byte, 0: free, -errno */
static int
ofd_held(int fd, off_t byte)
{
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1};
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0) {
        return -errno;
    }
    return fl.l_type != F_UNLCK;
}

/* locking=auto goes on unlocked (as QEMU does); locking=on cannot. */
static bool
no_ofd_locks(VdkFile *f, bool required, int r, GError **error)
{
    (void)f;
    if (!required) {
        return true;
    }
    g_set_error(error, VDK_ERROR, ENOTSUP, "locking=on, but the file cannot be locked here (OFD locks: %s)",
                g_strerror(-r));
    return false;
}

bool
vdk_file_lock(VdkFile *f, bool write, unsigned unshare, bool required, GError **error)
{
    /* QEMU's choices: a writer uses read, write and resize (what a guest
     * device asks); a reader uses consistent read.  What is not shared
     * depends on what the file holds (the callers' VDK_LOCK_*). */
    static const int use_w[] = {PERM_READ, PERM_WRITE, PERM_RESIZE};
    static const int use_r[] = {PERM_READ};
    const int *use = write ? use_w : use_r;
    int nuse = write ? 3 : 1;
    int keep[2]; /* the permissions not shared */
    int nunshare = 0;
    if (unshare & VDK_LOCK_WRITE) {
        keep[nunshare++] = PERM_WRITE;
    }
    if (unshare & VDK_LOCK_RESIZE) {
        keep[nunshare++] = PERM_RESIZE;
    }
    /* Someone who does not share what we use, or who uses what we do not
     * share: in use.  (Checked before and after taking ours, so two
     * openers racing both see each other.) */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < nuse + nunshare; i++) {
            bool is_use = i < nuse;
            int bit = is_use ? use[i] : keep[i - nuse];
            off_t byte = (is_use ? LOCK_SHARED_BASE : LOCK_PERM_BASE) + bit;
            int r = ofd_held(f->fd, byte);
            if (r == -EINVAL || r == -ENOLCK || r == -EOPNOTSUPP) {
                /* no OFD locks here (old kernel, some network file systems) */
                return no_ofd_locks(f, required, r, error);
            }
            if (r < 0) {
                g_set_error(error, VDK_ERROR, -r, "cannot test the image lock: %s", g_strerror(-r));
                return false;
            }
            if (r > 0) {
                g_set_error(error, VDK_ERROR, EAGAIN, "image is in use by another process (failed to get %s\"%s\" lock%s)",
                            is_use ? "" : "shared ", perm_name(bit),
                            write ? "" : "; -U reads it anyway, at the risk of seeing it change");
                return false;
            }
        }
        if (pass == 1) {
            break;
        }
        for (int i = 0; i < nuse + nunshare; i++) {
            bool is_use = i < nuse;
            int bit = is_use ? use[i] : keep[i - nuse];
            int r = ofd_lock(f->fd, (is_use ? LOCK_PERM_BASE : LOCK_SHARED_BASE) + bit);
            if (r == -EINVAL || r == -ENOLCK || r == -EOPNOTSUPP) {
                vdk_file_unlock(f);
                return no_ofd_locks(f, required, r, error);
            }
            if (r < 0) {
                g_set_error(error, VDK_ERROR, -r, "cannot take the image lock: %s", g_strerror(-r));
                return false;
            }
        }
    }
    return true;
}

void
vdk_file_unlock(VdkFile *f)
{
    struct flock fl = {.l_type = F_UNLCK, .l_whence = SEEK_SET, .l_start = LOCK_PERM_BASE,
                       .l_len = LOCK_SHARED_BASE + 8 - LOCK_PERM_BASE};
    (void)fcntl(f->fd, F_OFD_SETLK, &fl);
}

void
vdk_file_close(VdkFile *f)
{
    if (!f) {
        return;
    }
    if (f->fd >= 0) {
        close(f->fd);
    }
    if (f->buffered_fd >= 0) {
        close(f->buffered_fd);
    }
    g_mutex_clear(&f->lock);
    g_free(f->filename);
    g_free(f);
}

uint64_t
vdk_file_allocated_bytes(VdkFile *f)
{
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        return 0;
    }
    if (f->is_blockdev) {
        return __atomic_load_n(&f->size, __ATOMIC_RELAXED);
    }
    return (uint64_t)st.st_blocks * 512;
}

static uint64_t
file_page_size(void)
{
    static uint64_t page;
    uint64_t p = __atomic_load_n(&page, __ATOMIC_RELAXED);
    if (p == 0) {
        long v = sysconf(_SC_PAGESIZE);
        p = v >= 4096 ? (uint64_t)v : 4096;
        __atomic_store_n(&page, p, __ATOMIC_RELAXED);
    }
    return p;
}

/* The buffered twin of an O_DIRECT file (for the unaligned tail at EOF and
 * for control-path helpers). Returns -1 with errno on failure. */
static int
file_buffered_fd(VdkFile *f)
{
    if (!f->direct) {
        return f->fd;
    }
    int fd = __atomic_load_n(&f->buffered_fd, __ATOMIC_ACQUIRE);
    if (fd >= 0) {
        return fd;
    }
    char path[64];
    g_snprintf(path, sizeof(path), "/proc/self/fd/%d", f->fd);
    int flags = (f->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | (f->dsync ? O_DSYNC : 0);
    fd = open(path, flags);
    if (fd < 0) {
        return -1;
    }
    int expected = -1;
    if (!__atomic_compare_exchange_n(&f->buffered_fd, &expected, fd, false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        close(fd);
        fd = expected;
    }
    return fd;
}

int
vdk_file_fd_for(VdkFile *f, uint64_t off, uint64_t len)
{
    if (!f->direct || (off % f->req_align == 0 && len % f->req_align == 0)) {
        return f->fd;
    }
    return file_buffered_fd(f);
}

int
vdk_file_pread_sync(VdkFile *f, void *buf, size_t len, uint64_t off)
{
    int fd = file_buffered_fd(f);
    if (fd < 0) {
        return -errno;
    }
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (r == 0) {
            memset((char *)buf + done, 0, len - done);
            break;
        }
        done += (size_t)r;
    }
    return 0;
}

int
vdk_file_pwrite_sync(VdkFile *f, const void *buf, size_t len, uint64_t off)
{
    int fd = file_buffered_fd(f);
    if (fd < 0) {
        return -errno;
    }
    size_t done = 0;
    while (done < len) {
        ssize_t r = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (r == 0) {
            return -EIO;
        }
        done += (size_t)r;
    }
    file_size_at_least(f, off + len);
    return 0;
}

int
vdk_file_flush_sync(VdkFile *f)
{
    if (f->no_flush) {
        return 0;
    }
    if (fdatasync(f->fd) < 0) {
        return -errno;
    }
    return 0;
}

static int
file_write_zeroes_sync(VdkFile *f, uint64_t off, uint64_t len)
{
    const void *z = zero_buffer();
    while (len > 0) {
        size_t n = (size_t)MIN(len, (uint64_t)ZERO_BUF_SIZE);
        int r = vdk_file_pwrite_sync(f, z, n, off);
        if (r < 0) {
            return r;
        }
        off += n;
        len -= n;
    }
    return 0;
}

bool
vdk_file_truncate(VdkFile *f, uint64_t size, VdkPrealloc prealloc, GError **error)
{
    if (f->is_blockdev) {
        if (size > f->size) {
            g_set_error(error, VDK_ERROR, ENOSPC,
                        "cannot grow a block device (%" G_GUINT64_FORMAT " bytes requested, device has %" G_GUINT64_FORMAT ")",
                        size, f->size);
            return false;
        }
        return true;
    }
    if (size > (uint64_t)INT64_MAX) {
        g_set_error(error, VDK_ERROR, EFBIG, "size %" G_GUINT64_FORMAT " is too large", size);
        return false;
    }
    uint64_t old = f->size;
    if (size > old && (prealloc == VDK_PREALLOC_FALLOC || prealloc == VDK_PREALLOC_FULL)) {
        /* Reserve first: on ENOSPC the file keeps its old length. */
        int r;
        do {
            r = fallocate(f->fd, 0, (off_t)old, (off_t)(size - old));
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            int e = errno;
            if (e == EOPNOTSUPP && prealloc == VDK_PREALLOC_FULL) {
                /* full writes the zeroes below anyway */
            } else {
                g_set_error(error, VDK_ERROR, e, "cannot allocate %" G_GUINT64_FORMAT " bytes: %s", size - old,
                            g_strerror(e));
                if (ftruncate(f->fd, (off_t)old) < 0) {
                    /* the error above is the one that matters */
                }
                return false;
            }
        }
    }
    if (ftruncate(f->fd, (off_t)size) < 0) {
        int e = errno;
        g_set_error(error, VDK_ERROR, e, "cannot resize to %" G_GUINT64_FORMAT " bytes: %s", size,
                    g_strerror(e));
        return false;
    }
    __atomic_store_n(&f->size, size, __ATOMIC_RELAXED);
    if (size > old && prealloc == VDK_PREALLOC_FULL) {
        int r = file_write_zeroes_sync(f, old, size - old);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "cannot write zeroes to %" G_GUINT64_FORMAT " bytes: %s",
                        size - old, g_strerror(-r));
            return false;
        }
    }
    return true;
}

int
vdk_file_seek_status(VdkFile *f, uint64_t off, uint64_t len, uint64_t *pnum)
{
    if (f->is_blockdev) {
        *pnum = len;
        return 1;
    }
    off_t data = lseek(f->fd, (off_t)off, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {
            /* No data at or after off: a hole up to EOF (and beyond). */
            *pnum = len;
            return 0;
        }
        if (errno == EINVAL || errno == EOPNOTSUPP) {
            *pnum = len;
            return 1;
        }
        return -errno;
    }
    if ((uint64_t)data > off) {
        *pnum = MIN(len, (uint64_t)data - off);
        return 0;
    }
    off_t hole = lseek(f->fd, (off_t)off, SEEK_HOLE);
    if (hole < 0) {
        if (errno == ENXIO) {
            *pnum = len;
            return 1;
        }
        return -errno;
    }
    if ((uint64_t)hole <= off) {
        /* Racing with a writer; report data for the smallest unit. */
        *pnum = MIN(len, 1);
        return 1;
    }
    *pnum = MIN(len, (uint64_t)hole - off);
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Children: file I/O on behalf of a request                                 */
/* ------------------------------------------------------------------------ */

static void child_io_done(VdkIoReq *io);
static void child_start(VdkChild *c);
static void zero_next(VdkChild *c);

/* write_zeroes methods, tried in this order (a refused one is remembered
 * per file and skipped from then on). */
enum {
    ZERO_BLKZEROOUT = 0,   /* devices, aligned ranges */
    ZERO_PUNCH_UNMAP,      /* MAY_UNMAP: a hole is fine */
    ZERO_RANGE,            /* keeps the allocation */
    ZERO_PUNCH_KEEP,       /* no ZERO_RANGE (tmpfs...): punch... */
    ZERO_REALLOCATE,       /* ...then allocate again, as asked */
    ZERO_WRITE_SETUP,      /* last resort: write zero buffers */
    ZERO_WRITE,
};


static VdkChild *
child_get(VdkRequest *r, VdkFile *f)
{
    VdkQueue *q = r->q;
    VdkChild *c = q->free_children;
    if (c) {
        q->free_children = c->next;
        q->nchildren--;
    } else {
        c = g_new0(VdkChild, 1);
    }
    struct iovec *heap = c->iov_heap;
    int cap = c->iov_cap;
    memset(c, 0, sizeof(*c));
    c->iov_heap = heap;
    c->iov_cap = cap;
    c->req = r;
    c->file = f;
    c->io.complete = child_io_done;
    c->io.opaque = c;
    r->pending++;
    return c;
}

/* Keep a few children per queue for reuse; free the rest. */
#define CHILD_CACHE_MAX 1024

static void
child_put(VdkChild *c)
{
    VdkQueue *q = c->req->q;
    if (c->bounce) {
        free(c->bounce);
        c->bounce = NULL;
    }
    if (q->nchildren >= CHILD_CACHE_MAX) {
        g_free(c->iov_heap);
        g_free(c);
        return;
    }
    if (c->iov_cap > 64) {
        g_free(c->iov_heap);
        c->iov_heap = NULL;
        c->iov_cap = 0;
    }
    c->next = q->free_children;
    q->free_children = c;
    q->nchildren++;
}

/* Room for @n iovecs in the child. */
static struct iovec *
child_iov(VdkChild *c, int n)
{
    if (n <= VDK_REQ_INLINE_IOV) {
        return c->iov_inline;
    }
    if (c->iov_cap < n) {
        g_free(c->iov_heap);
        c->iov_heap = g_new(struct iovec, n);
        c->iov_cap = n;
    }
    return c->iov_heap;
}

static void untrack(VdkChild *c);

static void
child_finish(VdkChild *c, int err)
{
    VdkRequest *r = c->req;
    if (err < 0) {
        vdk_req_set_error(r, err);
    }
    if (c->tracked) {
        untrack(c);
    }
    child_put(c);
    vdk_request_child_done(r);
}

static bool
iov_aligned(const struct iovec *iov, int cnt, uint32_t buf_align, uint32_t req_align)
{
    for (int i = 0; i < cnt; i++) {
        if (((uintptr_t)iov[i].iov_base % buf_align) != 0 || (iov[i].iov_len % req_align) != 0) {
            return false;
        }
    }
    return true;
}

/* Copy @len bytes between a flat buffer and an iovec array. */
static void
iov_to_buf(const struct iovec *iov, int cnt, void *buf, uint64_t len)
{
    char *p = buf;
    for (int i = 0; i < cnt && len > 0; i++) {
        size_t n = (size_t)MIN((uint64_t)iov[i].iov_len, len);
        memcpy(p, iov[i].iov_base, n);
        p += n;
        len -= n;
    }
}

static void
buf_to_iov(const void *buf, const struct iovec *iov, int cnt, uint64_t len)
{
    const char *p = buf;
    for (int i = 0; i < cnt && len > 0; i++) {
        size_t n = (size_t)MIN((uint64_t)iov[i].iov_len, len);
        memcpy(iov[i].iov_base, p, n);
        p += n;
        len -= n;
    }
}

static void
child_wake(VdkChild *c, VdkQueue *cur)
{
    VdkQueue *q = c->req->q;
    /* Woken children restart on their own queue's thread: if that is the
     * queue reaping right now on this thread, its ready list; otherwise the
     * cross-thread list and the eventfd. */
    if (q == cur && q->in_reap) {
        c->next = q->ready;
        q->ready = c;
        return;
    }
    g_mutex_lock(&q->wake_lock);
    c->next = q->woken;
    q->woken = c;
    g_mutex_unlock(&q->wake_lock);
    vdk_io_eventfd_signal(q->efd);
}

/* Exclusive writes (RMW, buffered tail) exclude every overlapping write;
 * plain aligned direct writes only exclude exclusive ones. */
static bool
track(VdkChild *c, bool exclusive)
{
    VdkFile *f = c->file;
    g_mutex_lock(&f->lock);
    for (VdkChild *t = f->tracked; t; t = t->track_next) {
        if (t->a_start < c->a_end && c->a_start < t->a_end && (exclusive || t->exclusive)) {
            c->waiting = true;
            c->wait_next = t->waiters;
            t->waiters = c;
            g_mutex_unlock(&f->lock);
            return false;
        }
    }
    c->track_next = f->tracked;
    f->tracked = c;
    c->tracked = true;
    c->exclusive = exclusive;
    g_mutex_unlock(&f->lock);
    return true;
}

static void
untrack(VdkChild *c)
{
    VdkFile *f = c->file;
    g_mutex_lock(&f->lock);
    for (VdkChild **p = &f->tracked; *p; p = &(*p)->track_next) {
        if (*p == c) {
            *p = c->track_next;
            break;
        }
    }
    VdkChild *w = c->waiters;
    c->waiters = NULL;
    c->tracked = false;
    g_mutex_unlock(&f->lock);
    while (w) {
        VdkChild *next = w->wait_next;
        w->wait_next = NULL;
        w->waiting = false;
        child_wake(w, c->req->q);
        w = next;
    }
}

static void
child_queue_io(VdkChild *c)
{
    vdk_queue_engine_op(c->req->q, &c->io);
}

static void
child_setup_rw(VdkChild *c, int fd, bool is_write, uint64_t off, struct iovec *iov, int cnt, uint64_t len)
{
    c->io.op = is_write ? VDK_IO_WRITEV : VDK_IO_READV;
    c->io.fd = fd;
    c->io.offset = off;
    c->io.len = len;
    c->io.iov = iov;
    c->io.iovcnt = cnt;
    c->io.short_is_eof = c->file->direct && fd == c->file->fd;
    c->io.rw_flags = 0;
    if (is_write && (c->flags & VDK_REQ_FUA) && !c->file->dsync) {
        c->io.rw_flags = RWF_DSYNC;
    }
}

/* (Re)start a child: decide how to do its transfer and hand it to the
 * engine, or park it behind an overlapping write. */
static void
child_start(VdkChild *c)
{
    VdkFile *f = c->file;
    switch (c->kind) {
    case VDK_CHILD_PLAIN:
        if (c->is_write && f->direct && !c->tracked) {
            if (!track(c, c->io.fd != f->fd)) {
                return;
            }
        }
        child_queue_io(c);
        return;
    case VDK_CHILD_RMW_READ:
        if (!c->tracked && !track(c, true)) {
            return;
        }
        /* Read the head block, then the tail block (see child_io_done). */
        {
            uint64_t head_end = c->a_start + f->req_align;
            bool need_head = c->offset != c->a_start;
            bool need_tail = (c->offset + c->len) != c->a_end;
            c->rmw_left = (need_head ? 1u : 0u) + (need_tail ? 1u : 0u);
            if (need_head && need_tail && c->a_end == head_end) {
                c->rmw_left = 1; /* one block holds both */
            }
            struct iovec *iov = child_iov(c, 1);
            if (need_head) {
                iov[0].iov_base = c->bounce;
                iov[0].iov_len = f->req_align;
                child_setup_rw(c, f->fd, false, c->a_start, iov, 1, f->req_align);
            } else {
                iov[0].iov_base = (char *)c->bounce + (c->a_end - c->a_start - f->req_align);
                iov[0].iov_len = f->req_align;
                child_setup_rw(c, f->fd, false, c->a_end - f->req_align, iov, 1, f->req_align);
            }
            c->io.short_is_eof = true;
            child_queue_io(c);
        }
        return;
    case VDK_CHILD_RMW_WRITE:
        if (!c->tracked && !track(c, true)) {
            return;
        }
        child_queue_io(c);
        return;
    case VDK_CHILD_ZERO:
        if (f->direct && !c->tracked && !track(c, true)) {
            return;
        }
        zero_next(c);
        return;
    default:
        child_queue_io(c);
        return;
    }
}

void
vdk_req_file_rw(VdkRequest *r, VdkFile *f, bool is_write, uint64_t off, const struct iovec *iov, int iovcnt,
                uint64_t len, uint32_t flags)
{
    if (len == 0) {
        return;
    }
    VdkChild *c = child_get(r, f);
    c->is_write = is_write;
    c->offset = off;
    c->len = len;
    c->flags = flags;

    if (!f->direct || (off % f->req_align == 0 && len % f->req_align == 0 &&
                       iov_aligned(iov, iovcnt, f->buf_align, f->req_align))) {
        struct iovec *v = child_iov(c, iovcnt);
        memcpy(v, iov, sizeof(*iov) * (size_t)iovcnt);
        c->kind = VDK_CHILD_PLAIN;
        c->a_start = off;
        c->a_end = off + len;
        child_setup_rw(c, f->fd, is_write, off, v, iovcnt, len);
        child_start(c);
        return;
    }

    uint64_t a0 = vdk_align_down(off, f->req_align);
    uint64_t a1 = vdk_align_up(off + len, f->req_align);
    c->a_start = a0;
    c->a_end = a1;
    struct iovec *u = child_iov(c, iovcnt + 1);
    memcpy(u + 1, iov, sizeof(*iov) * (size_t)iovcnt);
    c->uiov = u + 1;
    c->uiovcnt = iovcnt;

    if (is_write && a1 > __atomic_load_n(&f->size, __ATOMIC_RELAXED) &&
        (off + len) % f->req_align != 0) {
        /* The aligned write would extend the file past the caller's end:
         * write exactly the caller's bytes through the buffered twin. */
        int bfd = file_buffered_fd(f);
        if (bfd < 0) {
            child_finish(c, -errno);
            return;
        }
        /* The page cache works in pages: a direct write to another
         * block of a page this write dirties must not run concurrently,
         * or the kernel cannot invalidate the page after the direct write
         * and reports a (sticky) EIO on the next fsync.  Track the whole
         * pages. */
        uint64_t page = file_page_size();
        c->a_start = vdk_align_down(off, page);
        c->a_end = vdk_align_up(off + len, page);
        c->kind = VDK_CHILD_PLAIN;
        child_setup_rw(c, bfd, true, off, c->uiov, iovcnt, len);
        child_start(c);
        return;
    }

    if (posix_memalign(&c->bounce, MAX(f->buf_align, 512u), (size_t)(a1 - a0)) != 0) {
        c->bounce = NULL;
        child_finish(c, -ENOMEM);
        return;
    }
    if (!is_write) {
        c->kind = VDK_CHILD_BOUNCE_READ;
        u[0].iov_base = c->bounce;
        u[0].iov_len = (size_t)(a1 - a0);
        child_setup_rw(c, f->fd, false, a0, u, 1, a1 - a0);
        child_start(c);
        return;
    }
    if (off == a0 && (off + len) == a1) {
        /* Only the buffer is misaligned: copy, no read needed. */
        iov_to_buf(c->uiov, iovcnt, c->bounce, len);
        c->kind = VDK_CHILD_RMW_WRITE;
        u[0].iov_base = c->bounce;
        u[0].iov_len = (size_t)(a1 - a0);
        child_setup_rw(c, f->fd, true, a0, u, 1, a1 - a0);
        child_start(c);
        return;
    }
    c->kind = VDK_CHILD_RMW_READ;
    child_start(c);
}

/* After the RMW reads: merge the caller's bytes and write the aligned range. */
static void
child_rmw_write(VdkChild *c)
{
    VdkFile *f = c->file;
    iov_to_buf(c->uiov, c->uiovcnt, (char *)c->bounce + (c->offset - c->a_start), c->len);
    c->kind = VDK_CHILD_RMW_WRITE;
    struct iovec *u = c->uiov - 1;
    u[0].iov_base = c->bounce;
    u[0].iov_len = (size_t)(c->a_end - c->a_start);
    child_setup_rw(c, f->fd, true, c->a_start, u, 1, c->a_end - c->a_start);
    child_queue_io(c);
}

static void
child_io_done(VdkIoReq *io)
{
    VdkChild *c = io->opaque;
    VdkFile *f = c->file;
    int err = io->result < 0 ? (int)io->result : 0;

    switch (c->kind) {
    case VDK_CHILD_PLAIN:
        if (!err && c->is_write) {
            file_size_at_least(f, c->offset + c->len);
        }
        if (err && c->zero_step < 0 && (err == -EOPNOTSUPP || err == -ENOTTY || err == -EINVAL)) {
            /* Discard refused by the filesystem or device: advisory, fine. */
            err = 0;
        }
        child_finish(c, err);
        return;
    case VDK_CHILD_FLUSH:
        if (err) {
            int expected = 0;
            __atomic_compare_exchange_n(&f->flush_error, &expected, err, false, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE);
        }
        child_finish(c, err);
        return;
    case VDK_CHILD_BOUNCE_READ:
        if (!err) {
            buf_to_iov((char *)c->bounce + (c->offset - c->a_start), c->uiov, c->uiovcnt, c->len);
        }
        child_finish(c, err);
        return;
    case VDK_CHILD_RMW_READ:
        if (err) {
            child_finish(c, err);
            return;
        }
        if (--c->rmw_left > 0) {
            /* Head done; now the tail block. */
            struct iovec *iov = c->uiov - 1;
            iov[0].iov_base = (char *)c->bounce + (c->a_end - c->a_start - f->req_align);
            iov[0].iov_len = f->req_align;
            child_setup_rw(c, f->fd, false, c->a_end - f->req_align, iov, 1, f->req_align);
            c->io.short_is_eof = true;
            child_queue_io(c);
            return;
        }
        child_rmw_write(c);
        return;
    case VDK_CHILD_RMW_WRITE:
        if (!err) {
            file_size_at_least(f, c->a_end);
        }
        child_finish(c, err);
        return;
    case VDK_CHILD_ZERO:
        if (c->zero_step == ZERO_REALLOCATE) {
            /* The range is a hole and reads as zeroes already: allocating it
             * again is what was asked, but its failure loses nothing. */
            child_finish(c, 0);
            return;
        }
        if (err == 0) {
            if (c->io.op == VDK_IO_WRITEV) {
                c->offset += c->io.len;
                c->len -= c->io.len;
                file_size_at_least(f, c->offset);
                if (c->len > 0) {
                    zero_next(c);
                    return;
                }
            } else if (c->zero_step == ZERO_PUNCH_KEEP) {
                c->zero_step = ZERO_REALLOCATE;
                zero_next(c);
                return;
            }
            child_finish(c, 0);
            return;
        }
        if (err == -EOPNOTSUPP || err == -ENOTTY || err == -EINVAL || err == -ENOSYS) {
            /* Remember what this file cannot do and try the next method. */
            if (c->io.op == VDK_IO_FALLOCATE) {
                if (c->io.mode & FALLOC_FL_ZERO_RANGE) {
                    __atomic_store_n(&f->zero_range_state, -1, __ATOMIC_RELAXED);
                } else {
                    __atomic_store_n(&f->punch_hole_state, -1, __ATOMIC_RELAXED);
                }
            }
            c->zero_step = c->zero_step == ZERO_PUNCH_KEEP ? ZERO_WRITE_SETUP : c->zero_step + 1;
            zero_next(c);
            return;
        }
        child_finish(c, err);
        return;
    }
    child_finish(c, -EIO);
}

static void
zero_fallocate(VdkChild *c, int mode)
{
    c->io.op = VDK_IO_FALLOCATE;
    c->io.fd = c->file->fd;
    c->io.mode = mode;
    c->io.offset = c->offset;
    c->io.len = c->len;
    child_queue_io(c);
}

/* Choose the next write_zeroes method for the remaining range. */
static void
zero_next(VdkChild *c)
{
    VdkFile *f = c->file;
    bool in_file = c->offset + c->len <= __atomic_load_n(&f->size, __ATOMIC_RELAXED);
    for (;;) {
        switch (c->zero_step) {
        case ZERO_BLKZEROOUT:
            if (f->is_blockdev && c->offset % f->logical_block_size == 0 &&
                c->len % f->logical_block_size == 0) {
                c->io.op = VDK_IO_BLKZEROOUT;
                c->io.fd = f->fd;
                c->io.offset = c->offset;
                c->io.len = c->len;
                child_queue_io(c);
                return;
            }
            c->zero_step = ZERO_PUNCH_UNMAP;
            continue;
        case ZERO_PUNCH_UNMAP:
            if (!f->is_blockdev && (c->flags & VDK_REQ_MAY_UNMAP) && in_file &&
                __atomic_load_n(&f->punch_hole_state, __ATOMIC_RELAXED) >= 0) {
                zero_fallocate(c, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
                return;
            }
            c->zero_step = ZERO_RANGE;
            continue;
        case ZERO_RANGE:
            if (!f->is_blockdev && __atomic_load_n(&f->zero_range_state, __ATOMIC_RELAXED) >= 0) {
                zero_fallocate(c, FALLOC_FL_ZERO_RANGE);
                return;
            }
            c->zero_step = ZERO_PUNCH_KEEP;
            continue;
        case ZERO_PUNCH_KEEP:
            if (!f->is_blockdev && !(c->flags & VDK_REQ_MAY_UNMAP) && in_file &&
                __atomic_load_n(&f->punch_hole_state, __ATOMIC_RELAXED) >= 0) {
                zero_fallocate(c, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
                return;
            }
            c->zero_step = ZERO_WRITE_SETUP;
            continue;
        case ZERO_REALLOCATE:
            zero_fallocate(c, FALLOC_FL_KEEP_SIZE);
            return;
        case ZERO_WRITE_SETUP:
            if (c->flags & VDK_REQ_NO_FALLBACK) {
                child_finish(c, -ENOTSUP);
                return;
            }
            c->zero_step = ZERO_WRITE;
            /* Unaligned edges of an O_DIRECT file go through the RMW path
             * as separate children; this child writes the aligned middle. */
            if (f->direct) {
                uint64_t end = c->offset + c->len;
                uint64_t a0 = vdk_align_up(c->offset, f->req_align);
                uint64_t a1 = vdk_align_down(end, f->req_align);
                const void *z = zero_buffer();
                if (a0 >= a1) {
                    struct iovec v = {(void *)z, (size_t)c->len};
                    vdk_req_file_rw(c->req, f, true, c->offset, &v, 1, c->len, c->flags);
                    child_finish(c, 0);
                    return;
                }
                if (a0 > c->offset) {
                    struct iovec v = {(void *)z, (size_t)(a0 - c->offset)};
                    vdk_req_file_rw(c->req, f, true, c->offset, &v, 1, a0 - c->offset, c->flags);
                }
                if (end > a1) {
                    struct iovec v = {(void *)z, (size_t)(end - a1)};
                    vdk_req_file_rw(c->req, f, true, a1, &v, 1, end - a1, c->flags);
                }
                c->offset = a0;
                c->len = a1 - a0;
            }
            continue;
        case ZERO_WRITE: {
            uint64_t n = MIN(c->len, (uint64_t)ZERO_CHUNK);
            int cnt = (int)((n + ZERO_BUF_SIZE - 1) / ZERO_BUF_SIZE);
            struct iovec *v = child_iov(c, cnt);
            uint64_t left = n;
            for (int i = 0; i < cnt; i++) {
                v[i].iov_base = (void *)zero_buffer();
                v[i].iov_len = (size_t)MIN(left, (uint64_t)ZERO_BUF_SIZE);
                left -= v[i].iov_len;
            }
            child_setup_rw(c, f->fd, true, c->offset, v, cnt, n);
            child_queue_io(c);
            return;
        }
        default:
            child_finish(c, -EIO);
            return;
        }
    }
}

void
vdk_req_file_zero(VdkRequest *r, VdkFile *f, uint64_t off, uint64_t len, uint32_t flags)
{
    VdkChild *c = child_get(r, f);
    c->kind = VDK_CHILD_ZERO;
    c->is_write = true;
    c->offset = off;
    c->len = len;
    c->flags = flags;
    c->zero_step = ZERO_BLKZEROOUT;
    c->a_start = vdk_align_down(off, f->req_align);
    c->a_end = vdk_align_up(off + len, f->req_align);
    child_start(c);
}

void
vdk_req_file_discard(VdkRequest *r, VdkFile *f, uint64_t off, uint64_t len)
{
    if (f->is_blockdev) {
        uint64_t a0 = vdk_align_up(off, f->logical_block_size);
        uint64_t a1 = vdk_align_down(off + len, f->logical_block_size);
        if (a0 >= a1) {
            return;
        }
        off = a0;
        len = a1 - a0;
    } else if (__atomic_load_n(&f->punch_hole_state, __ATOMIC_RELAXED) < 0) {
        return;
    }
    VdkChild *c = child_get(r, f);
    c->kind = VDK_CHILD_PLAIN;
    c->zero_step = -1; /* marks a discard: refusals are not errors */
    c->io.fd = f->fd;
    c->io.offset = off;
    c->io.len = len;
    if (f->is_blockdev) {
        c->io.op = VDK_IO_BLKDISCARD;
    } else {
        c->io.op = VDK_IO_FALLOCATE;
        c->io.mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    }
    child_queue_io(c);
}

void
vdk_req_file_flush(VdkRequest *r, VdkFile *f)
{
    if (f->no_flush || f->read_only) {
        return;
    }
    VdkChild *c = child_get(r, f);
    c->kind = VDK_CHILD_FLUSH;
    c->io.op = VDK_IO_FDATASYNC;
    c->io.fd = f->fd;
    int sticky = __atomic_load_n(&f->flush_error, __ATOMIC_ACQUIRE);
    if (sticky) {
        /* After a failed fdatasync the kernel may have dropped the dirty
         * pages and a later fdatasync can succeed without them: a failed
         * flush stays failed. */
        c->io.result = sticky;
        vdk_queue_complete_later(r->q, &c->io);
        return;
    }
    child_queue_io(c);
}

/* Restart children woken on this queue (called by the queue's reap loop). */
void vdk_queue_run_ready(VdkQueue *q);

void
vdk_queue_run_ready(VdkQueue *q)
{
    g_mutex_lock(&q->wake_lock);
    VdkChild *w = q->woken;
    q->woken = NULL;
    g_mutex_unlock(&q->wake_lock);
    while (w) {
        VdkChild *next = w->next;
        w->next = q->ready;
        q->ready = w;
        w = next;
    }
    while (q->ready) {
        VdkChild *c = q->ready;
        q->ready = c->next;
        c->next = NULL;
        child_start(c);
    }
}

void
vdk_queue_free_children(VdkQueue *q);

void
vdk_queue_free_children(VdkQueue *q)
{
    while (q->free_children) {
        VdkChild *c = q->free_children;
        q->free_children = c->next;
        g_free(c->iov_heap);
        g_free(c);
    }
    q->nchildren = 0;
}
