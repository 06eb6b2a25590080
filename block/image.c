/* SPDX-License-Identifier: MIT */
/*
 * image.c - opening and closing images: options, format probing, the node
 * chain, getters and resize.
 *
 * Probing reads the first 512 bytes and asks every driver for a score; raw
 * accepts anything with the lowest score, so it only wins when nothing else
 * does.  A writable open that probed raw is allowed, as in qemu, but writes
 * that would turn sector 0 into another format's header are refused
 * (queue.c) and a warning is logged.
 */
#include "config.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

#include "block/block.h"

/* ------------------------------------------------------------------------ */
/* Options                                                                   */
/* ------------------------------------------------------------------------ */

VdkOpenOptions *
vdk_open_options_new(void)
{
    VdkOpenOptions *o = g_new0(VdkOpenOptions, 1);
    o->cache = VDK_CACHE_WRITEBACK;
    o->extra = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
    return o;
}

void
vdk_open_options_free(VdkOpenOptions *o)
{
    if (!o) {
        return;
    }
    g_free(o->format);
    g_free(o->engine);
    g_free(o->bad_locking);
    g_hash_table_unref(o->extra);
    if (o->secrets) {
        g_hash_table_unref(o->secrets);
    }
    g_free(o);
}

static GHashTable *
secrets_table(GHashTable **t)
{
    if (!*t) {
        *t = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, (GDestroyNotify)g_bytes_unref);
    }
    return *t;
}

void
vdk_open_options_set_secret(VdkOpenOptions *o, const char *id, const void *data, size_t len)
{
    g_hash_table_replace(secrets_table(&o->secrets), g_strdup(id), g_bytes_new(data, len));
}

void
vdk_create_options_set_secret(VdkCreateOptions *o, const char *id, const void *data, size_t len)
{
    g_hash_table_replace(secrets_table(&o->secrets), g_strdup(id), g_bytes_new(data, len));
}

GBytes *
vdk_secret_lookup(GHashTable *secrets, const char *id)
{
    return secrets && id ? g_hash_table_lookup(secrets, id) : NULL;
}

void
vdk_open_options_set_format(VdkOpenOptions *o, const char *format)
{
    g_free(o->format);
    o->format = g_strdup(format);
}

void
vdk_open_options_set_read_only(VdkOpenOptions *o, bool read_only)
{
    o->read_only = read_only;
}

bool
vdk_open_options_set_cache(VdkOpenOptions *o, const char *mode, GError **error)
{
    return vdk_cache_mode_parse(mode, &o->cache, error);
}

bool
vdk_open_options_set_engine(VdkOpenOptions *o, const char *engine, GError **error)
{
    if (strcmp(engine, "auto") != 0 && strcmp(engine, "io_uring") != 0 && strcmp(engine, "native") != 0 &&
        strcmp(engine, "threads") != 0 && strcmp(engine, "fault") != 0) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "invalid aio engine '%s' (expected io_uring, native, threads or auto)", engine);
        return false;
    }
    g_free(o->engine);
    o->engine = strcmp(engine, "auto") == 0 ? NULL : g_strdup(engine);
    return true;
}

void
vdk_open_options_set_force_share(VdkOpenOptions *o, bool force_share)
{
    o->force_share = force_share;
}

void
vdk_open_options_set_locking(VdkOpenOptions *o, VdkLocking locking)
{
    g_clear_pointer(&o->bad_locking, g_free);
    o->locking = locking;
}

void
vdk_open_options_set(VdkOpenOptions *o, const char *key, const char *value)
{
    if (strcmp(key, "repair") == 0) {
        /* for every format: check -r may open a corrupt image read-write */
        o->repair = strcmp(value, "off") != 0;
        return;
    }
    if (strcmp(key, "check") == 0) {
        o->check = strcmp(value, "off") != 0;
        return;
    }
    if (strcmp(key, "force-share") == 0) {
        o->force_share = strcmp(value, "off") != 0;
        return;
    }
    if (strcmp(key, "rebase.force-share") == 0) {
        o->rebase_force_share = strcmp(value, "off") != 0;
        return;
    }
    if (strcmp(key, "locking") == 0 || strcmp(key, "file.locking") == 0) {
        g_clear_pointer(&o->bad_locking, g_free);
        if (strcmp(value, "off") == 0) {
            o->locking = VDK_LOCKING_OFF;
        } else if (strcmp(value, "on") == 0) {
            o->locking = VDK_LOCKING_ON;
        } else if (strcmp(value, "auto") == 0) {
            o->locking = VDK_LOCKING_AUTO;
        } else {
            o->bad_locking = g_strdup(value);
        }
        return;
    }
    if (strcmp(key, "no-io") == 0) {
        o->no_io = strcmp(value, "off") != 0;
        return;
    }
    g_hash_table_replace(o->extra, g_strdup(key), g_strdup(value));
}

