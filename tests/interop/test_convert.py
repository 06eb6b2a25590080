#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk convert raw -> raw, checked with qemu-img compare / map and by content."""

import json
import os
import random

from vdktest import (KiB, MiB, Suite, expect, expect_eq, expect_one_error_line, expect_rc, is_zero, main,
                     ranges_cover, zero_ranges)

suite = Suite('convert')
SIZE = 64 * MiB
ZERO_DATA = (30 * MiB, 31 * MiB)  # allocated, but written with zeroes


def source_commands(size, seed):
    """qemu-io commands for a source with scattered data: fixed cases
    (unaligned, at the very end) plus seeded random writes with random
    non-zero patterns, then an allocated all-zero region."""
    rnd = random.Random(seed)
    fixed = [(1000, 3000), (5 * MiB, MiB), (7 * MiB + 4095, 1), (size - 3864, 3864)]
    cmds = ['write -P 0x%02x %d %d' % (rnd.randrange(1, 256), off, length)
            for off, length in fixed if off + length <= size]
    for _ in range(40):
        length = rnd.choice((1, 511, 512, 4096, 65536, rnd.randrange(1, 300 * KiB)))
        off = rnd.randrange(0, size - length)
        if rnd.random() < 0.4:
            off -= off % 4096
        cmds.append('write -P 0x%02x %d %d' % (rnd.randrange(1, 256), off, length))
    if ZERO_DATA[1] <= size:
        cmds.append('write -P 0 %d %d' % (ZERO_DATA[0], ZERO_DATA[1] - ZERO_DATA[0]))
    return cmds


def make_source(t, name='src.img', size=SIZE, seed=1):
    t.sparse(name, size)
    t.qemu_io(name, *source_commands(size, seed))
    return name


def convert(t, *args, expect_ok=True):
    res = t.vdk('convert', *t.eio(), '-T', t.cache, *args)
    if expect_ok:
        expect_rc(res, 0, 'vdk convert')
    return res


