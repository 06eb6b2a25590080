/* SPDX-License-Identifier: MIT */
/*
 * cmd-convert.c - vdk convert: qemu-img convert's flags.  Differences from
 * qemu-img, on purpose: out-of-order writes are the default (--in-order to
 * turn them off), the target is flushed when the copy finishes unless
 * `-t unsafe` is given (qemu-img's default target cache is unsafe), and a
 * target this command created is removed again if the conversion fails.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "formats/vmdk.h"
#include "tools/tool.h"

static const char convert_help[] =
    "usage: vdk convert [-f FMT] [-b PARENT] [-O OUTPUT_FMT] [-o OPTIONS] [-p] [--progress=bar|json] [-n]\n"
    "                   [--target-is-zero] [-S SPARSE_SIZE] [-m REQUESTS] [-W | --in-order]\n"
    "                   [-t CACHE] [-T SRC_CACHE] [--aio=ENGINE] [-r RATE] [-C | --no-copy-offload]\n"
    "                   [--stats] [--bitmaps [--skip-broken-bitmaps]] [-q] [-U]\n"
    "                   FILENAME [FILENAME2 ...] OUTPUT_FILENAME\n"
    "\n"
    "Copy the guest-visible content of one or more images (concatenated) into a new\n"
    "image OUTPUT_FILENAME.  Only allocated data is read; holes and zero runs of at\n"
    "least SPARSE_SIZE bytes (default 4k; 0 = write everything) stay holes.\n"
    "\n"
    "  -f FMT          source format (default: probed)\n"
    "  -b, --parent PARENT  the parent of a differencing vdi image (VDI does not\n"
    "                    record its file name)\n"
    "  -O FMT          target format (default raw)\n"
    "  -o OPTIONS      target creation options (see vdk create -o help)\n"
    "  -n              do not create the target; write into an existing image\n"
    "  --target-is-zero  with -n: the target already reads as zeroes\n"
    "  -m N            requests in flight (default 16)\n"
    "  -W              out-of-order writes (the default); --in-order to disable\n"
    "  -t CACHE        target cache mode (default writeback, flushed at the end;\n"
    "                  'unsafe' skips the final flush like qemu-img's default)\n"
    "  -T CACHE        source cache mode (default writeback)\n"
    "  --aio=ENGINE    io_uring, native, threads or auto\n"
    "  -r RATE         limit to RATE bytes per second (suffixes allowed)\n"
    "  -p              progress bar; --progress=json for one JSON object per line\n"
    "  -C              raw to raw: copy offload with copy_file_range per allocated\n"
    "                  extent (zero runs inside allocated extents are copied as\n"
    "                  they are, so not with -S, like qemu-img -C).  Without -C a\n"
    "                  reflink (FICLONE) of the whole file is still used where the\n"
    "                  filesystem supports it\n"
    "  --no-copy-offload  never offload: always copy through vdk's own pipeline\n"
    "  --bitmaps       copy the source's persistent dirty bitmaps (qcow2 v3 to qcow2\n"
    "                  v3): name, granularity, bits, enabled or disabled\n"
    "  --skip-broken-bitmaps  with --bitmaps: skip inconsistent (in-use) bitmaps\n"
    "                  with a warning instead of failing\n"
    "  --stats         print one JSON object at the end: bytes, seconds, peak RSS,\n"
    "                  which copy offload was used\n";

static volatile sig_atomic_t interrupted;

static void
on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

static bool
convert_progress(void *opaque, uint64_t done, uint64_t total)
{
    Progress *p = opaque;
    (void)total;
    progress_update(p, done);
    return !interrupted;
}

/* The one line --stats prints: what a benchmark or a script needs to see
 * the cost of a conversion (peak RSS is the process's high-water mark). */
