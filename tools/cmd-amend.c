/* SPDX-License-Identifier: MIT */
/*
 * cmd-amend.c - vdk amend: qemu-img amend's flags, checks and messages.
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char amend_help[] =
    "usage: vdk amend [-q] [-f FMT] [-t CACHE] [--aio=ENGINE] [--force] -o OPTIONS FILENAME\n"
    "\n"
    "Change format options of an existing image, as qemu-img amend does.  qcow2:\n"
    "  compat=0.10|1.1       downgrade (zero clusters are expanded; v3-only features\n"
    "                        such as extended L2 or zstd refuse it) or upgrade\n"
    "  lazy_refcounts=on|off\n"
    "  refcount_bits=N       1, 2, 4 ... 64 (a new refcount structure is written)\n"
    "  size=SIZE             new virtual size\n"
    "'-o help' lists them.\n";

enum { OPT_AIO = 256, OPT_FORCE };

int
cmd_amend(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"aio", required_argument, NULL, OPT_AIO},
        {"force", no_argument, NULL, OPT_FORCE},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = false};
    GPtrArray *kv = g_ptr_array_new_with_free_func(g_free);
    int ret = 1;
    int c;
    while ((c = getopt_long(argc, argv, "hf:t:o:qp", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, amend_help);
            ret = 0;
            goto out;
        case 'f':
            o.format = optarg;
            break;
        case 't':
            o.cache = optarg;
            break;
        case 'o': {
            GError *err = NULL;
            if (!tool_parse_kv(optarg, kv, &err)) {
                tool_gerror(NULL, err);
                goto out;
            }
            break;
        }
        case 'q':
            tool_quiet = true;
            break;
        case 'p':
        case OPT_FORCE:
            break;
        case OPT_AIO:
            o.aio = optarg;
            break;
        case 'I':
            o.image_opts = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                goto out;
            }
            break;
        default:
            tool_usage(stderr, amend_help);
            goto out;
        }
    }
    for (guint i = 0; i + 1 < kv->len; i += 2) {
        if (!strcmp(kv->pdata[i], "help") || !strcmp(kv->pdata[i], "?")) {
            printf("Amend options for 'qcow2':\n"
                   "  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n"
                   "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n"
                   "  refcount_bits=<num>    - Width of a reference count entry in bits\n"
                   "  size=<size>            - Virtual disk size\n");
            ret = 0;
            goto out;
        }
    }
    if (kv->len == 0) {
        tool_error(NULL, "Must specify options (-o)");
        goto out;
    }
    if (optind != argc - 1) {
        tool_error(NULL, "Expecting one image file name");
        goto out;
    }
    const char *filename = argv[optind];
    VdkImage *img = tool_open(filename, &o);
    if (!img) {
        goto out;
    }
    g_ptr_array_add(kv, NULL);
    GError *err = NULL;
    if (!vdk_image_amend(img, (const char *const *)kv->pdata, &err)) {
        tool_gerror(NULL, err);
    } else {
        ret = 0;
    }
    if (!vdk_image_close(img, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
out:
    g_ptr_array_unref(kv);
    return ret;
}
