/* SPDX-License-Identifier: MIT */
/*
 * test-crashlog.c - crash consistency by replaying a write log.
 *
 * A workload of random writes, zero writes and discards with several
 * requests in flight and a flush every few requests runs against an image
 * through the fault engine in recording mode: every write, fallocate and
 * fdatasync that reaches the files is logged with its data, and so is its
 * completion; the test logs its own guest-level events (request issued,
 * completed, flush issued, completed) in the same log.
 *
 * Crash states are rebuilt from the log at every point where an fdatasync
 * completed (just before and just after it): the starting files, plus every
 * write that completed before a completed fdatasync was issued (durable),
 * plus a choice of the other writes issued by then - none, all, random
 * subsets, and all in order with the last one torn at a sector boundary.
 * Each state must open, pass the driver's check with no corruption (leaks
 * allowed) and, every few states, qemu-img check; every guest write
 * acknowledged before the last completed guest flush must read back.
 *
 * Scenarios: qcow2 (lazy_refcounts off and on, small clusters, with a raw
 * backing file), vdi, vmdk monolithicSparse.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "block/block.h"
#include "io/io.h"
#include "tests/unit/testutil.h"

#define SIZE (8u << 20)
#define OPS 160
#define DEPTH 6

enum { G_ISSUE = 0, G_DONE = 1, G_FLUSH = 2, G_FLUSH_DONE = 3 };
#define TAG(i, kind) (((uint64_t)(i) << 2) | (kind))

typedef enum { OP_WRITE, OP_ZERO, OP_DISCARD } OpKind;

typedef struct {
    OpKind kind;
    uint64_t off, len;
    uint8_t *data;
} GuestOp;

typedef struct {
    const char *name;
    const char *format;
    const char *opts; /* create options "k=v,k=v" */
    bool backing;     /* a raw backing file with a pattern */
    bool lazy;        /* refcounts are rebuilt by the first writable open */
    /* vdi: a block counted in the header but not yet in the map (the
     * header goes first so no writer reuses an index the map names) is what
     * qemu-img check calls "allocated blocks mismatch"; it is a leak in all
     * but name (`vdk check -r all` fixes it) and the format's only
     * possible order, qemu's too */
    const char *leak_like;
} Scenario;

static const Scenario scenarios[] = {
    {"qcow2", "qcow2", "cluster_size=4096", false},
    {"qcow2-lazy", "qcow2", "cluster_size=4096,lazy_refcounts=on", false, true},
    {"qcow2-backing", "qcow2", "cluster_size=65536", true},
    {"vdi", "vdi", NULL, false, false, "ERROR: allocated blocks mismatch"},
    {"vmdk", "vmdk", NULL, false},
};

typedef struct {
    char *name; /* basename */
    GByteArray *bytes;
} FileImage;

static GPtrArray *
snapshot_dir(const char *dir)
{
    GPtrArray *files = g_ptr_array_new();
    GDir *d = g_dir_open(dir, 0, NULL);
    g_assert_nonnull(d);
    const char *n;
    while ((n = g_dir_read_name(d))) {
        char *p = g_build_filename(dir, n, NULL);
        GBytes *b = test_read_file(p);
        FileImage *f = g_new0(FileImage, 1);
        f->name = g_strdup(n);
        f->bytes = g_bytes_unref_to_array(b);
        g_ptr_array_add(files, f);
        g_free(p);
    }
    g_dir_close(d);
    return files;
}

static void
files_free(GPtrArray *files)
{
    for (guint i = 0; i < files->len; i++) {
        FileImage *f = files->pdata[i];
        g_free(f->name);
        g_byte_array_unref(f->bytes);
        g_free(f);
    }
    g_ptr_array_free(files, TRUE);
}

