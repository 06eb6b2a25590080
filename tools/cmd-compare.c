/* SPDX-License-Identifier: MIT */
/*
 * cmd-compare.c - vdk compare: qemu-img compare's messages and exit codes
 * (0 identical, 1 different, 2 error).  Block status lets ranges that are
 * holes or zero in both images pass without reading them; a mismatch is
 * reported at the 512-byte sector where it starts, as qemu-img does.
 */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "tools/tool.h"

static const char compare_help[] =
    "usage: vdk compare [-f FMT] [-b PARENT] [-F FMT] [-T SRC_CACHE] [-p] [-q] [-s] [-U] FILENAME1 FILENAME2\n"
    "\n"
    "Compare the guest-visible content of two images.  Exit status: 0 identical,\n"
    "1 different, 2 error.  -s (strict) also fails on a size or allocation\n"
    "difference.\n"
    "\n"
    "  -b, --parent PARENT  the parent of a differencing vdi FILENAME1 (VDI does not\n"
    "                    record its file name)\n";

#define CMP_CHUNK (4u << 20)

static bool
is_zero_status(const VdkBlockStatus *bs)
{
    return (bs->flags & VDK_BS_ZERO) && !(bs->flags & VDK_BS_DATA);
}

/* Offset of the first differing byte, or -1. */
static int64_t
first_diff(const uint8_t *a, const uint8_t *b, size_t len)
{
    if (memcmp(a, b, len) == 0) {
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        if (a[i] != b[i]) {
            return (int64_t)i;
        }
    }
    return -1;
}

static int64_t
first_nonzero(const uint8_t *a, size_t len)
{
    if (vdk_buffer_is_zero(a, len)) {
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        if (a[i]) {
            return (int64_t)i;
        }
    }
    return -1;
}

/* Check that [off, end) of @img reads as zeroes; returns the first
 * non-zero offset, -1 if all zero, or -2 (error printed). */
static int64_t
check_zero_tail(VdkImage *img, const char *name, uint64_t off, uint64_t end, uint8_t *buf)
{
    while (off < end) {
        VdkBlockStatus bs;
        int r = vdk_image_block_status(img, off, end - off, &bs);
        if (r < 0) {
            tool_error(name, "error while reading offset %" PRIu64 ": %s", off, g_strerror(-r));
            return -2;
        }
        if (is_zero_status(&bs)) {
            off += bs.length;
            continue;
        }
        uint64_t stop = off + bs.length;
        while (off < stop) {
            size_t n = (size_t)MIN(stop - off, (uint64_t)CMP_CHUNK);
            r = vdk_image_pread(img, buf, n, off);
            if (r < 0) {
                tool_error(name, "error while reading offset %" PRIu64 ": %s", off, g_strerror(-r));
                return -2;
            }
            int64_t d = first_nonzero(buf, n);
            if (d >= 0) {
                return (int64_t)off + d;
            }
            off += n;
        }
    }
    return -1;
}

