/* SPDX-License-Identifier: MIT */
/*
 * luks.c - LUKS1 volumes as qcow2 embeds them (crypt_method 2): the header,
 * key slots (PBKDF2 + the anti-forensic splitter) and the data cipher.
 *
 * Written from the "LUKS1 On-Disk Format Specification" (cryptsetup's
 * docs): a 592-byte big-endian header (magic "LUKS\xba\xbe", version 1,
 * cipher name / mode / hash spec strings, payload offset and key-material
 * offsets in 512-byte sectors, key bytes, a PBKDF2 digest of the master key,
 * uuid, 8 key slots).  A slot holds the master key split into `stripes`
 * blocks by the AF splitter (hash diffusion), encrypted with a key derived
 * from the passphrase by PBKDF2-HMAC over the slot's salt and iterations;
 * the key material is encrypted like data, sector by sector with IVs
 * numbered from 0 at the slot's start.
 *
 * Supported: cipher aes, mode xts-plain64 (32- or 64-byte keys: AES-128/256
 * in XTS), hash sha1, sha256 or sha512 (for PBKDF2 and the splitter).
 * Others are refused by name.  All cryptography is OpenSSL's libcrypto
 * (EVP AES-XTS, PKCS5_PBKDF2_HMAC, EVP digests, RAND_bytes); nothing here
 * is a cipher of our own.
 *
 * Every header field is validated before use (see vdk_luks_parse); PBKDF2
 * iteration counts are bounded (VDK_LUKS_MAX_ITERATIONS) so a hostile
 * header cannot make an open run for hours.
 */
#include "config.h"

#include <errno.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "block/luks.h"
#include "vdk/vdk.h"

static const uint8_t luks_magic[6] = {'L', 'U', 'K', 'S', 0xba, 0xbe};

struct VdkCipher {
    const EVP_CIPHER *evp;
    uint8_t key[64];
    size_t key_len;
};

static uint32_t
be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void
put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static const EVP_MD *
luks_md(const char *hash)
{
    if (!strcmp(hash, "sha1")) {
        return EVP_sha1();
    }
    if (!strcmp(hash, "sha256")) {
        return EVP_sha256();
    }
    if (!strcmp(hash, "sha512")) {
        return EVP_sha512();
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Data cipher                                                               */
/* ------------------------------------------------------------------------ */

VdkCipher *
vdk_cipher_new(const char *name, const char *mode, const uint8_t *key, size_t key_len, GError **error)
{
    if (strcmp(name, "aes") != 0 || strcmp(mode, "xts-plain64") != 0) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "luks: cipher %s-%s is not supported (aes-xts-plain64 is)", name, mode);
        return NULL;
    }
    const EVP_CIPHER *evp = key_len == 32 ? EVP_aes_128_xts() : key_len == 64 ? EVP_aes_256_xts() : NULL;
    if (!evp) {
        g_set_error(error, VDK_ERROR, EINVAL, "luks: key bytes %zu is invalid for aes-xts (32 or 64)", key_len);
        return NULL;
    }
    VdkCipher *c = g_new0(VdkCipher, 1);
    c->evp = evp;
    memcpy(c->key, key, key_len);
    c->key_len = key_len;
    return c;
}

void
vdk_cipher_free(VdkCipher *c)
{
    if (c) {
        OPENSSL_cleanse(c->key, sizeof(c->key));
        g_free(c);
    }
}

