/* SPDX-License-Identifier: MIT */
/*
 * cmd-check.c - vdk check: qemu-img check's interface and exit codes
 * (0 clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 the
 * format has no checks).  raw has no metadata and therefore no checks,
 * answered exactly as qemu-img answers.
 */
#include "config.h"

#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char check_help[] =
    "usage: vdk check [-q] [-f FMT] [--output=human|json] [-r leaks|all] [-T SRC_CACHE] [-U] FILENAME\n"
    "\n"
    "Check the image's metadata for consistency and optionally repair it.\n"
    "Exit status: 0 no errors, 1 the check could not be completed, 2 corruptions\n"
    "found, 3 only leaked clusters found, 63 the format does not support checks.\n";

int
cmd_check(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"output", required_argument, NULL, 'O'},
        {"repair", required_argument, NULL, 'r'},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = true};
    bool json = false;
    int c;
    while ((c = getopt_long(argc, argv, "hf:r:T:qU", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, check_help);
            return 0;
        case 'f':
            o.format = optarg;
            break;
        case 'O':
            if (!tool_parse_output(optarg, &json)) {
                return 1;
            }
            break;
        case 'r':
            if (strcmp(optarg, "leaks") && strcmp(optarg, "all")) {
                tool_error(NULL, "Unknown option value for -r (expecting 'leaks' or 'all'): %s", optarg);
                return 1;
            }
            o.read_only = false;
            break;
        case 'T':
            o.cache = optarg;
            break;
        case 'q':
            tool_quiet = true;
            break;
        case 'U':
            o.force_share = true;
            break;
        case 'I':
        case 'j':
            tool_error_unsupported("--image-opts/--object");
            return 1;
        default:
            tool_usage(stderr, check_help);
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
    int ret = 0;
    (void)json; /* both outputs give the same answer until a format has checks */
    if (!img->top->drv->check) {
        tool_error(filename, "This image format does not support checks");
        ret = 63;
    }
    vdk_image_close(img, NULL);
    return ret;
}
