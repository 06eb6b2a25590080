/* SPDX-License-Identifier: MIT */
/*
 * cmd-io.c - vdk io: a qemu-io style exerciser.  Commands and their output
 * follow qemu-io (read/write/discard/flush/map/alloc/length/truncate/info),
 * so test scripts can swap one for the other.  `read -P` verifies the
 * pattern; any failed command makes the exit status 1.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tools/tool.h"

static const char io_help[] =
    "usage: vdk io [-f FMT] [-b PARENT] [-r] [-n] [-t CACHE] [-i AIO | --aio=AIO] [-k] [-U] [-c COMMAND]... FILENAME\n"
    "\n"
    "Run qemu-io style commands against an image (from -c, else from stdin).\n"
    "\n"
    "  -f FMT       image format (default: probed; probed raw restricts writes to sector 0)\n"
    "  -b, --parent PARENT  the parent of a differencing vdi image (VDI does not\n"
    "                    record its file name)\n"
    "  -r           read-only\n"
    "  -n           cache=none (O_DIRECT); -t CACHE for any cache mode\n"
    "  -i, --aio    io_uring, native, threads or auto; -k means native\n"
    "\n"
    "Commands:\n"
    "  read [-q] [-v] [-P PATTERN] OFFSET LENGTH     read, verify against PATTERN\n"
    "  write [-q] [-f] [-c] [-P PATTERN | -z [-u] [-n]] OFFSET LENGTH\n"
    "                                       write PATTERN (default 0xcd) or zeroes;\n"
    "                                       -f FUA, -c compressed (whole clusters),\n"
    "                                       -u may unmap, -n no fallback\n"
    "  discard [-q] OFFSET LENGTH           discard a range\n"
    "  flush                                flush to stable storage\n"
    "  map                                  print allocated ranges\n"
    "  alloc OFFSET [COUNT]                 bytes allocated in a range\n"
    "  length                               image size\n"
    "  truncate [-m PREALLOC] SIZE          resize (shrinking allowed)\n"
    "  info                                 format information\n"
    "  help                                 this list\n";

typedef struct {
    VdkImage *img;
    const char *filename;
} IoCtx;

static double
now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void
print_report(const char *op, double t, uint64_t offset, uint64_t count, uint64_t total, int cnt)
{
    printf("%s %" PRIu64 "/%" PRIu64 " bytes at offset %" PRIu64 "\n", op, count, total, offset);
    char *s1 = tool_cvtstr((double)total);
    char *s2 = tool_cvtstr(t > 0 ? (double)total / t : 0);
    int secs = (int)t;
    int cents = (int)((t - secs) * 100);
    char ts[32];
    if (t < 60) {
        g_snprintf(ts, sizeof(ts), "%02d.%02d sec", secs, cents);
    } else {
        g_snprintf(ts, sizeof(ts), "%d:%02d.%02d", secs / 60, secs % 60, cents);
    }
    printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", s1, cnt, ts, s2, t > 0 ? cnt / t : 0.0);
    g_free(s1);
    g_free(s2);
}

static bool
parse_num(const char *s, uint64_t *out)
{
    if (!s || *s == '-' || !vdk_parse_size(s, out, NULL)) {
        printf("non-numeric length argument -- %s\n", s ? s : "");
        return false;
    }
    return true;
}

static bool
parse_pattern(const char *s, int *out)
{
    char *end = NULL;
    long v = strtol(s, &end, 0);
    if (!*s || *end || v < 0 || v > 255) {
        printf("non-numeric pattern argument -- %s\n", s);
        return false;
    }
    *out = (int)v;
    return true;
}

/* qemu-io answers any request past the end with EIO; do the same so
 * scripts see the same message (the library says EINVAL/ENOSPC). */
static bool
io_in_range(IoCtx *c, const char *op, uint64_t off, uint64_t len)
{
    uint64_t size = vdk_image_get_size(c->img);
    if (off > size || len > size - off) {
        fprintf(stderr, "%s failed: %s\n", op, g_strerror(EIO));
        return false;
    }
    return true;
}

static void *
io_alloc(size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, len ? len : 1) != 0) {
        return NULL;
    }
    return p;
}

