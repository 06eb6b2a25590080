#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk measure against qemu-img measure: the same numbers, text and JSON,
for empty images of many sizes and options and for sources of every kind
(raw with holes, qcow2 with data/zero/compressed clusters and a backing
file, legacy qcow); the same errors for bad arguments.  And the numbers
hold for vdk's own converter: an image vdk convert makes is no larger than
the "required size" measured for it."""

import json
import os

from vdktest import KiB, MiB, Suite, expect, expect_eq, expect_rc, main

suite = Suite('measure')

EMPTY = [
    ('-O', 'qcow2', '--size', '10G'),
    ('-O', 'qcow2', '--size', '0'),
    ('-O', 'qcow2', '--size', '1'),
    ('-O', 'qcow2', '--size', '3G', '-o', 'cluster_size=512,refcount_bits=1'),
    ('-O', 'qcow2', '--size', '100T', '-o', 'cluster_size=2M,refcount_bits=64'),
    ('-O', 'qcow2', '--size', '7777777', '-o', 'cluster_size=4k,preallocation=metadata'),
    ('-O', 'qcow2', '--size', '10G', '-o', 'extended_l2=on'),
    ('-O', 'qcow2', '--size', '10G', '-o', 'compat=0.10,preallocation=falloc'),
    ('-O', 'qcow2', '--size', '1G', '-o', 'preallocation=full,cluster_size=16k,extended_l2=on'),
    ('-O', 'raw', '--size', '1000'),
    ('-O', 'raw', '--size', '5G'),
    ('--size', '123456789'),
]

ERRORS = [
    (),
    ('-O', 'qcow2'),
    ('-O', 'qcow2', '--size', '1P', '-o', 'cluster_size=512'),
]


def compare(t, args, rc=0):
    for out in ([], ['--output=json']):
        rq = t.qemu_img('measure', *out, *args)
        rv = t.vdk('measure', *out, *args)
        expect_eq(rv.rc, rq.rc, 'vdk measure %s: exit code vs qemu-img' % ' '.join(out + list(args)), rv)
        expect_eq(rv.rc, rc, 'exit code', rv)
        if rc == 0:
            if out:
                expect_eq(json.loads(rv.out), json.loads(rq.out), 'vdk measure --output=json %s' % ' '.join(args), rv)
            else:
                expect_eq(rv.out, rq.out, 'vdk measure %s' % ' '.join(args), rv)
        else:
            expect_eq(rv.err.replace('vdk: ', '', 1), rq.err.replace('qemu-img: ', '', 1),
                      'vdk measure %s: the error vs qemu-img' % ' '.join(args), rv)


def t_empty(t):
    for args in EMPTY:
        compare(t, args)


def t_errors(t):
    for args in ERRORS:
        compare(t, args, rc=1)
    compare(t, ('--size', '1G', 'x.raw'), rc=1)  # both a size and a file
    res = t.vdk('measure', '-O', 'qcow2', '-o', 'nosuch=1', '--size', '1G')
    expect(res.rc == 1 and "nosuch" in res.err, 'an unknown option is named', res)


def sources(t):
    """name -> format of the source images."""
    with open(t.path('holes.raw'), 'wb') as f:
        f.truncate(64 * MiB + 512)
        for off in (0, 5 * MiB + 123, 40 * MiB):
            f.seek(off)
            f.write(os.urandom(300 * KiB))
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'base.qcow2', '64M'), 0)
    t.qemu_io('base.qcow2', 'write -P 1 0 3M', 'write -P 2 10000 100', fmt='qcow2')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.qcow2', '-F', 'qcow2',
                         'top.qcow2'), 0)
    t.qemu_io('top.qcow2', 'write -P 3 20M 1M', 'write -z 0 64k', 'write -c -P 4 30M 64k',
              'write -P 5 %d 4096' % (64 * MiB - 4096), fmt='qcow2')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow', 'old.qcow', '20M'), 0)
    t.qemu_io('old.qcow', 'write -P 6 1M 100k', 'write -c -P 7 8M 4k', fmt='qcow')
    return {'holes.raw': 'raw', 'base.qcow2': 'qcow2', 'top.qcow2': 'qcow2', 'old.qcow': 'qcow'}


TARGETS = [
    ('-O', 'qcow2'),
    ('-O', 'qcow2', '-o', 'cluster_size=4096'),
    ('-O', 'qcow2', '-o', 'cluster_size=2M'),
    ('-O', 'qcow2', '-o', 'compat=0.10'),
    ('-O', 'qcow2', '-o', 'extended_l2=on,refcount_bits=8'),
    ('-O', 'qcow2', '-o', 'preallocation=metadata'),
    ('-O', 'qcow2', '-o', 'preallocation=full'),
    ('-O', 'qcow2', '-o', 'backing_file=base.qcow2'),
    ('-O', 'raw'),
]


def t_sources(t):
    for name, fmt in sources(t).items():
        for target in TARGETS:
            compare(t, target + ('-f', fmt, name))
        compare(t, ('-O', 'qcow2', name))  # probed


def t_bound_holds(t):
    """vdk convert's output fits in what vdk measure says it needs."""
    for name, fmt in sources(t).items():
        for opts in ('cluster_size=65536', 'cluster_size=4096', 'cluster_size=512,refcount_bits=1'):
            res = t.vdk('measure', '--output=json', '-O', 'qcow2', '-o', opts, name)
            expect_rc(res, 0, 'vdk measure')
            need = json.loads(res.out)['required']
            expect_rc(t.vdk('convert', '-O', 'qcow2', '-o', opts, name, 'out.qcow2'), 0, 'vdk convert')
            size = os.path.getsize(t.path('out.qcow2'))
            expect(size <= need, '%s -> qcow2 (%s): the file (%d bytes) fits in the measured %d bytes' %
                   (name, opts, size, need))
            os.unlink(t.path('out.qcow2'))


def t_no_measure(t):
    res = t.vdk('measure', '-O', 'qcow', '--size', '1G')
    expect(res.rc == 1 and 'qcow' in res.err, 'a format that cannot be created is refused', res)


def t_help(t):
    res = t.vdk('measure', '--help')
    expect(res.rc == 0 and 'usage: vdk measure' in res.out, 'vdk measure --help', res)
    res = t.vdk('measure', '-O', 'qcow2', '-o', 'help')
    expect(res.rc == 0 and 'cluster_size' in res.out, 'vdk measure -o help lists the format options', res)


suite.add('measure/empty-images', t_empty)
suite.add('measure/argument-errors', t_errors)
suite.add('measure/sources', t_sources)
suite.add('measure/vdk-convert-fits', t_bound_holds)
suite.add('measure/unsupported-format', t_no_measure)
suite.add('measure/help', t_help)

if __name__ == '__main__':
    main(suite)
