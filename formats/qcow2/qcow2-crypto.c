/* SPDX-License-Identifier: MIT */
/*
 * qcow2-crypto.c - LUKS encryption of qcow2 images (crypt_method 2), the
 * qcow2 side: the crypto header extension (0x0537be77: offset and length
 * of a LUKS1 header and its key material, stored in clusters the refcounts
 * count), unlocking with the passphrase named by encrypt.key-secret, the
 * node's cipher for the block layer (IVs are the host sector numbers:
 * plain64 of host offset / 512, as qemu does for LUKS in qcow2), creation,
 * `info`'s "encrypt" block, and amend of key slots.
 *
 * The LUKS logic itself is in block/luks.c.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "block/luks.h"
#include "formats/qcow2/qcow2.h"

struct Qcow2Crypto {
    VdkLuks hdr;
    uint8_t *region;   /* the header area as on disk (payload_offset sectors) */
    size_t region_len;
    uint8_t mk[64];    /* master key (unlocked) */
    bool unlocked;
};

/* The passphrase named by the open option encrypt.key-secret of this layer
 * (backing.encrypt.key-secret one layer down, and so on). */
static bool
find_secret(VdkNode *n, const char *opt, GBytes **out, const char **id_out, GError **error)
{
    GString *key = g_string_new(NULL);
    for (int i = 0; i < n->depth; i++) {
        g_string_append(key, "backing.");
    }
    g_string_append(key, opt);
    const char *id = g_hash_table_lookup(n->img->opts.extra, key->str);
    g_string_free(key, TRUE);
    *out = NULL;
    if (id_out) {
        *id_out = id;
    }
    if (!id) {
        return true;
    }
    *out = vdk_secret_lookup(n->img->opts.secrets, id);
    if (!*out) {
        g_set_error(error, VDK_ERROR, ENOENT, "No secret with id '%s'", id);
        return false;
    }
    return true;
}

void
qcow2_crypto_close(Qcow2 *s)
{
    if (!s->crypto) {
        return;
    }
    OPENSSL_cleanse(s->crypto->mk, sizeof(s->crypto->mk));
    g_free(s->crypto->region);
    g_free(s->crypto);
    s->crypto = NULL;
    if (s->node && s->node->crypt) {
        vdk_node_crypt_free(s->node->crypt);
        s->node->crypt = NULL;
    }
}

bool
qcow2_crypto_open(VdkNode *n, Qcow2 *s, GError **error)
{
    if (!s->has_crypt_ext) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: LUKS-encrypted image without the crypto header extension");
        return false;
    }
    uint64_t end;
    if (s->crypt_ext_off == 0 || (s->crypt_ext_off & (s->cluster_size - 1)) ||
        vdk_add_overflows(s->crypt_ext_off, s->crypt_ext_len, &end) || end > QCOW2_OFFSET_MASK) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: crypto header offset 0x%" G_GINT64_MODIFIER "x is invalid (nonzero, cluster aligned)",
                    s->crypt_ext_off);
        return false;
    }
    if (s->crypt_ext_len < VDK_LUKS_HDR_SIZE || s->crypt_ext_len > VDK_LUKS_MAX_REGION) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: crypto header length %" G_GUINT64_FORMAT " is invalid (%d to %u)",
                    s->crypt_ext_len, VDK_LUKS_HDR_SIZE, VDK_LUKS_MAX_REGION);
        return false;
    }
    Qcow2Crypto *c = g_new0(Qcow2Crypto, 1);
    s->crypto = c;
    uint8_t hb[VDK_LUKS_HDR_SIZE];
    int r = vdk_file_pread_sync(s->file, hb, sizeof(hb), s->crypt_ext_off);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read the LUKS header: %s", g_strerror(-r));
        return false;
    }
    GError *err = NULL;
    if (!vdk_luks_parse(hb, sizeof(hb), s->crypt_ext_len, &c->hdr, &err)) {
        g_set_error(error, VDK_ERROR, err->code, "qcow2: %s", err->message);
        g_error_free(err);
        return false;
    }
    c->region_len = (size_t)c->hdr.payload_offset * VDK_LUKS_SECTOR;
    c->region = g_try_malloc(c->region_len);
    if (!c->region) {
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: cannot allocate the LUKS key material (%zu bytes)",
                    c->region_len);
        return false;
    }
    r = vdk_file_pread_sync(s->file, c->region, c->region_len, s->crypt_ext_off);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read the LUKS key material: %s", g_strerror(-r));
        return false;
    }
    GBytes *pass = NULL;
    if (!find_secret(n, "encrypt.key-secret", &pass, NULL, error)) {
        return false;
    }
    if (!pass) {
        if (n->img->opts.no_io) {
            n->crypt_locked = true; /* metadata only (info) */
            return true;
        }
        g_set_error(error, VDK_ERROR, EACCES,
                    "qcow2: the image is encrypted: its passphrase is needed (--object secret,id=ID,data=... or "
                    "file=... and --image-opts with encrypt.key-secret=ID)");
        return false;
    }
    gsize plen = 0;
    const void *p = g_bytes_get_data(pass, &plen);
    int slot;
    if (!vdk_luks_unlock(&c->hdr, c->region, c->region_len, p, plen, c->mk, &slot, &err)) {
        g_set_error(error, VDK_ERROR, err->code, "qcow2: %s", err->message);
        g_error_free(err);
        return false;
    }
    VdkCipher *cipher = vdk_cipher_new(c->hdr.cipher_name, c->hdr.cipher_mode, c->mk, c->hdr.key_bytes, &err);
    if (!cipher) {
        g_set_error(error, VDK_ERROR, err->code, "qcow2: %s", err->message);
        g_error_free(err);
        return false;
    }
    c->unlocked = true;
    n->crypt = vdk_node_crypt_new(cipher, true);
    g_log("vdk", G_LOG_LEVEL_DEBUG, "qcow2: %s: unlocked with LUKS key slot %d", n->filename, slot);
    return true;
}

