/* SPDX-License-Identifier: MIT */
/*
 * vdi.c - VirtualBox disk images (VDI, header version 1.1).
 *
 * Layout (VirtualBox's VDICore.h, QEMU's block/vdi.c header comment): a
 * 64-byte text banner, then the header (signature 0xbeda107f, version,
 * header size, image type, flags, description, block-map and data offsets,
 * geometry, sector size, disk size, block size, blocks in image, blocks
 * allocated, four UUIDs), then the block map: one little-endian 32-bit
 * entry per block giving the index of the block in the data area
 * (offset_data + index * block_size), 0xffffffff for an unallocated block
 * and 0xfffffffe for a discarded one (both read as zeroes).
 *
 * Supported: dynamic (type 1) and fixed/static (type 2) images with 1 MiB
 * blocks and 512-byte sectors (the only values QEMU and VirtualBox write);
 * read, write, create, grow, check and repair, discard and write_zeroes.
 * Differencing images (type 4, or a non-null parent UUID) open only when
 * the caller names the parent (open option "parent"); their unallocated
 * blocks then read from it.  Undo images (type 3), other versions, block
 * sizes and a non-zero per-block extra area are refused by name.
 *
 * The whole block map is loaded at open (4 bytes per MiB of disk; at most
 * VDI_MAX_BLOCKS entries), so map() never waits.  A write to an unallocated
 * block takes the next index (blocks are appended), writes only the bytes
 * asked (the rest of the new block is allocated as zeroes with fallocate,
 * never written with zero buffers), and the map entry changes in memory
 * after the data is written.  flush() writes the header (blocks_allocated
 * raised first, so no later writer can hand out an index the map uses),
 * syncs, then writes the dirty part of the map and syncs again: a crash
 * leaves, at worst, a block counted but not referenced.  Discarded blocks
 * read as zeroes at once and are unmapped at close (vdi_discard()).  Like VirtualBox,
 * the modification UUID changes on the first write after open.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "block/block.h"

#define VDI_SIGNATURE 0xbeda107fu
#define VDI_VERSION_1_1 0x00010001u
#define VDI_TYPE_DYNAMIC 1u
#define VDI_TYPE_STATIC 2u
#define VDI_TYPE_UNDO 3u
#define VDI_TYPE_DIFF 4u
#define VDI_UNALLOCATED 0xffffffffu
#define VDI_DISCARDED 0xfffffffeu
#define VDI_IS_ALLOCATED(e) ((e) < VDI_DISCARDED)
#define VDI_SECTOR 512u
/* The only block size QEMU and VirtualBox create (QEMU opens no other). */
#define VDI_BLOCK_SIZE (1u << 20)
/* Header fields: offsets in the file. */
#define VDI_OFF_SIGNATURE 0x40
#define VDI_OFF_VERSION 0x44
#define VDI_OFF_HEADER_SIZE 0x48
#define VDI_OFF_TYPE 0x4c
#define VDI_OFF_FLAGS 0x50
#define VDI_OFF_DESCRIPTION 0x54
#define VDI_OFF_BMAP 0x154
#define VDI_OFF_DATA 0x158
#define VDI_OFF_SECTOR_SIZE 0x168
#define VDI_OFF_DISK_SIZE 0x170
#define VDI_OFF_BLOCK_SIZE 0x178
#define VDI_OFF_BLOCK_EXTRA 0x17c
#define VDI_OFF_BLOCKS 0x180
#define VDI_OFF_ALLOCATED 0x184
#define VDI_OFF_UUID_IMAGE 0x188
#define VDI_OFF_UUID_MODIFY 0x198
#define VDI_OFF_UUID_LINK 0x1a8
#define VDI_OFF_UUID_PARENT 0x1b8
/* The version 1.1 header VirtualBox defines ends at 0x1c4 (0x17c bytes
 * after the size field); QEMU writes 0x180, VirtualBox 0x190 (with the
 * LCHS geometry).  Larger values are accepted up to the block map. */
#define VDI_HEADER_SIZE_MIN 0x17c
#define VDI_HEADER_BYTES 512u
/* Largest block map loaded (64 MiB of entries, 16 TiB of disk).  QEMU's
 * own limit is larger (its map may reach 4 GiB), but nothing it or
 * VirtualBox creates in practice comes near this one. */
#define VDI_MAX_BLOCKS (1u << 24)
/* Data area alignment for new images, as VirtualBox does: leaves room for
 * the block map to grow in place (262016 blocks) on resize. */
#define VDI_DATA_ALIGN (1u << 20)

typedef struct VdiAlloc VdiAlloc;

typedef struct Vdi {
    VdkNode *node;
    VdkFile *file;
    uint8_t hdr[VDI_HEADER_BYTES]; /* the first sector as read, patched in place */
    uint32_t header_size;
    uint32_t image_type;
    uint32_t offset_bmap, offset_data;
    uint64_t disk_size;
    uint32_t blocks;             /* blocks in image */
    uint32_t blocks_allocated;   /* header value */
    uint32_t *bmap;              /* host order, [blocks] */
    uint32_t next_index;         /* the next block index to hand out */
    uint64_t dirty_lo, dirty_hi; /* dirty map entries [lo, hi) */
    bool hdr_dirty;
    bool modified;     /* a write happened since open (modification UUID) */
    bool corrupt;      /* bad map entries: read-only, those blocks fail */
    uint64_t need_end; /* the file must reach here (end of the last new block) */
    bool differencing;
    /* Blocks discarded since open (a bit per block, allocated on the first
     * discard): their host space is punched and they read as zeroes; at
     * close they are unmapped and the data area compacted. */
    uint64_t *discarded;
    VdiAlloc *allocs;
    bool wb_running;
    VdkRequest *wb_waiters;
} Vdi;

struct VdiAlloc {
    VdkAlloc base;
    uint32_t block;
    uint32_t index;
    VdkRequest *waiters;
    VdiAlloc *next;
};

static uint32_t
le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t
le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32);
}

static void
put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void
put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static bool
uuid_is_null(const uint8_t *u)
{
    for (int i = 0; i < 16; i++) {
        if (u[i]) {
            return false;
        }
    }
    return true;
}

/* A random (version 4) UUID in VirtualBox's byte order (the first three
 * fields little endian, as QEMU also writes them). */
static void
uuid_generate(uint8_t *u)
{
    if (getrandom(u, 16, 0) != 16) {
        for (int i = 0; i < 16; i++) {
            u[i] = (uint8_t)g_random_int();
        }
    }
    u[7] = (uint8_t)((u[7] & 0x0f) | 0x40);
    u[8] = (uint8_t)((u[8] & 0x3f) | 0x80);
}

