/* SPDX-License-Identifier: MIT */
/*
 * qcow2-compact.c - vdk compact: move clusters from the end of the file
 * into the holes left by freed clusters, then cut the file, in place.
 *
 * Clusters with one owner move: data clusters (their L2 entry changes),
 * L2 tables (their L1 entry changes) and refcount blocks (their refcount
 * table entry changes).  Compressed clusters, the L1 and refcount tables
 * stay where they are (the file ends after the last cluster that cannot
 * move).  Images
 * with internal snapshots are refused (a cluster may have several owners).
 *
 * Crash safety, per batch of moves: the targets' refcounts are raised and
 * made durable, the contents copied and synced, the referencing entries
 * switched and made durable, then the sources' refcounts dropped.  An
 * interruption leaves the old or the new location referenced and the
 * other one leaked at worst (check -r leaks).  The guest view never
 * changes.  Control path: blocking, no I/O in flight.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "formats/qcow2/qcow2.h"

#define OWN_NONE 0
#define OWN_DATA 1  /* owner: L2 entry (l1 index, entry index) */
#define OWN_TABLE 2 /* owner: L1 entry */
#define OWN_REFBLOCK 3 /* owner: refcount table entry (in l1_idx) */
#define COMPACT_BATCH 256
#define COMPACT_MAX_CLUSTERS (1ULL << 28)

typedef struct {
    uint32_t kind;
    uint32_t l1_idx;
    uint32_t l2_idx;
} Owner;

/* Who references each cluster of the active tree (once). */
static int
build_owners(Qcow2 *s, Owner *own, uint64_t nclusters)
{
    uint32_t cb = s->cluster_bits;
    uint32_t slice = vdk_mc_slice_size(s->l2c);
    uint64_t per_slice = slice / s->l2_entry_size;
    memset(own, 0, nclusters * sizeof(Owner));
    for (uint64_t i = 0; i < s->reftable_size; i++) {
        uint64_t b = s->reftable[i] & ~QCOW2_REFT_RESERVED;
        if (b && (b >> cb) < nclusters && i <= UINT32_MAX) {
            own[b >> cb] = (Owner){OWN_REFBLOCK, (uint32_t)i, 0};
        }
    }
    for (uint64_t i = 0; i < s->l1_size; i++) {
        uint64_t t = s->l1[i] & QCOW2_OFFSET_MASK;
        if (!t) {
            continue;
        }
        if ((t >> cb) < nclusters) {
            own[t >> cb] = (Owner){OWN_TABLE, (uint32_t)i, 0};
        }
        for (uint64_t so = 0; so < s->cluster_size; so += slice) {
            int r;
            VdkMetaEntry *sl = qcow2_ctl_slice(s, t + so, &r);
            if (!sl) {
                return r ? r : -EIO;
            }
            for (uint64_t k = 0; k < per_slice; k++) {
                uint64_t e = qcow2_l2_get(s, sl->data, k, NULL);
                uint64_t h = e & QCOW2_OFFSET_MASK;
                if ((e & QCOW2_OFLAG_COMPRESSED) || !h || (h >> cb) >= nclusters) {
                    continue;
                }
                own[h >> cb] = (Owner){OWN_DATA, (uint32_t)i, (uint32_t)((so / s->l2_entry_size) + k)};
            }
        }
    }
    return 0;
}

typedef struct {
    uint64_t from, to; /* cluster indexes */
    Owner o;
} Move;

static int
run_batch(Qcow2 *s, Move *mv, int count, void *buf)
{
    VdkNode *n = s->node;
    uint32_t cb = s->cluster_bits;
    uint64_t cs = s->cluster_size;
    uint32_t slice = vdk_mc_slice_size(s->l2c);
    int r = 0;
    /* 1. the targets are taken */
    for (int i = 0; i < count && r == 0; i++) {
        r = qcow2_ctl_refcount(s, mv[i].to << cb, 1, 1);
    }
    if (r == 0) {
        r = qcow2_ctl_flush(s);
    }
    /* 2. contents copied and synced (tables from the cache: written back above) */
    for (int i = 0; i < count && r == 0; i++) {
        r = vdk_file_pread_sync(s->file, buf, cs, mv[i].from << cb);
        if (r == 0) {
            r = vdk_file_pwrite_sync(s->file, buf, cs, mv[i].to << cb);
        }
    }
    if (r == 0) {
        r = vdk_file_flush_sync(s->file);
    }
    /* 3. the references switch */
    for (int i = 0; i < count && r == 0; i++) {
        Move *m = &mv[i];
        if (m->o.kind == OWN_REFBLOCK) {
            uint64_t idx = m->o.l1_idx;
            vdk_mc_forget(s->rc, m->from << cb);
            vdk_mc_forget(s->rc, m->to << cb);
            s->reftable[idx] = m->to << cb;
            s->reftable_dirty_lo = MIN(s->reftable_dirty_lo, idx);
            s->reftable_dirty_hi = MAX(s->reftable_dirty_hi, idx + 1);
            g_hash_table_remove(s->refblocks, GSIZE_TO_POINTER(m->from));
            g_hash_table_add(s->refblocks, GSIZE_TO_POINTER(m->to));
            continue;
        }
        if (m->o.kind == OWN_TABLE) {
            for (uint64_t so = 0; so < cs; so += slice) {
                vdk_mc_forget(s->l2c, (m->from << cb) + so);
                vdk_mc_forget(s->l2c, (m->to << cb) + so); /* a table freed there long ago */
            }
            s->l1[m->o.l1_idx] = (m->to << cb) | QCOW2_OFLAG_COPIED;
            s->l1_dirty_lo = MIN(s->l1_dirty_lo, (uint64_t)m->o.l1_idx);
            s->l1_dirty_hi = MAX(s->l1_dirty_hi, (uint64_t)m->o.l1_idx + 1);
            continue;
        }
        uint64_t t = s->l1[m->o.l1_idx] & QCOW2_OFFSET_MASK;
        uint64_t byte = (uint64_t)m->o.l2_idx * s->l2_entry_size;
        VdkMetaEntry *sl = qcow2_ctl_slice(s, t + vdk_align_down(byte, slice), &r);
        if (!sl) {
            r = r ? r : -EIO;
            break;
        }
        uint64_t k = (byte % slice) / s->l2_entry_size;
        uint64_t bm;
        uint64_t e = qcow2_l2_get(s, sl->data, k, &bm);
        if ((e & QCOW2_OFFSET_MASK) != (m->from << cb)) {
            r = -EIO; /* the owner map went stale: stop, nothing is lost */
            break;
        }
        qcow2_l2_set(s, sl->data, k, (e & ~QCOW2_OFFSET_MASK) | (m->to << cb), bm);
        vdk_mc_mark_dirty(s->l2c, sl);
    }
    if (r == 0) {
        r = qcow2_ctl_flush(s);
    }
    /* 4. the sources are free */
    for (int i = 0; i < count && r == 0; i++) {
        r = qcow2_ctl_refcount(s, mv[i].from << cb, 1, -1);
    }
    if (r == 0) {
        r = qcow2_ctl_flush(s);
    }
    (void)n;
    return r;
}

