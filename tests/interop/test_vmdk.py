#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vmdk against qemu-img/qemu-io, for every subformat.

  qemu->vdk   qemu-img creates, qemu-io writes patterns, zero writes and
              unaligned data; vdk convert -O raw gives qemu-img convert's
              bytes, vdk map agrees with qemu-img map, info JSON and text
              agree (actual-size aside);
  vdk->qemu   vdk create (same 'Formatting' line as qemu-img), vdk io
              writes (per I/O engine and cache mode for the random model):
              qemu-img check is clean and qemu-img compare finds the image
              identical to a raw mirror written by qemu-io;
  stream      streamOptimized written by vdk convert is read by qemu-img
              (check, compare), and qemu-img's by vdk;
  delta       vdk create -b parent.vmdk; qemu reads the child; vdk reads
              qemu's children;
  resize      grow sparse and flat images, then qemu-img check/compare;
  check       injected corruptions: a grain past the end of the file (same
              first error and exit code as qemu-img check), a leaked grain;
  hostile     damaged descriptors and headers give one error line, exit 1;
              extents outside the descriptor's directory are refused unless
              allow-extent-paths=on."""

import json
import os
import random
import struct
import zlib

from vdktest import KiB, MiB, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main

suite = Suite('vmdk')

SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat',
              'streamOptimized']
GiB = 1024 * MiB
# Big enough to split twoGbMaxExtent* into two extents; sparse files only.
SIZE = 3 * GiB



def size_for(sub):
    """twoGbMaxExtent* images get a second extent; the others stay small."""
    return SIZE if sub.startswith('twoGb') else 256 * MiB


def writes(size):
    return [
        'write -P 0x11 0 1M',
        'write -P 0x22 %d 100000' % (size * 2 // 3 - 483),  # across the 2 GiB extent boundary for 3 GiB
        'write -z 4M 1M',
        'write -P 0x33 %d 472' % (size - 472),                # the very end
        'write -P 0x44 65537 3',                               # unaligned inside a written grain
        'write -P 0x55 10M 12345',                             # unaligned, new grain
        'write -z 10M 4k',
    ]


def same_files(t, a, b, what):
    res = t.run(['cmp', a, b])
    expect(res.rc == 0, what, res)


def drop_actual(info):
    info = dict(info)
    info.pop('actual-size', None)
    return info


def parse_json(res, what):
    try:
        return json.loads(res.out)
    except ValueError:
        expect(False, '%s: output is not JSON' % what, res)


def mirror(t, name, cmds, size=SIZE):
    t.sparse(name, size)
    t.qemu_io(name, *cmds)
    return name


def qemu_clean(t, name):
    res = t.qemu_img('check', name)
    expect(res.rc == 0 and 'No errors were found on the image.' in res.out, 'qemu-img check %s' % name, res)


def qemu_identical(t, img, raw):
    res = t.qemu_img('compare', '-f', 'vmdk', '-F', 'raw', img, raw)
    expect(res.rc == 0 and 'Images are identical.' in res.out, 'qemu-img compare %s %s' % (img, raw), res)


def qemu_image(t, sub, name='img.vmdk'):
    size = size_for(sub)
    cmds = writes(size)
    if sub == 'streamOptimized':
        # qemu writes streams through convert (and can append with qemu-io)
        mirror(t, 'src.raw', cmds, size)
        res = t.qemu_img('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'src.raw', name)
        expect_rc(res, 0, 'qemu-img convert to streamOptimized (test premise)')
        return
    res = t.qemu_img('create', '-q', '-f', 'vmdk', '-o', 'subformat=' + sub, name, str(size))
    expect_rc(res, 0, 'qemu-img create (test premise)')
    t.qemu_io(name, *cmds, fmt='vmdk')


def t_qemu_read(t, sub):
    qemu_image(t, sub)
    res = t.qemu_img('convert', '-O', 'raw', 'img.vmdk', 'ref.raw')
    expect_rc(res, 0, 'qemu-img convert (reference)')
    res = t.vdk('convert', '-f', 'vmdk', '-O', 'raw', 'img.vmdk', 'out.raw')
    expect_rc(res, 0, 'vdk convert -O raw')
    same_files(t, 'out.raw', 'ref.raw', 'vdk convert vs qemu-img convert: bytes differ')
    # probed too, and compare agrees
    res = t.vdk('compare', 'img.vmdk', 'ref.raw')
    expect(res.rc == 0 and 'Images are identical.' in res.out, 'vdk compare (format probed)', res)
    qm = parse_json(t.qemu_img('map', '--output=json', 'img.vmdk'), 'qemu-img map')
    vm = parse_json(t.vdk('map', '--output=json', 'img.vmdk'), 'vdk map')
    expect_eq(vm, qm, 'vdk map --output=json vs qemu-img map')
    qi = drop_actual(parse_json(t.qemu_img('info', '--output=json', 'img.vmdk'), 'qemu-img info'))
    vi = drop_actual(parse_json(t.vdk('info', '--output=json', 'img.vmdk'), 'vdk info'))
    expect_eq(vi, qi, 'vdk info --output=json vs qemu-img info')
    qj = [l for l in t.qemu_img('info', '--output=json', 'img.vmdk').out.splitlines() if 'actual-size' not in l]
    vj = [l for l in t.vdk('info', '--output=json', 'img.vmdk').out.splitlines() if 'actual-size' not in l]
    expect_eq(vj, qj, 'vdk info --output=json vs qemu-img info, line by line')
    qt = [l for l in t.qemu_img('info', 'img.vmdk').out.splitlines() if not l.startswith('disk size')]
    vt = [l for l in t.vdk('info', 'img.vmdk').out.splitlines() if not l.startswith('disk size')]
    expect_eq(vt, qt, 'vdk info vs qemu-img info (text)')
    res = t.vdk('check', 'img.vmdk')
    expect_rc(res, 0, 'vdk check')
    expect_eq(res.out, t.qemu_img('check', 'img.vmdk').out, 'vdk check vs qemu-img check output', res)


def t_vdk_write(t, sub):
    os.makedirs(t.path('q'))
    size = size_for(sub)
    rq = t.qemu_img('create', '-f', 'vmdk', '-o', 'subformat=' + sub, 'img.vmdk', str(size), cwd=t.path('q'))
    rv = t.vdk('create', '-f', 'vmdk', '-o', 'subformat=' + sub, 'img.vmdk', str(size))
    expect_rc(rv, 0, 'vdk create')
    expect_eq(rv.out, rq.out, "vdk create's Formatting line vs qemu-img's", rv)
    qemu_clean(t, 'img.vmdk')
    qi = drop_actual(parse_json(t.qemu_img('info', '--output=json', 'q/img.vmdk'), 'qemu-img info'))
    vi = drop_actual(parse_json(t.qemu_img('info', '--output=json', 'img.vmdk'), 'qemu-img info'))
    for i in (qi, vi):
        i['format-specific']['data'].pop('cid')
        i.pop('filename')
        for e in i['format-specific']['data']['extents']:
            e['filename'] = os.path.basename(e['filename'])
    expect_eq(vi, qi, 'qemu-img info of the vdk-created image vs the qemu-created one (cid aside)')
    res = t.vdk_io_raw('img.vmdk', writes(size), fmt='vmdk', engine=False)
    expect(res.rc == 0 and 'failed' not in res.out + res.err, 'vdk io writes', res)
    mirror(t, 'mirror.raw', writes(size), size)
    qemu_clean(t, 'img.vmdk')
    qemu_identical(t, 'img.vmdk', 'mirror.raw')
    res = t.vdk('check', 'img.vmdk')
    expect_rc(res, 0, 'vdk check after writes')


def random_cmds(seed, size, n=150):
    rnd = random.Random(seed)
    cmds = []
    for _ in range(n):
        ln = rnd.choice([512, 4096, 65536, 131072, rnd.randint(1, 200000)])
        off = rnd.randrange(0, size - ln)
        if rnd.random() < 0.5:
            off -= off % 512
        if rnd.random() < 0.15:
            cmds.append('write -z %d %d' % (off, ln))
        else:
            cmds.append('write -P 0x%02x %d %d' % (rnd.randint(1, 255), off, ln))
    return cmds


def t_model(t, sub):
    size = 64 * MiB
    res = t.vdk('create', '-f', 'vmdk', '-o', 'subformat=' + sub, 'img.vmdk', str(size))
    expect_rc(res, 0, 'vdk create')
    cmds = random_cmds(zlib.crc32(('%s/%s/%s' % (t.engine, t.cache, sub)).encode()), size)
    for i in range(0, len(cmds), 50):
        t.vdk_io('img.vmdk', *cmds[i:i + 50], fmt='vmdk')
    mirror(t, 'mirror.raw', cmds, size)
    qemu_clean(t, 'img.vmdk')
    qemu_identical(t, 'img.vmdk', 'mirror.raw')
    # and vdk reads it back through the same engine
    res = t.vdk('convert', *t.eio(), '-f', 'vmdk', '-O', 'raw', 'img.vmdk', 'back.raw')
    expect_rc(res, 0, 'vdk convert back')
    same_files(t, 'back.raw', 'mirror.raw', 'vdk reads back what it wrote')


def t_stream_write(t):
    cmds = random_cmds(7, 96 * MiB, 80)
    mirror(t, 'src.raw', cmds, 96 * MiB)
    res = t.vdk('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'src.raw', 'img.vmdk')
    expect_rc(res, 0, 'vdk convert -O vmdk -o subformat=streamOptimized')
    qemu_clean(t, 'img.vmdk')
    qemu_identical(t, 'img.vmdk', 'src.raw')
    with open(t.path('img.vmdk'), 'rb') as f:
        hdr = f.read(512)
        f.seek(-1536, os.SEEK_END)
        tail = f.read(1536)
    magic, version, flags = struct.unpack_from('<III', hdr)
    gd_offset = struct.unpack_from('<Q', hdr, 56)[0]
    expect_eq((magic, version, flags & 0x30001), (0x564d444b, 3, 0x30001), 'header magic, version 3, flags')
    expect_eq(gd_offset, 0xffffffffffffffff, 'header gdOffset (GD_AT_END)')
    expect_eq(struct.unpack_from('<QII', tail, 0), (1, 0, 3), 'footer marker')
    expect_eq(tail[512:516], b'KDMV', 'footer magic')
    expect(struct.unpack_from('<Q', tail, 512 + 56)[0] not in (0, 0xffffffffffffffff), 'footer gdOffset')
    expect_eq(tail[1024:], bytes(512), 'end-of-stream marker')
    res = t.vdk('convert', '-O', 'raw', 'img.vmdk', 'back.raw')
    expect_rc(res, 0, 'vdk reads its own stream')
    expect(t.content('back.raw') == t.content('src.raw'), 'stream round trip')
    res = t.vdk('info', '--output=json', 'img.vmdk')
    info = parse_json(res, 'vdk info')
    expect_eq(info['format-specific']['data']['create-type'], 'streamOptimized', 'create type')
    expect(info['format-specific']['data']['extents'][0].get('compressed') is True, 'compressed extent', res)


def t_stream_from_vmdk(t):
    """convert from a sparse vmdk to a stream and back through qemu."""
    qemu_image(t, 'monolithicSparse')
    res = t.vdk('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'img.vmdk', 's.vmdk')
    expect_rc(res, 0, 'vdk convert sparse -> stream')
    qemu_clean(t, 's.vmdk')
    res = t.qemu_img('compare', 'img.vmdk', 's.vmdk')
    expect(res.rc == 0 and 'Images are identical.' in res.out, 'qemu-img compare sparse vs stream', res)


def t_delta(t):
    res = t.vdk('create', '-f', 'vmdk', 'base.vmdk', '64M')
    expect_rc(res, 0, 'create base')
    t.vdk_io('base.vmdk', 'write -P 0x55 0 1M', 'write -P 0x56 10M 64k', fmt='vmdk')
    res = t.vdk('create', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', 'child.vmdk')
    expect_rc(res, 0, 'vdk create -b')
    rq = t.qemu_img('create', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', 'qchild.vmdk')
    expect_rc(rq, 0, 'qemu-img create -b')
    expect_eq(res.out.replace('child.vmdk', 'X'), rq.out.replace('qchild.vmdk', 'X'), 'Formatting line', res)
    t.vdk_io('child.vmdk', 'write -P 0x66 512k 4k', 'write -P 0x67 10M 100', fmt='vmdk')
    res = t.qemu_io_raw('child.vmdk', ['read -P 0x55 0 512k', 'read -P 0x66 512k 4k', 'read -P 0x55 516k 508k',
                                       'read -P 0x67 10M 100', 'read -P 0x56 10485860 65436'], fmt='vmdk')
    expect(res.rc == 0 and 'failed' not in res.out + res.err and 'Pattern verification' not in res.out,
           'qemu-io reads the vdk child', res)
    qemu_clean(t, 'child.vmdk')
    qi = parse_json(t.qemu_img('info', '--output=json', 'child.vmdk'), 'qemu-img info')
    expect_eq(qi.get('backing-filename'), 'base.vmdk', 'backing file name')
    base_cid = parse_json(t.qemu_img('info', '--output=json', 'base.vmdk'), 'info')['format-specific']['data']['cid']
    expect_eq(qi['format-specific']['data']['parent-cid'], base_cid, 'parentCID is the parent CID')
    t.qemu_io('qchild.vmdk', 'write -P 0x77 0 4k', fmt='vmdk')
    res = t.vdk_io_raw('qchild.vmdk', ['read -P 0x77 0 4k', 'read -P 0x55 4k 1020k', 'read -P 0x56 10M 64k'],
                       fmt='vmdk')
    expect(res.rc == 0 and 'failed' not in res.out + res.err, 'vdk reads the qemu child', res)
    vi = drop_actual(parse_json(t.vdk('info', '--output=json', 'qchild.vmdk'), 'vdk info'))
    qi = drop_actual(parse_json(t.qemu_img('info', '--output=json', 'qchild.vmdk'), 'qemu-img info'))
    expect_eq(vi, qi, 'info of a delta disk')
    res = t.vdk('map', '--output=json', 'qchild.vmdk')
    expect_eq(parse_json(res, 'vdk map'), parse_json(t.qemu_img('map', '--output=json', 'qchild.vmdk'), 'map'),
              'map of a delta disk')
    # the parent written after the child was made: its CID changes and the
    # child no longer reads (qemu: EINVAL), with vdk writing or qemu
    for writer in ('vdk', 'qemu'):
        for n in ('p.vmdk', 'c.vmdk'):
            if os.path.exists(t.path(n)):
                os.unlink(t.path(n))
        t.vdk('create', '-f', 'vmdk', 'p.vmdk', '16M')
        t.vdk('create', '-f', 'vmdk', '-b', 'p.vmdk', '-F', 'vmdk', 'c.vmdk')
        t.vdk_io('c.vmdk', 'read 0 4k', fmt='vmdk')
        if writer == 'vdk':
            t.vdk_io('p.vmdk', 'write -P 1 0 4k', fmt='vmdk')
        else:
            t.qemu_io('p.vmdk', 'write -P 1 0 4k', fmt='vmdk')
        rq = t.qemu_io_raw('c.vmdk', ['read 0 4k'], fmt='vmdk')
        expect('read failed' in rq.out + rq.err, 'qemu refuses the stale child (test premise)', rq)
        rv = t.vdk_io_raw('c.vmdk', ['read 0 4k'], fmt='vmdk')
        expect('failed' in rv.out + rv.err and 'was modified since this delta disk was made' in rv.err,
               'vdk refuses a child whose parent changed (%s wrote the parent)' % writer, rv)


def t_resize(t, sub, size, new):
    res = t.vdk('create', '-f', 'vmdk', '-o', 'subformat=' + sub, 'img.vmdk', str(size))
    expect_rc(res, 0, 'create')
    cmds = ['write -P 0x31 0 64k', 'write -P 0x32 %d 4096' % (size - 4096)]
    t.vdk_io('img.vmdk', *cmds, fmt='vmdk')
    res = t.vdk('resize', 'img.vmdk', str(new))
    expect_rc(res, 0, 'vdk resize')
    expect_eq(res.out, 'Image resized.\n', 'resize output', res)
    more = ['write -P 0x33 %d 8192' % (new - 8192)]
    t.vdk_io('img.vmdk', *more, fmt='vmdk')
    qemu_clean(t, 'img.vmdk')
    qi = parse_json(t.qemu_img('info', '--output=json', 'img.vmdk'), 'qemu-img info')
    expect_eq(qi['virtual-size'], new, 'virtual size after resize')
    mirror(t, 'mirror.raw', cmds + more, new)
    qemu_identical(t, 'img.vmdk', 'mirror.raw')


def gd_gt(path):
    with open(path, 'rb') as f:
        hdr = f.read(512)
        gd = struct.unpack_from('<Q', hdr, 56)[0]
        f.seek(gd * 512)
        gt = struct.unpack('<I', f.read(4))[0]
    return gd, gt


def t_check_past_eof(t):
    res = t.vdk('create', '-f', 'vmdk', 'img.vmdk', '64M')
    t.vdk_io('img.vmdk', 'write -P 1 0 128k', fmt='vmdk')
    _, gt = gd_gt(t.path('img.vmdk'))
    with open(t.path('img.vmdk'), 'r+b') as f:
        f.seek(gt * 512 + 4)  # second grain -> far past the end
        f.write(struct.pack('<I', 0x100000))
    rq = t.qemu_img('check', 'img.vmdk')
    rv = t.vdk('check', 'img.vmdk')
    # qemu-img stops at the first bad entry and exits 1 ("Check failed");
    # vdk reports every problem and exits 2 (corruptions found)
    expect_eq(rq.rc, 1, 'qemu-img check exit code (test premise)', rq)
    expect(rv.rc == 2, 'exit code 2 on corruption', rv)
    first = [l for l in (rq.out + rq.err).splitlines() if l.startswith('ERROR')]
    mine = [l for l in (rv.out + rv.err).splitlines() if l.startswith('ERROR')]
    expect(first and mine and mine[0] == first[0], 'first error line as qemu-img: %r vs %r' % (mine, first), rv)
    # reading the damaged grain fails, the rest reads
    res = t.vdk_io_raw('img.vmdk', ['read 64k 64k'], fmt='vmdk', extra=['-r'])
    expect('failed' in res.out + res.err or res.rc != 0, 'read through a bad entry fails', res)
    res = t.vdk_io_raw('img.vmdk', ['read -P 1 0 64k'], fmt='vmdk', extra=['-r'])
    expect(res.rc == 0 and 'failed' not in res.out + res.err, 'other grains read', res)
    # a failed convert to a multi-file vmdk leaves no file behind
    res = t.vdk('convert', '-O', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', 'img.vmdk', 'y.vmdk')
    expect_rc(res, 1, 'convert from a damaged image')
    expect(not any(n.startswith('y') for n in os.listdir(t.dir)), 'no target files left behind: %s' % os.listdir(t.dir))


def t_check_leak(t):
    t.vdk('create', '-f', 'vmdk', 'img.vmdk', '64M')
    t.vdk_io('img.vmdk', 'write -P 1 0 64k', fmt='vmdk')
    # a grain appended but never referenced (as after a crash mid-write)
    with open(t.path('img.vmdk'), 'ab') as f:
        f.write(b'\x42' * 65536)
    res = t.vdk('check', 'img.vmdk')
    expect_rc(res, 3, 'vdk check: leaked grain')
    expect('Leaked grain' in res.out + res.err, 'leak reported', res)
    res = t.vdk('check', '--output=json', 'img.vmdk')
    expect_eq(parse_json(res, 'check json').get('leaks'), 1, 'leaks in JSON')


def t_check_overlap(t):
    t.vdk('create', '-f', 'vmdk', 'img.vmdk', '64M')
    t.vdk_io('img.vmdk', 'write -P 1 0 64k', fmt='vmdk')
    gd, gt = gd_gt(t.path('img.vmdk'))
    with open(t.path('img.vmdk'), 'r+b') as f:
        f.seek(gt * 512 + 8)
        f.write(struct.pack('<I', gd))  # a grain on top of the grain directory
    res = t.vdk('check', 'img.vmdk')
    expect_rc(res, 2, 'vdk check: grain inside metadata')
    expect('points into the metadata' in res.out + res.err, 'overlap reported', res)


def t_check_redundant(t):
    t.vdk('create', '-f', 'vmdk', 'img.vmdk', '64M')
    t.vdk_io('img.vmdk', 'write -P 1 0 64k', fmt='vmdk')
    res = t.vdk('check', 'img.vmdk')
    expect_rc(res, 0, 'vdk check of a clean image')
    with open(t.path('img.vmdk'), 'r+b') as f:
        hdr = f.read(512)
        rgd = struct.unpack_from('<Q', hdr, 48)[0]
        f.seek(rgd * 512)
        rgt = struct.unpack('<I', f.read(4))[0]
        f.seek(rgt * 512 + 40)
        f.write(struct.pack('<I', 12345))
    res = t.vdk('check', 'img.vmdk')
    expect_rc(res, 2, 'vdk check: redundant table differs')
    expect('differs from its redundant copy' in res.err + res.out, 'mismatch reported', res)


def t_descriptor_stable(t):
    """vdk's first write changes the CID line and nothing else of a
    descriptor, custom keys, comments, spacing and CRLF included."""
    res = t.qemu_img('create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', 'img.vmdk', '16M')
    expect_rc(res, 0, 'qemu-img create (test premise)')
    text = t.content('img.vmdk').rstrip(b'\0').decode()
    text = text.replace('\n', '\r\n') + '# a comment\r\nddb.custom.key   =   "kept as is"\r\nsomething = else\r\n'
    t.write_bytes('img.vmdk', text.encode())
    t.vdk_io('img.vmdk', 'write -P 7 0 4k', fmt='vmdk')
    after = t.content('img.vmdk').decode()
    a, b = text.split('\r\n'), after.split('\r\n')
    expect_eq(len(b), len(a), 'descriptor line count')
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    expect(len(diff) == 1 and diff[0][0].startswith('CID=') and diff[0][1].startswith('CID='),
           'only the CID line changed: %r' % diff)
    qemu_clean(t, 'img.vmdk')
    t.qemu_io('img.vmdk', 'read -P 7 0 4k', fmt='vmdk')


def write_desc(t, name, text):
    with open(t.path(name), 'w') as f:
        f.write(text)


DESC = ('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        '%s\nddb.adapterType = "ide"\n')


def t_hostile(t):
    t.sparse('f.raw', MiB)
    cases = [
        ('RW 2048 FLAT "f.raw" zero', "invalid extent offset"),
        ('RW 2048 FLAT f.raw 0', 'must be quoted'),
        ('RW 2048 BOGUS "f.raw"', "unknown extent type 'BOGUS'"),
        ('RW 99999999999999999999 FLAT "f.raw" 0', 'invalid extent size'),
        ('RW 2048 FLAT "missing.raw" 0', 'missing.raw'),
        ('RW 2048 FLAT "../f.raw" 0', 'allow-extent-paths'),
        ('RW 2048 FLAT "%s" 0' % t.path('f.raw'), 'allow-extent-paths'),
        ('hello world', 'cannot parse'),
    ]
    for line, want in cases:
        write_desc(t, 'd.vmdk', DESC % line)
        res = t.vdk('info', 'd.vmdk')
        expect_rc(res, 1, 'vdk info on a descriptor with %r' % line)
        expect_one_error_line(res)
        expect(want in res.err, 'error names %r' % want, res)
    # a FIFO named as an extent must not hang the open
    os.mkfifo(t.path('pipe'))
    write_desc(t, 'd.vmdk', DESC % 'RW 2048 FLAT "pipe" 0')
    res = t.vdk('info', 'd.vmdk', timeout=20)
    expect_rc(res, 1, 'an extent that is a FIFO')
    expect('not a regular file' in res.err, 'FIFO refused', res)
    # nor a FIFO named as the parent
    write_desc(t, 'd.vmdk', (DESC % 'RW 2048 FLAT "f.raw" 0').replace('createType', 'parentFileNameHint="pipe"\ncreateType'))
    res = t.vdk('info', 'd.vmdk', timeout=20)
    expect_rc(res, 1, 'a parent that is a FIFO')
    expect('not a regular file' in res.err, 'FIFO parent refused', res)
    # allowed explicitly
    write_desc(t, 'd.vmdk', DESC % ('RW 2048 FLAT "%s" 0' % t.path('f.raw')))
    res = t.vdk('info', '--image-opts', 'driver=vmdk,file.filename=d.vmdk,allow-extent-paths=on')
    expect_rc(res, 0, 'allow-extent-paths=on')
    # damaged sparse headers
    t.vdk('create', '-f', 'vmdk', 'img.vmdk', '64M')
    good = t.content('img.vmdk')
    for off, fmt, val, want in [(4, '<I', 9, 'version'), (20, '<Q', 3, 'grainSize'), (44, '<I', 0, 'numGTEsPerGT'),
                                (56, '<Q', 1 << 40, 'gdOffset'), (12, '<Q', 1 << 62, 'capacity'),
                                (28, '<Q', 1 << 40, 'descriptor')]:
        data = bytearray(good)
        struct.pack_into(fmt, data, off, val)
        t.write_bytes('bad.vmdk', bytes(data))
        res = t.vdk('info', 'bad.vmdk')
        expect_rc(res, 1, 'vdk info with a damaged %s' % want)
        expect_one_error_line(res)
        expect(want in res.err, 'error names %s' % want, res)
    # truncated image
    t.write_bytes('short.vmdk', good[:700])
    res = t.vdk('info', 'short.vmdk')
    expect_rc(res, 1, 'truncated sparse file')
    expect_one_error_line(res)


def t_create_help(t):
    res = t.vdk('create', '-f', 'vmdk', '-o', 'help')
    expect_rc(res, 0, 'create -o help')
    for o in ('adapter_type', 'backing_file', 'compat6', 'hwversion', 'subformat', 'toolsversion', 'zeroed_grain'):
        expect(o in res.out, '-o help lists %s' % o, res)
    for a in ('lsilogic', 'buslogic', 'legacyESX'):
        res = t.vdk('create', '-f', 'vmdk', '-o', 'adapter_type=%s,hwversion=7,toolsversion=1234' % a,
                    '%s.vmdk' % a, '100M')
        expect_rc(res, 0, 'create adapter_type=%s' % a)
        text = t.content('%s.vmdk' % a)
        expect(('ddb.adapterType = "%s"' % a).encode() in text and b'ddb.virtualHWVersion = "7"' in text and
               b'ddb.toolsVersion = "1234"' in text, 'descriptor fields for %s' % a)
        qemu_clean(t, '%s.vmdk' % a)
    res = t.vdk('create', '-f', 'vmdk', '-o', 'adapter_type=scsi', 'x.vmdk', '1M')
    expect_rc(res, 1, 'unknown adapter type')
    expect(not os.path.exists(t.path('x.vmdk')), 'a failed create leaves nothing')
    res = t.vdk('create', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentFlat,zeroed_grain=on', 'y.vmdk', '1M')
    expect_rc(res, 1, 'zeroed_grain on a flat image')
    expect(not any(n.startswith('y') for n in os.listdir(t.dir)), 'no extent files left behind')


def t_zeroed_grain(t):
    res = t.vdk('create', '-f', 'vmdk', '-o', 'zeroed_grain=on', 'img.vmdk', '64M')
    expect_rc(res, 0, 'create zeroed_grain=on')
    t.qemu_io('img.vmdk', 'write -P 9 0 1M', 'write -z 0 512k', fmt='vmdk')
    res = t.vdk_io_raw('img.vmdk', ['read -P 0 0 512k', 'read -P 9 512k 512k'], fmt='vmdk')
    expect(res.rc == 0 and 'failed' not in res.out + res.err, 'zeroed grains read as zero', res)
    qm = parse_json(t.qemu_img('map', '--output=json', 'img.vmdk'), 'qemu-img map')
    vm = parse_json(t.vdk('map', '--output=json', 'img.vmdk'), 'vdk map')
    expect_eq(vm, qm, 'map with zeroed grains')
    t.vdk_io('img.vmdk', 'write -P 8 4k 4k', fmt='vmdk')
    mirror(t, 'm.raw', ['write -P 9 512k 512k', 'write -P 8 4k 4k'], 64 * MiB)
    qemu_clean(t, 'img.vmdk')
    qemu_identical(t, 'img.vmdk', 'm.raw')


def t_fuzz(t):
    """Mutated metadata (header, descriptor, directories, tables) through
    info, check, map and convert: errors are fine, crashes and hangs are not."""
    t.vdk('create', '-f', 'vmdk', '-o', 'zeroed_grain=on', 'base.vmdk', '32M')
    t.vdk_io('base.vmdk', 'write -P 1 0 200k', 'write -z 1M 128k', 'write -P 2 20M 64k', fmt='vmdk')
    base = t.content('base.vmdk')
    hdr = base[:512]
    gd = struct.unpack_from('<Q', hdr, 56)[0] * 512
    rgd = struct.unpack_from('<Q', hdr, 48)[0] * 512
    gt = struct.unpack_from('<I', base, gd)[0] * 512
    regions = [(0, 80), (512, 600), (gd, 64), (rgd, 64), (gt, 2048)]
    rnd = random.Random(1234)
    for i in range(150):
        data = bytearray(base)
        off, ln = rnd.choice(regions)
        for _ in range(rnd.randint(1, 6)):
            p = off + rnd.randrange(ln)
            data[p] = rnd.randrange(256)
        t.write_bytes('f.vmdk', bytes(data))
        for args in (['info', '--output=json', 'f.vmdk'], ['check', 'f.vmdk'], ['map', '--output=json', 'f.vmdk'],
                     ['convert', '-O', 'raw', 'f.vmdk', 'f.raw']):
            res = t.vdk(*args, timeout=60)
            expect(res.rc in (0, 1, 2, 3, 63), 'round %d: vdk %s exited with %d' % (i, args[0], res.rc), res)
        if os.path.exists(t.path('f.raw')):
            os.unlink(t.path('f.raw'))


for s in SUBFORMATS:
    suite.add('qemu-read/' + s, t_qemu_read, s)
    suite.add('vdk-write/' + s, t_vdk_write, s)
for s in ['monolithicSparse', 'twoGbMaxExtentSparse', 'monolithicFlat']:
    suite.add_io('model/' + s, t_model, s)
suite.add('stream-write', t_stream_write)
suite.add('stream-from-vmdk', t_stream_from_vmdk)
suite.add('delta', t_delta)
suite.add('resize/monolithicSparse', t_resize, 'monolithicSparse', 64 * MiB, 1 * GiB)
suite.add('resize/monolithicSparse-directory-moves', t_resize, 'monolithicSparse', 64 * MiB, 10 * GiB)
suite.add('resize/twoGbMaxExtentSparse', t_resize, 'twoGbMaxExtentSparse', 64 * MiB, 512 * MiB)
suite.add('resize/monolithicFlat', t_resize, 'monolithicFlat', 64 * MiB, 200 * MiB)
suite.add('resize/twoGbMaxExtentFlat', t_resize, 'twoGbMaxExtentFlat', 64 * MiB, 100 * MiB)
suite.add('check/past-eof', t_check_past_eof)
suite.add('check/leak', t_check_leak)
suite.add('check/overlap', t_check_overlap)
suite.add('check/redundant-table', t_check_redundant)
suite.add('hostile', t_hostile)
suite.add('create-options', t_create_help)
suite.add('zeroed-grain', t_zeroed_grain)
suite.add('fuzz', t_fuzz)
suite.add('descriptor-byte-stable', t_descriptor_stable)

if __name__ == '__main__':
    main(suite)
