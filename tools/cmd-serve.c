/* SPDX-License-Identifier: MIT */
/*
 * cmd-serve.c - vdk serve: export an image over NBD, the job of qemu-nbd,
 * with qemu-nbd's option spellings (-k/--socket, -p/--port, -b/--bind,
 * -x/--export-name, -e/--shared, --persistent, -r, --cache, --aio, -f).
 * -t is qemu-img's cache option here (qemu-nbd's -t is --persistent).
 * Runs in the foreground and prints nothing unless something fails; exits
 * after the last client disconnects unless --persistent; SIGINT, SIGTERM
 * and SIGHUP shut it down with the image flushed and closed.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <signal.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "block/nbd-server.h"
#include "tools/tool.h"

static const char serve_help[] =
    "usage: vdk serve [-f FMT] [-k PATH | -p PORT [-b ADDR]] [-r] [-t CACHE] [--aio=ENGINE]\n"
    "                 [-x NAME] [-D TEXT] [-e N] [--persistent] FILENAME\n"
    "\n"
    "Export FILENAME over the NBD protocol (what qemu-nbd does), e.g. for\n"
    "qemu-img, qemu-io, nbdinfo, nbdcopy or fio: nbd+unix:///?socket=PATH or\n"
    "nbd://ADDR:PORT/.  Runs in the foreground, prints nothing unless\n"
    "something fails, and exits after the last client disconnects.\n"
    "\n"
    "  -k, --socket PATH    listen on a unix socket (created when ready to accept,\n"
    "                       removed at exit)\n"
    "  -p, --port PORT      listen on TCP port PORT (default 10809)\n"
    "  -b, --bind ADDR      the TCP address to listen on (default 127.0.0.1)\n"
    "  -f, --format FMT     image format (default: probed)\n"
    "  -r, --read-only      export read-only\n"
    "  -t, --cache MODE     none, writeback (default), writethrough, directsync, unsafe\n"
    "  --aio ENGINE         io_uring, native, threads or auto (default)\n"
    "  -x, --export-name NAME  the export's name (default \"\")\n"
    "  -D, --description TEXT  the export's description\n"
    "  -e, --shared N       serve up to N clients at once (default 1, 0: no limit);\n"
    "                       more than 1 advertises multi-conn\n"
    "  --persistent         keep running after the last client disconnects\n"
    "  -A, --allocation-depth  accepted for qemu-nbd compatibility: the\n"
    "                       qemu:allocation-depth context is always offered\n";

/* A unix socket that appears at @path only once it accepts connections
 * (bound under a temporary name, then renamed), so a client that waits for
 * the file never sees "connection refused". */
static int
listen_unix(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char *tmp = g_strdup_printf("%s.%d.tmp", path, (int)getpid());
    int fd = -1;
    if (strlen(tmp) >= sizeof(sa.sun_path)) {
        tool_error(path, "socket path too long (at most %zu bytes)", sizeof(sa.sun_path) - 16);
        goto out;
    }
    struct stat st;
    if (lstat(path, &st) == 0) {
        tool_error(path, "Failed to bind socket: %s", g_strerror(EADDRINUSE));
        goto out;
    }
    memcpy(sa.sun_path, tmp, strlen(tmp) + 1);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        tool_error(path, "socket: %s", g_strerror(errno));
        goto out;
    }
    unlink(tmp);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 64) < 0) {
        tool_error(path, "Failed to bind socket: %s", g_strerror(errno));
        unlink(tmp);
        close(fd);
        fd = -1;
        goto out;
    }
    if (rename(tmp, path) < 0) {
        tool_error(path, "Failed to bind socket: %s", g_strerror(errno));
        unlink(tmp);
        close(fd);
        fd = -1;
    }
out:
    g_free(tmp);
    return fd;
}

static int
listen_tcp(const char *addr, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(addr, port, &hints, &res);
    if (rc != 0) {
        tool_error(NULL, "address %s port %s: %s", addr, port, gai_strerror(rc));
        return -1;
    }
    int err = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0) {
            freeaddrinfo(res);
            return fd;
        }
        err = errno;
        close(fd);
    }
    freeaddrinfo(res);
    tool_error(NULL, "Failed to bind socket to %s:%s: %s", addr, port, g_strerror(err));
    return -1;
}

