/* SPDX-License-Identifier: MIT */
/*
 * cmd-bitmap.c - vdk bitmap: qemu-img bitmap's flags, messages and exit
 * codes.  Actions run in command-line order on the persistent dirty bitmap
 * named last (--add, --remove, --clear, --enable, --disable, --merge
 * SOURCE with -b SOURCE_FILE [-F FMT]); the image is written on close.
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char bitmap_help[] =
    "usage: vdk bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...\n"
    "                  [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP\n"
    "\n"
    "Change the persistent dirty bitmap BITMAP of a qcow2 (version 3) image, as\n"
    "qemu-img bitmap.  The actions run in the order given.\n"
    "\n"
    "  --add             create BITMAP (empty, enabled)\n"
    "  --remove          delete BITMAP (also an inconsistent one)\n"
    "  --clear           clear every bit of BITMAP\n"
    "  --enable          writes set BITMAP's bits from now on\n"
    "  --disable         BITMAP no longer changes\n"
    "  --merge SOURCE    set BITMAP's bits that are set in bitmap SOURCE\n"
    "  -b SOURCE_FILE    --merge: SOURCE is in this image (default: FILENAME)\n"
    "  -F SOURCE_FMT     the format of SOURCE_FILE (default: probed)\n"
    "  -g GRANULARITY    --add: bytes per bit, a power of two from 512 to 2G\n"
    "                    (default: the cluster size, within 4K..64K)\n"
    "  -f FMT            image format (default: probed)\n"
    "  -t CACHE          cache mode (none, writeback, writethrough, directsync, unsafe)\n"
    "  --aio=ENGINE      I/O engine: io_uring, native, threads or auto\n"
    "\n"
    "List the bitmaps with 'vdk info'.  The change is crash-safe: the new\n"
    "directory and tables are written and synced before the header switches.\n";

static const char *const action_names[] = {
    [VDK_BITMAP_ADD] = "add",         [VDK_BITMAP_REMOVE] = "remove", [VDK_BITMAP_CLEAR] = "clear",
    [VDK_BITMAP_ENABLE] = "enable",   [VDK_BITMAP_DISABLE] = "disable", [VDK_BITMAP_MERGE] = "merge",
};

typedef struct {
    VdkBitmapAction action;
    const char *source;
} Act;

int
cmd_bitmap(int argc, char **argv)
{
    enum { O_ADD = 256, O_REMOVE, O_CLEAR, O_ENABLE, O_DISABLE, O_MERGE, O_AIO, O_OBJECT, O_IMAGE_OPTS };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"add", no_argument, NULL, O_ADD},
        {"remove", no_argument, NULL, O_REMOVE},
        {"clear", no_argument, NULL, O_CLEAR},
        {"enable", no_argument, NULL, O_ENABLE},
        {"disable", no_argument, NULL, O_DISABLE},
        {"merge", required_argument, NULL, O_MERGE},
        {"granularity", required_argument, NULL, 'g'},
        {"aio", required_argument, NULL, O_AIO},
        {"object", required_argument, NULL, O_OBJECT},
        {"image-opts", no_argument, NULL, O_IMAGE_OPTS},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = false};
    GArray *acts = g_array_new(FALSE, FALSE, sizeof(Act));
    const char *src_file = NULL, *src_fmt = NULL;
    uint64_t gran = 0;
    bool have_gran = false, add = false, merge = false;
    int ret = 1;
    int c;
    while ((c = getopt_long(argc, argv, "hb:F:g:f:t:q", longopts, NULL)) != -1) {
        Act a = {0, NULL};
        switch (c) {
        case 'h':
            tool_usage(stdout, bitmap_help);
            g_array_free(acts, TRUE);
            return 0;
        case O_ADD:
            a.action = VDK_BITMAP_ADD;
            add = true;
            break;
        case O_REMOVE:
            a.action = VDK_BITMAP_REMOVE;
            break;
        case O_CLEAR:
            a.action = VDK_BITMAP_CLEAR;
            break;
        case O_ENABLE:
            a.action = VDK_BITMAP_ENABLE;
            break;
        case O_DISABLE:
            a.action = VDK_BITMAP_DISABLE;
            break;
        case O_MERGE:
            a.action = VDK_BITMAP_MERGE;
            a.source = optarg;
            merge = true;
            break;
        case 'b':
            src_file = optarg;
            continue;
        case 'F':
            src_fmt = optarg;
            continue;
        case 'g':
            if (!tool_parse_size_arg(optarg, &gran)) {
                goto out;
            }
            have_gran = true;
            continue;
        case 'f':
            o.format = optarg;
            continue;
        case 't':
            o.cache = optarg;
            continue;
        case 'q':
            tool_quiet = true;
            continue;
        case O_AIO:
            o.aio = optarg;
            continue;
        case O_IMAGE_OPTS:
            o.image_opts = true;
            continue;
        case O_OBJECT:
            tool_error_unsupported("--object");
            goto out;
        default:
            tool_usage(stderr, bitmap_help);
            goto out;
        }
        g_array_append_val(acts, a);
    }
    if (acts->len == 0) {
        tool_error(NULL, "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
        goto out;
    }
    if (have_gran && !add) {
        tool_error(NULL, "granularity only supported with --add");
        goto out;
    }
    if (src_fmt && !src_file) {
        tool_error(NULL, "-F (source file) only supported with -b");
        goto out;
    }
    if (src_file && !merge) {
        tool_error(NULL, "Merge bitmap source file only supported with --merge");
        goto out;
    }
    if (optind != argc - 2) {
        tool_error(NULL, "Expecting filename and bitmap name");
        goto out;
    }
    const char *filename = argv[optind];
    const char *name = argv[optind + 1];
    VdkImage *img = tool_open(filename, &o);
    if (!img) {
        goto out;
    }
    VdkImage *src = NULL;
    if (src_file) {
        ToolOpen so = {.format = src_fmt, .read_only = true, .aio = o.aio};
        src = tool_open(src_file, &so);
        if (!src) {
            vdk_image_close(img, NULL);
            goto out;
        }
    }
    ret = 0;
    GError *err = NULL;
    for (guint i = 0; i < acts->len && ret == 0; i++) {
        Act *a = &g_array_index(acts, Act, i);
        VdkBitmapOp op = {
            .action = a->action,
            .name = name,
            .granularity = gran,
            .source = src,
            .source_name = a->source,
        };
        if (!vdk_image_bitmap(img, &op, &err)) {
            tool_error(filename, "Operation %s on bitmap %s failed: %s", action_names[a->action], name, err->message);
            g_clear_error(&err);
            ret = 1;
        }
    }
    if (src && !vdk_image_close(src, &err)) {
        tool_gerror(src_file, err);
        err = NULL;
        ret = 1;
    }
    if (!vdk_image_close(img, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
out:
    g_array_free(acts, TRUE);
    return ret;
}