bool
qcow2_compact(VdkNode *n, uint64_t *before, uint64_t *after, GError **error)
{
    Qcow2 *s = n->opaque;
    if (n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    if (s->corrupt) {
        g_set_error(error, VDK_ERROR, EIO, "qcow2: the image is marked corrupt; repair it with 'vdk check -r all' first");
        return false;
    }
    if (s->nb_snapshots) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: compacting an image with internal snapshots is not supported yet");
        return false;
    }
    if (s->crypt_method) {
        g_set_error(error, VDK_ERROR, ENOTSUP,
                    "qcow2: compacting an encrypted image is not supported (LUKS binds each sector to its host offset)");
        return false;
    }
    if (qcow2_bitmaps_block(s, "compact", error)) {
        return false; /* moving clusters would need the bitmap tables rewritten too */
    }
    uint32_t cb = s->cluster_bits;
    g_mutex_lock(&n->lock);
    int r = qcow2_ctl_flush(s);
    GError *err = NULL;
    if (r == 0 && !vdk_file_refresh_size(s->file, &err)) {
        r = -err->code;
        g_error_free(err);
    }
    *before = s->file->size;
    uint64_t nclusters = qcow2_align(s, s->file->size) >> cb;
    Owner *own = NULL;
    void *buf = NULL;
    Move *mv = g_new(Move, COMPACT_BATCH);
    if (r == 0 && nclusters > COMPACT_MAX_CLUSTERS) {
        r = -EFBIG;
    }
    if (r == 0) {
        own = g_try_new(Owner, nclusters);
        if (!own || posix_memalign(&buf, 4096, s->cluster_size) != 0) {
            r = -ENOMEM;
        }
    }
    uint64_t lo = 1, hi = nclusters;
    while (r == 0) {
        r = build_owners(s, own, nclusters);
        int count = 0;
        while (r == 0 && count < COMPACT_BATCH) {
            /* the highest cluster in use */
            uint64_t rc = 0;
            while (hi > 1) {
                r = qcow2_ctl_get_refcount(s, (hi - 1) << cb, &rc);
                if (r < 0 || rc) {
                    break;
                }
                hi--;
            }
            if (r < 0 || hi <= 1) {
                break;
            }
            uint64_t h = hi - 1;
            if (own[h].kind == OWN_NONE || rc != 1) {
                break; /* cannot move: the file ends after it */
            }
            if (own[h].kind != OWN_DATA && count > 0) {
                break; /* a table moves alone: data moves of this batch may change it */
            }
            /* the lowest free cluster below it */
            while (lo < h) {
                uint64_t rl = 1;
                r = qcow2_ctl_get_refcount(s, lo << cb, &rl);
                if (r < 0 || rl == 0) {
                    break;
                }
                lo++;
            }
            if (r < 0 || lo >= h) {
                break;
            }
            mv[count++] = (Move){h, lo, own[h]};
            lo++;
            hi--;
            if (own[h].kind != OWN_DATA) {
                break; /* tables move one per batch */
            }
        }
        if (r < 0 || count == 0) {
            break;
        }
        r = run_batch(s, mv, count, buf);
    }
    /* cut the file after the last cluster in use */
    uint64_t end = nclusters;
    while (r == 0 && end > 1) {
        uint64_t rc = 0;
        r = qcow2_ctl_get_refcount(s, (end - 1) << cb, &rc);
        if (r < 0 || rc) {
            break;
        }
        end--;
    }
    if (r == 0 && (end << cb) < s->file->size) {
        if (ftruncate(s->file->fd, (off_t)(end << cb)) != 0) {
            r = -errno;
        } else {
            s->file->size = end << cb;
            s->next_free = end << cb;
            qcow2_comp_reset(s);
            if (fsync(s->file->fd) != 0) {
                r = -errno;
            }
        }
    }
    *after = s->file->size;
    g_mutex_unlock(&n->lock);
    g_free(own);
    g_free(mv);
    free(buf);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "qcow2: compacting failed: %s (the image is consistent; leaked clusters, "
                    "if any, are reclaimed by 'vdk check -r leaks')", g_strerror(-r));
        return false;
    }
    return true;
}