int
vdk_cipher_run(const VdkCipher *c, bool encrypt, uint64_t sector, uint8_t *buf, size_t len)
{
    if (len % VDK_LUKS_SECTOR) {
        return -EINVAL;
    }
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx) {
        return -ENOMEM;
    }
    int ret = 0;
    if (EVP_CipherInit_ex(ctx, c->evp, NULL, c->key, NULL, encrypt ? 1 : 0) != 1) {
        ret = -EIO;
    }
    for (size_t off = 0; ret == 0 && off < len; off += VDK_LUKS_SECTOR, sector++) {
        /* plain64: the sector number, 64-bit little endian, zero padded */
        uint8_t iv[16] = {0};
        for (int i = 0; i < 8; i++) {
            iv[i] = (uint8_t)(sector >> (8 * i));
        }
        int outl = 0;
        if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, iv, -1) != 1 ||
            EVP_CipherUpdate(ctx, buf + off, &outl, buf + off, VDK_LUKS_SECTOR) != 1 || outl != VDK_LUKS_SECTOR) {
            ret = -EIO;
        }
    }
    EVP_CIPHER_CTX_free(ctx);
    return ret;
}

/* ------------------------------------------------------------------------ */
/* PBKDF2 and the anti-forensic splitter                                     */
/* ------------------------------------------------------------------------ */

bool
vdk_luks_pbkdf2(const char *hash, const void *pass, size_t pass_len, const uint8_t *salt, size_t salt_len,
                uint32_t iterations, uint8_t *out, size_t out_len)
{
    const EVP_MD *md = luks_md(hash);
    if (!md || iterations == 0 || iterations > INT32_MAX || pass_len > INT32_MAX) {
        return false;
    }
    return PKCS5_PBKDF2_HMAC(pass_len ? pass : "", (int)pass_len, salt, (int)salt_len, (int)iterations, md,
                             (int)out_len, out) == 1;
}

/* The splitter's diffusion: each hash-sized piece i of @buf becomes
 * H(be32(i) || piece), truncated to the piece's length. */
static bool
af_diffuse(const EVP_MD *md, uint8_t *buf, size_t len)
{
    size_t hlen = (size_t)EVP_MD_get_size(md);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx) {
        return false;
    }
    bool ok = true;
    for (size_t i = 0, off = 0; ok && off < len; i++, off += hlen) {
        size_t piece = MIN(hlen, len - off);
        uint8_t iv[4], dig[EVP_MAX_MD_SIZE];
        put32(iv, (uint32_t)i);
        unsigned dl = 0;
        ok = EVP_DigestInit_ex(ctx, md, NULL) == 1 && EVP_DigestUpdate(ctx, iv, 4) == 1 &&
             EVP_DigestUpdate(ctx, buf + off, piece) == 1 && EVP_DigestFinal_ex(ctx, dig, &dl) == 1;
        if (ok) {
            memcpy(buf + off, dig, piece);
        }
    }
    EVP_MD_CTX_free(ctx);
    return ok;
}

bool
vdk_luks_af_split(const char *hash, const uint8_t *key, size_t key_len, uint32_t stripes, uint8_t *out)
{
    const EVP_MD *md = luks_md(hash);
    if (!md || stripes == 0) {
        return false;
    }
    uint8_t *d = g_malloc0(key_len);
    bool ok = RAND_bytes(out, (int)(key_len * (stripes - 1))) == 1;
    for (uint32_t i = 0; ok && i + 1 < stripes; i++) {
        for (size_t j = 0; j < key_len; j++) {
            d[j] ^= out[i * key_len + j];
        }
        ok = af_diffuse(md, d, key_len);
    }
    for (size_t j = 0; ok && j < key_len; j++) {
        out[(size_t)(stripes - 1) * key_len + j] = d[j] ^ key[j];
    }
    OPENSSL_cleanse(d, key_len);
    g_free(d);
    return ok;
}

bool
vdk_luks_af_merge(const char *hash, const uint8_t *in, size_t key_len, uint32_t stripes, uint8_t *key)
{
    const EVP_MD *md = luks_md(hash);
    if (!md || stripes == 0) {
        return false;
    }
    uint8_t *d = g_malloc0(key_len);
    bool ok = true;
    for (uint32_t i = 0; ok && i + 1 < stripes; i++) {
        for (size_t j = 0; j < key_len; j++) {
            d[j] ^= in[i * key_len + j];
        }
        ok = af_diffuse(md, d, key_len);
    }
    for (size_t j = 0; ok && j < key_len; j++) {
        key[j] = d[j] ^ in[(size_t)(stripes - 1) * key_len + j];
    }
    OPENSSL_cleanse(d, key_len);
    g_free(d);
    return ok;
}