static void
dump_buffer(const uint8_t *buf, uint64_t offset, uint64_t len)
{
    for (uint64_t i = 0; i < len; i += 16) {
        printf("%08" PRIx64 ":  ", offset + i);
        for (uint64_t j = i; j < i + 16 && j < len; j++) {
            printf("%02x ", buf[j]);
        }
        printf(" ");
        for (uint64_t j = i; j < i + 16 && j < len; j++) {
            putchar(buf[j] >= 0x20 && buf[j] < 0x7f ? buf[j] : '.');
        }
        printf("\n");
    }
}

static int
io_read(IoCtx *c, int argc, char **argv)
{
    bool quiet = false, verbose = false;
    int pattern = -1;
    int opt;
    optind = 0;
    while ((opt = getopt(argc, argv, "+bCqvP:s:l:")) != -1) {
        switch (opt) {
        case 'q':
            quiet = true;
            break;
        case 'v':
            verbose = true;
            break;
        case 'P':
            if (!parse_pattern(optarg, &pattern)) {
                return -EINVAL;
            }
            break;
        case 'b':
        case 'C':
            break;
        default:
            printf("read: unsupported option\n");
            return -EINVAL;
        }
    }
    if (argc - optind != 2) {
        printf("read: expected OFFSET LENGTH\n");
        return -EINVAL;
    }
    uint64_t off, len;
    if (!parse_num(argv[optind], &off) || !parse_num(argv[optind + 1], &len)) {
        return -EINVAL;
    }
    if (len > VDK_MAX_REQUEST_BYTES) {
        printf("length cannot exceed %llu, given %s\n", (unsigned long long)VDK_MAX_REQUEST_BYTES, argv[optind + 1]);
        return -EINVAL;
    }
    if (!io_in_range(c, "read", off, len)) {
        return -EIO;
    }
    uint8_t *buf = io_alloc((size_t)len);
    if (!buf) {
        return -ENOMEM;
    }
    double t0 = now_s();
    int r = vdk_image_pread(c->img, buf, (size_t)len, off);
    double t = now_s() - t0;
    if (r < 0) {
        fprintf(stderr, "read failed: %s\n", g_strerror(-r));
        free(buf);
        return r;
    }
    int ret = 0;
    if (pattern >= 0) {
        for (uint64_t i = 0; i < len; i++) {
            if (buf[i] != pattern) {
                printf("Pattern verification failed at offset %" PRIu64 ", %" PRIu64 " bytes\n", off, len);
                ret = -EIO;
                break;
            }
        }
    }
    if (verbose) {
        dump_buffer(buf, off, len);
    }
    if (!quiet) {
        print_report("read", t, off, len, len, 1);
    }
    free(buf);
    return ret;
}

static int
io_write(IoCtx *c, int argc, char **argv)
{
    bool quiet = false, zero = false, fua = false, unmap = false, nofallback = false, compress = false;
    int pattern = 0xcd;
    int opt;
    optind = 0;
    while ((opt = getopt(argc, argv, "+bcCfnquzP:")) != -1) {
        switch (opt) {
        case 'q':
            quiet = true;
            break;
        case 'z':
            zero = true;
            break;
        case 'f':
            fua = true;
            break;
        case 'u':
            unmap = true;
            break;
        case 'n':
            nofallback = true;
            break;
        case 'c':
            compress = true;
            break;
        case 'P':
            if (!parse_pattern(optarg, &pattern)) {
                return -EINVAL;
            }
            break;
        case 'b':
        case 'C':
            break;
        default:
            printf("write: unsupported option\n");
            return -EINVAL;
        }
    }
    if (argc - optind != 2) {
        printf("write: expected OFFSET LENGTH\n");
        return -EINVAL;
    }
    if ((unmap || nofallback) && !zero) {
        printf("-u and -n require -z to be specified\n");
        return -EINVAL;
    }
    uint64_t off, len;
    if (!parse_num(argv[optind], &off) || !parse_num(argv[optind + 1], &len)) {
        return -EINVAL;
    }
    if (!io_in_range(c, "write", off, len)) {
        return -EIO;
    }
    double t0;
    int r;
    if (zero) {
        unsigned flags = (fua ? VDK_REQ_FUA : 0) | (unmap ? VDK_REQ_MAY_UNMAP : 0) |
                         (nofallback ? VDK_REQ_NO_FALLBACK : 0);
        t0 = now_s();
        r = vdk_image_write_zeroes(c->img, off, len, flags);
    } else {
        if (len > VDK_MAX_REQUEST_BYTES) {
            printf("length cannot exceed %llu, given %s\n", (unsigned long long)VDK_MAX_REQUEST_BYTES,
                   argv[optind + 1]);
            return -EINVAL;
        }
        uint8_t *buf = io_alloc((size_t)len);
        if (!buf) {
            return -ENOMEM;
        }
        memset(buf, pattern, (size_t)len);
        t0 = now_s();
        r = vdk_image_pwrite(c->img, buf, (size_t)len, off, (fua ? VDK_REQ_FUA : 0) | (compress ? VDK_REQ_COMPRESS : 0));
        free(buf);
    }
    double t = now_s() - t0;
    if (r < 0) {
        fprintf(stderr, "write failed: %s\n", g_strerror(-r));
        return r;
    }
    if (!quiet) {
        print_report("wrote", t, off, len, len, 1);
    }
    return 0;
}