static GByteArray *
file_of(GPtrArray *files, const char *path)
{
    char *base = g_path_get_basename(path);
    GByteArray *b = NULL;
    for (guint i = 0; i < files->len && !b; i++) {
        FileImage *f = files->pdata[i];
        if (!strcmp(f->name, base)) {
            b = f->bytes;
        }
    }
    if (!b) {
        g_error("the log names a file not in the image's directory: %s", path);
    }
    g_free(base);
    return b;
}

static void
grow(GByteArray *b, uint64_t end)
{
    if (end > b->len) {
        guint old = b->len;
        g_byte_array_set_size(b, (guint)end);
        memset(b->data + old, 0, end - old);
    }
}

/* Apply one logged write (the first @sectors 512-byte sectors of it when
 * torn, all of it when @sectors is UINT64_MAX). */
static void
apply(GPtrArray *files, const VdkRecord *r, uint64_t sectors)
{
    GByteArray *b = file_of(files, r->path);
    uint64_t len = MIN(r->len, sectors == UINT64_MAX ? r->len : sectors * 512);
    switch (r->kind) {
    case VDK_REC_WRITE:
        grow(b, r->offset + len);
        memcpy(b->data + r->offset, r->data, len);
        break;
    case VDK_REC_ZERO: {
        uint64_t end = r->offset + len;
        if (!r->keep_size) {
            grow(b, end);
        }
        end = MIN(end, (uint64_t)b->len);
        if (end > r->offset) {
            memset(b->data + r->offset, 0, end - r->offset);
        }
        break;
    }
    case VDK_REC_ALLOC:
        grow(b, r->offset + len);
        break;
    default:
        break;
    }
}

static void
write_state(GPtrArray *files, const char *dir)
{
    for (guint i = 0; i < files->len; i++) {
        FileImage *f = files->pdata[i];
        char *p = g_build_filename(dir, f->name, NULL);
        GError *err = NULL;
        if (!g_file_set_contents(p, (const char *)f->bytes->data, f->bytes->len, &err)) {
            g_error("%s: %s", p, err->message);
        }
        g_free(p);
    }
}

static GPtrArray *
files_copy(GPtrArray *src)
{
    GPtrArray *files = g_ptr_array_new();
    for (guint i = 0; i < src->len; i++) {
        FileImage *s = src->pdata[i];
        FileImage *f = g_new0(FileImage, 1);
        f->name = g_strdup(s->name);
        f->bytes = g_byte_array_sized_new(s->bytes->len);
        g_byte_array_append(f->bytes, s->bytes->data, s->bytes->len);
        g_ptr_array_add(files, f);
    }
    return files;
}

static void
create_image(const Scenario *sc, const char *dir, const char *path)
{
    GError *err = NULL;
    if (sc->backing) {
        char *bp = g_build_filename(dir, "base.raw", NULL);
        uint8_t *pat = g_malloc(SIZE);
        for (uint32_t i = 0; i < SIZE; i++) {
            pat[i] = (uint8_t)(i / 512 * 13 + 7);
        }
        g_assert_true(g_file_set_contents(bp, (const char *)pat, SIZE, NULL));
        g_free(pat);
        g_free(bp);
    }
    VdkCreateOptions *o = vdk_create_options_new(sc->format, &err);
    g_assert_no_error(err);
    g_assert_true(vdk_create_options_set(o, "size", "8M", &err));
    if (sc->opts) {
        char **kv = g_strsplit(sc->opts, ",", -1);
        for (char **p = kv; *p; p++) {
            char **pair = g_strsplit(*p, "=", 2);
            g_assert_true(vdk_create_options_set(o, pair[0], pair[1], &err));
            g_strfreev(pair);
        }
        g_strfreev(kv);
    }
    if (sc->backing) {
        g_assert_true(vdk_create_options_set(o, "backing_file", "base.raw", &err));
        g_assert_true(vdk_create_options_set(o, "backing_fmt", "raw", &err));
    }
    vdk_create_options_set_overwrite(o, true);
    if (!vdk_image_create(path, o, &err)) {
        g_error("create %s: %s", path, err->message);
    }
    vdk_create_options_free(o);
}