def t_identical(t):
    make_source(t)
    res = convert(t, '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    expect_eq(res.out, '', 'stdout of convert without -p', res)
    t.qemu_compare('src.img', 'dst.img')
    expect_eq(t.size('dst.img'), SIZE, 'target size')
    expect(t.content('dst.img') == t.content('src.img'), 'target bytes differ from the source')


def t_sparse_preserved(t):
    make_source(t)
    convert(t, '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    t.qemu_compare('src.img', 'dst.img')
    src_alloc = t.blocks_bytes('src.img')
    dst_alloc = t.blocks_bytes('dst.img')
    expect(dst_alloc <= src_alloc + 64 * KiB,
           'target not sparse: %d bytes allocated, source has %d' % (dst_alloc, src_alloc))
    src_holes = zero_ranges(t.qemu_map('src.img'))
    dst_holes = zero_ranges(t.qemu_map('dst.img'))
    expect(ranges_cover(dst_holes, src_holes),
           'a hole of the source is allocated in the target\nsource holes: %r\ntarget holes: %r'
           % (src_holes, dst_holes))


def t_zero_runs_holes(t):
    make_source(t)
    convert(t, '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    src_map = t.qemu_map('src.img')
    expect(not ranges_cover(zero_ranges(src_map), [ZERO_DATA]),
           'test premise: the zero region is allocated in the source')
    expect(ranges_cover(zero_ranges(t.qemu_map('dst.img')), [ZERO_DATA]),
           'allocated zeroes %r of the source were written as data (default -S 4k)' % (ZERO_DATA,))
    t.qemu_compare('src.img', 'dst.img')


def t_S0(t):
    make_source(t)
    convert(t, '-f', 'raw', '-O', 'raw', '-S', '0', 'src.img', 'dst.img')
    t.qemu_compare('src.img', 'dst.img')
    alloc = t.blocks_bytes('dst.img')
    expect(alloc >= SIZE, '-S 0: target only has %d of %d bytes allocated' % (alloc, SIZE))


def t_prealloc(t):
    make_source(t)
    convert(t, '-f', 'raw', '-O', 'raw', '-o', 'preallocation=falloc', 'src.img', 'dst.img')
    t.qemu_compare('src.img', 'dst.img')
    alloc = t.blocks_bytes('dst.img')
    expect(alloc >= SIZE, 'preallocation=falloc: target only has %d of %d bytes allocated' % (alloc, SIZE))


def t_concat(t):
    t.sparse('a.img', 8 * MiB)
    t.qemu_io('a.img', 'write -P 0xa1 0 4096', 'write -P 0xa2 1000 3000', 'write -P 0xa3 %d 5000' % (8 * MiB - 5000))
    b_size = 3 * MiB + 512
    t.sparse('b.img', b_size)
    t.qemu_io('b.img', 'write -P 0xb1 0 1', 'write -P 0xb2 2M 12345', 'write -P 0xb3 %d 700' % (b_size - 700))
    make_source(t, 'c.img', 4 * MiB, seed=7)
    convert(t, '-f', 'raw', '-O', 'raw', 'a.img', 'b.img', 'c.img', 'dst.img')
    want = t.content('a.img') + t.content('b.img') + t.content('c.img')
    got = t.content('dst.img')
    expect_eq(len(got), len(want), 'size of the concatenation')
    expect(got == want, 'target is not the concatenation of the sources')


def t_n_larger(t):
    make_source(t)
    big = SIZE + 8 * MiB
    t.sparse('big.img', big)
    t.qemu_io('big.img', 'write -P 0x77 0 %d' % big)
    convert(t, '-n', '-f', 'raw', '-O', 'raw', 'src.img', 'big.img')
    expect_eq(t.size('big.img'), big, 'size of the existing target')
    data = t.content('big.img')
    expect(data[:SIZE] == t.content('src.img'), 'target head differs from the source')
    expect(data[SIZE:] == b'\x77' * (big - SIZE), 'target tail past the source was modified')


def t_n_zero_target(t):
    make_source(t)
    t.sparse('dst.img', SIZE)
    convert(t, '-n', '--target-is-zero', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    t.qemu_compare('src.img', 'dst.img')


def t_in_order(t):
    make_source(t)
    convert(t, '-m', '1', '--in-order', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    t.qemu_compare('src.img', 'dst.img')
    convert(t, '-m', '64', '-W', '-f', 'raw', '-O', 'raw', 'src.img', 'dst2.img')
    t.qemu_compare('src.img', 'dst2.img')


def t_progress_json(t):
    make_source(t)
    res = convert(t, '--progress=json', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    lines = [l for l in res.out.splitlines() if l.strip()]
    expect(lines, 'no progress lines', res)
    prev = -1
    objs = []
    for l in lines:
        try:
            o = json.loads(l)
        except ValueError:
            expect(False, 'progress line is not JSON: %r' % l, res)
        expect(isinstance(o, dict) and 'done' in o and 'total' in o, 'progress object without done/total: %r' % l, res)
        expect(o['done'] >= prev, 'done went backwards: %r' % l, res)
        expect(0 <= o['done'] <= o['total'], 'done outside [0, total]: %r' % l, res)
        prev = o['done']
        objs.append(o)
    expect_eq(objs[-1]['total'], SIZE, 'total of the last progress line', res)
    expect_eq(objs[-1]['done'], objs[-1]['total'], 'done of the last progress line', res)
    t.qemu_compare('src.img', 'dst.img')


def t_progress_bar(t):
    make_source(t)
    res = convert(t, '-p', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    expect('100.00/100%' in res.out, "-p output lacks '100.00/100%'", res)
    t.qemu_compare('src.img', 'dst.img')


def t_unaligned(t):
    t.sparse('src.img', 1000000)
    t.qemu_io('src.img', 'write -P 0x5c 998000 2000', 'write -P 0x5d 1000 3000')
    convert(t, '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    expect_rc(t.qemu_img('convert', '-f', 'raw', '-O', 'raw', 'src.img', 'q.img'), 0, 'qemu-img convert')
    expect_eq(t.size('dst.img'), t.size('q.img'), 'target size vs qemu-img convert')
    t.qemu_compare('src.img', 'dst.img')
    expect(t.content('dst.img') == t.content('q.img'), 'target differs from qemu-img convert output')


def t_overwrite(t):
    make_source(t)
    t.write_bytes('dst.img', b'old content\n' * 1000)
    convert(t, '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    t.qemu_compare('src.img', 'dst.img')
    expect_eq(t.size('dst.img'), SIZE, 'size of the replaced target')


def t_missing_source(t):
    res = t.vdk('convert', '-f', 'raw', '-O', 'raw', 'nonexistent.img', 'dst.img')
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect('nonexistent.img' in res.err, 'error does not name the source', res)
    expect(not os.path.exists(t.path('dst.img')), 'a failed convert left dst.img behind')
    expect_eq(sorted(os.listdir(t.dir)), [], 'directory content after a failed convert')


def t_missing_second_source(t):
    make_source(t, 'a.img', 4 * MiB)
    res = t.vdk('convert', '-f', 'raw', '-O', 'raw', 'a.img', 'nonexistent.img', 'dst.img')
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect(not os.path.exists(t.path('dst.img')), 'a failed convert left dst.img behind')


def t_bad_sparse(t):
    make_source(t, 'a.img', 4 * MiB)
    rq = t.qemu_img('convert', '-f', 'raw', '-O', 'raw', '-S', '1000', 'a.img', 'q.img')
    expect(rq.rc != 0, 'test premise: qemu-img rejects -S 1000', rq)
    res = t.vdk('convert', '-f', 'raw', '-O', 'raw', '-S', '1000', 'a.img', 'dst.img')
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect(not os.path.exists(t.path('dst.img')), 'a rejected convert left dst.img behind')


def t_zero_source(t):
    t.sparse('src.img', SIZE)
    convert(t, '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    expect_eq(t.size('dst.img'), SIZE, 'target size')
    expect(t.blocks_bytes('dst.img') <= 4 * KiB, 'converting an empty image allocated %d bytes' % t.blocks_bytes('dst.img'))
    expect(is_zero(t.content('dst.img')), 'target of an all-zero source is not zero')


suite.add_io('convert-identical', t_identical)
suite.add_io('convert-sparse-preserved', t_sparse_preserved)
suite.add_io('convert-zero-runs-become-holes', t_zero_runs_holes)
suite.add_io('convert-sparse-source-sparse-target', t_zero_source)
suite.add_io('convert-S0-fully-allocated', t_S0)
suite.add_io('convert-preallocation-falloc', t_prealloc)
suite.add_io('convert-concatenate', t_concat)
suite.add_io('convert-n-larger-target', t_n_larger)
suite.add_io('convert-n-target-is-zero', t_n_zero_target)
suite.add_io('convert-in-order-and-wide', t_in_order)
suite.add_io('convert-progress-json', t_progress_json)
suite.add_io('convert-progress-bar', t_progress_bar)
suite.add_io('convert-unaligned-size', t_unaligned)
suite.add_io('convert-replaces-existing-target', t_overwrite)
suite.add('convert-missing-source', t_missing_source)
suite.add('convert-missing-second-source', t_missing_second_source)
suite.add('convert-invalid-sparse-size', t_bad_sparse)

if __name__ == '__main__':
    main(suite)
