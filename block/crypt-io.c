/* SPDX-License-Identifier: MIT */
/*
 * crypt-io.c - data I/O of encrypted nodes (qcow2 with LUKS): the block
 * layer's part of encryption.
 *
 * A driver that encrypts its data sets n->crypt (a cipher and whether the
 * IV counts host or guest sectors).  The block layer then
 *   - reads DATA extents into a bounce buffer of whole 512-byte sectors,
 *     decrypts it on the node's crypto pool and copies the bytes asked for
 *     out on the queue's thread;
 *   - writes (in place and allocating, with their copy-on-write) by
 *     gathering the bytes into a bounce buffer, encrypting it on the pool
 *     and only then submitting the file write;
 *   - turns writes that do not cover whole sectors into a read of the
 *     partial sectors through the node, a merge and a sector-aligned write.
 * The pool's threads do the cipher work; the submitting thread only
 * queues jobs and goes on with other requests (a job resumes an internal
 * sub-request on its queue's thread when done, as compression does).
 *
 * Known limit: two concurrent writes that are not sector aligned and share
 * a sector can lose one update (the read-merge-write is not serialised);
 * guests write whole sectors, and the CLI submits one write at a time.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "block/block.h"
#include "block/luks.h"

#define CRYPT_MAX_THREADS 8

typedef struct {
    VdkNodeCrypt *nc;
    VdkRequest *r;      /* the request the bytes belong to */
    VdkRequest *sub;    /* resumed when the cipher work is done */
    bool encrypt;
    uint64_t sector;
    uint8_t *buf;
    size_t len;
    int ret;
    /* reads: where the plaintext goes */
    uint64_t skip, copy_len, guest_off;
    struct iovec *dst;
    int dstcnt;
    /* writes: where the ciphertext goes */
    VdkFile *file;
    uint64_t host_off;
    uint32_t flags;
} CryptJob;

static void
crypt_worker(gpointer data, gpointer user)
{
    (void)user;
    CryptJob *job = data;
    job->ret = vdk_cipher_run(job->nc->cipher, job->encrypt, job->sector, job->buf, job->len);
    vdk_request_resume(job->sub, NULL); /* continues on its queue's thread */
}

VdkNodeCrypt *
vdk_node_crypt_new(VdkCipher *cipher, bool host_iv)
{
    VdkNodeCrypt *nc = g_new0(VdkNodeCrypt, 1);
    nc->cipher = cipher;
    nc->host_iv = host_iv;
    g_mutex_init(&nc->lock);
    return nc;
}

void
vdk_node_crypt_free(VdkNodeCrypt *nc)
{
    if (!nc) {
        return;
    }
    if (nc->pool) {
        g_thread_pool_free(nc->pool, FALSE, TRUE);
    }
    vdk_cipher_free(nc->cipher);
    g_mutex_clear(&nc->lock);
    g_free(nc);
}

static bool
crypt_push(VdkNodeCrypt *nc, CryptJob *job)
{
    g_mutex_lock(&nc->lock);
    if (!nc->pool) {
        int threads = MIN((int)g_get_num_processors(), CRYPT_MAX_THREADS);
        nc->pool = g_thread_pool_new(crypt_worker, NULL, MAX(threads, 1), FALSE, NULL);
    }
    GThreadPool *pool = nc->pool;
    g_mutex_unlock(&nc->lock);
    return pool && g_thread_pool_push(pool, job, NULL);
}

static void
job_free(CryptJob *job)
{
    free(job->buf);
    g_free(job->dst);
    g_free(job);
}

static uint64_t
job_sector(const VdkNodeCrypt *nc, uint64_t host_off, uint64_t guest_off)
{
    return (nc->host_iv ? host_off : guest_off) / VDK_LUKS_SECTOR;
}

/* Run @job's cipher work off this thread; @done runs on the queue's
 * thread afterwards, as the done() of a sub-request of @parent. */
static void
job_start(VdkRequest *parent, CryptJob *job, VdkRequestDone *done)
{
    job->sub = vdk_subreq(parent, done, job);
    if (!crypt_push(job->nc, job)) {
        job->ret = -ENOMEM;
        vdk_subreq_launch(job->sub);
    }
    /* else the worker resumes job->sub, which then completes */
}

/* ------------------------------------------------------------------------ */
/* Reads                                                                     */
/* ------------------------------------------------------------------------ */

static void
read_decrypted(VdkRequest *sub)
{
    CryptJob *job = sub->done_opaque;
    if (job->ret < 0) {
        vdk_req_set_error(sub, job->ret);
    } else if (sub->error == 0) {
        vdk_iov_copy_in(job->dst, job->dstcnt, job->buf + job->skip, job->copy_len);
    }
    job_free(job);
}

static void
read_done(VdkRequest *sub)
{
    CryptJob *job = sub->done_opaque;
    if (sub->error) {
        job_free(job);
        return;
    }
    job_start(job->r, job, read_decrypted);
}