/* ------------------------------------------------------------------------ */
/* Formats                                                                   */
/* ------------------------------------------------------------------------ */

const VdkFormat *const vdk_formats[] = {
    &vdk_format_qcow2,
    &vdk_format_vdi,
    &vdk_format_qcow,
    &vdk_format_vmdk,
    &vdk_format_raw,
};
const size_t vdk_formats_count = G_N_ELEMENTS(vdk_formats);

const VdkFormat *
vdk_format_find(const char *name)
{
    for (size_t i = 0; i < vdk_formats_count; i++) {
        if (strcmp(vdk_formats[i]->name, name) == 0) {
            return vdk_formats[i];
        }
    }
    return NULL;
}

const VdkFormat *
vdk_probe_format(const uint8_t *buf, size_t len, const char *filename)
{
    const VdkFormat *best = NULL;
    int best_score = 0;
    for (size_t i = 0; i < vdk_formats_count; i++) {
        if (!vdk_formats[i]->probe) {
            continue;
        }
        int s = vdk_formats[i]->probe(buf, len, filename);
        if (s > best_score) {
            best_score = s;
            best = vdk_formats[i];
        }
    }
    return best;
}

void
vdk_info_clear(VdkInfo *info)
{
    g_free(info->backing_filename);
    g_free(info->backing_format);
    if (info->specific_json) {
        g_string_free(info->specific_json, TRUE);
    }
    if (info->specific_lines) {
        g_ptr_array_unref(info->specific_lines);
    }
    memset(info, 0, sizeof(*info));
}

/* ------------------------------------------------------------------------ */
/* Nodes                                                                     */
/* ------------------------------------------------------------------------ */

static void
node_free(VdkNode *n)
{
    if (!n) {
        return;
    }
    vdk_file_close(n->file);
    g_mutex_clear(&n->lock);
    g_free(n->filename);
    g_free(n->backing_name);
    g_free(n->backing_fmt);
    g_free(n);
}

/* Files already in the chain (device, inode): a backing file that leads
 * back into the chain is a loop. */
typedef struct {
    dev_t dev[VDK_MAX_CHAIN_DEPTH + 1];
    ino_t ino[VDK_MAX_CHAIN_DEPTH + 1];
    int n;
} ChainSeen;

static VdkNode *node_open(VdkImage *img, const char *filename, const char *format, bool read_only, int depth,
                          ChainSeen *seen, GError **error);
static bool chain_close(VdkNode *n, GError **error);

/* Where a recorded backing name points: absolute names as they are,
 * relative ones against the directory of the image that names them. */
char *
vdk_backing_path(const char *image, const char *backing_name)
{
    if (g_path_is_absolute(backing_name)) {
        return g_strdup(backing_name);
    }
    /* Joined textually to the overlay's directory, as qemu does (so the
     * names shown by info are the same: "mid.qcow2", "dir/mid.qcow2"). */
    const char *slash = strrchr(image, '/');
    if (!slash) {
        return g_strdup(backing_name);
    }
    return g_strdup_printf("%.*s%s", (int)(slash - image + 1), image, backing_name);
}

static char *
backing_path(const VdkNode *n)
{
    return vdk_backing_path(n->filename, n->backing_name);
}

