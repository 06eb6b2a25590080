/* SPDX-License-Identifier: MIT */
/*
 * cmd-resize.c - vdk resize: qemu-img resize's syntax (absolute, +SIZE,
 * -SIZE), --shrink required to make an image smaller, --preallocation for
 * the grown part.
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char resize_help[] =
    "usage: vdk resize [-f FMT] [--preallocation=off|falloc|full] [-q] [--shrink] FILENAME [+|-]SIZE\n"
    "\n"
    "Change the image's virtual size to SIZE, or grow/shrink it by SIZE.\n"
    "Shrinking deletes the data past the new end and needs --shrink.\n";

int
cmd_resize(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"preallocation", required_argument, NULL, 'P'},
        {"shrink", no_argument, NULL, 'S'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {0};
    bool quiet = tool_quiet;
    bool shrink = false;
    VdkPrealloc prealloc = VDK_PREALLOC_OFF;

    if (argc < 2) {
        tool_usage(stderr, resize_help);
        return 1;
    }
    /* The size may start with '-': take it off before getopt sees it. */
    const char *size_arg = argv[argc - 1];
    argc--;
    if (!strcmp(size_arg, "--help") || !strcmp(size_arg, "-h")) {
        tool_usage(stdout, resize_help);
        return 0;
    }

    int c;
    while ((c = getopt_long(argc, argv, "hf:q", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, resize_help);
            return 0;
        case 'f':
            o.format = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'S':
            shrink = true;
            break;
        case 'P':
            if (!strcmp(optarg, "off")) {
                prealloc = VDK_PREALLOC_OFF;
            } else if (!strcmp(optarg, "metadata")) {
                prealloc = VDK_PREALLOC_METADATA;
            } else if (!strcmp(optarg, "falloc")) {
                prealloc = VDK_PREALLOC_FALLOC;
            } else if (!strcmp(optarg, "full")) {
                prealloc = VDK_PREALLOC_FULL;
            } else {
                tool_error(NULL, "Invalid preallocation mode '%s'", optarg);
                return 1;
            }
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
            tool_usage(stderr, resize_help);
            return 1;
        }
    }
    if (optind != argc - 1) {
        tool_error(NULL, "Expecting image file name and size");
        return 1;
    }
    const char *filename = argv[optind];
    int rel = 0;
    const char *num = size_arg;
    if (*num == '+') {
        rel = 1;
        num++;
    } else if (*num == '-') {
        rel = -1;
        num++;
    }
    uint64_t amount;
    if (!tool_parse_size_arg(num, &amount)) {
        return 1;
    }
    GError *err = NULL;
    VdkImage *img = tool_open(filename, &o);
    if (!img) {
        return 1;
    }
    uint64_t cur = vdk_image_get_size(img);
    uint64_t size = amount;
    if (rel > 0) {
        if (vdk_add_overflows(cur, amount, &size) || size > (uint64_t)INT64_MAX) {
            tool_error(filename, "New image size is too large");
            vdk_image_close(img, NULL);
            return 1;
        }
    } else if (rel < 0) {
        if (amount > cur) {
            tool_error(filename, "New image size must be positive");
            vdk_image_close(img, NULL);
            return 1;
        }
        size = cur - amount;
    }
    int ret = 0;
    if (!vdk_image_resize(img, size, shrink, prealloc, &err)) {
        tool_gerror(filename, err);
        if (size < cur && !shrink) {
            /* qemu-img's reminder, printed with the refusal */
            fprintf(stderr, "vdk: warning: Shrinking an image will delete all data beyond the shrunken "
                            "image's end. Before performing such an operation, make sure there is no "
                            "important data there.\n");
        }
        ret = 1;
    } else if (!quiet) {
        printf("Image resized.\n");
    }
    if (!vdk_image_close(img, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
    return ret;
}