static int
vdi_probe(const uint8_t *buf, size_t len, const char *filename)
{
    (void)filename;
    if (len >= 0x48 && le32(buf + VDI_OFF_SIGNATURE) == VDI_SIGNATURE &&
        le32(buf + VDI_OFF_VERSION) == VDI_VERSION_1_1) {
        return 100;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Header                                                                    */
/* ------------------------------------------------------------------------ */

/*
 * Validate the header in @h (the first 512 bytes of a @file_size-byte
 * file) and fill @s.  Exposed to the unit tests through vdk_vdi_parse_header.
 */
static bool
parse_header(Vdi *s, const uint8_t *h, GError **error)
{
    uint32_t sig = le32(h + VDI_OFF_SIGNATURE);
    if (sig != VDI_SIGNATURE) {
        g_set_error(error, VDK_ERROR, EINVAL, "vdi: bad signature 0x%08x (expected 0x%08x)", sig,
                    VDI_SIGNATURE);
        return false;
    }
    uint32_t version = le32(h + VDI_OFF_VERSION);
    if (version != VDI_VERSION_1_1) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vdi: unsupported version %u.%u (only 1.1)", version >> 16,
                    version & 0xffff);
        return false;
    }
    s->header_size = le32(h + VDI_OFF_HEADER_SIZE);
    s->image_type = le32(h + VDI_OFF_TYPE);
    s->offset_bmap = le32(h + VDI_OFF_BMAP);
    s->offset_data = le32(h + VDI_OFF_DATA);
    uint32_t sector_size = le32(h + VDI_OFF_SECTOR_SIZE);
    s->disk_size = le64(h + VDI_OFF_DISK_SIZE);
    uint32_t block_size = le32(h + VDI_OFF_BLOCK_SIZE);
    uint32_t block_extra = le32(h + VDI_OFF_BLOCK_EXTRA);
    s->blocks = le32(h + VDI_OFF_BLOCKS);
    s->blocks_allocated = le32(h + VDI_OFF_ALLOCATED);

    if (s->header_size < VDI_HEADER_SIZE_MIN || s->header_size > VDI_HEADER_BYTES - VDI_OFF_HEADER_SIZE) {
        g_set_error(error, VDK_ERROR, EINVAL, "vdi: header size %u is invalid (expected %u to %u)",
                    s->header_size, VDI_HEADER_SIZE_MIN, VDI_HEADER_BYTES - VDI_OFF_HEADER_SIZE);
        return false;
    }
    if (s->image_type == VDI_TYPE_UNDO) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vdi: undo images (image type 3) are not supported");
        return false;
    }
    if (s->image_type != VDI_TYPE_DYNAMIC && s->image_type != VDI_TYPE_STATIC &&
        s->image_type != VDI_TYPE_DIFF) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vdi: image type %u is invalid (expected 1 dynamic, 2 static or 4 differencing)",
                    s->image_type);
        return false;
    }
    if (sector_size != VDI_SECTOR) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vdi: sector size %u is not supported (only %u)", sector_size,
                    VDI_SECTOR);
        return false;
    }
    if (block_size != VDI_BLOCK_SIZE) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vdi: block size %u is not supported (only %u)", block_size,
                    VDI_BLOCK_SIZE);
        return false;
    }
    if (block_extra != 0) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vdi: per-block extra data (%u bytes) is not supported",
                    block_extra);
        return false;
    }
    if (s->offset_bmap % VDI_SECTOR || s->offset_bmap < VDI_HEADER_BYTES) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vdi: block map offset 0x%x is invalid (a multiple of %u from %u)", s->offset_bmap,
                    VDI_SECTOR, VDI_HEADER_BYTES);
        return false;
    }
    if (s->blocks > VDI_MAX_BLOCKS) {
        g_set_error(error, VDK_ERROR, EFBIG, "vdi: blocks in image %u is too large (max %u)", s->blocks,
                    VDI_MAX_BLOCKS);
        return false;
    }
    uint64_t bmap_end = (uint64_t)s->offset_bmap + (uint64_t)s->blocks * 4;
    if (s->offset_data % VDI_SECTOR || s->offset_data < bmap_end) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vdi: data offset 0x%x is invalid (a multiple of %u after the block map, which ends at "
                    "0x%" G_GINT64_MODIFIER "x)",
                    s->offset_data, VDI_SECTOR, bmap_end);
        return false;
    }
    /* Old QEMU versions wrote sizes that were not whole sectors. */
    s->disk_size = vdk_align_up(s->disk_size, VDI_SECTOR);
    if (s->disk_size > (uint64_t)s->blocks * VDI_BLOCK_SIZE) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vdi: disk size %" G_GUINT64_FORMAT " is larger than the %u blocks in the image hold",
                    s->disk_size, s->blocks);
        return false;
    }
    if (s->blocks_allocated > s->blocks) {
        g_set_error(error, VDK_ERROR, EINVAL, "vdi: blocks allocated %u is larger than blocks in image %u",
                    s->blocks_allocated, s->blocks);
        return false;
    }
    /* VirtualBox records the parent in the link UUID (its creation UUID)
     * and the parent UUID (its modification UUID); either makes the image
     * depend on another (qemu refuses both) */
    s->differencing = s->image_type == VDI_TYPE_DIFF || !uuid_is_null(h + VDI_OFF_UUID_PARENT) ||
                      !uuid_is_null(h + VDI_OFF_UUID_LINK);
    memcpy(s->hdr, h, VDI_HEADER_BYTES);
    return true;
}

bool vdk_vdi_parse_header(const uint8_t *h, uint64_t *disk_size, uint32_t *blocks, GError **error);

/* For the unit tests: validate a header sector. */
bool
vdk_vdi_parse_header(const uint8_t *h, uint64_t *disk_size, uint32_t *blocks, GError **error)
{
    Vdi s;
    memset(&s, 0, sizeof(s));
    if (!parse_header(&s, h, error)) {
        return false;
    }
    *disk_size = s.disk_size;
    *blocks = s.blocks;
    return true;
}

/* Patch the state into the header sector. */
static void
update_header(Vdi *s)
{
    put64(s->hdr + VDI_OFF_DISK_SIZE, s->disk_size);
    put32(s->hdr + VDI_OFF_BMAP, s->offset_bmap);
    put32(s->hdr + VDI_OFF_DATA, s->offset_data);
    put32(s->hdr + VDI_OFF_BLOCKS, s->blocks);
    put32(s->hdr + VDI_OFF_ALLOCATED, s->blocks_allocated);
}

/* Check the map: out-of-range and duplicate entries.  Returns the number
 * of problems; *first names the first one. */
static uint64_t
scan_map(Vdi *s, char **first)
{
    uint64_t bad = 0;
    uint8_t *seen = g_try_malloc0(s->blocks ? s->blocks : 1);
    s->next_index = 0;
    for (uint32_t b = 0; b < s->blocks; b++) {
        uint32_t e = s->bmap[b];
        if (!VDI_IS_ALLOCATED(e)) {
            continue;
        }
        if (e >= s->blocks) {
            if (!bad++ && first) {
                *first = g_strdup_printf(
                    "vdi: block map entry %u is out of range (block index %u, the image has %u blocks)", b, e,
                    s->blocks);
            }
            continue;
        }
        if (seen && seen[e]) {
            if (!bad++ && first) {
                *first = g_strdup_printf(
                    "vdi: block map entry %u uses block index %u, which another entry also uses", b, e);
            }
        }
        if (seen) {
            seen[e] = 1;
        }
        s->next_index = MAX(s->next_index, e + 1);
    }
    g_free(seen);
    return bad;
}

static char *
uuid_str(const uint8_t *u)
{
    /* VirtualBox's order: the first three fields little endian */
    return g_strdup_printf("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[3], u[2],
                           u[1], u[0], u[5], u[4], u[7], u[6], u[8], u[9], u[10], u[11], u[12], u[13], u[14],
                           u[15]);
}

/* The named parent must be the image this one was made from: its
 * creation UUID is the link UUID recorded here (when one is). */
static bool
check_parent(Vdi *s, VdkNode *n, const char *parent, GError **error)
{
    const uint8_t *link = s->hdr + VDI_OFF_UUID_LINK;
    if (uuid_is_null(link)) {
        return true;
    }
    char *path = vdk_backing_path(n->filename, parent);
    VdkFile *f = vdk_file_open(path, true, VDK_CACHE_WRITEBACK, error);
    if (!f) {
        g_free(path);
        return false;
    }
    uint8_t *h = NULL;
    int r = -ENOMEM;
    if (posix_memalign((void **)&h, 4096, VDI_HEADER_BYTES) == 0) {
        memset(h, 0, VDI_HEADER_BYTES);
        r = vdk_file_pread_sync(f, h, VDI_HEADER_BYTES, 0);
    }
    vdk_file_close(f);
    bool ok = false;
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "vdi: cannot read the parent '%s': %s", path, g_strerror(-r));
    } else if (le32(h + VDI_OFF_SIGNATURE) != VDI_SIGNATURE) {
        g_set_error(error, VDK_ERROR, EINVAL, "vdi: the parent '%s' is not a vdi image", path);
    } else if (memcmp(h + VDI_OFF_UUID_IMAGE, link, 16) != 0) {
        char *a = uuid_str(h + VDI_OFF_UUID_IMAGE);
        char *b = uuid_str(link);
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vdi: the parent '%s' has UUID %s, but this image was made from %s", path, a, b);
        g_free(a);
        g_free(b);
    } else {
        ok = true;
    }
    free(h);
    g_free(path);
    return ok;
}