static int
io_discard(IoCtx *c, int argc, char **argv)
{
    bool quiet = false;
    int opt;
    optind = 0;
    while ((opt = getopt(argc, argv, "+Cq")) != -1) {
        if (opt == 'q') {
            quiet = true;
        } else if (opt != 'C') {
            printf("discard: unsupported option\n");
            return -EINVAL;
        }
    }
    if (argc - optind != 2) {
        printf("discard: expected OFFSET LENGTH\n");
        return -EINVAL;
    }
    uint64_t off, len;
    if (!parse_num(argv[optind], &off) || !parse_num(argv[optind + 1], &len)) {
        return -EINVAL;
    }
    if (!io_in_range(c, "discard", off, len)) {
        return -EIO;
    }
    double t0 = now_s();
    int r = vdk_image_discard(c->img, off, len);
    double t = now_s() - t0;
    if (r < 0) {
        fprintf(stderr, "discard failed: %s\n", g_strerror(-r));
        return r;
    }
    if (!quiet) {
        print_report("discard", t, off, len, len, 1);
    }
    return 0;
}

static int
io_flush(IoCtx *c, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    int r = vdk_image_flush(c->img);
    if (r < 0) {
        fprintf(stderr, "flush failed: %s\n", g_strerror(-r));
    }
    return r;
}

/* Allocated in the top layer (qemu-io's is_allocated). */
static int
io_is_allocated(IoCtx *c, uint64_t off, uint64_t len, bool *alloc, uint64_t *pnum)
{
    VdkBlockStatus bs;
    int r = vdk_image_block_status(c->img, off, len, &bs);
    if (r < 0) {
        return r;
    }
    *alloc = (bs.flags & VDK_BS_ALLOCATED) && bs.depth == 0;
    *pnum = bs.length;
    return 0;
}

static int
io_map(IoCtx *c, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    uint64_t size = vdk_image_get_size(c->img);
    uint64_t off = 0;
    while (off < size) {
        bool alloc = false;
        uint64_t n = 0, run = 0;
        /* merge consecutive pieces with the same answer */
        bool first_alloc = false;
        while (off + run < size) {
            int r = io_is_allocated(c, off + run, size - off - run, &alloc, &n);
            if (r < 0) {
                fprintf(stderr, "Failed to get allocation status: %s\n", g_strerror(-r));
                return r;
            }
            if (run == 0) {
                first_alloc = alloc;
            } else if (alloc != first_alloc) {
                break;
            }
            run += n;
        }
        char *s1 = tool_cvtstr((double)run);
        char *s2 = tool_cvtstr((double)off);
        printf("%s (0x%" PRIx64 ") bytes %sallocated at offset %s (0x%" PRIx64 ")\n", s1, run,
               first_alloc ? "    " : "not ", s2, off);
        g_free(s1);
        g_free(s2);
        off += run;
    }
    return 0;
}

