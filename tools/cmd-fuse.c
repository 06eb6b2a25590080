/* SPDX-License-Identifier: MIT */
/*
 * cmd-fuse.c - `vdk fuse`: present an image's guest-visible content as one
 * regular file (libfuse3), as qemu-storage-daemon's FUSE export does.
 *
 * The mountpoint is a regular file; the image is mounted over it.  FUSE
 * requests are served by libfuse's worker threads (fuse_loop_mt), each with
 * a VdkQueue of its own (the library's one-queue-per-thread model), so
 * requests from parallel readers and writers run side by side instead of
 * one at a time through the sync calls.  fsync/flush flush the image; fallocate
 * with PUNCH_HOLE or ZERO_RANGE becomes write_zeroes (may unmap), so the
 * range reads as zeroes afterwards; lseek SEEK_DATA/SEEK_HOLE walks block
 * status.  SIGINT, SIGTERM and SIGHUP (or `fusermount3 -u MOUNTPOINT`) end
 * the loop; the image is then flushed and closed, and the exit status says
 * whether that worked.  The FUSE part lives in the tool, not the library,
 * so libvdk does not depend on libfuse.
 */
#define FUSE_USE_VERSION 35
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <getopt.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tools/tool.h"

static const char fuse_help[] =
    "usage: vdk fuse [-f FMT] [-r] [-t CACHE] [--aio=AIO] [-U] FILENAME MOUNTPOINT\n"
    "\n"
    "Show the image's guest-visible content as the regular file MOUNTPOINT\n"
    "(which must exist and be a regular file) until interrupted (Ctrl-C,\n"
    "SIGTERM) or unmounted with `fusermount3 -u MOUNTPOINT`; then the image is\n"
    "flushed and closed.  Reads, writes, fsync, fallocate (punch hole and zero\n"
    "range read as zeroes afterwards) and lseek SEEK_DATA/SEEK_HOLE work on it.\n"
    "\n"
    "  -f FMT            image format (default: probed; a probed raw image is\n"
    "                    exported read-only)\n"
    "  -r, --read-only   export read-only\n"
    "  -t CACHE          cache mode (default writeback)\n"
    "  --aio=AIO         I/O engine: io_uring, native, threads (default auto)\n"
    "  -U, --force-share open without locking (read-only only)\n";

/* libfuse's default maximum of worker threads (FUSE_LOOP_MT_DEF_MAX_THREADS);
 * kept alive while idle so each keeps its queue */
#define FX_IDLE_THREADS 10
/* requests a worker has in flight at once: one (it waits for each) */
#define FX_QUEUE_DEPTH 4

typedef struct FxQueue FxQueue;

typedef struct {
    VdkImage *img;
    uint64_t size;
    bool read_only;
    struct stat st; /* the mountpoint as it was: owner, times */
    pthread_key_t key; /* the worker thread's FxQueue */
    GMutex lock;       /* queues */
    FxQueue *queues;   /* every live worker queue, freed at the end at the latest */
} FuseExport;

struct FxQueue {
    FuseExport *e;
    VdkQueue *q;
    FxQueue *next;
};

static void
fxq_unlink_free(FxQueue *x)
{
    FuseExport *e = x->e;
    g_mutex_lock(&e->lock);
    for (FxQueue **pp = &e->queues; *pp; pp = &(*pp)->next) {
        if (*pp == x) {
            *pp = x->next;
            break;
        }
    }
    g_mutex_unlock(&e->lock);
    vdk_queue_free(x->q);
    g_free(x);
}

/* pthread key destructor: a worker thread that ends takes its queue along */
static void
fxq_thread_end(void *p)
{
    fxq_unlink_free(p);
}

static FuseExport *
fx(void)
{
    return fuse_get_context()->private_data;
}

/* The calling worker thread's queue, made on its first request. */
static VdkQueue *
fx_queue(FuseExport *e)
{
    FxQueue *x = pthread_getspecific(e->key);
    if (x) {
        return x->q;
    }
    GError *err = NULL;
    VdkQueue *q = vdk_queue_new(e->img, FX_QUEUE_DEPTH, &err);
    if (!q) {
        g_log("vdk", G_LOG_LEVEL_DEBUG, "fuse: cannot make a queue: %s", err->message);
        g_error_free(err);
        return NULL;
    }
    x = g_new0(FxQueue, 1);
    x->e = e;
    x->q = q;
    if (pthread_setspecific(e->key, x) != 0) {
        vdk_queue_free(q);
        g_free(x);
        return NULL;
    }
    g_mutex_lock(&e->lock);
    x->next = e->queues;
    e->queues = x;
    g_mutex_unlock(&e->lock);
    return q;
}

/* Wait for the one request just queued (@queued: the queue call's result). */
static int64_t
fx_wait(VdkQueue *q, int queued)
{
    if (queued < 0) {
        return queued;
    }
    VdkCompletion c;
    int r;
    do {
        r = vdk_queue_submit_and_wait(q, &c, 1, 1, -1);
    } while (r == 0 || r == -EINTR);
    return r < 0 ? r : c.result;
}