static VdkImage *
open_image(const Scenario *sc, const char *path, bool rw, const char *engine)
{
    VdkOpenOptions *o = vdk_open_options_new();
    vdk_open_options_set_format(o, sc->format);
    vdk_open_options_set_read_only(o, !rw);
    GError *err = NULL;
    g_assert_true(vdk_open_options_set_engine(o, engine, &err));
    g_assert_true(vdk_open_options_set_cache(o, "writeback", &err));
    if (!rw) {
        vdk_open_options_set(o, "check", "on");
    }
    VdkImage *img = vdk_image_open(path, o, &err);
    vdk_open_options_free(o);
    if (!img) {
        g_error("open %s: %s", path, err->message);
    }
    return img;
}

/* The workload; returns the guest operations (indexed as in the marks). */
static GuestOp *
run_workload(VdkImage *img, uint64_t seed)
{
    GuestOp *ops = g_new0(GuestOp, OPS);
    GError *err = NULL;
    VdkQueue *q = vdk_queue_new(img, 64, &err);
    g_assert_no_error(err);
    uint64_t st = seed;
    int inflight = 0;
    bool busy[OPS] = {false};
    VdkCompletion c[16];
    for (int i = 0; i <= OPS; i++) {
        bool flush = i == OPS || i % 8 == 7;
        GuestOp *op = i < OPS ? &ops[i] : NULL;
        if (op) {
            uint64_t k = test_rand(&st) % 10;
            op->kind = k < 7 ? OP_WRITE : k < 9 ? OP_ZERO : OP_DISCARD;
            op->len = (test_rand(&st) % 128 + 1) * 512;
            if (test_rand(&st) % 4 == 0) {
                op->len = (test_rand(&st) % 4 + 1) * 65536;
            }
            op->off = (test_rand(&st) % (SIZE / 512)) * 512;
            if (op->off + op->len > SIZE) {
                op->off = SIZE - op->len;
            }
            if (op->kind == OP_WRITE) {
                op->data = g_malloc(op->len);
                test_fill_random(op->data, op->len, &st);
            }
        }
        /* no overlapping requests in flight: wait for the earlier ones */
        for (;;) {
            bool clash = false;
            for (int j = 0; j < i && op; j++) {
                if (busy[j] && ops[j].off < op->off + op->len && op->off < ops[j].off + ops[j].len) {
                    clash = true;
                }
            }
            if (!clash && inflight < DEPTH && !(flush && inflight > 0)) {
                break;
            }
            int n = vdk_queue_wait(q, c, G_N_ELEMENTS(c), 1, -1);
            g_assert_cmpint(n, >, 0);
            for (int k = 0; k < n; k++) {
                g_assert_cmpint(c[k].result, >=, 0);
                busy[c[k].user_data] = false;
                vdk_io_record_mark(TAG(c[k].user_data, G_DONE));
                inflight--;
            }
        }
        if (flush) {
            vdk_io_record_mark(TAG(i, G_FLUSH));
            g_assert_cmpint(vdk_queue_flush(q, 1000000 + (uint64_t)i), ==, 0);
            g_assert_cmpint(vdk_queue_submit(q), >=, 0);
            int n = vdk_queue_wait(q, c, 1, 1, -1);
            g_assert_cmpint(n, ==, 1);
            g_assert_cmpint(c[0].result, ==, 0);
            vdk_io_record_mark(TAG(i, G_FLUSH_DONE));
        }
        if (!op) {
            break;
        }
        vdk_io_record_mark(TAG(i, G_ISSUE));
        int r;
        if (op->kind == OP_WRITE) {
            r = vdk_queue_write(q, op->off, op->data, op->len, 0, (uint64_t)i);
        } else if (op->kind == OP_ZERO) {
            r = vdk_queue_write_zeroes(q, op->off, op->len, 0, (uint64_t)i);
        } else {
            r = vdk_queue_discard(q, op->off, op->len, (uint64_t)i);
        }
        g_assert_cmpint(r, ==, 0);
        g_assert_cmpint(vdk_queue_submit(q), >=, 0);
        busy[i] = true;
        inflight++;
    }
    vdk_queue_free(q);
    return ops;
}

