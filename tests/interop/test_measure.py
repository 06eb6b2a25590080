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
import shutil

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


def t_vdi(t):
    """qemu-img cannot measure vdi: vdk's numbers are checked against the
    files vdk convert makes (exactly the required size for dynamic images,
    the fully allocated one for static images)."""
    for name, fmt in sources(t).items():
        for opts in ('static=off', 'static=on'):
            res = t.vdk('measure', '--output=json', '-O', 'vdi', '-o', opts, '-f', fmt, name)
            expect_rc(res, 0, 'vdk measure -O vdi -o %s %s' % (opts, name))
            m = json.loads(res.out)
            expect_rc(t.vdk('convert', '-f', fmt, '-O', 'vdi', '-o', opts, name, 'out.vdi'), 0, 'vdk convert')
            size = os.path.getsize(t.path('out.vdi'))
            want = m['fully-allocated'] if opts == 'static=on' else m['required']
            expect_eq(size, want, '%s -> vdi (%s): file size vs measured' % (name, opts))
            res = t.qemu_img('check', 'out.vdi')
            expect_rc(res, 0, 'qemu-img check of the vdi')
            os.unlink(t.path('out.vdi'))
    res = t.vdk('measure', '-O', 'vdi', '--size', '10G')
    expect(res.rc == 0 and res.out == 'required size: 1048576\nfully allocated size: 10738466816\n',
           'an empty 10G vdi: header and map in the first MiB', res)


def t_vmdk(t):
    """qemu-img cannot measure vmdk: checked against the files vdk convert
    makes: exact for monolithicSparse, an upper bound within one descriptor
    block for the others (streamOptimized: an uncompressed upper bound)."""
    for name, fmt in sources(t).items():
        for sub in ('monolithicSparse', 'twoGbMaxExtentSparse', 'streamOptimized', 'monolithicFlat',
                    'twoGbMaxExtentFlat'):
            res = t.vdk('measure', '--output=json', '-O', 'vmdk', '-o', 'subformat=' + sub, '-f', fmt, name)
            expect_rc(res, 0, 'vdk measure -O vmdk -o subformat=%s %s' % (sub, name))
            m = json.loads(res.out)
            d = t.path('vm')
            os.makedirs(d)
            expect_rc(t.vdk('convert', '-f', fmt, '-O', 'vmdk', '-o', 'subformat=' + sub, name, 'vm/o.vmdk'), 0,
                      'vdk convert')
            size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
            what = '%s -> vmdk %s: %d bytes written, measured %r' % (name, sub, size, m)
            expect(size <= m['required'] <= m['fully-allocated'], what + ': within the measure')
            if sub == 'monolithicSparse':
                expect_eq(size, m['required'], what + ': exact')
            elif sub != 'streamOptimized':
                expect(m['required'] - size < 4096, what + ': within a descriptor block')
            shutil.rmtree(d)


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
suite.add('measure/vdi-matches-convert', t_vdi)
suite.add('measure/vmdk-bounds-convert', t_vmdk)
suite.add('measure/unsupported-format', t_no_measure)
suite.add('measure/help', t_help)

if __name__ == '__main__':
    main(suite)
