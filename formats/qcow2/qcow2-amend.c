/* SPDX-License-Identifier: MIT */
/*
 * qcow2-amend.c - qemu-img amend for qcow2: compat (upgrade to 1.1,
 * downgrade to 0.10 expanding zero clusters), lazy_refcounts,
 * refcount_bits (a new refcount structure of the new width) and size,
 * with qemu's checks and messages.  Control path: blocking, no I/O in
 * flight.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"

static bool
flush(VdkNode *n, GError **error)
{
    int r = vdk_image_sync_request(n->img, VDK_OP_FLUSH, 0, NULL, 0, VDK_FLUSH_EVICT, NULL);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: flush failed: %s", g_strerror(-r));
        return false;
    }
    return true;
}

static bool
parse_bool(const char *key, const char *v, int *out, GError **error)
{
    if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "yes")) {
        *out = 1;
    } else if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "no")) {
        *out = 0;
    } else {
        g_set_error(error, VDK_ERROR, EINVAL, "Parameter '%s' expects 'on' or 'off'", key);
        return false;
    }
    return true;
}

/* One L2 table's zero entries made v2-readable.  @rt is the table's own
 * refcount (how many L1 tables, the active one and snapshots', share it):
 * every cluster the table points to is referenced that many times through
 * it.  A zero entry becomes
 *   - unallocated, when it has no cluster and nothing shows through;
 *   - its own cluster, zeroed in place, when only this table references
 *     that cluster (its refcount is @rt);
 *   - a new zeroed cluster with refcount @rt otherwise (the old cluster is
 *     still data somewhere else, or the backing file would show through);
 *     the old cluster loses this table's @rt references once the new
 *     entries are on disk.
 * The zeroes and the new refcounts reach the disk before the entries
 * (the zero writes are synced; the flush writes refcount blocks before
 * L2 tables), so a crash leaves either the old entries or the new ones,
 * and at most leaked clusters. */
static int
expand_table(VdkNode *n, Qcow2 *s, uint64_t table, uint64_t rt, const void *zeroes, GArray *drops)
{
    uint64_t cs = s->cluster_size;
    uint32_t slice = vdk_mc_slice_size(s->l2c);
    uint64_t per_slice = slice / s->l2_entry_size;
    int r = 0;
    for (uint64_t so = 0; so < cs && r == 0; so += slice) {
        VdkMetaEntry *sl = qcow2_ctl_slice(s, table + so, &r);
        if (!sl) {
            return r ? r : -EIO;
        }
        vdk_mc_pin(sl);
        bool changed = false;
        for (uint64_t k = 0; k < per_slice && r == 0; k++) {
            uint64_t e = qcow2_l2_get(s, sl->data, k, NULL);
            if ((e & QCOW2_OFLAG_COMPRESSED) || !(e & QCOW2_OFLAG_ZERO)) {
                continue;
            }
            uint64_t host = e & QCOW2_OFFSET_MASK;
            uint64_t rh = 0;
            if (host) {
                r = qcow2_ctl_get_refcount(s, host, &rh);
                if (r < 0) {
                    break;
                }
            }
            uint64_t ne = 0;
            if (host && rh == rt) {
                r = vdk_file_pwrite_sync(s->file, zeroes, cs, host);
                ne = host | (rt == 1 ? QCOW2_OFLAG_COPIED : 0);
            } else if (host || n->backing) {
                uint64_t nc = qcow2_ctl_alloc(s, 1, &r);
                if (!nc) {
                    break;
                }
                if (rt > 1) {
                    r = qcow2_ctl_refcount(s, nc, 1, (int64_t)rt - 1);
                }
                if (r == 0) {
                    r = vdk_file_pwrite_sync(s->file, zeroes, cs, nc);
                }
                ne = nc | (rt == 1 ? QCOW2_OFLAG_COPIED : 0);
                if (r == 0 && host) {
                    uint64_t d[2] = {host, rt};
                    g_array_append_vals(drops, d, 2);
                }
            }
            if (r == 0) {
                qcow2_l2_set(s, sl->data, k, ne, 0);
                changed = true;
            }
        }
        if (changed && r == 0) {
            r = vdk_file_flush_sync(s->file); /* the zeroes before the entries */
            vdk_mc_mark_dirty(s->l2c, sl);
        }
        vdk_mc_unpin(sl);
    }
    return r;
}

/* v2 has no zero flag: the zero clusters of every L2 table, the active
 * layer's and every internal snapshot's, become zeroed data clusters (or
 * unallocated ones where nothing shows through).  Each table is done
 * once, however many L1 tables share it. */
