/* SPDX-License-Identifier: MIT */
/*
 * testutil.h - helpers shared by the unit tests: a private temporary
 * directory, the list of I/O engines usable on this machine, and
 * registration of one test body per engine (and cache mode).
 */
#ifndef VDK_TESTUTIL_H
#define VDK_TESTUTIL_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

#include "vdk/vdk.h"

typedef struct {
    const char *engine; /* "io_uring", "native", "threads" */
    const char *cache;  /* "none", "writeback", ... */
} TestVariant;

typedef void (*TestVariantFunc)(const TestVariant *v);

/* Call first in main(): g_test_init plus the temporary directory. */
void test_init(int *argc, char ***argv);
/* Path inside the test's temporary directory (removed at exit). */
char *test_path(const char *name);
const char *test_dir(void);

/* Register /SUITE/ENGINE/CACHE/NAME for every engine compiled in and
 * usable here, and each cache mode in @caches (NULL-terminated; NULL means
 * {"none", "writeback"}). */
void test_add_variants(const char *suite, const char *name, TestVariantFunc fn, const char *const *caches);

/* Create a raw file of @size bytes (sparse) with plain syscalls. */
void test_make_sparse(const char *path, uint64_t size);
/* Open an image with the variant's engine and cache. */
VdkImage *test_open(const char *path, const char *format, const TestVariant *v, bool read_only);

/* Deterministic pseudo-random bytes. */
uint64_t test_rand(uint64_t *state);
void test_fill_random(void *buf, size_t len, uint64_t *state);

/* Read a whole file with plain syscalls. */
GBytes *test_read_file(const char *path);
/* Allocated bytes (st_blocks * 512). */
uint64_t test_allocated(const char *path);
/* Run a shell command; returns its exit status (-1 if it could not run). */
int test_sh(const char *cmd);

/* Crash consistency with a real SIGKILL: a forked writer opens an image and
 * runs pseudo-random writes (up to 150000 bytes each) with a flush every 7,
 * reporting each completed flush on a pipe; it is killed after a while. */
typedef struct {
    uint64_t size;
    uint8_t *model;   /* what the writes before the last completed flush put there */
    uint8_t *unknown; /* 1 where a later write may or may not have landed */
    int flushed;      /* writes covered by the last completed flush */
} TestCrash;
/* Run the writer on @path (@format, @engine; the image is @size bytes) with
 * @nops writes from @seed, SIGKILL it after @delay_ms, fill @c. */
void test_crash_run(TestCrash *c, const char *path, const char *format, const char *engine, uint64_t size, int nops,
                    uint64_t seed, int delay_ms);
/* Read all of @img; fail (naming @iter) on a known byte that differs from
 * the model.  Returns the content (g_free). */
uint8_t *test_crash_verify(const TestCrash *c, VdkImage *img, int iter);
void test_crash_clear(TestCrash *c);

#endif
