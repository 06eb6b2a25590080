/* SPDX-License-Identifier: MIT */
/*
 * cmd-map.c - vdk map: where each guest range comes from, in qemu-img map's
 * human and JSON layouts (start, length, depth, present, zero, data,
 * offset), adjacent ranges with the same status merged.
 */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <string.h>

#include "tools/tool.h"

static const char map_help[] =
    "usage: vdk map [-f FMT] [-b PARENT] [--start-offset=OFFSET] [--max-length=LEN] [--output=human|json] [-U]\n"
    "               FILENAME\n"
    "\n"
    "Print the image's allocation map: which ranges hold data, which read as zero,\n"
    "and which layer of the backing chain provides them (qemu-img map's format).\n"
    "\n"
    "  -b, --parent PARENT  the parent of a differencing vdi image (VDI does not\n"
    "                    record its file name)\n";

typedef struct {
    uint64_t start, length;
    int depth;
    bool present, zero, data, has_offset;
    uint64_t offset;
} MapEntry;

static void
map_print(VdkImage *img, const MapEntry *e, bool json, bool *first)
{
    if (json) {
        printf("%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", \"depth\": %d, \"present\": %s, \"zero\": %s, "
               "\"data\": %s",
               *first ? "[" : ",\n", e->start, e->length, e->depth, e->present ? "true" : "false",
               e->zero ? "true" : "false", e->data ? "true" : "false");
        if (e->has_offset) {
            printf(", \"offset\": %" PRIu64, e->offset);
        }
        printf("}");
        *first = false;
        return;
    }
    /* qemu-img prints data ranges only, not those that read as zeroes
     * (holes under allocated data, e.g. a static vdi's unwritten blocks) */
    if (e->data && !e->zero && e->has_offset) {
        const char *f = vdk_image_get_layer_filename(img, e->depth);
        printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length, e->offset, f ? f : "");
    }
}

int
cmd_map(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"parent", required_argument, NULL, 'b'},
        {"output", required_argument, NULL, 'O'},
        {"start-offset", required_argument, NULL, 's'},
        {"max-length", required_argument, NULL, 'l'},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = true};
    bool json = false;
    uint64_t start = 0;
    uint64_t max_len = UINT64_MAX;
    int c;
    while ((c = getopt_long(argc, argv, "hf:Ub:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, map_help);
            return 0;
        case 'f':
            o.format = optarg;
            break;
        case 'O':
            if (!tool_parse_output(optarg, &json)) {
                return 1;
            }
            break;
        case 's':
            if (!vdk_parse_size(optarg, &start, NULL)) {
                tool_error(NULL, "invalid --start-offset '%s' (a size: k, M, G, T, P or E suffixes allowed)",
                           optarg);
                return 1;
            }
            break;
        case 'l':
            if (!vdk_parse_size(optarg, &max_len, NULL)) {
                tool_error(NULL, "invalid --max-length '%s' (a size: k, M, G, T, P or E suffixes allowed)",
                           optarg);
                return 1;
            }
            break;
        case 'b':
            o.parent = optarg;
            break;
        case 'U':
            o.force_share = true;
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
            tool_usage(stderr, map_help);
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
    uint64_t size = vdk_image_get_size(img);
    uint64_t end = size;
    if (max_len != UINT64_MAX && start < size && max_len < size - start) {
        end = start + max_len;
    }
    MapEntry cur = {0};
    bool first = true;
    int ret = 0;
    if (!json) {
        /* qemu-img prints the header even when nothing is mapped */
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    }
    for (uint64_t off = start; off < end;) {
        VdkBlockStatus bs;
        uint64_t chunk = MIN(end - off, (uint64_t)1 << 30);
        int r = vdk_image_block_status(img, off, chunk, &bs);
        if (r < 0) {
            tool_error(filename, "block status failed at offset %" PRIu64 ": %s", off, g_strerror(-r));
            ret = 1;
            break;
        }
        if (!json && (bs.flags & VDK_BS_DATA) && !(bs.flags & VDK_BS_OFFSET_VALID)) {
            /* qemu-img's human map cannot show data without a host offset;
             * what was mapped before is printed first, as qemu-img does */
            if (cur.length > 0) {
                map_print(img, &cur, json, &first);
            }
            fflush(stdout);
            tool_error(filename, "File contains external, encrypted or compressed clusters.");
            ret = 1;
            break;
        }
        MapEntry e = {
            .start = off,
            .length = bs.length,
            .depth = bs.depth,
            .present = (bs.flags & VDK_BS_ALLOCATED) != 0,
            .zero = (bs.flags & VDK_BS_ZERO) != 0,
            .data = (bs.flags & VDK_BS_DATA) != 0,
            .has_offset = (bs.flags & VDK_BS_OFFSET_VALID) != 0,
            .offset = bs.host_offset,
        };
        bool mergeable = cur.length > 0 && e.depth == cur.depth && e.present == cur.present &&
                         e.zero == cur.zero && e.data == cur.data && e.has_offset == cur.has_offset &&
                         (!e.has_offset || e.offset == cur.offset + cur.length);
        if (mergeable) {
            cur.length += e.length;
        } else {
            if (cur.length > 0) {
                map_print(img, &cur, json, &first);
            }
            cur = e;
        }
        off += bs.length;
    }
    if (ret == 0) {
        if (cur.length > 0) {
            map_print(img, &cur, json, &first);
        }
        if (json) {
            printf("%s]\n", first ? "[" : "");
        }
    }
    vdk_image_close(img, NULL);
    return ret;
}
