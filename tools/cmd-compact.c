/* SPDX-License-Identifier: MIT */
/*
 * cmd-compact.c - vdk compact (no qemu-img equivalent): give back the
 * space of freed clusters in place.
 */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <string.h>

#include "tools/tool.h"

static const char compact_help[] =
    "usage: vdk compact [-q] [-f FMT] [--object OBJ] [--image-opts] FILENAME\n"
    "\n"
    "Move the clusters at the end of a qcow2 image into the holes that freed\n"
    "clusters left (after discards, deleted snapshots, rewrites) and cut the\n"
    "file, in place and crash-safe: an interruption leaves a consistent image.\n"
    "What the guest sees does not change.  Prints the bytes reclaimed.\n"
    "\n"
    "  -f FMT   image format (default: probed)\n"
    "  -q       quiet\n"
    "  --object secret,id=ID,data=PASS|file=PATH   a secret (encrypt.key-secret=ID)\n"
    "  --image-opts   FILENAME is an option string (driver=qcow2,file.filename=...)\n";

int
cmd_compact(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = false};
    int c;
    while ((c = getopt_long(argc, argv, "hf:q", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, compact_help);
            return 0;
        case 'f':
            o.format = optarg;
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
            tool_usage(stderr, compact_help);
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
    uint64_t before = 0, after = 0;
    GError *err = NULL;
    int ret = 0;
    if (!vdk_image_compact(img, &before, &after, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
    if (!vdk_image_close(img, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
    if (ret == 0 && !tool_quiet) {
        printf("Image compacted: %" PRIu64 " -> %" PRIu64 " bytes (%" PRIu64 " reclaimed).\n", before, after,
               before - after);
    }
    return ret;
}