static void
convert_print_stats(uint64_t total, const struct timespec *t0, const char *offload)
{
    struct timespec t1;
    struct rusage ru;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    memset(&ru, 0, sizeof(ru));
    getrusage(RUSAGE_SELF, &ru);
    double secs = (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
    Json j;
    json_init(&j, false);
    json_begin_object(&j, NULL);
    json_str(&j, "type", "stats");
    json_uint(&j, "bytes", total);
    json_double(&j, "seconds", secs);
    json_uint(&j, "max_rss_bytes", (uint64_t)ru.ru_maxrss * 1024);
    json_double(&j, "user_seconds", (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6);
    json_double(&j, "system_seconds", (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
    json_str(&j, "copy_offload", offload ? offload : "none");
    json_end_object(&j);
    char *s = json_finish(&j);
    printf("%s\n", s);
    fflush(stdout);
    g_free(s);
}

int
cmd_convert(int argc, char **argv)
{
    enum {
        OPT_TARGET_ZERO = 256,
        OPT_PROGRESS,
        OPT_IN_ORDER,
        OPT_AIO,
        OPT_CHUNK,
        OPT_UNSUPPORTED,
        OPT_NO_OFFLOAD,
        OPT_STATS,
        OPT_BITMAPS,
        OPT_SKIP_BROKEN
    };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"parent", required_argument, NULL, 'b'},
        {"target-is-zero", no_argument, NULL, OPT_TARGET_ZERO},
        {"progress", optional_argument, NULL, OPT_PROGRESS},
        {"in-order", no_argument, NULL, OPT_IN_ORDER},
        {"aio", required_argument, NULL, OPT_AIO},
        {"chunk-size", required_argument, NULL, OPT_CHUNK},
        {"no-copy-offload", no_argument, NULL, OPT_NO_OFFLOAD},
        {"stats", no_argument, NULL, OPT_STATS},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"target-image-opts", no_argument, NULL, 'J'},
        {"object", required_argument, NULL, 'j'},
        {"salvage", no_argument, NULL, OPT_UNSUPPORTED},
        {"bitmaps", no_argument, NULL, OPT_BITMAPS},
        {"skip-broken-bitmaps", no_argument, NULL, OPT_SKIP_BROKEN},
        {NULL, 0, NULL, 0},
    };
    const char *src_fmt = NULL;
    const char *snapshot_param = NULL; /* -l */
    GPtrArray *sn_opts = NULL;
    const char *out_fmt = "raw";
    const char *cache = "writeback";
    const char *src_cache = "writeback";
    const char *src_parent = NULL;
    bool src_force_share = false;
    const char *aio = NULL;
    const char *backing = NULL;
    const char *backing_fmt = NULL;
    bool no_create = false;
    bool target_zero_flag = false;
    bool compress = false;
    bool quiet = tool_quiet;
    ProgressMode pmode = PROGRESS_NONE;
    uint64_t sparse = 4096;
    uint64_t inflight = 0;
    uint64_t rate = 0;
    uint64_t chunk = 0;
    bool in_order = false;
    bool sparse_given = false;
    bool stats = false;
    bool bitmaps = false, skip_broken = false;
    VdkCopyOffload offload = VDK_COPY_OFFLOAD_AUTO;
    bool src_image_opts = false, dst_image_opts = false;
    GPtrArray *kv = g_ptr_array_new_with_free_func(g_free);
    int ret = 1;
    int c;

    while ((c = getopt_long(argc, argv, "hf:O:o:pnS:m:Wt:T:qcB:F:r:Ul:Cb:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, convert_help);
            ret = 0;
            goto out_args;
        case 'f':
            src_fmt = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'o': {
            GError *err = NULL;
            if (!tool_parse_kv(optarg, kv, &err)) {
                tool_gerror(NULL, err);
                goto out_args;
            }
            break;
        }
        case 'p':
            pmode = PROGRESS_BAR;
            break;
        case OPT_PROGRESS:
            if (!tool_parse_progress(optarg, &pmode)) {
                tool_error(NULL, "invalid --progress value '%s' (expected bar, json or none)", optarg);
                goto out_args;
            }
            break;
        case 'n':
            no_create = true;
            break;
        case OPT_TARGET_ZERO:
            target_zero_flag = true;
            break;
        case 'S':
            if (!vdk_parse_size(optarg, &sparse, NULL) || sparse % 512 != 0 || sparse > (16u << 20)) {
                tool_error(NULL, "Invalid buffer size for sparse output specified. Valid sizes are multiples "
                                 "of 512 up to 16M.");
                goto out_args;
            }
            sparse_given = true;
            break;
        case 'm':
            if (!tool_parse_uint(optarg, 1024, &inflight) || inflight < 1) {
                tool_error(NULL, "Invalid number of requests in flight (-m): '%s' (1 to 1024)", optarg);
                goto out_args;
            }
            break;
        case 'W':
            in_order = false;
            break;
        case OPT_IN_ORDER:
            in_order = true;
            break;
        case 't':
            cache = optarg;
            break;
        case 'T':
            src_cache = optarg;
            break;
        case OPT_AIO:
            aio = optarg;
            break;
        case OPT_CHUNK:
            if (!vdk_parse_size(optarg, &chunk, NULL) || chunk < 4096 || chunk > (64u << 20) || chunk % 4096) {
                tool_error(NULL, "invalid --chunk-size '%s' (4k to 64M, a multiple of 4k)", optarg);
                goto out_args;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'c':
            compress = true;
            break;
        case 'B':
            backing = optarg;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'r':
            if (!vdk_parse_size(optarg, &rate, NULL) || rate == 0) {
                tool_error(NULL, "Invalid rate limit specified: '%s'", optarg);
                goto out_args;
            }
            break;
        case 'b':
            src_parent = optarg;
            break;
        case 'U':
            src_force_share = true;
            break;
        case 'l':
            snapshot_param = optarg;
            break;
        case 'C':
            offload = VDK_COPY_OFFLOAD_ON;
            break;
        case OPT_NO_OFFLOAD:
            offload = VDK_COPY_OFFLOAD_OFF;
            break;
        case OPT_STATS:
            stats = true;
            break;
        case 'I':
            src_image_opts = true;
            break;
        case 'J':
            dst_image_opts = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                goto out_args;
            }
            break;
        case OPT_BITMAPS:
            bitmaps = true;
            break;
        case OPT_SKIP_BROKEN:
            skip_broken = true;
            break;
        case OPT_UNSUPPORTED:
            tool_error(NULL, "--salvage is not supported yet");
            goto out_args;
        default:
            tool_usage(stderr, convert_help);
            goto out_args;
        }
    }
    if (quiet) {
        pmode = PROGRESS_NONE;
    }
    if (argc - optind < 2) {
        tool_error(NULL, "Must specify image file name");
        goto out_args;
    }
    if (skip_broken && !bitmaps) {
        tool_error(NULL, "Use of --skip-broken-bitmaps requires --bitmaps");
        goto out_args;
    }
    if (bitmaps && argc - optind - 1 > 1) {
        tool_error(NULL, "Copying bitmaps only possible with single source");
        goto out_args;
    }
    if (target_zero_flag && !no_create) {
        tool_error(NULL, "--target-is-zero requires use of -n flag");
        goto out_args;
    }
    if (offload == VDK_COPY_OFFLOAD_ON && sparse_given) {
        tool_error(NULL, "Cannot enable copy offloading when -S is used");
        goto out_args;
    }
    if (offload == VDK_COPY_OFFLOAD_ON && compress) {
        tool_error(NULL, "Cannot enable copy offloading when -c is used");
        goto out_args;
    }
    if (compress && strcmp(out_fmt ? out_fmt : "raw", "qcow2") != 0) {
        tool_error(NULL, "Compression not supported for this file format");
        goto out_args;
    }
    if (chunk && sparse > chunk) {
        chunk = vdk_align_up(sparse, 4096);
    }

    int nsrc = argc - optind - 1;
    const char *dst_name = argv[argc - 1];
    VdkImage **src = g_new0(VdkImage *, (gsize)nsrc);
    VdkImage *dst = NULL;
    bool created = false;
    GError *err = NULL;
    uint64_t total = 0;
    VdkBitmapInfo *bms = NULL;
    int nbm = 0;

    ToolOpen so = {.format = src_fmt,
                   .read_only = true,
                   .cache = src_cache,
                   .aio = aio,
                   .image_opts = src_image_opts,
                   .parent = src_parent,
                   .force_share = src_force_share};
    if (src_parent && nsrc > 1) {
        tool_error(NULL, "-b names the parent of one differencing vdi source; with several sources use "
                         "--image-opts driver=vdi,file.filename=CHILD,parent=PARENT");
        goto out;
    }
    if (snapshot_param) {
        /* -l snapshot.id=ID,snapshot.name=NAME, or -l ID_OR_NAME (qemu-img's forms) */
        if (nsrc > 1) {
            tool_error(NULL, "No support for concatenating multiple snapshot");
            goto out;
        }
        sn_opts = g_ptr_array_new_with_free_func(g_free);
        if (g_str_has_prefix(snapshot_param, "snapshot.")) {
            GError *perr = NULL;
            if (!tool_parse_kv(snapshot_param, sn_opts, &perr)) {
                tool_gerror(NULL, perr);
                goto out;
            }
            for (guint i = 0; i < sn_opts->len; i += 2) {
                const char *k = sn_opts->pdata[i];
                if (strcmp(k, "snapshot.id") != 0 && strcmp(k, "snapshot.name") != 0) {
                    tool_error(NULL, "Invalid parameter '%s'", k);
                    tool_error(NULL, "Failed in parsing snapshot param '%s'", snapshot_param);
                    goto out;
                }
            }
        } else {
            g_ptr_array_add(sn_opts, g_strdup("snapshot"));
            g_ptr_array_add(sn_opts, g_strdup(snapshot_param));
        }
        so.opts = sn_opts;
    }
    for (int i = 0; i < nsrc; i++) {
        src[i] = tool_open(argv[optind + i], &so);
        if (!src[i]) {
            goto out;
        }
        total += vdk_image_get_size(src[i]);
    }
    /* --bitmaps: what the source has, checked before anything is created */
    if (bitmaps) {
        nbm = vdk_image_list_bitmaps(src[0], &bms);
        if (nbm < 0) {
            tool_error(NULL, "Source lacks bitmap support");
            goto out;
        }
        /* qemu-img looks at them last to first */
        for (int i = nbm - 1; i >= 0; i--) {
            if (!bms[i].in_use && bms[i].usable) {
                continue;
            }
            if (!skip_broken) {
                tool_error(NULL, "Cannot copy inconsistent bitmap '%s'", bms[i].name);
                fprintf(stderr, "Try --skip-broken-bitmaps, or use 'vdk bitmap --remove' to delete it\n");
                goto out;
            }
            fprintf(stderr, "vdk: warning: Skipping inconsistent bitmap '%s'\n", bms[i].name);
        }
    }

    if (dst_image_opts && !no_create) {
        tool_error(NULL, "--target-image-opts requires use of -n flag");
        goto out;
    }
    if (!no_create) {
        VdkCreateOptions *o = vdk_create_options_new(out_fmt, &err);
        tool_create_options_add_secrets(o);
        if (!o) {
            tool_gerror(dst_name, err);
            goto out;
        }
        bool ok = true;
        for (guint i = 0; ok && i + 1 < kv->len; i += 2) {
            if (!strcmp(kv->pdata[i], "help")) {
                tool_print_create_help(o->drv);
                vdk_create_options_free(o);
                ret = 0;
                goto out;
            }
            ok = vdk_create_options_set(o, kv->pdata[i], kv->pdata[i + 1], &err);
        }
        if (ok && !vdk_create_opt(o, "size")) {
            char *s = g_strdup_printf("%" G_GUINT64_FORMAT, total);
            ok = vdk_create_options_set(o, "size", s, &err);
            g_free(s);
        }
        if (ok && backing) {
            ok = vdk_create_options_set(o, "backing_file", backing, &err);
        }
        if (ok && backing_fmt) {
            ok = vdk_create_options_set(o, "backing_fmt", backing_fmt, &err);
        }
        /* Like qemu-img, convert replaces an existing target. */
        vdk_create_options_set_overwrite(o, true);
        if (ok) {
            ok = vdk_image_create(dst_name, o, &err);
        }
        vdk_create_options_free(o);
        if (!ok) {
            tool_gerror(dst_name, err);
            goto out;
        }
        struct stat st;
        created = stat(dst_name, &st) == 0 && S_ISREG(st.st_mode);
    }
    /* A fresh target reads as zeroes, unless it has a backing file (-B or
     * -o backing_file): then holes and zeroes of the source must be written
     * (as zero clusters), or the backing file would show through. */
    bool has_backing = backing != NULL;
    for (guint i = 0; i + 1 < kv->len; i += 2) {
        if (!strcmp(kv->pdata[i], "backing_file")) {
            has_backing = true;
        }
    }

    ToolOpen to = {.format = out_fmt, .cache = cache, .aio = aio, .image_opts = dst_image_opts};
    /* an encrypted target opens with the secret it was created with */
    GPtrArray *to_opts = g_ptr_array_new();
    for (guint i = 0; i + 1 < kv->len && !no_create; i += 2) {
        if (!strcmp(kv->pdata[i], "encrypt.key-secret")) {
            g_ptr_array_add(to_opts, kv->pdata[i]);
            g_ptr_array_add(to_opts, kv->pdata[i + 1]);
        }
    }
    to.opts = to_opts->len ? to_opts : NULL;
    dst = tool_open(dst_name, &to);
    g_ptr_array_free(to_opts, TRUE);
    if (!dst) {
        goto out;
    }
    if (bitmaps) {
        VdkBitmapInfo *have = NULL;
        int nhave = vdk_image_list_bitmaps(dst, &have);
        if (nhave < 0) {
            tool_error(NULL, "Format driver '%s' does not support bitmaps", dst->top->drv->name);
            goto out;
        }
        /* -n into an image that has one of the names: refused up front */
        bool clash = false;
        for (int i = nbm - 1; i >= 0 && !clash; i--) {
            for (int k = 0; k < nhave && !clash; k++) {
                if (!strcmp(bms[i].name, have[k].name) && !bms[i].in_use && bms[i].usable) {
                    tool_error(NULL, "Failed to create bitmap %s: Bitmap already exists: %s", bms[i].name,
                               bms[i].name);
                    clash = true;
                }
            }
        }
        vdk_bitmap_list_free(have, nhave);
        if (clash) {
            goto out;
        }
    }
    uint64_t compress_unit = 0;
    if (compress) {
        VdkInfo ci;
        memset(&ci, 0, sizeof(ci));
        if (dst->top->drv->info) {
            dst->top->drv->info(dst->top, &ci);
        }
        compress_unit = ci.cluster_size;
        vdk_info_clear(&ci);
        if (dst->top->crypt) {
            tool_error(NULL, "Compression and encryption not supported at the same time");
            goto out;
        }
        if (!compress_unit || !dst->top->drv->write_compressed) {
            tool_error(dst_name, "Compression not supported for this file format");
            goto out;
        }
    }

    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);

    Progress prog;
    progress_init(&prog, pmode, total);
    VdkCopyParams params = {
        .src = src,
        .nsrc = nsrc,
        .dst = dst,
        .sparse_size = sparse,
        .max_inflight = (unsigned)inflight,
        .chunk = chunk,
        .in_order = in_order,
        .target_is_zero = (created && !has_backing) || target_zero_flag,
        .rate_limit = rate,
        .flush = strcmp(cache, "unsafe") != 0,
        .compress_unit = compress_unit,
        .progress = convert_progress,
        .opaque = &prog,
        .offload = offload,
    };
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (!vdk_copy(&params, &err)) {
        tool_gerror(dst_name, err);
        goto out_sig;
    }
    progress_finish(&prog);
    /* the source's bitmaps, with their granularity, bits and state (the
     * copy above was done before they existed, so it set no bits) */
    for (int i = 0; i < nbm; i++) {
        if (bms[i].in_use || !bms[i].usable) {
            continue;
        }
        VdkBitmapOp op = {.action = VDK_BITMAP_ADD, .name = bms[i].name, .granularity = bms[i].granularity};
        bool ok = vdk_image_bitmap(dst, &op, &err);
        if (ok) {
            op = (VdkBitmapOp){.action = VDK_BITMAP_MERGE, .name = bms[i].name, .source = src[0],
                               .source_name = bms[i].name};
            ok = vdk_image_bitmap(dst, &op, &err);
        }
        if (ok && !bms[i].enabled) {
            op = (VdkBitmapOp){.action = VDK_BITMAP_DISABLE, .name = bms[i].name};
            ok = vdk_image_bitmap(dst, &op, &err);
        }
        if (!ok) {
            tool_error(dst_name, "Failed to copy bitmap %s: %s", bms[i].name, err->message);
            g_clear_error(&err);
            goto out_sig;
        }
    }
    if (!vdk_image_close(dst, &err)) {
        dst = NULL;
        tool_gerror(dst_name, err);
        goto out_sig;
    }
    dst = NULL;
    created = false;
    ret = 0;
    if (stats) {
        convert_print_stats(total, &t0, params.offload_used);
    }
    if (tool_verbose) {
        fprintf(stderr, "vdk: copy offload: %s\n", params.offload_used ? params.offload_used : "none");
    }
out_sig:
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
out:
    if (sn_opts) {
        g_ptr_array_unref(sn_opts);
    }
    vdk_bitmap_list_free(bms, nbm);
    if (dst) {
        vdk_image_close(dst, NULL);
    }
    if (ret != 0 && created) {
        /* Do not leave a half-converted image under the target's name
         * (nor the extent files of a multi-file vmdk it created). */
        if (!strcmp(out_fmt, "vmdk")) {
            vdk_vmdk_remove_extents(dst_name);
        }
        unlink(dst_name);
    }
    for (int i = 0; i < nsrc; i++) {
        vdk_image_close(src[i], NULL);
    }
    g_free(src);
out_args:
    g_ptr_array_unref(kv);
    return ret;
}
