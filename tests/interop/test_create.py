#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk create -f raw against qemu-img create."""

import json
import os

from vdktest import KiB, MiB, Suite, expect, expect_eq, expect_one_error_line, expect_rc, is_zero, main

suite = Suite('create')
SIZE = 64 * MiB


def make_pair(t, size, *opts):
    """Create 'vdk/img' with vdk and 'qemu/img' with qemu-img; both run in
    their own directory with the same relative name."""
    for sub in ('vdk', 'qemu'):
        os.makedirs(t.path(sub))
    rv = t.vdk('create', '-f', 'raw', *opts, 'img', size, cwd=t.path('vdk'))
    rq = t.qemu_img('create', '-f', 'raw', *opts, 'img', size, cwd=t.path('qemu'))
    return rv, rq


def t_formatting_line(t, size):
    rv, rq = make_pair(t, size)
    expect_rc(rv, 0, 'vdk create')
    expect_rc(rq, 0, 'qemu-img create')
    expect_eq(rv.out, rq.out, "vdk create's stdout vs qemu-img's", rv)
    expect_eq(rv.err, '', 'vdk create stderr', rv)


def t_formatting_line_exact(t):
    res = t.vdk('create', '-f', 'raw', 'disk.img', '64M')
    expect_rc(res, 0)
    expect_eq(res.out, "Formatting 'disk.img', fmt=raw size=%d\n" % SIZE, 'stdout', res)


def t_sparse(t):
    res = t.vdk('create', '-f', 'raw', 'disk.img', '64M')
    expect_rc(res, 0)
    expect_eq(t.size('disk.img'), SIZE, 'file size')
    # qemu-img itself allocates the first 4 KiB; allow that much, no more.
    expect(t.blocks_bytes('disk.img') <= 4 * KiB,
           'new image is not sparse: %d bytes allocated' % t.blocks_bytes('disk.img'))
    expect(is_zero(t.content('disk.img')), 'new image does not read as zeroes')


def t_qemu_info_agrees(t):
    expect_rc(t.vdk('create', '-f', 'raw', 'disk.img', '64M'), 0)
    res = t.qemu_img('info', '--output=json', 'disk.img')
    expect_rc(res, 0, 'qemu-img info')
    info = json.loads(res.out)
    expect_eq(info['virtual-size'], SIZE, 'qemu-img virtual-size', res)
    expect_eq(info['format'], 'raw', 'qemu-img format', res)


def t_rounding(t, size):
    rv, rq = make_pair(t, size)
    expect_rc(rv, 0, 'vdk create')
    expect_rc(rq, 0, 'qemu-img create')
    sv = os.stat(t.path('vdk/img')).st_size
    sq = os.stat(t.path('qemu/img')).st_size
    expect_eq(sv, sq, 'file size of vdk-created vs qemu-img-created image (size %s)' % size)
    expect(sv % 512 == 0, 'size %d is not a multiple of 512' % sv)


def t_prealloc(t, mode):
    size = 8 * MiB
    rv, rq = make_pair(t, str(size), '-o', 'preallocation=' + mode)
    expect_rc(rv, 0, 'vdk create')
    expect_rc(rq, 0, 'qemu-img create')
    expect_eq(rv.out, rq.out, 'Formatting line vs qemu-img', rv)
    p = t.path('vdk/img')
    st = os.stat(p)
    expect_eq(st.st_size, size, 'file size')
    expect(st.st_blocks * 512 >= size,
           'preallocation=%s: only %d of %d bytes allocated' % (mode, st.st_blocks * 512, size))
    with open(p, 'rb') as f:
        expect(is_zero(f.read()), 'preallocated image does not read as zeroes')
    t.qemu_io('vdk/img', 'read -P 0 0 %d' % size)


