#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk dd against qemu-img dd: the same output size and content for every
operand combination, the same errors; sparse input stays sparse."""

import json
import os

from vdktest import KiB, MiB, Suite, expect, expect_eq, expect_rc, main

suite = Suite('dd')

CASES = [
    ['-O', 'qcow2', 'bs=64k', 'count=10', 'skip=2'],
    ['-f', 'qcow2', '-O', 'raw', 'bs=1M'],
    ['-O', 'raw', 'bs=1M', 'skip=100'],
    ['-O', 'raw', 'count=1'],
    ['-O', 'qcow2', 'bs=1000', 'count=777', 'skip=3'],
    ['-O', 'raw', 'bs=4k', 'count=1k', 'skip=300'],
    ['-O', 'raw', 'bs=1M', 'count=1000'],
]

ERRORS = [
    ['-O', 'raw', 'bs=0'],
    ['-O', 'raw', 'foo=1'],
    ['-O', 'raw', 'bs=3G'],
]


def source(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'src.qcow2', '16M'), 0)
    t.qemu_io('src.qcow2', 'write -P 1 0 1M', 'write -P 2 1500k 3333', 'write -z 3M 1M', 'write -c -P 3 5M 64k',
              'write -P 4 %d 4096' % (16 * MiB - 4096), fmt='qcow2')


def t_cases(t):
    source(t)
    for args in CASES:
        fmt = args[args.index('-O') + 1]
        for f in ('q.out', 'v.out'):
            if os.path.exists(t.path(f)):
                os.unlink(t.path(f))
        rq = t.qemu_img('dd', *args, 'if=src.qcow2', 'of=q.out')
        rv = t.vdk('dd', *args, 'if=src.qcow2', 'of=v.out')
        what = 'dd ' + ' '.join(args)
        expect_eq(rv.rc, rq.rc, '%s: exit code vs qemu-img' % what, rv)
        expect_eq(rv.err.replace('vdk: ', ''), rq.err.replace('qemu-img: ', ''), '%s: messages vs qemu-img' % what, rv)
        res = t.qemu_img('compare', '-f', fmt, '-F', fmt, 'q.out', 'v.out')
        expect(res.rc == 0, '%s: the same content as qemu-img dd' % what, res)
        sq = json.loads(t.qemu_img('info', '--output=json', 'q.out').out)['virtual-size']
        sv = json.loads(t.qemu_img('info', '--output=json', 'v.out').out)['virtual-size']
        expect_eq(sv, sq, '%s: the output size vs qemu-img dd' % what)
        if fmt == 'qcow2':
            expect_rc(t.qemu_img('check', 'v.out'), 0, '%s: qemu-img check' % what)
    # existing output files are replaced, as qemu-img does
    rv = t.vdk('dd', '-O', 'raw', 'bs=1M', 'count=2', 'if=src.qcow2', 'of=v.out')
    expect_rc(rv, 0, 'dd over an existing file')
    expect_eq(os.path.getsize(t.path('v.out')), 2 * MiB, 'the existing output was replaced')


def t_sparse(t):
    with open(t.path('sparse.raw'), 'wb') as f:
        f.truncate(256 * MiB)
        f.seek(100 * MiB)
        f.write(b'x' * 4096)
    expect_rc(t.vdk('dd', '-f', 'raw', '-O', 'raw', 'bs=1M', 'if=sparse.raw', 'of=out.raw'), 0)
    used = os.stat(t.path('out.raw')).st_blocks * 512
    expect(used <= 1 * MiB, 'holes are not written (%d bytes allocated)' % used)
    res = t.qemu_img('compare', '-f', 'raw', '-F', 'raw', 'sparse.raw', 'out.raw')
    expect(res.rc == 0, 'same content', res)


def t_errors(t):
    source(t)
    for args in ERRORS:
        rq = t.qemu_img('dd', *args, 'if=src.qcow2', 'of=q.out')
        rv = t.vdk('dd', *args, 'if=src.qcow2', 'of=v.out')
        expect_eq(rv.rc, rq.rc, 'dd %s: exit code vs qemu-img' % ' '.join(args), rv)
        expect_eq(rv.err.replace('vdk: ', ''), rq.err.replace('qemu-img: ', ''), 'dd %s: error vs qemu-img' %
                  ' '.join(args), rv)
    rv = t.vdk('dd', '-O', 'raw', 'of=x.out')
    expect(rv.rc == 1 and 'Must specify both input and output files' in rv.err, 'missing if=', rv)
    rv = t.vdk('dd', '--help')
    expect(rv.rc == 0 and 'usage: vdk dd' in rv.out, 'vdk dd --help', rv)


suite.add('dd/as-qemu-img', t_cases)
suite.add('dd/sparse-stays-sparse', t_sparse)
suite.add('dd/errors', t_errors)

if __name__ == '__main__':
    main(suite)
