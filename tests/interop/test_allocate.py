#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk allocate: sparse raw and qcow2 images (preallocation off and
metadata) become physically allocated, the guest content unchanged
(qemu-img compare), qcow2 still clean (qemu-img check); too little free
space is refused before anything changes; backing files are refused."""

import os

from vdktest import KiB, MiB, Suite, expect, expect_eq, expect_rc, main

suite = Suite('allocate')

SIZE = 32 * MiB


def used(t, name):
    return os.stat(t.path(name)).st_blocks * 512


def t_allocate(t, fmt, opts, mode):
    name = 'img.' + fmt
    args = ['create', '-q', '-f', fmt] + (['-o', opts] if opts else []) + [name, str(SIZE)]
    expect_rc(t.qemu_img(*args), 0)
    cmds = ['write -P 3 1M 1M', 'write -P 4 %d 4096' % (SIZE - 4096)]
    if fmt == 'qcow2' and 'compat=0.10' not in opts:
        cmds.append('write -z 5M 1M')
    t.qemu_io(name, *cmds, fmt=fmt)
    expect_rc(t.qemu_img('convert', '-f', fmt, '-O', 'raw', name, 'ref.raw'), 0)
    before = used(t, name)
    expect(before < SIZE // 2, 'sparse before (%d bytes)' % before)
    res = t.vdk('allocate', '-f', fmt, '--mode=' + mode, name)
    expect_rc(res, 0, 'vdk allocate --mode=' + mode)
    after = used(t, name)
    expect(after >= SIZE, 'allocated after (%d bytes for %d guest bytes)' % (after, SIZE))
    res = t.qemu_img('compare', '-f', fmt, '-F', 'raw', name, 'ref.raw')
    expect(res.rc == 0, 'the guest content is unchanged', res)
    if fmt == 'qcow2':
        res = t.qemu_img('check', name)
        expect(res.rc == 0 and 'No errors' in res.out, 'qemu-img check', res)
    # a second run has nothing to do
    expect_rc(t.vdk('allocate', '-f', fmt, name), 0, 'again')
    expect(used(t, name) <= after + 64 * KiB, 'nothing more allocated the second time')


def t_no_space(t):
    st = os.statvfs(t.dir)
    free = st.f_bavail * st.f_frsize
    size = (free + 64 * 1024 * MiB) // MiB * MiB
    expect_rc(t.vdk('create', '-q', '-f', 'raw', 'big.raw', str(size)), 0)
    res = t.vdk('allocate', '-f', 'raw', 'big.raw')
    expect(res.rc == 1 and 'not enough free space' in res.err and 'bytes needed' in res.err,
           'refused with the numbers', res)
    expect(used(t, 'big.raw') == 0, 'nothing was allocated')


def t_backing(t):
    with open(t.path('base.raw'), 'wb') as f:
        f.truncate(MiB)
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'top.qcow2'), 0)
    res = t.vdk('allocate', 'top.qcow2')
    expect(res.rc == 1 and 'backing file' in res.err, 'refused: it would hide the backing file', res)
    res = t.vdk('allocate', '--mode=bad', 'top.qcow2')
    expect(res.rc == 1 and 'invalid --mode' in res.err, 'bad mode', res)
    res = t.vdk('allocate', '--help')
    expect(res.rc == 0 and 'usage: vdk allocate' in res.out, '--help', res)


for fmt, opts in (('raw', ''), ('qcow2', ''), ('qcow2', 'preallocation=metadata'), ('qcow2', 'compat=0.10,cluster_size=4096')):
    for mode in ('falloc', 'full'):
        suite.add('allocate/%s%s/%s' % (fmt, '-' + opts if opts else '', mode), t_allocate, fmt, opts, mode)
suite.add('allocate/not-enough-space', t_no_space)
suite.add('allocate/errors', t_backing)

if __name__ == '__main__':
    main(suite)
