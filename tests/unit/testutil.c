/* SPDX-License-Identifier: MIT */
/*
 * testutil.c - see testutil.h.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io.h"
#include "testutil.h"

static char *tmpdir;

static void
cleanup_tmpdir(void)
{
    if (tmpdir) {
        char *cmd = g_strdup_printf("rm -rf '%s'", tmpdir);
        if (system(cmd) != 0) {
            /* nothing more to do */
        }
        g_free(cmd);
    }
}

static void
quiet_log(const gchar *domain, GLogLevelFlags level, const gchar *message, gpointer data)
{
    (void)domain;
    (void)level;
    (void)message;
    (void)data;
}

void
test_init(int *argc, char ***argv)
{
    g_test_init(argc, argv, NULL);
    /* Tests drive warning paths on purpose (probed raw ...): keep libvdk's
     * warnings out of the TAP stream unless asked for. */
    if (!g_getenv("VDK_TEST_VERBOSE")) {
        g_log_set_handler("vdk", G_LOG_LEVEL_WARNING | G_LOG_LEVEL_DEBUG | G_LOG_LEVEL_MESSAGE | G_LOG_LEVEL_INFO,
                          quiet_log, NULL);
    }
    g_log_set_always_fatal(G_LOG_LEVEL_CRITICAL | G_LOG_FLAG_FATAL);
    const char *base = g_getenv("VDK_TEST_DIR");
    if (!base) {
        base = "/var/tmp";
    }
    tmpdir = g_build_filename(base, "vdk-unit-XXXXXX", NULL);
    if (!g_mkdtemp(tmpdir)) {
        g_error("cannot create a temporary directory under %s: %s", base, g_strerror(errno));
    }
    atexit(cleanup_tmpdir);
}

const char *
test_dir(void)
{
    return tmpdir;
}

char *
test_path(const char *name)
{
    return g_build_filename(tmpdir, name, NULL);
}

typedef struct {
    TestVariant v;
    TestVariantFunc fn;
    char *skip; /* the engine cannot run here: why */
} VariantData;

static void
run_variant(gconstpointer data)
{
    const VariantData *d = data;
    if (d->skip) {
        g_test_skip(d->skip);
        return;
    }
    d->fn(&d->v);
}

static void
variant_free(gpointer p)
{
    VariantData *d = p;
    g_free(d->skip);
    g_free(d);
}

void
test_add_variants(const char *suite, const char *name, TestVariantFunc fn, const char *const *caches)
{
    static const char *const default_caches[] = {"none", "writeback", NULL};
    static const char *const engines[] = {"io_uring", "native", "threads"};
    if (!caches) {
        caches = default_caches;
    }
    for (size_t e = 0; e < G_N_ELEMENTS(engines); e++) {
        for (size_t c = 0; caches[c]; c++) {
            char *path = g_strdup_printf("/%s/%s/%s/%s", suite, engines[e], caches[c], name);
            GError *err = NULL;
            VariantData *d = g_new0(VariantData, 1);
            if (!vdk_io_engine_select(engines[e], NULL, &err)) {
                d->skip = g_strdup(err->message);
                g_clear_error(&err);
            }
            d->v.engine = engines[e];
            d->v.cache = caches[c];
            d->fn = fn;
            g_test_add_data_func_full(path, d, run_variant, variant_free);
            g_free(path);
        }
    }
}

void
test_make_sparse(const char *path, uint64_t size)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    g_assert_cmpint(fd, >=, 0);
    g_assert_cmpint(ftruncate(fd, (off_t)size), ==, 0);
    close(fd);
}

VdkImage *
test_open(const char *path, const char *format, const TestVariant *v, bool read_only)
{
    VdkOpenOptions *o = vdk_open_options_new();
    GError *err = NULL;
    if (format) {
        vdk_open_options_set_format(o, format);
    }
    vdk_open_options_set_read_only(o, read_only);
    if (v) {
        g_assert_true(vdk_open_options_set_engine(o, v->engine, &err));
        g_assert_true(vdk_open_options_set_cache(o, v->cache, &err));
    }
    VdkImage *img = vdk_image_open(path, o, &err);
    vdk_open_options_free(o);
    if (!img) {
        g_error("cannot open %s: %s", path, err ? err->message : "?");
    }
    g_assert_cmpstr(vdk_image_get_engine(img), ==, v ? v->engine : vdk_image_get_engine(img));
    return img;
}

uint64_t
test_rand(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

void
test_fill_random(void *buf, size_t len, uint64_t *state)
{
    uint8_t *p = buf;
    for (size_t i = 0; i < len; i += 8) {
        uint64_t r = test_rand(state);
        memcpy(p + i, &r, MIN((size_t)8, len - i));
    }
}

GBytes *
test_read_file(const char *path)
{
    gchar *data = NULL;
    gsize len = 0;
    GError *err = NULL;
    g_assert_true(g_file_get_contents(path, &data, &len, &err));
    return g_bytes_new_take(data, len);
}

uint64_t
test_allocated(const char *path)
{
    struct stat st;
    g_assert_cmpint(stat(path, &st), ==, 0);
    return (uint64_t)st.st_blocks * 512;
}

int
test_sh(const char *cmd)
{
    int r = system(cmd);
    if (r < 0 || !WIFEXITED(r)) {
        return -1;
    }
    return WEXITSTATUS(r);
}
