/* SPDX-License-Identifier: MIT */
/*
 * copy.c - the copy pipeline behind `vdk convert`.
 *
 * One thread drives a queue per source and one for the target, polling all
 * their eventfds.  The sources' block status decides what to do with each
 * range:
 *   - zero/hole ranges are skipped when the target is known to read as
 *     zero (freshly created, or --target-is-zero), otherwise they become
 *     write_zeroes requests (MAY_UNMAP, so a sparse target stays sparse);
 *     with sparse_size 0 they are always written, without MAY_UNMAP, so the
 *     target ends up fully allocated (qemu-img's -S 0);
 *   - data ranges are read in chunks into slot buffers; each chunk is
 *     scanned for zero runs of at least `sparse_size` bytes, which are
 *     treated like holes, and the rest is written.
 * Up to `max_inflight` slots are busy at once.  Writes go out as soon as
 * their read finishes unless `in_order` asks for source order.  The target
 * is flushed once at the end when `flush` is set.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "block/block.h"

#define COPY_DEFAULT_CHUNK (2u << 20)
#define COPY_DEFAULT_INFLIGHT 16
/* One write_zeroes request covers at most this much. */
#define COPY_ZERO_MAX (1ULL << 30)
/* Each slot's chunk is cut into at most this many write/zero runs; a chunk
 * alternating more often than that is written whole. */
#define COPY_MAX_RUNS 64

enum { SLOT_FREE = 0, SLOT_READING, SLOT_READ_DONE, SLOT_WRITING };

typedef struct {
    int state;
    uint64_t seq;
    uint64_t dst_off;
    uint64_t len;
    int src;
    uint64_t src_off;
    bool zero_only;  /* no read: a write_zeroes of the whole range */
    void *buf;
    unsigned reads_left; /* reads in flight (several: a unit gathered from several sources) */
    bool read_failed;
    unsigned writes_left;
} Slot;

typedef struct {
    const VdkCopyParams *p;
    VdkQueue **sq;
    VdkQueue *dq;
    Slot *slots;
    unsigned nslots;
    uint64_t total;
    uint64_t done;
    uint64_t next_seq;       /* next slot sequence number to hand out */
    uint64_t next_write_seq; /* in_order: next slot allowed to write */
    /* planning cursor */
    int cur_src;
    uint64_t cur_off;        /* within cur_src */
    uint64_t cur_dst;        /* dst offset of cur_src/cur_off */
    VdkBlockStatus bs;       /* status of [cur_off, bs.offset+bs.length) */
    bool bs_valid;
    int error;
    uint64_t error_off;
    const char *error_what;
    int64_t start_ns;
    uint64_t issued_bytes;
} Copy;

static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void
copy_fail(Copy *c, int err, uint64_t off, const char *what)
{
    if (c->error == 0) {
        c->error = err;
        c->error_off = off;
        c->error_what = what;
    }
}

static void
copy_progress(Copy *c, uint64_t n)
{
    c->done += n;
    if (c->p->progress && !c->p->progress(c->p->opaque, c->done, c->total)) {
        copy_fail(c, -ECANCELED, c->done, "copy");
    }
}

/* user_data: slot index << 2 | kind */
enum { UD_READ = 0, UD_WRITE = 1, UD_ZERO = 2 };

static uint64_t
ud(unsigned slot, unsigned kind)
{
    return ((uint64_t)slot << 2) | kind;
}

static bool
copy_planning_done(Copy *c)
{
    return c->cur_src >= c->p->nsrc;
}

/* One compression unit of the target whose bytes come from the end of
 * one source and the start of the next one(s): read from each into one
 * buffer (cur_dst is unit-aligned here). */
