/* SPDX-License-Identifier: MIT */
/*
 * cmd-measure.c - vdk measure: qemu-img measure's flags, numbers and
 * output (text and JSON), for every output format whose driver can measure.
 */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <string.h>

#include "tools/tool.h"

static const char measure_help[] =
    "usage: vdk measure [-b PARENT] [--output=human|json] [-O OUTPUT_FMT] [-o OPTIONS]\n"
    "                   [--size N | [-f FMT] [-U] FILENAME]\n"
    "\n"
    "Calculate the file size needed for a new image of format OUTPUT_FMT (default\n"
    "raw) created with OPTIONS: either empty and N bytes large, or holding the\n"
    "content of FILENAME (what 'vdk convert -O OUTPUT_FMT -o OPTIONS' makes).\n"
    "Prints the required size (with the source's data) and the fully allocated\n"
    "size, as qemu-img measure does.\n"
    "\n"
    "  -O FMT            output format (default raw)\n"
    "  -o OPTIONS        output format options, as for create ('-o help' lists them)\n"
    "  --size N          size of an empty image (suffixes k, M, G, T, P, E)\n"
    "  -f FMT            format of FILENAME (default: probed)\n"
    "  -b, --parent PARENT  the parent of a differencing vdi image (VDI does not\n"
    "                    record its file name)\n"
    "  --output=FMT      human (default) or json\n"
    "  -U, --force-share open without locking\n";

int
cmd_measure(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"parent", required_argument, NULL, 'b'},
        {"output", required_argument, NULL, 'J'},
        {"size", required_argument, NULL, 's'},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen open_opts = {.read_only = true};
    const char *out_fmt = "raw";
    const char *size_arg = NULL;
    bool json = false;
    GPtrArray *kv = g_ptr_array_new_with_free_func(g_free);
    VdkCreateOptions *o = NULL;
    VdkImage *img = NULL;
    int ret = 1;
    int c;

    while ((c = getopt_long(argc, argv, "hf:O:o:l:Ub:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, measure_help);
            ret = 0;
            goto out;
        case 'f':
            open_opts.format = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'o': {
            GError *err = NULL;
            if (!tool_parse_kv(optarg, kv, &err)) {
                tool_gerror(NULL, err);
                goto out;
            }
            break;
        }
        case 'l':
            tool_error_unsupported("-l (snapshots)");
            goto out;
        case 'J':
            if (!tool_parse_output(optarg, &json)) {
                goto out;
            }
            break;
        case 's':
            size_arg = optarg;
            break;
        case 'b':
            open_opts.parent = optarg;
            break;
        case 'U':
            open_opts.force_share = true;
            break;
        case 'I':
            open_opts.image_opts = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                goto out;
            }
            break;
        default:
            tool_usage(stderr, measure_help);
            goto out;
        }
    }

    GError *err = NULL;
    o = vdk_create_options_new(out_fmt, &err);
    tool_create_options_add_secrets(o);
    if (!o) {
        tool_gerror(NULL, err);
        goto out;
    }
    for (guint i = 0; i + 1 < kv->len; i += 2) {
        if (!strcmp(kv->pdata[i], "help") || !strcmp(kv->pdata[i], "?")) {
            tool_print_create_help(o->drv);
            ret = 0;
            goto out;
        }
    }
    const char *filename = NULL;
    if (optind < argc) {
        filename = argv[optind];
        if (optind + 1 < argc) {
            tool_error(NULL, "Unexpected argument: %s", argv[optind + 1]);
            goto out;
        }
    }
    if (filename && size_arg) {
        tool_error(NULL, "--size N cannot be used together with a filename.");
        goto out;
    }
    if (!filename && !size_arg) {
        tool_error(NULL, "Either --size N or one filename must be specified.");
        goto out;
    }
    for (guint i = 0; i + 1 < kv->len; i += 2) {
        if (!vdk_create_options_set(o, kv->pdata[i], kv->pdata[i + 1], &err)) {
            tool_gerror(filename, err);
            goto out;
        }
    }
    if (size_arg) {
        uint64_t size;
        if (!tool_parse_size_arg(size_arg, &size)) {
            goto out;
        }
        char *s = g_strdup_printf("%" PRIu64, size);
        bool ok = vdk_create_options_set(o, "size", s, &err);
        g_free(s);
        if (!ok) {
            tool_gerror(NULL, err);
            goto out;
        }
    }
    if (filename) {
        img = tool_open(filename, &open_opts);
        if (!img) {
            goto out;
        }
    }
    VdkMeasure m;
    if (!vdk_measure(o, img, &m, &err)) {
        tool_gerror(filename, err);
        goto out;
    }
    if (json) {
        Json j;
        json_init(&j, true);
        json_begin_object(&j, NULL);
        if (m.has_bitmaps) {
            json_uint(&j, "bitmaps", m.bitmaps);
        }
        json_uint(&j, "required", m.required);
        json_uint(&j, "fully-allocated", m.fully_allocated);
        json_end_object(&j);
        char *s = json_finish(&j);
        printf("%s\n", s);
        g_free(s);
    } else {
        printf("required size: %" PRIu64 "\n", m.required);
        printf("fully allocated size: %" PRIu64 "\n", m.fully_allocated);
        if (m.has_bitmaps) {
            printf("bitmaps size: %" PRIu64 "\n", m.bitmaps);
        }
    }
    ret = 0;
out:
    if (img) {
        vdk_image_close(img, NULL);
    }
    if (o) {
        vdk_create_options_free(o);
    }
    g_ptr_array_unref(kv);
    return ret;
}
