/* SPDX-License-Identifier: MIT */
/*
 * cmd-rebase.c - vdk rebase: qemu-img rebase's flags, output and errors.
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char rebase_help[] =
    "usage: vdk rebase [-q] [-f FMT] [-t CACHE] [--aio=ENGINE] [-p | --progress=json] [-u]\n"
    "                  -b BACKING [-F BACKING_FMT] FILENAME\n"
    "\n"
    "Make BACKING the backing file of FILENAME, as qemu-img rebase does.  By\n"
    "default (safe mode) every range where the old backing chain and BACKING\n"
    "differ is first copied into FILENAME, so what the guest sees is unchanged.\n"
    "-b \"\" removes the backing file (the image then holds everything).\n"
    "\n"
    "  -b BACKING      the new backing file (relative names: from FILENAME's directory)\n"
    "  -F FMT          its format (required unless -b \"\")\n"
    "  -u              unsafe: only change the name recorded in the header\n"
    "  -U, --force-share  open BACKING even if another process writes it\n"
    "  -f FMT          format of FILENAME (default: probed)\n"
    "  -t CACHE        cache mode (default writeback)\n"
    "  --aio=ENGINE    io_uring, native, threads or auto\n"
    "  -p              progress bar; --progress=json for one JSON object per line\n"
    "  -q              quiet\n";

enum { OPT_PROGRESS = 256, OPT_AIO };

int
cmd_rebase(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"progress", optional_argument, NULL, OPT_PROGRESS},
        {"aio", required_argument, NULL, OPT_AIO},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = false};
    bool force_share = false;
    const char *backing = NULL;
    const char *backing_fmt = NULL;
    bool unsafe = false;
    ProgressMode pmode = PROGRESS_NONE;
    int c;
    while ((c = getopt_long(argc, argv, "hf:t:T:b:F:upqcU", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, rebase_help);
            return 0;
        case 'f':
            o.format = optarg;
            break;
        case 't':
            o.cache = optarg;
            break;
        case 'T':
            break; /* the cache mode of the backing files: they are read-only here */
        case 'b':
            backing = optarg;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'u':
            unsafe = true;
            break;
        case 'p':
            pmode = PROGRESS_BAR;
            break;
        case OPT_PROGRESS:
            if (!tool_parse_progress(optarg ? optarg : "bar", &pmode)) {
                tool_error(NULL, "invalid --progress value '%s' (expected bar, json or none)", optarg);
                return 1;
            }
            break;
        case OPT_AIO:
            o.aio = optarg;
            break;
        case 'q':
            tool_quiet = true;
            break;
        case 'c':
            tool_error_unsupported("-c (compressed rebase)");
            return 1;
        case 'U':
            force_share = true;
            break;
        case 'I':
            o.image_opts = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                return 1;
            }
            break;
        default:
            tool_usage(stderr, rebase_help);
            return 1;
        }
    }
    if (optind != argc - 1) {
        tool_error(NULL, "Expecting one image file name");
        return 1;
    }
    if (!backing) {
        tool_error(NULL, "Must specify backing file (-b) or use unsafe mode (-u)");
        return 1;
    }
    const char *filename = argv[optind];
    GPtrArray *extra = g_ptr_array_new_with_free_func(g_free);
    if (force_share) {
        /* as qemu-img: for the new backing file only (the image is written) */
        g_ptr_array_add(extra, g_strdup("rebase.force-share"));
        g_ptr_array_add(extra, g_strdup("on"));
    }
    o.opts = extra;
    VdkImage *img = tool_open(filename, &o);
    g_ptr_array_unref(extra);
    if (!img) {
        return 1;
    }
    Progress prog;
    progress_init(&prog, pmode, vdk_image_get_size(img));
    GError *err = NULL;
    bool ok = vdk_image_rebase(img, backing, backing_fmt, unsafe, tool_progress_cb, &prog, &err);
    progress_finish(&prog);
    int ret = 0;
    if (!ok) {
        tool_gerror(NULL, err);
        ret = 1;
    }
    if (!vdk_image_close(img, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
    return ret;
}