static bool
vdi_open(VdkNode *n, GError **error)
{
    uint8_t *h = NULL;
    if (posix_memalign((void **)&h, 4096, VDI_HEADER_BYTES) != 0) {
        g_set_error(error, VDK_ERROR, ENOMEM, "vdi: out of memory");
        return false;
    }
    memset(h, 0, VDI_HEADER_BYTES);
    int r = vdk_file_pread_sync(n->file, h, VDI_HEADER_BYTES, 0);
    if (r < 0) {
        free(h);
        g_set_error(error, VDK_ERROR, -r, "vdi: cannot read the header: %s", g_strerror(-r));
        return false;
    }
    Vdi *s = g_new0(Vdi, 1);
    s->node = n;
    s->file = n->file;
    s->dirty_lo = UINT64_MAX;
    bool ok = parse_header(s, h, error);
    free(h);
    if (!ok) {
        g_free(s);
        return false;
    }
    const char *parent = g_hash_table_lookup(n->img->opts.extra, "parent");
    if (n->depth > 0) {
        parent = NULL; /* the option names the top image's parent only */
    }
    if (s->differencing && !parent) {
        g_set_error(
            error, VDK_ERROR, ENOTSUP,
            "vdi: this is a differencing image and VDI does not record its parent's file name: name it "
            "with -b PARENT (or --image-opts driver=vdi,file.filename=IMAGE,parent=PARENT)");
        g_free(s);
        return false;
    }
    if (parent && !s->differencing) {
        g_set_error(error, VDK_ERROR, EINVAL, "vdi: a parent was named but this is not a differencing image");
        g_free(s);
        return false;
    }
    if (parent && !check_parent(s, n, parent, error)) {
        g_free(s);
        return false;
    }
    size_t bytes = (size_t)s->blocks * 4;
    uint8_t *raw = NULL;
    if (bytes && posix_memalign((void **)&raw, 4096, vdk_align_up(bytes, VDI_SECTOR)) != 0) {
        raw = NULL;
    }
    s->bmap = g_try_new(uint32_t, s->blocks ? s->blocks : 1);
    if ((bytes && !raw) || !s->bmap) {
        g_set_error(error, VDK_ERROR, ENOMEM, "vdi: cannot allocate the block map (%u entries)", s->blocks);
        free(raw);
        g_free(s->bmap);
        g_free(s);
        return false;
    }
    if (!n->file->is_blockdev && (uint64_t)s->offset_bmap + bytes > n->file->size) {
        g_set_error(error, VDK_ERROR, EINVAL,
                    "vdi: the file (%" G_GUINT64_FORMAT
                    " bytes) ends inside the block map (0x%x + %u entries)",
                    n->file->size, s->offset_bmap, s->blocks);
        free(raw);
        g_free(s->bmap);
        g_free(s);
        return false;
    }
    if (bytes) {
        r = vdk_file_pread_sync(n->file, raw, bytes, s->offset_bmap);
        if (r < 0) {
            free(raw);
            g_free(s->bmap);
            g_free(s);
            g_set_error(error, VDK_ERROR, -r, "vdi: cannot read the block map: %s", g_strerror(-r));
            return false;
        }
        for (uint32_t b = 0; b < s->blocks; b++) {
            s->bmap[b] = le32(raw + (size_t)b * 4);
        }
    }
    free(raw);
    char *first = NULL;
    uint64_t bad = scan_map(s, &first);
    if (bad) {
        bool check = n->img->opts.check;
        if (!check && !n->read_only) {
            g_set_error(error, VDK_ERROR, EIO,
                        "%s (%" G_GUINT64_FORMAT " bad entries; run 'vdk check -r all')", first, bad);
            g_free(first);
            g_free(s->bmap);
            g_free(s);
            return false;
        }
        /* read-only (or being checked): bad blocks fail, the rest reads */
        s->corrupt = true;
    }
    g_free(first);
    /* Blocks counted by the header but not (yet) referenced are never
     * reused: handing out an index below blocks_allocated could collide
     * with an entry a crash left unwritten. */
    s->next_index = MAX(s->next_index, s->blocks_allocated);
    if (s->differencing) {
        /* resolved against this image's directory, like backing names */
        n->backing_name = g_strdup(parent);
        n->backing_fmt = g_strdup("vdi");
    }
    n->size = s->disk_size;
    n->opaque = s;
    return true;
}

static int unmap_discarded(Vdi *s);

static bool
vdi_close(VdkNode *n, GError **error)
{
    Vdi *s = n->opaque;
    bool ok = true;
    /* (not when the final flush failed: metadata is still dirty) */
    if (s && s->discarded && !n->read_only && !s->corrupt && !s->hdr_dirty && s->dirty_lo == UINT64_MAX &&
        !s->allocs) {
        int r = unmap_discarded(s);
        if (r < 0) {
            g_set_error(error, VDK_ERROR, -r, "vdi: unmapping discarded blocks failed: %s", g_strerror(-r));
            ok = false;
        }
    }
    if (s) {
        g_free(s->discarded);
        g_free(s->bmap);
        g_free(s);
    }
    n->opaque = NULL;
    return ok;
}

/* ------------------------------------------------------------------------ */
/* Mapping                                                                   */
/* ------------------------------------------------------------------------ */

static VdiAlloc *
alloc_find(Vdi *s, uint32_t block)
{
    for (VdiAlloc *a = s->allocs; a; a = a->next) {
        if (a->block == block) {
            return a;
        }
    }
    return NULL;
}

static uint64_t
block_host(const Vdi *s, uint32_t index)
{
    return (uint64_t)s->offset_data + (uint64_t)index * VDI_BLOCK_SIZE;
}

static bool
is_discarded(const Vdi *s, uint32_t block)
{
    return s->discarded && (s->discarded[block / 64] >> (block % 64) & 1);
}

static void
set_discarded(Vdi *s, uint32_t block, bool on)
{
    if (!s->discarded) {
        return;
    }
    if (on) {
        s->discarded[block / 64] |= UINT64_C(1) << (block % 64);
    } else {
        s->discarded[block / 64] &= ~(UINT64_C(1) << (block % 64));
    }
}

static void
mark_dirty(Vdi *s, uint32_t block)
{
    s->dirty_lo = MIN(s->dirty_lo, (uint64_t)block);
    s->dirty_hi = MAX(s->dirty_hi, (uint64_t)block + 1);
}

/* Lock held.  Read mapping of [offset, offset+len). */
static int
map_read(Vdi *s, uint64_t offset, uint64_t len, VdkExtent *ext)
{
    uint64_t end = offset + len;
    uint32_t b = (uint32_t)(offset / VDI_BLOCK_SIZE);
    uint32_t e = s->bmap[b];
    uint64_t in = offset % VDI_BLOCK_SIZE;
    uint64_t stop = MIN(end, (uint64_t)(b + 1) * VDI_BLOCK_SIZE);
    if (VDI_IS_ALLOCATED(e) && is_discarded(s, b)) {
        /* punched; unmapped at close */
        uint32_t nb = b + 1;
        while (stop < end && VDI_IS_ALLOCATED(s->bmap[nb]) && is_discarded(s, nb)) {
            stop = MIN(end, (uint64_t)(nb + 1) * VDI_BLOCK_SIZE);
            nb++;
        }
        ext->kind = VDK_EXT_ZERO;
        ext->len = stop - offset;
        return 0;
    }
    if (VDI_IS_ALLOCATED(e)) {
        if (e >= s->blocks) {
            return -EIO; /* reported by open / check */
        }
        /* extend over blocks that follow on the host too */
        uint32_t nb = b + 1;
        while (stop < end && s->bmap[nb] == e + (nb - b) && s->bmap[nb] < s->blocks && !is_discarded(s, nb)) {
            stop = MIN(end, (uint64_t)(nb + 1) * VDI_BLOCK_SIZE);
            nb++;
        }
        ext->kind = VDK_EXT_DATA;
        ext->file = s->file;
        ext->host_offset = block_host(s, e) + in;
        /* QEMU reports holes in the file as zeroes only for static images */
        ext->recurse = s->image_type == VDI_TYPE_STATIC;
        ext->len = stop - offset;
        return 0;
    }
    /* Unallocated and discarded blocks read as zeroes of this layer (qemu
     * reports them as present zeroes); in a differencing image the
     * unallocated ones show the parent (discarded ones stay zero). */
    bool below = s->differencing && e == VDI_UNALLOCATED;
    uint32_t nb = b + 1;
    while (stop < end && !VDI_IS_ALLOCATED(s->bmap[nb]) &&
           (s->differencing && s->bmap[nb] == VDI_UNALLOCATED) == below) {
        stop = MIN(end, (uint64_t)(nb + 1) * VDI_BLOCK_SIZE);
        nb++;
    }
    ext->kind = below ? VDK_EXT_UNALLOC : VDK_EXT_ZERO;
    ext->len = stop - offset;
    return 0;
}

static void
note_modified(Vdi *s)
{
    if (!s->modified) {
        /* VirtualBox gives the image a new modification UUID when it is
         * first written after being opened. */
        s->modified = true;
        uuid_generate(s->hdr + VDI_OFF_UUID_MODIFY);
        s->hdr_dirty = true;
    }
}

