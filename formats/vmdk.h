/* SPDX-License-Identifier: MIT */
/*
 * vmdk.h - the parts of the vmdk driver the unit tests reach: the text
 * descriptor parser and the hosted sparse extent header decoder.  See
 * vmdk.c for what the driver supports.
 */
#ifndef VDK_VMDK_H
#define VDK_VMDK_H

#include <stdbool.h>
#include <stdint.h>

#include <glib.h>

/* Limits (see vmdk.c for where the numbers come from). */
#define VMDK_MAX_DESC_BYTES (1u << 20)          /* descriptor text */
#define VMDK_MAX_EXTENTS 4096u                  /* 2 TiB / 2 GiB twoGb extents is 1024 */
#define VMDK_MAX_CAPACITY_SECTORS (1ULL << 40)  /* 512 TiB: offsets stay far from int64 */
#define VMDK_MIN_GRAIN_SECTORS 1ULL
#define VMDK_MAX_GRAIN_SECTORS (1ULL << 14)     /* 8 MiB grains (VMware uses 64 KiB) */
#define VMDK_MAX_GTES 65536u                    /* entries per grain table (VMware: 512) */
#define VMDK_MAX_GD_BYTES (32u << 20)           /* grain directory held in memory */
#define VMDK_MAX_NAME 4096u                     /* extent and parent file names */

#define VMDK4_MAGIC 0x564d444bu /* "KDMV" little endian */
#define VMDK_GD_AT_END 0xffffffffffffffffULL

#define VMDK4_FLAG_NL_DETECT (1u << 0)
#define VMDK4_FLAG_RGD (1u << 1)
#define VMDK4_FLAG_ZERO_GRAIN (1u << 2)
#define VMDK4_FLAG_COMPRESS (1u << 16)
#define VMDK4_FLAG_MARKER (1u << 17)
#define VMDK4_FLAGS_KNOWN                                                                                     \
    (VMDK4_FLAG_NL_DETECT | VMDK4_FLAG_RGD | VMDK4_FLAG_ZERO_GRAIN | VMDK4_FLAG_COMPRESS | VMDK4_FLAG_MARKER)

typedef enum {
    VMDK_ET_FLAT = 1, /* FLAT and VMFS: raw bytes at an offset of a file */
    VMDK_ET_SPARSE,   /* hosted sparse extent ("KDMV") */
    VMDK_ET_ZERO,     /* no file: reads as zeroes */
} VmdkExtentType;

typedef enum {
    VMDK_ACCESS_RW = 0,
    VMDK_ACCESS_RDONLY,
    VMDK_ACCESS_NOACCESS,
} VmdkAccess;

typedef struct {
    VmdkAccess access;
    uint64_t sectors;
    VmdkExtentType type;
    char *type_name; /* as written: FLAT, VMFS, SPARSE, ZERO */
    char *fname;     /* NULL for ZERO */
    uint64_t offset; /* FLAT: sectors into the file */
} VmdkDescExtent;

typedef struct {
    uint32_t version;
    uint32_t cid, parent_cid;
    bool has_cid, has_parent_cid;
    char *create_type;
    char *parent_hint; /* parentFileNameHint */
    GArray *extents;   /* VmdkDescExtent */
    uint64_t total_sectors;
} VmdkDesc;

/* Parse descriptor text (stops at the first NUL; \r\n accepted).  Every
 * line must be a comment, a key = value pair or an extent line; errors name
 * the line and the offending text. */
bool vdk_vmdk_desc_parse(const char *text, size_t len, VmdkDesc *d, GError **error);
void vdk_vmdk_desc_clear(VmdkDesc *d);
/* The text with the value of @key (a top-level key such as CID) replaced
 * by @value, every other byte kept; appended before the extent section
 * when missing. */
char *vdk_vmdk_desc_set_key(const char *text, const char *key, const char *value);

typedef struct {
    uint32_t version;
    uint32_t flags;
    uint64_t capacity;    /* sectors */
    uint64_t grain_size;  /* sectors */
    uint64_t desc_offset; /* sectors */
    uint64_t desc_size;   /* sectors */
    uint32_t num_gtes;
    uint64_t rgd_offset;  /* sectors */
    uint64_t gd_offset;   /* sectors */
    uint64_t overhead;    /* sectors */
    uint8_t unclean;
    uint16_t compress;
} VmdkHeader;

void vdk_vmdk_header_decode(const uint8_t *buf, VmdkHeader *h);
void vdk_vmdk_header_encode(const VmdkHeader *h, uint8_t *buf);
/* Validate a decoded header of an extent file of @file_size bytes.  With
 * @footer, the header came from the footer of a streamOptimized extent
 * (gd_offset must be real). */
bool vdk_vmdk_header_check(const VmdkHeader *h, uint64_t file_size, bool footer, GError **error);
/* Grain directory entries a header implies. */
uint64_t vdk_vmdk_gd_entries(const VmdkHeader *h);

/* Remove the extent files a text descriptor at @path names in its own
 * directory (plain names only): cleanup after a failed convert created
 * them.  Best effort. */
void vdk_vmdk_remove_extents(const char *path);

#endif
