/* SPDX-License-Identifier: MIT */
/*
 * metacache.h - a cache of fixed-size metadata slices (qcow2 L2 tables and
 * refcount blocks, vmdk grain tables) shared by all queues of an image.
 *
 * Every call is made with the owner's lock held (the node lock); nothing
 * here blocks on I/O except the explicit synchronous loader used by
 * control paths (r == NULL).
 *
 * Loading: vdk_mc_get() returns a ready slice at once (O(1) hash lookup,
 * LRU touch).  On a miss with a request, it starts an asynchronous read on
 * the request's queue, parks the request on the slice and returns NULL with
 * VDK_WAIT; the read's completion marks the slice ready and resumes every
 * parked request (on its own queue's thread).
 *
 * Eviction takes the least recently used slice that is clean, not being
 * loaded or written, and has no waiters.  When every slice is dirty the
 * cache is full: vdk_mc_get() returns -ENOBUFS and the owner writes back.
 *
 * Writeback: vdk_mc_collect_dirty() snapshots the dirty slices (a copy of
 * each, in offset order) and marks them clean-while-writing; the owner
 * drops its lock and issues the writes with vdk_mc_issue_writes().  A slice
 * modified meanwhile is simply dirty again; a failed write makes it dirty
 * again so the next flush retries.
 */
#ifndef VDK_METACACHE_H
#define VDK_METACACHE_H

#include "block/block.h"

typedef struct VdkMetaCache VdkMetaCache;

typedef struct VdkMetaEntry {
    uint64_t offset; /* file offset of the slice: the key */
    void *data;      /* slice_size bytes, 4 KiB aligned */
    uint8_t state;   /* internal */
    bool dirty;
    int writing;     /* writebacks in flight */
    int pins;        /* owner holds it across I/O (vdk_mc_pin) */
    int error;       /* load error */
    VdkRequest *waiters;
    VdkQueue *load_q;
    VdkIoReq io;
    struct iovec iov;
    VdkMetaCache *cache;
    struct VdkMetaEntry *lru_prev, *lru_next;
    struct VdkMetaEntry *hnext;
} VdkMetaEntry;

typedef struct VdkMcWrite VdkMcWrite; /* one collected writeback */

/* @max_bytes bounds the memory (at least 4 slices are allowed). */
VdkMetaCache *vdk_mc_new(VdkNode *node, VdkFile *file, uint32_t slice_size, uint64_t max_bytes);
void vdk_mc_free(VdkMetaCache *c);
uint32_t vdk_mc_slice_size(const VdkMetaCache *c);
uint64_t vdk_mc_dirty_count(const VdkMetaCache *c);

/*
 * The slice at @offset (a multiple of the slice size), ready to use until
 * the lock is dropped.  On a miss: with @r, start loading, park @r, return
 * NULL and *ret = VDK_WAIT; without @r, load synchronously.  Other
 * failures: NULL and *ret = -errno (-ENOBUFS: every slice is dirty).
 */
VdkMetaEntry *vdk_mc_get(VdkMetaCache *c, uint64_t offset, VdkRequest *r, int *ret);
/* A slice that needs no reading (fresh space: zeroes), marked dirty. */
VdkMetaEntry *vdk_mc_get_fresh(VdkMetaCache *c, uint64_t offset, int *ret);
/* The slice if it is cached and ready, else NULL (no loading). */
VdkMetaEntry *vdk_mc_peek(VdkMetaCache *c, uint64_t offset);
void vdk_mc_mark_dirty(VdkMetaCache *c, VdkMetaEntry *e);
/* Keep a slice cached while the owner relies on it across I/O (an
 * allocation that will update it when its data is written). */
void vdk_mc_pin(VdkMetaEntry *e);
void vdk_mc_unpin(VdkMetaEntry *e);
/* Drop a clean, idle slice (its metadata went away). */
void vdk_mc_forget(VdkMetaCache *c, uint64_t offset);

/* Snapshot the dirty slices; returns the list (NULL if none). */
VdkMcWrite *vdk_mc_collect_dirty(VdkMetaCache *c);
/* Without the lock: write the collected slices as sub-requests of
 * @parent; frees the list. */
void vdk_mc_issue_writes(VdkMcWrite *list, VdkRequest *parent);
/* Give back a collected list without writing it: the slices are dirty again. */
void vdk_mc_cancel_writes(VdkMcWrite *list);
/* Synchronous writeback for control paths (lock held). */
int vdk_mc_write_dirty_sync(VdkMetaCache *c);

#endif