static int
map_write(Vdi *s, uint64_t offset, uint64_t len, VdkExtent *ext, VdkRequest *r)
{
    if (s->corrupt) {
        return -EIO;
    }
    uint64_t end = offset + len;
    uint32_t b = (uint32_t)(offset / VDI_BLOCK_SIZE);
    uint64_t bstart = (uint64_t)b * VDI_BLOCK_SIZE;
    uint64_t bend = bstart + VDI_BLOCK_SIZE;
    VdiAlloc *busy = alloc_find(s, b);
    if (busy) {
        if (!r) {
            return -EAGAIN;
        }
        r->wait_next = busy->waiters;
        busy->waiters = r;
        return VDK_WAIT;
    }
    note_modified(s);
    uint32_t e = s->bmap[b];
    if (VDI_IS_ALLOCATED(e)) {
        /* in place (a discarded block was punched: it is zeroes, and is
         * the block's again) */
        set_discarded(s, b, false);
        return map_read(s, offset, len, ext);
    }
    if (s->next_index >= s->blocks) {
        /* only after holes left by failed writes or damage: check -r all compacts */
        return -ENOSPC;
    }
    VdiAlloc *a = g_new0(VdiAlloc, 1);
    a->block = b;
    a->index = s->next_index++;
    a->base.guest_start = bstart;
    a->base.guest_end = bend;
    a->base.file = s->file;
    a->base.host_offset = block_host(s, a->index);
    a->base.opaque = s;
    uint64_t wend = MIN(end, bend);
    bool partial = offset != bstart || wend != bend;
    /* Over a parent, the rest of the block is copied from it (a discarded
     * block reads as zeroes through the node, so that is copied too). */
    /* (the last block may reach past the disk: nothing to copy there) */
    uint64_t vend = MIN(bend, s->disk_size);
    a->base.cow = s->differencing && (offset != bstart || wend != vend);
    if (a->base.cow) {
        a->base.guest_end = vend;
    }
    if (partial && !a->base.cow) {
        a->base.prezero_off = a->base.host_offset;
        a->base.prezero_len = VDI_BLOCK_SIZE;
    }
    a->next = s->allocs;
    s->allocs = a;
    ext->kind = VDK_EXT_ALLOC;
    ext->alloc = &a->base;
    ext->len = wend - offset;
    return 0;
}

static int
vdi_map(VdkNode *n, uint64_t offset, uint64_t len, unsigned flags, VdkExtent *ext, VdkRequest *r)
{
    Vdi *s = n->opaque;
    g_mutex_lock(&n->lock);
    int ret = (flags & VDK_MAP_WRITE) ? map_write(s, offset, len, ext, r) : map_read(s, offset, len, ext);
    g_mutex_unlock(&n->lock);
    return ret;
}

static void
vdi_alloc_done(VdkNode *n, VdkAlloc *base, int err, VdkQueue *q)
{
    Vdi *s = n->opaque;
    VdiAlloc *a = (VdiAlloc *)base;
    g_mutex_lock(&n->lock);
    for (VdiAlloc **p = &s->allocs; *p; p = &(*p)->next) {
        if (*p == a) {
            *p = a->next;
            break;
        }
    }
    if (err < 0) {
        /* The index stays unused; it is given back only if nothing was
         * handed out after it (otherwise check -r all compacts it). */
        if (s->next_index == a->index + 1 && s->next_index > s->blocks_allocated) {
            s->next_index--;
        }
    } else {
        s->bmap[a->block] = a->index;
        mark_dirty(s, a->block);
        s->need_end = MAX(s->need_end, block_host(s, a->index) + VDI_BLOCK_SIZE);
        if (s->blocks_allocated < s->next_index) {
            s->blocks_allocated = s->next_index;
        }
        s->hdr_dirty = true;
    }
    VdkRequest *w = a->waiters;
    g_mutex_unlock(&n->lock);
    while (w) {
        VdkRequest *next = w->wait_next;
        w->wait_next = NULL;
        vdk_request_resume(w, q);
        w = next;
    }
    g_free(a);
}

/* ------------------------------------------------------------------------ */
/* Discard and write_zeroes                                                  */
/* ------------------------------------------------------------------------ */

/*
 * Discard: whole allocated blocks are zeroed on the host (punched where the
 * file system can, so the space goes back at once) and read as zeroes from
 * then on.  On disk they stay mapped while the image is open (the header's
 * blocks_allocated must keep counting every index the map names, and an
 * index in the middle of the data area can only be given back by moving
 * the last block into it); vdi_close() unmaps them and compacts the data
 * area, as VirtualBox's compaction does.  A write to a discarded block
 * before then reuses it in place.  Differencing images keep discarded
 * blocks as they are (unmapping would show the parent's data).
 */
static int
vdi_discard(VdkNode *n, VdkRequest *r)
{
    Vdi *s = n->opaque;
    uint64_t end = r->offset + r->len;
    uint64_t pos = vdk_align_up(r->offset, VDI_BLOCK_SIZE);
    g_mutex_lock(&n->lock);
    if (s->corrupt) {
        g_mutex_unlock(&n->lock);
        return -EIO;
    }
    if (!s->discarded && !s->differencing && s->image_type != VDI_TYPE_STATIC) {
        s->discarded = g_try_new0(uint64_t, (size_t)s->blocks / 64 + 1);
    }
    /* whole blocks (the last one ends at the end of the disk) */
    for (; pos < end && (pos + VDI_BLOCK_SIZE <= end || end == s->disk_size); pos += VDI_BLOCK_SIZE) {
        uint32_t b = (uint32_t)(pos / VDI_BLOCK_SIZE);
        uint32_t e = s->bmap[b];
        if (!VDI_IS_ALLOCATED(e) || s->differencing || alloc_find(s, b)) {
            continue;
        }
        if (s->discarded) {
            /* must read as zeroes for certain: punched, or zeroed */
            note_modified(s);
            vdk_req_file_zero(r, s->file, block_host(s, e), VDI_BLOCK_SIZE, VDK_REQ_MAY_UNMAP);
            set_discarded(s, b, true);
        } else {
            vdk_req_file_discard(r, s->file, block_host(s, e), VDI_BLOCK_SIZE);
        }
    }
    g_mutex_unlock(&n->lock);
    r->cursor = end;
    return 0;
}

/*
 * write_zeroes: allocated parts are zeroed in the file (fallocate, which
 * may punch with MAY_UNMAP); unallocated parts already read as zeroes
 * unless a parent shows through, in which case the block layer writes
 * zeroes (-ENOTSUP from the first such byte on).
 */
