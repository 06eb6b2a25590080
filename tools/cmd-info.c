/* SPDX-License-Identifier: MIT */
/*
 * cmd-info.c - vdk info: qemu-img info's human and JSON output (same keys,
 * same nesting), one image or the whole backing chain.
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char info_help[] =
    "usage: vdk info [-f FMT] [-b PARENT] [--output=human|json] [--backing-chain] [-U] FILENAME\n"
    "\n"
    "Show the format, virtual size, disk usage and format-specific details of an\n"
    "image, as qemu-img info does (JSON keys are the same).\n"
    "\n"
    "  -f FMT            image format (default: probed)\n"
    "  -b, --parent PARENT  the parent of a differencing vdi image (VDI does not\n"
    "                    record its file name)\n"
    "  --output=FMT      human (default) or json\n"
    "  --backing-chain   every image of the backing chain\n"
    "  -U, --force-share open without locking\n";

static void
node_info_json(Json *j, VdkNode *n)
{
    VdkInfo info;
    memset(&info, 0, sizeof(info));
    if (n->drv->info) {
        n->drv->info(n, &info);
    }
    json_begin_object(j, NULL);
    if (info.backing_format) {
        json_str(j, "backing-filename-format", info.backing_format);
    }
    if (n->drv->snapshot_list) {
        VdkSnapshotInfo *l = NULL;
        int count = n->drv->snapshot_list(n, &l);
        if (count > 0) {
            /* qemu-img's keys, in its order */
            json_begin_array(j, "snapshots");
            for (int i = 0; i < count; i++) {
                json_begin_object(j, NULL);
                if (l[i].icount != UINT64_MAX) {
                    json_uint(j, "icount", l[i].icount);
                }
                json_uint(j, "vm-clock-nsec", l[i].vm_clock_nsec % 1000000000ULL);
                json_str(j, "name", l[i].name);
                json_uint(j, "date-sec", l[i].date_sec);
                json_uint(j, "date-nsec", l[i].date_nsec);
                json_uint(j, "vm-clock-sec", l[i].vm_clock_nsec / 1000000000ULL);
                json_str(j, "id", l[i].id);
                json_uint(j, "vm-state-size", l[i].vm_state_size);
                json_end_object(j);
            }
            json_end_array(j);
        }
        vdk_snapshot_list_free(l, count);
    }
    json_uint(j, "virtual-size", n->size);
    json_str(j, "filename", n->filename);
    if (info.cluster_size) {
        json_uint(j, "cluster-size", info.cluster_size);
    }
    json_str(j, "format", n->drv->name);
    json_uint(j, "actual-size", vdk_file_allocated_bytes(n->file));
    if (info.specific_json) {
        json_begin_object(j, "format-specific");
        json_str(j, "type", n->drv->name);
        json_raw(j, "data", info.specific_json->str);
        json_end_object(j);
    }
    if (info.backing_filename) {
        const char *full = n->backing ? n->backing->filename : info.backing_filename;
        json_str(j, "full-backing-filename", full);
        json_str(j, "backing-filename", info.backing_filename);
    }
    if (info.encrypted) {
        json_bool(j, "encrypted", true);
    }
    json_bool(j, "dirty-flag", info.dirty);
    json_end_object(j);
    vdk_info_clear(&info);
}

static void
node_info_human(VdkNode *n)
{
    VdkInfo info;
    memset(&info, 0, sizeof(info));
    if (n->drv->info) {
        n->drv->info(n, &info);
    }
    char *vs = vdk_size_to_str(n->size);
    char *ds = vdk_size_to_str(vdk_file_allocated_bytes(n->file));
    printf("image: %s\n", n->filename);
    printf("file format: %s\n", n->drv->name);
    printf("virtual size: %s (%" G_GUINT64_FORMAT " bytes)\n", vs, n->size);
    printf("disk size: %s\n", ds);
    if (info.encrypted) {
        printf("encrypted: yes\n");
    }
    if (info.cluster_size) {
        printf("cluster_size: %" G_GUINT64_FORMAT "\n", info.cluster_size);
    }
    if (info.backing_filename) {
        printf("backing file: %s", info.backing_filename);
        if (n->backing && strcmp(n->backing->filename, info.backing_filename) != 0) {
            printf(" (actual path: %s)", n->backing->filename);
        }
        printf("\n");
    }
    if (info.backing_format) {
        printf("backing file format: %s\n", info.backing_format);
    }
    if (info.dirty) {
        printf("cleanly shut down: no\n");
    }
    if (n->drv->snapshot_list) {
        VdkSnapshotInfo *l = NULL;
        int count = n->drv->snapshot_list(n, &l);
        if (count > 0) {
            printf("Snapshot list:\n");
            tool_print_snapshots(l, count);
        }
        vdk_snapshot_list_free(l, count);
    }
    if (info.specific_lines && info.specific_lines->len > 0) {
        printf("Format specific information:\n");
        for (guint i = 0; i < info.specific_lines->len; i++) {
            printf("    %s\n", (const char *)info.specific_lines->pdata[i]);
        }
    }
    g_free(vs);
    g_free(ds);
    vdk_info_clear(&info);
}

int
cmd_info(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"parent", required_argument, NULL, 'b'},
        {"output", required_argument, NULL, 'O'},
        {"backing-chain", no_argument, NULL, 'B'},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = true, .no_io = true};
    bool json = false;
    bool chain = false;
    int c;
    while ((c = getopt_long(argc, argv, "hf:Ub:", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, info_help);
            return 0;
        case 'f':
            o.format = optarg;
            break;
        case 'O':
            if (!tool_parse_output(optarg, &json)) {
                return 1;
            }
            break;
        case 'B':
            chain = true;
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
            tool_usage(stderr, info_help);
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
    if (json) {
        Json j;
        json_init(&j, true);
        if (chain) {
            json_begin_array(&j, NULL);
        }
        for (VdkNode *n = img->top; n; n = chain ? n->backing : NULL) {
            node_info_json(&j, n);
        }
        if (chain) {
            json_end_array(&j);
        }
        char *s = json_finish(&j);
        printf("%s\n", s);
        g_free(s);
    } else {
        for (VdkNode *n = img->top; n; n = chain ? n->backing : NULL) {
            if (n != img->top) {
                printf("\n");
            }
            node_info_human(n);
        }
    }
    vdk_image_close(img, NULL);
    return 0;
}
