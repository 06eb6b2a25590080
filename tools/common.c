/* SPDX-License-Identifier: MIT */
/*
 * common.c - helpers shared by the vdk subcommands: error reporting,
 * logging, opening images from command-line options, qemu-style option
 * strings, JSON output in qemu's layout, progress reporting.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tools/tool.h"

bool tool_verbose;
bool tool_quiet;

void
tool_error(const char *file, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    if (file) {
        fprintf(stderr, "vdk: %s: %s\n", file, msg);
    } else {
        fprintf(stderr, "vdk: %s\n", msg);
    }
    g_free(msg);
}

void
tool_gerror(const char *file, GError *err)
{
    tool_error(file, "%s", err ? err->message : "unknown error");
    if (err) {
        g_error_free(err);
    }
}

static void
log_handler(const gchar *domain, GLogLevelFlags level, const gchar *message, gpointer data)
{
    (void)domain;
    (void)data;
    if (level & (G_LOG_LEVEL_DEBUG | G_LOG_LEVEL_INFO)) {
        if (tool_verbose) {
            fprintf(stderr, "vdk: %s\n", message);
        }
        return;
    }
    if (level & G_LOG_LEVEL_MESSAGE) {
        if (!tool_quiet) {
            fprintf(stderr, "vdk: %s\n", message);
        }
        return;
    }
    fprintf(stderr, "vdk: warning: %s\n", message);
}

void
tool_setup_logging(void)
{
    g_log_set_handler("vdk", G_LOG_LEVEL_MASK | G_LOG_FLAG_FATAL | G_LOG_FLAG_RECURSION, log_handler, NULL);
}

/* Secrets from --object (id -> GBytes). */
static GHashTable *tool_secrets;

bool
tool_add_object(const char *spec)
{
    GPtrArray *kv = g_ptr_array_new_with_free_func(g_free);
    GError *err = NULL;
    /* "secret,id=..." : the type comes first, without a key */
    char *type_buf = NULL;
    const char *rest = spec;
    const char *comma = strchr(spec, ','), *eq = strchr(spec, '=');
    if (!eq || (comma && comma < eq)) {
        type_buf = g_strndup(spec, comma ? (gsize)(comma - spec) : strlen(spec));
        rest = comma ? comma + 1 : "";
    }
    if (!tool_parse_kv(rest, kv, &err)) {
        /* the message would repeat the passphrase: name the problem only */
        tool_error(NULL, "--object: invalid option string (KEY=VALUE pairs separated by commas expected)");
        g_error_free(err);
        g_ptr_array_unref(kv);
        g_free(type_buf);
        return false;
    }
    const char *type = type_buf, *id = NULL, *data = NULL, *file = NULL, *format = "raw";
    bool ok = true;
    for (guint i = 0; i + 1 < kv->len && ok; i += 2) {
        const char *k = kv->pdata[i], *v = kv->pdata[i + 1];
        if (!strcmp(k, "qom-type")) {
            type = v;
        } else if (!strcmp(k, "id")) {
            id = v;
        } else if (!strcmp(k, "data")) {
            data = v;
        } else if (!strcmp(k, "file")) {
            file = v;
        } else if (!strcmp(k, "format")) {
            format = v;
        } else if (!strcmp(k, "keyid") || !strcmp(k, "iv")) {
            tool_error(NULL, "--object: encrypted secrets (%s=) are not supported", k);
            ok = false;
        } else if (type && !strcmp(type, "secret")) {
            tool_error(NULL, "--object: secret: unknown property '%s'", k);
            ok = false;
        }
    }
    if (ok && (!type || strcmp(type, "secret") != 0)) {
        tool_error(NULL, "--object: only secret objects are supported (got '%s')", type ? type : "");
        ok = false;
    }
    if (ok && (!id || !*id)) {
        tool_error(NULL, "--object: secret: Parameter 'id' is missing");
        ok = false;
    }
    if (ok && !!data == !!file) {
        tool_error(NULL, "--object: secret '%s': exactly one of data= and file= is needed", id);
        ok = false;
    }
    if (ok && strcmp(format, "raw") != 0 && strcmp(format, "base64") != 0) {
        tool_error(NULL, "--object: secret '%s': format '%s' is invalid (raw or base64)", id, format);
        ok = false;
    }
    if (ok && tool_secrets && g_hash_table_contains(tool_secrets, id)) {
        tool_error(NULL, "--object: attempt to add duplicate secret id '%s'", id);
        ok = false;
    }
    gchar *bytes = NULL;
    gsize len = 0;
    if (ok && file) {
        if (!g_file_get_contents(file, &bytes, &len, &err)) {
            tool_error(NULL, "--object: secret '%s': %s", id, err->message);
            g_clear_error(&err);
            ok = false;
        }
    } else if (ok) {
        bytes = g_strdup(data);
        len = strlen(data);
    }
    if (ok && !strcmp(format, "base64")) {
        gchar *t = g_strndup(bytes, len);
        bool valid = len > 0 && strspn(t, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n") == len;
        if (!valid) {
            tool_error(NULL, "--object: secret '%s': the data is not valid base64", id);
            ok = false;
        } else {
            gsize dl = 0;
            guchar *d = g_base64_decode(t, &dl);
            g_free(bytes);
            bytes = (gchar *)d;
            len = dl;
        }
        g_free(t);
    }
    if (ok) {
        if (!tool_secrets) {
            tool_secrets = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, (GDestroyNotify)g_bytes_unref);
        }
        g_hash_table_replace(tool_secrets, g_strdup(id), g_bytes_new(bytes, len));
    }
    if (bytes) {
        memset(bytes, 0, len);
    }
    g_free(bytes);
    g_ptr_array_unref(kv);
    g_free(type_buf);
    return ok;
}

