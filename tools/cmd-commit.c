/* SPDX-License-Identifier: MIT */
/*
 * cmd-commit.c - vdk commit: qemu-img commit's flags, output and errors.
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char commit_help[] =
    "usage: vdk commit [-q] [-f FMT] [-t CACHE] [--aio=ENGINE] [-b BASE] [-d] [-p | --progress=json]\n"
    "                  FILENAME\n"
    "\n"
    "Write the changes recorded in FILENAME into its backing file (or into BASE,\n"
    "further down the backing chain), then empty FILENAME so the backing file\n"
    "shows through again, as qemu-img commit does.\n"
    "\n"
    "  -b BASE         commit into this image of the chain (implies -d: the images\n"
    "                  between would no longer be consistent)\n"
    "  -d              keep the data in FILENAME (do not empty it)\n"
    "  -f FMT          format of FILENAME (default: probed)\n"
    "  -t CACHE        cache mode (default writeback)\n"
    "  --aio=ENGINE    io_uring, native, threads or auto\n"
    "  -p              progress bar; --progress=json for one JSON object per line\n"
    "  -q              quiet\n";

enum { OPT_PROGRESS = 256, OPT_AIO };

int
cmd_commit(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"progress", optional_argument, NULL, OPT_PROGRESS},
        {"aio", required_argument, NULL, OPT_AIO},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = false};
    const char *base = NULL;
    bool keep = false;
    ProgressMode pmode = PROGRESS_NONE;
    int c;
    while ((c = getopt_long(argc, argv, "hf:t:b:dpqr:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, commit_help);
            return 0;
        case 'f':
            o.format = optarg;
            break;
        case 't':
            o.cache = optarg;
            break;
        case 'b':
            base = optarg;
            break;
        case 'd':
            keep = true;
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
        case 'r':
            tool_error_unsupported("-r (rate limit)");
            return 1;
        case 'I':
            o.image_opts = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                return 1;
            }
            break;
        default:
            tool_usage(stderr, commit_help);
            return 1;
        }
    }
    if (optind != argc - 1) {
        tool_error(NULL, "Expecting one image file name");
        return 1;
    }
    const char *filename = argv[optind];
    VdkImage *img = tool_open(filename, &o);
    if (!img) {
        return 1;
    }
    Progress prog;
    progress_init(&prog, pmode, vdk_image_get_size(img));
    GError *err = NULL;
    bool ok = vdk_image_commit(img, base, keep, tool_progress_cb, &prog, &err);
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
    if (ret == 0 && !tool_quiet) {
        printf("Image committed.\n");
    }
    return ret;
}