static bool
copy_start_gather(Copy *c, unsigned idx)
{
    const VdkCopyParams *p = c->p;
    Slot *s = &c->slots[idx];
    uint64_t len = MIN(p->compress_unit, c->total - c->cur_dst);
    s->seq = c->next_seq++;
    s->dst_off = c->cur_dst;
    s->src = c->cur_src;
    s->src_off = c->cur_off;
    s->len = len;
    s->writes_left = 0;
    s->zero_only = false;
    s->reads_left = 0;
    s->read_failed = false;
    s->state = SLOT_READING;
    uint64_t pos = 0;
    while (pos < len && !copy_planning_done(c)) {
        uint64_t ssize = vdk_image_get_size(p->src[c->cur_src]);
        uint64_t piece = MIN(ssize - c->cur_off, len - pos);
        if (piece) {
            int r = vdk_queue_read(c->sq[c->cur_src], c->cur_off, (char *)s->buf + pos, (size_t)piece,
                                   ud(idx, UD_READ));
            if (r < 0) {
                copy_fail(c, r, s->dst_off + pos, "read");
                if (s->reads_left == 0) {
                    s->state = SLOT_FREE;
                }
                return false;
            }
            s->reads_left++;
        }
        pos += piece;
        c->cur_off += piece;
        c->cur_dst += piece;
        if (c->cur_off >= ssize) {
            c->cur_src++;
            c->cur_off = 0;
        }
    }
    c->bs_valid = false;
    c->issued_bytes += len;
    return true;
}

/* Fill the next free slot from the planning cursor.  Returns false when
 * nothing more can be started now (no free slot, end, error, rate limit). */
static bool
copy_start_one(Copy *c, unsigned idx)
{
    const VdkCopyParams *p = c->p;
    Slot *s = &c->slots[idx];
    uint64_t chunk = p->chunk ? p->chunk : COPY_DEFAULT_CHUNK;

    while (!copy_planning_done(c)) {
        VdkImage *src = p->src[c->cur_src];
        uint64_t ssize = vdk_image_get_size(src);
        if (c->cur_off >= ssize) {
            c->cur_src++;
            c->cur_off = 0;
            c->bs_valid = false;
            continue;
        }
        if (!c->bs_valid || c->cur_off >= c->bs.offset + c->bs.length) {
            int r = vdk_image_block_status(src, c->cur_off, ssize - c->cur_off, &c->bs);
            if (r < 0) {
                copy_fail(c, r, c->cur_dst, "block status");
                return false;
            }
            c->bs_valid = true;
        }
        uint64_t avail = c->bs.offset + c->bs.length - c->cur_off;
        bool is_zero = (c->bs.flags & VDK_BS_ZERO) && !(c->bs.flags & VDK_BS_DATA);
        uint64_t unit = p->compress_unit;
        if (unit) {
            /* compressing: whole units of the target from unit boundaries
             * (cur_dst stays aligned; a source may start anywhere in a
             * unit when several are concatenated); a unit with any data is
             * read whole (its holes read as zeroes) */
            uint64_t base = c->cur_dst - c->cur_off; /* the source's start in the target */
            uint64_t d_bs_end = base + c->bs.offset + c->bs.length;
            uint64_t d_send = base + ssize;
            if (is_zero && vdk_align_down(d_bs_end, unit) > c->cur_dst) {
                avail = vdk_align_down(d_bs_end, unit) - c->cur_dst;
            } else {
                uint64_t d_end = MIN(vdk_align_up(d_bs_end, unit), vdk_align_up(d_send, unit));
                is_zero = false;
                if (d_end > d_send && c->cur_src + 1 < p->nsrc) {
                    if (vdk_align_down(d_send, unit) > c->cur_dst) {
                        avail = vdk_align_down(d_send, unit) - c->cur_dst; /* the whole units first */
                    } else {
                        return copy_start_gather(c, idx); /* a unit across sources */
                    }
                } else {
                    avail = MIN(d_end, d_send) - c->cur_dst;
                }
            }
        }
        /* sparse_size 0 asks for a fully allocated target: zero ranges are
         * written (allocating) even into a target that reads as zero. */
        if (is_zero && p->target_is_zero && p->sparse_size) {
            c->cur_off += avail;
            c->cur_dst += avail;
            copy_progress(c, avail);
            continue;
        }
        s->seq = c->next_seq++;
        s->dst_off = c->cur_dst;
        s->src = c->cur_src;
        s->src_off = c->cur_off;
        s->writes_left = 0;
        if (is_zero) {
            s->len = MIN(avail, (uint64_t)COPY_ZERO_MAX);
            s->zero_only = true;
            s->state = SLOT_READ_DONE;
        } else {
            s->len = MIN(avail, chunk);
            s->zero_only = false;
            int r = vdk_queue_read(c->sq[s->src], s->src_off, s->buf, (size_t)s->len, ud(idx, UD_READ));
            if (r < 0) {
                copy_fail(c, r, s->dst_off, "read");
                return false;
            }
            s->reads_left = 1;
            s->read_failed = false;
            s->state = SLOT_READING;
            c->issued_bytes += s->len;
        }
        c->cur_off += s->len;
        c->cur_dst += s->len;
        return true;
    }
    return false;
}