void
tool_create_options_add_secrets(VdkCreateOptions *o)
{
    if (!o || !tool_secrets) {
        return;
    }
    GHashTableIter it;
    gpointer k, v;
    g_hash_table_iter_init(&it, tool_secrets);
    while (g_hash_table_iter_next(&it, &k, &v)) {
        gsize len = 0;
        const void *d = g_bytes_get_data(v, &len);
        vdk_create_options_set_secret(o, k, d, len);
    }
}

static VdkImage *
tool_open_gerror(const char *filename, const ToolOpen *o, GError **error)
{
    VdkOpenOptions *opts = vdk_open_options_new();
    if (tool_secrets) {
        GHashTableIter it;
        gpointer k, v;
        g_hash_table_iter_init(&it, tool_secrets);
        while (g_hash_table_iter_next(&it, &k, &v)) {
            gsize len = 0;
            const void *d = g_bytes_get_data(v, &len);
            vdk_open_options_set_secret(opts, k, d, len);
        }
    }
    if (o->no_io) {
        vdk_open_options_set(opts, "no-io", "on");
    }
    if (o->format) {
        vdk_open_options_set_format(opts, o->format);
    }
    vdk_open_options_set_read_only(opts, o->read_only);
    if (o->cache && !vdk_open_options_set_cache(opts, o->cache, error)) {
        vdk_open_options_free(opts);
        return NULL;
    }
    if (o->aio && !vdk_open_options_set_engine(opts, o->aio, error)) {
        vdk_open_options_free(opts);
        return NULL;
    }
    if (o->opts) {
        for (guint i = 0; i + 1 < o->opts->len; i += 2) {
            vdk_open_options_set(opts, o->opts->pdata[i], o->opts->pdata[i + 1]);
        }
    }
    if (o->parent) {
        vdk_open_options_set(opts, "parent", o->parent);
    }
    if (o->force_share) {
        vdk_open_options_set(opts, "force-share", "on");
    }
    VdkImage *img = vdk_image_open(filename, opts, error);
    vdk_open_options_free(opts);
    if (!img && o->parent && error && *error && strstr((*error)->message, "unknown open option 'parent'")) {
        g_clear_error(error);
        g_set_error(error, VDK_ERROR, EINVAL, "-b names the parent of a differencing vdi image; this is not one");
    }
    if (img && tool_verbose) {
        fprintf(stderr, "vdk: %s: format %s, aio %s, cache %s\n", filename, vdk_image_get_format(img),
                vdk_image_get_engine(img), vdk_image_get_cache(img));
    }
    return img;
}

/* qemu's --image-opts: "driver=qcow2,file.filename=x.qcow2,l2-cache-size=1M".
 * driver and file.filename become the format and the file; cache.direct,
 * cache.no-flush, read-only and aio map to their open options; anything
 * else is an option of the format's driver. */