/* ------------------------------------------------------------------------ */
/* Header                                                                    */
/* ------------------------------------------------------------------------ */

uint64_t
vdk_luks_km_bytes(const VdkLuks *h)
{
    uint64_t b = (uint64_t)h->key_bytes * VDK_LUKS_STRIPES;
    return (b + VDK_LUKS_SECTOR - 1) / VDK_LUKS_SECTOR * VDK_LUKS_SECTOR;
}

static bool
get_string(const uint8_t *p, size_t len, char *out, const char *field, GError **error)
{
    const uint8_t *nul = memchr(p, 0, len);
    if (!nul || nul == p) {
        g_set_error(error, VDK_ERROR, EINVAL, "luks: %s is %s", field, nul ? "empty" : "not terminated");
        return false;
    }
    memcpy(out, p, (size_t)(nul - p) + 1);
    for (char *c = out; *c; c++) {
        if (!g_ascii_isprint(*c)) {
            g_set_error(error, VDK_ERROR, EINVAL, "luks: %s contains a non-printable byte", field);
            return false;
        }
    }
    return true;
}

bool
vdk_luks_parse(const uint8_t *b, size_t len, uint64_t region_len, VdkLuks *h, GError **error)
{
    memset(h, 0, sizeof(*h));
    if (len < VDK_LUKS_HDR_SIZE || memcmp(b, luks_magic, sizeof(luks_magic)) != 0) {
        g_set_error(error, VDK_ERROR, EINVAL, "luks: bad magic (not a LUKS header)");
        return false;
    }
    uint16_t version = (uint16_t)((b[6] << 8) | b[7]);
    if (version != 1) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "luks: unsupported version %u (1 is supported)", version);
        return false;
    }
    if (!get_string(b + 8, 32, h->cipher_name, "cipher name", error) ||
        !get_string(b + 40, 32, h->cipher_mode, "cipher mode", error) ||
        !get_string(b + 72, 32, h->hash_spec, "hash spec", error)) {
        return false;
    }
    h->payload_offset = be32(b + 104);
    h->key_bytes = be32(b + 108);
    memcpy(h->mk_digest, b + 112, VDK_LUKS_DIGEST);
    memcpy(h->mk_digest_salt, b + 132, VDK_LUKS_SALT);
    h->mk_digest_iter = be32(b + 164);
    memcpy(h->uuid, b + 168, 40);
    h->uuid[40] = 0;
    for (char *c = h->uuid; *c; c++) {
        if (!g_ascii_isprint(*c)) {
            g_set_error(error, VDK_ERROR, EINVAL, "luks: uuid contains a non-printable byte");
            return false;
        }
    }
    if (strcmp(h->cipher_name, "aes") != 0 || strcmp(h->cipher_mode, "xts-plain64") != 0) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "luks: cipher %s-%s is not supported (aes-xts-plain64 is)",
                    h->cipher_name, h->cipher_mode);
        return false;
    }
    if (!luks_md(h->hash_spec)) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "luks: hash spec '%s' is not supported (sha1, sha256, sha512)",
                    h->hash_spec);
        return false;
    }
    if (h->key_bytes != 32 && h->key_bytes != 64) {
        g_set_error(error, VDK_ERROR, EINVAL, "luks: key bytes %u is invalid for aes-xts (32 or 64)", h->key_bytes);
        return false;
    }
    if (h->mk_digest_iter == 0 || h->mk_digest_iter > VDK_LUKS_MAX_MK_ITERATIONS) {
        g_set_error(error, VDK_ERROR, EINVAL, "luks: master key digest iterations %u out of range (1 to %u)",
                    h->mk_digest_iter, VDK_LUKS_MAX_MK_ITERATIONS);
        return false;
    }
    uint64_t region_sectors = MIN(region_len, (uint64_t)VDK_LUKS_MAX_REGION) / VDK_LUKS_SECTOR;
    uint64_t hdr_sectors = (VDK_LUKS_HDR_SIZE + VDK_LUKS_SECTOR - 1) / VDK_LUKS_SECTOR;
    if (h->payload_offset < hdr_sectors || h->payload_offset > region_sectors) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "luks: payload offset %u sectors out of range (%" G_GUINT64_FORMAT " to %" G_GUINT64_FORMAT ")",
                    h->payload_offset, hdr_sectors, region_sectors);
        return false;
    }
    uint64_t km_sectors = vdk_luks_km_bytes(h) / VDK_LUKS_SECTOR;
    for (int i = 0; i < VDK_LUKS_SLOTS; i++) {
        const uint8_t *p = b + 208 + i * 48;
        VdkLuksSlot *sl = &h->slots[i];
        uint32_t state = be32(p);
        sl->iterations = be32(p + 4);
        memcpy(sl->salt, p + 8, VDK_LUKS_SALT);
        sl->key_offset = be32(p + 40);
        sl->stripes = be32(p + 44);
        if (state != VDK_LUKS_SLOT_ACTIVE && state != VDK_LUKS_SLOT_INACTIVE) {
            g_set_error(error, VDK_ERROR, EINVAL, "luks: key slot %d: state 0x%08x is invalid", i, state);
            return false;
        }
        sl->active = state == VDK_LUKS_SLOT_ACTIVE;
        if (sl->stripes != VDK_LUKS_STRIPES) {
            g_set_error(error, VDK_ERROR, EINVAL, "luks: key slot %d: stripes %u is invalid (must be %u)", i,
                        sl->stripes, VDK_LUKS_STRIPES);
            return false;
        }
        if (sl->active && (sl->iterations == 0 || sl->iterations > VDK_LUKS_MAX_ITERATIONS)) {
            g_set_error(error, VDK_ERROR, EINVAL, "luks: key slot %d: iterations %u out of range (1 to %u)", i,
                        sl->iterations, VDK_LUKS_MAX_ITERATIONS);
            return false;
        }
        if (sl->key_offset < hdr_sectors || (uint64_t)sl->key_offset + km_sectors > h->payload_offset) {
            g_set_error(error, VDK_ERROR, EINVAL,
                        "luks: key slot %d: key material at sector %u (%" G_GUINT64_FORMAT
                        " sectors) is outside the header area (%u sectors)",
                        i, sl->key_offset, km_sectors, h->payload_offset);
            return false;
        }
        for (int j = 0; j < i; j++) {
            uint64_t a = h->slots[j].key_offset;
            if (sl->key_offset < a + km_sectors && a < (uint64_t)sl->key_offset + km_sectors) {
                g_set_error(error, VDK_ERROR, EINVAL, "luks: key slots %d and %d: key material overlaps (sectors %" G_GUINT64_FORMAT " and %u)",
                            j, i, a, sl->key_offset);
                return false;
            }
        }
    }
    return true;
}