static int
vdi_write_zeroes(VdkNode *n, VdkRequest *r)
{
    Vdi *s = n->opaque;
    uint64_t end = r->offset + r->len;
    if (r->drv_state == 0) {
        r->drv_state = 1;
        r->cursor = r->offset;
    }
    g_mutex_lock(&n->lock);
    if (s->corrupt) {
        g_mutex_unlock(&n->lock);
        return -EIO;
    }
    while (r->cursor < end) {
        uint32_t b = (uint32_t)(r->cursor / VDI_BLOCK_SIZE);
        uint64_t stop = MIN(end, (uint64_t)(b + 1) * VDI_BLOCK_SIZE);
        VdiAlloc *busy = alloc_find(s, b);
        if (busy) {
            r->wait_next = busy->waiters;
            busy->waiters = r;
            g_mutex_unlock(&n->lock);
            return VDK_WAIT;
        }
        uint32_t e = s->bmap[b];
        if (VDI_IS_ALLOCATED(e)) {
            note_modified(s);
            uint64_t host = block_host(s, e) + r->cursor % VDI_BLOCK_SIZE;
            vdk_req_file_zero(r, s->file, host, stop - r->cursor,
                              r->flags & (VDK_REQ_MAY_UNMAP | VDK_REQ_NO_FALLBACK));
        } else if (s->differencing && e == VDI_UNALLOCATED) {
            g_mutex_unlock(&n->lock);
            return -ENOTSUP;
        }
        r->cursor = stop;
    }
    g_mutex_unlock(&n->lock);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Flush                                                                     */
/* ------------------------------------------------------------------------ */

enum {
    WB_HEADER = 0,
    WB_SYNC1,
    WB_BMAP,
    WB_SYNC2,
    WB_DONE,
};

typedef struct {
    Vdi *s;
    VdkRequest *r;
    int step;
    uint8_t *hdr; /* header copy to write, or NULL */
    uint8_t *map; /* map bytes to write, or NULL */
    uint64_t map_off, map_len;
    uint64_t lo, hi; /* entries covered (re-marked dirty on failure) */
    bool sync;       /* fdatasync (not with cache=unsafe) */
} VdiWb;

static void wb_run(VdiWb *wb);

static void
wb_sub_done(VdkRequest *sub)
{
    VdiWb *wb = sub->done_opaque;
    if (sub->error) {
        Vdi *s = wb->s;
        g_mutex_lock(&s->node->lock);
        if (wb->hdr) {
            s->hdr_dirty = true;
        }
        if (wb->map) {
            s->dirty_lo = MIN(s->dirty_lo, wb->lo);
            s->dirty_hi = MAX(s->dirty_hi, wb->hi);
        }
        g_mutex_unlock(&s->node->lock);
        wb->step = WB_DONE;
    }
    wb_run(wb);
}

static void
wb_finish(VdiWb *wb)
{
    Vdi *s = wb->s;
    g_mutex_lock(&s->node->lock);
    s->wb_running = false;
    VdkRequest *w = s->wb_waiters;
    s->wb_waiters = NULL;
    g_mutex_unlock(&s->node->lock);
    while (w) {
        VdkRequest *next = w->wait_next;
        w->wait_next = NULL;
        vdk_request_resume(w, wb->r->q);
        w = next;
    }
    free(wb->hdr);
    free(wb->map);
    g_free(wb);
}

static void
wb_run(VdiWb *wb)
{
    Vdi *s = wb->s;
    for (;;) {
        int step = wb->step++;
        switch (step) {
        case WB_HEADER:
            if (wb->hdr) {
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                struct iovec v = {wb->hdr, VDI_HEADER_BYTES};
                vdk_req_file_rw(sub, s->file, true, 0, &v, 1, VDI_HEADER_BYTES, 0);
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        case WB_SYNC1:
            /* data of the new blocks and the raised count are durable
             * before any map entry points at them */
            if (wb->map && wb->sync) {
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                vdk_req_file_flush(sub, s->file);
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        case WB_BMAP:
            if (wb->map) {
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                struct iovec v = {wb->map, (size_t)wb->map_len};
                vdk_req_file_rw(sub, s->file, true, wb->map_off, &v, 1, wb->map_len, 0);
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        case WB_SYNC2:
            if (wb->sync) {
                VdkRequest *sub = vdk_subreq(wb->r, wb_sub_done, wb);
                vdk_req_file_flush(sub, s->file);
                vdk_subreq_launch(sub);
                return;
            }
            continue;
        default:
            wb_finish(wb);
            return;
        }
    }
}

static int
vdi_flush(VdkNode *n, VdkRequest *r)
{
    Vdi *s = n->opaque;
    bool final = (r->flags & VDK_FLUSH_FINAL) != 0;
    if (s->file->no_flush && !final) {
        return 0; /* cache=unsafe: closing still writes the metadata */
    }
    g_mutex_lock(&n->lock);
    if (s->wb_running) {
        r->wait_next = s->wb_waiters;
        s->wb_waiters = r;
        g_mutex_unlock(&n->lock);
        return VDK_WAIT;
    }
    uint64_t need_end = s->need_end;
    g_mutex_unlock(&n->lock);
    if (need_end > s->file->size) {
        /* New blocks are extended to full length by the fallocate before
         * their data; where the file system could not, the file is
         * extended here (a metadata-only syscall on the queue thread) so
         * that every block the map will name lies inside the file. */
        GError *err = NULL;
        if (vdk_file_refresh_size(s->file, &err) && need_end > s->file->size) {
            vdk_file_truncate(s->file, need_end, VDK_PREALLOC_OFF, &err);
        }
        if (err) {
            int code = err->code;
            g_error_free(err);
            return -code;
        }
    }
    g_mutex_lock(&n->lock);
    if (s->wb_running) {
        r->wait_next = s->wb_waiters;
        s->wb_waiters = r;
        g_mutex_unlock(&n->lock);
        return VDK_WAIT;
    }
    VdiWb *wb = g_new0(VdiWb, 1);
    wb->s = s;
    wb->r = r;
    wb->sync = !s->file->no_flush;
    /* Snapshot what is dirty now: only allocations whose data completed
     * before this point are covered by the first sync. */
    if (s->hdr_dirty || s->dirty_lo != UINT64_MAX) {
        update_header(s);
        if (posix_memalign((void **)&wb->hdr, 4096, VDI_HEADER_BYTES) == 0) {
            memcpy(wb->hdr, s->hdr, VDI_HEADER_BYTES);
            s->hdr_dirty = false;
        } else {
            wb->hdr = NULL;
        }
    }
    if (s->dirty_lo != UINT64_MAX && wb->hdr) {
        /* whole sectors of the map */
        uint64_t lo = vdk_align_down(s->dirty_lo * 4, VDI_SECTOR) / 4;
        uint64_t hi = MIN((uint64_t)s->blocks, vdk_align_up(s->dirty_hi * 4, VDI_SECTOR) / 4);
        size_t len = (size_t)((hi - lo) * 4);
        if (posix_memalign((void **)&wb->map, 4096, vdk_align_up(len, VDI_SECTOR)) == 0) {
            for (uint64_t i = lo; i < hi; i++) {
                put32(wb->map + (i - lo) * 4, s->bmap[i]);
            }
            wb->map_off = s->offset_bmap + lo * 4;
            wb->map_len = len;
            wb->lo = lo;
            wb->hi = hi;
            s->dirty_lo = UINT64_MAX;
            s->dirty_hi = 0;
        } else {
            wb->map = NULL;
        }
    }
    if ((s->hdr_dirty && !wb->hdr) || (s->dirty_lo != UINT64_MAX && !wb->map)) {
        g_mutex_unlock(&n->lock);
        free(wb->hdr);
        g_free(wb);
        return -ENOMEM;
    }
    s->wb_running = true;
    g_mutex_unlock(&n->lock);
    wb_run(wb);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Control path: synchronous helpers                                         */
/* ------------------------------------------------------------------------ */

static int
write_header_sync(Vdi *s)
{
    update_header(s);
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, VDI_HEADER_BYTES) != 0) {
        return -ENOMEM;
    }
    memcpy(buf, s->hdr, VDI_HEADER_BYTES);
    int r = vdk_file_pwrite_sync(s->file, buf, VDI_HEADER_BYTES, 0);
    free(buf);
    s->hdr_dirty = r < 0;
    return r;
}

/* Write map entries [lo, hi) (whole sectors) at @bmap_off. */
static int
write_map_sync(Vdi *s, const uint32_t *map, uint64_t nentries, uint64_t lo, uint64_t hi, uint64_t bmap_off)
{
    lo = vdk_align_down(lo * 4, VDI_SECTOR) / 4;
    hi = MIN(nentries, vdk_align_up(hi * 4, VDI_SECTOR) / 4);
    if (hi <= lo) {
        return 0;
    }
    size_t len = (size_t)((hi - lo) * 4);
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, vdk_align_up(len, VDI_SECTOR)) != 0) {
        return -ENOMEM;
    }
    for (uint64_t i = lo; i < hi; i++) {
        put32(buf + (i - lo) * 4, map[i]);
    }
    int r = vdk_file_pwrite_sync(s->file, buf, len, bmap_off + lo * 4);
    free(buf);
    return r;
}

/* Copy the data of block index @from to index @to (1 MiB, synchronously). */
static int
copy_block_sync(Vdi *s, uint32_t from, uint32_t to)
{
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, VDI_BLOCK_SIZE) != 0) {
        return -ENOMEM;
    }
    memset(buf, 0, VDI_BLOCK_SIZE);
    uint64_t src = block_host(s, from);
    uint64_t avail = s->file->size > src ? MIN(s->file->size - src, (uint64_t)VDI_BLOCK_SIZE) : 0;
    int r = 0;
    if (avail) {
        r = vdk_file_pread_sync(s->file, buf, (size_t)vdk_align_up(avail, VDI_SECTOR), src);
        if (avail < VDI_BLOCK_SIZE) {
            memset(buf + avail, 0, VDI_BLOCK_SIZE - avail);
        }
    }
    if (r == 0) {
        r = vdk_file_pwrite_sync(s->file, buf, VDI_BLOCK_SIZE, block_host(s, to));
    }
    free(buf);
    return r;
}

