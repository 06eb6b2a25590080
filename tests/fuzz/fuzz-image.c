/* SPDX-License-Identifier: MIT */
/*
 * fuzz-image.c - libFuzzer target: an image file's bytes through the paths a
 * downloaded image takes.
 *
 * Built once per format (FUZZ_FORMAT: "qcow2", "vdi", "vmdk", "qcow", or
 * NULL for format probing).  Each input is written to a file in a private
 * directory (so backing files and extents it names resolve there, to
 * nothing), then:
 *   1. opened read-only with the check option (what `vdk check` does):
 *      info, the driver's check, block status over the whole disk (bounded
 *      steps) and reads of the first bytes of every extent it reports;
 *   2. opened read-write with repair (what `vdk check -r all` does) when
 *      the format can check: repair, a small write, a flush, and close.
 * Errors are expected; crashes, sanitizer reports, leaks and hangs (the
 * fuzzer's -timeout) are what it looks for.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/block.h"

#ifndef FUZZ_FORMAT
#define FUZZ_FORMAT NULL
#endif

static char *img_path;

static void
quiet_log(const gchar *domain, GLogLevelFlags level, const gchar *message, gpointer data)
{
    (void)domain;
    (void)level;
    (void)message;
    (void)data;
}

static void
setup(void)
{
    if (img_path) {
        return;
    }
    char *dir = g_dir_make_tmp("vdk-fuzz-XXXXXX", NULL);
    if (!dir) {
        abort();
    }
    img_path = g_build_filename(dir, "img", NULL);
    g_free(dir);
    /* warnings about damaged images are expected; keep the output readable */
    g_log_set_handler("vdk", G_LOG_LEVEL_MASK, quiet_log, NULL);
}

static bool
write_input(const uint8_t *data, size_t size)
{
    int fd = open(img_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        return false;
    }
    size_t done = 0;
    while (done < size) {
        ssize_t n = write(fd, data + done, size - done);
        if (n <= 0) {
            close(fd);
            return false;
        }
        done += (size_t)n;
    }
    close(fd);
    return true;
}

static VdkImage *
open_image(bool rw)
{
    VdkOpenOptions *o = vdk_open_options_new();
    if (FUZZ_FORMAT) {
        vdk_open_options_set_format(o, FUZZ_FORMAT);
    }
    vdk_open_options_set_read_only(o, !rw);
    GError *err = NULL;
    (void)vdk_open_options_set_engine(o, "threads", &err);
    g_clear_error(&err);
    (void)vdk_open_options_set_cache(o, "writeback", &err);
    g_clear_error(&err);
    vdk_open_options_set(o, "check", "on");
    if (rw) {
        vdk_open_options_set(o, "repair", "on");
    }
    VdkImage *img = vdk_image_open(img_path, o, &err);
    vdk_open_options_free(o);
    g_clear_error(&err);
    return img;
}

static void
run_check(VdkImage *img, int fix)
{
    VdkNode *n = img->top;
    if (!n->drv->check) {
        return;
    }
    VdkCheckResult res;
    memset(&res, 0, sizeof(res));
    res.messages = g_ptr_array_new_with_free_func(g_free);
    GError *err = NULL;
    (void)n->drv->check(n, fix, &res, &err);
    g_clear_error(&err);
    g_ptr_array_unref(res.messages);
}

static void
walk(VdkImage *img)
{
    static uint8_t buf[65536];
    uint64_t size = vdk_image_get_size(img);
    uint64_t off = 0;
    for (int steps = 0; off < size && steps < 512; steps++) {
        VdkBlockStatus bs;
        if (vdk_image_block_status(img, off, size - off, &bs) < 0 || bs.length == 0) {
            break;
        }
        if (bs.flags & VDK_BS_DATA) {
            size_t n = (size_t)MIN(bs.length, (uint64_t)sizeof(buf));
            (void)vdk_image_pread(img, buf, n, off);
        }
        off += bs.length;
    }
    /* and the last bytes of the disk */
    if (size >= 4096) {
        (void)vdk_image_pread(img, buf, 4096, size - 4096);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    if (size > (4u << 20) || !write_input(data, size)) {
        return 0;
    }
    VdkImage *img = open_image(false);
    if (img) {
        VdkNode *n = img->top;
        if (n->drv->info) {
            VdkInfo info;
            memset(&info, 0, sizeof(info));
            n->drv->info(n, &info);
            vdk_info_clear(&info);
        }
        run_check(img, 0);
        walk(img);
        vdk_image_close(img, NULL);
    }
    if (!FUZZ_FORMAT) {
        return 0; /* probing: never a writable open of a probed image */
    }
    img = open_image(true);
    if (img) {
        run_check(img, VDK_CHECK_FIX_ERRORS | VDK_CHECK_FIX_LEAKS);
        static const uint8_t pattern[4096] = {0x5a};
        uint64_t sz = vdk_image_get_size(img);
        if (sz >= sizeof(pattern)) {
            (void)vdk_image_pwrite(img, pattern, sizeof(pattern), (sz / 2) & ~(uint64_t)4095, 0);
            (void)vdk_image_flush(img);
        }
        walk(img);
        vdk_image_close(img, NULL);
    }
    return 0;
}