/* Issue the writes of a slot whose data is in memory. */
static void
copy_issue_writes(Copy *c, unsigned idx)
{
    const VdkCopyParams *p = c->p;
    Slot *s = &c->slots[idx];
    unsigned zflags = p->sparse_size ? VDK_REQ_MAY_UNMAP : 0;
    s->state = SLOT_WRITING;

    if (s->zero_only) {
        int r = vdk_queue_write_zeroes(c->dq, s->dst_off, s->len, zflags, ud(idx, UD_ZERO));
        if (r < 0) {
            copy_fail(c, r, s->dst_off, "write zeroes");
            s->state = SLOT_FREE;
            return;
        }
        s->writes_left = 1;
        return;
    }

    /* Cut the chunk into data and zero runs on sparse_size granules
     * aligned to the target offset (whole compression units with -c). */
    uint64_t g = p->compress_unit ? p->compress_unit : p->sparse_size;
    struct { uint64_t off, len; bool zero; } runs[COPY_MAX_RUNS];
    unsigned nruns = 0;
    if (g == 0) {
        runs[0].off = 0;
        runs[0].len = s->len;
        runs[0].zero = false;
        nruns = 1;
    } else {
        uint64_t pos = 0;
        while (pos < s->len) {
            uint64_t abs = s->dst_off + pos;
            uint64_t gend = MIN(vdk_align_down(abs, g) + g - s->dst_off, s->len);
            bool z = vdk_buffer_is_zero((char *)s->buf + pos, (size_t)(gend - pos));
            if (nruns > 0 && runs[nruns - 1].zero == z) {
                runs[nruns - 1].len += gend - pos;
            } else if (nruns == COPY_MAX_RUNS) {
                /* Too fragmented: the rest is written as data. */
                runs[nruns - 1].len = s->len - runs[nruns - 1].off;
                runs[nruns - 1].zero = false;
                break;
            } else {
                runs[nruns].off = pos;
                runs[nruns].len = gend - pos;
                runs[nruns].zero = z;
                nruns++;
            }
            pos = gend;
        }
    }
    s->writes_left = 0;
    for (unsigned i = 0; i < nruns; i++) {
        int r;
        if (runs[i].zero) {
            if (p->target_is_zero) {
                continue; /* sparse_size != 0 here: zero runs exist only then */
            }
            r = vdk_queue_write_zeroes(c->dq, s->dst_off + runs[i].off, runs[i].len, zflags, ud(idx, UD_ZERO));
        } else {
            r = vdk_queue_write(c->dq, s->dst_off + runs[i].off, (char *)s->buf + runs[i].off,
                                (size_t)runs[i].len, p->compress_unit ? VDK_REQ_COMPRESS : 0, ud(idx, UD_WRITE));
        }
        if (r < 0) {
            copy_fail(c, r, s->dst_off + runs[i].off, "write");
            break;
        }
        s->writes_left++;
    }
    if (s->writes_left == 0) {
        copy_progress(c, s->len);
        s->state = SLOT_FREE;
    }
}