void
vdk_luks_encode(const VdkLuks *h, uint8_t *b)
{
    memset(b, 0, VDK_LUKS_HDR_SIZE);
    memcpy(b, luks_magic, sizeof(luks_magic));
    b[7] = 1;
    memcpy(b + 8, h->cipher_name, strlen(h->cipher_name));
    memcpy(b + 40, h->cipher_mode, strlen(h->cipher_mode));
    memcpy(b + 72, h->hash_spec, strlen(h->hash_spec));
    put32(b + 104, h->payload_offset);
    put32(b + 108, h->key_bytes);
    memcpy(b + 112, h->mk_digest, VDK_LUKS_DIGEST);
    memcpy(b + 132, h->mk_digest_salt, VDK_LUKS_SALT);
    put32(b + 164, h->mk_digest_iter);
    memcpy(b + 168, h->uuid, strlen(h->uuid));
    for (int i = 0; i < VDK_LUKS_SLOTS; i++) {
        uint8_t *p = b + 208 + i * 48;
        const VdkLuksSlot *sl = &h->slots[i];
        put32(p, sl->active ? VDK_LUKS_SLOT_ACTIVE : VDK_LUKS_SLOT_INACTIVE);
        put32(p + 4, sl->active ? sl->iterations : 0);
        if (sl->active) {
            memcpy(p + 8, sl->salt, VDK_LUKS_SALT);
        }
        put32(p + 40, sl->key_offset);
        put32(p + 44, sl->stripes);
    }
}

