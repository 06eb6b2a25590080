#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk compare against qemu-img compare: exit codes and stdout on the same pairs."""

from vdktest import MiB, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main

suite = Suite('compare')
SIZE = 64 * MiB


def base(t, name, size=SIZE):
    t.sparse(name, size)
    t.qemu_io(name, 'write -P 0x3c 1M 64k', 'write -P 0x3d %d 3000' % (size * 5 // 16 + 100),
              'write -P 0x3e %d 512' % (size - 512))
    return name


# Pair makers: build a.img and b.img; return the expected exit code.
def p_identical(t):
    base(t, 'a.img')
    base(t, 'b.img')
    return 0


def p_identical_sparse_vs_allocated(t):
    """Same content, one side with allocated zeroes."""
    base(t, 'a.img')
    base(t, 'b.img')
    t.qemu_io('b.img', 'write -P 0 8M 4M', 'write -P 0 0 4096')
    return 0


def p_byte_5000(t):
    base(t, 'a.img')
    base(t, 'b.img')
    t.qemu_io('b.img', 'write -P 0x01 5000 1')
    return 1


def p_byte_in_data(t):
    base(t, 'a.img')
    base(t, 'b.img')
    t.qemu_io('b.img', 'write -P 0x01 %d 1' % (1 * MiB + 40000))
    return 1


def p_last_byte(t):
    base(t, 'a.img')
    base(t, 'b.img')
    t.qemu_io('b.img', 'write -P 0x01 %d 1' % (SIZE - 1))
    return 1


def p_size_zero_tail(t):
    base(t, 'a.img')
    base(t, 'b.img')
    with open(t.path('b.img'), 'r+b') as f:
        f.truncate(SIZE + 8 * MiB)
    return 0


def p_size_zero_tail_reversed(t):
    p_size_zero_tail(t)
    t.run(['mv', 'a.img', 'tmp.img'])
    t.run(['mv', 'b.img', 'a.img'])
    t.run(['mv', 'tmp.img', 'b.img'])
    return 0


def p_size_nonzero_tail(t):
    p_size_zero_tail(t)
    t.qemu_io('b.img', 'write -P 0x42 %d 100' % (SIZE + 5 * MiB + 3))
    return 1


def p_size_nonzero_tail_reversed(t):
    p_size_nonzero_tail(t)
    t.run(['mv', 'a.img', 'tmp.img'])
    t.run(['mv', 'b.img', 'a.img'])
    t.run(['mv', 'tmp.img', 'b.img'])
    return 1


def p_alloc_differs_not_eof(t):
    """Same content but b has an allocated zero block inside a hole that
    does not reach the end of the file on either side."""
    base(t, 'a.img')
    base(t, 'b.img')
    t.qemu_io('b.img', 'write -P 0 12M 4096')
    return 0


def p_alloc_differs_eof(t):
    """a is fully sparse; b has one allocated zero block: a's first hole
    runs to the end of the file, b's does not."""
    t.sparse('a.img', 8 * MiB)
    t.sparse('b.img', 8 * MiB)
    t.qemu_io('b.img', 'write -P 0 5000 1')
    return 0


def p_content_differs_in_hole(t):
    t.sparse('a.img', 8 * MiB)
    t.sparse('b.img', 8 * MiB)
    t.qemu_io('b.img', 'write -P 0x01 5000 1')
    return 1


def p_unaligned_vs_converted(t):
    """A 1000000-byte raw file and its qemu-img convert copy (1000448
    bytes): qemu-img sees both as 1000448 bytes."""
    t.sparse('a.img', 1000000)
    t.qemu_io('a.img', 'write -P 0x61 998000 2000')
    expect_rc(t.qemu_img('convert', '-f', 'raw', '-O', 'raw', 'a.img', 'b.img'), 0, 'qemu-img convert')
    return 0


PAIRS = [('identical', p_identical), ('identical-sparse-vs-allocated', p_identical_sparse_vs_allocated),
         ('byte-5000', p_byte_5000), ('byte-in-data', p_byte_in_data), ('last-byte', p_last_byte),
         ('byte-in-hole', p_content_differs_in_hole),
         ('size-mismatch-zero-tail', p_size_zero_tail), ('size-mismatch-zero-tail-reversed', p_size_zero_tail_reversed),
         ('size-mismatch-nonzero-tail', p_size_nonzero_tail),
         ('size-mismatch-nonzero-tail-reversed', p_size_nonzero_tail_reversed),
         ('allocation-differs', p_alloc_differs_not_eof), ('allocation-differs-hole-to-eof', p_alloc_differs_eof),
         ('unaligned-size-vs-converted', p_unaligned_vs_converted)]


def t_pair(t, maker, opts, strict_expected=None):
    expected = maker(t)
    rq = t.qemu_img('compare', *opts, 'a.img', 'b.img')
    rv = t.vdk('compare', *opts, 'a.img', 'b.img')
    if '-s' not in opts:
        expect_eq(rq.rc, expected, 'qemu-img exit code (test premise)', rq)
    expect_eq(rv.rc, rq.rc, 'vdk compare exit code vs qemu-img', rv)
    expect_eq(rv.out, rq.out, 'vdk compare stdout vs qemu-img', rv)
    if rv.rc in (0, 1):
        expect_eq(rv.err, '', 'vdk compare stderr', rv)


def t_5000_exact(t):
    p_byte_5000(t)
    rv = t.vdk('compare', 'a.img', 'b.img')
    expect_rc(rv, 1)
    expect_eq(rv.out, 'Content mismatch at offset 4608!\n', 'stdout', rv)


def t_identical_exact(t):
    p_identical(t)
    rv = t.vdk('compare', '-f', 'raw', '-F', 'raw', 'a.img', 'b.img')
    expect_rc(rv, 0)
    expect_eq(rv.out, 'Images are identical.\n', 'stdout', rv)


def t_missing(t, which):
    base(t, 'a.img', 4 * MiB)
    args = ('a.img', 'nonexistent.img') if which == 'second' else ('nonexistent.img', 'a.img')
    rq = t.qemu_img('compare', *args)
    rv = t.vdk('compare', *args)
    expect_eq(rq.rc, 2, 'qemu-img exit code (test premise)', rq)
    expect_rc(rv, 2)
    expect_eq(rv.out, rq.out, 'stdout vs qemu-img', rv)
    expect_one_error_line(rv)
    expect('nonexistent.img' in rv.err, 'error does not name the file', rv)


def t_quiet(t, maker):
    expected = maker(t)
    rv = t.vdk('compare', '-q', 'a.img', 'b.img')
    expect_rc(rv, expected)
    expect_eq(rv.out + rv.err, '', 'output of compare -q', rv)


for name, maker in PAIRS:
    suite.add('compare-%s' % name, t_pair, maker, ())
for name, maker in PAIRS:
    suite.add('compare-strict-%s' % name, t_pair, maker, ('-s',))
for name, maker in (('identical', p_identical), ('byte-5000', p_byte_5000)):
    suite.add('compare-f-raw-%s' % name, t_pair, maker, ('-f', 'raw', '-F', 'raw'))
    for cache in ('none', 'writeback'):
        suite.add('%s/compare-%s' % (cache, name), t_pair, maker, ('-f', 'raw', '-F', 'raw', '-T', cache),
                  cache=cache)
suite.add('compare-byte-5000-exact-message', t_5000_exact)
suite.add('compare-identical-exact-message', t_identical_exact)
suite.add('compare-missing-first-file', t_missing, 'first')
suite.add('compare-missing-second-file', t_missing, 'second')
suite.add('compare-quiet-identical', t_quiet, p_identical)
suite.add('compare-quiet-different', t_quiet, p_byte_5000)

if __name__ == '__main__':
    main(suite)