typedef struct {
    const Scenario *sc;
    GPtrArray *start;
    GPtrArray *log;
    GuestOp *ops;
    uint8_t *initial; /* guest content at the start */
    char *state_dir;
    char *state_img;
    int states, qemu_checks, leak_like;
} Replay;

/* Guest model at log position @p: expected bytes and a known mask. */
static void
model_at(Replay *rp, guint p, uint8_t *want, uint8_t *known)
{
    memcpy(want, rp->initial, SIZE);
    memset(known, 1, SIZE);
    /* the last guest flush completed before p, and where it was issued */
    guint flush_issue = 0;
    bool any_flush = false;
    guint issue_pos[OPS], done_pos[OPS];
    for (int i = 0; i < OPS; i++) {
        issue_pos[i] = done_pos[i] = G_MAXUINT;
    }
    guint last_flush_issue = 0;
    for (guint k = 0; k < p; k++) {
        const VdkRecord *r = rp->log->pdata[k];
        if (r->kind != VDK_REC_MARK) {
            continue;
        }
        uint64_t idx = r->id >> 2;
        switch (r->id & 3) {
        case G_ISSUE:
            issue_pos[idx] = k;
            break;
        case G_DONE:
            done_pos[idx] = k;
            break;
        case G_FLUSH:
            last_flush_issue = k;
            break;
        case G_FLUSH_DONE:
            flush_issue = last_flush_issue;
            any_flush = true;
            break;
        }
    }
    for (int i = 0; i < OPS; i++) {
        if (issue_pos[i] == G_MAXUINT) {
            continue;
        }
        const GuestOp *op = &rp->ops[i];
        bool durable = any_flush && done_pos[i] < flush_issue;
        if (durable && op->kind == OP_WRITE) {
            memcpy(want + op->off, op->data, op->len);
            memset(known + op->off, 1, op->len);
        } else if (durable && op->kind == OP_ZERO) {
            memset(want + op->off, 0, op->len);
            memset(known + op->off, 1, op->len);
        } else {
            memset(known + op->off, 0, op->len);
        }
    }
}

static void
check_state(Replay *rp, GPtrArray *files, guint p, const char *what)
{
    write_state(files, rp->state_dir);
    if (rp->sc->lazy) {
        /* a dirty image with lazy refcounts: the writable open repairs */
        VdkImage *w = open_image(rp->sc, rp->state_img, true, "threads");
        GError *err = NULL;
        if (!vdk_image_close(w, &err)) {
            g_error("%s: closing after the repairing open: %s", what, err->message);
        }
    }
    VdkImage *img = open_image(rp->sc, rp->state_img, false, "threads");
    VdkNode *n = img->top;
    VdkCheckResult res;
    memset(&res, 0, sizeof(res));
    res.messages = g_ptr_array_new_with_free_func(g_free);
    GError *err = NULL;
    if (!n->drv->check(n, 0, &res, &err)) {
        g_error("%s: check failed: %s", what, err->message);
    }
    bool leak_like = false;
    if (res.corruptions && rp->sc->leak_like) {
        leak_like = true;
        for (guint i = 0; i < res.messages->len; i++) {
            const char *m = res.messages->pdata[i];
            unsigned is = 0, should = 0;
            if (!g_str_has_prefix(m, rp->sc->leak_like) ||
                sscanf(m, "ERROR: allocated blocks mismatch, is %u, should be %u", &is, &should) != 2 ||
                is >= should) {
                leak_like = false;
            }
        }
        rp->leak_like += leak_like;
    }
    if (res.corruptions && !leak_like) {
        g_error("%s: %" G_GUINT64_FORMAT " corruptions: %s", what, res.corruptions,
                res.messages->len ? (char *)res.messages->pdata[0] : "");
    }
    g_ptr_array_unref(res.messages);
    uint8_t *got = g_malloc(SIZE);
    uint8_t *want = g_malloc(SIZE);
    uint8_t *known = g_malloc(SIZE);
    g_assert_cmpint(vdk_image_pread(img, got, SIZE, 0), ==, 0);
    vdk_image_close(img, NULL);
    model_at(rp, p, want, known);
    for (uint32_t i = 0; i < SIZE; i++) {
        if (known[i] && got[i] != want[i]) {
            g_error("%s: guest byte %u is 0x%02x, acknowledged and flushed as 0x%02x", what, i, got[i], want[i]);
        }
    }
    g_free(got);
    g_free(want);
    g_free(known);
    rp->states++;
    if (rp->states % 12 == 1) {
        char *qemu_img = g_find_program_in_path("qemu-img");
        if (qemu_img) {
            char *cmd = g_strdup_printf("'%s' check -q -f %s '%s' >/dev/null 2>&1", qemu_img, rp->sc->format,
                                        rp->state_img);
            int rc = test_sh(cmd);
            if (rc != 0 && rc != 3 && !(leak_like && rc == 2)) {
                g_error("%s: qemu-img check exit %d", what, rc);
            }
            rp->qemu_checks++;
            g_free(cmd);
            g_free(qemu_img);
        }
    }
}