static int
fx_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    (void)fi;
    if (strcmp(path, "/") != 0) {
        return -ENOENT;
    }
    FuseExport *e = fx();
    memset(st, 0, sizeof(*st));
    st->st_mode = S_IFREG | (e->read_only ? 0444 : 0644);
    st->st_nlink = 1;
    st->st_uid = e->st.st_uid;
    st->st_gid = e->st.st_gid;
    st->st_size = (off_t)e->size;
    st->st_blksize = 4096;
    st->st_blocks = (blkcnt_t)(vdk_image_get_actual_size(e->img) / 512);
    st->st_atim = e->st.st_atim;
    st->st_mtim = e->st.st_mtim;
    st->st_ctim = e->st.st_ctim;
    return 0;
}

static int
fx_open(const char *path, struct fuse_file_info *fi)
{
    if (strcmp(path, "/") != 0) {
        return -ENOENT;
    }
    if ((fi->flags & O_ACCMODE) != O_RDONLY && fx()->read_only) {
        return -EROFS;
    }
    /* every read and write reaches the image (no second copy in the page
     * cache, sizes and flushes exact) */
    fi->direct_io = 1;
    return 0;
}

static int
fx_read(const char *path, char *buf, size_t len, off_t off, struct fuse_file_info *fi)
{
    (void)path;
    (void)fi;
    FuseExport *e = fx();
    if (off < 0) {
        return -EINVAL;
    }
    if ((uint64_t)off >= e->size) {
        return 0;
    }
    len = (size_t)MIN((uint64_t)len, e->size - (uint64_t)off);
    VdkQueue *q = fx_queue(e);
    if (!q) {
        return -ENOMEM;
    }
    int64_t r = fx_wait(q, vdk_queue_read(q, (uint64_t)off, buf, len, 0));
    return r < 0 ? (int)r : (int)len;
}

static int
fx_write(const char *path, const char *buf, size_t len, off_t off, struct fuse_file_info *fi)
{
    (void)path;
    (void)fi;
    FuseExport *e = fx();
    if (e->read_only) {
        return -EROFS;
    }
    if (off < 0) {
        return -EINVAL;
    }
    if ((uint64_t)off >= e->size) {
        return len ? -ENOSPC : 0;
    }
    len = (size_t)MIN((uint64_t)len, e->size - (uint64_t)off);
    VdkQueue *q = fx_queue(e);
    if (!q) {
        return -ENOMEM;
    }
    int64_t r = fx_wait(q, vdk_queue_write(q, (uint64_t)off, buf, len, 0, 0));
    return r < 0 ? (int)r : (int)len;
}

static int
fx_flush_image(void)
{
    FuseExport *e = fx();
    if (e->read_only) {
        return 0;
    }
    VdkQueue *q = fx_queue(e);
    if (!q) {
        return -ENOMEM;
    }
    int64_t r = fx_wait(q, vdk_queue_flush(q, 0));
    return r < 0 ? (int)r : 0;
}

static int
fx_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
    (void)path;
    (void)datasync;
    (void)fi;
    return fx_flush_image();
}

static int
fx_flush(const char *path, struct fuse_file_info *fi)
{
    (void)path;
    (void)fi;
    return fx_flush_image(); /* close(2): what was written is durable */
}

static int
fx_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
    (void)path;
    (void)fi;
    /* the disk's size is fixed here (vdk resize changes it); O_TRUNC on an
     * open of the whole disk is accepted as a no-op only at its own size */
    return (uint64_t)size == fx()->size ? 0 : -EPERM;
}

static int
fx_fallocate(const char *path, int mode, off_t off, off_t len, struct fuse_file_info *fi)
{
    (void)path;
    (void)fi;
    FuseExport *e = fx();
    if (e->read_only) {
        return -EROFS;
    }
    if (off < 0 || len <= 0) {
        return -EINVAL;
    }
    uint64_t end;
    if (vdk_add_overflows((uint64_t)off, (uint64_t)len, &end)) {
        return -EINVAL;
    }
    if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
        if ((uint64_t)off >= e->size) {
            return 0;
        }
        end = MIN(end, e->size);
        unsigned flags = (mode & FALLOC_FL_PUNCH_HOLE) ? VDK_REQ_MAY_UNMAP : 0;
        VdkQueue *q = fx_queue(e);
        if (!q) {
            return -ENOMEM;
        }
        int64_t r = fx_wait(q, vdk_queue_write_zeroes(q, (uint64_t)off, end - (uint64_t)off, flags, 0));
        return r < 0 ? (int)r : 0;
    }
    if (mode == 0 || mode == FALLOC_FL_KEEP_SIZE) {
        /* the disk is all addressable already; growing it is not ours */
        return end <= e->size || (mode & FALLOC_FL_KEEP_SIZE) ? 0 : -ENOSPC;
    }
    return -EOPNOTSUPP;
}

