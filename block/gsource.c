/* SPDX-License-Identifier: MIT */
/*
 * gsource.c - a GLib main-loop adapter for a queue: a GSource that polls
 * the queue's eventfd and, when it is readable, reaps every completion and
 * hands each to a callback.  For VMMs and daemons built on GMainLoop (the
 * epoll route is in examples/vmm-loop.c).
 */
#include "config.h"

#include "block/block.h"

#define REAP_BATCH 64

typedef struct {
    GSource base;
    VdkQueue *q;
    gpointer tag;
} VdkQueueSource;

static gboolean
qs_dispatch(GSource *source, GSourceFunc callback, gpointer user_data)
{
    VdkQueueSource *s = (VdkQueueSource *)source;
    VdkQueueCompletionFunc fn = (VdkQueueCompletionFunc)(void (*)(void))callback;
    VdkCompletion c[REAP_BATCH];
    for (;;) {
        /* reap clears the eventfd first: a completion arriving while the
         * callbacks run makes the fd readable again, nothing is lost */
        int n = vdk_queue_reap(s->q, c, REAP_BATCH);
        for (int i = 0; i < n; i++) {
            if (fn) {
                fn(s->q, &c[i], user_data);
            }
        }
        if (n < REAP_BATCH) {
            break;
        }
    }
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs qs_funcs = {
    .dispatch = qs_dispatch,
};

GSource *
vdk_queue_source_new(VdkQueue *q)
{
    GSource *source = g_source_new(&qs_funcs, sizeof(VdkQueueSource));
    VdkQueueSource *s = (VdkQueueSource *)source;
    s->q = q;
    s->tag = g_source_add_unix_fd(source, vdk_queue_get_fd(q), G_IO_IN);
    g_source_set_name(source, "vdk-queue");
    return source;
}