/*
 * Compact the data area so that exactly the indices below @counted are in
 * use (@owner: index -> block, VDI_UNALLOCATED for a free index; @counted:
 * the number of indices the map references): the highest used blocks are
 * copied into the holes, each copy synced before its map entry names it and
 * the entry synced before the next, then blocks_allocated drops and the
 * file is cut.  A crash leaves at worst indices counted but unreferenced
 * (vdk check -r all finishes the job), never an entry naming the wrong data.
 */
static int
compact_data(Vdi *s, uint32_t *owner, uint32_t counted)
{
    int r = 0;
    uint32_t hole = 0;
    uint32_t top = MAX(s->blocks_allocated, s->next_index);
    while (true) {
        while (hole < counted && owner[hole] != VDI_UNALLOCATED) {
            hole++;
        }
        while (top > counted && (top - 1 >= s->blocks || owner[top - 1] == VDI_UNALLOCATED)) {
            top--;
        }
        if (hole >= counted || top <= counted) {
            break;
        }
        uint32_t from = top - 1;
        uint32_t b = owner[from];
        r = copy_block_sync(s, from, hole);
        if (r == 0) {
            r = vdk_file_flush_sync(s->file);
        }
        if (r == 0) {
            s->bmap[b] = hole;
            r = write_map_sync(s, s->bmap, s->blocks, b, b + 1, s->offset_bmap);
        }
        if (r == 0) {
            r = vdk_file_flush_sync(s->file);
        }
        if (r < 0) {
            return r;
        }
        owner[hole] = b;
        owner[from] = VDI_UNALLOCATED;
    }
    /* every referenced index is now below `counted` */
    s->blocks_allocated = counted;
    s->next_index = counted;
    r = write_header_sync(s);
    if (r == 0) {
        r = vdk_file_flush_sync(s->file);
    }
    if (r < 0) {
        return r;
    }
    uint64_t end = block_host(s, counted);
    if (s->file->size > end) {
        GError *e2 = NULL;
        if (!vdk_file_truncate(s->file, end, VDK_PREALLOC_OFF, &e2)) {
            g_clear_error(&e2); /* only space */
        }
    }
    return 0;
}

/*
 * At close, blocks discarded while the image was open are unmapped (their
 * entries written and synced first, so no entry names an index about to be
 * reused) and the data area is compacted.
 */
static int
unmap_discarded(Vdi *s)
{
    bool any = false;
    for (uint32_t b = 0; b < s->blocks; b++) {
        if (VDI_IS_ALLOCATED(s->bmap[b]) && is_discarded(s, b)) {
            s->bmap[b] = VDI_UNALLOCATED;
            mark_dirty(s, b);
            any = true;
        }
    }
    if (!any) {
        return 0;
    }
    int r = write_map_sync(s, s->bmap, s->blocks, s->dirty_lo, s->dirty_hi, s->offset_bmap);
    if (r == 0) {
        s->dirty_lo = UINT64_MAX;
        s->dirty_hi = 0;
        r = vdk_file_flush_sync(s->file);
    }
    if (r < 0) {
        return r;
    }
    uint32_t *owner = g_try_new(uint32_t, s->blocks);
    if (!owner) {
        return 0; /* the blocks stay counted: a leak, not a corruption */
    }
    for (uint32_t i = 0; i < s->blocks; i++) {
        owner[i] = VDI_UNALLOCATED;
    }
    uint32_t counted = 0;
    for (uint32_t b = 0; b < s->blocks; b++) {
        uint32_t e = s->bmap[b];
        if (VDI_IS_ALLOCATED(e)) {
            if (e >= s->blocks || owner[e] != VDI_UNALLOCATED) {
                g_free(owner); /* damage: left to vdk check */
                return 0;
            }
            owner[e] = b;
            counted++;
        }
    }
    r = compact_data(s, owner, counted);
    g_free(owner);
    return r;
}

/* ------------------------------------------------------------------------ */
/* Resize                                                                    */
/* ------------------------------------------------------------------------ */

/*
 * Grow.  The map gains entries for the new blocks: in place when the gap
 * before the data area has room (new entries written, synced, then the
 * header); otherwise the map moves.  Moving: the first data blocks are
 * copied to the end of the file and their entries repointed (each step
 * synced), which frees the start of the data area; the new map, with every
 * index renumbered, is written there; one header write (a single sector)
 * then switches map offset, data offset and sizes together.  A crash
 * before that write leaves the old image intact (plus copies); after it,
 * the new one.
 */
static bool
vdi_truncate(VdkNode *n, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error)
{
    Vdi *s = n->opaque;
    (void)shrink;
    if (size < n->size) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vdi: shrinking is not supported");
        return false;
    }
    if (s->corrupt) {
        g_set_error(error, VDK_ERROR, EIO, "vdi: the block map is damaged (run 'vdk check -r all' first)");
        return false;
    }
    if (s->differencing) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vdi: resizing differencing images is not supported");
        return false;
    }
    bool fixed = s->image_type == VDI_TYPE_STATIC;
    if (prealloc != VDK_PREALLOC_OFF && !fixed) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vdi: preallocation on resize is only for static images");
        return false;
    }
    size = vdk_align_up(size, VDI_SECTOR);
    uint64_t nblocks64 = vdk_align_up(size, VDI_BLOCK_SIZE) / VDI_BLOCK_SIZE;
    if (nblocks64 > VDI_MAX_BLOCKS) {
        g_set_error(error, VDK_ERROR, EFBIG,
                    "vdi: %" G_GUINT64_FORMAT " bytes need %" G_GUINT64_FORMAT " blocks (max %u)", size,
                    nblocks64, VDI_MAX_BLOCKS);
        return false;
    }
    uint32_t nblocks = MAX((uint32_t)nblocks64, s->blocks);
    uint32_t old_blocks = s->blocks;
    if (!vdk_file_refresh_size(s->file, error)) {
        return false;
    }
    uint64_t need_end = (uint64_t)s->offset_bmap + (uint64_t)nblocks * 4;
    uint32_t shift = 0; /* blocks the data area moves up by */
    uint32_t new_bmap_off = s->offset_bmap;
    uint32_t new_data_off = s->offset_data;
    if (need_end > s->offset_data) {
        uint64_t map_bytes = vdk_align_up((uint64_t)nblocks * 4, VDI_SECTOR);
        shift = (uint32_t)((map_bytes + VDI_BLOCK_SIZE - 1) / VDI_BLOCK_SIZE);
        uint64_t nd = (uint64_t)s->offset_data + (uint64_t)shift * VDI_BLOCK_SIZE;
        uint32_t moved = 0;
        for (uint32_t b = 0; b < old_blocks; b++) {
            moved += VDI_IS_ALLOCATED(s->bmap[b]) && s->bmap[b] < shift;
        }
        /* The moved blocks get indexes the old header can describe (below
         * its blocks-in-image), so that the image stays valid until the
         * switch. */
        if (nd > UINT32_MAX || (uint64_t)s->next_index + moved > old_blocks) {
            g_set_error(
                error, VDK_ERROR, ENOSPC,
                "vdi: the block map (at 0x%x, room for %u entries before the data at 0x%x) cannot grow to %u "
                "entries in place, and moving the first %u data blocks out of its way needs %u free block "
                "indexes (%u are free); use 'vdk convert -O vdi' to a larger new image",
                s->offset_bmap, (s->offset_data - s->offset_bmap) / 4, s->offset_data, nblocks, shift, moved,
                old_blocks - MIN(old_blocks, s->next_index));
            return false;
        }
        new_bmap_off = s->offset_data;
        new_data_off = (uint32_t)nd;
    }
    uint32_t *nm = g_try_new(uint32_t, nblocks);
    if (!nm) {
        g_set_error(error, VDK_ERROR, ENOMEM, "vdi: cannot allocate the block map (%u entries)", nblocks);
        return false;
    }
    int r = 0;
    /* From here on the disk changes: a failure leaves the image valid on
     * disk but this open unusable for writing (reopen it). */
    /* 1. pending metadata, in the usual order */
    if (s->hdr_dirty || s->dirty_lo != UINT64_MAX) {
        r = vdk_file_flush_sync(s->file);
        if (r == 0) {
            r = write_header_sync(s);
        }
        if (r == 0) {
            r = vdk_file_flush_sync(s->file);
        }
        if (r == 0 && s->dirty_lo != UINT64_MAX) {
            r = write_map_sync(s, s->bmap, s->blocks, s->dirty_lo, s->dirty_hi, s->offset_bmap);
            s->dirty_lo = UINT64_MAX;
            s->dirty_hi = 0;
        }
        if (r < 0) {
            goto fail;
        }
    }
    /* 2. move the blocks in the way */
    for (uint32_t b = 0; b < old_blocks && shift; b++) {
        uint32_t e = s->bmap[b];
        if (!VDI_IS_ALLOCATED(e) || e >= shift) {
            continue;
        }
        uint32_t to = s->next_index++;
        r = copy_block_sync(s, e, to);
        if (r == 0) {
            r = vdk_file_flush_sync(s->file);
        }
        if (r == 0 && s->blocks_allocated < s->next_index) {
            s->blocks_allocated = s->next_index;
            r = write_header_sync(s);
            if (r == 0) {
                r = vdk_file_flush_sync(s->file);
            }
        }
        if (r == 0) {
            s->bmap[b] = to;
            r = write_map_sync(s, s->bmap, old_blocks, b, b + 1, s->offset_bmap);
        }
        if (r == 0) {
            r = vdk_file_flush_sync(s->file);
        }
        if (r < 0) {
            goto fail;
        }
    }
    /* 3. the new map: renumbered, new entries unallocated (static: new
     * blocks appended) */
    uint32_t next = s->next_index - shift;
    for (uint32_t b = 0; b < nblocks; b++) {
        uint32_t e = b < old_blocks ? s->bmap[b] : VDI_UNALLOCATED;
        if (VDI_IS_ALLOCATED(e)) {
            e -= shift;
        } else if (fixed && b >= old_blocks) {
            e = next++;
        }
        nm[b] = e;
    }
    if (fixed && next > s->next_index - shift) {
        uint64_t end = (uint64_t)new_data_off + (uint64_t)next * VDI_BLOCK_SIZE;
        VdkPrealloc mode = prealloc == VDK_PREALLOC_METADATA ? VDK_PREALLOC_OFF : prealloc;
        if (end > s->file->size && !vdk_file_truncate(s->file, end, mode, error)) {
            g_free(nm);
            s->corrupt = true;
            return false;
        }
    }
    r = write_map_sync(s, nm, nblocks, shift ? 0 : old_blocks, nblocks, new_bmap_off);
    if (r == 0) {
        r = vdk_file_flush_sync(s->file);
    }
    if (r < 0) {
        goto fail;
    }
    /* 4. one header write switches to the new layout */
    s->offset_bmap = new_bmap_off;
    s->offset_data = new_data_off;
    s->blocks = nblocks;
    s->disk_size = size;
    s->next_index = next;
    s->blocks_allocated = MAX(next, s->blocks_allocated - MIN(s->blocks_allocated, shift));
    g_free(s->bmap);
    s->bmap = nm;
    nm = NULL;
    r = write_header_sync(s);
    if (r == 0) {
        r = vdk_file_flush_sync(s->file);
    }
    if (r < 0) {
        goto fail;
    }
    n->size = size;
    return true;

