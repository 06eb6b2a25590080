/* SPDX-License-Identifier: MIT */
/*
 * test-luks.c - LUKS1 and the encrypted data path: known answers for
 * PBKDF2-HMAC-SHA256 (RFC 7914) and AES-XTS (IEEE P1619 vector 4) through
 * our wrappers of libcrypto, the AF splitter against an independent
 * implementation of the spec's merge, split/merge roundtrips, header
 * format/parse/unlock (wrong passphrase refused), hostile headers, and an
 * encrypted qcow2 image written with many requests in flight on every
 * engine, read back and reopened with a wrong passphrase.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "block/block.h"
#include "block/luks.h"
#include "testutil.h"

static void
hex_to_bytes(const char *hex, uint8_t *out, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned v = 0;
        g_assert_cmpint(sscanf(hex + 2 * i, "%2x", &v), ==, 1);
        out[i] = (uint8_t)v;
    }
}

static void
test_pbkdf2_kat(void)
{
    /* RFC 7914 section 11: PBKDF2-HMAC-SHA256 */
    uint8_t out[64], want[64];
    g_assert_true(vdk_luks_pbkdf2("sha256", "passwd", 6, (const uint8_t *)"salt", 4, 1, out, 64));
    hex_to_bytes("55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
                 "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783",
                 want, 64);
    g_assert_cmpmem(out, 64, want, 64);
    g_assert_true(vdk_luks_pbkdf2("sha256", "Password", 8, (const uint8_t *)"NaCl", 4, 80000, out, 16));
    hex_to_bytes("4ddcd8f60b98be21830cee5ef22701f9", want, 16);
    g_assert_cmpmem(out, 16, want, 16);
    g_assert_false(vdk_luks_pbkdf2("md5", "x", 1, (const uint8_t *)"s", 1, 1, out, 16));
    g_assert_false(vdk_luks_pbkdf2("sha256", "x", 1, (const uint8_t *)"s", 1, 0, out, 16));
}

static void
test_xts_kat(void)
{
    /* IEEE P1619 XTS-AES-128 vector 4: data unit 0, 512 bytes 00..ff twice */
    uint8_t key[32], buf[512], want[16];
    hex_to_bytes("27182818284590452353602874713526"
                 "31415926535897932384626433832795",
                 key, 32);
    for (int i = 0; i < 512; i++) {
        buf[i] = (uint8_t)i;
    }
    VdkCipher *c = vdk_cipher_new("aes", "xts-plain64", key, 32, NULL);
    g_assert_nonnull(c);
    g_assert_cmpint(vdk_cipher_run(c, true, 0, buf, sizeof(buf)), ==, 0);
    hex_to_bytes("27a7479befa1d476489f308cd4cfa6e2", want, 16);
    g_assert_cmpmem(buf, 16, want, 16);
    hex_to_bytes("0a282df920147beabe421ee5319d0568", want, 16);
    g_assert_cmpmem(buf + 496, 16, want, 16);
    g_assert_cmpint(vdk_cipher_run(c, false, 0, buf, sizeof(buf)), ==, 0);
    for (int i = 0; i < 512; i++) {
        g_assert_cmpint(buf[i], ==, (uint8_t)i);
    }
    g_assert_cmpint(vdk_cipher_run(c, true, 0, buf, 100), ==, -EINVAL); /* whole sectors only */
    vdk_cipher_free(c);

    /* plain64: sector n's IV is n little endian (AES-256-XTS, 64-byte key,
     * checked against python-cryptography for sector 5) */
    uint8_t key64[64], two[1024];
    for (int i = 0; i < 64; i++) {
        key64[i] = (uint8_t)i;
    }
    c = vdk_cipher_new("aes", "xts-plain64", key64, 64, NULL);
    memset(two, 0, sizeof(two));
    g_assert_cmpint(vdk_cipher_run(c, true, 4, two, sizeof(two)), ==, 0);
    hex_to_bytes("41047df5c636cd4fcb4cae528f91daa1", want, 16);
    g_assert_cmpmem(two + 512, 16, want, 16);
    vdk_cipher_free(c);
    GError *err = NULL;
    g_assert_null(vdk_cipher_new("aes", "cbc-essiv:sha256", key64, 64, &err));
    g_assert_nonnull(strstr(err->message, "not supported"));
    g_clear_error(&err);
    g_assert_null(vdk_cipher_new("aes", "xts-plain64", key64, 48, &err));
    g_clear_error(&err);
}