static bool
expand_zero_clusters(VdkNode *n, Qcow2 *s, GError **error)
{
    uint64_t cs = s->cluster_size;
    void *zeroes = NULL;
    if (posix_memalign(&zeroes, 4096, cs) != 0) {
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: out of memory");
        return false;
    }
    memset(zeroes, 0, cs);
    GHashTable *done = g_hash_table_new(g_int64_hash, g_int64_equal);
    GArray *tables = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    GArray *drops = g_array_new(FALSE, FALSE, sizeof(uint64_t));
    int r = 0;
    g_mutex_lock(&n->lock);
    /* every L2 table: the active L1's, then each snapshot's */
    for (uint64_t i = 0; i < s->l1_size; i++) {
        uint64_t t = s->l1[i] & QCOW2_OFFSET_MASK;
        if (t) {
            g_array_append_val(tables, t);
        }
    }
    for (uint32_t k = 0; k < s->nb_snapshots && r == 0; k++) {
        GError *err = NULL;
        uint64_t *l1 = qcow2_snapshot_load_l1(s, &s->snapshots[k], &err);
        if (!l1) {
            g_mutex_unlock(&n->lock);
            g_propagate_error(error, err);
            g_array_free(tables, TRUE);
            g_array_free(drops, TRUE);
            g_hash_table_destroy(done);
            free(zeroes);
            return false;
        }
        for (uint32_t i = 0; i < s->snapshots[k].l1_size; i++) {
            uint64_t t = l1[i] & QCOW2_OFFSET_MASK;
            if (t) {
                g_array_append_val(tables, t);
            }
        }
        g_free(l1);
    }
    for (guint i = 0; i < tables->len && r == 0; i++) {
        uint64_t *t = &g_array_index(tables, uint64_t, i);
        if (g_hash_table_contains(done, t)) {
            continue;
        }
        g_hash_table_add(done, t);
        uint64_t rt = 0;
        r = qcow2_ctl_get_refcount(s, *t, &rt);
        if (r == 0 && rt == 0) {
            r = -EIO; /* a table nobody counts: corrupt; check -r first */
        }
        if (r == 0) {
            r = expand_table(n, s, *t, rt, zeroes, drops);
        }
    }
    /* the new entries on disk, then the old clusters lose them */
    if (r == 0 && drops->len) {
        r = qcow2_ctl_flush(s);
        for (guint i = 0; i + 1 < drops->len && r == 0; i += 2) {
            uint64_t host = g_array_index(drops, uint64_t, i);
            uint64_t rt = g_array_index(drops, uint64_t, i + 1);
            r = qcow2_ctl_refcount(s, host, 1, -(int64_t)rt);
        }
    }
    g_mutex_unlock(&n->lock);
    g_array_free(tables, TRUE);
    g_array_free(drops, TRUE);
    g_hash_table_destroy(done);
    free(zeroes);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: expanding zero clusters failed: %s", g_strerror(-r));
        return false;
    }
    return flush(n, error);
}

