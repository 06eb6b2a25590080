/* SPDX-License-Identifier: MIT */
/*
 * vdk.c - the vdk command: dispatch to subcommands with qemu-img's names
 * and flags.
 */
#include "config.h"

#include <locale.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "io/io.h"
#include "tools/tool.h"

static const ToolCommand commands[] = {
    {"allocate", cmd_allocate, "make a sparse image physically allocated"},
    {"amend", cmd_amend, "change format options of an existing image"},
    {"bench", cmd_bench, "measure I/O speed (qemu-img bench, plus --time, --rw, --json)"},
    {"bitmap", cmd_bitmap, "add, remove, clear, enable, disable or merge persistent dirty bitmaps"},
    {"check", cmd_check, "check an image for consistency"},
    {"commit", cmd_commit, "write an overlay's changes into its backing file"},
    {"compact", cmd_compact, "give back the space of freed clusters, in place"},
    {"compare", cmd_compare, "compare the guest-visible content of two images"},
    {"convert", cmd_convert, "copy an image into another file and format"},
    {"create", cmd_create, "create a new image"},
    {"dd", cmd_dd, "copy part of an image into a new image, like dd(1)"},
#ifdef VDK_HAVE_FUSE
    {"fuse", cmd_fuse, "show an image's content as a regular file (FUSE export)"},
#endif
    {"info", cmd_info, "show information about an image"},
    {"io", cmd_io, "run qemu-io style commands against an image"},
    {"map", cmd_map, "show where an image's data lives"},
    {"measure", cmd_measure, "calculate the file size a new image needs"},
    {"rebase", cmd_rebase, "change an image's backing file"},
    {"resize", cmd_resize, "change an image's virtual size"},
    {"serve", cmd_serve, "export an image over NBD (like qemu-nbd)"},
    {"snapshot", cmd_snapshot, "list, create, apply or delete internal snapshots"},
};

static void
usage(FILE *out)
{
    fprintf(out,
            "vdk %s - virtual disk kit\n"
            "usage: vdk [-v] [-q] COMMAND [options]\n"
            "       vdk COMMAND --help\n"
            "\n"
            "Commands:\n",
            vdk_version());
    for (size_t i = 0; i < G_N_ELEMENTS(commands); i++) {
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
    }
    fprintf(out, "\nSupported formats:");
    for (size_t i = 0; i < vdk_formats_count; i++) {
        fprintf(out, " %s", vdk_formats[i]->name);
    }
    /* Engines compiled in and usable on this machine. */
    fprintf(out, "\nI/O engines (--aio):");
    static const char *const engines[] = {"io_uring", "native", "threads"};
    for (size_t i = 0; i < G_N_ELEMENTS(engines); i++) {
        if (vdk_io_engine_select(engines[i], NULL, NULL)) {
            fprintf(out, " %s", engines[i]);
        }
    }
    fprintf(out, " auto\n"
                 "Cache modes (-t/-T): none writeback writethrough directsync unsafe\n");
}

int
main(int argc, char **argv)
{
    setlocale(LC_ALL, "C");
    signal(SIGPIPE, SIG_IGN);
    tool_setup_logging();

    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "-v") || !strcmp(argv[i], "--verbose")) {
            tool_verbose = true;
        } else if (!strcmp(argv[i], "-q") || !strcmp(argv[i], "--quiet")) {
            tool_quiet = true;
        } else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "-V") || !strcmp(argv[i], "--version")) {
            printf("vdk version %s\n", vdk_version());
            return 0;
        } else {
            tool_error(NULL, "unknown option '%s' (see vdk --help)", argv[i]);
            return 1;
        }
    }
    if (i >= argc) {
        usage(stderr);
        return 1;
    }
    for (size_t k = 0; k < G_N_ELEMENTS(commands); k++) {
        if (!strcmp(argv[i], commands[k].name)) {
            return commands[k].fn(argc - i, argv + i);
        }
    }
    tool_error(NULL, "unknown command '%s' (see vdk --help)", argv[i]);
    return 1;
}