/* ------------------------------------------------------------------------ */
/* Key slots                                                                 */
/* ------------------------------------------------------------------------ */

/* The master key candidate slot @i gives for @pass (h->key_bytes into @mk). */
static bool
slot_open(const VdkLuks *h, const uint8_t *region, size_t region_len, int i, const void *pass, size_t pass_len,
          uint8_t *mk)
{
    const VdkLuksSlot *sl = &h->slots[i];
    uint64_t km = vdk_luks_km_bytes(h);
    uint64_t off = (uint64_t)sl->key_offset * VDK_LUKS_SECTOR;
    if (off + km > region_len) {
        return false;
    }
    uint8_t dk[64];
    uint8_t *split = g_malloc(km);
    bool ok = vdk_luks_pbkdf2(h->hash_spec, pass, pass_len, sl->salt, VDK_LUKS_SALT, sl->iterations, dk,
                              h->key_bytes);
    VdkCipher *c = ok ? vdk_cipher_new(h->cipher_name, h->cipher_mode, dk, h->key_bytes, NULL) : NULL;
    if (c) {
        memcpy(split, region + off, km);
        ok = vdk_cipher_run(c, false, 0, split, km) == 0 &&
             vdk_luks_af_merge(h->hash_spec, split, h->key_bytes, sl->stripes, mk);
        vdk_cipher_free(c);
    } else {
        ok = false;
    }
    OPENSSL_cleanse(dk, sizeof(dk));
    OPENSSL_cleanse(split, km);
    g_free(split);
    return ok;
}

static bool
mk_check(const VdkLuks *h, const uint8_t *mk)
{
    uint8_t dig[VDK_LUKS_DIGEST];
    return vdk_luks_pbkdf2(h->hash_spec, mk, h->key_bytes, h->mk_digest_salt, VDK_LUKS_SALT, h->mk_digest_iter, dig,
                           sizeof(dig)) &&
           CRYPTO_memcmp(dig, h->mk_digest, sizeof(dig)) == 0;
}

bool
vdk_luks_slot_matches(const VdkLuks *h, const uint8_t *region, size_t region_len, int slot, const void *pass,
                      size_t pass_len, const uint8_t *mk)
{
    uint8_t cand[64];
    bool ok = h->slots[slot].active && slot_open(h, region, region_len, slot, pass, pass_len, cand) &&
              CRYPTO_memcmp(cand, mk, h->key_bytes) == 0;
    OPENSSL_cleanse(cand, sizeof(cand));
    return ok;
}

bool
vdk_luks_unlock(const VdkLuks *h, const uint8_t *region, size_t region_len, const void *pass, size_t pass_len,
                uint8_t *mk, int *slot, GError **error)
{
    for (int i = 0; i < VDK_LUKS_SLOTS; i++) {
        if (!h->slots[i].active) {
            continue;
        }
        if (slot_open(h, region, region_len, i, pass, pass_len, mk) && mk_check(h, mk)) {
            *slot = i;
            return true;
        }
    }
    OPENSSL_cleanse(mk, h->key_bytes);
    g_set_error(error, VDK_ERROR, EACCES, "invalid password (no key slot matches)");
    return false;
}