static bool
node_open_backing(VdkImage *img, VdkNode *n, ChainSeen *seen, GError **error)
{
    if (n->depth + 1 > VDK_MAX_CHAIN_DEPTH) {
        g_set_error(error, VDK_ERROR, ELOOP, "backing chain is longer than %d images", VDK_MAX_CHAIN_DEPTH);
        return false;
    }
    if (strncmp(n->backing_name, "json:", 5) == 0 || strstr(n->backing_name, "://")) {
        g_set_error(error, VDK_ERROR, EINVAL, "backing file '%s': protocol and json: names are not supported",
                    n->backing_name);
        return false;
    }
    char *path = backing_path(n);
    GError *err = NULL;
    VdkNode *b = node_open(img, path, n->backing_fmt, true, n->depth + 1, seen, &err);
    if (!b) {
        g_set_error(error, VDK_ERROR, err->code, "cannot open backing file '%s': %s", path, err->message);
        g_error_free(err);
        g_free(path);
        return false;
    }
    g_free(path);
    n->backing = b;
    return true;
}

static VdkNode *
node_open(VdkImage *img, const char *filename, const char *format, bool read_only, int depth, ChainSeen *seen,
          GError **error)
{
    VdkNode *n = g_new0(VdkNode, 1);
    g_mutex_init(&n->lock);
    n->img = img;
    n->filename = g_strdup(filename);
    n->read_only = read_only;
    n->depth = depth;

    n->file = vdk_file_open(filename, read_only, img->opts.cache, error);
    if (!n->file) {
        node_free(n);
        return NULL;
    }
    struct stat st;
    if (fstat(n->file->fd, &st) == 0) {
        for (int i = 0; i < seen->n; i++) {
            if (seen->dev[i] == st.st_dev && seen->ino[i] == st.st_ino) {
                g_set_error(error, VDK_ERROR, ELOOP, "backing chain loops back to '%s'", filename);
                node_free(n);
                return NULL;
            }
        }
        if (seen->n < (int)G_N_ELEMENTS(seen->dev)) {
            seen->dev[seen->n] = st.st_dev;
            seen->ino[seen->n] = st.st_ino;
            seen->n++;
        }
    }

    if (format) {
        n->drv = vdk_format_find(format);
        if (!n->drv) {
            g_set_error(error, VDK_ERROR, EINVAL, "unknown format '%s'", format);
            node_free(n);
            return NULL;
        }
    } else {
        uint8_t buf[512];
        int r = vdk_file_pread_sync(n->file, buf, sizeof(buf), 0);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "cannot read the image header: %s", g_strerror(-r));
            node_free(n);
            return NULL;
        }
        n->drv = vdk_probe_format(buf, sizeof(buf), filename);
        if (!n->drv) {
            g_set_error(error, VDK_ERROR, EINVAL, "could not determine the image format");
            node_free(n);
            return NULL;
        }
        const char *foreign = n->drv == &vdk_format_raw ? vdk_probe_foreign(buf, sizeof(buf)) : NULL;
        if (foreign) {
            g_set_error(error, VDK_ERROR, ENOTSUP,
                        "this is a %s image, a format this build of vdk cannot open yet (use -f raw to access "
                        "its bytes as a raw disk)",
                        foreign);
            node_free(n);
            return NULL;
        }
        if (n->drv == &vdk_format_raw && !read_only) {
            n->probed_raw = true;
            memcpy(n->sector0, buf, sizeof(n->sector0));
            g_log("vdk", G_LOG_LEVEL_WARNING,
                  "Image format was not specified for '%s' and probing guessed raw. "
                  "Automatically detecting the format is dangerous for raw images, write operations on "
                  "block 0 will be restricted. Specify the 'raw' format explicitly to remove the restrictions.",
                  filename);
        }
    }

    /* locked once the format is known (a raw reader shares writes, as in qemu) */
    if (vdk_open_options_locks(&img->opts) &&
        !vdk_file_lock(n->file, !read_only, !read_only || n->drv != &vdk_format_raw ? VDK_LOCK_META : 0,
                       img->opts.locking == VDK_LOCKING_ON, error)) {
        node_free(n);
        return NULL;
    }
    if (!n->drv->open(n, error)) {
        node_free(n);
        return NULL;
    }
    if (n->backing_name && !node_open_backing(img, n, seen, error)) {
        chain_close(n, NULL);
        return NULL;
    }
    return n;
}

static bool
node_close(VdkNode *n, GError **error)
{
    bool ok = true;
    if (n->drv && n->drv->close) {
        ok = n->drv->close(n, error);
    }
    node_free(n);
    return ok;
}

