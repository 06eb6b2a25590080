/* SPDX-License-Identifier: MIT */
/*
 * cmd-create.c - vdk create: qemu-img create's flags and output, with
 * atomic creation (nothing under the final name unless the whole image was
 * made) and no silent overwrite (--force).
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char create_help[] =
    "usage: vdk create [-q] [-f FMT] [-b BACKING [-F BACKING_FMT]] [-u] [-o OPTIONS] [--force]\n"
    "                  FILENAME [SIZE]\n"
    "\n"
    "Create a new disk image FILENAME of SIZE bytes (suffixes k, M, G, T, P, E).\n"
    "\n"
    "  -f FMT        image format (default raw)\n"
    "  -o OPTIONS    format options, comma separated: -o preallocation=falloc,...\n"
    "                ('-o help' lists them)\n"
    "  -b BACKING    backing file (formats with backing files)\n"
    "  -F FMT        backing file format\n"
    "  -u            do not open the backing file\n"
    "  -q            quiet: no 'Formatting' line\n"
    "  --force       replace an existing file (default: refuse)\n"
    "\n"
    "The image is built under a temporary name and appears under FILENAME only\n"
    "when complete. Preallocation (falloc, full) checks the free space first.\n"
    "raw options: size, preallocation=off|falloc|full (default off: sparse).\n";

int
cmd_create(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"force", no_argument, NULL, 'X'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = "raw";
    const char *backing = NULL;
    const char *backing_fmt = NULL;
    bool quiet = tool_quiet;
    bool force = false;
    bool unsafe = false;
    GPtrArray *kv = g_ptr_array_new_with_free_func(g_free);
    int ret = 1;
    int c;

    while ((c = getopt_long(argc, argv, "hf:b:F:uo:qe6", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, create_help);
            ret = 0;
            goto out;
        case 'f':
            fmt = optarg;
            break;
        case 'b':
            backing = optarg;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'u':
            unsafe = true;
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
            quiet = true;
            break;
        case 'X':
            force = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                goto out;
            }
            break;
        case 'e':
        case '6':
            tool_error(NULL, "option -%c is deprecated; use -o instead", c);
            goto out;
        default:
            tool_usage(stderr, create_help);
            goto out;
        }
    }

    GError *err = NULL;
    VdkCreateOptions *o = vdk_create_options_new(fmt, &err);
    tool_create_options_add_secrets(o);
    if (!o) {
        tool_gerror(NULL, err);
        goto out;
    }
    for (guint i = 0; i + 1 < kv->len; i += 2) {
        if (!strcmp(kv->pdata[i], "help") || !strcmp(kv->pdata[i], "?")) {
            tool_print_create_help(o->drv);
            vdk_create_options_free(o);
            ret = 0;
            goto out;
        }
    }
    if (optind >= argc) {
        tool_error(NULL, "Expecting image file name");
        vdk_create_options_free(o);
        goto out;
    }
    const char *filename = argv[optind];
    if (optind + 2 < argc) {
        tool_error(NULL, "Unexpected argument: %s", argv[optind + 2]);
        vdk_create_options_free(o);
        goto out;
    }
    for (guint i = 0; i + 1 < kv->len; i += 2) {
        if (!vdk_create_options_set(o, kv->pdata[i], kv->pdata[i + 1], &err)) {
            tool_gerror(filename, err);
            vdk_create_options_free(o);
            goto out;
        }
    }
    if (optind + 1 < argc) {
        uint64_t size;
        if (!tool_parse_size_arg(argv[optind + 1], &size)) {
            vdk_create_options_free(o);
            goto out;
        }
        char *s = g_strdup_printf("%" G_GUINT64_FORMAT, size);
        bool ok = vdk_create_options_set(o, "size", s, &err);
        g_free(s);
        if (!ok) {
            tool_gerror(filename, err);
            vdk_create_options_free(o);
            goto out;
        }
    }
    if (backing) {
        if (!vdk_create_options_set(o, "backing_file", backing, &err)) {
            tool_gerror(filename, err);
            vdk_create_options_free(o);
            goto out;
        }
    }
    if (backing_fmt) {
        if (!vdk_create_options_set(o, "backing_fmt", backing_fmt, &err)) {
            tool_gerror(filename, err);
            vdk_create_options_free(o);
            goto out;
        }
    }
    vdk_create_options_set_overwrite(o, force);
    vdk_create_options_set_open_backing(o, !unsafe);
    /* the backing file is checked (and gives the size) before the
     * "Formatting" line, as with qemu-img */
    if (!vdk_create_options_check_backing(o, filename, &err)) {
        tool_gerror(filename, err);
        vdk_create_options_free(o);
        goto out;
    }
    if (!vdk_create_opt(o, "size")) {
        tool_error(filename, "Image creation needs a size parameter");
        vdk_create_options_free(o);
        goto out;
    }

    if (!quiet) {
        /* qemu-img's line: the options given, in the format's order. */
        GString *line = g_string_new(NULL);
        g_string_append_printf(line, "Formatting '%s', fmt=%s", filename, fmt);
        for (const VdkOptionDesc *d = o->drv->create_opts; d && d->name; d++) {
            const char *v = vdk_create_opt(o, d->name);
            if (!v && d->show && d->def) {
                v = d->def;
            }
            if (!v) {
                continue;
            }
            uint64_t sz = 0;
            if (d->type == VDK_OPT_SIZE && vdk_parse_size(v, &sz, NULL)) {
                /* sizes in bytes (the image size as given; the image itself
                 * is rounded up to whole sectors), as qemu-img prints them */
                g_string_append_printf(line, " %s=%" G_GUINT64_FORMAT, d->name, sz);
            } else {
                g_string_append_printf(line, " %s=%s", d->name, v);
            }
        }
        printf("%s\n", line->str);
        fflush(stdout);
        g_string_free(line, TRUE);
    }

    if (!vdk_image_create(filename, o, &err)) {
        tool_gerror(filename, err);
        vdk_create_options_free(o);
        goto out;
    }
    vdk_create_options_free(o);
    ret = 0;
out:
    g_ptr_array_unref(kv);
    return ret;
}
