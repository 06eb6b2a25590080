#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk compact: images with holes left by discards shrink in place, the
guest content unchanged (qemu-img compare), qemu-img check clean, writes
fine afterwards; killed at each of its first 39 writes and at about 80
points spread over the rest, the image stays consistent
(leaks at most) with the same content; snapshots are refused."""

import os
import shutil

from vdktest import VDK, KiB, MiB, Skip, Suite, expect, expect_eq, expect_rc, main

suite = Suite('qcow2-compact')

CONFIGS = {
    '4k': 'cluster_size=4096',
    '64k': 'cluster_size=65536',
    '512': 'cluster_size=512',
    'extl2': 'cluster_size=65536,extended_l2=on',
    'v2': 'compat=0.10,cluster_size=4096',
    'refcount1': 'cluster_size=4096,refcount_bits=1',
    'lazy': 'cluster_size=4096,lazy_refcounts=on',
}


def holey(t, opts, name='img.qcow2'):
    expect_rc(t.vdk('create', '-q', '-f', 'qcow2', '-o', opts, name, '64M'), 0)
    t.vdk_io(name, 'write -c -P 9 50M 64k', 'write -P 1 0 16M', 'write -P 2 20M 8M', 'write -P 3 40M 4M',
             'discard 0 12M', 'discard 22M 4M', 'write -P 4 60M 3M', 'discard 61M 1M', fmt='qcow2')
    expect_rc(t.qemu_img('convert', '-O', 'raw', name, 'ref.raw'), 0)


def clean(t, name, what):
    res = t.qemu_img('check', name)
    expect(res.rc == 0 and 'No errors' in res.out, 'qemu-img check: %s' % what, res)


def t_compact(t, cfg):
    holey(t, CONFIGS[cfg])
    before = os.path.getsize(t.path('img.qcow2'))
    res = t.vdk('compact', 'img.qcow2')
    expect_rc(res, 0, 'vdk compact')
    after = os.path.getsize(t.path('img.qcow2'))
    expect(after <= before - 12 * MiB, 'the file shrank by the discarded data (%d -> %d)' % (before, after))
    expect('reclaimed' in res.out and str(before - after) in res.out, 'the bytes reclaimed are reported', res)
    clean(t, 'img.qcow2', 'after compact')
    res = t.qemu_img('compare', 'img.qcow2', 'ref.raw')
    expect(res.rc == 0, 'the guest content is unchanged', res)
    res = t.vdk('compact', 'img.qcow2')
    expect(res.rc == 0 and '(0 reclaimed)' in res.out, 'a second compact has nothing to do', res)
    t.vdk_io('img.qcow2', 'write -P 7 30M 2M', fmt='qcow2')
    t.qemu_io('img.qcow2', 'write -P 8 10M 1M', fmt='qcow2')
    clean(t, 'img.qcow2', 'after writing to the compacted image')


def count_writes(t, strace, args):
    out = t.path('strace.out')
    t.run([strace, '-f', '-qq', '-c', '-o', out, '-e', 'trace=pwrite64,pwritev,pwritev2', *args], timeout=120)
    total = 0
    with open(out) as f:
        for line in f:
            p = line.split()
            if p and p[-1] in ('pwrite64', 'pwritev', 'pwritev2') and p[3].isdigit():
                total += int(p[3])
    return total


def t_crash(t):
    strace = shutil.which('strace')
    if not strace:
        raise Skip('strace not installed')
    holey(t, CONFIGS['4k'], 'base.qcow2')
    shutil.copy(t.path('base.qcow2'), t.path('img.qcow2'))
    writes = count_writes(t, strace, [VDK, 'compact', 'img.qcow2'])
    expect(writes > 10, 'a compaction writes (%d writes)' % writes)
    # every early write, then points spread over the whole run
    points = sorted(set(range(1, 40)) | set(range(40, writes + 1, max(1, writes // 80))) | {writes})
    for n in points:
        shutil.copy(t.path('base.qcow2'), t.path('img.qcow2'))
        t.run([strace, '-f', '-qq', '-o', '/dev/null', '-e', 'trace=pwrite64,pwritev,pwritev2', '-e',
               'inject=pwrite64,pwritev,pwritev2:signal=KILL:when=%d' % n, VDK, 'compact', 'img.qcow2'], timeout=60)
        what = 'killed at write %d of %d' % (n, writes)
        chk = t.qemu_img('check', 'img.qcow2')
        expect(chk.rc in (0, 3), '%s: no corruption, leaks at most (exit %d)' % (what, chk.rc), chk)
        res = t.qemu_img('compare', 'img.qcow2', 'ref.raw')
        expect(res.rc == 0, '%s: the guest content is unchanged' % what, res)
        if n % 5 == 0:
            expect_rc(t.vdk('check', '-r', 'leaks', 'img.qcow2'), 0, what + ': check -r leaks')
            clean(t, 'img.qcow2', what + ', after check -r leaks')
            res = t.vdk('compact', 'img.qcow2')
            expect_rc(res, 0, what + ': compacting again finishes the job')
            clean(t, 'img.qcow2', what + ', compacted again')


def t_refused(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'img.qcow2', '8M'), 0)
    expect_rc(t.qemu_img('snapshot', '-c', 's', 'img.qcow2'), 0)
    res = t.vdk('compact', 'img.qcow2')
    expect(res.rc == 1 and 'internal snapshots' in res.err, 'snapshots refused', res)
    with open(t.path('d.raw'), 'wb') as f:
        f.truncate(MiB)
    res = t.vdk('compact', '-f', 'raw', 'd.raw')
    expect(res.rc == 1 and 'cannot be compacted' in res.err, 'raw refused', res)
    res = t.vdk('compact', '--help')
    expect(res.rc == 0 and 'usage: vdk compact' in res.out, '--help', res)


for cfg in CONFIGS:
    suite.add('qcow2-compact/' + cfg, t_compact, cfg)
suite.add('qcow2-compact/killed-at-many-writes', t_crash)
suite.add('qcow2-compact/refused', t_refused)

if __name__ == '__main__':
    main(suite)
