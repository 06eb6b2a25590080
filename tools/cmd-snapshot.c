/* SPDX-License-Identifier: MIT */
/*
 * cmd-snapshot.c - vdk snapshot: qemu-img snapshot's flags, output and exit
 * codes (-l list, -c create, -a apply, -d delete) for internal snapshots.
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char snapshot_help[] =
    "usage: vdk snapshot [-q] [-f FMT] [-U] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILENAME\n"
    "\n"
    "List, create, apply or delete internal snapshots (qcow2), as qemu-img snapshot.\n"
    "\n"
    "  -l                list the snapshots (ID, tag, VM size, date, VM clock, icount)\n"
    "  -c SNAPSHOT       create a snapshot of the current disk state named SNAPSHOT\n"
    "  -a SNAPSHOT       apply (revert the disk to) the snapshot with that ID or name\n"
    "  -d SNAPSHOT       delete the snapshot named SNAPSHOT\n"
    "  -f FMT            image format (default: probed)\n"
    "  -U, --force-share open without locking (-l only)\n"
    "  -t CACHE          cache mode (none, writeback, writethrough, directsync, unsafe)\n"
    "  --aio=ENGINE      I/O engine: io_uring, native, threads or auto\n"
    "  -q                quiet\n"
    "\n"
    "Every change is crash-safe: an interruption leaves the old or the new state,\n"
    "at worst with leaked clusters that 'vdk check -r leaks' reclaims.\n";

enum { ACT_NONE, ACT_LIST, ACT_CREATE, ACT_APPLY, ACT_DELETE };

int
cmd_snapshot(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {"aio", required_argument, NULL, 'A'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = true};
    int action = ACT_NONE;
    const char *name = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "hf:la:c:d:qUt:", longopts, NULL)) != -1) {
        int act = ACT_NONE;
        switch (c) {
        case 'h':
            tool_usage(stdout, snapshot_help);
            return 0;
        case 'f':
            o.format = optarg;
            continue;
        case 'q':
            tool_quiet = true;
            continue;
        case 'U':
            o.force_share = true;
            continue;
        case 'I':
            o.image_opts = true;
            continue;
        case 't':
            o.cache = optarg;
            continue;
        case 'A':
            o.aio = optarg;
            continue;
        case 'j':
            if (!tool_add_object(optarg)) {
                return 1;
            }
            break;
        case 'l':
            act = ACT_LIST;
            break;
        case 'c':
            act = ACT_CREATE;
            break;
        case 'a':
            act = ACT_APPLY;
            break;
        case 'd':
            act = ACT_DELETE;
            break;
        default:
            tool_usage(stderr, snapshot_help);
            return 1;
        }
        if (action != ACT_NONE) {
            tool_error(NULL, "Cannot mix '-l', '-a', '-c', '-d'");
            return 1;
        }
        action = act;
        name = act == ACT_LIST ? NULL : optarg;
    }
    if (optind != argc - 1) {
        tool_error(NULL, "Expecting one image file name");
        return 1;
    }
    const char *filename = argv[optind];
    if (action != ACT_LIST && action != ACT_NONE) {
        o.read_only = false;
        if (o.force_share) {
            tool_error(filename, "--force-share/-U can only be used with -l (the image is written)");
            return 1;
        }
    }
    VdkImage *img = tool_open(filename, &o);
    if (!img) {
        return 1;
    }
    int ret = 0;
    GError *err = NULL;
    switch (action) {
    case ACT_LIST: {
        VdkSnapshotInfo *l = NULL;
        int count = vdk_image_snapshot_list(img, &l, &err);
        if (count < 0) {
            tool_gerror(filename, err);
            ret = 1;
            break;
        }
        if (count > 0) {
            printf("Snapshot list:\n");
            tool_print_snapshots(l, count);
        }
        vdk_snapshot_list_free(l, count);
        break;
    }
    case ACT_CREATE:
        if (!vdk_image_snapshot_create(img, name, &err)) {
            tool_error(filename, "Could not create snapshot '%s': %s", name, err->message);
            g_error_free(err);
            ret = 1;
        }
        break;
    case ACT_APPLY:
        if (!vdk_image_snapshot_apply(img, name, &err)) {
            tool_error(filename, "Could not apply snapshot '%s': %s", name, err->message);
            g_error_free(err);
            ret = 1;
        }
        break;
    case ACT_DELETE:
        if (!vdk_image_snapshot_delete(img, name, &err)) {
            tool_error(filename, "Could not delete snapshot '%s': %s", name, err->message);
            g_error_free(err);
            ret = 1;
        }
        break;
    default:
        break;
    }
    if (!vdk_image_close(img, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
    return ret;
}
