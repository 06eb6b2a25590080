/* SPDX-License-Identifier: MIT */
/*
 * test-util.c - size parsing and printing (qemu-img's conventions), cache
 * mode names, zero detection.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include "block/block.h"
#include "testutil.h"

static void
test_parse_size_valid(void)
{
    static const struct {
        const char *s;
        uint64_t v;
    } cases[] = {
        {"0", 0},
        {"512", 512},
        {"1k", 1024},
        {"1K", 1024},
        {"4k", 4096},
        {"1M", 1 << 20},
        {"1.5M", 3 << 19},
        {"10G", 10ULL << 30},
        {"1T", 1ULL << 40},
        {"2P", 2ULL << 50},
        {"1E", 1ULL << 60},
        {"100b", 100},
        {"1GB", 1ULL << 30},
        {"1GiB", 1ULL << 30},
        {" 7 ", 7},
        {"9223372036854775807", 9223372036854775807ULL},
    };
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        uint64_t v = 1234;
        GError *err = NULL;
        g_assert_true(vdk_parse_size(cases[i].s, &v, &err));
        g_assert_no_error(err);
        g_assert_cmpuint(v, ==, cases[i].v);
    }
}

static void
test_parse_size_invalid(void)
{
    static const char *const bad[] = {
        "", "abc", "-1", "+5", "1x", "1.5", "0x10", "8E", "9223372036854775808", "18446744073709551616",
        "1..5M", "M", "1e3",
    };
    for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
        uint64_t v = 1234;
        GError *err = NULL;
        g_assert_false(vdk_parse_size(bad[i], &v, &err));
        g_assert_nonnull(err);
        g_assert_cmpuint(v, ==, 1234);
        g_assert_cmpint(err->domain, ==, VDK_ERROR);
        g_clear_error(&err);
    }
}

static void
test_size_to_str(void)
{
    static const struct {
        uint64_t v;
        const char *s;
    } cases[] = {
        {0, "0 B"},
        {512, "512 B"},
        {999, "999 B"},
        {1000, "0.977 KiB"},
        {1024, "1 KiB"},
        {200704, "196 KiB"},
        {1118208, "1.07 MiB"},
        {1073741824, "1 GiB"},
        {1610612736, "1.5 GiB"},
        {1099511627776ULL, "1 TiB"},
    };
    for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
        char *s = vdk_size_to_str(cases[i].v);
        g_assert_cmpstr(s, ==, cases[i].s);
        g_free(s);
    }
}

static void
test_cache_modes(void)
{
    static const char *const names[] = {"none", "writeback", "writethrough", "directsync", "unsafe"};
    for (size_t i = 0; i < G_N_ELEMENTS(names); i++) {
        VdkCacheMode m;
        g_assert_true(vdk_cache_mode_parse(names[i], &m, NULL));
        g_assert_cmpstr(vdk_cache_mode_name(m), ==, names[i]);
    }
    VdkCacheMode m;
    GError *err = NULL;
    g_assert_false(vdk_cache_mode_parse("fast", &m, &err));
    g_assert_nonnull(strstr(err->message, "'fast'"));
    g_clear_error(&err);
}

static void
test_buffer_is_zero(void)
{
    uint8_t *buf = g_malloc0(4096 + 64);
    for (size_t align = 0; align < 16; align += 3) {
        uint8_t *p = buf + align;
        for (size_t len = 0; len <= 300; len++) {
            g_assert_true(vdk_buffer_is_zero(p, len));
            for (size_t pos = 0; pos < len; pos++) {
                p[pos] = 0x80;
                g_assert_false(vdk_buffer_is_zero(p, len));
                p[pos] = 0;
            }
        }
        g_assert_true(vdk_buffer_is_zero(p, 4096));
        p[4095] = 1;
        g_assert_false(vdk_buffer_is_zero(p, 4096));
        p[4095] = 0;
        p[2049] = 1;
        g_assert_false(vdk_buffer_is_zero(p, 4096));
        p[2049] = 0;
    }
    g_free(buf);
}

static void
test_error_quark(void)
{
    g_assert_cmpstr(g_quark_to_string(VDK_ERROR), ==, "vdk-error-quark");
    g_assert_cmpstr(vdk_version(), ==, VDK_VERSION_STRING);
}

int
main(int argc, char **argv)
{
    test_init(&argc, &argv);
    g_test_add_func("/util/parse-size/valid", test_parse_size_valid);
    g_test_add_func("/util/parse-size/invalid", test_parse_size_invalid);
    g_test_add_func("/util/size-to-str", test_size_to_str);
    g_test_add_func("/util/cache-modes", test_cache_modes);
    g_test_add_func("/util/buffer-is-zero", test_buffer_is_zero);
    g_test_add_func("/util/error-quark-and-version", test_error_quark);
    return g_test_run();
}
