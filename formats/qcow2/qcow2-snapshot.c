/* SPDX-License-Identifier: MIT */
/*
 * qcow2-snapshot.c - internal snapshots: create, apply (revert), delete,
 * list, with qemu's on-disk semantics.
 *
 * Reference counting follows qemu's model: a snapshot holds one reference
 * on every L2 table and every data cluster reachable from its L1 table
 * (its own L1 table clusters have refcount 1); the active tree's COPIED
 * flags say "refcount exactly 1" and are recomputed after every change, so
 * writes copy whatever a snapshot still uses.
 *
 * Crash safety: each operation reaches its new state through one header
 * write (snapshot table offset and count, or the active L1 table), made
 * only after everything it points at is durable; references are added
 * before the header switch and dropped after it.  An interruption leaves
 * the old or the new state, at worst with leaked clusters (check -r leaks
 * repairs them).  Unlike qemu, apply does not overwrite the active L1
 * table in place: the snapshot's table is copied to new clusters first.
 *
 * Everything here is control path: blocking, no I/O in flight, the node
 * lock held except around flushes (which take it themselves).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "formats/qcow2/qcow2.h"

/* qemu stores 24 bytes of extra data (VM state size, disk size, icount). */
#define SN_EXTRA_LEN 24
#define SN_MAX_NAME 65535

/* Control-path helpers (see qcow2.h). */
int
qcow2_ctl_flush(Qcow2 *s)
{
    VdkNode *n = s->node;
    g_mutex_unlock(&n->lock);
    int r = vdk_image_sync_request(n->img, VDK_OP_FLUSH, 0, NULL, 0, VDK_FLUSH_EVICT, NULL);
    g_mutex_lock(&n->lock);
    return r;
}

int
qcow2_ctl_refcount(Qcow2 *s, uint64_t off, uint64_t n, int64_t delta)
{
    for (int tries = 0;; tries++) {
        int r = qcow2_update_refcount(s, off, n, delta, NULL);
        if (r != -ENOBUFS || tries > 2) {
            return r;
        }
        r = qcow2_ctl_flush(s);
        if (r < 0) {
            return r;
        }
    }
}

int
qcow2_ctl_get_refcount(Qcow2 *s, uint64_t off, uint64_t *rc)
{
    for (int tries = 0;; tries++) {
        int r = qcow2_get_refcount(s, off, rc, NULL);
        if (r != -ENOBUFS || tries > 2) {
            return r;
        }
        r = qcow2_ctl_flush(s);
        if (r < 0) {
            return r;
        }
    }
}

VdkMetaEntry *
qcow2_ctl_slice(Qcow2 *s, uint64_t off, int *ret)
{
    for (int tries = 0;; tries++) {
        *ret = 0;
        VdkMetaEntry *e = vdk_mc_get(s->l2c, off, NULL, ret);
        if (e || *ret != -ENOBUFS || tries > 2) {
            return e;
        }
        int r = qcow2_ctl_flush(s);
        if (r < 0) {
            *ret = r;
            return NULL;
        }
    }
}

