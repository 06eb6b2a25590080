/* SPDX-License-Identifier: MIT */
/*
 * util.c - small shared helpers: the error domain, version, size parsing
 * and printing in qemu-img's conventions, cache mode names.
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "block/block.h"

G_DEFINE_QUARK(vdk-error-quark, vdk_error)

const char *
vdk_version(void)
{
    return VDK_VERSION_STRING;
}

bool
vdk_parse_size(const char *str, uint64_t *out, GError **error)
{
    if (!str || !*str) {
        g_set_error(error, VDK_ERROR, EINVAL, "empty size");
        return false;
    }
    const char *p = str;
    while (g_ascii_isspace(*p)) {
        p++;
    }
    if (*p == '-' || *p == '+') {
        g_set_error(error, VDK_ERROR, EINVAL, "invalid size '%s'", str);
        return false;
    }
    /* Integer part and optional fraction, parsed by hand so "0x" and
     * exponents are not accepted and large integers stay exact. */
    uint64_t ipart = 0;
    bool digits = false;
    while (g_ascii_isdigit(*p)) {
        digits = true;
        if (vdk_mul_overflows(ipart, 10, &ipart) || vdk_add_overflows(ipart, (uint64_t)(*p - '0'), &ipart)) {
            g_set_error(error, VDK_ERROR, ERANGE, "size '%s' is too large", str);
            return false;
        }
        p++;
    }
    double frac = 0;
    if (*p == '.') {
        p++;
        double scale = 0.1;
        while (g_ascii_isdigit(*p)) {
            digits = true;
            frac += (*p - '0') * scale;
            scale /= 10;
            p++;
        }
    }
    if (!digits) {
        g_set_error(error, VDK_ERROR, EINVAL, "invalid size '%s'", str);
        return false;
    }
    unsigned shift = 0;
    switch (*p) {
    case 'b': case 'B': shift = 0; p++; break;
    case 'k': case 'K': shift = 10; p++; break;
    case 'm': case 'M': shift = 20; p++; break;
    case 'g': case 'G': shift = 30; p++; break;
    case 't': case 'T': shift = 40; p++; break;
    case 'p': case 'P': shift = 50; p++; break;
    case 'e': case 'E': shift = 60; p++; break;
    default: break;
    }
    if (shift > 0 && (*p == 'b' || *p == 'B')) {
        p++; /* "10GB" */
    } else if (shift > 0 && (*p == 'i') && (p[1] == 'B' || p[1] == 'b')) {
        p += 2; /* "10GiB" */
    }
    while (g_ascii_isspace(*p)) {
        p++;
    }
    if (*p != '\0') {
        g_set_error(error, VDK_ERROR, EINVAL, "invalid size '%s' (use a number with an optional k, M, G, T, P or E suffix)", str);
        return false;
    }
    if (shift == 0 && frac != 0) {
        g_set_error(error, VDK_ERROR, EINVAL, "invalid size '%s': fractional bytes", str);
        return false;
    }
    uint64_t val;
    if (shift >= 64 || (shift > 0 && (ipart >> (64 - shift)) != 0)) {
        g_set_error(error, VDK_ERROR, ERANGE, "size '%s' is too large", str);
        return false;
    }
    val = ipart << shift;
    if (frac != 0) {
        double extra = frac * (double)(1ULL << shift);
        uint64_t e = (uint64_t)extra;
        if (vdk_add_overflows(val, e, &val)) {
            g_set_error(error, VDK_ERROR, ERANGE, "size '%s' is too large", str);
            return false;
        }
    }
    if (val > (uint64_t)INT64_MAX) {
        g_set_error(error, VDK_ERROR, ERANGE, "size '%s' is too large", str);
        return false;
    }
    *out = val;
    return true;
}

char *
vdk_size_to_str(uint64_t val)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    unsigned i = 0;
    double v = (double)val;
    /* Move up a unit once the number would print as 1000 or more. */
    while (i + 1 < G_N_ELEMENTS(units) && v >= 999.5) {
        v /= 1024.0;
        i++;
    }
    return g_strdup_printf("%0.3g %s", v, units[i]);
}

static const char *const cache_names[] = {
    [VDK_CACHE_WRITEBACK] = "writeback",
    [VDK_CACHE_NONE] = "none",
    [VDK_CACHE_WRITETHROUGH] = "writethrough",
    [VDK_CACHE_DIRECTSYNC] = "directsync",
    [VDK_CACHE_UNSAFE] = "unsafe",
};

const char *
vdk_cache_mode_name(VdkCacheMode mode)
{
    if ((size_t)mode < G_N_ELEMENTS(cache_names)) {
        return cache_names[mode];
    }
    return "?";
}

bool
vdk_cache_mode_parse(const char *s, VdkCacheMode *out, GError **error)
{
    for (size_t i = 0; i < G_N_ELEMENTS(cache_names); i++) {
        if (strcmp(s, cache_names[i]) == 0) {
            *out = (VdkCacheMode)i;
            return true;
        }
    }
    if (strcmp(s, "off") == 0) { /* qemu's alias for none */
        *out = VDK_CACHE_NONE;
        return true;
    }
    g_set_error(error, VDK_ERROR, EINVAL,
                "invalid cache mode '%s' (expected none, writeback, writethrough, directsync or unsafe)", s);
    return false;
}

/*
 * Zero detection for convert's sparse scanning.  SSE2 is part of x86-64's
 * baseline, so no runtime dispatch is needed there: 64 bytes per step with
 * one test per step, after a cheap look at the first and last words (most
 * non-zero buffers fail right there).
 */
#if defined(__x86_64__) || defined(__SSE2__)
#include <emmintrin.h>
#endif

bool
vdk_buffer_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    if (len < 64) {
        for (size_t i = 0; i < len; i++) {
            if (p[i]) {
                return false;
            }
        }
        return true;
    }
    uint64_t head, tail;
    memcpy(&head, p, 8);
    memcpy(&tail, p + len - 8, 8);
    if (head | tail) {
        return false;
    }
    size_t i = 0;
#if defined(__x86_64__) || defined(__SSE2__)
    const __m128i zero = _mm_setzero_si128();
    for (; i + 64 <= len; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(p + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(p + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(p + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(p + i + 48));
        __m128i o = _mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d));
        if (_mm_movemask_epi8(_mm_cmpeq_epi8(o, zero)) != 0xffff) {
            return false;
        }
    }
#else
    for (; i + 32 <= len; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, 32);
        if (w[0] | w[1] | w[2] | w[3]) {
            return false;
        }
    }
#endif
    for (; i < len; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}