/* in_order: release read-complete slots strictly by sequence number. */
static void
copy_release_writes(Copy *c)
{
    bool progress = true;
    while (progress) {
        progress = false;
        for (unsigned i = 0; i < c->nslots; i++) {
            Slot *s = &c->slots[i];
            if (s->state != SLOT_READ_DONE) {
                continue;
            }
            if (c->p->in_order && s->seq != c->next_write_seq) {
                continue;
            }
            if (s->seq == c->next_write_seq) {
                c->next_write_seq++;
            }
            copy_issue_writes(c, i);
            progress = true;
        }
    }
}

static bool
copy_busy(Copy *c)
{
    for (unsigned i = 0; i < c->nslots; i++) {
        if (c->slots[i].state != SLOT_FREE) {
            return true;
        }
    }
    return false;
}

/* How long to wait before starting more reads to respect the rate limit
 * (ms), or 0. */
static int
copy_rate_delay(Copy *c)
{
    if (!c->p->rate_limit) {
        return 0;
    }
    int64_t due = c->start_ns + (int64_t)((double)c->issued_bytes * 1e9 / (double)c->p->rate_limit);
    int64_t now = now_ns();
    if (due <= now) {
        return 0;
    }
    return (int)MAX(1, (due - now) / 1000000);
}

static void
copy_handle(Copy *c, const VdkCompletion *cp, bool from_src)
{
    unsigned idx = (unsigned)(cp->user_data >> 2);
    unsigned kind = (unsigned)(cp->user_data & 3);
    Slot *s = &c->slots[idx];
    if (from_src) {
        if (cp->result < 0) {
            copy_fail(c, (int)cp->result, s->dst_off, "read");
            s->read_failed = true;
        }
        g_assert(s->reads_left > 0);
        if (--s->reads_left == 0) {
            s->state = s->read_failed ? SLOT_FREE : SLOT_READ_DONE;
        }
        return;
    }
    if (cp->result < 0) {
        copy_fail(c, (int)cp->result, s->dst_off, kind == UD_ZERO ? "write zeroes" : "write");
    }
    g_assert(s->writes_left > 0);
    if (--s->writes_left == 0) {
        copy_progress(c, s->len);
        s->state = SLOT_FREE;
    }
}