static void
test_af(void)
{
    /* merge of a fixed input, computed independently from the spec */
    uint8_t src[40 * 5], key[40], want[40];
    for (size_t i = 0; i < sizeof(src); i++) {
        src[i] = (uint8_t)((i * 7 + 3) & 0xff);
    }
    g_assert_true(vdk_luks_af_merge("sha256", src, 40, 5, key));
    hex_to_bytes("c8cc4ec300d51076dbaa0d87291b6962f7fccabca04112eba5a3c5406c3fea802c2c17dab1bbfd51", want, 40);
    g_assert_cmpmem(key, 40, want, 40);
    /* split then merge gives the key back, for every hash */
    const char *hashes[] = {"sha1", "sha256", "sha512"};
    for (size_t h = 0; h < G_N_ELEMENTS(hashes); h++) {
        uint8_t mk[64], back[64];
        for (int i = 0; i < 64; i++) {
            mk[i] = (uint8_t)(i * 13 + h);
        }
        uint8_t *split = g_malloc(64 * VDK_LUKS_STRIPES);
        g_assert_true(vdk_luks_af_split(hashes[h], mk, 64, VDK_LUKS_STRIPES, split));
        g_assert_true(vdk_luks_af_merge(hashes[h], split, 64, VDK_LUKS_STRIPES, back));
        g_assert_cmpmem(back, 64, mk, 64);
        split[12345] ^= 1; /* one flipped bit anywhere destroys the key */
        g_assert_true(vdk_luks_af_merge(hashes[h], split, 64, VDK_LUKS_STRIPES, back));
        g_assert_true(memcmp(back, mk, 64) != 0);
        g_free(split);
    }
}