uint64_t
qcow2_ctl_alloc(Qcow2 *s, uint64_t nclusters, int *ret)
{
    for (int tries = 0;; tries++) {
        *ret = 0;
        uint64_t off = qcow2_alloc_clusters(s, nclusters, NULL, ret);
        if (off || *ret != -ENOBUFS || tries > 2) {
            if (!off && *ret == 0) {
                *ret = -EIO;
            }
            return off;
        }
        int r = qcow2_ctl_flush(s);
        if (r < 0) {
            *ret = r;
            return 0;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Walking a tree of L1 -> L2 -> clusters, changing refcounts                */
/* ------------------------------------------------------------------------ */

typedef struct {
    Qcow2 *s;
    int64_t delta;
    uint64_t run_off, run_n; /* contiguous clusters not applied yet */
    GArray *zeroed;          /* Qcow2Free: clusters whose refcount reached 0 */
} TreeOp;

static int
run_apply(TreeOp *t)
{
    Qcow2 *s = t->s;
    if (!t->run_n) {
        return 0;
    }
    uint64_t off = t->run_off, n = t->run_n;
    t->run_n = 0;
    int r = qcow2_ctl_refcount(s, off, n, t->delta);
    if (r < 0 || t->delta >= 0 || !t->zeroed) {
        return r;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t c = off + (i << s->cluster_bits);
        uint64_t rc = 1;
        r = qcow2_ctl_get_refcount(s, c, &rc);
        if (r < 0) {
            return r;
        }
        if (rc != 0) {
            continue;
        }
        if (t->zeroed->len) {
            Qcow2Free *p = &g_array_index(t->zeroed, Qcow2Free, t->zeroed->len - 1);
            if (p->offset + ((uint64_t)p->count << s->cluster_bits) == c && p->count < UINT32_MAX) {
                p->count++;
                continue;
            }
        }
        Qcow2Free f = {c, 1};
        g_array_append_val(t->zeroed, f);
    }
    return 0;
}

static int
run_add(TreeOp *t, uint64_t off, uint64_t n)
{
    if (t->run_n && t->run_off + (t->run_n << t->s->cluster_bits) == off && t->run_n < (1u << 20)) {
        t->run_n += n;
        return 0;
    }
    int r = run_apply(t);
    t->run_off = off;
    t->run_n = n;
    return r;
}

/* Check a table entry before following it (a snapshot's L1 is read from
 * disk and may be damaged). */
static int
check_table_offset(Qcow2 *s, uint64_t table, const char *what, uint64_t idx)
{
    if ((table & (s->cluster_size - 1)) || table < s->cluster_size || table >= s->file->size) {
        return qcow2_signal_corruption(s, "%s entry %" PRIu64 " points at an invalid L2 table offset 0x%" PRIx64, what,
                                       idx, table);
    }
    return 0;
}

static int
tree_walk(TreeOp *t, const uint64_t *l1, uint64_t l1_size, const char *what)
{
    Qcow2 *s = t->s;
    uint64_t cs = s->cluster_size;
    uint32_t slice = vdk_mc_slice_size(s->l2c);
    uint64_t per_slice = slice / s->l2_entry_size;
    for (uint64_t i = 0; i < l1_size; i++) {
        uint64_t table = l1[i] & QCOW2_OFFSET_MASK;
        if (!table) {
            continue;
        }
        int r = check_table_offset(s, table, what, i);
        if (r < 0) {
            return r;
        }
        for (uint64_t so = 0; so < cs; so += slice) {
            VdkMetaEntry *sl = qcow2_ctl_slice(s, table + so, &r);
            if (!sl) {
                return r ? r : -EIO;
            }
            vdk_mc_pin(sl);
            for (uint64_t k = 0; k < per_slice && r == 0; k++) {
                uint64_t e = qcow2_l2_get(s, sl->data, k, NULL);
                if (e & QCOW2_OFLAG_COMPRESSED) {
                    uint64_t coff, clen;
                    qcow2_compressed_range(s, e, &coff, &clen);
                    uint64_t first = coff & ~(cs - 1);
                    r = run_add(t, first, (vdk_align_up(coff + clen, cs) - first) >> s->cluster_bits);
                } else if (e & QCOW2_OFFSET_MASK) {
                    r = run_add(t, e & QCOW2_OFFSET_MASK, 1);
                }
            }
            vdk_mc_unpin(sl);
            if (r < 0) {
                return r;
            }
        }
        r = run_add(t, table, 1);
        if (r < 0) {
            return r;
        }
    }
    return run_apply(t);
}

/* Recompute the active tree's COPIED flags (refcount exactly 1), as qemu
 * does after every snapshot operation. */
static int
fix_copied(Qcow2 *s)
{
    uint64_t cs = s->cluster_size;
    uint32_t slice = vdk_mc_slice_size(s->l2c);
    uint64_t per_slice = slice / s->l2_entry_size;
    for (uint64_t i = 0; i < s->l1_size; i++) {
        uint64_t table = s->l1[i] & QCOW2_OFFSET_MASK;
        if (!table) {
            continue;
        }
        uint64_t rc = 0;
        int r = qcow2_ctl_get_refcount(s, table, &rc);
        if (r < 0) {
            return r;
        }
        uint64_t want = (rc == 1) ? (table | QCOW2_OFLAG_COPIED) : table;
        if (s->l1[i] != want) {
            s->l1[i] = want;
            s->l1_dirty_lo = MIN(s->l1_dirty_lo, i);
            s->l1_dirty_hi = MAX(s->l1_dirty_hi, i + 1);
        }
        for (uint64_t so = 0; so < cs; so += slice) {
            VdkMetaEntry *sl = qcow2_ctl_slice(s, table + so, &r);
            if (!sl) {
                return r ? r : -EIO;
            }
            vdk_mc_pin(sl);
            for (uint64_t k = 0; k < per_slice && r == 0; k++) {
                uint64_t bm;
                uint64_t e = qcow2_l2_get(s, sl->data, k, &bm);
                if ((e & QCOW2_OFLAG_COMPRESSED) || !(e & QCOW2_OFFSET_MASK)) {
                    continue;
                }
                r = qcow2_ctl_get_refcount(s, e & QCOW2_OFFSET_MASK, &rc);
                if (r < 0) {
                    break;
                }
                uint64_t ne = (rc == 1) ? (e | QCOW2_OFLAG_COPIED) : (e & ~QCOW2_OFLAG_COPIED);
                if (ne != e) {
                    qcow2_l2_set(s, sl->data, k, ne, bm);
                    vdk_mc_mark_dirty(s->l2c, sl);
                }
            }
            vdk_mc_unpin(sl);
            if (r < 0) {
                return r;
            }
        }
    }
    return 0;
}

/* Give zero-refcount clusters back to the filesystem (best effort: they
 * are free either way). */
static void
punch(Qcow2 *s, GArray *zeroed)
{
    for (guint i = 0; i < zeroed->len; i++) {
        Qcow2Free *f = &g_array_index(zeroed, Qcow2Free, i);
        if (fallocate(s->file->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)f->offset,
                      (off_t)((uint64_t)f->count << s->cluster_bits)) != 0) {
            break;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* The snapshot table                                                        */
/* ------------------------------------------------------------------------ */

/* Extra data as written: qemu's 24 known bytes (VM state size, disk size,
 * icount), then whatever a newer writer stored beyond them, kept. */
static uint32_t
extra_out_len(const Qcow2Snapshot *sn)
{
    return SN_EXTRA_LEN + (sn->extra_len > SN_EXTRA_LEN ? sn->extra_len - SN_EXTRA_LEN : 0);
}

static uint64_t
entry_len(const Qcow2Snapshot *sn)
{
    return (40 + (uint64_t)extra_out_len(sn) + strlen(sn->id) + strlen(sn->name) + 7) & ~7ULL;
}

static uint64_t
table_len(const Qcow2Snapshot *list, uint32_t count)
{
    uint64_t len = 0;
    for (uint32_t i = 0; i < count; i++) {
        len += entry_len(&list[i]);
    }
    return len;
}

static void
table_fill(uint8_t *buf, const Qcow2Snapshot *list, uint32_t count)
{
    uint64_t pos = 0;
    for (uint32_t i = 0; i < count; i++) {
        const Qcow2Snapshot *sn = &list[i];
        uint8_t *p = buf + pos;
        size_t id_len = strlen(sn->id), name_len = strlen(sn->name);
        qput64(p, sn->l1_offset);
        qput32(p + 8, sn->l1_size);
        qput16(p + 12, (uint16_t)id_len);
        qput16(p + 14, (uint16_t)name_len);
        qput32(p + 16, sn->date_sec);
        qput32(p + 20, sn->date_nsec);
        qput64(p + 24, sn->vm_clock_nsec);
        qput32(p + 32, sn->vm_state_size > UINT32_MAX ? 0 : (uint32_t)sn->vm_state_size);
        uint32_t extra = extra_out_len(sn);
        qput32(p + 36, extra);
        qput64(p + 40, sn->vm_state_size);
        qput64(p + 48, sn->disk_size);
        qput64(p + 56, sn->has_icount ? sn->icount : UINT64_MAX);
        if (extra > SN_EXTRA_LEN) {
            memcpy(p + 40 + SN_EXTRA_LEN, sn->extra + SN_EXTRA_LEN, extra - SN_EXTRA_LEN);
        }
        memcpy(p + 40 + extra, sn->id, id_len);
        memcpy(p + 40 + extra + id_len, sn->name, name_len);
        pos += entry_len(sn);
    }
}

static void
list_free(Qcow2Snapshot *list, uint32_t count)
{
    for (uint32_t i = 0; list && i < count; i++) {
        g_free(list[i].id);
        g_free(list[i].name);
        g_free(list[i].extra);
    }
    g_free(list);
}

static void
copy_entry(Qcow2Snapshot *dst, const Qcow2Snapshot *src)
{
    *dst = *src;
    dst->id = g_strdup(src->id);
    dst->name = g_strdup(src->name);
    dst->extra = src->extra_len ? g_memdup2(src->extra, src->extra_len) : NULL;
}

/*
 * Write @list (owned from now on) as the new snapshot table and switch the
 * header to it: the table is written and synced, then the header, then
 * the old table is freed.
 */
static bool
write_table(Qcow2 *s, Qcow2Snapshot *list, uint32_t count, GError **error)
{
    uint64_t len = table_len(list, count);
    if (len > QCOW2_MAX_SNAPSHOT_TABLE) {
        list_free(list, count);
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: the snapshot table would exceed %u bytes", QCOW2_MAX_SNAPSHOT_TABLE);
        return false;
    }
    uint64_t old_off = s->snapshots_offset;
    uint64_t old_clusters = qcow2_align(s, table_len(s->snapshots, s->nb_snapshots)) >> s->cluster_bits;
    uint64_t new_off = 0;
    int r = 0;
    if (count) {
        uint64_t bytes = qcow2_align(s, len);
        new_off = qcow2_ctl_alloc(s, bytes >> s->cluster_bits, &r);
        if (!new_off) {
            list_free(list, count);
            g_set_error(error, VDK_ERROR, -r, "qcow2: cannot allocate the snapshot table: %s", g_strerror(-r));
            return false;
        }
        void *buf = NULL;
        if (posix_memalign(&buf, 4096, (size_t)bytes) != 0) {
            list_free(list, count);
            g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: out of memory for the snapshot table");
            return false;
        }
        memset(buf, 0, (size_t)bytes);
        table_fill(buf, list, count);
        r = vdk_file_pwrite_sync(s->file, buf, (size_t)bytes, new_off);
        free(buf);
        if (r == 0) {
            r = qcow2_ctl_flush(s); /* the table and its refcounts are durable */
        }
        if (r < 0) {
            list_free(list, count);
            g_set_error(error, VDK_ERROR, -r, "qcow2: cannot write the snapshot table: %s", g_strerror(-r));
            return false;
        }
    }
    /* the switch */
    qcow2_snapshots_free(s);
    s->snapshots = list;
    s->nb_snapshots = count;
    s->snapshots_offset = new_off;
    s->hdr_dirty = true;
    r = qcow2_ctl_flush(s);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot write the header: %s", g_strerror(-r));
        return false;
    }
    if (old_off && old_clusters) {
        qcow2_defer_free(s, old_off, old_clusters);
    }
    return true;
}

/* A snapshot's L1 table, validated (host order). */
uint64_t *
qcow2_snapshot_load_l1(Qcow2 *s, const Qcow2Snapshot *sn, GError **error)
{
    uint64_t bytes = (uint64_t)sn->l1_size * 8;
    uint64_t end;
    if (vdk_add_overflows(sn->l1_offset, bytes, &end) || (bytes && end > s->file->size)) {
        g_set_error(error, VDK_ERROR, EIO, "qcow2: snapshot '%s': L1 table (0x%" PRIx64 ", %u entries) is outside the file",
                    sn->name, sn->l1_offset, sn->l1_size);
        return NULL;
    }
    uint8_t *raw = g_try_malloc(MAX(bytes, 8));
    uint64_t *l1 = g_try_new0(uint64_t, MAX(sn->l1_size, 1));
    if (!raw || !l1) {
        g_free(raw);
        g_free(l1);
        g_set_error(error, VDK_ERROR, ENOMEM, "qcow2: out of memory for a snapshot L1 table");
        return NULL;
    }
    int r = bytes ? vdk_file_pread_sync(s->file, raw, (size_t)bytes, sn->l1_offset) : 0;
    if (r < 0) {
        g_free(raw);
        g_free(l1);
        g_set_error(error, VDK_ERROR, -r, "qcow2: cannot read the L1 table of snapshot '%s': %s", sn->name,
                    g_strerror(-r));
        return NULL;
    }
    for (uint32_t i = 0; i < sn->l1_size; i++) {
        uint64_t e = qbe64(raw + 8 * i);
        uint64_t t = e & QCOW2_OFFSET_MASK;
        if ((e & QCOW2_L1_RESERVED) || (t && ((t & (s->cluster_size - 1)) || t >= s->file->size))) {
            g_free(raw);
            g_free(l1);
            g_set_error(error, VDK_ERROR, EIO, "qcow2: snapshot '%s': invalid L1 entry %u (0x%" PRIx64 ")", sn->name, i,
                        e);
            return NULL;
        }
        l1[i] = e;
    }
    g_free(raw);
    return l1;
}

static bool
usable(Qcow2 *s, GError **error)
{
    if (s->corrupt) {
        g_set_error(error, VDK_ERROR, EIO, "qcow2: the image is marked corrupt; repair it with 'vdk check -r all' first");
        return false;
    }
    if (s->node->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    return true;
}

static bool
fail_errno(GError **error, int r, const char *what)
{
    g_set_error(error, VDK_ERROR, -r, "qcow2: %s: %s", what,
                r == -ERANGE ? "a refcount would overflow (refcount_bits too small)" : g_strerror(-r));
    return false;
}

/* ------------------------------------------------------------------------ */
/* Operations                                                                */
/* ------------------------------------------------------------------------ */

bool
qcow2_snapshot_create(VdkNode *n, const char *name, GError **error)
{
    Qcow2 *s = n->opaque;
    if (!usable(s, error)) {
        return false;
    }
    if (strlen(name) > SN_MAX_NAME) {
        g_set_error(error, VDK_ERROR, EINVAL, "qcow2: snapshot name is longer than %d bytes", SN_MAX_NAME);
        return false;
    }
    if (s->nb_snapshots >= QCOW2_MAX_SNAPSHOTS) {
        g_set_error(error, VDK_ERROR, EFBIG, "qcow2: the image already has %u snapshots (the maximum)", s->nb_snapshots);
        return false;
    }
    if (s->refcount_max < 2) {
        g_set_error(error, VDK_ERROR, ENOTSUP,
                    "qcow2: snapshots need refcounts of 2 bits or more (the image has refcount_bits=%u)",
                    s->refcount_bits);
        return false;
    }
    g_mutex_lock(&n->lock);
    bool ok = false;
    int r = qcow2_ctl_flush(s);
    if (r < 0) {
        fail_errno(error, r, "flush before the snapshot failed");
        goto out;
    }
    /* 1. the snapshot's L1 table: new clusters */
    uint64_t l1_bytes = (uint64_t)s->l1_size * 8;
    uint64_t l1_clusters = qcow2_align(s, l1_bytes) >> s->cluster_bits;
    uint64_t sn_l1 = 0;
    if (l1_clusters) {
        sn_l1 = qcow2_ctl_alloc(s, l1_clusters, &r);
        if (!sn_l1) {
            fail_errno(error, r, "cannot allocate the snapshot's L1 table");
            goto out;
        }
    }
    /* 2. one more reference on everything the active tree reaches, then
     * the COPIED flags (all clear now: everything is shared) */
    TreeOp t = {.s = s, .delta = 1};
    r = tree_walk(&t, s->l1, s->l1_size, "L1");
    if (r == 0) {
        r = fix_copied(s);
    }
    if (r < 0) {
        fail_errno(error, r, "cannot add the snapshot's references");
        goto out;
    }
    /* 3. the copy of the L1 table, then everything durable */
    if (l1_clusters) {
        void *buf = NULL;
        if (posix_memalign(&buf, 4096, (size_t)(l1_clusters << s->cluster_bits)) != 0) {
            fail_errno(error, -ENOMEM, "cannot copy the L1 table");
            goto out;
        }
        memset(buf, 0, (size_t)(l1_clusters << s->cluster_bits));
        for (uint64_t i = 0; i < s->l1_size; i++) {
            qput64((uint8_t *)buf + 8 * i, s->l1[i]);
        }
        r = vdk_file_pwrite_sync(s->file, buf, (size_t)(l1_clusters << s->cluster_bits), sn_l1);
        free(buf);
    }
    if (r == 0) {
        r = qcow2_ctl_flush(s);
    }
    if (r < 0) {
        fail_errno(error, r, "cannot write the snapshot's L1 table");
        goto out;
    }
    /* 4. the new table: the old entries and this one */
    Qcow2Snapshot *list = g_new0(Qcow2Snapshot, (gsize)s->nb_snapshots + 1);
    uint64_t max_id = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        copy_entry(&list[i], &s->snapshots[i]);
        uint64_t id = g_ascii_strtoull(s->snapshots[i].id, NULL, 10);
        max_id = MAX(max_id, id);
    }
    Qcow2Snapshot *sn = &list[s->nb_snapshots];
    struct timeval tv;
    gettimeofday(&tv, NULL);
    sn->l1_offset = sn_l1;
    sn->l1_size = s->l1_size;
    sn->id = g_strdup_printf("%" PRIu64, max_id + 1);
    sn->name = g_strdup(name);
    sn->date_sec = (uint32_t)tv.tv_sec;
    sn->date_nsec = (uint32_t)tv.tv_usec * 1000; /* as qemu-img records it */
    sn->disk_size = s->size;
    sn->icount = 0;
    sn->has_icount = true;
    sn->extra_len = 0; /* the known fields are written from the struct */
    sn->extra = NULL;
    if (!write_table(s, list, s->nb_snapshots + 1, error)) {
        goto out;
    }
    qcow2_comp_reset(s); /* start packing compressed data in a fresh cluster */
    r = qcow2_ctl_flush(s);     /* frees the old table */
    if (r < 0) {
        fail_errno(error, r, "flush after the snapshot failed");
        goto out;
    }
    ok = true;
out:
    g_mutex_unlock(&n->lock);
    return ok;
}

static int
find_by_id_or_name(Qcow2 *s, const char *key)
{
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if (!strcmp(s->snapshots[i].id, key)) {
            return (int)i;
        }
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if (!strcmp(s->snapshots[i].name, key)) {
            return (int)i;
        }
    }
    return -1;
}

static int
find_by_name(Qcow2 *s, const char *key)
{
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if (!strcmp(s->snapshots[i].name, key)) {
            return (int)i;
        }
    }
    return -1;
}

/* Drop the references of a tree that nothing points at any more (after
 * the header switch), give freed clusters back, fix the COPIED flags. */
static int
release_tree(Qcow2 *s, const uint64_t *l1, uint64_t l1_size, uint64_t l1_off, uint64_t l1_clusters)
{
    GArray *zeroed = g_array_new(FALSE, FALSE, sizeof(Qcow2Free));
    TreeOp t = {.s = s, .delta = -1, .zeroed = zeroed};
    int r = tree_walk(&t, l1, l1_size, "L1");
    if (r == 0 && l1_clusters) {
        r = run_add(&t, l1_off, l1_clusters);
        if (r == 0) {
            r = run_apply(&t);
        }
    }
    if (r == 0) {
        r = fix_copied(s);
    }
    if (r == 0) {
        r = qcow2_ctl_flush(s);
    }
    if (r == 0) {
        punch(s, zeroed);
    }
    g_array_free(zeroed, TRUE);
    return r;
}

bool
qcow2_snapshot_apply(VdkNode *n, const char *name, GError **error)
{
    Qcow2 *s = n->opaque;
    if (!usable(s, error)) {
        return false;
    }
    g_mutex_lock(&n->lock);
    bool ok = false;
    uint64_t *sn_l1 = NULL, *new_l1 = NULL, *old_l1 = NULL;
    int idx = find_by_id_or_name(s, name);
    if (idx < 0) {
        g_set_error(error, VDK_ERROR, ENOENT, "snapshot '%s' not found", name);
        goto out;
    }
    Qcow2Snapshot *sn = &s->snapshots[idx];
    uint64_t per_l1 = s->l2_entries << s->cluster_bits;
    if (sn->disk_size > QCOW2_MAX_VIRTUAL_SIZE || (sn->disk_size + per_l1 - 1) / per_l1 > sn->l1_size) {
        g_set_error(error, VDK_ERROR, EIO, "qcow2: snapshot '%s': its L1 table (%u entries) cannot map its disk size %"
                    PRIu64, name, sn->l1_size, sn->disk_size);
        goto out;
    }
    int r = qcow2_ctl_flush(s);
    if (r < 0) {
        fail_errno(error, r, "flush before applying the snapshot failed");
        goto out;
    }
    sn_l1 = qcow2_snapshot_load_l1(s, sn, error);
    if (!sn_l1) {
        goto out;
    }
    /* 1. references for the snapshot's tree, a new active L1 table with
     * its entries (COPIED clear: everything is shared with the snapshot) */
    uint64_t new_size = MAX(s->l1_size, sn->l1_size);
    uint64_t new_clusters = qcow2_align(s, new_size * 8) >> s->cluster_bits;
    new_l1 = g_try_new0(uint64_t, MAX(new_size, 1));
    if (!new_l1) {
        fail_errno(error, -ENOMEM, "cannot allocate the new L1 table");
        goto out;
    }
    for (uint32_t i = 0; i < sn->l1_size; i++) {
        new_l1[i] = sn_l1[i] & ~QCOW2_OFLAG_COPIED;
    }
    TreeOp t = {.s = s, .delta = 1};
    r = tree_walk(&t, sn_l1, sn->l1_size, "snapshot L1");
    if (r < 0) {
        fail_errno(error, r, "cannot add references for the snapshot");
        goto out;
    }
    uint64_t new_off = 0;
    if (new_clusters) {
        new_off = qcow2_ctl_alloc(s, new_clusters, &r);
        if (!new_off) {
            fail_errno(error, r, "cannot allocate the new L1 table");
            goto out;
        }
        void *buf = NULL;
        if (posix_memalign(&buf, 4096, (size_t)(new_clusters << s->cluster_bits)) != 0) {
            fail_errno(error, -ENOMEM, "cannot write the new L1 table");
            goto out;
        }
        memset(buf, 0, (size_t)(new_clusters << s->cluster_bits));
        for (uint64_t i = 0; i < new_size; i++) {
            qput64((uint8_t *)buf + 8 * i, new_l1[i]);
        }
        r = vdk_file_pwrite_sync(s->file, buf, (size_t)(new_clusters << s->cluster_bits), new_off);
        free(buf);
    }
    if (r == 0) {
        r = qcow2_ctl_flush(s);
    }
    if (r < 0) {
        fail_errno(error, r, "cannot write the new L1 table");
        goto out;
    }
    /* 2. the switch */
    old_l1 = s->l1;
    uint64_t old_size = s->l1_size, old_off = s->l1_offset;
    uint64_t old_clusters = qcow2_align(s, old_size * 8) >> s->cluster_bits;
    s->l1 = new_l1;
    new_l1 = NULL;
    s->l1_size = (uint32_t)new_size;
    s->l1_offset = new_off;
    s->size = sn->disk_size; /* the disk as it was, size included */
    n->size = sn->disk_size;
    s->l1_dirty_lo = UINT64_MAX;
    s->l1_dirty_hi = 0;
    s->hdr_dirty = true;
    qcow2_comp_reset(s);
    s->meta_prealloc = -1;
    r = qcow2_ctl_flush(s);
    if (r < 0) {
        fail_errno(error, r, "cannot write the header");
        goto out;
    }
    /* 3. the old active tree loses its references */
    r = release_tree(s, old_l1, old_size, old_off, old_off ? old_clusters : 0);
    if (r < 0) {
        fail_errno(error, r, "cannot release the old disk state (the snapshot was applied; 'check -r leaks' "
                             "reclaims the space)");
        goto out;
    }
    ok = true;
out:
    g_free(sn_l1);
    g_free(new_l1);
    g_free(old_l1);
    g_mutex_unlock(&n->lock);
    return ok;
}

bool
qcow2_snapshot_delete(VdkNode *n, const char *name, GError **error)
{
    Qcow2 *s = n->opaque;
    if (!usable(s, error)) {
        return false;
    }
    g_mutex_lock(&n->lock);
    bool ok = false;
    uint64_t *sn_l1 = NULL;
    int idx = find_by_name(s, name);
    if (idx < 0) {
        g_set_error(error, VDK_ERROR, ENOENT, "snapshot '%s' not found", name);
        goto out;
    }
    int r = qcow2_ctl_flush(s);
    if (r < 0) {
        fail_errno(error, r, "flush before deleting the snapshot failed");
        goto out;
    }
    Qcow2Snapshot gone = s->snapshots[idx];
    sn_l1 = qcow2_snapshot_load_l1(s, &gone, error);
    if (!sn_l1) {
        goto out;
    }
    uint64_t l1_off = gone.l1_offset, l1_size = gone.l1_size;
    uint64_t l1_clusters = qcow2_align(s, l1_size * 8) >> s->cluster_bits;
    /* 1. the table without it (the switch) */
    Qcow2Snapshot *list = g_new0(Qcow2Snapshot, MAX(s->nb_snapshots, 1u));
    uint32_t count = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if ((int)i != idx) {
            copy_entry(&list[count++], &s->snapshots[i]);
        }
    }
    if (!write_table(s, list, count, error)) {
        goto out;
    }
    /* 2. its tree loses its references */
    r = release_tree(s, sn_l1, l1_size, l1_off, l1_off ? l1_clusters : 0);
    if (r < 0) {
        fail_errno(error, r, "cannot release the snapshot's clusters (it was deleted; 'check -r leaks' reclaims "
                             "the space)");
        goto out;
    }
    ok = true;
out:
    g_free(sn_l1);
    g_mutex_unlock(&n->lock);
    return ok;
}

int
qcow2_snapshot_list(VdkNode *n, VdkSnapshotInfo **out)
{
    Qcow2 *s = n->opaque;
    g_mutex_lock(&n->lock);
    uint32_t count = s->nb_snapshots;
    VdkSnapshotInfo *l = g_new0(VdkSnapshotInfo, MAX(count, 1u));
    for (uint32_t i = 0; i < count; i++) {
        const Qcow2Snapshot *sn = &s->snapshots[i];
        l[i].id = g_strdup(sn->id);
        l[i].name = g_strdup(sn->name);
        l[i].vm_state_size = sn->vm_state_size;
        l[i].date_sec = sn->date_sec;
        l[i].date_nsec = sn->date_nsec;
        l[i].vm_clock_nsec = sn->vm_clock_nsec;
        l[i].icount = sn->has_icount ? sn->icount : UINT64_MAX;
        l[i].disk_size = sn->disk_size;
    }
    g_mutex_unlock(&n->lock);
    *out = l;
    return (int)count;
}