def t_exists_refused(t):
    data = bytes(range(256)) * 16
    t.write_bytes('disk.img', data)
    old = 1_000_000_000
    os.utime(t.path('disk.img'), ns=(old * 10**9, old * 10**9))
    st0 = os.stat(t.path('disk.img'))
    res = t.vdk('create', '-f', 'raw', 'disk.img', '64M')
    expect_rc(res, 1)
    expect('exists' in res.err, "error message does not mention 'exists'", res)
    st1 = os.stat(t.path('disk.img'))
    expect_eq(t.content('disk.img'), data, 'content of the existing file')
    expect_eq(st1.st_mtime_ns, st0.st_mtime_ns, 'mtime of the existing file')
    expect_eq(st1.st_ino, st0.st_ino, 'inode of the existing file')
    expect_eq(sorted(os.listdir(t.dir)), ['disk.img'], 'directory content (no temporary left behind)')


def t_exists_force(t):
    t.write_bytes('disk.img', b'\xaa' * 8192)
    res = t.vdk('create', '-f', 'raw', '--force', 'disk.img', '4M')
    expect_rc(res, 0)
    expect_eq(t.size('disk.img'), 4 * MiB, 'size after --force')
    expect(is_zero(t.content('disk.img')), 'replaced image does not read as zeroes')
    expect_eq(sorted(os.listdir(t.dir)), ['disk.img'], 'directory content')


def t_prealloc_metadata(t):
    rq = t.qemu_img('create', '-f', 'raw', '-o', 'preallocation=metadata', 'q.img', '8M')
    expect(rq.rc != 0, 'qemu-img accepted preallocation=metadata for raw (test premise)', rq)
    res = t.vdk('create', '-f', 'raw', '-o', 'preallocation=metadata', 'disk.img', '8M')
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect('metadata' in res.err, 'error does not name the mode', res)
    expect(not os.path.exists(t.path('disk.img')), 'a rejected create left disk.img behind')


def t_size_error(t, size):
    # '--' so that a negative size is not taken for an option
    rq = t.qemu_img('create', '-f', 'raw', 'q.img', '--', size)
    expect(rq.rc != 0, 'qemu-img accepted size %r (test premise)' % size, rq)
    res = t.vdk('create', '-f', 'raw', 'disk.img', '--', size)
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect_eq(res.out, '', 'stdout', res)
    expect(not os.path.exists(t.path('disk.img')), 'a failed create left disk.img behind')


def t_quiet(t):
    res = t.vdk('create', '-q', '-f', 'raw', 'disk.img', '1M')
    expect_rc(res, 0)
    expect_eq(res.out + res.err, '', 'output of create -q', res)
    expect_eq(t.size('disk.img'), MiB, 'size')


def t_no_temp_left(t):
    for mode in ('off', 'falloc', 'full'):
        expect_rc(t.vdk('create', '-q', '-f', 'raw', '-o', 'preallocation=' + mode, mode + '.img', '2M'), 0)
    expect_eq(sorted(os.listdir(t.dir)), ['falloc.img', 'full.img', 'off.img'], 'directory content')


def t_missing_size(t):
    res = t.vdk('create', '-f', 'raw', 'disk.img')
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect(not os.path.exists(t.path('disk.img')), 'file created without a size')


for s in ('64M', '1G', '1.5M', '100', '512'):
    suite.add('create-formatting-line-matches-qemu-%s' % s, t_formatting_line, s)
suite.add('create-formatting-line-exact', t_formatting_line_exact)
suite.add('create-sparse', t_sparse)
suite.add('create-qemu-info-agrees', t_qemu_info_agrees)
for s in ('1', '100', '511', '513', '1000000', '1.5k'):
    suite.add('create-size-rounding-%s' % s, t_rounding, s)
for m in ('falloc', 'full'):
    suite.add('create-preallocation-%s' % m, t_prealloc, m)
suite.add('create-existing-refused', t_exists_refused)
suite.add('create-existing-force', t_exists_force)
suite.add('create-preallocation-metadata-rejected', t_prealloc_metadata)
for s in ('abc', '-5', '1Z', '99999E', '', '12.5.3'):
    suite.add('create-size-error-%s' % (s or 'empty'), t_size_error, s)
suite.add('create-missing-size', t_missing_size)
suite.add('create-quiet', t_quiet)
suite.add('create-no-temporary-left', t_no_temp_left)

if __name__ == '__main__':
    main(suite)