/* ------------------------------------------------------------------------ */
/* info                                                                      */
/* ------------------------------------------------------------------------ */

void
qcow2_crypto_info(Qcow2 *s, GString *j, GPtrArray *l)
{
    const VdkLuks *h = &s->crypto->hdr;
    const char *mode = "xts";
    char alg[32];
    g_snprintf(alg, sizeof(alg), "%s-%u", h->cipher_name, h->key_bytes * 4); /* XTS: two keys */
    const char *in = "                    ";
    g_string_append_printf(j,
                           "{\n%s\"ivgen-alg\": \"plain64\",\n%s\"hash-alg\": \"%s\",\n%s\"cipher-alg\": \"%s\",\n"
                           "%s\"uuid\": \"%s\",\n%s\"format\": \"luks\",\n%s\"cipher-mode\": \"%s\",\n%s\"slots\": [\n",
                           in, in, h->hash_spec, in, alg, in, h->uuid, in, in, mode, in);
    g_ptr_array_add(l, g_strdup("encrypt:"));
    g_ptr_array_add(l, g_strdup("    ivgen alg: plain64"));
    g_ptr_array_add(l, g_strdup_printf("    hash alg: %s", h->hash_spec));
    g_ptr_array_add(l, g_strdup_printf("    cipher alg: %s", alg));
    g_ptr_array_add(l, g_strdup_printf("    uuid: %s", h->uuid));
    g_ptr_array_add(l, g_strdup("    format: luks"));
    g_ptr_array_add(l, g_strdup_printf("    cipher mode: %s", mode));
    g_ptr_array_add(l, g_strdup("    slots:"));
    for (int i = 0; i < VDK_LUKS_SLOTS; i++) {
        const VdkLuksSlot *sl = &h->slots[i];
        uint64_t ko = (uint64_t)sl->key_offset * VDK_LUKS_SECTOR;
        g_ptr_array_add(l, g_strdup_printf("        [%d]:", i));
        g_ptr_array_add(l, g_strdup_printf("            active: %s", sl->active ? "true" : "false"));
        if (sl->active) {
            g_string_append_printf(j,
                                   "                        {\n"
                                   "                            \"active\": true,\n"
                                   "                            \"iters\": %u,\n"
                                   "                            \"key-offset\": %" G_GUINT64_FORMAT ",\n"
                                   "                            \"stripes\": %u\n"
                                   "                        }",
                                   sl->iterations, ko, sl->stripes);
            g_ptr_array_add(l, g_strdup_printf("            iters: %u", sl->iterations));
            g_ptr_array_add(l, g_strdup_printf("            key offset: %" G_GUINT64_FORMAT, ko));
            g_ptr_array_add(l, g_strdup_printf("            stripes: %u", sl->stripes));
        } else {
            g_string_append_printf(j,
                                   "                        {\n"
                                   "                            \"active\": false,\n"
                                   "                            \"key-offset\": %" G_GUINT64_FORMAT "\n"
                                   "                        }",
                                   ko);
            g_ptr_array_add(l, g_strdup_printf("            key offset: %" G_GUINT64_FORMAT, ko));
        }
        g_string_append(j, i + 1 < VDK_LUKS_SLOTS ? ",\n" : "\n");
    }
    uint64_t po = (uint64_t)h->payload_offset * VDK_LUKS_SECTOR;
    g_string_append_printf(j,
                           "                    ],\n%s\"payload-offset\": %" G_GUINT64_FORMAT ",\n"
                           "%s\"master-key-iters\": %u\n                }",
                           in, po, in, h->mk_digest_iter);
    g_ptr_array_add(l, g_strdup_printf("    payload offset: %" G_GUINT64_FORMAT, po));
    g_ptr_array_add(l, g_strdup_printf("    master key iters: %u", h->mk_digest_iter));
}