int
cmd_compare(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"parent", required_argument, NULL, 'b'},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o1 = {.read_only = true};
    ToolOpen o2 = {.read_only = true};
    bool strict = false;
    bool quiet = tool_quiet;
    bool progress = false;
    int c;
    while ((c = getopt_long(argc, argv, "hf:F:T:pqsUb:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, compare_help);
            return 0;
        case 'f':
            o1.format = optarg;
            break;
        case 'F':
            o2.format = optarg;
            break;
        case 'T':
            o1.cache = o2.cache = optarg;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 's':
            strict = true;
            break;
        case 'b':
            o1.parent = optarg;
            break;
        case 'U':
            o1.force_share = o2.force_share = true;
            break;
        case 'I':
            o1.image_opts = o2.image_opts = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                return 2;
            }
            break;
        default:
            tool_usage(stderr, compare_help);
            return 2;
        }
    }
    if (argc - optind != 2) {
        tool_error(NULL, "Expecting two image file names");
        return 2;
    }
    const char *n1 = argv[optind];
    const char *n2 = argv[optind + 1];
    VdkImage *i1 = tool_open(n1, &o1);
    if (!i1) {
        return 2;
    }
    VdkImage *i2 = tool_open(n2, &o2);
    if (!i2) {
        vdk_image_close(i1, NULL);
        return 2;
    }
    uint8_t *b1 = NULL;
    uint8_t *b2 = NULL;
    if (posix_memalign((void **)&b1, 4096, CMP_CHUNK) || posix_memalign((void **)&b2, 4096, CMP_CHUNK)) {
        tool_error(NULL, "out of memory");
        free(b1);
        vdk_image_close(i1, NULL);
        vdk_image_close(i2, NULL);
        return 2;
    }
    uint64_t s1 = vdk_image_get_size(i1);
    uint64_t s2 = vdk_image_get_size(i2);
    uint64_t common = MIN(s1, s2);
    Progress prog;
    progress_init(&prog, progress && !quiet ? PROGRESS_BAR : PROGRESS_NONE, MAX(s1, s2));
    int ret = 0;
    int64_t mismatch = -1;
    if (strict && s1 != s2) {
        /* qemu-img decides this before looking at any content */
        if (!quiet) {
            printf("Strict mode: Image size mismatch!\n");
        }
        ret = 1;
    }

    for (uint64_t off = 0; off < common && ret == 0 && mismatch < 0;) {
        VdkBlockStatus bs1, bs2;
        /* Ask each image up to its own end: strict mode compares whether a
         * range reaches the end of its image too (qemu's EOF status bit). */
        int r = vdk_image_block_status(i1, off, s1 - off, &bs1);
        if (r < 0) {
            tool_error(n1, "error while reading offset %" PRIu64 ": %s", off, g_strerror(-r));
            ret = 2;
            break;
        }
        r = vdk_image_block_status(i2, off, s2 - off, &bs2);
        if (r < 0) {
            tool_error(n2, "error while reading offset %" PRIu64 ": %s", off, g_strerror(-r));
            ret = 2;
            break;
        }
        bool eof1 = off + bs1.length == s1;
        bool eof2 = off + bs2.length == s2;
        uint64_t n = MIN(MIN(bs1.length, bs2.length), common - off);
        uint32_t mask = VDK_BS_DATA | VDK_BS_ZERO | VDK_BS_ALLOCATED;
        if (strict && ((bs1.flags & mask) != (bs2.flags & mask) || eof1 != eof2)) {
            if (!quiet) {
                printf("Strict mode: Offset %" PRIu64 " block status mismatch!\n", off);
            }
            ret = 1;
            break;
        }
        bool z1 = is_zero_status(&bs1);
        bool z2 = is_zero_status(&bs2);
        if (z1 && z2) {
            off += n;
            progress_update(&prog, off);
            continue;
        }
        uint64_t stop = off + n;
        while (off < stop) {
            size_t len = (size_t)MIN(stop - off, (uint64_t)CMP_CHUNK);
            int64_t d;
            if (z1 || z2) {
                VdkImage *img = z1 ? i2 : i1;
                r = vdk_image_pread(img, b1, len, off);
                if (r < 0) {
                    tool_error(z1 ? n2 : n1, "error while reading offset %" PRIu64 ": %s", off, g_strerror(-r));
                    ret = 2;
                    break;
                }
                d = first_nonzero(b1, len);
            } else {
                r = vdk_image_pread(i1, b1, len, off);
                if (r < 0) {
                    tool_error(n1, "error while reading offset %" PRIu64 ": %s", off, g_strerror(-r));
                    ret = 2;
                    break;
                }
                r = vdk_image_pread(i2, b2, len, off);
                if (r < 0) {
                    tool_error(n2, "error while reading offset %" PRIu64 ": %s", off, g_strerror(-r));
                    ret = 2;
                    break;
                }
                d = first_diff(b1, b2, len);
            }
            if (d >= 0) {
                mismatch = (int64_t)off + d;
                break;
            }
            off += len;
            progress_update(&prog, off);
        }
    }

    if (ret == 0 && mismatch < 0 && s1 != s2) {
        if (!quiet) {
            printf("Warning: Image size mismatch!\n");
        }
        VdkImage *big = s1 > s2 ? i1 : i2;
        int64_t d = check_zero_tail(big, s1 > s2 ? n1 : n2, common, MAX(s1, s2), b1);
        if (d == -2) {
            ret = 2;
        } else if (d >= 0) {
            mismatch = d;
        }
    }
    if (ret == 0 && mismatch >= 0) {
        if (!quiet) {
            printf("Content mismatch at offset %" PRIu64 "!\n", vdk_align_down((uint64_t)mismatch, 512));
        }
        ret = 1;
    }
    if (ret == 0) {
        progress_finish(&prog);
        if (!quiet) {
            printf("Images are identical.\n");
        }
    }
    free(b1);
    free(b2);
    vdk_image_close(i1, NULL);
    vdk_image_close(i2, NULL);
    return ret;
}
