/* SPDX-License-Identifier: MIT */
/*
 * io.c - engine selection and the helpers every engine shares: the
 * synchronous executor used by worker threads, short-transfer accounting and
 * end-of-file zero filling.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <limits.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "io/io.h"
#include "vdk/vdk.h"

static const VdkIoEngine *const io_engines[] = {
#ifdef VDK_HAVE_IO_URING
    &vdk_io_engine_uring,
#endif
#ifdef VDK_HAVE_LIBAIO
    &vdk_io_engine_aio,
#endif
    &vdk_io_engine_threads,
    &vdk_io_engine_fault,
};

const VdkIoEngine *
vdk_io_engine_select(const char *name, char **reason, GError **error)
{
    if (reason) {
        *reason = NULL;
    }
    if (name == NULL || strcmp(name, "auto") == 0) {
#ifdef VDK_HAVE_IO_URING
        GError *err = NULL;
        if (vdk_io_engine_uring.available(&err)) {
            if (reason) {
                *reason = g_strdup("io_uring: available");
            }
            return &vdk_io_engine_uring;
        }
        if (reason) {
            *reason = g_strdup_printf("io_uring unusable (%s), using threads", err->message);
        }
        g_error_free(err);
#else
        if (reason) {
            *reason = g_strdup("io_uring support not compiled in, using threads");
        }
#endif
        return &vdk_io_engine_threads;
    }
    for (size_t i = 0; i < G_N_ELEMENTS(io_engines); i++) {
        if (strcmp(io_engines[i]->name, name) == 0) {
            if (!io_engines[i]->available(error)) {
                return NULL;
            }
            return io_engines[i];
        }
    }
    if (strcmp(name, "io_uring") == 0 || strcmp(name, "native") == 0) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "aio engine '%s' was not compiled into this build of vdk",
                    name);
    } else {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "invalid aio engine '%s' (expected io_uring, native, threads or auto)", name);
    }
    return NULL;
}

bool
vdk_io_advance(VdkIoReq *req, uint64_t n)
{
    req->done += n;
    while (n > 0 && req->iovcnt > 0) {
        if (n >= req->iov->iov_len) {
            n -= req->iov->iov_len;
            req->iov++;
            req->iovcnt--;
        } else {
            req->iov->iov_base = (char *)req->iov->iov_base + n;
            req->iov->iov_len -= n;
            n = 0;
        }
    }
    while (req->iovcnt > 0 && req->iov->iov_len == 0) {
        req->iov++;
        req->iovcnt--;
    }
    return req->iovcnt > 0;
}

void
vdk_io_zero_rest(VdkIoReq *req)
{
    for (int i = 0; i < req->iovcnt; i++) {
        memset(req->iov[i].iov_base, 0, req->iov[i].iov_len);
        req->done += req->iov[i].iov_len;
    }
    req->iovcnt = 0;
}

bool
vdk_io_rw_progress(VdkIoReq *req, int64_t res)
{
    bool is_read = req->op == VDK_IO_READV;
    if (res == -EINTR || res == -EAGAIN) {
        return false;
    }
    if (res < 0) {
        req->result = res;
        return true;
    }
    if (res == 0) {
        if (!is_read) {
            req->result = -EIO; /* a write that makes no progress */
            return true;
        }
        vdk_io_zero_rest(req);
    } else if (vdk_io_advance(req, (uint64_t)res)) {
        if (!(is_read && req->short_is_eof)) {
            return false;
        }
        vdk_io_zero_rest(req);
    }
    req->result = (int64_t)req->done;
    return true;
}

void
vdk_io_eventfd_signal(int efd)
{
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(efd, &one, sizeof(one));
    } while (r < 0 && errno == EINTR);
    /* EAGAIN means the counter is saturated: it is readable anyway. */
}

static int64_t
io_exec_rw(VdkIoReq *req)
{
    if (req->iovcnt == 0) {
        return 0;
    }
    for (;;) {
        ssize_t r;
        off_t off = (off_t)(req->offset + req->done);
        int cnt = MIN(req->iovcnt, IOV_MAX);
        if (req->op == VDK_IO_READV) {
            r = preadv2(req->fd, req->iov, cnt, off, (int)req->rw_flags);
        } else {
            r = pwritev2(req->fd, req->iov, cnt, off, (int)req->rw_flags);
        }
        /* A retried EAGAIN would spin: only EINTR is worth repeating here. */
        if (vdk_io_rw_progress(req, r < 0 ? (errno == EAGAIN ? -EIO : -errno) : r)) {
            return req->result;
        }
    }
}

void
vdk_io_exec_sync(VdkIoReq *req)
{
    int r;
    if (req->preset_error) {
        req->result = req->preset_error;
        return;
    }
    switch (req->op) {
    case VDK_IO_READV:
    case VDK_IO_WRITEV:
        req->result = io_exec_rw(req);
        return;
    case VDK_IO_FDATASYNC:
        do {
            r = fdatasync(req->fd);
        } while (r < 0 && errno == EINTR);
        req->result = r < 0 ? -errno : 0;
        return;
    case VDK_IO_FALLOCATE:
        do {
            r = fallocate(req->fd, req->mode, (off_t)req->offset, (off_t)req->len);
        } while (r < 0 && errno == EINTR);
        req->result = r < 0 ? -errno : 0;
        return;
    case VDK_IO_BLKDISCARD:
    case VDK_IO_BLKZEROOUT: {
        uint64_t range[2] = {req->offset, req->len};
        r = ioctl(req->fd, req->op == VDK_IO_BLKDISCARD ? BLKDISCARD : BLKZEROOUT, range);
        req->result = r < 0 ? -errno : 0;
        return;
    }
    case VDK_IO_NOP:
        req->result = 0;
        return;
    }
    req->result = -EINVAL;
}
