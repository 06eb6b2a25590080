/* SPDX-License-Identifier: MIT */
/* qcow2-check.c - placeholder during bring-up (replaced below) */
#include "config.h"
#include <errno.h>
#include "formats/qcow2/qcow2.h"
bool
qcow2_check(VdkNode *n, int fix, VdkCheckResult *res, GError **error)
{
    (void)n; (void)fix; (void)res;
    g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: check not implemented yet");
    return false;
}
bool
qcow2_repair_refcounts(Qcow2 *s, GError **error)
{
    (void)s;
    g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: repair not implemented yet");
    return false;
}
bool
qcow2_truncate(VdkNode *n, uint64_t size, bool shrink, VdkPrealloc prealloc, GError **error)
{
    (void)n; (void)size; (void)shrink; (void)prealloc;
    g_set_error(error, VDK_ERROR, ENOTSUP, "qcow2: resize not implemented yet");
    return false;
}
