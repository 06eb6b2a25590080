/* SPDX-License-Identifier: MIT */
/*
 * glib-loop.c - libvdk under a GLib main loop: the queue's GSource
 * (vdk_queue_source_new) delivers completions to a callback while the loop
 * also runs a timer, as a daemon built on GMainLoop would.
 *
 * Writes a pattern to every 64 KiB block of the first megabytes of the
 * image with up to 16 requests in flight, flushes, reads everything back
 * and checks it.  Only the public header and libvdk.so are used.
 *
 *   glib-loop [--aio=ENGINE] [--cache=MODE] [-f FORMAT] IMAGE
 *
 * Exits 0 when every request completed and every read matched.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vdk/vdk.h>

#define BLOCK 65536
#define INFLIGHT 16

typedef struct {
    GMainLoop *loop;
    VdkQueue *q;
    uint64_t blocks;
    uint64_t next;   /* next block to queue in this phase */
    uint64_t done;   /* completed in this phase */
    int phase;       /* 0 write, 1 flush, 2 read, 3 finished */
    int inflight;
    uint8_t *bufs[INFLIGHT];
    int free_slot[INFLIGHT];
    int nfree;
    long errors, mismatches, ticks;
} Ctx;

static uint8_t
pattern(uint64_t block)
{
    return (uint8_t)(block * 37 + 11);
}

static void
fill(Ctx *c)
{
    while (c->nfree > 0 && c->next < c->blocks && (c->phase == 0 || c->phase == 2)) {
        int slot = c->free_slot[--c->nfree];
        uint64_t b = c->next++;
        uint64_t ud = ((uint64_t)slot << 32) | b;
        int r;
        if (c->phase == 0) {
            memset(c->bufs[slot], pattern(b), BLOCK);
            r = vdk_queue_write(c->q, b * BLOCK, c->bufs[slot], BLOCK, 0, ud);
        } else {
            r = vdk_queue_read(c->q, b * BLOCK, c->bufs[slot], BLOCK, ud);
        }
        if (r < 0) {
            fprintf(stderr, "glib-loop: queueing failed: %s\n", strerror(-r));
            c->errors++;
            g_main_loop_quit(c->loop);
            return;
        }
        c->inflight++;
    }
    vdk_queue_submit(c->q);
}

static void
on_completion(VdkQueue *q, const VdkCompletion *done, gpointer user_data)
{
    (void)q;
    Ctx *c = user_data;
    int slot = (int)(done->user_data >> 32);
    uint64_t b = done->user_data & 0xffffffffu;
    c->inflight--;
    if (done->result < 0) {
        fprintf(stderr, "glib-loop: request failed: %s\n", strerror((int)-done->result));
        c->errors++;
    }
    if (c->phase == 1) {
        /* the flush */
        c->phase = 2;
        c->next = 0;
        fill(c);
        return;
    }
    if (c->phase == 2) {
        for (size_t i = 0; i < BLOCK; i++) {
            if (c->bufs[slot][i] != pattern(b)) {
                c->mismatches++;
                break;
            }
        }
    }
    c->free_slot[c->nfree++] = slot;
    c->done++;
    if (c->done == c->blocks) {
        c->done = 0;
        if (c->phase == 0) {
            c->phase = 1;
            vdk_queue_flush(c->q, 0);
            vdk_queue_submit(c->q);
        } else {
            c->phase = 3;
            g_main_loop_quit(c->loop);
        }
        return;
    }
    fill(c);
}

static gboolean
on_tick(gpointer user_data)
{
    ((Ctx *)user_data)->ticks++; /* the loop serves other sources meanwhile */
    return G_SOURCE_CONTINUE;
}

int
main(int argc, char **argv)
{
    const char *aio = "auto", *cache = "none", *format = NULL, *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "--aio=", 6)) {
            aio = argv[i] + 6;
        } else if (!strncmp(argv[i], "--cache=", 8)) {
            cache = argv[i] + 8;
        } else if (!strcmp(argv[i], "-f") && i + 1 < argc) {
            format = argv[++i];
        } else {
            path = argv[i];
        }
    }
    if (!path) {
        fprintf(stderr, "usage: glib-loop [--aio=ENGINE] [--cache=MODE] [-f FORMAT] IMAGE\n");
        return 2;
    }
    GError *err = NULL;
    VdkOpenOptions *opts = vdk_open_options_new();
    if (format) {
        vdk_open_options_set_format(opts, format);
    }
    if (!vdk_open_options_set_engine(opts, aio, &err) || !vdk_open_options_set_cache(opts, cache, &err)) {
        fprintf(stderr, "glib-loop: %s\n", err->message);
        return 1;
    }
    VdkImage *img = vdk_image_open(path, opts, &err);
    vdk_open_options_free(opts);
    if (!img) {
        fprintf(stderr, "glib-loop: %s: %s\n", path, err->message);
        return 1;
    }
    Ctx c = {0};
    c.blocks = MIN(vdk_image_get_size(img) / BLOCK, (uint64_t)256);
    c.q = vdk_queue_new(img, INFLIGHT + 1, &err);
    if (!c.q || c.blocks == 0) {
        fprintf(stderr, "glib-loop: %s\n", c.q ? "image too small" : err->message);
        return 1;
    }
    c.loop = g_main_loop_new(NULL, FALSE);
    for (int i = 0; i < INFLIGHT; i++) {
        c.bufs[i] = aligned_alloc(4096, BLOCK);
        c.free_slot[c.nfree++] = i;
    }
    GSource *src = vdk_queue_source_new(c.q);
    g_source_set_callback(src, G_SOURCE_FUNC(on_completion), &c, NULL);
    g_source_attach(src, NULL);
    guint timer = g_timeout_add(1, on_tick, &c);
    fill(&c);
    g_main_loop_run(c.loop);
    g_source_remove(timer);
    g_source_destroy(src);
    g_source_unref(src);
    vdk_queue_free(c.q);
    if (!vdk_image_close(img, &err)) {
        fprintf(stderr, "glib-loop: close: %s\n", err->message);
        c.errors++;
    }
    for (int i = 0; i < INFLIGHT; i++) {
        free(c.bufs[i]);
    }
    g_main_loop_unref(c.loop);
    printf("glib-loop: %" G_GUINT64_FORMAT " blocks written, flushed and read back; %ld mismatches, %ld errors\n",
           c.blocks, c.mismatches, c.errors);
    return c.phase == 3 && c.mismatches == 0 && c.errors == 0 ? 0 : 1;
}
