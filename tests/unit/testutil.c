/* SPDX-License-Identifier: MIT */
/*
 * testutil.c - see testutil.h.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
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

/* ------------------------------------------------------------------------ */
/* Crash harness                                                             */
/* ------------------------------------------------------------------------ */

#define CRASH_MAX_LEN 150000

typedef struct {
    uint64_t off, len;
    uint8_t fill;
} CrashOp;

static CrashOp *
crash_plan(uint64_t seed, uint64_t size, int nops)
{
    CrashOp *ops = g_new(CrashOp, nops);
    for (int i = 0; i < nops; i++) {
        ops[i].off = test_rand(&seed) % (size - 200000);
        ops[i].len = 1 + test_rand(&seed) % CRASH_MAX_LEN;
        ops[i].fill = (uint8_t)(1 + i % 250);
    }
    return ops;
}

static void G_GNUC_NORETURN
crash_writer(const char *path, const char *format, const char *engine, uint64_t size, int nops, uint64_t seed,
             int wfd)
{
    CrashOp *ops = crash_plan(seed, size, nops);
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_format(o, format);
    vdk_open_options_set_engine(o, engine, NULL);
    VdkImage *img = vdk_image_open(path, o, NULL);
    if (!img) {
        _exit(3);
    }
    uint8_t *buf = g_malloc(CRASH_MAX_LEN + 1);
    for (int i = 0; i < nops; i++) {
        memset(buf, ops[i].fill, ops[i].len);
        if (vdk_image_pwrite(img, buf, ops[i].len, ops[i].off, 0) < 0) {
            _exit(4);
        }
        if (i % 7 == 6) {
            if (vdk_image_flush(img) < 0) {
                _exit(5);
            }
            int32_t done = i + 1;
            if (write(wfd, &done, sizeof(done)) != sizeof(done)) {
                _exit(6);
            }
        }
    }
    _exit(0);
}

void
test_crash_run(TestCrash *c, const char *path, const char *format, const char *engine, uint64_t size, int nops,
               uint64_t seed, int delay_ms)
{
    int p[2];
    g_assert_cmpint(pipe(p), ==, 0);
    pid_t pid = fork();
    g_assert_cmpint(pid, >=, 0);
    if (pid == 0) {
        close(p[0]);
        crash_writer(path, format, engine, size, nops, seed, p[1]);
    }
    close(p[1]);
    struct timespec ts = {delay_ms / 1000, (long)(delay_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    int32_t flushed = 0, x;
    while (read(p[0], &x, sizeof(x)) == sizeof(x)) {
        flushed = x;
    }
    close(p[0]);
    /* A killed process's io_uring lets go of its files (and so of its image
     * locks) a moment after the process is gone: wait for that. */
    for (int tries = 0; tries < 500; tries++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            break;
        }
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 100, .l_len = 110};
        int r = fcntl(fd, F_OFD_GETLK, &fl);
        close(fd);
        if (r != 0 || fl.l_type == F_UNLCK) {
            break;
        }
        g_usleep(10000);
    }
    g_test_message("killed after %d flushed writes", flushed);
    CrashOp *ops = crash_plan(seed, size, nops);
    c->size = size;
    c->flushed = flushed;
    c->model = g_malloc0(size);
    c->unknown = g_malloc0(size);
    for (int i = 0; i < flushed; i++) {
        memset(c->model + ops[i].off, ops[i].fill, ops[i].len);
    }
    for (int i = flushed; i < nops; i++) {
        memset(c->unknown + ops[i].off, 1, ops[i].len);
    }
    g_free(ops);
}

uint8_t *
test_crash_verify(const TestCrash *c, VdkImage *img, int iter)
{
    uint8_t *buf = g_malloc(c->size);
    g_assert_cmpint(vdk_image_pread(img, buf, c->size, 0), ==, 0);
    for (uint64_t i = 0; i < c->size; i++) {
        if (!c->unknown[i] && buf[i] != c->model[i]) {
            g_error("iteration %d (killed after %d flushed writes): byte %" G_GUINT64_FORMAT
                    " is 0x%02x, expected 0x%02x",
                    iter, c->flushed, i, buf[i], c->model[i]);
        }
    }
    return buf;
}

void
test_crash_clear(TestCrash *c)
{
    g_free(c->model);
    g_free(c->unknown);
    memset(c, 0, sizeof(*c));
}
