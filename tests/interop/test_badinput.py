#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Damaged images made systematically, for every format vdk reads.

From a small valid image of each format (made by qemu-img, with data
written by qemu-io), one header field at a time is set to each boundary
value: 0, 1, 2^31-1, 2^32-1, 2^63-1, 2^64-1 (cut to the field's width),
and for offset fields also unaligned (+1), past the end of the file, into
the header (8) and near 2^64 so that offset + length overflows.  The file
is also cut at every field boundary of its header.  Each damaged image goes
through `vdk info`, `vdk check`, `vdk map` and `vdk convert -O raw`, each
of which must:
  - end normally (no signal) with its documented exit codes, in under 2 s;
  - print one line starting with "vdk: " when it fails (a damaged table
    found while reading adds at most one "vdk: warning:" line before it,
    naming what was found);
  - stay under a memory budget (256 MiB peak RSS, with a 1 GiB address
    space limit so that a huge allocation fails instead of succeeding);
  - leave the damaged file unchanged.
The number of cases is printed (the README's Reliability section quotes
it)."""

import hashlib
import os
import resource
import struct
import subprocess
import time

from vdktest import MiB, VDK, Suite, expect, expect_rc, main

suite = Suite('badinput')

BUDGET_RSS = 256 * 1024  # KiB
AS_LIMIT = 1 << 30
TIME_LIMIT = 2.0

# (name, offset, struct format, kind) - kind: 'size' (counts and sizes) or
# 'offset' (file offsets); every multi-byte field.
QCOW2_FIELDS = [
    ('magic', 0, '>I', 'size'), ('version', 4, '>I', 'size'),
    ('backing_file_offset', 8, '>Q', 'offset'), ('backing_file_size', 16, '>I', 'size'),
    ('cluster_bits', 20, '>I', 'size'), ('size', 24, '>Q', 'size'), ('crypt_method', 32, '>I', 'size'),
    ('l1_size', 36, '>I', 'size'), ('l1_table_offset', 40, '>Q', 'offset'),
    ('refcount_table_offset', 48, '>Q', 'offset'), ('refcount_table_clusters', 56, '>I', 'size'),
    ('nb_snapshots', 60, '>I', 'size'), ('snapshots_offset', 64, '>Q', 'offset'),
    ('incompatible_features', 72, '>Q', 'size'), ('compatible_features', 80, '>Q', 'size'),
    ('autoclear_features', 88, '>Q', 'size'), ('refcount_order', 96, '>I', 'size'),
    ('header_length', 100, '>I', 'size'),
]
QCOW1_FIELDS = [
    ('magic', 0, '>I', 'size'), ('version', 4, '>I', 'size'), ('backing_file_offset', 8, '>Q', 'offset'),
    ('backing_file_size', 16, '>I', 'size'), ('mtime', 20, '>I', 'size'), ('size', 24, '>Q', 'size'),
    ('cluster_bits', 32, 'B', 'size'), ('l2_bits', 33, 'B', 'size'), ('crypt_method', 36, '>I', 'size'),
    ('l1_table_offset', 40, '>Q', 'offset'),
]
VDI_FIELDS = [
    ('signature', 0x40, '<I', 'size'), ('version', 0x44, '<I', 'size'), ('header_size', 0x48, '<I', 'size'),
    ('image_type', 0x4c, '<I', 'size'), ('flags', 0x50, '<I', 'size'), ('offset_bmap', 0x154, '<I', 'offset'),
    ('offset_data', 0x158, '<I', 'offset'), ('cylinders', 0x15c, '<I', 'size'), ('sector_size', 0x168, '<I', 'size'),
    ('disk_size', 0x170, '<Q', 'size'), ('block_size', 0x178, '<I', 'size'), ('block_extra', 0x17c, '<I', 'size'),
    ('blocks_in_image', 0x180, '<I', 'size'), ('blocks_allocated', 0x184, '<I', 'size'),
]
VMDK_FIELDS = [
    ('magic', 0, '<I', 'size'), ('version', 4, '<I', 'size'), ('flags', 8, '<I', 'size'),
    ('capacity', 12, '<Q', 'size'), ('grain_size', 20, '<Q', 'size'), ('desc_offset', 28, '<Q', 'offset'),
    ('desc_size', 36, '<Q', 'size'), ('num_gtes_per_gt', 44, '<I', 'size'), ('rgd_offset', 48, '<Q', 'offset'),
    ('gd_offset', 56, '<Q', 'offset'), ('overhead', 64, '<Q', 'size'), ('compress_algorithm', 77, '<H', 'size'),
]

FORMATS = {
    'qcow2': (QCOW2_FIELDS, ['-o', 'cluster_size=4096']),
    'qcow': (QCOW1_FIELDS, []),
    'vdi': (VDI_FIELDS, []),
    'vmdk': (VMDK_FIELDS, []),
}

COMMANDS = [
    (['info'], (0, 1)),
    (['check'], (0, 1, 2, 3, 63)),
    (['map', '--output=json'], (0, 1)),
    (['convert', '-O', 'raw'], (0, 1)),
]


def values(fmt, kind, file_size):
    bits = struct.calcsize(fmt) * 8
    mask = (1 << bits) - 1
    vals = {0, 1, (1 << 31) - 1, (1 << 32) - 1, (1 << 63) - 1, (1 << 64) - 1}
    if kind == 'offset':
        vals |= {8, 4097, file_size + 512, (1 << 64) - 512, (1 << 63) + 4096}
    return sorted({v & mask for v in vals})


def limits():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_one(t, args, img):
    env = dict(os.environ, LC_ALL='C', ASAN_OPTIONS=os.environ.get('ASAN_OPTIONS', '') + ':detect_leaks=0')
    t0 = time.monotonic()
    p = subprocess.Popen([VDK] + args, cwd=t.dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=limits if 'ASAN_OPTIONS' not in os.environ else None, env=env)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError('vdk %s hangs on %s' % (' '.join(args), img))
    return p.returncode, err.decode(errors='replace'), time.monotonic() - t0


def check_case(t, img, what, stats):
    path = t.path(img)
    before = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    for args, codes in COMMANDS:
        full = args + [img] + (['out.raw'] if args[0] == 'convert' else [])
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rc, err, secs = run_one(t, full, img)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        stats['runs'] += 1
        cmd = 'vdk %s (%s)' % (' '.join(args), what)
        expect(rc >= 0, '%s: killed by signal %d: %s' % (cmd, -rc, err[-2000:]))
        expect(rc in codes, '%s: exit %d: %s' % (cmd, rc, err[-500:]))
        expect(secs < TIME_LIMIT, '%s: took %.2f s' % (cmd, secs))
        if rc == 1:
            # one error line; corruption found while reading may add one
            # "vdk: warning: ..." line naming what was found, before it
            lines = [l for l in err.splitlines() if l.strip()]
            errors = [l for l in lines if not l.startswith('vdk: warning: ')]
            warnings = len(lines) - len(errors)
            expect(len(errors) == 1 and errors[0].startswith('vdk: ') and warnings <= 1,
                   '%s: one error line, got: %r' % (cmd, err[:600]))
            stats['errors'] += 1
        # ru_maxrss of children is the largest so far: a rise past the budget is this run's
        if ru1 > ru0:
            expect(ru1 <= BUDGET_RSS, '%s: peak RSS %d KiB over the %d KiB budget' % (cmd, ru1, BUDGET_RSS))
        if os.path.exists(t.path('out.raw')):
            os.unlink(t.path('out.raw'))
    after = hashlib.sha256(open(path, 'rb').read()).hexdigest()
    expect(after == before, '%s: the image file changed' % what)


def base_image(t, fmt, opts):
    img = 'base.' + fmt
    expect_rc(t.qemu_img('create', '-q', '-f', fmt, *opts, img, '4M'), 0, 'qemu-img create')
    t.qemu_io(img, 'write -P 0x5a 0 64k', 'write -P 0x33 1M 4k', fmt=fmt)
    return open(t.path(img), 'rb').read()


def t_fields(t, fmt):
    fields, opts = FORMATS[fmt]
    data = base_image(t, fmt, opts)
    stats = {'runs': 0, 'errors': 0, 'cases': 0}
    for name, off, sfmt, kind in fields:
        orig = struct.unpack_from(sfmt, data, off)[0]
        for v in values(sfmt, kind, len(data)):
            if v == orig:
                continue
            bad = bytearray(data)
            struct.pack_into(sfmt, bad, off, v)
            img = 'bad.' + fmt
            with open(t.path(img), 'wb') as f:
                f.write(bad)
            stats['cases'] += 1
            check_case(t, img, '%s %s=%#x' % (fmt, name, v), stats)
    t.log('%s: %d damaged headers, %d runs, %d clean refusals' % (fmt, stats['cases'], stats['runs'], stats['errors']))
    expect(stats['cases'] >= len(fields) * 4, 'cases generated')


def t_truncated(t, fmt):
    fields, opts = FORMATS[fmt]
    data = base_image(t, fmt, opts)
    cuts = {0, 1}
    for name, off, sfmt, kind in fields:
        cuts |= {off, off + struct.calcsize(sfmt)}
    cuts |= {512, 4096, len(data) // 2, len(data) - 1}
    stats = {'runs': 0, 'errors': 0, 'cases': 0}
    for c in sorted(cuts):
        if c >= len(data):
            continue
        img = 'cut.' + fmt
        with open(t.path(img), 'wb') as f:
            f.write(data[:c])
        stats['cases'] += 1
        check_case(t, img, '%s cut at %d of %d bytes' % (fmt, c, len(data)), stats)
    t.log('%s: %d truncations, %d runs' % (fmt, stats['cases'], stats['runs']))


def t_tiny_petabyte(t):
    """Images claiming huge disks with huge tables, in a few bytes."""
    stats = {'runs': 0, 'errors': 0, 'cases': 0}
    # qcow2: 1 EiB disk, 2^31 L1 entries, refcount table of 2^31 clusters
    h = bytearray(4096)
    struct.pack_into('>IIQIIQIIQQIIQQQQII', h, 0, 0x514649fb, 3, 0, 0, 16, 1 << 60, 0, (1 << 31) - 1, 65536,
                     131072, (1 << 31) - 1, 0, 0, 0, 0, 0, 4, 104)
    for name, blob in (('qcow2-eib.qcow2', h),):
        with open(t.path(name), 'wb') as f:
            f.write(blob)
        stats['cases'] += 1
        check_case(t, name, name, stats)
    # vdi: 2^32-1 blocks claimed
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'v.vdi', '4M'), 0)
    d = bytearray(open(t.path('v.vdi'), 'rb').read())
    struct.pack_into('<Q', d, 0x170, ((1 << 32) - 1) << 20)
    struct.pack_into('<I', d, 0x180, (1 << 32) - 1)
    with open(t.path('v-huge.vdi'), 'wb') as f:
        f.write(d)
    check_case(t, 'v-huge.vdi', 'vdi claiming 2^32-1 blocks', stats)
    # vmdk: capacity 2^62 sectors with a 512-entry grain table
    expect_rc(t.qemu_img('create', '-q', '-f', 'vmdk', 'k.vmdk', '4M'), 0)
    d = bytearray(open(t.path('k.vmdk'), 'rb').read())
    struct.pack_into('<Q', d, 12, 1 << 62)
    with open(t.path('k-huge.vmdk'), 'wb') as f:
        f.write(d)
    check_case(t, 'k-huge.vmdk', 'vmdk claiming 2^62 sectors', stats)


def t_polyglot(t):
    """A raw disk whose first sector is another format's header is not
    opened as that format's image with data it does not have; forced to
    raw it reads as bytes."""
    stats = {'runs': 0, 'errors': 0, 'cases': 0}
    for fmt in ('qcow2', 'vdi', 'vmdk', 'qcow'):
        expect_rc(t.qemu_img('create', '-q', '-f', fmt, 'h.' + fmt, '1M'), 0)
        head = open(t.path('h.' + fmt), 'rb').read()[:512]
        disk = bytearray(4 * MiB)
        disk[:512] = head
        with open(t.path('poly.img'), 'wb') as f:
            f.write(disk)
        check_case(t, 'poly.img', 'raw disk starting with a %s header' % fmt, stats)
        res = t.vdk('convert', '-f', 'raw', '-O', 'raw', 'poly.img', 'p.raw')
        expect_rc(res, 0, 'forced raw')
        expect(t.content('p.raw') == bytes(disk), 'forced raw reads the bytes')


for f in FORMATS:
    suite.add('fields/%s' % f, t_fields, f)
    suite.add('truncated/%s' % f, t_truncated, f)
suite.add('tiny-petabyte', t_tiny_petabyte)
suite.add('polyglot', t_polyglot)

if __name__ == '__main__':
    main(suite)