bool
vdk_copy(VdkCopyParams *p, GError **error)
{
    Copy c;
    memset(&c, 0, sizeof(c));
    c.p = p;
    for (int i = 0; i < p->nsrc; i++) {
        c.total += vdk_image_get_size(p->src[i]);
    }
    if (c.total > vdk_image_get_size(p->dst)) {
        g_set_error(error, VDK_ERROR, ENOSPC,
                    "the target (%" PRIu64 " bytes) is smaller than the source (%" PRIu64 " bytes)",
                    vdk_image_get_size(p->dst), c.total);
        return false;
    }
    int off = vdk_copy_offload(p, &p->offload_used, error);
    if (off != 0) {
        return off > 0;
    }
    uint64_t chunk = p->chunk ? p->chunk : COPY_DEFAULT_CHUNK;
    c.nslots = p->max_inflight ? p->max_inflight : COPY_DEFAULT_INFLIGHT;
    c.slots = g_new0(Slot, c.nslots);
    c.sq = g_new0(VdkQueue *, (gsize)p->nsrc);
    bool ok = false;
    unsigned qdepth = c.nslots * (COPY_MAX_RUNS + 1);

    for (unsigned i = 0; i < c.nslots; i++) {
        if (posix_memalign(&c.slots[i].buf, 4096, (size_t)chunk) != 0) {
            g_set_error(error, VDK_ERROR, ENOMEM, "cannot allocate copy buffers (%u x %" PRIu64 " bytes)",
                        c.nslots, chunk);
            goto out;
        }
    }
    for (int i = 0; i < p->nsrc; i++) {
        c.sq[i] = vdk_queue_new(p->src[i], c.nslots, error);
        if (!c.sq[i]) {
            goto out;
        }
    }
    c.dq = vdk_queue_new(p->dst, MIN(qdepth, 4096u), error);
    if (!c.dq) {
        goto out;
    }

    c.start_ns = now_ns();
    struct pollfd *pfds = g_new0(struct pollfd, (gsize)p->nsrc + 1);
    for (;;) {
        /* Start reads into free slots. */
        bool started = false;
        int delay = 0;
        if (c.error == 0) {
            for (unsigned i = 0; i < c.nslots; i++) {
                if (c.slots[i].state != SLOT_FREE) {
                    continue;
                }
                delay = copy_rate_delay(&c);
                if (delay > 0) {
                    break;
                }
                if (!copy_start_one(&c, i)) {
                    break;
                }
                started = true;
            }
        }
        if (started) {
            for (int i = 0; i < p->nsrc; i++) {
                vdk_queue_submit(c.sq[i]);
            }
        }
        if (c.error == 0) {
            copy_release_writes(&c);
        }
        vdk_queue_submit(c.dq);
        if (c.error) {
            /* Stop planning; drain what is in flight.  Slots whose read
             * finished (or that never needed one) are dropped: nothing
             * would ever complete them. */
            for (unsigned i = 0; i < c.nslots; i++) {
                if (c.slots[i].state == SLOT_READ_DONE) {
                    c.slots[i].state = SLOT_FREE;
                }
            }
        }

        if (!copy_busy(&c)) {
            if (c.error || copy_planning_done(&c)) {
                break;
            }
            if (delay > 0) {
                poll(NULL, 0, delay);
            }
            continue;
        }

        for (int i = 0; i < p->nsrc; i++) {
            pfds[i].fd = vdk_queue_get_fd(c.sq[i]);
            pfds[i].events = POLLIN;
            pfds[i].revents = 0;
        }
        pfds[p->nsrc].fd = vdk_queue_get_fd(c.dq);
        pfds[p->nsrc].events = POLLIN;
        pfds[p->nsrc].revents = 0;
        int pr = poll(pfds, (nfds_t)p->nsrc + 1, delay > 0 ? delay : -1);
        if (pr < 0 && errno != EINTR) {
            copy_fail(&c, -errno, 0, "poll");
        }
        VdkCompletion cps[64];
        for (int i = 0; i < p->nsrc; i++) {
            int n;
            while ((n = vdk_queue_reap(c.sq[i], cps, G_N_ELEMENTS(cps))) > 0) {
                for (int k = 0; k < n; k++) {
                    copy_handle(&c, &cps[k], true);
                }
            }
        }
        int n;
        while ((n = vdk_queue_reap(c.dq, cps, G_N_ELEMENTS(cps))) > 0) {
            for (int k = 0; k < n; k++) {
                copy_handle(&c, &cps[k], false);
            }
        }
    }
    g_free(pfds);

    if (c.error == 0 && p->flush) {
        int r = vdk_image_flush(p->dst);
        if (r < 0) {
            copy_fail(&c, r, 0, "flush");
        }
    }
    if (c.error) {
        g_set_error(error, VDK_ERROR, -c.error, "%s failed at offset %" PRIu64 ": %s", c.error_what,
                    c.error_off, g_strerror(-c.error));
        goto out;
    }
    ok = true;
out:
    if (c.dq) {
        vdk_queue_free(c.dq);
    }
    for (int i = 0; i < p->nsrc; i++) {
        if (c.sq[i]) {
            vdk_queue_free(c.sq[i]);
        }
    }
    for (unsigned i = 0; i < c.nslots; i++) {
        free(c.slots[i].buf);
    }
    g_free(c.slots);
    g_free(c.sq);
    return ok;
}