/* ------------------------------------------------------------------------ */
/* create                                                                    */
/* ------------------------------------------------------------------------ */

bool
qcow2_crypto_create_region(const VdkCreateOptions *o, uint8_t **region, size_t *len, GError **error)
{
    *region = NULL;
    *len = 0;
    const char *fmt = vdk_create_opt(o, "encrypt.format");
    const char *legacy = vdk_create_opt(o, "encryption");
    if (legacy && (!strcmp(legacy, "on") || !strcmp(legacy, "true"))) {
        g_set_error(error, VDK_ERROR, ENOTSUP,
                    "qcow2: the legacy AES encryption (encryption=on) is insecure and not supported; use "
                    "encrypt.format=luks");
        return false;
    }
    bool any = false;
    GHashTableIter it;
    gpointer k;
    g_hash_table_iter_init(&it, o->kv);
    while (g_hash_table_iter_next(&it, &k, NULL)) {
        any |= g_str_has_prefix(k, "encrypt.");
    }
    if (!fmt) {
        if (any) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: encrypt.* options need encrypt.format=luks");
            return false;
        }
        return true;
    }
    if (strcmp(fmt, "luks") != 0) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: encrypt.format '%s' is not supported (luks is)", fmt);
        return false;
    }
    const char *v;
    uint32_t key_bytes = 64;
    if ((v = vdk_create_opt(o, "encrypt.cipher-alg")) && strcmp(v, "aes-256") != 0) {
        if (strcmp(v, "aes-128") != 0) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: encrypt.cipher-alg '%s' is not supported (aes-256, aes-128)",
                        v);
            return false;
        }
        key_bytes = 32;
    }
    if ((v = vdk_create_opt(o, "encrypt.cipher-mode")) && strcmp(v, "xts") != 0) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: encrypt.cipher-mode '%s' is not supported (xts is)", v);
        return false;
    }
    if ((v = vdk_create_opt(o, "encrypt.ivgen-alg")) && strcmp(v, "plain64") != 0) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: encrypt.ivgen-alg '%s' is not supported (plain64 is)", v);
        return false;
    }
    if ((v = vdk_create_opt(o, "encrypt.hash-alg")) && strcmp(v, "sha256") != 0) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: encrypt.hash-alg '%s' is not supported (sha256 is)", v);
        return false;
    }
    uint64_t iter_ms = 2000; /* qemu's default */
    if ((v = vdk_create_opt(o, "encrypt.iter-time"))) {
        char *e = NULL;
        iter_ms = g_ascii_strtoull(v, &e, 10);
        if (!*v || *e || iter_ms == 0 || iter_ms > 3600000) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: encrypt.iter-time '%s' is invalid (1 to 3600000 ms)", v);
            return false;
        }
    }
    const char *id = vdk_create_opt(o, "encrypt.key-secret");
    if (!id) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: encrypt.format=luks needs encrypt.key-secret=ID "
                    "(with --object secret,id=ID,...)");
        return false;
    }
    GBytes *pass = vdk_secret_lookup(o->secrets, id);
    if (!pass) {
        g_set_error(error, VDK_ERROR, ENOENT, "No secret with id '%s'", id);
        return false;
    }
    gsize plen = 0;
    const void *p = g_bytes_get_data(pass, &plen);
    VdkLuks h;
    uint8_t mk[64];
    bool ok = vdk_luks_format(&h, key_bytes, iter_ms, p, plen, region, len, mk, error);
    OPENSSL_cleanse(mk, sizeof(mk));
    return ok;
}

