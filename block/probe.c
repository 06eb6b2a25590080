/* SPDX-License-Identifier: MIT */
/*
 * probe.c - recognising image formats from their first sector, including
 * formats this build has no driver for.
 *
 * Two rules depend on it:
 *   - a file that looks like a format vdk cannot open is refused with that
 *     format's name, never silently opened as raw;
 *   - on a raw image whose format was probed (not named) for a writable
 *     open, a write that would make sector 0 look like any such format is
 *     refused (qemu's rule): otherwise a guest could turn its disk into,
 *     say, a qcow2 with a backing file pointing at a host file, which the
 *     next probing open would follow.
 * The signatures and their extra conditions are those the formats' own
 * specifications define (and that qemu's probes check), so both tools agree
 * on what is "not raw".
 */
#include "config.h"

#include <string.h>

#include "block/block.h"

static uint32_t
be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint32_t
le32(const uint8_t *p)
{
    return ((uint32_t)p[3] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[1] << 8) | p[0];
}

static uint16_t
be16(const uint8_t *p)
{
    return (uint16_t)(((unsigned)p[0] << 8) | p[1]);
}

/* A VMDK text descriptor: optional whitespace/comments, then a line that
 * starts a descriptor. */
static bool
looks_like_vmdk_descriptor(const uint8_t *buf, size_t len)
{
    static const char sig[] = "# Disk DescriptorFile";
    size_t i = 0;
    while (i < len && (buf[i] == ' ' || buf[i] == '\t' || buf[i] == '\r' || buf[i] == '\n')) {
        i++;
    }
    return len - i >= sizeof(sig) - 1 && memcmp(buf + i, sig, sizeof(sig) - 1) == 0;
}

const char *
vdk_probe_foreign(const uint8_t *buf, size_t len)
{
    if (len >= 8 && memcmp(buf, "QFI\xfb", 4) == 0) {
        uint32_t version = be32(buf + 4);
        if (version >= 2) {
            return "qcow2";
        }
        if (version == 1) {
            return "qcow";
        }
    }
    if (len >= 0x48 && le32(buf + 0x40) == 0xbeda107fu && le32(buf + 0x44) == 0x00010001u) {
        return "vdi";
    }
    if (len >= 4 && (memcmp(buf, "KDMV", 4) == 0 || memcmp(buf, "COWD", 4) == 0)) {
        return "vmdk";
    }
    if (looks_like_vmdk_descriptor(buf, len)) {
        return "vmdk";
    }
    if (len >= 8 && memcmp(buf, "conectix", 8) == 0) {
        return "vpc";
    }
    if (len >= 8 && memcmp(buf, "vhdxfile", 8) == 0) {
        return "vhdx";
    }
    if (len >= 4 && memcmp(buf, "QED\0", 4) == 0) {
        return "qed";
    }
    if (len >= 6 && memcmp(buf, "LUKS\xba\xbe", 6) == 0 && len >= 8 && be16(buf + 6) == 1) {
        return "luks";
    }
    if (len >= 20 && (memcmp(buf, "WithoutFreeSpace", 16) == 0 || memcmp(buf, "WithouFreSpacExt", 16) == 0) &&
        le32(buf + 16) == 2) {
        return "parallels";
    }
    if (len >= 68 && memcmp(buf, "Bochs Virtual HD Image", 23) == 0 && memcmp(buf + 32, "Redolog", 8) == 0 &&
        memcmp(buf + 48, "Growing", 8) == 0 && (le32(buf + 64) == 0x00020000u || le32(buf + 64) == 0x00010000u)) {
        return "bochs";
    }
    static const char cloop[] = "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    if (len >= sizeof(cloop) - 1 && memcmp(buf, cloop, sizeof(cloop) - 1) == 0) {
        return "cloop";
    }
    return NULL;
}