int
cmd_serve(int argc, char **argv)
{
    enum { OPT_AIO = 256, OPT_PERSISTENT, OPT_CACHE };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"socket", required_argument, NULL, 'k'},
        {"port", required_argument, NULL, 'p'},
        {"bind", required_argument, NULL, 'b'},
        {"format", required_argument, NULL, 'f'},
        {"read-only", no_argument, NULL, 'r'},
        {"cache", required_argument, NULL, 't'},
        {"aio", required_argument, NULL, OPT_AIO},
        {"export-name", required_argument, NULL, 'x'},
        {"description", required_argument, NULL, 'D'},
        {"shared", required_argument, NULL, 'e'},
        {"persistent", no_argument, NULL, OPT_PERSISTENT},
        {"allocation-depth", no_argument, NULL, 'A'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {0};
    const char *sock = NULL, *port = NULL, *bind_addr = NULL;
    VdkNbdServerConfig cfg = {.export_name = "", .max_clients = 1, .stop_fd = -1};
    int c;
    while ((c = getopt_long(argc, argv, "hk:p:b:f:rt:x:D:e:A", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, serve_help);
            return 0;
        case 'k':
            sock = optarg;
            break;
        case 'p': {
            uint64_t v;
            if (!tool_parse_uint(optarg, 65535, &v)) {
                tool_error(NULL, "Invalid port '%s' (0..65535)", optarg);
                return 1;
            }
            port = optarg;
            break;
        }
        case 'b':
            bind_addr = optarg;
            break;
        case 'f':
            o.format = optarg;
            break;
        case 'r':
            o.read_only = true;
            break;
        case 't':
            o.cache = optarg;
            break;
        case OPT_AIO:
            o.aio = optarg;
            break;
        case 'x':
            cfg.export_name = optarg;
            break;
        case 'D':
            cfg.description = optarg;
            break;
        case 'e': {
            uint64_t v;
            if (!tool_parse_uint(optarg, 65536, &v)) {
                tool_error(NULL, "Invalid shared device number '%s' (0..65536)", optarg);
                return 1;
            }
            cfg.max_clients = (unsigned)v;
            break;
        }
        case OPT_PERSISTENT:
            cfg.persistent = true;
            break;
        case 'A':
            break;
        default:
            tool_usage(stderr, serve_help);
            return 1;
        }
    }
    if (optind != argc - 1) {
        tool_error(NULL, "Expecting one image file name");
        return 1;
    }
    if (sock && (port || bind_addr)) {
        tool_error(NULL, "--socket cannot be combined with --port or --bind");
        return 1;
    }
    const char *filename = argv[optind];

    /* Block the shutdown signals before any thread exists (engines start
     * workers on open), so they all arrive at the signalfd. */
    sigset_t mask, old;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &mask, &old);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) {
        tool_error(NULL, "signalfd: %s", g_strerror(errno));
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        return 1;
    }
    cfg.stop_fd = sfd;

    int ret = 1;
    int lfd = -1;
    bool made_socket = false;
    VdkNbdServer *srv = NULL;
    GError *err = NULL;
    VdkImage *img = tool_open(filename, &o);
    if (!img) {
        goto out;
    }
    srv = vdk_nbd_server_new(img, &cfg, &err);
    if (!srv) {
        tool_gerror(filename, err);
        goto out;
    }
    if (sock) {
        lfd = listen_unix(sock);
        made_socket = lfd >= 0;
    } else {
        lfd = listen_tcp(bind_addr ? bind_addr : "127.0.0.1", port ? port : "10809");
    }
    if (lfd < 0) {
        goto out;
    }
    if (!vdk_nbd_server_add_listener(srv, lfd, &err)) {
        tool_gerror(filename, err);
        goto out;
    }
    if (!vdk_nbd_server_run(srv, &err)) {
        tool_gerror(filename, err);
        goto out;
    }
    ret = 0;
out:
    vdk_nbd_server_free(srv); /* waits for requests in flight */
    if (made_socket) {
        unlink(sock);
    }
    if (img) {
        if (!vdk_image_is_read_only(img)) {
            int r = vdk_image_flush(img);
            if (r < 0) {
                tool_error(filename, "flush failed: %s", g_strerror(-r));
                ret = 1;
            }
        }
        if (!vdk_image_close(img, &err)) {
            tool_gerror(filename, err);
            ret = 1;
        }
    }
    /* Consume the shutdown signals that arrived (the server only watched
     * the signalfd), or unblocking them below would deliver them and kill
     * the process after the clean shutdown. */
    struct signalfd_siginfo si;
    while (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
    }
    close(sfd);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return ret;
}