static off_t
fx_lseek(const char *path, off_t off, int whence, struct fuse_file_info *fi)
{
    (void)path;
    (void)fi;
    FuseExport *e = fx();
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        return -EINVAL; /* the kernel handles SET/CUR/END */
    }
    if (off < 0 || (uint64_t)off >= e->size) {
        return -ENXIO;
    }
    VdkQueue *q = fx_queue(e);
    if (!q) {
        return -ENOMEM;
    }
    uint64_t pos = (uint64_t)off;
    while (pos < e->size) {
        VdkBlockStatus bs;
        int64_t r = fx_wait(q, vdk_queue_block_status(q, pos, e->size - pos, &bs, 0));
        if (r < 0) {
            return (off_t)r;
        }
        bool data = (bs.flags & VDK_BS_DATA) || !(bs.flags & VDK_BS_ZERO);
        if (data == (whence == SEEK_DATA)) {
            return (off_t)pos;
        }
        pos += bs.length;
    }
    /* no data after off: ENXIO; the end of the file is a hole */
    return whence == SEEK_DATA ? -ENXIO : (off_t)e->size;
}

static void *
fx_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    (void)conn;
    cfg->direct_io = 1;
    cfg->attr_timeout = 0;
    cfg->entry_timeout = 0;
    return fuse_get_context()->private_data;
}

static const struct fuse_operations fx_ops = {
    .init = fx_init,
    .getattr = fx_getattr,
    .open = fx_open,
    .read = fx_read,
    .write = fx_write,
    .flush = fx_flush,
    .fsync = fx_fsync,
    .truncate = fx_truncate,
    .fallocate = fx_fallocate,
    .lseek = fx_lseek,
};

int
cmd_fuse(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"read-only", no_argument, NULL, 'r'},
        {"aio", required_argument, NULL, 'a'},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.cache = "writeback"};
    int c;
    while ((c = getopt_long(argc, argv, "hf:rt:U", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, fuse_help);
            return 0;
        case 'f':
            o.format = optarg;
            break;
        case 'r':
            o.read_only = true;
            break;
        case 't':
            o.cache = optarg;
            break;
        case 'a':
            o.aio = optarg;
            break;
        case 'U':
            o.force_share = true;
            break;
        case 'I':
            o.image_opts = true;
            break;
        default:
            tool_usage(stderr, fuse_help);
            return 1;
        }
    }
    if (argc - optind != 2) {
        tool_usage(stderr, fuse_help);
        return 1;
    }
    const char *filename = argv[optind];
    const char *mountpoint = argv[optind + 1];
    FuseExport e = {0};
    if (stat(mountpoint, &e.st) != 0) {
        tool_error(mountpoint, "%s", g_strerror(errno));
        return 1;
    }
    if (!S_ISREG(e.st.st_mode)) {
        tool_error(mountpoint, "the mountpoint must be a regular file (the image is shown as one file)");
        return 1;
    }
    if (access("/dev/fuse", R_OK | W_OK) != 0) {
        tool_error(NULL, "/dev/fuse: %s", g_strerror(errno));
        return 1;
    }
    e.img = tool_open(filename, &o);
    if (!e.img) {
        return 1;
    }
    e.size = vdk_image_get_size(e.img);
    e.read_only = vdk_image_is_read_only(e.img);
    g_mutex_init(&e.lock);
    if (pthread_key_create(&e.key, fxq_thread_end) != 0) {
        tool_error(NULL, "cannot make a thread key");
        g_mutex_clear(&e.lock);
        vdk_image_close(e.img, NULL);
        return 1;
    }

    char *fsname = g_strdup_printf("-ofsname=vdk:%s,subtype=vdk%s", filename, e.read_only ? ",ro" : "");
    char *fargv[] = {"vdk", fsname, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(2, fargv);
    struct fuse *f = fuse_new(&args, &fx_ops, sizeof(fx_ops), &e);
    int ret = 1;
    if (!f) {
        tool_error(mountpoint, "cannot set up the FUSE export");
        goto out_close;
    }
    if (fuse_mount(f, mountpoint) != 0) {
        tool_error(mountpoint, "cannot mount the FUSE export over it");
        fuse_destroy(f);
        goto out_close;
    }
    struct fuse_session *se = fuse_get_session(f);
    if (fuse_set_signal_handlers(se) != 0) {
        tool_error(NULL, "cannot install signal handlers");
        fuse_unmount(f);
        fuse_destroy(f);
        goto out_close;
    }
    /* worker threads, each with its own queue; the loop returns once they
     * are joined (their queues go with them) */
    struct fuse_loop_config cfg = {.clone_fd = 0, .max_idle_threads = FX_IDLE_THREADS};
    int lr = fuse_loop_mt(f, &cfg);
    fuse_remove_signal_handlers(se);
    fuse_unmount(f);
    fuse_destroy(f);
    ret = lr < 0 ? 1 : 0;
    if (lr < 0) {
        tool_error(mountpoint, "the FUSE loop failed: %s", g_strerror(-lr));
    }
out_close:
    /* queues of threads that did not run their key destructor (none, when
     * libfuse joined them all) go before the image */
    while (e.queues) {
        fxq_unlink_free(e.queues);
    }
    pthread_key_delete(e.key);
    g_mutex_clear(&e.lock);
    GError *err = NULL;
    if (!vdk_image_close(e.img, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
    fuse_opt_free_args(&args);
    g_free(fsname);
    return ret;
}
