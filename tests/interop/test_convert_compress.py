#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk convert -c packs compressed clusters as tightly as qemu-img: the
compressed data of one cluster continues into the next host cluster
instead of leaving the rest of a cluster unused, so the target is no more
than 3% larger than qemu-img's (allocated bytes and image end), reads back
identical, and qemu-img check finds every refcount right (a cluster that
compressed data spans is referenced from both sides)."""

import os
import random
import re

from vdktest import MiB, Suite, expect, expect_rc, main

suite = Suite('convert-compress')


def make_source(t, size=24 * MiB):
    """Mixed compressibility: text-like runs, random blocks, zero holes."""
    rng = random.Random(7)
    words = [b'alpha', b'beta', b'gamma', b'delta', b'kernel', b'image', b'0x1f', b'\n', b' ', b'qcow2']
    with open(t.path('src.raw'), 'wb') as f:
        f.truncate(size)
        off = 0
        while off < size:
            n = rng.choice((4096, 16384, 65536, 200000))
            n = min(n, size - off)
            k = rng.random()
            f.seek(off)
            if k < 0.45:
                f.write(b''.join(rng.choice(words) for _ in range(n // 4))[:n])
            elif k < 0.75:
                f.write(os.urandom(n // 3) + bytes(n - n // 3))
            elif k < 0.85:
                f.write(os.urandom(n))
            off += n
    return 'src.raw'


def end_offset(t, name):
    res = t.qemu_img('check', name)
    expect_rc(res, 0, 'qemu-img check %s' % name)
    m = re.search(r'Image end offset: (\d+)', res.out)
    expect(m, 'no image end offset', res)
    return int(m.group(1))


def t_packing(t, opts):
    src = make_source(t)
    o = ['-o', opts] if opts else []
    res = t.vdk('convert', '-c', '-f', 'raw', '-O', 'qcow2', *o, src, 'v.qcow2')
    expect_rc(res, 0, 'vdk convert -c')
    res = t.qemu_img('convert', '-c', '-f', 'raw', '-O', 'qcow2', *o, src, 'q.qcow2')
    expect_rc(res, 0, 'qemu-img convert -c')
    cmp = t.qemu_img('compare', '-f', 'raw', '-F', 'qcow2', src, 'v.qcow2')
    expect(cmp.rc == 0, 'vdk -c target differs from the source', cmp)
    ev, eq = end_offset(t, 'v.qcow2'), end_offset(t, 'q.qcow2')
    av, aq = t.blocks_bytes('v.qcow2'), t.blocks_bytes('q.qcow2')
    # with 4 KiB clusters metadata (L2 tables, refcount blocks) is a larger
    # share of a small image and vdk lays it out differently: 5% there
    bound = 1.05 if 'cluster_size=4096' in opts else 1.03
    expect(ev <= eq * bound, 'image end %d vs qemu-img %d (%+.1f%%)' % (ev, eq, 100.0 * (ev / eq - 1)))
    expect(av <= aq * bound, 'allocated %d vs qemu-img %d (%+.1f%%)' % (av, aq, 100.0 * (av / aq - 1)))
    # vdk reads its own spanning clusters back too
    res = t.vdk('compare', '-f', 'raw', '-F', 'qcow2', src, 'v.qcow2')
    expect_rc(res, 0, 'vdk compare')
    res = t.vdk('check', 'v.qcow2')
    expect_rc(res, 0, 'vdk check')


for opts in ('', 'compression_type=zstd', 'cluster_size=4096', 'cluster_size=16384,compression_type=zstd',
             'refcount_bits=1', 'compat=0.10'):
    suite.add('compress-packing/%s' % (opts or 'default'), t_packing, opts)

if __name__ == '__main__':
    main(suite)