static bool
is_data(const VdkRecord *r)
{
    return r->kind == VDK_REC_WRITE || r->kind == VDK_REC_ZERO || r->kind == VDK_REC_ALLOC;
}

/* All crash states at log position @p (records [0, p) happened). */
static void
states_at(Replay *rp, guint p, uint64_t *rng)
{
    GPtrArray *log = rp->log;
    /* position of each request's completion */
    GHashTable *done = g_hash_table_new(g_int64_hash, g_int64_equal);
    for (guint k = 0; k < p; k++) {
        VdkRecord *r = log->pdata[k];
        if (r->kind == VDK_REC_DONE) {
            g_hash_table_insert(done, &r->id, GUINT_TO_POINTER(k + 1));
        }
    }
    /* durable: completed before the issue of a sync that completed before p */
    guint barrier = 0;
    for (guint k = 0; k < p; k++) {
        VdkRecord *r = log->pdata[k];
        if (r->kind == VDK_REC_SYNC) {
            guint d = GPOINTER_TO_UINT(g_hash_table_lookup(done, &r->id));
            if (d) {
                barrier = MAX(barrier, k);
            }
        }
    }
    GArray *durable = g_array_new(FALSE, FALSE, sizeof(guint));
    GArray *maybe = g_array_new(FALSE, FALSE, sizeof(guint));
    for (guint k = 0; k < p; k++) {
        VdkRecord *r = log->pdata[k];
        if (!is_data(r)) {
            continue;
        }
        guint d = GPOINTER_TO_UINT(g_hash_table_lookup(done, &r->id));
        if (d && d - 1 < barrier) {
            g_array_append_val(durable, k);
        } else {
            g_array_append_val(maybe, k);
        }
    }
    g_hash_table_unref(done);
    /* choices of the maybe set: none, all, 3 random subsets, all with the
     * last torn */
    int variants = maybe->len ? 6 : 1;
    for (int v = 0; v < variants; v++) {
        GPtrArray *files = files_copy(rp->start);
        guint di = 0, mi = 0;
        for (guint k = 0; k < p; k++) {
            if (di < durable->len && g_array_index(durable, guint, di) == k) {
                apply(files, log->pdata[k], UINT64_MAX);
                di++;
            } else if (mi < maybe->len && g_array_index(maybe, guint, mi) == k) {
                bool take = v == 1 || v == 5 || (v >= 2 && v <= 4 && test_rand(rng) % 2);
                uint64_t sectors = UINT64_MAX;
                if (v == 5 && mi == maybe->len - 1) {
                    const VdkRecord *r = log->pdata[k];
                    uint64_t total = (r->len + 511) / 512;
                    sectors = total > 1 ? test_rand(rng) % total : 0;
                }
                if (take) {
                    apply(files, log->pdata[k], sectors);
                }
                mi++;
            }
        }
        char *what = g_strdup_printf("%s: log position %u, variant %d (%u durable, %u pending writes)", rp->sc->name,
                                     p, v, durable->len, maybe->len);
        check_state(rp, files, p, what);
        g_free(what);
        files_free(files);
    }
    g_array_free(durable, TRUE);
    g_array_free(maybe, TRUE);
}