static VdkImage *
tool_open_image_opts(const char *spec, const ToolOpen *base, char **display)
{
    GPtrArray *kv = g_ptr_array_new_with_free_func(g_free);
    GError *err = NULL;
    if (!tool_parse_kv(spec, kv, &err)) {
        tool_gerror(spec, err);
        g_ptr_array_unref(kv);
        return NULL;
    }
    ToolOpen o = *base;
    o.image_opts = false;
    GPtrArray *extra = g_ptr_array_new();
    /* the command's own open options first; the spec's may override them */
    for (guint i = 0; base->opts && i < base->opts->len; i++) {
        g_ptr_array_add(extra, base->opts->pdata[i]);
    }
    const char *filename = NULL;
    bool direct = false, no_flush = false;
    for (guint i = 0; i + 1 < kv->len; i += 2) {
        const char *k = kv->pdata[i];
        const char *v = kv->pdata[i + 1];
        bool on = !strcmp(v, "on") || !strcmp(v, "true");
        if (!strcmp(k, "driver")) {
            o.format = v;
        } else if (!strcmp(k, "file.filename") || !strcmp(k, "filename")) {
            filename = v;
        } else if (!strcmp(k, "file.driver") || !strcmp(k, "node-name") || !strcmp(k, "file.node-name")) {
            /* a plain file is all vdk opens */
        } else if (!strcmp(k, "cache.direct") || !strcmp(k, "file.cache.direct")) {
            direct = on;
        } else if (!strcmp(k, "cache.no-flush") || !strcmp(k, "file.cache.no-flush")) {
            no_flush = on;
        } else if (!strcmp(k, "read-only")) {
            o.read_only = on || o.read_only;
        } else if (!strcmp(k, "file.aio") || !strcmp(k, "aio")) {
            o.aio = v;
        } else {
            g_ptr_array_add(extra, (gpointer)k);
            g_ptr_array_add(extra, (gpointer)v);
        }
    }
    VdkImage *img = NULL;
    if (!filename) {
        tool_error(NULL, "--image-opts: no file.filename in '%s'", spec);
    } else {
        if (direct || no_flush) {
            o.cache = direct ? (no_flush ? "none" : "none") : "unsafe";
        }
        if (extra->len) {
            o.opts = extra;
        }
        img = tool_open_gerror(filename, &o, &err);
        if (!img) {
            tool_gerror(filename, err);
        }
        if (display) {
            *display = g_strdup(filename);
        }
    }
    g_ptr_array_free(extra, TRUE);
    g_ptr_array_unref(kv);
    return img;
}

VdkImage *
tool_open(const char *filename, const ToolOpen *o)
{
    if (o->image_opts) {
        return tool_open_image_opts(filename, o, NULL);
    }
    GError *err = NULL;
    VdkImage *img = tool_open_gerror(filename, o, &err);
    if (!img) {
        tool_gerror(filename, err);
    }
    return img;
}

bool
tool_parse_output(const char *arg, bool *json)
{
    if (!strcmp(arg, "json")) {
        *json = true;
    } else if (!strcmp(arg, "human")) {
        *json = false;
    } else {
        tool_error(NULL, "--output must be used with human or json as argument.");
        return false;
    }
    return true;
}

void
tool_error_unsupported(const char *opt)
{
    tool_error(NULL, "%s is not supported yet", opt);
}

bool
tool_parse_kv(const char *s, GPtrArray *kv, GError **error)
{
    const char *p = s;
    while (*p) {
        GString *key = g_string_new(NULL);
        GString *val = NULL;
        GString *cur = key;
        for (;;) {
            if (*p == '\0') {
                break;
            }
            if (*p == ',') {
                if (p[1] == ',') {
                    g_string_append_c(cur, ',');
                    p += 2;
                    continue;
                }
                p++;
                break;
            }
            if (*p == '=' && cur == key) {
                val = g_string_new(NULL);
                cur = val;
                p++;
                continue;
            }
            g_string_append_c(cur, *p);
            p++;
        }
        if (key->len == 0) {
            g_string_free(key, TRUE);
            if (val) {
                g_string_free(val, TRUE);
            }
            g_set_error(error, VDK_ERROR, EINVAL, "invalid option string '%s'", s);
            return false;
        }
        if (!val) {
            if (strcmp(key->str, "help") == 0 || strcmp(key->str, "?") == 0) {
                g_ptr_array_add(kv, g_string_free(key, FALSE));
                g_ptr_array_add(kv, g_strdup(""));
                continue;
            }
            g_set_error(error, VDK_ERROR, EINVAL, "option '%s' needs a value (%s=VALUE)", key->str, key->str);
            g_string_free(key, TRUE);
            return false;
        }
        g_ptr_array_add(kv, g_string_free(key, FALSE));
        g_ptr_array_add(kv, g_string_free(val, FALSE));
    }
    return true;
}