bool
qcow2_amend(VdkNode *n, GHashTable *kv, GError **error)
{
    Qcow2 *s = n->opaque;
    if (qcow2_crypto_amend_wanted(kv)) {
        return qcow2_crypto_amend(n, kv, error); /* key slots */
    }
    int version = -1, lazy = -1;
    int64_t bits = -1;
    uint64_t size = 0;
    bool has_size = false;
    GHashTableIter it;
    gpointer k, v;
    g_hash_table_iter_init(&it, kv);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        const char *key = k, *val = v;
        if (!strcmp(key, "compat")) {
            if (!strcmp(val, "0.10") || !strcmp(val, "v2")) {
                version = 2;
            } else if (!strcmp(val, "1.1") || !strcmp(val, "v3")) {
                version = 3;
            } else {
                g_set_error(error, VDK_ERROR, EINVAL, "Unknown compatibility level %s", val);
                return false;
            }
        } else if (!strcmp(key, "lazy_refcounts")) {
            if (!parse_bool(key, val, &lazy, error)) {
                return false;
            }
        } else if (!strcmp(key, "refcount_bits")) {
            uint64_t b = g_ascii_strtoull(val, NULL, 10);
            if (b == 0 || b > 64 || (b & (b - 1))) {
                g_set_error(error, VDK_ERROR, EINVAL,
                            "Refcount width must be a power of two and may not exceed 64 bits");
                return false;
            }
            bits = (int64_t)b;
        } else if (!strcmp(key, "size")) {
            if (!vdk_parse_size(val, &size, error)) {
                return false;
            }
            has_size = true;
        } else if (!strcmp(key, "backing_file") || !strcmp(key, "backing_fmt")) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "Cannot amend the backing file\nYou can use 'vdk rebase' instead.");
            return false;
        } else if (!strcmp(key, "data_file") || !strcmp(key, "data_file_raw") || !strcmp(key, "encryption")) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: '%s' cannot be amended (external data files and "
                        "the legacy encryption are not supported)", key);
            return false;
        } else {
            bool create_only = false;
            for (const VdkOptionDesc *d = qcow2_create_opts; d->name; d++) {
                create_only |= !strcmp(d->name, key);
            }
            g_set_error(error, VDK_ERROR, EINVAL, "Invalid parameter '%s'%s", key,
                        create_only ? "\nThis option is only supported for image creation" : "");
            return false;
        }
    }
    if (n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    if (s->corrupt) {
        g_set_error(error, VDK_ERROR, EIO, "qcow2: the image is marked corrupt; repair it with 'vdk check -r all' first");
        return false;
    }
    uint32_t final_version = version > 0 ? (uint32_t)version : s->version;
    if (lazy == 1 && final_version < 3) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
        return false;
    }
    if (bits > 0 && bits != 16 && final_version < 3) {
        g_set_error(error, VDK_ERROR, EINVAL, "Refcount widths other than 16 bits require compatibility level 1.1 "
                    "or above (use compat=1.1 or greater)");
        return false;
    }
    bool downgrade = final_version < s->version;
    if (downgrade) {
        uint64_t inc = s->incompatible & ~QCOW2_INCOMPAT_DIRTY;
        if (inc) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "Cannot downgrade an image with incompatible features %#" PRIx64
                        " set", inc);
            return false;
        }
        if (s->refcount_order != 4 && bits != 16) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "compat=0.10 requires refcount_bits=16");
            return false;
        }
        if (s->has_bitmaps) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "Cannot downgrade an image with persistent bitmaps");
            return false;
        }
        if (s->crypt_method) {
            g_set_error(error, VDK_ERROR, ENOTSUP,
                        "qcow2: downgrading an encrypted image is not supported (its zero clusters would have to "
                        "be written encrypted)");
            return false;
        }
    }
    if (!flush(n, error)) {
        return false;
    }
    /* 1. upgrade first: the other changes may need v3 */
    if (final_version > s->version) {
        g_mutex_lock(&n->lock);
        bool ok = qcow2_rebuild_header(s, final_version, n->backing_name, n->backing_fmt, error);
        g_mutex_unlock(&n->lock);
        if (!ok || !flush(n, error)) {
            return false;
        }
    }
    /* 2. refcount width */
    if (bits > 0 && (uint32_t)bits != s->refcount_bits) {
        if (!qcow2_change_refcount_width(s, (uint32_t)__builtin_ctzll((uint64_t)bits), error)) {
            return false;
        }
    }
    /* 3. lazy refcounts: switching off needs every refcount written (the
     * flush above did it) */
    if (lazy >= 0 && (bool)lazy != s->lazy_refcounts) {
        g_mutex_lock(&n->lock);
        s->lazy_refcounts = lazy;
        if (lazy) {
            s->compatible |= QCOW2_COMPAT_LAZY_REFCOUNTS;
        } else {
            s->compatible &= ~QCOW2_COMPAT_LAZY_REFCOUNTS;
        }
        s->hdr_dirty = true;
        g_mutex_unlock(&n->lock);
        if (!flush(n, error)) {
            return false;
        }
    }
    /* every refcount is on disk now: a dirty bit left from lazy refcounts
     * goes (v2 has none, and without lazy refcounts it means "repair") */
    if ((lazy == 0 || downgrade) && s->dirty_on_disk) {
        g_mutex_lock(&n->lock);
        s->incompatible &= ~QCOW2_INCOMPAT_DIRTY;
        s->dirty_on_disk = false;
        s->hdr_dirty = true;
        g_mutex_unlock(&n->lock);
        if (!flush(n, error)) {
            return false;
        }
    }
    /* 4. size */
    if (has_size && size != s->size) {
        if (!qcow2_truncate_bitmaps(n, size, true, VDK_PREALLOC_OFF, error)) {
            return false;
        }
        n->size = s->size;
    }
    /* 5. downgrade last: zero clusters expanded, then the v2 header */
    if (downgrade) {
        if (!expand_zero_clusters(n, s, error)) {
            return false;
        }
        g_mutex_lock(&n->lock);
        s->lazy_refcounts = false;
        s->compatible = 0;
        s->autoclear = 0;
        s->incompatible = 0;
        bool ok = qcow2_rebuild_header(s, 2, n->backing_name, n->backing_fmt, error);
        g_mutex_unlock(&n->lock);
        if (!ok || !flush(n, error)) {
            return false;
        }
    }
    return true;
}