/* Close a node and everything below it. */
static bool
chain_close(VdkNode *n, GError **error)
{
    bool ok = true;
    while (n) {
        VdkNode *next = n->backing;
        GError *err = NULL;
        if (!node_close(n, &err)) {
            if (ok) {
                g_propagate_error(error, err);
            } else {
                g_clear_error(&err);
            }
            ok = false;
        }
        n = next;
    }
    return ok;
}

/* ------------------------------------------------------------------------ */
/* Images                                                                    */
/* ------------------------------------------------------------------------ */

static bool
image_check_options(VdkImage *img, GError **error)
{
    GHashTableIter it;
    gpointer key;
    g_hash_table_iter_init(&it, img->opts.extra);
    while (g_hash_table_iter_next(&it, &key, NULL)) {
        bool known = false;
        if (g_str_has_prefix(key, "snapshot") && !img->top->drv->snapshot_list) {
            g_set_error(error, VDK_ERROR, ENOTSUP, "Failed to load snapshot: %s images have no internal snapshots",
                        img->top->drv->name);
            return false;
        }
        const VdkOptionDesc *d = img->top->drv->open_opts;
        for (; d && d->name; d++) {
            if (strcmp(d->name, key) == 0) {
                known = true;
                break;
            }
        }
        if (!known) {
            g_set_error(error, VDK_ERROR, EINVAL, "%s: unknown open option '%s'", img->top->drv->name,
                        (const char *)key);
            return false;
        }
    }
    return true;
}

VdkImage *
vdk_image_open(const char *filename, const VdkOpenOptions *opts, GError **error)
{
    VdkOpenOptions *defaults = NULL;
    if (!opts) {
        defaults = vdk_open_options_new();
        opts = defaults;
    }
    VdkImage *img = g_new0(VdkImage, 1);
    g_mutex_init(&img->sync_lock);
    img->opts.format = g_strdup(opts->format);
    img->opts.read_only = opts->read_only;
    img->opts.cache = opts->cache;
    img->opts.engine = g_strdup(opts->engine);
    img->opts.repair = opts->repair;
    img->opts.check = opts->check;
    img->opts.force_share = opts->force_share;
    img->opts.locking = opts->locking;
    img->opts.rebase_force_share = opts->rebase_force_share;
    img->opts.extra = g_hash_table_ref(opts->extra);
    img->opts.no_io = opts->no_io;
    img->opts.secrets = opts->secrets ? g_hash_table_ref(opts->secrets) : NULL;
    if (opts->bad_locking) {
        g_set_error(error, VDK_ERROR, EINVAL, "invalid locking value '%s' (expected on, off or auto)",
                    opts->bad_locking);
        vdk_open_options_free(defaults);
        vdk_image_close(img, NULL);
        return NULL;
    }
    if (img->opts.force_share && !img->opts.read_only) {
        g_set_error(error, VDK_ERROR, EINVAL, "force-share=on can only be used with read-only images");
        vdk_image_close(img, NULL);
        return NULL;
    }
    vdk_open_options_free(defaults);

    img->engine = vdk_io_engine_select(img->opts.engine, &img->engine_reason, error);
    if (!img->engine) {
        vdk_image_close(img, NULL);
        return NULL;
    }
    if (img->engine_reason) {
        g_log("vdk", G_LOG_LEVEL_DEBUG, "aio=auto: %s", img->engine_reason);
    }

    ChainSeen seen = {.n = 0};
    img->top = node_open(img, filename, img->opts.format, img->opts.read_only, 0, &seen, error);
    if (!img->top) {
        vdk_image_close(img, NULL);
        return NULL;
    }
    if (!image_check_options(img, error)) {
        vdk_image_close(img, NULL);
        return NULL;
    }
    return img;
}

