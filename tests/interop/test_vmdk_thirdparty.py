#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vmdk against implementations other than QEMU's.

  VMDKstream  Debian's python3-vmdkstream (the converter Ubuntu uses to make
              its VMware cloud images) writes streamOptimized images: vdk
              reads them byte-identically, check finds no errors, map shows
              the written ranges, info agrees with qemu-img;
  libvmdk     libyal's VMDK library (python3-libvmdk, libvmdk-utils' vmdkinfo),
              a reader written from VMware's documents independently of QEMU,
              reads every subformat vdk writes (including a multi-extent
              twoGbMaxExtent image and a streamOptimized one) byte-identically.

Both run under Debian's own /usr/bin/python3 (where the packages install their
modules), not necessarily the interpreter running this script."""

import json
import os
import shutil

from vdktest import MiB, Suite, expect, expect_eq, expect_rc, main

suite = Suite('vmdk-thirdparty')

SYS_PY = '/usr/bin/python3'
GiB = 1024 * MiB

SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat',
              'streamOptimized']

WRITES = [
    'write -P 0x5a 1M 3M',
    'write -P 0x11 %d 100000' % (40 * MiB + 4097),
    'write -P 0x22 %d 1M' % (69 * MiB),
    'write -P 0x33 %d 513' % (70 * MiB - 513),
]


def make_raw(t, name, size, writes):
    t.sparse(name, size)
    t.qemu_io(name, *writes)


def have(t, module):
    res = t.run([SYS_PY, '-c', 'import %s' % module])
    expect(res.rc == 0, '%s has the module %s (Debian package installed)' % (SYS_PY, module), res)


def t_vmdkstream_writes(t):
    """streamOptimized images from VMDKstream read back identically."""
    have(t, 'VMDKstream')
    make_raw(t, 'in.raw', 70 * MiB, WRITES)
    res = t.run([SYS_PY, '-c', 'import VMDKstream, sys; VMDKstream.convert_to_stream(sys.argv[1], sys.argv[2])',
                 'in.raw', 's.vmdk'])
    expect_rc(res, 0, 'VMDKstream.convert_to_stream')
    iv = json.loads(t.vdk('info', '--output=json', 's.vmdk').out)
    iq = json.loads(t.qemu_img('info', '--output=json', 's.vmdk').out)
    for i in (iv, iq):
        i.pop('actual-size', None)
    expect_eq(iv, iq, 'vdk info and qemu-img info of a VMDKstream image')
    expect_eq(iv['format-specific']['data']['create-type'], 'streamOptimized', 'create type')
    res = t.vdk('check', 's.vmdk')
    expect(res.rc == 0 and 'No errors were found' in res.out, 'vdk check', res)
    expect_rc(t.vdk('convert', '-O', 'raw', 's.vmdk', 'out.raw'), 0, 'vdk convert -O raw')
    expect(t.content('out.raw') == t.content('in.raw'), 'the content VMDKstream wrote reads back identically')
    res = t.vdk('compare', 's.vmdk', 'in.raw')
    expect(res.rc == 0 and 'Images are identical' in res.out, 'vdk compare', res)
    # every written 64 KiB grain is data; an untouched region is not
    m = json.loads(t.vdk('map', '--output=json', 's.vmdk').out)
    data = [(e['start'], e['start'] + e['length']) for e in m if e['data']]
    covered = lambda off: any(a <= off < b for a, b in data)
    for off in (1 * MiB, 4 * MiB - 1, 40 * MiB + 4097, 69 * MiB, 70 * MiB - 1):
        expect(covered(off), 'vdk map shows data at %d' % off, m)
    for off in (0, 20 * MiB, 50 * MiB):
        expect(not covered(off), 'vdk map shows no data at %d' % off, m)
    # and vdk converts it on to other formats
    expect_rc(t.vdk('convert', '-O', 'qcow2', 's.vmdk', 'x.qcow2'), 0, 'vdk convert -O qcow2')
    res = t.qemu_img('compare', 'x.qcow2', 'in.raw')
    expect(res.rc == 0, 'qemu-img compare of the qcow2 vdk made from it', res)


# Hash the ranges given as OFF:LEN arguments (all of the image if none).
LIBVMDK_READ = r'''
import hashlib, pyvmdk, sys
h = pyvmdk.handle()
h.open(sys.argv[1])
h.open_extent_data_files()
size = h.get_media_size()
ranges = [tuple(int(x) for x in a.split(':')) for a in sys.argv[2:]] or [(0, size)]
md = hashlib.sha256()
for off, ln in ranges:
    end = off + ln
    while off < end:
        n = min(end - off, 16 << 20)
        md.update(h.read_buffer_at_offset(n, off))
        off += n
print(size, md.hexdigest())
'''


def raw_digest(t, name, ranges):
    import hashlib
    md = hashlib.sha256()
    with open(t.path(name), 'rb') as f:
        for off, ln in ranges:
            f.seek(off)
            md.update(f.read(ln))
    return md.hexdigest()


def ranges_for(size):
    """Whole small images; for the 3 GiB ones, windows over every write,
    the 2 GiB extent boundary, zero areas and both ends."""
    if size <= 256 * MiB:
        return [(0, size)]
    starts = [0, 40 * MiB, 69 * MiB, 500 * MiB, 2 * GiB - 2 * MiB, size - 4 * MiB]
    return [(o, 4 * MiB) for o in starts]


def t_libvmdk_reads(t, sub):
    """libvmdk reads what vdk writes, for each subformat."""
    have(t, 'pyvmdk')
    size = 3 * GiB if sub.startswith('twoGb') else 70 * MiB
    writes = list(WRITES)
    if size > 70 * MiB:
        writes += ['write -P 0x44 %d 300000' % (2 * GiB - 150000), 'write -P 0x55 %d 4096' % (size - 4096)]
    make_raw(t, 'in.raw', size, writes)
    expect_rc(t.vdk('convert', '-O', 'vmdk', '-o', 'subformat=' + sub, 'in.raw', 'o.vmdk'), 0, 'vdk convert')
    rng = ranges_for(size)
    args = ['%d:%d' % r for r in rng]
    res = t.run([SYS_PY, '-c', LIBVMDK_READ, 'o.vmdk'] + args, timeout=300)
    expect_rc(res, 0, 'libvmdk opens and reads the image')
    got_size, got = res.out.split()
    expect_eq(int(got_size), size, 'media size libvmdk reports')
    expect_eq(got, raw_digest(t, 'in.raw', rng), 'sha256 of what libvmdk reads vs the raw source')
    vmdkinfo = shutil.which('vmdkinfo')
    expect(vmdkinfo is not None, 'vmdkinfo (libvmdk-utils) is installed')
    res = t.run([vmdkinfo, 'o.vmdk'])
    expect(res.rc == 0 and 'Media size' in res.out, 'vmdkinfo', res)
    extents = res.out.count('Extent:')
    expect_eq(extents, 2 if sub.startswith('twoGb') else 1, 'extents vmdkinfo lists')
    # after a vdk io write in place the image still reads right in libvmdk
    if sub != 'streamOptimized':
        t.vdk_io('o.vmdk', 'write -P 0x66 %d 5000' % (30 * MiB + 7), fmt='vmdk')
        t.qemu_io('in.raw', 'write -P 0x66 %d 5000' % (30 * MiB + 7))
        rng.append((30 * MiB, MiB))
        args.append('%d:%d' % rng[-1])
        res = t.run([SYS_PY, '-c', LIBVMDK_READ, 'o.vmdk'] + args, timeout=300)
        expect_rc(res, 0, 'libvmdk reads the image vdk io wrote')
        expect_eq(res.out.split()[1], raw_digest(t, 'in.raw', rng), 'sha256 after a vdk io write')


suite.add('vmdkstream/writes-vdk-reads', t_vmdkstream_writes)
for s in SUBFORMATS:
    suite.add('libvmdk/reads-vdk/%s' % s, t_libvmdk_reads, s)

if __name__ == '__main__':
    main(suite)
