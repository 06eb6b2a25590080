/* SPDX-License-Identifier: MIT */
/*
 * fuzz-vmdk-desc.c - libFuzzer target: the vmdk text descriptor parser
 * (what an embedded or separate descriptor file goes through) and the
 * descriptor rewriter used when a write changes the CID.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "formats/vmdk.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > VMDK_MAX_DESC_BYTES) {
        return 0;
    }
    /* the parser gets the bytes as read from the file (not NUL-terminated) */
    char *text = g_malloc(size ? size : 1);
    memcpy(text, data, size);
    VmdkDesc d;
    memset(&d, 0, sizeof(d));
    GError *err = NULL;
    if (vdk_vmdk_desc_parse(text, size, &d, &err)) {
        char *z = g_strndup(text, size);
        char *out = vdk_vmdk_desc_set_key(z, "CID", "12345678");
        if (out) {
            VmdkDesc d2;
            memset(&d2, 0, sizeof(d2));
            GError *e2 = NULL;
            /* a descriptor we rewrote must still parse */
            if (!vdk_vmdk_desc_parse(out, strlen(out), &d2, &e2)) {
                abort();
            }
            vdk_vmdk_desc_clear(&d2);
            g_free(out);
        }
        g_free(z);
    }
    g_clear_error(&err);
    vdk_vmdk_desc_clear(&d);
    g_free(text);
    return 0;
}