static int
io_alloc_cmd(IoCtx *c, int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        printf("alloc: expected OFFSET [COUNT]\n");
        return -EINVAL;
    }
    uint64_t off, count = 512;
    if (!parse_num(argv[1], &off) || (argc == 3 && !parse_num(argv[2], &count))) {
        return -EINVAL;
    }
    uint64_t size = vdk_image_get_size(c->img);
    if (off > size || count > size - off) {
        printf("Offset + count out of range\n");
        return -EINVAL;
    }
    uint64_t sum = 0;
    for (uint64_t pos = off; pos < off + count;) {
        bool alloc;
        uint64_t n;
        int r = io_is_allocated(c, pos, off + count - pos, &alloc, &n);
        if (r < 0) {
            fprintf(stderr, "is_allocated failed: %s\n", g_strerror(-r));
            return r;
        }
        if (alloc) {
            sum += n;
        }
        pos += n;
    }
    char *s = tool_cvtstr((double)off);
    printf("%" PRIu64 "/%" PRIu64 " bytes allocated at offset %s\n", sum, count, s);
    g_free(s);
    return 0;
}

static int
io_length(IoCtx *c, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    char *s = tool_cvtstr((double)vdk_image_get_size(c->img));
    printf("%s\n", s);
    g_free(s);
    return 0;
}

static int
io_truncate(IoCtx *c, int argc, char **argv)
{
    VdkPrealloc prealloc = VDK_PREALLOC_OFF;
    int opt;
    optind = 0;
    while ((opt = getopt(argc, argv, "+m:")) != -1) {
        if (opt != 'm') {
            printf("truncate: unsupported option\n");
            return -EINVAL;
        }
        if (!strcmp(optarg, "off")) {
            prealloc = VDK_PREALLOC_OFF;
        } else if (!strcmp(optarg, "falloc")) {
            prealloc = VDK_PREALLOC_FALLOC;
        } else if (!strcmp(optarg, "full")) {
            prealloc = VDK_PREALLOC_FULL;
        } else if (!strcmp(optarg, "metadata")) {
            prealloc = VDK_PREALLOC_METADATA;
        } else {
            printf("Invalid preallocation mode '%s'\n", optarg);
            return -EINVAL;
        }
    }
    if (argc - optind != 1) {
        printf("truncate: expected SIZE\n");
        return -EINVAL;
    }
    uint64_t size;
    if (!parse_num(argv[optind], &size)) {
        return -EINVAL;
    }
    GError *err = NULL;
    if (!vdk_image_resize(c->img, size, true, prealloc, &err)) {
        fprintf(stderr, "truncate: %s\n", err->message);
        int e = err->code;
        g_error_free(err);
        return -e;
    }
    return 0;
}

static int
io_info(IoCtx *c, int argc, char **argv)
{
    (void)argc;
    (void)argv;
    VdkInfo info;
    memset(&info, 0, sizeof(info));
    VdkNode *n = c->img->top;
    if (n->drv->info) {
        n->drv->info(n, &info);
    }
    char *cs = tool_cvtstr((double)info.cluster_size);
    printf("format name: %s\n", n->drv->name);
    printf("cluster size: %s\n", cs);
    printf("vm state offset: 0 bytes\n");
    g_free(cs);
    vdk_info_clear(&info);
    return 0;
}

static int
io_help_cmd(IoCtx *c, int argc, char **argv)
{
    (void)c;
    (void)argc;
    (void)argv;
    fputs(strstr(io_help, "Commands:"), stdout);
    return 0;
}

typedef struct {
    const char *name;
    int (*fn)(IoCtx *c, int argc, char **argv);
    bool writes;
} IoCommand;

static const IoCommand io_commands[] = {
    {"read", io_read, false},         {"write", io_write, true},   {"discard", io_discard, true},
    {"flush", io_flush, false},       {"map", io_map, false},      {"alloc", io_alloc_cmd, false},
    {"length", io_length, false},     {"truncate", io_truncate, true}, {"info", io_info, false},
    {"help", io_help_cmd, false},
};