static void
test_format_unlock(void)
{
    VdkLuks h;
    uint8_t *region = NULL;
    size_t len = 0;
    uint8_t mk[64], mk2[64];
    GError *err = NULL;
    g_assert_true(vdk_luks_format(&h, 64, 5, "pw", 2, &region, &len, mk, &err));
    g_assert_no_error(err);
    g_assert_cmpuint(len, ==, 2068480); /* qemu's layout for aes-256-xts */
    g_assert_cmpuint(h.slots[1].key_offset, ==, 512);
    VdkLuks p;
    g_assert_true(vdk_luks_parse(region, len, len, &p, &err));
    g_assert_cmpstr(p.cipher_mode, ==, "xts-plain64");
    g_assert_true(p.slots[0].active);
    g_assert_false(p.slots[1].active);
    int slot = -1;
    g_assert_true(vdk_luks_unlock(&p, region, len, "pw", 2, mk2, &slot, &err));
    g_assert_cmpint(slot, ==, 0);
    g_assert_cmpmem(mk, 64, mk2, 64);
    g_assert_false(vdk_luks_unlock(&p, region, len, "pW", 2, mk2, &slot, &err));
    g_assert_error(err, VDK_ERROR, EACCES);
    g_assert_cmpstr(err->message, ==, "invalid password (no key slot matches)");
    g_clear_error(&err);
    /* a second slot; then the first removed */
    g_assert_true(vdk_luks_set_slot(&p, region, len, 3, mk, "other", 5, 5, &err));
    g_assert_true(vdk_luks_unlock(&p, region, len, "other", 5, mk2, &slot, &err));
    g_assert_cmpint(slot, ==, 3);
    g_assert_true(vdk_luks_slot_matches(&p, region, len, 0, "pw", 2, mk));
    vdk_luks_kill_slot(&p, region, len, 0);
    g_assert_false(vdk_luks_unlock(&p, region, len, "pw", 2, mk2, &slot, &err));
    g_clear_error(&err);
    /* encode/parse roundtrip */
    uint8_t hb[VDK_LUKS_HDR_SIZE];
    vdk_luks_encode(&p, hb);
    VdkLuks q;
    g_assert_true(vdk_luks_parse(hb, sizeof(hb), len, &q, &err));
    g_assert_true(q.slots[3].active && !q.slots[0].active);
    g_assert_cmpuint(q.slots[3].iterations, ==, p.slots[3].iterations);
    /* hostile fields */
    struct {
        size_t off;
        uint32_t val;
        const char *msg;
    } bad[] = {
        {104, 0, "payload offset 0"},
        {104, 4041, "payload offset 4041"},
        {108, 16, "key bytes 16"},
        {164, 0, "master key digest iterations 0"},
        {164, VDK_LUKS_MAX_MK_ITERATIONS + 1, "master key digest iterations 12500001"},
        {208 + 3 * 48 + 4, 0xffffffffu, "key slot 3: iterations 4294967295"},
        {208 + 44, 3999, "key slot 0: stripes 3999"},
        {208 + 48 * 7 + 40, 4000, "key slot 7: key material"},
        {208 + 48 * 6 + 40, 8, "key slots 0 and 6: key material overlaps"},
        {208 + 48 * 2, 1, "key slot 2: state 0x00000001"},
    };
    for (size_t i = 0; i < G_N_ELEMENTS(bad); i++) {
        uint8_t m[VDK_LUKS_HDR_SIZE];
        memcpy(m, hb, sizeof(m));
        m[bad[i].off] = (uint8_t)(bad[i].val >> 24);
        m[bad[i].off + 1] = (uint8_t)(bad[i].val >> 16);
        m[bad[i].off + 2] = (uint8_t)(bad[i].val >> 8);
        m[bad[i].off + 3] = (uint8_t)bad[i].val;
        g_assert_false(vdk_luks_parse(m, sizeof(m), len, &q, &err));
        if (!strstr(err->message, bad[i].msg)) {
            g_error("field at %zu: '%s' does not say '%s'", bad[i].off, err->message, bad[i].msg);
        }
        g_clear_error(&err);
    }
    /* strings: unterminated, unknown hash; a region smaller than the payload */
    uint8_t m[VDK_LUKS_HDR_SIZE];
    memcpy(m, hb, sizeof(m));
    memset(m + 72, 'a', 32);
    g_assert_false(vdk_luks_parse(m, sizeof(m), len, &q, &err));
    g_assert_nonnull(strstr(err->message, "hash spec is not terminated"));
    g_clear_error(&err);
    g_assert_false(vdk_luks_parse(hb, sizeof(hb), len - 512, &q, &err));
    g_assert_nonnull(strstr(err->message, "payload offset"));
    g_clear_error(&err);
    g_assert_false(vdk_luks_parse(hb, 100, len, &q, &err));
    g_clear_error(&err);
    g_free(region);
}

/* An encrypted image through the queue: many writes in flight of every
 * alignment, read back, reopened with a wrong passphrase. */