/* PBKDF2 iterations that take about @ms milliseconds here. */
static uint32_t
bench_iterations(const char *hash, uint32_t key_bytes, uint64_t ms)
{
    uint8_t out[64], salt[VDK_LUKS_SALT] = {0};
    uint32_t n = 1000;
    for (;;) {
        gint64 t0 = g_get_monotonic_time();
        if (!vdk_luks_pbkdf2(hash, "bench", 5, salt, sizeof(salt), n, out, key_bytes)) {
            return VDK_LUKS_MIN_ITERATIONS;
        }
        gint64 us = g_get_monotonic_time() - t0;
        if (us >= 20000 || n >= (1u << 26)) {
            double per_ms = (double)n * 1000.0 / (double)MAX(us, (gint64)1);
            double want = per_ms * (double)ms;
            if (want > VDK_LUKS_MAX_ITERATIONS) {
                want = VDK_LUKS_MAX_ITERATIONS;
            }
            return MAX((uint32_t)want, VDK_LUKS_MIN_ITERATIONS);
        }
        n *= 2;
    }
}

bool
vdk_luks_set_slot(VdkLuks *h, uint8_t *region, size_t region_len, int slot, const uint8_t *mk, const void *pass,
                  size_t pass_len, uint64_t iter_time_ms, GError **error)
{
    VdkLuksSlot *sl = &h->slots[slot];
    uint64_t km = vdk_luks_km_bytes(h);
    uint64_t off = (uint64_t)sl->key_offset * VDK_LUKS_SECTOR;
    if (off + km > region_len) {
        g_set_error(error, VDK_ERROR, EINVAL, "luks: key slot %d lies outside the header area", slot);
        return false;
    }
    uint32_t iters = bench_iterations(h->hash_spec, h->key_bytes, iter_time_ms);
    uint8_t dk[64];
    uint8_t *split = g_malloc0(km);
    bool ok = RAND_bytes(sl->salt, VDK_LUKS_SALT) == 1 &&
              vdk_luks_pbkdf2(h->hash_spec, pass, pass_len, sl->salt, VDK_LUKS_SALT, iters, dk, h->key_bytes) &&
              vdk_luks_af_split(h->hash_spec, mk, h->key_bytes, VDK_LUKS_STRIPES, split);
    VdkCipher *c = ok ? vdk_cipher_new(h->cipher_name, h->cipher_mode, dk, h->key_bytes, error) : NULL;
    if (c) {
        ok = vdk_cipher_run(c, true, 0, split, km) == 0;
        vdk_cipher_free(c);
    } else if (ok) {
        ok = false;
    }
    if (ok) {
        memcpy(region + off, split, km);
        sl->iterations = iters;
        sl->stripes = VDK_LUKS_STRIPES;
        sl->active = true;
    } else if (error && !*error) {
        g_set_error(error, VDK_ERROR, EIO, "luks: cannot set up key slot %d", slot);
    }
    OPENSSL_cleanse(dk, sizeof(dk));
    OPENSSL_cleanse(split, km);
    g_free(split);
    return ok;
}

void
vdk_luks_kill_slot(VdkLuks *h, uint8_t *region, size_t region_len, int slot)
{
    VdkLuksSlot *sl = &h->slots[slot];
    uint64_t km = vdk_luks_km_bytes(h);
    uint64_t off = (uint64_t)sl->key_offset * VDK_LUKS_SECTOR;
    if (off + km <= region_len) {
        /* random bytes, as cryptsetup wipes: nothing of the split key stays */
        if (RAND_bytes(region + off, (int)km) != 1) {
            memset(region + off, 0, km);
        }
    }
    sl->active = false;
    sl->iterations = 0;
    memset(sl->salt, 0, sizeof(sl->salt));
}

