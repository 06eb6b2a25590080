#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Hostile qcow2 images: metadata mutated at random (fixed seeds, so a
failure is reproducible by its case name), then opened by every vdk
command that reads metadata.  vdk must never crash (no signal, no
sanitizer report), never hang (each command has a time limit), never
allocate without bound, and report failure as exit code 1 with errors of
the form "vdk: ...: ..." on single lines.  Successful reads must not
reach beyond the image (the converted copy has the virtual size).

The images are made by qemu-img/qemu-io (data, zero and compressed
clusters, extended L2 or not, an internal snapshot) so the mutations hit
real tables: header fields, extensions, L1, L2, refcount table and
blocks, snapshot table.
"""

import os
import random
import re
import struct

from vdktest import KiB, MiB, Suite, expect, expect_rc, main
from qcow2util import read_header

suite = Suite('qcow2-fuzz')

SIZE = 8 * MiB
ROUNDS = int(os.environ.get("VDK_FUZZ_ROUNDS", "40"))  # mutated images per base image

BASES = {
    'v3-64k': ['-o', 'cluster_size=65536'],
    'v3-4k-extl2-off': ['-o', 'cluster_size=4096'],
    'v3-16k-extl2': ['-o', 'cluster_size=16384,extended_l2=on'],
    'v2-512': ['-o', 'compat=0.10,cluster_size=512'],
    'v3-zstd-refcount1': ['-o', 'cluster_size=8192,compression_type=zstd,refcount_bits=1'],
}


def make_base(t, name, opts):
    path = 'base.qcow2'
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', *opts, path, str(SIZE)), 0)
    t.qemu_io(path, 'write -P 0x41 0 100k', 'write -z 1M 64k', 'write -c -P 0x42 2M 64k',
              'write -P 0x43 %d 5000' % (SIZE - 5000), fmt='qcow2')
    if 'refcount_bits=1' not in opts[-1]:  # a snapshot needs refcount 2
        expect_rc(t.qemu_img('snapshot', '-c', 'snap1', path), 0)
        t.qemu_io(path, 'write -P 0x44 0 4k', fmt='qcow2')
    with open(t.path(path), 'rb') as f:
        return f.read()


def metadata_ranges(data):
    """(offset, length) of the metadata regions of a qcow2 image."""
    h = read_header_bytes(data)
    cs = h['cs']
    ranges = [(0, min(cs, len(data)))]
    ranges.append((h['l1'], h['l1_size'] * 8))
    ranges.append((h['rt'], h['rt_clusters'] * cs))
    for i in range(h['l1_size']):
        e = struct.unpack_from('>Q', data, h['l1'] + 8 * i)[0] & 0x00fffffffffffe00
        if e and e + cs <= len(data):
            ranges.append((e, cs))
    for i in range(h['rt_clusters'] * cs // 8):
        off = h['rt'] + 8 * i
        if off + 8 > len(data):
            break
        e = struct.unpack_from('>Q', data, off)[0] & ~0x1ff
        if e and e + cs <= len(data):
            ranges.append((e, cs))
    if h['snapshots']:
        ranges.append((h['snap_off'], 512))
    return [(o, l) for o, l in ranges if 0 <= o < len(data) and l > 0]


def read_header_bytes(data):
    (magic, version, boff, blen, cbits, size, crypt, l1_size, l1, rt, rt_clusters, nsnap,
     snap_off) = struct.unpack_from('>4sIQIIQIIQQIIQ', data, 0)
    return {'cs': 1 << cbits, 'l1': l1, 'l1_size': l1_size, 'rt': rt, 'rt_clusters': rt_clusters,
            'snapshots': nsnap, 'snap_off': snap_off}


INTERESTING = [0, 1, 0x7f, 0x80, 0xff, 0x200, 0xfe00, 0x10000, 0xffffffff, 0x8000000000000000,
               0xffffffffffffffff, 0x00fffffffffffe00, 0x4000000000000000]


def mutate(data, rng):
    buf = bytearray(data)
    ranges = metadata_ranges(data)
    for _ in range(rng.randint(1, 4)):
        off, length = rng.choice(ranges)
        pos = off + rng.randrange(max(1, length))
        if pos >= len(buf):
            continue
        kind = rng.randrange(4)
        if kind == 0:  # one bit
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:  # a random byte
            buf[pos] = rng.randrange(256)
        else:  # an interesting 32- or 64-bit value at an aligned spot
            width = 8 if kind == 2 else 4
            pos -= pos % width
            if pos + width <= len(buf):
                v = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
                buf[pos:pos + width] = v.to_bytes(width, 'big')
    return bytes(buf)


def check_outcome(res, what):
    if res.rc == 63 and 'does not support checks' in res.err:
        return  # the mutation broke the magic: the file probes as raw (qemu-img's 63)
    expect(res.rc in (0, 1, 2, 3), '%s: exit code %d (crash or signal?)' % (what, res.rc), res)
    expect('Sanitizer' not in res.err and 'runtime error' not in res.err, '%s: sanitizer report' % what, res)
    for line in res.err.splitlines():
        if line.startswith(('ERROR', 'Leaked', 'Repairing', 'Rebuilding')):
            continue  # check's per-cluster report
        if re.match(r'^[a-z_]+ failed: ', line):
            continue  # vdk io reports a failed command like qemu-io
        expect(line.startswith('vdk: '), '%s: stderr line not of the form "vdk: ...": %r' % (what, line), res)


def t_fuzz(t, base):
    data = make_base(t, base, BASES[base])
    rng = random.Random('vdk-qcow2-fuzz-' + base)
    for i in range(ROUNDS):
        img = t.path('m.qcow2')
        with open(img, 'wb') as f:
            f.write(mutate(data, rng))
        tag = '%s round %d' % (base, i)
        limit = dict(timeout=30)
        check_outcome(t.vdk('info', '--output=json', 'm.qcow2', **limit), tag + ': info')
        check_outcome(t.vdk('check', 'm.qcow2', **limit), tag + ': check')
        check_outcome(t.vdk('map', '--output=json', 'm.qcow2', **limit), tag + ': map')
        res = t.vdk('convert', '-O', 'raw', 'm.qcow2', 'out.raw', **limit)
        check_outcome(res, tag + ': convert')
        if res.rc == 0:
            expect(os.path.getsize(t.path('out.raw')) <= 1 << 50, tag + ': converted size')
        if os.path.exists(t.path('out.raw')):
            os.unlink(t.path('out.raw'))
        # a write, then a repair: still no crash, and a repaired image
        # that qemu-img accepts when vdk says it is clean
        check_outcome(t.vdk_io_raw('m.qcow2', ['write -P 0x55 %d 70000' % rng.randrange(SIZE - 70000),
                                              'read 0 64k'], fmt='qcow2', engine=False, **limit), tag + ': io')
        res = t.vdk('check', '-r', 'all', 'm.qcow2', **limit)
        check_outcome(res, tag + ': check -r all')
        if res.rc == 0 and 'No errors were found' in res.out:
            q = t.qemu_img('check', '-f', 'qcow2', 'm.qcow2')
            expect(q.rc == 0, tag + ': qemu-img check after vdk repaired the image: exit %d' % q.rc, q)


for base in BASES:
    suite.add('qcow2-fuzz/%s' % base, t_fuzz, base)

if __name__ == '__main__':
    main(suite)
