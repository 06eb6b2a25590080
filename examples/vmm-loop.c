/* SPDX-License-Identifier: MIT */
/*
 * vmm-loop.c - how a VMM drives libvdk: a virtio-blk style request loop.
 *
 * The "guest" side makes batches of requests (writes of a known pattern,
 * reads that verify it, a flush now and then).  The device side queues a
 * batch, submits it with one call, sleeps in epoll on the queue's eventfd
 * next to whatever else the VMM watches, and reaps completions without
 * blocking.  Only the public header and libvdk.so are used.
 *
 *   vmm-loop [--aio=ENGINE] [--cache=MODE] [--requests=N] IMAGE
 *
 * Exits 0 when every request completed and every read matched.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include <vdk/vdk.h>

#define DEPTH 32
#define BLOCK 4096

typedef struct {
    int kind;         /* 0 write, 1 read, 2 flush */
    uint64_t offset;
    uint8_t *buf;
    uint8_t pattern;
    int busy;
} Slot;

static uint8_t
pattern_for(uint64_t offset)
{
    return (uint8_t)((offset / BLOCK) * 31 + 7);
}

int
main(int argc, char **argv)
{
    const char *aio = "auto", *cache = "none", *path = NULL;
    long total = 2000;
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "--aio=", 6)) {
            aio = argv[i] + 6;
        } else if (!strncmp(argv[i], "--cache=", 8)) {
            cache = argv[i] + 8;
        } else if (!strncmp(argv[i], "--requests=", 11)) {
            total = strtol(argv[i] + 11, NULL, 10);
        } else {
            path = argv[i];
        }
    }
    if (!path || total <= 0) {
        fprintf(stderr, "usage: vmm-loop [--aio=ENGINE] [--cache=MODE] [--requests=N] IMAGE\n");
        return 2;
    }

    GError *err = NULL;
    VdkOpenOptions *opts = vdk_open_options_new();
    vdk_open_options_set_format(opts, "raw");
    if (!vdk_open_options_set_engine(opts, aio, &err) || !vdk_open_options_set_cache(opts, cache, &err)) {
        fprintf(stderr, "vmm-loop: %s\n", err->message);
        return 1;
    }
    VdkImage *img = vdk_image_open(path, opts, &err);
    vdk_open_options_free(opts);
    if (!img) {
        fprintf(stderr, "vmm-loop: %s: %s\n", path, err->message);
        return 1;
    }
    uint64_t blocks = vdk_image_get_size(img) / BLOCK;
    if (blocks < DEPTH) {
        fprintf(stderr, "vmm-loop: %s: image too small\n", path);
        return 1;
    }
    VdkQueue *q = vdk_queue_new(img, DEPTH, &err);
    if (!q) {
        fprintf(stderr, "vmm-loop: %s\n", err->message);
        return 1;
    }

    /* The VMM's event loop: the queue's eventfd next to its other fds. */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 1};
    epoll_ctl(ep, EPOLL_CTL_ADD, vdk_queue_get_fd(q), &ev);

    Slot slots[DEPTH];
    memset(slots, 0, sizeof(slots));
    for (int i = 0; i < DEPTH; i++) {
        slots[i].buf = aligned_alloc(4096, BLOCK);
    }
    uint8_t *written = calloc(blocks, 1); /* which blocks hold their pattern */
    long issued = 0, done = 0, mismatches = 0, errors = 0;
    uint64_t rng = 88172645463325252ULL;

    while (done < total) {
        /* The guest kicks a batch: fill every free slot, then one submit. */
        int batch = 0;
        for (int i = 0; i < DEPTH && issued < total; i++) {
            if (slots[i].busy) {
                continue;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            Slot *s = &slots[i];
            s->offset = (rng % blocks) * BLOCK;
            /* Never two requests on one block at once, like a well-behaved guest. */
            int clash = 0;
            for (int k = 0; k < DEPTH; k++) {
                if (k != i && slots[k].busy && slots[k].kind != 2 && slots[k].offset == s->offset) {
                    clash = 1;
                }
            }
            if (clash) {
                continue;
            }
            s->kind = issued % 50 == 49 ? 2 : (int)((rng >> 20) % 2);
            s->pattern = pattern_for(s->offset);
            int r;
            if (s->kind == 0) {
                memset(s->buf, s->pattern, BLOCK);
                r = vdk_queue_write(q, s->offset, s->buf, BLOCK, 0, (uint64_t)i);
            } else if (s->kind == 1) {
                r = vdk_queue_read(q, s->offset, s->buf, BLOCK, (uint64_t)i);
            } else {
                r = vdk_queue_flush(q, (uint64_t)i);
            }
            if (r == -EAGAIN) {
                break;
            }
            if (r < 0) {
                fprintf(stderr, "vmm-loop: queueing failed: %s\n", strerror(-r));
                return 1;
            }
            s->busy = 1;
            issued++;
            batch++;
        }
        if (batch > 0) {
            vdk_queue_submit(q);
        }

        struct epoll_event out[4];
        int n = epoll_wait(ep, out, 4, 10000);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 1;
        }
        if (n == 0) {
            fprintf(stderr, "vmm-loop: no completion within 10 s\n");
            return 1;
        }
        VdkCompletion c[DEPTH];
        int got;
        while ((got = vdk_queue_reap(q, c, DEPTH)) > 0) {
            for (int k = 0; k < got; k++) {
                Slot *s = &slots[c[k].user_data];
                if (c[k].result < 0) {
                    errors++;
                } else if (s->kind == 0) {
                    written[s->offset / BLOCK] = 1;
                } else if (s->kind == 1) {
                    uint8_t want = written[s->offset / BLOCK] ? s->pattern : 0;
                    for (int b = 0; b < BLOCK; b++) {
                        if (s->buf[b] != want) {
                            mismatches++;
                            break;
                        }
                    }
                }
                s->busy = 0;
                done++;
            }
        }
    }
    printf("vmm-loop: %ld requests (engine %s, cache %s): %ld errors, %ld mismatches\n", done,
           vdk_image_get_engine(img), vdk_image_get_cache(img), errors, mismatches);
    vdk_queue_free(q);
    if (!vdk_image_close(img, &err)) {
        fprintf(stderr, "vmm-loop: %s\n", err->message);
        return 1;
    }
    for (int i = 0; i < DEPTH; i++) {
        free(slots[i].buf);
    }
    free(written);
    return errors || mismatches ? 1 : 0;
}