fail:
    g_free(nm);
    s->corrupt = true;
    g_set_error(error, VDK_ERROR, -r, "vdi: resize failed: %s (the image on disk is consistent; reopen it)",
                g_strerror(-r));
    return false;
}

/* ------------------------------------------------------------------------ */
/* Create                                                                    */
/* ------------------------------------------------------------------------ */

static const VdkOptionDesc vdi_create_opts[] = {
    {"size", VDK_OPT_SIZE, "Virtual disk size", NULL, false},
    {"static", VDK_OPT_BOOL, "VDI static (pre-allocated) image", "off", true},
    {"preallocation", VDK_OPT_STRING,
     "Preallocation mode (allowed values: off, metadata (= static=on), falloc, full; falloc and full make a "
     "static image)",
     NULL, false},
    {NULL, 0, NULL, NULL, false},
};

static bool
vdi_create(VdkCreateCtx *cc, const VdkCreateOptions *o, GError **error)
{
    uint64_t size = 0;
    bool present, is_static;
    VdkPrealloc prealloc;
    if (!vdk_create_opt_size(o, "size", &size, &present, error)) {
        return false;
    }
    if (!present) {
        g_set_error(error, VDK_ERROR, EINVAL, "Image creation needs a size parameter");
        return false;
    }
    if (!vdk_create_opt_bool(o, "static", false, &is_static, error) ||
        !vdk_create_opt_prealloc(o, &prealloc, error)) {
        return false;
    }
    if (vdk_create_opt(o, "backing_file")) {
        g_set_error(error, VDK_ERROR, ENOTSUP, "vdi: creating differencing images is not supported");
        return false;
    }
    if (is_static && prealloc == VDK_PREALLOC_OFF) {
        prealloc = VDK_PREALLOC_METADATA;
    }
    if (prealloc != VDK_PREALLOC_OFF) {
        is_static = true;
    }
    size = vdk_align_up(size, VDI_SECTOR);
    uint64_t blocks = vdk_align_up(size, VDI_BLOCK_SIZE) / VDI_BLOCK_SIZE;
    if (blocks > VDI_MAX_BLOCKS) {
        g_set_error(error, VDK_ERROR, EFBIG, "vdi: image size %" G_GUINT64_FORMAT " is too large (max %llu)",
                    size, (unsigned long long)VDI_MAX_BLOCKS * VDI_BLOCK_SIZE);
        return false;
    }
    uint64_t bmap_off = VDI_HEADER_BYTES;
    uint64_t data_off = vdk_align_up(bmap_off + blocks * 4, VDI_DATA_ALIGN);
    uint64_t end = data_off + (is_static ? blocks * VDI_BLOCK_SIZE : 0);
    VdkFile *f = vdk_create_main_file(cc);
    if ((prealloc == VDK_PREALLOC_FALLOC || prealloc == VDK_PREALLOC_FULL) &&
        !vdk_create_check_space(cc, end, error)) {
        return false;
    }
    size_t map_bytes = (size_t)vdk_align_up(blocks * 4, VDI_SECTOR);
    size_t total = VDI_HEADER_BYTES + map_bytes;
    uint8_t *buf = NULL;
    if (posix_memalign((void **)&buf, 4096, total) != 0) {
        g_set_error(error, VDK_ERROR, ENOMEM, "vdi: out of memory");
        return false;
    }
    memset(buf, 0, total);
    /* the banner qemu writes (VirtualBox writes its own name here) */
    static const char banner[] = "<<< QEMU VM Virtual Disk Image >>>\n";
    memcpy(buf, banner, sizeof(banner) - 1);
    put32(buf + VDI_OFF_SIGNATURE, VDI_SIGNATURE);
    put32(buf + VDI_OFF_VERSION, VDI_VERSION_1_1);
    put32(buf + VDI_OFF_HEADER_SIZE, 0x180);
    put32(buf + VDI_OFF_TYPE, is_static ? VDI_TYPE_STATIC : VDI_TYPE_DYNAMIC);
    put32(buf + VDI_OFF_BMAP, (uint32_t)bmap_off);
    put32(buf + VDI_OFF_DATA, (uint32_t)data_off);
    put32(buf + VDI_OFF_SECTOR_SIZE, VDI_SECTOR);
    put64(buf + VDI_OFF_DISK_SIZE, size);
    put32(buf + VDI_OFF_BLOCK_SIZE, VDI_BLOCK_SIZE);
    put32(buf + VDI_OFF_BLOCKS, (uint32_t)blocks);
    put32(buf + VDI_OFF_ALLOCATED, is_static ? (uint32_t)blocks : 0);
    uuid_generate(buf + VDI_OFF_UUID_IMAGE);
    uuid_generate(buf + VDI_OFF_UUID_MODIFY);
    for (uint64_t b = 0; b < blocks; b++) {
        put32(buf + VDI_HEADER_BYTES + b * 4, is_static ? (uint32_t)b : VDI_UNALLOCATED);
    }
    /* the map's tail sector padding: unused entries stay unallocated */
    for (uint64_t i = blocks * 4; i < map_bytes; i++) {
        buf[VDI_HEADER_BYTES + i] = 0;
    }
    int r = vdk_file_pwrite_sync(f, buf, total, 0);
    free(buf);
    if (r < 0) {
        g_set_error(error, VDK_ERROR, -r, "vdi: cannot write the new image: %s", g_strerror(-r));
        return false;
    }
    if (!vdk_file_truncate(f, data_off, VDK_PREALLOC_OFF, error)) {
        return false;
    }
    if (is_static && end > data_off) {
        VdkPrealloc mode = prealloc == VDK_PREALLOC_METADATA ? VDK_PREALLOC_OFF : prealloc;
        if (!vdk_file_truncate(f, end, mode, error)) {
            return false;
        }
    }
    return true;
}

