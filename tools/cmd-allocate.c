/* SPDX-License-Identifier: MIT */
/*
 * cmd-allocate.c - vdk allocate (no qemu-img equivalent): make a sparse
 * image physically allocated later, when performance matters.
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char allocate_help[] =
    "usage: vdk allocate [-q] [-f FMT] [--object OBJ] [--image-opts] [--mode=falloc|full] [-p | --progress=json] FILENAME\n"
    "\n"
    "Turn a sparse image (raw, or qcow2 created with preallocation=off or metadata)\n"
    "into a physically allocated one, without changing what the guest sees: the\n"
    "'allocate when it matters' step after creating disks sparse (fast, no\n"
    "overcommit failures while creating many at once).\n"
    "\n"
    "  --mode=falloc   reserve the space with fallocate (default; fast)\n"
    "  --mode=full     write zeroes\n"
    "  -f FMT          image format (default: probed)\n"
    "  -p              progress bar; --progress=json for one JSON object per line\n"
    "  -q              quiet\n"
    "  --object secret,id=ID,data=PASS|file=PATH   a secret (encrypt.key-secret=ID)\n"
    "  --image-opts    FILENAME is an option string (driver=qcow2,file.filename=...)\n"
    "\n"
    "The free space is checked first; when it is not enough, nothing is changed.\n"
    "Ranges the image does not map at all (qcow2 clusters never written) are\n"
    "written with zeroes in both modes.  Images with a backing file are refused.\n";

enum { OPT_MODE = 256, OPT_PROGRESS };

int
cmd_allocate(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {"mode", required_argument, NULL, OPT_MODE},
        {"progress", optional_argument, NULL, OPT_PROGRESS},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = false};
    VdkPrealloc mode = VDK_PREALLOC_FALLOC;
    ProgressMode pmode = PROGRESS_NONE;
    int c;
    while ((c = getopt_long(argc, argv, "hf:pq", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, allocate_help);
            return 0;
        case 'f':
            o.format = optarg;
            break;
        case OPT_MODE:
            if (!strcmp(optarg, "falloc")) {
                mode = VDK_PREALLOC_FALLOC;
            } else if (!strcmp(optarg, "full")) {
                mode = VDK_PREALLOC_FULL;
            } else {
                tool_error(NULL, "invalid --mode '%s' (expected falloc or full)", optarg);
                return 1;
            }
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
        case 'q':
            tool_quiet = true;
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
            tool_usage(stderr, allocate_help);
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
    bool ok = vdk_image_allocate(img, mode, tool_progress_cb, &prog, &err);
    progress_finish(&prog);
    int ret = 0;
    if (!ok) {
        tool_gerror(filename, err);
        ret = 1;
    }
    if (!vdk_image_close(img, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
    return ret;
}