/* measure: the bytes the LUKS header area adds (0 without encryption) */
bool
qcow2_crypto_measure(const VdkCreateOptions *o, uint64_t cluster_size, uint64_t *bytes, GError **error)
{
    *bytes = 0;
    const char *fmt = vdk_create_opt(o, "encrypt.format");
    if (!fmt) {
        return true;
    }
    if (strcmp(fmt, "luks") != 0) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: encrypt.format '%s' is not supported (luks is)", fmt);
        return false;
    }
    const char *alg = vdk_create_opt(o, "encrypt.cipher-alg");
    uint32_t key_bytes = alg && !strcmp(alg, "aes-128") ? 32 : 64;
    *bytes = vdk_align_up(vdk_luks_region_bytes(key_bytes), cluster_size);
    return true;
}

/* ------------------------------------------------------------------------ */
/* amend: key slots                                                          */
/* ------------------------------------------------------------------------ */

bool
qcow2_crypto_amend_wanted(GHashTable *kv)
{
    GHashTableIter it;
    gpointer k;
    g_hash_table_iter_init(&it, kv);
    while (g_hash_table_iter_next(&it, &k, NULL)) {
        if (g_str_has_prefix(k, "encrypt.")) {
            return true;
        }
    }
    return false;
}

static bool
write_region(Qcow2 *s, uint64_t off, uint64_t len, GError **error)
{
    Qcow2Crypto *c = s->crypto;
    int r = vdk_file_pwrite_sync(s->file, c->region + off, (size_t)len, s->crypt_ext_off + off);
    if (r == 0) {
        r = vdk_file_flush_sync(s->file);
    }
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot write the LUKS header: %s", g_strerror(-r));
        return false;
    }
    return true;
}

/*
 * qemu-img amend's encryption options: encrypt.state=active with
 * encrypt.new-secret=ID (optionally encrypt.keyslot=N, encrypt.iter-time)
 * adds a key slot; encrypt.state=inactive with encrypt.keyslot=N or
 * encrypt.old-secret=ID removes slots.  The last active slot is never
 * removed (the data would be lost for good).  Crash order: a new slot's
 * key material is durable before the header names it; a removed slot
 * leaves the header before its key material is wiped.
 */