/* measure (qemu-img cannot for vdi): the layout create makes, with a
 * block for every 1 MiB of the source that holds data (all of them for a
 * static image). */
static bool
vdi_measure(const VdkCreateOptions *o, VdkImage *src, uint64_t size, VdkMeasure *m, GError **error)
{
    bool is_static;
    VdkPrealloc prealloc;
    if (!vdk_create_opt_bool(o, "static", false, &is_static, error) || !vdk_create_opt_prealloc(o, &prealloc, error)) {
        return false;
    }
    if (prealloc != VDK_PREALLOC_OFF) {
        is_static = true;
    }
    size = vdk_align_up(size, VDI_SECTOR);
    uint64_t blocks = vdk_align_up(size, VDI_BLOCK_SIZE) / VDI_BLOCK_SIZE;
    if (blocks > VDI_MAX_BLOCKS) {
        g_set_error(error, VDK_ERROR, EFBIG, "vdi: image size %" G_GUINT64_FORMAT " is too large (max %llu)", size,
                    (unsigned long long)VDI_MAX_BLOCKS * VDI_BLOCK_SIZE);
        return false;
    }
    uint64_t data_off = vdk_align_up(VDI_HEADER_BYTES + blocks * 4, VDI_DATA_ALIGN);
    m->fully_allocated = data_off + blocks * VDI_BLOCK_SIZE;
    uint64_t used = 0;
    if (is_static) {
        used = blocks * VDI_BLOCK_SIZE;
    } else if (src && !vdk_measure_allocated(src, VDI_BLOCK_SIZE, &used, error)) {
        return false;
    }
    m->required = data_off + MIN(used, blocks * VDI_BLOCK_SIZE);
    return true;
}

/* ------------------------------------------------------------------------ */
/* Info and check                                                            */
/* ------------------------------------------------------------------------ */

static void
vdi_info(VdkNode *n, VdkInfo *info)
{
    info->cluster_size = VDI_BLOCK_SIZE; /* qemu-img reports the block size */
    /* differencing images: the parent the caller named */
    info->backing_filename = g_strdup(n->backing_name);
    info->backing_format = g_strdup(n->backing_fmt);
}

/*
 * qemu-img check's vdi checks and wording: entries out of range, block
 * indexes used twice, and the header's blocks_allocated against the map;
 * vdk adds entries past the end of the file.  Repair (-r all; qemu-img
 * cannot repair vdi): out-of-range entries become unallocated (their data
 * is gone), the second user of a shared block gets a copy of its own, the
 * file is extended to hold every block, and holes in the data area are
 * filled by moving the last blocks down so that the count and the map
 * agree again.  Every step is synced before the next.
 */
static bool
vdi_check(VdkNode *n, int fix, VdkCheckResult *res, GError **error)
{
    Vdi *s = n->opaque;
    uint32_t *owner = g_try_new(uint32_t, s->blocks ? s->blocks : 1);
    if (!owner) {
        g_set_error(error, VDK_ERROR, ENOMEM, "vdi: out of memory");
        return false;
    }
    bool repair = (fix & VDK_CHECK_FIX_ERRORS) && !n->read_only;
    int r = 0;
    /* (fallocate extensions are not tracked in file->size) */
    if (!vdk_file_refresh_size(s->file, error)) {
        g_free(owner);
        return false;
    }
    for (int pass = 0; pass < 2; pass++) {
        bool fixing = repair && pass == 0;
        uint64_t problems = 0;
        for (uint32_t i = 0; i < s->blocks; i++) {
            owner[i] = VDI_UNALLOCATED;
        }
        uint32_t counted = 0;
        uint64_t max_end = 0;
        for (uint32_t b = 0; b < s->blocks; b++) {
            uint32_t e = s->bmap[b];
            if (!VDI_IS_ALLOCATED(e)) {
                continue;
            }
            if (e >= s->blocks) {
                if (pass == 0 || !repair) {
                    g_ptr_array_add(res->messages,
                                    g_strdup_printf("ERROR: block index %u too large, is %u", b, e));
                }
                problems++;
                if (fixing) {
                    s->bmap[b] = VDI_UNALLOCATED;
                    mark_dirty(s, b);
                    res->corruptions_fixed++;
                }
                continue;
            }
            counted++;
            if (owner[e] != VDI_UNALLOCATED) {
                if (pass == 0 || !repair) {
                    g_ptr_array_add(res->messages,
                                    g_strdup_printf("ERROR: block index %u also used by %u", e, e));
                }
                problems++;
                if (fixing) {
                    /* a copy of its own, at the end */
                    uint32_t to = MAX(s->next_index, s->blocks_allocated);
                    if (to >= s->blocks) {
                        s->bmap[b] = VDI_UNALLOCATED; /* no room: it loses the shared data */
                        mark_dirty(s, b);
                        counted--;
                    } else {
                        r = copy_block_sync(s, e, to);
                        if (r == 0) {
                            s->next_index = to + 1;
                            s->blocks_allocated = MAX(s->blocks_allocated, to + 1);
                            r = vdk_file_flush_sync(s->file);
                        }
                        if (r == 0) {
                            r = write_header_sync(s);
                        }
                        if (r == 0) {
                            r = vdk_file_flush_sync(s->file);
                        }
                        if (r < 0) {
                            goto io_error;
                        }
                        s->bmap[b] = to;
                        mark_dirty(s, b);
                        owner[to] = b;
                    }
                    res->corruptions_fixed++;
                }
                continue;
            }
            owner[e] = b;
            max_end = MAX(max_end, block_host(s, e) + VDI_BLOCK_SIZE);
        }
        if (fixing && s->dirty_lo != UINT64_MAX) {
            r = write_map_sync(s, s->bmap, s->blocks, s->dirty_lo, s->dirty_hi, s->offset_bmap);
            s->dirty_lo = UINT64_MAX;
            s->dirty_hi = 0;
            if (r == 0) {
                r = vdk_file_flush_sync(s->file);
            }
            if (r < 0) {
                goto io_error;
            }
        }
        if (max_end > s->file->size) {
            if (pass == 0 || !repair) {
                g_ptr_array_add(res->messages,
                                g_strdup_printf("ERROR: the image file is shorter (%" G_GUINT64_FORMAT
                                                " bytes) than its blocks need (%" G_GUINT64_FORMAT ")",
                                                s->file->size, max_end));
            }
            problems++;
            if (fixing) {
                /* the missing part read as zeroes; now it is zeroes */
                GError *e2 = NULL;
                if (!vdk_file_truncate(s->file, max_end, VDK_PREALLOC_OFF, &e2)) {
                    g_propagate_error(error, e2);
                    g_free(owner);
                    return false;
                }
                res->corruptions_fixed++;
            }
        }
        if (counted != s->blocks_allocated) {
            if (pass == 0 || !repair) {
                g_ptr_array_add(res->messages,
                                g_strdup_printf("ERROR: allocated blocks mismatch, is %u, should be %u",
                                                counted, s->blocks_allocated));
            }
            problems++;
            if (fixing) {
                r = compact_data(s, owner, counted);
                if (r < 0) {
                    goto io_error;
                }
                res->corruptions_fixed++;
            }
        }
        if (!fixing) {
            res->corruptions = problems;
            break;
        }
        if (problems == 0) {
            break;
        }
    }
    g_free(owner);
    if (repair && res->corruptions == 0) {
        s->corrupt = false;
    }
    return true;

io_error:
    g_free(owner);
    g_set_error(error, VDK_ERROR, -r, "vdi: repair failed: %s", g_strerror(-r));
    return false;
}

static const VdkOptionDesc vdi_open_opts[] = {
    {"parent", VDK_OPT_STRING, "The parent image of a differencing image (a vdi file)", NULL, false},
    {NULL, 0, NULL, NULL, false},
};

const VdkFormat vdk_format_vdi = {
    .name = "vdi",
    .probe = vdi_probe,
    .open = vdi_open,
    .close = vdi_close,
    .map = vdi_map,
    .alloc_done = vdi_alloc_done,
    .discard = vdi_discard,
    .write_zeroes = vdi_write_zeroes,
    .flush = vdi_flush,
    .truncate = vdi_truncate,
    .create = vdi_create,
    .measure = vdi_measure,
    .create_opts = vdi_create_opts,
    .open_opts = vdi_open_opts,
    .info = vdi_info,
    .check = vdi_check,
};