bool
vdk_image_check(VdkImage *img, unsigned fix, VdkCheckReport *out, GError **error)
{
    memset(out, 0, sizeof(*out));
    VdkNode *n = img->top;
    if (!n->drv->check) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "%s: this image format does not support checks", n->drv->name);
        return false;
    }
    if (fix && n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "a repair needs the image opened read-write");
        return false;
    }
    /* the check reads the metadata on disk: what the caches hold of a
     * writable image goes there first (else the check would report the
     * difference as corruption) */
    if (!n->read_only) {
        int r = vdk_image_flush(img);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "cannot write back the metadata before the check: %s",
                        g_strerror(-r));
            return false;
        }
    }
    VdkCheckResult res;
    memset(&res, 0, sizeof(res));
    res.messages = g_ptr_array_new_with_free_func(g_free);
    bool ok = n->drv->check(n, (int)fix, &res, error);
    out->corruptions = res.corruptions;
    out->leaks = res.leaks;
    out->check_errors = res.check_errors;
    out->corruptions_fixed = res.corruptions_fixed;
    out->leaks_fixed = res.leaks_fixed;
    out->has_stats = res.has_stats;
    out->image_end_offset = res.image_end_offset;
    out->total_clusters = res.total_clusters;
    out->allocated_clusters = res.allocated_clusters;
    out->fragmented_clusters = res.fragmented_clusters;
    out->compressed_clusters = res.compressed_clusters;
    g_ptr_array_add(res.messages, NULL);
    out->messages = (char **)g_ptr_array_free(res.messages, FALSE);
    return ok;
}

void
vdk_check_report_clear(VdkCheckReport *report)
{
    if (report) {
        g_strfreev(report->messages);
        memset(report, 0, sizeof(*report));
    }
}

bool
vdk_image_close(VdkImage *img, GError **error)
{
    if (!img) {
        return true;
    }
    bool ok = true;
    int live = g_atomic_int_get(&img->queues) - (img->sync_q ? 1 : 0);
    if (live != 0) {
        g_log("vdk", G_LOG_LEVEL_CRITICAL, "vdk_image_close: %d queue(s) still open", live);
    }
    for (VdkNode *x = img->top; x; x = x->backing) {
        if (!x->read_only && x->drv && x->drv->before_close) {
            GError *e = NULL;
            if (!x->drv->before_close(x, &e)) {
                if (ok) {
                    g_propagate_error(error, e);
                } else {
                    g_error_free(e);
                }
                ok = false;
            }
        }
    }
    if (img->top && !img->top->read_only) {
        /* Write back what the format keeps in memory (a clean close). */
        int r = vdk_image_sync_request(img, VDK_OP_FLUSH, 0, NULL, 0, VDK_FLUSH_FINAL, NULL);
        if (r < 0) {
            if (ok) {
                g_set_error(error, VDK_ERROR, -r, "writing back metadata on close failed: %s", g_strerror(-r));
            }
            ok = false;
        }
    }
    if (img->sync_q) {
        vdk_queue_free(img->sync_q);
        img->sync_q = NULL;
    }
    GError *err = NULL;
    if (!chain_close(img->top, ok ? error : &err)) {
        ok = false;
    }
    g_clear_error(&err);
    g_free(img->opts.format);
    g_free(img->opts.engine);
    if (img->opts.extra) {
        g_hash_table_unref(img->opts.extra);
    }
    if (img->opts.secrets) {
        g_hash_table_unref(img->opts.secrets);
    }
    g_free(img->engine_reason);
    g_mutex_clear(&img->sync_lock);
    g_free(img);
    return ok;
}

uint64_t
vdk_image_get_size(VdkImage *img)
{
    return img->top->size;
}

const char *
vdk_image_get_format(VdkImage *img)
{
    return img->top->drv->name;
}

const char *
vdk_image_get_filename(VdkImage *img)
{
    return img->top->filename;
}

const char *
vdk_image_get_engine(VdkImage *img)
{
    return img->engine->name;
}

const char *
vdk_image_get_cache(VdkImage *img)
{
    return vdk_cache_mode_name(img->opts.cache);
}

bool
vdk_image_is_read_only(VdkImage *img)
{
    return img->top->read_only;
}

uint64_t
vdk_image_get_actual_size(VdkImage *img)
{
    return vdk_file_allocated_bytes(img->top->file);
}

int
vdk_image_get_chain_length(VdkImage *img)
{
    int n = 0;
    for (VdkNode *x = img->top; x; x = x->backing) {
        n++;
    }
    return n;
}

const char *
vdk_image_get_layer_filename(VdkImage *img, int depth)
{
    VdkNode *x = img->top;
    while (x && depth-- > 0) {
        x = x->backing;
    }
    return x ? x->filename : NULL;
}