bool
qcow2_crypto_amend(VdkNode *n, GHashTable *kv, GError **error)
{
    Qcow2 *s = n->opaque;
    Qcow2Crypto *c = s->crypto;
    const char *state = NULL, *new_id = NULL, *old_id = NULL, *slot_s = NULL, *iter_s = NULL;
    GHashTableIter it;
    gpointer k, v;
    g_hash_table_iter_init(&it, kv);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        if (!strcmp(k, "encrypt.state")) {
            state = v;
        } else if (!strcmp(k, "encrypt.new-secret")) {
            new_id = v;
        } else if (!strcmp(k, "encrypt.old-secret")) {
            old_id = v;
        } else if (!strcmp(k, "encrypt.keyslot")) {
            slot_s = v;
        } else if (!strcmp(k, "encrypt.iter-time")) {
            iter_s = v;
        } else {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: '%s' cannot be amended together with key slots "
                        "(encrypt.state, encrypt.new-secret, encrypt.old-secret, encrypt.keyslot, encrypt.iter-time)",
                        (const char *)k);
            return false;
        }
    }
    if (!c || !c->unlocked) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: the image is not encrypted (key slots cannot be amended)");
        return false;
    }
    if (n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    if (!state || (strcmp(state, "active") != 0 && strcmp(state, "inactive") != 0)) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: encrypt.state=active or encrypt.state=inactive is required");
        return false;
    }
    int slot = -1;
    if (slot_s) {
        char *e = NULL;
        guint64 x = g_ascii_strtoull(slot_s, &e, 10);
        if (!*slot_s || *e || x >= VDK_LUKS_SLOTS) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: encrypt.keyslot '%s' is invalid (0 to %d)", slot_s,
                        VDK_LUKS_SLOTS - 1);
            return false;
        }
        slot = (int)x;
    }
    uint64_t iter_ms = 2000;
    if (iter_s) {
        char *e = NULL;
        iter_ms = g_ascii_strtoull(iter_s, &e, 10);
        if (!*iter_s || *e || iter_ms == 0 || iter_ms > 3600000) {
            g_set_error(error, VDK_ERROR, EINVAL, "qcow2: encrypt.iter-time '%s' is invalid (1 to 3600000 ms)",
                        iter_s);
            return false;
        }
    }
    VdkLuks *h = &c->hdr;
    uint64_t km = vdk_luks_km_bytes(h);
    if (!strcmp(state, "active")) {
        if (!new_id || old_id) {
            g_set_error(error, VDK_ERROR, EINVAL,
                        "qcow2: encrypt.state=active needs encrypt.new-secret (and no encrypt.old-secret)");
            return false;
        }
        GBytes *pass = vdk_secret_lookup(n->img->opts.secrets, new_id);
        if (!pass) {
            g_set_error(error, VDK_ERROR, ENOENT, "No secret with id '%s'", new_id);
            return false;
        }
        if (slot < 0) {
            for (int i = 0; i < VDK_LUKS_SLOTS && slot < 0; i++) {
                if (!h->slots[i].active) {
                    slot = i;
                }
            }
            if (slot < 0) {
                g_set_error(error, VDK_ERROR, ENOSPC, "Can't add a keyslot - all keyslots are in use");
                return false;
            }
        } else if (h->slots[slot].active) {
            g_set_error(error, VDK_ERROR, EBUSY, "Refusing to overwrite active keyslot %d - please erase it first",
                        slot);
            return false;
        }
        gsize plen = 0;
        const void *p = g_bytes_get_data(pass, &plen);
        VdkLuks nh = *h;
        if (!vdk_luks_set_slot(&nh, c->region, c->region_len, slot, c->mk, p, plen, iter_ms, error)) {
            return false;
        }
        uint64_t off = (uint64_t)nh.slots[slot].key_offset * VDK_LUKS_SECTOR;
        if (!write_region(s, off, km, error)) {
            return false;
        }
        vdk_luks_encode(&nh, c->region);
        if (!write_region(s, 0, VDK_LUKS_HDR_SIZE, error)) {
            return false;
        }
        *h = nh;
        return true;
    }
    /* inactive */
    if (new_id) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: encrypt.new-secret cannot be used with encrypt.state=inactive");
        return false;
    }
    if ((slot < 0) == (old_id == NULL)) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "qcow2: encrypt.state=inactive needs either encrypt.keyslot or encrypt.old-secret");
        return false;
    }
    bool kill[VDK_LUKS_SLOTS] = {false};
    int nkill = 0, nactive = 0;
    for (int i = 0; i < VDK_LUKS_SLOTS; i++) {
        nactive += h->slots[i].active;
    }
    if (slot >= 0) {
        if (!h->slots[slot].active) {
            g_set_error(error, VDK_ERROR, EINVAL, "Given keyslot %d is already erased (inactive)", slot);
            return false;
        }
        kill[slot] = true;
        nkill = 1;
    } else {
        GBytes *pass = vdk_secret_lookup(n->img->opts.secrets, old_id);
        if (!pass) {
            g_set_error(error, VDK_ERROR, ENOENT, "No secret with id '%s'", old_id);
            return false;
        }
        gsize plen = 0;
        const void *p = g_bytes_get_data(pass, &plen);
        for (int i = 0; i < VDK_LUKS_SLOTS; i++) {
            if (vdk_luks_slot_matches(h, c->region, c->region_len, i, p, plen, c->mk)) {
                kill[i] = true;
                nkill++;
            }
        }
        if (nkill == 0) {
            g_set_error(error, VDK_ERROR, ENOENT, "Didn't erase a keyslot, because no keyslots match the given password");
            return false;
        }
    }
    if (nkill >= nactive) {
        g_set_error(error, VDK_ERROR, EINVAL, "Attempt to erase the only active keyslot%s, which would make the data "
                    "unreadable for good - refusing operation", nkill > 1 ? "s" : "");
        return false;
    }
    VdkLuks nh = *h;
    uint8_t *wiped = g_memdup2(c->region, c->region_len);
    for (int i = 0; i < VDK_LUKS_SLOTS; i++) {
        if (kill[i]) {
            vdk_luks_kill_slot(&nh, wiped, c->region_len, i);
        }
    }
    vdk_luks_encode(&nh, c->region);
    if (!write_region(s, 0, VDK_LUKS_HDR_SIZE, error)) {
        g_free(wiped);
        return false;
    }
    *h = nh;
    bool ok = true;
    for (int i = 0; i < VDK_LUKS_SLOTS && ok; i++) {
        if (kill[i]) {
            uint64_t off = (uint64_t)nh.slots[i].key_offset * VDK_LUKS_SECTOR;
            memcpy(c->region + off, wiped + off, km);
            ok = write_region(s, off, km, error);
        }
    }
    OPENSSL_cleanse(wiped, c->region_len);
    g_free(wiped);
    return ok;
}