/* Run one command line; returns 0, -errno on failure, or 1 for "quit". */
static int
io_run(IoCtx *c, const char *line)
{
    int argc = 0;
    char **argv = NULL;
    GError *err = NULL;
    if (!g_shell_parse_argv(line, &argc, &argv, &err)) {
        g_error_free(err);
        return 0; /* empty line or only whitespace */
    }
    int ret = 0;
    if (!strcmp(argv[0], "quit") || !strcmp(argv[0], "q")) {
        ret = 1;
    } else {
        const IoCommand *cmd = NULL;
        for (size_t i = 0; i < G_N_ELEMENTS(io_commands); i++) {
            if (!strcmp(argv[0], io_commands[i].name)) {
                cmd = &io_commands[i];
            }
        }
        if (!cmd) {
            fprintf(stderr, "command \"%s\" not found\n", argv[0]);
            ret = -EINVAL;
        } else if (cmd->writes && vdk_image_is_read_only(c->img)) {
            fprintf(stderr, "%s failed: %s\n", argv[0], g_strerror(EROFS));
            ret = -EROFS;
        } else {
            ret = cmd->fn(c, argc, argv);
        }
    }
    fflush(stdout);
    g_strfreev(argv);
    return ret;
}

int
cmd_io(int argc, char **argv)
{
    enum { OPT_AIO = 256 };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"parent", required_argument, NULL, 'b'},
        {"cmd", required_argument, NULL, 'c'},
        {"format", required_argument, NULL, 'f'},
        {"read-only", no_argument, NULL, 'r'},
        {"nocache", no_argument, NULL, 'n'},
        {"native-aio", no_argument, NULL, 'k'},
        {"aio", required_argument, NULL, OPT_AIO},
        {"cache", required_argument, NULL, 't'},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {0};
    GPtrArray *cmds = g_ptr_array_new();
    int c;
    int status = 0;
    while ((c = getopt_long(argc, argv, "+hc:f:rnki:t:d:UsCmb:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, io_help);
            g_ptr_array_unref(cmds);
            return 0;
        case 'c':
            g_ptr_array_add(cmds, optarg);
            break;
        case 'f':
            o.format = optarg;
            break;
        case 'r':
            o.read_only = true;
            break;
        case 'n':
            o.cache = "none";
            break;
        case 'k':
            o.aio = "native";
            break;
        case 'i':
        case OPT_AIO:
            o.aio = optarg;
            break;
        case 't':
            o.cache = optarg;
            break;
        case 'd':
        case 'b':
            o.parent = optarg;
            break;
        case 'U':
            o.force_share = true;
            break;
        case 'C':
        case 'm':
            break;
        case 's':
            tool_error(NULL, "-s (snapshot mode) is not supported yet");
            g_ptr_array_unref(cmds);
            return 1;
        case 'I':
            o.image_opts = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                g_ptr_array_unref(cmds);
                return 1;
            }
            break;
        default:
            tool_usage(stderr, io_help);
            g_ptr_array_unref(cmds);
            return 1;
        }
    }
    if (optind != argc - 1) {
        tool_error(NULL, "Expecting one image file name");
        g_ptr_array_unref(cmds);
        return 1;
    }
    IoCtx ctx = {.filename = argv[optind]};
    GError *err = NULL;
    ctx.img = tool_open(ctx.filename, &o);
    if (!ctx.img) {
        g_ptr_array_unref(cmds);
        return 1;
    }
    if (cmds->len > 0) {
        for (guint i = 0; i < cmds->len; i++) {
            int r = io_run(&ctx, cmds->pdata[i]);
            if (r == 1) {
                break;
            }
            if (r < 0) {
                status = 1;
            }
        }
    } else {
        char line[4096];
        bool tty = isatty(0);
        for (;;) {
            if (tty) {
                printf("vdk-io> ");
                fflush(stdout);
            }
            if (!fgets(line, sizeof(line), stdin)) {
                break;
            }
            int r = io_run(&ctx, line);
            if (r == 1) {
                break;
            }
            if (r < 0) {
                status = 1;
            }
        }
    }
    if (!vdk_image_close(ctx.img, &err)) {
        tool_gerror(ctx.filename, err);
        status = 1;
    }
    g_ptr_array_unref(cmds);
    return status;
}
