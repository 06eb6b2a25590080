/* SPDX-License-Identifier: MIT */
/*
 * luks.h - LUKS1 headers, key slots and the sector cipher (see luks.c).
 */
#ifndef VDK_LUKS_H
#define VDK_LUKS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <glib.h>

#define VDK_LUKS_HDR_SIZE 592
#define VDK_LUKS_SLOTS 8
#define VDK_LUKS_STRIPES 4000 /* the only value cryptsetup and qemu write or accept */
#define VDK_LUKS_SECTOR 512
#define VDK_LUKS_SALT 32
#define VDK_LUKS_DIGEST 20
#define VDK_LUKS_SLOT_ACTIVE 0x00ac71f3u
#define VDK_LUKS_SLOT_INACTIVE 0x0000deadu
/* PBKDF2 iteration counts above this are refused at open: a hostile header
 * must not make an open run for hours.  qemu's default iter-time of 2 s
 * gives about 9 million iterations on the machine this was written on
 * (4.4M PBKDF2-SHA256 iterations per second); 50 million leaves five times
 * that for faster machines and bounds one slot to seconds, not hours. */
#define VDK_LUKS_MAX_ITERATIONS 50000000u
/* The master-key digest is computed once per active slot tried; qemu and
 * cryptsetup give it a quarter to an eighth of a slot's time.  With both
 * caps, a wrong passphrase against a hostile header with 8 active slots
 * costs at most 8 x (50M + 12.5M) iterations: minutes, never hours. */
#define VDK_LUKS_MAX_MK_ITERATIONS 12500000u
/* The key-material area: 8 slots of 64-byte keys x 4000 stripes is about
 * 2 MiB; anything beyond 16 MiB is not a LUKS1 header qemu or cryptsetup
 * writes. */
#define VDK_LUKS_MAX_REGION (16u << 20)
/* Smallest iteration counts written (cryptsetup's minimum). */
#define VDK_LUKS_MIN_ITERATIONS 1000u

typedef struct {
    bool active;
    uint32_t iterations;
    uint8_t salt[VDK_LUKS_SALT];
    uint32_t key_offset; /* sectors from the header's start */
    uint32_t stripes;
} VdkLuksSlot;

typedef struct {
    char cipher_name[33];
    char cipher_mode[33];
    char hash_spec[33];
    char uuid[41];
    uint32_t payload_offset; /* sectors */
    uint32_t key_bytes;
    uint8_t mk_digest[VDK_LUKS_DIGEST];
    uint8_t mk_digest_salt[VDK_LUKS_SALT];
    uint32_t mk_digest_iter;
    VdkLuksSlot slots[VDK_LUKS_SLOTS];
} VdkLuks;

/* The AES-XTS-plain64 sector cipher of a volume (thread safe: every call
 * uses its own OpenSSL context). */
typedef struct VdkCipher VdkCipher;

/* Decode and validate a header read from @buf (@len >= VDK_LUKS_HDR_SIZE);
 * @region_len: bytes the container reserves for header and key material.
 * Errors name the field and value. */
bool vdk_luks_parse(const uint8_t *buf, size_t len, uint64_t region_len, VdkLuks *out, GError **error);
/* Encode @h into @buf (VDK_LUKS_HDR_SIZE bytes). */
void vdk_luks_encode(const VdkLuks *h, uint8_t *buf);
/* Try the passphrase on every active slot: on success the master key
 * (h->key_bytes) is in @mk and *slot says which slot matched.  @region: the
 * whole header area (payload_offset sectors).  A wrong passphrase gives
 * EACCES "invalid password (no key slot matches)". */
bool vdk_luks_unlock(const VdkLuks *h, const uint8_t *region, size_t region_len, const void *pass, size_t pass_len,
                     uint8_t *mk, int *slot, GError **error);
/* A new volume: aes-xts-plain64 with @key_bytes (32 or 64) and sha256,
 * random master key, salts and uuid, qemu's key-material layout (4 KiB
 * aligned), slot 0 set to @pass with iterations for @iter_time_ms.
 * @region gets the header and key material (*region_len bytes, g_free).
 * The master key goes to @mk (64 bytes room). */
bool vdk_luks_format(VdkLuks *h, uint32_t key_bytes, uint64_t iter_time_ms, const void *pass, size_t pass_len,
                     uint8_t **region, size_t *region_len, uint8_t *mk, GError **error);
/* Bytes of header and key material vdk_luks_format() lays out. */
uint64_t vdk_luks_region_bytes(uint32_t key_bytes);
/* Put @pass into slot @slot (inactive) of an unlocked volume. */
bool vdk_luks_set_slot(VdkLuks *h, uint8_t *region, size_t region_len, int slot, const uint8_t *mk,
                       const void *pass, size_t pass_len, uint64_t iter_time_ms, GError **error);
/* Disable slot @slot and wipe its key material. */
void vdk_luks_kill_slot(VdkLuks *h, uint8_t *region, size_t region_len, int slot);
/* Does @pass open slot @slot (active)? */
bool vdk_luks_slot_matches(const VdkLuks *h, const uint8_t *region, size_t region_len, int slot, const void *pass,
                           size_t pass_len, const uint8_t *mk);
/* Bytes of key material one slot holds (key_bytes * stripes, sector aligned). */
uint64_t vdk_luks_km_bytes(const VdkLuks *h);

/* PBKDF2-HMAC and the AF splitter (exposed for the unit tests). */
bool vdk_luks_pbkdf2(const char *hash, const void *pass, size_t pass_len, const uint8_t *salt, size_t salt_len,
                     uint32_t iterations, uint8_t *out, size_t out_len);
bool vdk_luks_af_split(const char *hash, const uint8_t *key, size_t key_len, uint32_t stripes, uint8_t *out);
bool vdk_luks_af_merge(const char *hash, const uint8_t *in, size_t key_len, uint32_t stripes, uint8_t *key);

VdkCipher *vdk_cipher_new(const char *name, const char *mode, const uint8_t *key, size_t key_len, GError **error);
void vdk_cipher_free(VdkCipher *c);
/* En/decrypt @len bytes (a multiple of 512) in place; the first sector's
 * IV number is @sector.  0 or -EIO. */
int vdk_cipher_run(const VdkCipher *c, bool encrypt, uint64_t sector, uint8_t *buf, size_t len);

#endif
