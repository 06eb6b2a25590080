/* SPDX-License-Identifier: MIT */
/*
 * cmd-check.c - vdk check: qemu-img check's interface and exit codes
 * (0 clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 the
 * format has no checks).  raw has no metadata and therefore no checks,
 * answered exactly as qemu-img answers.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <string.h>

#include "tools/tool.h"

static const char check_help[] =
    "usage: vdk check [-b PARENT] [-q] [-f FMT] [--output=human|json] [-r leaks|all] [-T SRC_CACHE] [-U] FILENAME\n"
    "\n"
    "Check the image's metadata for consistency and optionally repair it.\n"
    "Exit status: 0 no errors, 1 the check could not be completed, 2 corruptions\n"
    "found, 3 only leaked clusters found, 63 the format does not support checks.\n"
    "\n"
    "  -b, --parent PARENT  the parent of a differencing vdi image (VDI does not\n"
    "                    record its file name)\n";

static void
print_human(const VdkCheckReport *r)
{
    if (r->corruptions == 0 && r->leaks == 0 && r->check_errors == 0) {
        printf("No errors were found on the image.\n");
    } else {
        if (r->corruptions) {
            printf("\n%" G_GUINT64_FORMAT " errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.\n",
                   r->corruptions);
        }
        if (r->leaks) {
            printf("\n%" G_GUINT64_FORMAT " leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n",
                   r->leaks);
        }
        if (r->check_errors) {
            printf("\n%" G_GUINT64_FORMAT " internal errors have occurred during the check.\n", r->check_errors);
        }
    }
    if (r->has_stats && r->total_clusters && r->allocated_clusters) { /* as qemu-img */
        double a = r->allocated_clusters;
        printf("%" G_GUINT64_FORMAT "/%" G_GUINT64_FORMAT " = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
               r->allocated_clusters, r->total_clusters, a * 100.0 / (double)r->total_clusters,
               a ? (double)r->fragmented_clusters * 100.0 / a : 0.0,
               a ? (double)r->compressed_clusters * 100.0 / a : 0.0);
    }
    if (r->has_stats && r->image_end_offset) {
        printf("Image end offset: %" G_GUINT64_FORMAT "\n", r->image_end_offset);
    }
}

static void
print_json(const VdkCheckReport *r, const char *filename, const char *format)
{
    /* qemu-img's key order; optional keys only when non-zero */
    Json j;
    json_init(&j, true);
    json_begin_object(&j, NULL);
    if (r->has_stats && r->image_end_offset) {
        json_uint(&j, "image-end-offset", r->image_end_offset);
    }
    if (r->compressed_clusters) {
        json_uint(&j, "compressed-clusters", r->compressed_clusters);
    }
    if (r->has_stats) {
        json_uint(&j, "total-clusters", r->total_clusters);
    }
    if (r->corruptions) {
        json_uint(&j, "corruptions", r->corruptions);
    }
    if (r->corruptions_fixed) {
        json_uint(&j, "corruptions-fixed", r->corruptions_fixed);
    }
    json_uint(&j, "check-errors", r->check_errors);
    if (r->leaks) {
        json_uint(&j, "leaks", r->leaks);
    }
    if (r->leaks_fixed) {
        json_uint(&j, "leaks-fixed", r->leaks_fixed);
    }
    if (r->has_stats) {
        json_uint(&j, "allocated-clusters", r->allocated_clusters);
    }
    json_str(&j, "filename", filename);
    json_str(&j, "format", format);
    if (r->fragmented_clusters) {
        json_uint(&j, "fragmented-clusters", r->fragmented_clusters);
    }
    json_end_object(&j);
    char *s = json_finish(&j);
    printf("%s\n", s);
    g_free(s);
}

int
cmd_check(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"parent", required_argument, NULL, 'b'},
        {"output", required_argument, NULL, 'O'},
        {"repair", required_argument, NULL, 'r'},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.read_only = true};
    bool json = false;
    bool quiet = tool_quiet;
    int fix = 0;
    int c;
    while ((c = getopt_long(argc, argv, "hf:r:T:qUb:", longopts, NULL)) != -1) {
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
            if (!strcmp(optarg, "leaks")) {
                fix = VDK_CHECK_FIX_LEAKS;
            } else if (!strcmp(optarg, "all")) {
                fix = VDK_CHECK_FIX_LEAKS | VDK_CHECK_FIX_ERRORS;
            } else {
                tool_error(NULL, "Unknown option value for -r (expecting 'leaks' or 'all'): %s", optarg);
                return 1;
            }
            o.read_only = false;
            break;
        case 'T':
            o.cache = optarg;
            break;
        case 'q':
            quiet = true;
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
            tool_usage(stderr, check_help);
            return 1;
        }
    }
    if (optind != argc - 1) {
        tool_error(NULL, "Expecting one image file name");
        return 1;
    }
    const char *filename = argv[optind];
    GPtrArray *extra = g_ptr_array_new();
    g_ptr_array_add(extra, "check");
    g_ptr_array_add(extra, "on");
    if (fix) {
        g_ptr_array_add(extra, "repair");
        g_ptr_array_add(extra, "on");
    }
    o.opts = extra;
    VdkImage *img = tool_open(filename, &o);
    if (extra) {
        g_ptr_array_free(extra, TRUE);
    }
    if (!img) {
        return 1;
    }
    VdkCheckReport res;
    GError *err = NULL;
    bool ok = vdk_image_check(img, (unsigned)fix, &res, &err);
    if (!ok && err && err->code == ENOTSUP) {
        g_clear_error(&err);
        tool_error(filename, "This image format does not support checks");
        vdk_image_close(img, NULL);
        return 63;
    }
    for (char **m = res.messages; m && *m; m++) {
        fprintf(stderr, "%s\n", *m);
    }
    int ret;
    if (!ok) {
        tool_gerror(filename, err);
        ret = 1;
    } else {
        if (!quiet) {
            if (json) {
                print_json(&res, filename, vdk_image_get_format(img));
            } else {
                if (res.leaks_fixed || res.corruptions_fixed) {
                    printf("The following inconsistencies were found and repaired:\n\n"
                           "    %" G_GUINT64_FORMAT " leaked clusters\n    %" G_GUINT64_FORMAT " corruptions\n\n"
                           "Double checking the fixed image now...\n",
                           res.leaks_fixed, res.corruptions_fixed);
                }
                print_human(&res);
            }
        }
        ret = res.check_errors ? 1 : res.corruptions ? 2 : res.leaks ? 3 : 0;
    }
    vdk_check_report_clear(&res);
    if (!vdk_image_close(img, &err)) {
        tool_gerror(filename, err);
        ret = ret ? ret : 1;
    }
    return ret;
}
