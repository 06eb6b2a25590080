#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk check on raw images: the same exit code and message as qemu-img check."""

from vdktest import MiB, Suite, expect, expect_eq, expect_one_error_line, main

suite = Suite('check')
MSG = 'This image format does not support checks'


def t_unsupported(t, opts):
    t.sparse('disk.img', 16 * MiB)
    t.qemu_io('disk.img', 'write -P 0x10 1M 1M')
    rq = t.qemu_img('check', *opts, 'disk.img')
    expect_eq(rq.rc, 63, 'qemu-img exit code (test premise)', rq)
    rv = t.vdk('check', *opts, 'disk.img')
    expect_eq(rv.rc, rq.rc, 'vdk check exit code vs qemu-img', rv)
    expect_eq(rv.out, rq.out, 'vdk check stdout vs qemu-img', rv)
    last = (rv.err.splitlines() or [''])[-1]
    expect(last.startswith('vdk: ') and last.endswith(MSG),
           "last stderr line is not 'vdk: ...%s'" % MSG, rv)


def t_missing(t):
    rq = t.qemu_img('check', '-f', 'raw', 'nonexistent.img')
    rv = t.vdk('check', '-f', 'raw', 'nonexistent.img')
    expect_eq(rv.rc, rq.rc, 'exit code vs qemu-img', rv)
    expect_one_error_line(rv)


def t_bad_output(t):
    t.sparse('disk.img', MiB)
    rq = t.qemu_img('check', '--output=bogus', 'disk.img')
    rv = t.vdk('check', '--output=bogus', 'disk.img')
    expect_eq(rv.rc, rq.rc, 'exit code vs qemu-img', rv)
    expect_eq(rv.rc, 1, 'exit code', rv)
    expect_one_error_line(rv)


for opts in ([], ['-f', 'raw'], ['--output=json'], ['-f', 'raw', '--output=json'], ['--output=human'],
             ['-f', 'raw', '-r', 'leaks'], ['-f', 'raw', '-r', 'all'], ['-f', 'raw', '-q'],
             ['-f', 'raw', '-T', 'none'], ['-f', 'raw', '-U']):
    suite.add('check-raw-unsupported%s' % ''.join('-' + o.lstrip('-') for o in opts), t_unsupported, opts)
suite.add('check-missing-file', t_missing)
suite.add('check-invalid-output', t_bad_output)

if __name__ == '__main__':
    main(suite)
