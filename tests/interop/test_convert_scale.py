#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk convert at scale: an 8 TiB sparse source (raw and qcow2, a few
data ranges at the start, the middle and the very end) converts to raw,
qcow2 and vdi in well under a second (the bound here is a generous 10 s
for a loaded CI machine), with the data where it belongs; and memory
stays bounded (`--stats` peak RSS) whatever the image size: a large
sparse image with data scattered over it, and a fully allocated one."""

import json
import os
import time

from vdktest import KiB, MiB, Suite, expect, expect_rc, main

suite = Suite('convert-scale')
TiB = 1 << 40
BIG = 8 * TiB
TIME_BOUND = 10.0
RSS_BOUND = 160 * MiB
SPOTS = [(0x5a, 0, 64 * KiB), (0xa5, 4 * TiB + 123 * MiB, MiB), (0x3c, BIG - 4 * KiB, 4 * KiB)]


def stats(res):
    lines = [l for l in res.out.splitlines() if l.startswith('{"type": "stats"')]
    expect(lines, 'no --stats line', res)
    return json.loads(lines[-1])


def make_big(t, fmt):
    name = 'big.' + fmt
    if fmt == 'raw':
        t.sparse(name, BIG)
    else:
        expect_rc(t.qemu_img('create', '-q', '-f', fmt, name, str(BIG)), 0, 'qemu-img create')
    t.qemu_io(name, *['write -P 0x%x %d %d' % s for s in SPOTS], fmt=fmt)
    return name


def check_spots(t, name, fmt):
    cmds = ['read -P 0x%x %d %d' % s for s in SPOTS]
    # zeroes around and between the data
    cmds += ['read -P 0 %d %d' % (64 * KiB, MiB), 'read -P 0 %d %d' % (4 * TiB, MiB),
             'read -P 0 %d %d' % (BIG - 8 * KiB, 4 * KiB)]
    res = t.qemu_io_raw(name, cmds, fmt=fmt)
    expect(res.rc == 0 and 'fail' not in res.out.lower() + res.err.lower(), '%s: data not where it belongs' % name,
           res)


def t_big_sparse(t, src_fmt, dst_fmt):
    src = make_big(t, src_fmt)
    dst = 'out.' + dst_fmt
    t0 = time.monotonic()
    res = t.vdk('convert', '--stats', '-f', src_fmt, '-O', dst_fmt, src, dst, timeout=120)
    elapsed = time.monotonic() - t0
    expect_rc(res, 0, 'vdk convert')
    o = stats(res)
    expect(elapsed < TIME_BOUND, '8 TiB sparse %s -> %s took %.2f s (bound %.0f s)' %
           (src_fmt, dst_fmt, elapsed, TIME_BOUND), res)
    expect(o['max_rss_bytes'] < RSS_BOUND, 'peak RSS %d bytes (bound %d)' % (o['max_rss_bytes'], RSS_BOUND), res)
    expect(o['bytes'] == BIG, 'stats bytes %d' % o['bytes'], res)
    check_spots(t, dst, dst_fmt)
    # no data range of the 8 TiB became allocated in the target beyond the spots
    alloc = os.stat(t.path(dst)).st_blocks * 512
    expect(alloc < 64 * MiB, '%s has %d bytes allocated' % (dst, alloc))


def t_rss_scattered(t, dst_fmt):
    """64 GiB raw with 1 MiB of data every 256 MiB (256 extents): peak RSS
    stays near the copy buffers, not proportional to the image or data."""
    src = t.sparse('scat.raw', 64 << 30)
    with open(t.path(src), 'r+b') as f:
        for i in range(256):
            f.seek(i * 256 * MiB + (i % 7) * 4096)
            f.write(bytes([i % 251 + 1]) * MiB)
    res = t.vdk('convert', '--stats', '-f', 'raw', '-O', dst_fmt, src, 'out.' + dst_fmt, timeout=300)
    expect_rc(res, 0, 'vdk convert')
    o = stats(res)
    expect(o['max_rss_bytes'] < RSS_BOUND, 'peak RSS %d bytes (bound %d)' % (o['max_rss_bytes'], RSS_BOUND), res)
    cmp = t.qemu_img('compare', '-f', 'raw', '-F', dst_fmt, src, 'out.' + dst_fmt)
    expect(cmp.rc == 0, 'target differs', cmp)


def t_rss_full(t, extra):
    """A fully allocated 512 MiB source: RSS bounded by the copy buffers
    and (with -c) the compression pool, not by the data size."""
    with open(t.path('full.raw'), 'wb') as f:
        for _ in range(512):
            f.write(os.urandom(MiB // 2) + bytes(MiB // 2))
    res = t.vdk('convert', '--stats', '-f', 'raw', '-O', 'qcow2', *extra, 'full.raw', 'out.qcow2', timeout=300)
    expect_rc(res, 0, 'vdk convert')
    o = stats(res)
    expect(o['max_rss_bytes'] < RSS_BOUND, 'peak RSS %d bytes (bound %d)' % (o['max_rss_bytes'], RSS_BOUND), res)


for s in ('raw', 'qcow2'):
    for d in ('raw', 'qcow2', 'vdi'):
        suite.add('8TiB-sparse-%s-to-%s' % (s, d), t_big_sparse, s, d)
for d in ('raw', 'qcow2', 'vmdk', 'vdi'):
    suite.add('rss-scattered-64GiB-to-%s' % d, t_rss_scattered, d)
suite.add('rss-full-512MiB-to-qcow2', t_rss_full, ())
suite.add('rss-full-512MiB-to-qcow2-compressed', t_rss_full, ('-c',))

if __name__ == '__main__':
    main(suite)