bool
tool_parse_size_arg(const char *s, uint64_t *out)
{
    GError *err = NULL;
    if (!vdk_parse_size(s, out, &err)) {
        tool_error(NULL, "invalid image size: %s", err->message);
        g_error_free(err);
        return false;
    }
    return true;
}

bool
tool_parse_uint(const char *s, uint64_t max, uint64_t *out)
{
    if (!s || !*s || *s == '-') {
        return false;
    }
    char *end = NULL;
    errno = 0;
    guint64 v = g_ascii_strtoull(s, &end, 0);
    if (errno || *end || v > max) {
        return false;
    }
    *out = v;
    return true;
}

static int
optdesc_cmp(gconstpointer a, gconstpointer b)
{
    const VdkOptionDesc *x = *(const VdkOptionDesc *const *)a;
    const VdkOptionDesc *y = *(const VdkOptionDesc *const *)b;
    return strcmp(x->name, y->name);
}

void
tool_print_create_help(const VdkFormat *drv)
{
    printf("Supported %s options:\n", drv->name);
    GPtrArray *sorted = g_ptr_array_new();
    for (const VdkOptionDesc *d = drv->create_opts; d && d->name; d++) {
        g_ptr_array_add(sorted, (gpointer)d);
    }
    g_ptr_array_sort(sorted, optdesc_cmp);
    for (guint i = 0; i < sorted->len; i++) {
        const VdkOptionDesc *d = sorted->pdata[i];
        const char *type = d->type == VDK_OPT_SIZE ? "size"
                           : d->type == VDK_OPT_BOOL ? "bool (on/off)"
                           : d->type == VDK_OPT_NUMBER ? "num"
                                                       : "str";
        char *lhs = g_strdup_printf("%s=<%s>", d->name, type);
        printf("  %-22s - %s", lhs, d->help);
        if (d->def) {
            printf(" (default: %s)", d->def);
        }
        printf("\n");
        g_free(lhs);
    }
    g_ptr_array_free(sorted, TRUE);
}

void
tool_usage(FILE *out, const char *text)
{
    fputs(text, out);
}

/* ------------------------------------------------------------------------ */
/* JSON                                                                      */
/* ------------------------------------------------------------------------ */

void
json_escape(GString *out, const char *s)
{
    g_string_append_c(out, '"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"': g_string_append(out, "\\\""); break;
        case '\\': g_string_append(out, "\\\\"); break;
        case '\n': g_string_append(out, "\\n"); break;
        case '\r': g_string_append(out, "\\r"); break;
        case '\t': g_string_append(out, "\\t"); break;
        case '\b': g_string_append(out, "\\b"); break;
        case '\f': g_string_append(out, "\\f"); break;
        default:
            if (*p < 0x20 || *p == 0x7f) {
                g_string_append_printf(out, "\\u%04x", *p);
            } else {
                g_string_append_c(out, (char)*p);
            }
        }
    }
    g_string_append_c(out, '"');
}

void
json_init(Json *j, bool pretty)
{
    memset(j, 0, sizeof(*j));
    j->s = g_string_new(NULL);
    j->pretty = pretty;
    j->first[0] = true;
}

static void
json_indent(Json *j)
{
    if (!j->pretty) {
        return;
    }
    g_string_append_c(j->s, '\n');
    for (int i = 0; i < j->depth; i++) {
        g_string_append(j->s, "    ");
    }
}

