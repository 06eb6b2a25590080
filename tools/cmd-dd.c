/* SPDX-License-Identifier: MIT */
/*
 * cmd-dd.c - vdk dd: qemu-img dd's operands, sizes and errors.  The output
 * image is created (replacing an existing file, as qemu-img does) with the
 * size qemu-img gives it: min(count * bs, input size) - skip * bs.  Unlike
 * qemu-img, ranges the input reports as zero are not written (the new
 * image already reads as zeroes), so a sparse input stays sparse.
 */
#include "config.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "tools/tool.h"

static const char dd_help[] =
    "usage: vdk dd [-f FMT] [-b PARENT] [-O OUTPUT_FMT] [-U] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS]\n"
    "              if=INPUT of=OUTPUT\n"
    "\n"
    "Copy from INPUT to a new image OUTPUT (format OUTPUT_FMT, default raw) like\n"
    "dd(1), as qemu-img dd does.\n"
    "\n"
    "  bs=BYTES      block size (default 512; suffixes k, M, G)\n"
    "  count=N       copy at most N blocks\n"
    "  skip=N        skip N blocks of the input first\n"
    "  -f FMT        input format (default: probed)\n"
    "  -b, --parent PARENT  the parent of a differencing vdi image (VDI does not\n"
    "                    record its file name)\n"
    "  -O FMT        output format (default raw)\n";

#define DD_CHUNK (4u << 20)

int
cmd_dd(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"parent", required_argument, NULL, 'b'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen in_opts = {.read_only = true};
    const char *out_fmt = "raw";
    int c;
    while ((c = getopt_long(argc, argv, "hf:O:Ub:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, dd_help);
            return 0;
        case 'f':
            in_opts.format = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'b':
            in_opts.parent = optarg;
            break;
        case 'U':
            in_opts.force_share = true;
            break;
        case 'I':
            in_opts.image_opts = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                return 1;
            }
            break;
        default:
            tool_usage(stderr, dd_help);
            return 1;
        }
    }
    uint64_t bs = 512, count = 0, skip = 0;
    bool has_count = false, has_skip = false;
    const char *in = NULL, *out = NULL;
    for (int i = optind; i < argc; i++) {
        const char *a = argv[i];
        const char *eq = strchr(a, '=');
        if (!eq) {
            tool_error(NULL, "unrecognized operand %s", a);
            return 1;
        }
        size_t klen = (size_t)(eq - a);
        const char *v = eq + 1;
        uint64_t n;
        if (klen == 2 && !strncmp(a, "bs", 2)) {
            if (!vdk_parse_size(v, &n, NULL) || n == 0 || n > 2147483647u) {
                tool_error(NULL, "Invalid bs specified. Must be between 1 and 2147483647.");
                return 1;
            }
            bs = n;
        } else if (klen == 5 && !strncmp(a, "count", 5)) {
            if (!vdk_parse_size(v, &n, NULL)) {
                tool_error(NULL, "invalid number: '%s'", v);
                return 1;
            }
            count = n;
            has_count = true;
        } else if (klen == 4 && !strncmp(a, "skip", 4)) {
            if (!vdk_parse_size(v, &n, NULL)) {
                tool_error(NULL, "invalid number: '%s'", v);
                return 1;
            }
            skip = n;
            has_skip = true;
        } else if (klen == 2 && !strncmp(a, "if", 2)) {
            in = v;
        } else if (klen == 2 && !strncmp(a, "of", 2)) {
            out = v;
        } else {
            tool_error(NULL, "unrecognized operand %.*s", (int)klen, a);
            return 1;
        }
    }
    if (!in || !out) {
        tool_error(NULL, "Must specify both input and output files");
        return 1;
    }
    VdkImage *src = tool_open(in, &in_opts);
    if (!src) {
        return 1;
    }
    int ret = 1;
    VdkImage *dst = NULL;
    void *buf = NULL;
    GError *err = NULL;
    uint64_t size = vdk_image_get_size(src);
    if (has_count && count <= UINT64_MAX / bs && count * bs < size) {
        size = count * bs;
    }
    bool beyond = has_skip && (skip > UINT64_MAX / bs || size < skip * bs);
    uint64_t in_pos = beyond ? size : skip * bs;
    uint64_t out_size = size - in_pos;

    VdkCreateOptions *co = vdk_create_options_new(out_fmt, &err);

    tool_create_options_add_secrets(co);
    if (!co) {
        tool_gerror(NULL, err);
        goto out;
    }
    char *s = g_strdup_printf("%" G_GUINT64_FORMAT, out_size);
    bool ok = vdk_create_options_set(co, "size", s, &err);
    g_free(s);
    vdk_create_options_set_overwrite(co, true);
    if (!ok || !vdk_image_create(out, co, &err)) {
        vdk_create_options_free(co);
        tool_gerror(out, err);
        goto out;
    }
    vdk_create_options_free(co);
    if (beyond) {
        tool_error(in, "cannot skip to specified offset");
    }
    ToolOpen out_opts = {.format = out_fmt};
    dst = tool_open(out, &out_opts);
    if (!dst) {
        goto out;
    }
    if (posix_memalign(&buf, 4096, DD_CHUNK) != 0) {
        tool_error(NULL, "out of memory");
        goto out;
    }
    for (uint64_t pos = in_pos; pos < size;) {
        VdkBlockStatus st;
        int r = vdk_image_block_status(src, pos, size - pos, &st);
        if (r < 0) {
            tool_error(in, "error while reading: %s", g_strerror(-r));
            goto out;
        }
        uint64_t len = MIN(st.length, (uint64_t)DD_CHUNK);
        if (!(st.flags & VDK_BS_ZERO) || (st.flags & VDK_BS_DATA)) {
            r = vdk_image_pread(src, buf, (size_t)len, pos);
            if (r < 0) {
                tool_error(in, "error while reading input image file: %s", g_strerror(-r));
                goto out;
            }
            if (!vdk_buffer_is_zero(buf, (size_t)len)) {
                r = vdk_image_pwrite(dst, buf, (size_t)len, pos - in_pos, 0);
                if (r < 0) {
                    tool_error(out, "error while writing to output image file: %s", g_strerror(-r));
                    goto out;
                }
            }
        }
        pos += len;
    }
    int r = vdk_image_flush(dst);
    if (r < 0) {
        tool_error(out, "flush failed: %s", g_strerror(-r));
        goto out;
    }
    ret = 0;
out:
    free(buf);
    if (dst && !vdk_image_close(dst, &err)) {
        tool_gerror(out, err);
        ret = 1;
    }
    vdk_image_close(src, NULL);
    return ret;
}
