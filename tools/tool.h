/* SPDX-License-Identifier: MIT */
/*
 * tool.h - shared helpers of the vdk command-line tool.
 *
 * Every subcommand is `int cmd_NAME(int argc, char **argv)` returning the
 * process exit status; argv[0] is the subcommand's name.  Conventions
 * follow qemu-img: errors as one line "vdk: FILE: message" on stderr, exit
 * 1 on error unless the command documents others (compare: 2, check: its
 * own codes).
 */
#ifndef VDK_TOOL_H
#define VDK_TOOL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "block/block.h"
#include "vdk/vdk.h"

typedef struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *summary;
} ToolCommand;

int cmd_create(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_compare(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_resize(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_io(int argc, char **argv);
int cmd_measure(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_commit(int argc, char **argv);
int cmd_rebase(int argc, char **argv);
int cmd_dd(int argc, char **argv);
int cmd_amend(int argc, char **argv);
int cmd_allocate(int argc, char **argv);
int cmd_compact(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_fuse(int argc, char **argv);
int cmd_bitmap(int argc, char **argv);

extern bool tool_verbose;
extern bool tool_quiet;

/* "vdk: FILE: message" (FILE may be NULL: "vdk: message"). */
void tool_error(const char *file, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
/* Report a GError the same way and free it. */
void tool_gerror(const char *file, GError *err);
/* Route libvdk's log messages: warnings always, debug with -v. */
void tool_setup_logging(void);

/* Common open parameters. */
typedef struct {
    const char *format;
    const char *cache;
    const char *aio;
    bool read_only;
    bool force_share;
    bool image_opts; /* the filename is qemu's --image-opts option string */
    const char *parent; /* -b: the parent of a differencing vdi (open option "parent") */
    GPtrArray *opts; /* key, value, key, value ... for vdk_open_options_set */
    bool no_io;      /* metadata only (info): an encrypted image opens without its key */
} ToolOpen;

/* --object secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]: qemu's
 * secret objects, kept for every image this process opens or creates
 * (other object types: a clear error).  False after printing why. */
bool tool_add_object(const char *spec);
/* Hand every secret to create options (NULL: nothing). */
void tool_create_options_add_secrets(VdkCreateOptions *o);

/* Open an image; on failure print "vdk: FILE: why" and return NULL. */
VdkImage *tool_open(const char *filename, const ToolOpen *o);
/* --output=human|json; prints qemu-img's error otherwise. */
bool tool_parse_output(const char *arg, bool *json);
/* "vdk: OPT is not supported yet" */
void tool_error_unsupported(const char *opt);

/* Split qemu-style "a=b,c=d" (",," escapes a comma) into key/value pairs
 * appended to @kv (alternating key, value).  "help" alone -> key "help". */
bool tool_parse_kv(const char *s, GPtrArray *kv, GError **error);

/* Parse a size argument; on failure prints qemu-img's style of message. */
bool tool_parse_size_arg(const char *s, uint64_t *out);
/* Parse a non-negative integer option (decimal/hex) with a maximum. */
bool tool_parse_uint(const char *s, uint64_t max, uint64_t *out);

/* Print `-o help` for a format. */
void tool_print_create_help(const VdkFormat *drv);

/* --help text helpers */
void tool_usage(FILE *out, const char *text);

/* ------------------------------------------------------------------------ */
/* JSON output in qemu's pretty-printed style                                */
/* ------------------------------------------------------------------------ */

typedef struct {
    GString *s;
    int depth;
    bool first[32];
    bool pretty;
} Json;

void json_init(Json *j, bool pretty);
void json_begin_object(Json *j, const char *key);
void json_end_object(Json *j);
void json_begin_array(Json *j, const char *key);
void json_end_array(Json *j);
void json_str(Json *j, const char *key, const char *val);
void json_int(Json *j, const char *key, int64_t val);
void json_uint(Json *j, const char *key, uint64_t val);
void json_double(Json *j, const char *key, double val);
void json_bool(Json *j, const char *key, bool val);
/* Insert pre-rendered JSON text as a value. */
void json_raw(Json *j, const char *key, const char *text);
char *json_finish(Json *j);
void json_escape(GString *out, const char *s);

/* ------------------------------------------------------------------------ */
/* Progress                                                                  */
/* ------------------------------------------------------------------------ */

typedef enum {
    PROGRESS_NONE = 0,
    PROGRESS_BAR,  /* -p: "    (12.34/100%)" on a terminal */
    PROGRESS_JSON, /* --progress=json: one object per line */
} ProgressMode;

typedef struct {
    ProgressMode mode;
    uint64_t total;
    uint64_t done;
    int64_t start_us;
    int64_t last_us;
    double last_pct;
    FILE *out;
} Progress;

void progress_init(Progress *p, ProgressMode mode, uint64_t total);
void progress_update(Progress *p, uint64_t done);
void progress_finish(Progress *p);
bool tool_parse_progress(const char *s, ProgressMode *out);
/* A library progress callback that updates the Progress @opaque. */
bool tool_progress_cb(void *opaque, uint64_t done, uint64_t total);

/* Human sizes in qemu-io's style: "64 KiB", "1.500 MiB", "100 bytes". */
char *tool_cvtstr(double value);
/* qemu-img snapshot -l / info: the snapshot table (header line and rows). */
void tool_print_snapshots(const VdkSnapshotInfo *list, int count);

#endif /* VDK_TOOL_H */
