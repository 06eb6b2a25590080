#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk resize on raw images, checked with qemu-img info and qemu-io."""

import json
import os

from vdktest import MiB, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main

suite = Suite('resize')


def data_image(t, name='disk.img', size=8 * MiB):
    t.sparse(name, size)
    t.qemu_io(name, 'write -P 0x33 0 %d' % size)
    return name


def qemu_size(t, name):
    res = t.qemu_img('info', '--output=json', '-f', 'raw', name)
    expect_rc(res, 0, 'qemu-img info')
    return json.loads(res.out)['virtual-size']


def t_grow(t, arg, new_size, fmt_args):
    data_image(t)
    rq_dir = t.path('q')
    os.makedirs(rq_dir)
    data_image(t, 'q/disk.img')
    res = t.vdk('resize', *fmt_args, 'disk.img', arg)
    expect_rc(res, 0, 'vdk resize')
    rq = t.qemu_img('resize', *fmt_args, 'disk.img', arg, cwd=rq_dir)
    expect_rc(rq, 0, 'qemu-img resize (reference)')
    expect_eq(res.out, rq.out, 'vdk resize stdout vs qemu-img', res)
    expect_eq(qemu_size(t, 'disk.img'), new_size, 'qemu-img virtual-size after resize')
    expect_eq(t.size('disk.img'), new_size, 'file size after resize')
    t.qemu_io('disk.img', 'read -P 0x33 0 8M', 'read -P 0 8M %d' % (new_size - 8 * MiB))
    expect(t.blocks_bytes('disk.img') <= 8 * MiB + 64 * 1024,
           'grown part allocated without preallocation: %d bytes' % t.blocks_bytes('disk.img'))


def t_shrink_refused(t, arg):
    data_image(t)
    before = t.content('disk.img')
    rq_dir = t.path('q')
    os.makedirs(rq_dir)
    data_image(t, 'q/disk.img')
    rq = t.qemu_img('resize', '-f', 'raw', 'disk.img', '--', arg, cwd=rq_dir)
    expect_eq(rq.rc, 1, 'qemu-img exit code (test premise)', rq)
    res = t.vdk('resize', '-f', 'raw', 'disk.img', '--', arg)
    expect_rc(res, 1)
    expect('--shrink' in res.err, 'error does not mention --shrink', res)
    expect(res.err.startswith('vdk: '), "error does not start with 'vdk: '", res)
    expect_eq(t.size('disk.img'), 8 * MiB, 'size after a refused shrink')
    expect(t.content('disk.img') == before, 'content changed by a refused shrink')


def t_shrink(t, arg, new_size):
    data_image(t)
    res = t.vdk('resize', '-f', 'raw', '--shrink', 'disk.img', '--', arg)
    expect_rc(res, 0)
    expect_eq(res.out, 'Image resized.\n', 'stdout', res)
    expect_eq(qemu_size(t, 'disk.img'), new_size, 'qemu-img virtual-size after shrink')
    t.qemu_io('disk.img', 'read -P 0x33 0 %d' % new_size)


def t_prealloc(t, mode):
    data_image(t, size=4 * MiB)
    res = t.vdk('resize', '-f', 'raw', '--preallocation=' + mode, 'disk.img', '12M')
    expect_rc(res, 0)
    expect_eq(qemu_size(t, 'disk.img'), 12 * MiB, 'virtual-size')
    alloc = t.blocks_bytes('disk.img')
    expect(alloc >= 12 * MiB, 'preallocation=%s: only %d bytes allocated after growing to 12M' % (mode, alloc))
    t.qemu_io('disk.img', 'read -P 0x33 0 4M', 'read -P 0 4M 8M')


def t_grow_sparse_then_map(t):
    """The grown part is a hole, as qemu-img map reports it."""
    data_image(t)
    expect_rc(t.vdk('resize', '-f', 'raw', 'disk.img', '+56M'), 0)
    vm = t.vdk_map('disk.img')
    qm = t.qemu_map('disk.img')
    expect_eq(vm, qm, 'vdk map vs qemu-img map after growing')
    expect(qm[-1]['zero'] and qm[-1]['start'] + qm[-1]['length'] == 64 * MiB, 'grown part is not a hole: %r' % qm)


def t_quiet(t):
    data_image(t)
    res = t.vdk('resize', '-q', '-f', 'raw', 'disk.img', '+1M')
    expect_rc(res, 0)
    expect_eq(res.out + res.err, '', 'output of resize -q', res)
    expect_eq(t.size('disk.img'), 9 * MiB, 'size')


def t_unaligned(t):
    """Sizes round up to 512 like qemu-img resize does."""
    data_image(t)
    os.makedirs(t.path('q'))
    data_image(t, 'q/disk.img')
    expect_rc(t.vdk('resize', '-f', 'raw', 'disk.img', '10000000'), 0, 'vdk resize')
    expect_rc(t.qemu_img('resize', '-f', 'raw', 'disk.img', '10000000', cwd=t.path('q')), 0, 'qemu-img resize')
    expect_eq(t.size('disk.img'), t.size('q/disk.img'), 'file size vs qemu-img resize')


def t_bad_size(t, arg):
    data_image(t)
    res = t.vdk('resize', '-f', 'raw', 'disk.img', arg)
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect_eq(t.size('disk.img'), 8 * MiB, 'size after a failed resize')


def t_missing(t):
    res = t.vdk('resize', '-f', 'raw', 'nonexistent.img', '1M')
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect(not os.path.exists(t.path('nonexistent.img')), 'resize created the missing file')


suite.add('resize-grow-absolute', t_grow, '16M', 16 * MiB, ['-f', 'raw'])
suite.add('resize-grow-relative', t_grow, '+1M', 9 * MiB, ['-f', 'raw'])
suite.add('resize-grow-probed', t_grow, '+3M', 11 * MiB, [])
suite.add('resize-grow-is-sparse', t_grow_sparse_then_map)
suite.add('resize-shrink-refused-absolute', t_shrink_refused, '4M')
suite.add('resize-shrink-refused-relative', t_shrink_refused, '-1M')
suite.add('resize-shrink-absolute', t_shrink, '4M', 4 * MiB)
suite.add('resize-shrink-relative', t_shrink, '-1M', 7 * MiB)
suite.add('resize-preallocation-falloc', t_prealloc, 'falloc')
suite.add('resize-preallocation-full', t_prealloc, 'full')
suite.add('resize-quiet', t_quiet)
suite.add('resize-unaligned-size-rounding', t_unaligned)
suite.add('resize-invalid-size', t_bad_size, 'abc')
suite.add('resize-missing-file', t_missing)

if __name__ == '__main__':
    main(suite)
