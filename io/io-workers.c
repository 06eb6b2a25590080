/* SPDX-License-Identifier: MIT */
/*
 * io-workers.c - a pool of threads running blocking syscalls for a queue.
 *
 * Requests move through three lists: `collect` (owned by the queue thread,
 * filled by push()), `todo` (shared, taken by workers) and `done` (shared,
 * emptied by reap()).  Threads start lazily when there is more work than
 * idle workers, up to the pool's limit, and live until the pool is freed.
 * The eventfd is written only when `done` goes from empty to non-empty; the
 * reaper empties `done` after clearing the eventfd, so a wake-up is never
 * lost.
 */
#include "config.h"

#include <errno.h>

#include "io/io.h"

struct VdkIoWorkers {
    GMutex lock;
    GCond cond;
    int efd;
    unsigned max_threads;
    unsigned nthreads;
    unsigned idle;
    bool stopping;
    GThread **threads;
    /* shared, under lock */
    VdkIoReq *todo_head, **todo_tail;
    VdkIoReq *done_head, **done_tail;
    /* queue thread only */
    VdkIoReq *collect_head, **collect_tail;
    unsigned ncollect;
};

static gpointer
workers_main(gpointer data)
{
    VdkIoWorkers *w = data;

    g_mutex_lock(&w->lock);
    for (;;) {
        while (w->todo_head == NULL && !w->stopping) {
            w->idle++;
            g_cond_wait(&w->cond, &w->lock);
            w->idle--;
        }
        if (w->todo_head == NULL && w->stopping) {
            break;
        }
        VdkIoReq *req = w->todo_head;
        w->todo_head = req->next;
        if (w->todo_head == NULL) {
            w->todo_tail = &w->todo_head;
        }
        g_mutex_unlock(&w->lock);

        vdk_io_exec_sync(req);

        g_mutex_lock(&w->lock);
        req->next = NULL;
        bool was_empty = w->done_head == NULL;
        *w->done_tail = req;
        w->done_tail = &req->next;
        if (was_empty) {
            vdk_io_eventfd_signal(w->efd);
        }
    }
    g_mutex_unlock(&w->lock);
    return NULL;
}

VdkIoWorkers *
vdk_io_workers_new(unsigned max_threads, int efd)
{
    VdkIoWorkers *w = g_new0(VdkIoWorkers, 1);
    g_mutex_init(&w->lock);
    g_cond_init(&w->cond);
    w->efd = efd;
    w->max_threads = max_threads ? max_threads : 1;
    w->threads = g_new0(GThread *, w->max_threads);
    w->todo_tail = &w->todo_head;
    w->done_tail = &w->done_head;
    w->collect_tail = &w->collect_head;
    return w;
}

void
vdk_io_workers_free(VdkIoWorkers *w)
{
    if (!w) {
        return;
    }
    g_mutex_lock(&w->lock);
    w->stopping = true;
    g_cond_broadcast(&w->cond);
    g_mutex_unlock(&w->lock);
    for (unsigned i = 0; i < w->nthreads; i++) {
        g_thread_join(w->threads[i]);
    }
    g_free(w->threads);
    g_mutex_clear(&w->lock);
    g_cond_clear(&w->cond);
    g_free(w);
}

void
vdk_io_workers_push(VdkIoWorkers *w, VdkIoReq *req)
{
    req->next = NULL;
    *w->collect_tail = req;
    w->collect_tail = &req->next;
    w->ncollect++;
}

unsigned
vdk_io_workers_queued(VdkIoWorkers *w)
{
    return w->ncollect;
}

int
vdk_io_workers_kick(VdkIoWorkers *w)
{
    unsigned n = w->ncollect;
    if (n == 0) {
        return 0;
    }
    g_mutex_lock(&w->lock);
    *w->todo_tail = w->collect_head;
    w->todo_tail = w->collect_tail;
    w->collect_head = NULL;
    w->collect_tail = &w->collect_head;
    w->ncollect = 0;

    unsigned want = n > w->idle ? n - w->idle : 0;
    while (want > 0 && w->nthreads < w->max_threads) {
        GError *err = NULL;
        GThread *t = g_thread_try_new("vdk-io", workers_main, w, &err);
        if (!t) {
            g_clear_error(&err);
            break;
        }
        w->threads[w->nthreads++] = t;
        want--;
    }
    if (n == 1) {
        g_cond_signal(&w->cond);
    } else {
        g_cond_broadcast(&w->cond);
    }
    bool no_threads = w->nthreads == 0;
    g_mutex_unlock(&w->lock);

    if (no_threads) {
        /* Could not start a single thread: run the batch here rather than
         * hang.  Completions still only appear in reap(). */
        g_mutex_lock(&w->lock);
        while (w->todo_head) {
            VdkIoReq *req = w->todo_head;
            w->todo_head = req->next;
            vdk_io_exec_sync(req);
            req->next = NULL;
            *w->done_tail = req;
            w->done_tail = &req->next;
        }
        w->todo_tail = &w->todo_head;
        g_mutex_unlock(&w->lock);
        vdk_io_eventfd_signal(w->efd);
    }
    return (int)n;
}

int
vdk_io_workers_reap(VdkIoWorkers *w)
{
    g_mutex_lock(&w->lock);
    VdkIoReq *list = w->done_head;
    w->done_head = NULL;
    w->done_tail = &w->done_head;
    g_mutex_unlock(&w->lock);

    int n = 0;
    while (list) {
        VdkIoReq *req = list;
        list = req->next;
        req->next = NULL;
        req->complete(req);
        n++;
    }
    return n;
}