static void
json_key(Json *j, const char *key)
{
    if (j->depth > 0) {
        if (!j->first[j->depth]) {
            g_string_append_c(j->s, ',');
            if (!j->pretty) {
                g_string_append_c(j->s, ' ');
            }
        }
        j->first[j->depth] = false;
        json_indent(j);
    }
    if (key) {
        json_escape(j->s, key);
        g_string_append(j->s, ": ");
    }
}

static void
json_open(Json *j, const char *key, char c)
{
    json_key(j, key);
    g_string_append_c(j->s, c);
    g_assert(j->depth + 1 < (int)G_N_ELEMENTS(j->first));
    j->depth++;
    j->first[j->depth] = true;
}

static void
json_close(Json *j, char c)
{
    bool empty = j->first[j->depth];
    j->depth--;
    if (!empty) {
        json_indent(j);
    }
    g_string_append_c(j->s, c);
}

void
json_begin_object(Json *j, const char *key)
{
    json_open(j, key, '{');
}

void
json_end_object(Json *j)
{
    json_close(j, '}');
}

void
json_begin_array(Json *j, const char *key)
{
    json_open(j, key, '[');
}

void
json_end_array(Json *j)
{
    json_close(j, ']');
}

void
json_str(Json *j, const char *key, const char *val)
{
    json_key(j, key);
    json_escape(j->s, val);
}

void
json_int(Json *j, const char *key, int64_t val)
{
    json_key(j, key);
    g_string_append_printf(j->s, "%" PRId64, val);
}

void
json_uint(Json *j, const char *key, uint64_t val)
{
    json_key(j, key);
    g_string_append_printf(j->s, "%" PRIu64, val);
}

void
json_double(Json *j, const char *key, double val)
{
    json_key(j, key);
    char buf[G_ASCII_DTOSTR_BUF_SIZE];
    g_ascii_formatd(buf, sizeof(buf), "%.6g", val);
    g_string_append(j->s, buf);
}

void
json_bool(Json *j, const char *key, bool val)
{
    json_key(j, key);
    g_string_append(j->s, val ? "true" : "false");
}

void
json_raw(Json *j, const char *key, const char *text)
{
    json_key(j, key);
    if (!j->pretty) {
        g_string_append(j->s, text);
        return;
    }
    /* Pretty text from a driver: re-indent each line for the depth it is
     * inserted at (the text's own indentation is ignored). */
    int level = 0;
    bool in_str = false, esc = false, first = true;
    const char *p = text;
    while (*p) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        const char *q = p;
        while (q < p + len && (*q == ' ' || *q == '\t')) {
            q++;
        }
        size_t n = (size_t)(p + len - q);
        if (!first) {
            int lv = level - ((n && !in_str && (*q == '}' || *q == ']')) ? 1 : 0);
            g_string_append_c(j->s, '\n');
            for (int i = 0; i < j->depth + lv; i++) {
                g_string_append(j->s, "    ");
            }
        }
        g_string_append_len(j->s, q, (gssize)n);
        for (size_t i = 0; i < n; i++) {
            char c = q[i];
            if (in_str) {
                if (esc) {
                    esc = false;
                } else if (c == '\\') {
                    esc = true;
                } else if (c == '"') {
                    in_str = false;
                }
            } else if (c == '"') {
                in_str = true;
            } else if (c == '{' || c == '[') {
                level++;
            } else if (c == '}' || c == ']') {
                level--;
            }
        }
        first = false;
        p = nl ? nl + 1 : p + len;
    }
}

char *
json_finish(Json *j)
{
    return g_string_free(j->s, FALSE);
}

/* ------------------------------------------------------------------------ */
/* Progress                                                                  */
/* ------------------------------------------------------------------------ */

static int64_t
mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

bool
tool_parse_progress(const char *s, ProgressMode *out)
{
    if (!s || !strcmp(s, "bar") || !strcmp(s, "human")) {
        *out = PROGRESS_BAR;
    } else if (!strcmp(s, "json")) {
        *out = PROGRESS_JSON;
    } else if (!strcmp(s, "none") || !strcmp(s, "off")) {
        *out = PROGRESS_NONE;
    } else {
        return false;
    }
    return true;
}