uint64_t
vdk_luks_region_bytes(uint32_t key_bytes)
{
    VdkLuks h = {.key_bytes = key_bytes};
    uint64_t km_sectors = vdk_luks_km_bytes(&h) / VDK_LUKS_SECTOR;
    uint64_t align = 4096 / VDK_LUKS_SECTOR;
    uint64_t step = (km_sectors + align - 1) / align * align;
    return (align + VDK_LUKS_SLOTS * step) * VDK_LUKS_SECTOR;
}

bool
vdk_luks_format(VdkLuks *h, uint32_t key_bytes, uint64_t iter_time_ms, const void *pass, size_t pass_len,
                uint8_t **region_out, size_t *region_len_out, uint8_t *mk, GError **error)
{
    memset(h, 0, sizeof(*h));
    strcpy(h->cipher_name, "aes");
    strcpy(h->cipher_mode, "xts-plain64");
    strcpy(h->hash_spec, "sha256");
    h->key_bytes = key_bytes;
    /* qemu's layout: the key material of each slot starts on a 4 KiB
     * boundary, slot 0 right after the header's first 4 KiB */
    uint64_t km = vdk_luks_km_bytes(h);
    uint32_t align = 4096 / VDK_LUKS_SECTOR;
    uint32_t km_sectors = (uint32_t)(km / VDK_LUKS_SECTOR);
    uint32_t step = (km_sectors + align - 1) / align * align;
    for (int i = 0; i < VDK_LUKS_SLOTS; i++) {
        h->slots[i].key_offset = align + (uint32_t)i * step;
        h->slots[i].stripes = VDK_LUKS_STRIPES;
    }
    h->payload_offset = h->slots[VDK_LUKS_SLOTS - 1].key_offset + step; /* qemu checks the aligned size */
    size_t region_len = (size_t)h->payload_offset * VDK_LUKS_SECTOR;
    uint8_t *region = g_malloc0(region_len);
    uint8_t uu[16];
    if (RAND_bytes(mk, (int)key_bytes) != 1 || RAND_bytes(h->mk_digest_salt, VDK_LUKS_SALT) != 1 ||
        RAND_bytes(uu, sizeof(uu)) != 1) {
        g_free(region);
        g_set_error(error, VDK_ERROR, EIO, "luks: no random bytes from the system");
        return false;
    }
    uu[6] = (uint8_t)((uu[6] & 0x0f) | 0x40); /* version 4 uuid */
    uu[8] = (uint8_t)((uu[8] & 0x3f) | 0x80);
    g_snprintf(h->uuid, sizeof(h->uuid),
               "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", uu[0], uu[1], uu[2], uu[3],
               uu[4], uu[5], uu[6], uu[7], uu[8], uu[9], uu[10], uu[11], uu[12], uu[13], uu[14], uu[15]);
    /* the digest costs an eighth of a slot's time (it is checked once per
     * slot tried) */
    h->mk_digest_iter = MIN(bench_iterations(h->hash_spec, VDK_LUKS_DIGEST, MAX(iter_time_ms / 8, (uint64_t)1)),
                            VDK_LUKS_MAX_MK_ITERATIONS);
    if (!vdk_luks_pbkdf2(h->hash_spec, mk, key_bytes, h->mk_digest_salt, VDK_LUKS_SALT, h->mk_digest_iter,
                         h->mk_digest, VDK_LUKS_DIGEST) ||
        !vdk_luks_set_slot(h, region, region_len, 0, mk, pass, pass_len, iter_time_ms, error)) {
        g_free(region);
        if (error && !*error) {
            g_set_error(error, VDK_ERROR, EIO, "luks: cannot derive the master key digest");
        }
        return false;
    }
    vdk_luks_encode(h, region);
    *region_out = region;
    *region_len_out = region_len;
    return true;
}
