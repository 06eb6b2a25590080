/* SPDX-License-Identifier: MIT */
/*
 * fuzz-nbd.c - libFuzzer target: the NBD server's handshake and request
 * parser, fed by a client that sends the input's bytes.
 *
 * One qcow2 image (1 MiB, some data, a zero range) is created and opened
 * read-write once.  Each input is one client connection: a socketpair's
 * end is handed to a fresh server (vdk_nbd_server_add_client); a thread
 * writes the input into the other end and then half-closes it, another
 * drains whatever the server answers, and the server runs until that
 * connection is over.  Bad magic numbers, lengths, offsets and options
 * are what the input is expected to hold; crashes, sanitizer reports,
 * leaks and hangs (the fuzzer's -timeout) are what it looks for.  The
 * image is checked after every input: the server must never damage it.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "block/block.h"
#include "block/nbd-server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static VdkImage *img;

static void
quiet_log(const gchar *domain, GLogLevelFlags level, const gchar *message, gpointer user)
{
    (void)domain;
    (void)level;
    (void)message;
    (void)user;
}

static void
setup(void)
{
    if (img) {
        return;
    }
    g_log_set_handler("vdk", G_LOG_LEVEL_MASK, quiet_log, NULL);
    char *dir = g_dir_make_tmp("vdk-fuzz-nbd-XXXXXX", NULL);
    if (!dir) {
        abort();
    }
    char *path = g_build_filename(dir, "a.qcow2", NULL);
    GError *err = NULL;
    VdkCreateOptions *co = vdk_create_options_new("qcow2", &err);
    if (!co || !vdk_create_options_set(co, "size", "1M", &err) ||
        !vdk_create_options_set(co, "cluster_size", "4096", &err) || !vdk_image_create(path, co, &err)) {
        abort();
    }
    vdk_create_options_free(co);
    VdkOpenOptions *oo = vdk_open_options_new();
    vdk_open_options_set_format(oo, "qcow2");
    img = vdk_image_open(path, oo, &err);
    vdk_open_options_free(oo);
    if (!img) {
        abort();
    }
    static uint8_t buf[64 << 10];
    memset(buf, 0x5a, sizeof(buf));
    if (vdk_image_pwrite(img, buf, sizeof(buf), 0, 0) < 0 || vdk_image_write_zeroes(img, 128 << 10, 64 << 10, 0) < 0 ||
        vdk_image_flush(img) < 0) {
        abort();
    }
    g_free(path);
    g_free(dir);
}

typedef struct {
    int fd;
    const uint8_t *data;
    size_t size;
} Feed;

static void *
feed_thread(void *opaque)
{
    Feed *f = opaque;
    size_t done = 0;
    while (done < f->size) {
        ssize_t n = send(f->fd, f->data + done, f->size - done, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break; /* the server closed the connection: fine */
        }
        done += (size_t)n;
    }
    shutdown(f->fd, SHUT_WR);
    return NULL;
}

static void *
drain_thread(void *opaque)
{
    int fd = *(int *)opaque;
    static __thread uint8_t buf[64 << 10];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return NULL;
        }
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
        abort();
    }
    GError *err = NULL;
    VdkNbdServerConfig cfg = {.export_name = "", .max_clients = 1, .persistent = false, .stop_fd = -1};
    VdkNbdServer *srv = vdk_nbd_server_new(img, &cfg, &err);
    if (!srv || !vdk_nbd_server_add_client(srv, sv[0], &err)) {
        abort();
    }
    Feed f = {.fd = sv[1], .data = data, .size = size};
    pthread_t feeder, drainer;
    if (pthread_create(&feeder, NULL, feed_thread, &f) != 0 || pthread_create(&drainer, NULL, drain_thread, &sv[1])) {
        abort();
    }
    if (!vdk_nbd_server_run(srv, &err)) {
        abort(); /* the loop itself must not fail because of a client */
    }
    vdk_nbd_server_free(srv);
    pthread_join(feeder, NULL);
    pthread_join(drainer, NULL);
    close(sv[1]);
    /* whatever the client sent, the image stays consistent */
    VdkCheckReport rep;
    memset(&rep, 0, sizeof(rep));
    if (!vdk_image_check(img, 0, &rep, &err)) {
        abort();
    }
    if (rep.corruptions != 0 || rep.check_errors != 0) {
        for (char **m = rep.messages; m && *m; m++) {
            fprintf(stderr, "fuzz-nbd: check: %s\n", *m);
        }
        abort();
    }
    vdk_check_report_clear(&rep);
    return 0;
}