void
vdk_crypt_read(VdkRequest *r, VdkFile *f, uint64_t host_off, uint64_t guest_off, const struct iovec *iov, int iovcnt,
               uint64_t len)
{
    VdkNodeCrypt *nc = r->node->crypt;
    CryptJob *job = g_new0(CryptJob, 1);
    job->nc = nc;
    job->r = r;
    job->skip = host_off % VDK_LUKS_SECTOR;
    job->copy_len = len;
    job->len = (size_t)vdk_align_up(job->skip + len, VDK_LUKS_SECTOR);
    job->sector = job_sector(nc, host_off - job->skip, guest_off - job->skip);
    job->dst = g_memdup2(iov, sizeof(*iov) * (size_t)iovcnt);
    job->dstcnt = iovcnt;
    if (posix_memalign((void **)&job->buf, 4096, job->len) != 0) {
        job->buf = NULL;
        job_free(job);
        vdk_req_set_error(r, -ENOMEM);
        return;
    }
    VdkRequest *sub = vdk_subreq(r, read_done, job);
    struct iovec v = {job->buf, job->len};
    vdk_req_file_rw(sub, f, false, host_off - job->skip, &v, 1, job->len, 0);
    vdk_subreq_launch(sub);
}

/* ------------------------------------------------------------------------ */
/* Writes                                                                    */
/* ------------------------------------------------------------------------ */

static void
write_done(VdkRequest *sub)
{
    job_free(sub->done_opaque);
}

static void
write_encrypted(VdkRequest *sub)
{
    CryptJob *job = sub->done_opaque;
    if (job->ret < 0 || sub->error) {
        vdk_req_set_error(sub, job->ret < 0 ? job->ret : sub->error);
        job_free(job);
        return;
    }
    VdkRequest *w = vdk_subreq(job->r, write_done, job);
    struct iovec v = {job->buf, job->len};
    vdk_req_file_rw(w, job->file, true, job->host_off, &v, 1, job->len, job->flags);
    vdk_subreq_launch(w);
}

void
vdk_crypt_write(VdkRequest *r, VdkFile *f, uint64_t host_off, uint64_t guest_off, const struct iovec *iov, int iovcnt,
                uint64_t len, uint32_t flags)
{
    VdkNodeCrypt *nc = r->node->crypt;
    if ((host_off | len) % VDK_LUKS_SECTOR) {
        /* the block layer aligns writes to encrypted nodes first */
        vdk_req_set_error(r, -EIO);
        return;
    }
    CryptJob *job = g_new0(CryptJob, 1);
    job->nc = nc;
    job->r = r;
    job->encrypt = true;
    job->len = (size_t)len;
    job->sector = job_sector(nc, host_off, guest_off);
    job->file = f;
    job->host_off = host_off;
    job->flags = flags;
    if (posix_memalign((void **)&job->buf, 4096, MAX(job->len, (size_t)1)) != 0) {
        job->buf = NULL;
        job_free(job);
        vdk_req_set_error(r, -ENOMEM);
        return;
    }
    vdk_iov_copy_out(iov, iovcnt, job->buf, len);
    job_start(r, job, write_encrypted);
}

/* ------------------------------------------------------------------------ */
/* Writes that do not cover whole sectors                                    */
/* ------------------------------------------------------------------------ */

typedef struct {
    VdkRequest *r;
    uint8_t *buf;
    uint64_t start, end;
} RmwOp;

static void
rmw_free(RmwOp *op)
{
    free(op->buf);
    g_free(op);
}

static void
rmw_write_done(VdkRequest *sub)
{
    rmw_free(sub->done_opaque);
}

static void
rmw_read_done(VdkRequest *sub)
{
    RmwOp *op = sub->done_opaque;
    VdkRequest *r = op->r;
    if (sub->error) {
        rmw_free(op);
        return;
    }
    vdk_req_copy_out(r, r->offset, op->buf + (r->offset - op->start), r->len);
    VdkRequest *w = vdk_subreq(r, rmw_write_done, op);
    struct iovec v = {op->buf, (size_t)(op->end - op->start)};
    vdk_request_io_node(w, r->node, VDK_OP_WRITE, op->start, &v, 1, op->end - op->start);
    vdk_subreq_launch(w);
}

bool
vdk_crypt_write_unaligned(VdkRequest *r)
{
    uint64_t end = r->offset + r->len;
    if (!r->node->crypt || (r->offset % VDK_LUKS_SECTOR == 0 && end % VDK_LUKS_SECTOR == 0)) {
        return false;
    }
    VdkNode *n = r->node;
    RmwOp *op = g_new0(RmwOp, 1);
    op->r = r;
    op->start = vdk_align_down(r->offset, VDK_LUKS_SECTOR);
    op->end = MIN(vdk_align_up(end, VDK_LUKS_SECTOR), vdk_align_up(n->size, VDK_LUKS_SECTOR));
    if (op->end < end || posix_memalign((void **)&op->buf, 4096, (size_t)(op->end - op->start)) != 0) {
        op->buf = NULL;
        rmw_free(op);
        vdk_req_set_error(r, -EIO);
        return true;
    }
    memset(op->buf, 0, (size_t)(op->end - op->start));
    VdkRequest *sub = vdk_subreq(r, rmw_read_done, op);
    uint64_t size_end = MIN(op->end, n->size);
    if (r->offset % VDK_LUKS_SECTOR) {
        uint64_t l = MIN((uint64_t)VDK_LUKS_SECTOR, size_end - op->start);
        struct iovec v = {op->buf, (size_t)l};
        vdk_request_io_node(sub, n, VDK_OP_READ, op->start, &v, 1, l);
    }
    uint64_t last = op->end - VDK_LUKS_SECTOR;
    if (end % VDK_LUKS_SECTOR && (last != op->start || r->offset % VDK_LUKS_SECTOR == 0) && last < size_end) {
        uint64_t l = size_end - last;
        struct iovec v = {op->buf + (last - op->start), (size_t)l};
        vdk_request_io_node(sub, n, VDK_OP_READ, last, &v, 1, l);
    }
    vdk_subreq_launch(sub);
    return true;
}