static void
test_replay(gconstpointer data)
{
    const Scenario *sc = data;
    char *dir = test_path(sc->name);
    g_assert_cmpint(g_mkdir_with_parents(dir, 0700), ==, 0);
    char *img_name = g_strdup_printf("disk.%s", sc->format);
    char *path = g_build_filename(dir, img_name, NULL);
    create_image(sc, dir, path);

    Replay rp = {.sc = sc};
    rp.initial = g_malloc0(SIZE);
    if (sc->backing) {
        for (uint32_t i = 0; i < SIZE; i++) {
            rp.initial[i] = (uint8_t)(i / 512 * 13 + 7);
        }
    }
    VdkImage *img = open_image(sc, path, true, "fault");
    rp.start = snapshot_dir(dir);
    vdk_io_record_start();
    rp.ops = run_workload(img, 0x5eed0000u + (uint64_t)strlen(sc->name));
    GError *err = NULL;
    g_assert_true(vdk_image_close(img, &err));
    rp.log = vdk_io_record_stop();
    g_assert_nonnull(rp.log);

    rp.state_dir = g_strdup_printf("%s-state", dir);
    g_assert_cmpint(g_mkdir_with_parents(rp.state_dir, 0700), ==, 0);
    rp.state_img = g_build_filename(rp.state_dir, img_name, NULL);

    /* crash points: just before and just after each completed fdatasync */
    uint64_t rng = 77;
    int syncs = 0;
    GHashTable *sync_ids = g_hash_table_new(g_int64_hash, g_int64_equal);
    for (guint k = 0; k < rp.log->len; k++) {
        VdkRecord *r = rp.log->pdata[k];
        if (r->kind == VDK_REC_SYNC) {
            g_hash_table_add(sync_ids, &r->id);
        } else if (r->kind == VDK_REC_DONE && g_hash_table_contains(sync_ids, &r->id)) {
            syncs++;
            states_at(&rp, k, &rng);
            states_at(&rp, k + 1, &rng);
        }
    }
    states_at(&rp, rp.log->len, &rng); /* after the clean close */
    g_hash_table_unref(sync_ids);
    g_test_message("%s: %u log records, %d fdatasyncs, %d crash states checked (%d also by qemu-img check; "
                   "%d with blocks counted but not yet mapped)",
                   sc->name, rp.log->len, syncs, rp.states, rp.qemu_checks, rp.leak_like);
    g_assert_cmpint(syncs, >=, OPS / 8);
    g_assert_cmpint(rp.states, >=, syncs * 2);

    /* the final image, after the clean close, holds every write */
    GPtrArray *final = snapshot_dir(dir);
    files_free(final);
    for (int i = 0; i < OPS; i++) {
        g_free(rp.ops[i].data);
    }
    g_free(rp.ops);
    g_free(rp.initial);
    g_ptr_array_unref(rp.log);
    files_free(rp.start);
    g_free(rp.state_img);
    g_free(rp.state_dir);
    g_free(path);
    g_free(img_name);
    g_free(dir);
}

int
main(int argc, char **argv)
{
    test_init(&argc, &argv);
    for (size_t i = 0; i < G_N_ELEMENTS(scenarios); i++) {
        char *p = g_strdup_printf("/crashlog/%s", scenarios[i].name);
        g_test_add_data_func(p, &scenarios[i], test_replay);
        g_free(p);
    }
    return g_test_run();
}
