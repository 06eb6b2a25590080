/* SPDX-License-Identifier: MIT */
/*
 * nbd-server.h - an NBD server exporting one VdkImage (vdk serve).
 *
 * One thread, one epoll loop, one VdkQueue shared by every connection:
 * requests from all clients are queued on it as they are parsed, submitted
 * in one batch per loop turn and answered as they complete, out of order.
 * Sockets are non-blocking; what a client sends and what it does not read
 * are buffered within fixed per-connection bounds (see nbd-server.c).
 */
#ifndef VDK_NBD_SERVER_H
#define VDK_NBD_SERVER_H

#include <stdbool.h>

#include "vdk/vdk.h"

typedef struct VdkNbdServer VdkNbdServer;

typedef struct {
    const char *export_name; /* the one export's name (NULL: "") */
    const char *description; /* NBD_INFO_DESCRIPTION / LIST detail, or NULL */
    unsigned max_clients;    /* connections served at once; 0 = no limit */
    bool persistent;         /* keep serving after the last client left */
    int stop_fd;             /* readable (e.g. a signalfd) = shut down; -1: none */
} VdkNbdServerConfig;

/*
 * vdk_nbd_server_new: a server for @img (read-only exports follow
 * vdk_image_is_read_only()).  Creates the queue and the epoll instance.
 * @img must outlive the server.
 */
VdkNbdServer *vdk_nbd_server_new(VdkImage *img, const VdkNbdServerConfig *cfg, GError **error);

/* Serve clients accepted on @fd, a listening socket (made non-blocking);
 * the server owns and closes it. */
bool vdk_nbd_server_add_listener(VdkNbdServer *srv, int fd, GError **error);

/* Serve one client already connected on @fd (e.g. one end of a
 * socketpair); the server owns and closes it.  It counts against
 * max_clients like an accepted one. */
bool vdk_nbd_server_add_client(VdkNbdServer *srv, int fd, GError **error);

/*
 * vdk_nbd_server_run: serve until stop_fd becomes readable, or, unless
 * persistent, until the last client has disconnected.  Returns with every
 * connection closed and no request in flight.  False with @error set if
 * the event loop itself fails (a client's errors only close its connection).
 */
bool vdk_nbd_server_run(VdkNbdServer *srv, GError **error);

/* Close everything (waits for requests in flight).  NULL is a no-op. */
void vdk_nbd_server_free(VdkNbdServer *srv);

#endif /* VDK_NBD_SERVER_H */