bool
vdk_image_resize(VdkImage *img, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error)
{
    VdkNode *n = img->top;
    if (n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    if (size < n->size && !shrink) {
        g_set_error(error, VDK_ERROR, EINVAL, "Use the --shrink option to perform a shrink operation.");
        return false;
    }
    if (!n->drv->truncate) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "%s: this format does not support resizing", n->drv->name);
        return false;
    }
    if (size == n->size) {
        return true;
    }
    return n->drv->truncate(n, size, shrink, prealloc, error);
}

/* ------------------------------------------------------------------------ */
/* Internal snapshots                                                        */
/* ------------------------------------------------------------------------ */

int
vdk_image_snapshot_list(VdkImage *img, VdkSnapshotInfo **out, GError **error)
{
    (void)error;
    *out = NULL;
    VdkNode *n = img->top;
    if (!n->drv->snapshot_list) {
        return 0;
    }
    return n->drv->snapshot_list(n, out);
}

void
vdk_snapshot_list_free(VdkSnapshotInfo *list, int count)
{
    for (int i = 0; list && i < count; i++) {
        g_free(list[i].id);
        g_free(list[i].name);
    }
    g_free(list);
}

static bool
snapshot_op_check(VdkImage *img, bool (*op)(VdkNode *, const char *, GError **), const char *name, GError **error)
{
    VdkNode *n = img->top;
    if (!op) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "%s: this format does not support internal snapshots", n->drv->name);
        return false;
    }
    if (n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    if (!name) {
        g_set_error(error, VDK_ERROR, EINVAL, "a snapshot name is required");
        return false;
    }
    return true;
}

bool
vdk_image_snapshot_create(VdkImage *img, const char *name, GError **error)
{
    VdkNode *n = img->top;
    return snapshot_op_check(img, n->drv->snapshot_create, name, error) && n->drv->snapshot_create(n, name, error);
}

bool
vdk_image_snapshot_apply(VdkImage *img, const char *name, GError **error)
{
    VdkNode *n = img->top;
    return snapshot_op_check(img, n->drv->snapshot_apply, name, error) && n->drv->snapshot_apply(n, name, error);
}

bool
vdk_image_snapshot_delete(VdkImage *img, const char *name, GError **error)
{
    VdkNode *n = img->top;
    return snapshot_op_check(img, n->drv->snapshot_delete, name, error) && n->drv->snapshot_delete(n, name, error);
}

bool
vdk_image_amend(VdkImage *img, const char *const *kv, GError **error)
{
    VdkNode *n = img->top;
    if (!n->drv->amend) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "Format driver '%s' does not support option amendment", n->drv->name);
        return false;
    }
    GHashTable *h = g_hash_table_new(g_str_hash, g_str_equal);
    for (size_t i = 0; kv && kv[i] && kv[i + 1]; i += 2) {
        g_hash_table_replace(h, (gpointer)kv[i], (gpointer)kv[i + 1]);
    }
    bool ok = n->drv->amend(n, h, error);
    g_hash_table_unref(h);
    return ok;
}

bool
vdk_image_bitmap(VdkImage *img, const VdkBitmapOp *op, GError **error)
{
    VdkNode *n = img->top;
    if (!op || !op->name || !*op->name) {
        g_set_error(error, VDK_ERROR, EINVAL, "a bitmap name is required");
        return false;
    }
    if (!n->drv->bitmap) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "Can't store persistent bitmaps to %s images", n->drv->name);
        return false;
    }
    if (n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    return n->drv->bitmap(n, op, error);
}

int
vdk_image_list_bitmaps(VdkImage *img, VdkBitmapInfo **out)
{
    VdkNode *n = img->top;
    *out = NULL;
    if (!n->drv->bitmap_list) {
        return -ENOTSUP;
    }
    return n->drv->bitmap_list(n, out);
}

void
vdk_bitmap_list_free(VdkBitmapInfo *list, int n)
{
    for (int i = 0; list && i < n; i++) {
        g_free(list[i].name);
    }
    g_free(list);
}

bool
vdk_image_compact(VdkImage *img, uint64_t *before, uint64_t *after, GError **error)
{
    VdkNode *n = img->top;
    if (!n->drv->compact) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "%s: this format cannot be compacted", n->drv->name);
        return false;
    }
    if (n->read_only) {
        g_set_error(error, VDK_ERROR, EROFS, "image is read-only");
        return false;
    }
    return n->drv->compact(n, before, after, error);
}