void
progress_init(Progress *p, ProgressMode mode, uint64_t total)
{
    memset(p, 0, sizeof(*p));
    p->mode = mode;
    p->total = total;
    p->start_us = mono_us();
    p->last_pct = -1;
    p->out = mode == PROGRESS_JSON ? stdout : stderr;
    if (mode == PROGRESS_BAR) {
        /* qemu-img prints its progress on stdout; a bar only makes sense on
         * a terminal, so elsewhere print the final line only. */
        p->out = stdout;
    }
}

static void
progress_print(Progress *p, bool final)
{
    int64_t now = mono_us();
    double pct = p->total ? (double)p->done * 100.0 / (double)p->total : 100.0;
    if (p->mode == PROGRESS_BAR) {
        if (!final && !isatty(fileno(p->out))) {
            return;
        }
        fprintf(p->out, "    (%.2f/100%%)\r", pct);
        if (final) {
            fputc('\n', p->out);
        }
        fflush(p->out);
    } else if (p->mode == PROGRESS_JSON) {
        double secs = (double)(now - p->start_us) / 1e6;
        double rate = secs > 0 ? (double)p->done / secs : 0;
        fprintf(p->out,
                "{\"type\": \"progress\", \"done\": %" PRIu64 ", \"total\": %" PRIu64
                ", \"percent\": %.2f, \"bytes_per_second\": %.0f, \"elapsed\": %.3f%s}\n",
                p->done, p->total, pct, rate, secs, final ? ", \"finished\": true" : "");
        fflush(p->out);
    }
    p->last_us = now;
    p->last_pct = pct;
}

void
progress_update(Progress *p, uint64_t done)
{
    if (p->mode == PROGRESS_NONE) {
        return;
    }
    p->done = done;
    int64_t now = mono_us();
    double pct = p->total ? (double)done * 100.0 / (double)p->total : 100.0;
    /* At most 10 updates a second, and only when something visible changed. */
    if (now - p->last_us < 100000 || pct - p->last_pct < 0.01) {
        return;
    }
    progress_print(p, false);
}

void
progress_finish(Progress *p)
{
    if (p->mode == PROGRESS_NONE) {
        return;
    }
    p->done = p->total;
    progress_print(p, true);
}

char *
tool_cvtstr(double value)
{
    static const char *const units[] = {"EiB", "PiB", "TiB", "GiB", "MiB", "KiB"};
    static const double sizes[] = {1152921504606846976.0, 1125899906842624.0, 1099511627776.0, 1073741824.0,
                                   1048576.0, 1024.0};
    char *s = NULL;
    for (size_t i = 0; i < G_N_ELEMENTS(units); i++) {
        if (value >= sizes[i]) {
            s = g_strdup_printf("%.3f %s", value / sizes[i], units[i]);
            break;
        }
    }
    if (!s) {
        s = g_strdup_printf("%.3f bytes", value);
    }
    /* "1.000 MiB" -> "1 MiB" */
    char *dot = strstr(s, ".000 ");
    if (dot) {
        memmove(dot, dot + 4, strlen(dot + 4) + 1);
    }
    return s;
}

void
tool_print_snapshots(const VdkSnapshotInfo *l, int count)
{
    /* qemu-img's columns (bdrv_snapshot_dump) */
    printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
    for (int i = 0; i < count; i++) {
        char date[32] = "";
        time_t ti = (time_t)l[i].date_sec;
        struct tm tm;
        if (localtime_r(&ti, &tm)) {
            strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
        }
        uint64_t secs = l[i].vm_clock_nsec / 1000000000ULL;
        char clock[64];
        snprintf(clock, sizeof(clock), "%02d:%02d:%02d.%03d", (int)(secs / 3600), (int)((secs / 60) % 60),
                 (int)(secs % 60), (int)((l[i].vm_clock_nsec / 1000000) % 1000));
        char icount[32] = "";
        if (l[i].icount != UINT64_MAX) {
            snprintf(icount, sizeof(icount), "%" G_GINT64_FORMAT, (gint64)l[i].icount);
        }
        char *size = vdk_size_to_str(l[i].vm_state_size);
        printf("%-9s %-16s %8s%20s%13s%11s\n", l[i].id, l[i].name, size, date, clock, icount);
        g_free(size);
    }
}

bool
tool_progress_cb(void *opaque, uint64_t done, uint64_t total)
{
    (void)total;
    progress_update(opaque, done);
    return true;
}
