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


def t_several_sources(t):
    """-c with several sources whose sizes are not whole clusters: the
    clusters across two sources are gathered from both; the content equals
    the sources concatenated and qemu-img's result, check clean."""
    rng = random.Random(11)
    names = []
    for i, size in enumerate((3 * 65536 + 512, 1024, 0, 200 * 1024 + 1536, 5 * 65536)):
        name = 's%d.raw' % i
        with open(t.path(name), 'wb') as f:
            f.truncate(size)
            for off in range(0, size, 4096):
                if rng.random() < 0.6:
                    f.seek(off)
                    n = min(4096, size - off)
                    f.write(bytes(rng.choice(b'abcdefgh') for _ in range(n // 2)) + os.urandom(n - n // 2))
        names.append(name)
    with open(t.path('cat.raw'), 'wb') as out:
        for name in names:
            with open(t.path(name), 'rb') as f:
                out.write(f.read())
    for opts in ([], ['-o', 'compression_type=zstd'], ['-o', 'cluster_size=4096']):
        for f in ('v.qcow2', 'q.qcow2'):
            if os.path.exists(t.path(f)):
                os.unlink(t.path(f))
        res = t.vdk('convert', '-c', '-f', 'raw', '-O', 'qcow2', *opts, *names, 'v.qcow2')
        expect_rc(res, 0, 'vdk convert -c with several sources %s' % opts)
        expect_rc(t.qemu_img('convert', '-c', '-f', 'raw', '-O', 'qcow2', *opts, *names, 'q.qcow2'), 0)
        res = t.qemu_img('check', 'v.qcow2')
        expect(res.rc == 0 and 'No errors' in res.out, 'qemu-img check %s' % opts, res)
        # qemu-img rounds the target size up to whole sectors; compare the bytes
        expect_rc(t.qemu_img('convert', '-O', 'raw', 'v.qcow2', 'v.raw'), 0)
        with open(t.path('cat.raw'), 'rb') as a, open(t.path('v.raw'), 'rb') as b:
            want, got = a.read(), b.read()
        expect(got[:len(want)] == want and not got[len(want):].strip(b'\0'), 'content %s' % opts)
        res = t.qemu_img('compare', 'v.qcow2', 'q.qcow2')
        expect(res.rc == 0, 'the same content as qemu-img -c %s' % opts, res)
        m = re.search(r'([0-9.]+)% compressed clusters', t.qemu_img('check', 'v.qcow2').out)
        expect(m and float(m.group(1)) > 50, 'clusters are compressed %s' % opts)


for opts in ('', 'compression_type=zstd', 'cluster_size=4096', 'cluster_size=16384,compression_type=zstd',
             'refcount_bits=1', 'compat=0.10'):
    suite.add('compress-packing/%s' % (opts or 'default'), t_packing, opts)
suite.add('compress-several-sources', t_several_sources)

if __name__ == '__main__':
    main(suite)