static void
test_image(const TestVariant *v)
{
    char *path = test_path("enc.qcow2");
    GError *err = NULL;
    VdkCreateOptions *co = vdk_create_options_new("qcow2", &err);
    g_assert_no_error(err);
    vdk_create_options_set_secret(co, "s", "pass", 4);
    g_assert_true(vdk_create_options_set(co, "size", "8M", &err));
    g_assert_true(vdk_create_options_set(co, "encrypt.format", "luks", &err));
    g_assert_true(vdk_create_options_set(co, "encrypt.key-secret", "s", &err));
    g_assert_true(vdk_create_options_set(co, "encrypt.iter-time", "5", &err));
    vdk_create_options_set_overwrite(co, true);
    g_assert_true(vdk_image_create(path, co, &err));
    g_assert_no_error(err);
    vdk_create_options_free(co);

    VdkOpenOptions *oo = vdk_open_options_new();
    vdk_open_options_set_engine(oo, v->engine, NULL);
    vdk_open_options_set_cache(oo, v->cache, NULL);
    vdk_open_options_set_secret(oo, "s", "pass", 4);
    vdk_open_options_set(oo, "encrypt.key-secret", "s");
    VdkImage *img = vdk_image_open(path, oo, &err);
    g_assert_no_error(err);
    uint64_t size = 8 << 20;
    uint8_t *model = g_malloc0(size);
    uint64_t seed = 42;
    VdkQueue *q = vdk_queue_new(img, 32, &err);
    g_assert_no_error(err);
    enum { N = 64 };
    uint8_t *bufs[N];
    unsigned done = 0;
    for (int i = 0; i < N; i++) {
        /* non-overlapping ranges, so the order of completion does not matter;
         * lengths and offsets multiples of 512, as a guest's */
        uint64_t off = (uint64_t)i * (size / N) + (test_rand(&seed) % 64) * 512;
        uint64_t len = 512 * (1 + test_rand(&seed) % 128);
        bufs[i] = g_malloc(len);
        test_fill_random(bufs[i], len, &seed);
        memcpy(model + off, bufs[i], len);
        while (vdk_queue_write(q, off, bufs[i], len, 0, (uint64_t)i) == -EAGAIN) {
            VdkCompletion c[32];
            int got = vdk_queue_submit_and_wait(q, c, 32, 1, -1);
            g_assert_cmpint(got, >=, 0);
            for (int k = 0; k < got; k++) {
                g_assert_cmpint(c[k].result, >, 0);
                done++;
            }
        }
    }
    vdk_queue_submit(q);
    while (vdk_queue_pending(q) > 0) {
        VdkCompletion c[32];
        int got = vdk_queue_wait(q, c, 32, 1, -1);
        g_assert_cmpint(got, >=, 0);
        for (int i = 0; i < got; i++) {
            g_assert_cmpint(c[i].result, >, 0);
            done++;
        }
    }
    g_assert_cmpuint(done, ==, N);
    vdk_queue_free(q);
    /* an unaligned write through the sync API (read-merge-write) */
    uint8_t odd[777];
    memset(odd, 0xee, sizeof(odd));
    g_assert_cmpint(vdk_image_pwrite(img, odd, sizeof(odd), 4097, 0), ==, 0);
    memcpy(model + 4097, odd, sizeof(odd));
    g_assert_true(vdk_image_close(img, &err));

    img = vdk_image_open(path, oo, &err);
    g_assert_no_error(err);
    uint8_t *back = g_malloc(size);
    g_assert_cmpint(vdk_image_pread(img, back, size, 0), ==, 0);
    g_assert_true(memcmp(back, model, size) == 0);
    g_assert_cmpint(vdk_image_pread(img, back, 10, 4090), ==, 0); /* unaligned read */
    g_assert_cmpmem(back, 10, model + 4090, 10);
    g_assert_true(vdk_image_close(img, &err));
    /* the file holds no plaintext of the first buffer */
    GBytes *file = test_read_file(path);
    gsize flen = 0;
    const uint8_t *fd = g_bytes_get_data(file, &flen);
    g_assert_null(memmem(fd, flen, bufs[0], 512));
    g_bytes_unref(file);

    vdk_open_options_set_secret(oo, "s", "Pass", 4);
    img = vdk_image_open(path, oo, &err);
    g_assert_null(img);
    g_assert_error(err, VDK_ERROR, EACCES);
    g_clear_error(&err);
    /* metadata only: opens without the key, data I/O refused */
    VdkOpenOptions *ro = vdk_open_options_new();
    vdk_open_options_set_read_only(ro, true);
    vdk_open_options_set(ro, "no-io", "on");
    img = vdk_image_open(path, ro, &err);
    g_assert_no_error(err);
    g_assert_cmpint(vdk_image_pread(img, back, 512, 0), ==, -EACCES);
    vdk_image_close(img, NULL);
    vdk_open_options_free(ro);
    vdk_open_options_free(oo);
    for (int i = 0; i < N; i++) {
        g_free(bufs[i]);
    }
    g_free(back);
    g_free(model);
    g_free(path);
}

int
main(int argc, char **argv)
{
    test_init(&argc, &argv);
    g_test_add_func("/luks/pbkdf2-sha256-kat", test_pbkdf2_kat);
    g_test_add_func("/luks/aes-xts-plain64-kat", test_xts_kat);
    g_test_add_func("/luks/af-split-merge", test_af);
    g_test_add_func("/luks/format-unlock-slots-hostile", test_format_unlock);
    test_add_variants("luks", "encrypted-qcow2-image", test_image, NULL);
    return g_test_run();
}
