#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdi: vdk against qemu-img / qemu-io.

qemu -> vdk: images qemu-img creates (dynamic, static) and qemu-io writes
(patterns, zero writes, unaligned requests) read back byte-identically
through vdk (convert -O raw, and io reads with patterns per I/O engine);
map agrees with qemu-img map.  vdk -> qemu: images vdk creates and writes
pass qemu-img check and compare equal to a raw mirror written by qemu-io.
info JSON, check output on injected corruptions (and vdk's repair), grow
(in place and with the block map moved), convert both ways, hostile
headers (one corruption per validated field) and differencing images
opened with a named parent."""

import json
import os
import random
import struct

from vdktest import MiB, KiB, VDK, Suite, expect, expect_eq, expect_rc, main

suite = Suite('vdi')

# header offsets (VirtualBox VDICore.h / QEMU block/vdi.c)
OFF = {
    'signature': 0x40, 'version': 0x44, 'header_size': 0x48, 'image_type': 0x4c,
    'offset_bmap': 0x154, 'offset_data': 0x158, 'sector_size': 0x168, 'disk_size': 0x170,
    'block_size': 0x178, 'block_extra': 0x17c, 'blocks': 0x180, 'allocated': 0x184,
    'uuid_image': 0x188, 'uuid_modify': 0x198, 'uuid_link': 0x1a8, 'uuid_parent': 0x1b8,
}


def hdr_get(path, field, fmt='<I'):
    with open(path, 'rb') as f:
        f.seek(OFF[field])
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def hdr_put(path, field, value, fmt='<I'):
    with open(path, 'r+b') as f:
        f.seek(OFF[field])
        f.write(struct.pack(fmt, value))


def bmap_put(path, block, value):
    off = hdr_get(path, 'offset_bmap')
    with open(path, 'r+b') as f:
        f.seek(off + 4 * block)
        f.write(struct.pack('<I', value))


def bmap_get(path, block):
    off = hdr_get(path, 'offset_bmap')
    with open(path, 'rb') as f:
        f.seek(off + 4 * block)
        return struct.unpack('<I', f.read(4))[0]


def jparse(res, what):
    try:
        return json.loads(res.out)
    except ValueError as e:
        raise AssertionError('%s: not JSON: %s' % (what, e))


def qemu_check_clean(t, img):
    res = t.qemu_img('check', '-f', 'vdi', img)
    expect(res.rc == 0 and 'No errors were found on the image.' in res.out, 'qemu-img check %s' % img, res)


def compare_raw(t, img, raw):
    res = t.qemu_img('compare', '-f', 'vdi', '-F', 'raw', img, raw)
    expect(res.rc == 0 and 'Images are identical.' in res.out, 'qemu-img compare %s %s' % (img, raw), res)


def write_cmds(seed, size, n=40):
    """A mix of pattern writes, zero writes and unaligned requests."""
    rnd = random.Random(seed)
    cmds = []
    for i in range(n):
        kind = rnd.random()
        if kind < 0.15:
            off = rnd.randrange(0, size // MiB) * MiB
            ln = min(size - off, rnd.choice([MiB, 2 * MiB]))
            cmds.append('write -z %d %d' % (off, ln))
        elif kind < 0.3:
            off = rnd.randrange(0, size - 4096)
            ln = rnd.randrange(1, min(size - off, 200 * KiB))
            cmds.append('write -P 0x%02x %d %d' % (rnd.randrange(1, 256), off, ln))
        else:
            off = rnd.randrange(0, size // 512 - 8) * 512
            ln = min(size - off, rnd.choice([512, 4 * KiB, 64 * KiB, 1536 * KiB]))
            cmds.append('write -P 0x%02x %d %d' % (rnd.randrange(1, 256), off, ln))
    return cmds


def qemu_image(t, name, size, static=False, seed=1, n=40):
    """A vdi written by qemu-io and its raw mirror (qemu-img convert)."""
    opts = ['-o', 'static=on'] if static else []
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', *opts, name, str(size)), 0, 'qemu-img create')
    cmds = write_cmds(seed, size, n)
    t.qemu_io(name, *cmds, fmt='vdi')
    raw = name + '.qraw'
    expect_rc(t.qemu_img('convert', '-f', 'vdi', '-O', 'raw', name, raw), 0, 'qemu-img convert')
    return raw


# ---------------------------------------------------------------- discard

DISCARD_BLOCKS = 16


def discard_setup(t, d, blocks=DISCARD_BLOCKS):
    """A dynamic vdi with every block written (a pattern per block) and its
    raw mirror."""
    os.makedirs(t.path(d), exist_ok=True)
    size = blocks * MiB
    img, raw = d + '/v.vdi', d + '/m.raw'
    expect_rc(t.vdk('create', '-q', '-f', 'vdi', img, str(size)), 0, 'vdk create')
    t.sparse(raw, size)
    cmds = ['write -P 0x%02x %d %d' % (i + 1, i * MiB, MiB) for i in range(blocks)]
    t.qemu_io(img, *cmds, fmt='vdi')
    t.qemu_io(raw, *cmds)
    return img, raw


def t_discard_unmap(t):
    """Whole discarded blocks read as zeroes at once and are unmapped when
    the image closes: blocks_allocated drops, the last blocks move into the
    holes and the file shrinks; qemu-img agrees on content, map and check."""
    img, raw = discard_setup(t, 'd')
    t.vdk_io(img, 'discard %d %d' % (2 * MiB, MiB), 'discard %d %d' % (5 * MiB, 2 * MiB),
             'discard %d %d' % (15 * MiB, MiB), 'discard %d %d' % (8 * MiB + 4096, 100 * KiB),
             'read -P 0 %d %d' % (5 * MiB, 2 * MiB), 'write -P 0x99 %d 4096' % (6 * MiB + 4096),
             'read -P 0 %d 4096' % (6 * MiB), 'read -P 0x09 %d 4096' % (8 * MiB), fmt='vdi')
    t.qemu_io(raw, 'write -z %d %d' % (2 * MiB, MiB), 'write -z %d %d' % (5 * MiB, 2 * MiB),
              'write -z %d %d' % (15 * MiB, MiB), 'write -P 0x99 %d 4096' % (6 * MiB + 4096))
    qemu_check_clean(t, img)
    compare_raw(t, img, raw)
    path = t.path(img)
    expect_eq(hdr_get(path, 'allocated'), DISCARD_BLOCKS - 3, 'blocks_allocated after the discards')
    entries = [bmap_get(path, b) for b in range(DISCARD_BLOCKS)]
    for b in (2, 5, 15):
        expect_eq(entries[b], 0xffffffff, 'block map entry %d' % b)
    used = sorted(e for e in entries if e != 0xffffffff)
    expect_eq(used, list(range(DISCARD_BLOCKS - 3)), 'the remaining blocks use indices 0..%d' % (DISCARD_BLOCKS - 4))
    expect_eq(t.size(img), hdr_get(path, 'offset_data') + (DISCARD_BLOCKS - 3) * MiB, 'file length')
    m = jparse(t.qemu_img('map', '--output=json', '-f', 'vdi', img), 'qemu-img map')
    data_blocks = set()
    for e in m:
        if e['data']:
            data_blocks.update(range(e['start'] // MiB, (e['start'] + e['length']) // MiB))
    expect_eq(sorted(set(range(DISCARD_BLOCKS)) - data_blocks), [2, 5, 15], 'blocks qemu-img map shows unallocated')
    vm = jparse(t.vdk('map', '--output=json', '-f', 'vdi', img), 'vdk map')
    vdata = set()
    for e in vm:
        if e['data']:
            vdata.update(range(e['start'] // MiB, (e['start'] + e['length']) // MiB))
    expect_eq(vdata, data_blocks, 'vdk map and qemu-img map agree on data blocks')
    expect_rc(t.vdk('check', '-f', 'vdi', img), 0, 'vdk check')


def t_discard_crash(t):
    """A vdk io killed at each write of a discard session (the close-time
    unmap and compaction included) leaves the content right (discarded
    blocks zero, the rest intact) and at worst blocks counted but not
    referenced, which vdk check -r all repairs to qemu-img's satisfaction."""
    import shutil
    strace = shutil.which('strace')
    expect(strace is not None, 'strace is installed')
    blocks = 10
    cmds = ['-c', 'discard %d %d' % (MiB, MiB), '-c', 'discard %d %d' % (3 * MiB, 2 * MiB),
            '-c', 'discard %d %d' % (7 * MiB, MiB)]
    trace = [strace, '-f', '-qq', '-e', 'trace=pwrite64,pwritev,pwritev2']
    img, raw = discard_setup(t, 'ref', blocks)
    t.qemu_io(raw, 'write -z %d %d' % (MiB, MiB), 'write -z %d %d' % (3 * MiB, 2 * MiB),
              'write -z %d %d' % (7 * MiB, MiB))
    want = open(t.path(raw), 'rb').read()
    t.run(trace[:2] + ['-c', '-o', t.path('count.txt')] + trace[2:] +
          [VDK, 'io', '--aio=threads', '-f', 'vdi'] + cmds + [img])
    writes = 0
    with open(t.path('count.txt')) as f:
        for line in f:
            p = line.split()
            if p and p[-1] in ('pwrite64', 'pwritev', 'pwritev2') and p[3].isdigit():
                writes += int(p[3])
    expect(writes >= 6, 'the discard session writes metadata and moves blocks (%d writes)' % writes)
    compare_raw(t, img, raw)
    for n in range(1, writes + 1):
        shutil.rmtree(t.path('c'), ignore_errors=True)
        img, _ = discard_setup(t, 'c', blocks)
        t.run(trace[:2] + ['-o', '/dev/null'] + trace[2:] +
              ['-e', 'inject=pwrite64,pwritev,pwritev2:signal=KILL:when=%d' % n,
               VDK, 'io', '--aio=threads', '-f', 'vdi'] + cmds + [img], timeout=60)
        what = 'killed at write %d of %d' % (n, writes)
        chk = t.qemu_img('check', '-f', 'vdi', img)
        bad = [l for l in (chk.out + chk.err).splitlines() if l.startswith('ERROR')]
        expect(all(l.startswith('ERROR: allocated blocks mismatch') for l in bad),
               '%s: qemu-img check finds at most unreferenced blocks' % what, chk)
        expect_rc(t.qemu_img('convert', '-f', 'vdi', '-O', 'raw', img, 'c/out.raw'), 0, what + ': convert')
        got = open(t.path('c/out.raw'), 'rb').read()
        for b in range(blocks):
            blk = got[b * MiB:(b + 1) * MiB]
            # a discard not yet reached keeps the data; one reached reads zeroes
            ok = blk == want[b * MiB:(b + 1) * MiB] or (b in (1, 3, 4, 7) and blk == bytes([b + 1]) * MiB)
            expect(ok, '%s: block %d holds its data or (discarded) zeroes' % (what, b))
        expect_rc(t.vdk('check', '-r', 'all', '-f', 'vdi', img), 0, what + ': vdk check -r all')
        qemu_check_clean(t, img)
        expect_rc(t.qemu_img('convert', '-f', 'vdi', '-O', 'raw', img, 'c/out2.raw'), 0, what + ': convert again')
        expect(open(t.path('c/out2.raw'), 'rb').read() == got, what + ': the repair keeps the content')


# ---------------------------------------------------------------- qemu -> vdk

def t_read(t, static):
    raw = qemu_image(t, 'q.vdi', 24 * MiB, static=static, seed=7 + static)
    res = t.vdk('convert', '-f', 'vdi', '-O', 'raw', 'q.vdi', 'v.raw')
    expect_rc(res, 0, 'vdk convert -O raw')
    expect(t.content('v.raw') == t.content(raw), 'vdk reads what qemu wrote')
    mq = jparse(t.qemu_img('map', '--output=json', '-f', 'vdi', 'q.vdi'), 'qemu-img map')
    mv = jparse(t.vdk('map', '--output=json', '-f', 'vdi', 'q.vdi'), 'vdk map')
    expect_eq(mv, mq, 'vdk map vs qemu-img map')
    res = t.vdk('map', '-f', 'vdi', 'q.vdi')
    expect_eq(res.out, t.qemu_img('map', '-f', 'vdi', 'q.vdi').out, 'vdk map (human) vs qemu-img map')


def t_read_engine(t):
    """qemu-io writes patterns; vdk io reads them back with -P per engine."""
    size = 8 * MiB
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'q.vdi', str(size)), 0, 'qemu-img create')
    writes = [(0x11, 0, 4096), (0x22, MiB - 512, 1024), (0x33, 3 * MiB + 7 * 512, 1536 * KiB),
              (0x44, 7 * MiB, MiB)]
    t.qemu_io('q.vdi', *['write -P 0x%x %d %d' % w for w in writes], fmt='vdi')
    t.qemu_io('q.vdi', 'write -z %d %d' % (7 * MiB + 4096, 8192), fmt='vdi')
    cmds = ['read -P 0x%x %d %d' % w for w in writes[:3]]
    cmds += ['read -P 0x44 %d 4096' % (7 * MiB), 'read -P 0 %d 8192' % (7 * MiB + 4096),
             'read -P 0 %d %d' % (5 * MiB, MiB), 'read -P 0 4096 %d' % (MiB - 512 - 4096)]
    t.vdk_io('q.vdi', *cmds, fmt='vdi')


# ---------------------------------------------------------------- vdk -> qemu

def t_formatting(t):
    for opts in ([], ['-o', 'static=on'], ['-o', 'static=off']):
        for d in ('q', 'v'):
            os.makedirs(t.path(d), exist_ok=True)
            p = t.path(d + '/i.vdi')
            if os.path.exists(p):
                os.unlink(p)
        rq = t.qemu_img('create', '-f', 'vdi', *opts, 'i.vdi', '5M', cwd=t.path('q'))
        rv = t.vdk('create', '-f', 'vdi', *opts, 'i.vdi', '5M', cwd=t.path('v'))
        expect_rc(rv, 0, 'vdk create')
        expect_eq(rv.out, rq.out, 'Formatting line', rv)
        qemu_check_clean(t, 'v/i.vdi')
        iq = jparse(t.qemu_img('info', '--output=json', 'q/i.vdi'), 'info')
        iv = jparse(t.qemu_img('info', '--output=json', 'v/i.vdi'), 'info')
        for i in (iq, iv):
            i.pop('actual-size', None)
            i.pop('filename', None)
        expect_eq(iv, iq, 'qemu-img info of the vdk-created image vs the qemu-created one')


def t_write(t, opts, size=20 * MiB):
    create = ['-o', opts] if opts else []
    expect_rc(t.vdk('create', '-f', 'vdi', *create, 'v.vdi', str(size)), 0, 'vdk create')
    t.sparse('m.raw', size)
    cmds = write_cmds(hash(opts) & 0xffff, size, 30)
    cmds += ['write -P 0x5a %d %d' % (3 * MiB + 100, 3000), 'write -z -u %d %d' % (8 * MiB, 2 * MiB),
             'write -P 0x5b %d 1000' % (size - 1000), 'discard %d %d' % (MiB, 2 * MiB)]
    t.vdk_io('v.vdi', *cmds[:-1], fmt='vdi')
    t.qemu_io('m.raw', *cmds[:-1])
    qemu_check_clean(t, 'v.vdi')
    compare_raw(t, 'v.vdi', 'm.raw')
    # discard of whole blocks: they read as zeroes afterwards
    t.vdk_io('v.vdi', cmds[-1], fmt='vdi')
    t.qemu_io('m.raw', 'write -z %d %d' % (MiB, 2 * MiB))
    qemu_check_clean(t, 'v.vdi')
    compare_raw(t, 'v.vdi', 'm.raw')
    res = t.vdk('check', '-f', 'vdi', 'v.vdi')
    expect_rc(res, 0, 'vdk check')
    # and vdk reads it back identically too
    expect_rc(t.vdk('compare', '-f', 'vdi', '-F', 'raw', 'v.vdi', 'm.raw'), 0, 'vdk compare')


def t_sparse_alloc(t):
    """A small write into a new block writes only that range: the rest of
    the block is a hole (fallocate), the file holds exactly the block."""
    expect_rc(t.vdk('create', '-f', 'vdi', 'v.vdi', '64M'), 0, 'vdk create')
    before = t.size('v.vdi')
    t.vdk_io('v.vdi', 'write -P 0x77 %d 4096' % (10 * MiB + 8192), fmt='vdi')
    expect_eq(t.size('v.vdi'), before + MiB, 'file length after one allocation')
    # the rest of the block is a hole or an fallocated zero range
    expect(t.blocks_bytes('v.vdi') <= before + MiB + 64 * KiB, 'one block allocated on the host '
           '(%d bytes)' % t.blocks_bytes('v.vdi'))
    expect_eq(hdr_get(t.path('v.vdi'), 'allocated'), 1, 'blocks_allocated')
    expect_eq(bmap_get(t.path('v.vdi'), 10), 0, 'block map entry of block 10')
    uuid_before = open(t.path('v.vdi'), 'rb').read()[0x198:0x1a8]
    t.vdk_io('v.vdi', 'write -P 0x78 0 512', fmt='vdi')
    uuid_after = open(t.path('v.vdi'), 'rb').read()[0x198:0x1a8]
    expect(uuid_before != uuid_after, 'the modification UUID changes on write')
    qemu_check_clean(t, 'v.vdi')
    res = t.qemu_io_raw('v.vdi', ['read -P 0x77 %d 4096' % (10 * MiB + 8192), 'read -P 0 %d 8192' % (10 * MiB),
                                  'read -P 0x78 0 512'], fmt='vdi')
    expect(res.rc == 0 and 'Pattern verification failed' not in res.out, 'qemu-io reads', res)


def t_write_engine(t):
    size = 12 * MiB
    expect_rc(t.vdk('create', '-f', 'vdi', 'v.vdi', str(size)), 0, 'vdk create')
    t.sparse('m.raw', size)
    cmds = write_cmds(99, size, 25)
    t.vdk_io('v.vdi', *cmds, fmt='vdi')
    t.qemu_io('m.raw', *cmds)
    qemu_check_clean(t, 'v.vdi')
    compare_raw(t, 'v.vdi', 'm.raw')
    # the same image read per engine through vdk
    res = t.vdk_io_raw('v.vdi', ['read -P 0 %d 512' % (size - 512)] if False else ['read 0 %d' % size], fmt='vdi')
    expect_rc(res, 0, 'vdk io read')


def t_convert(t):
    raw = qemu_image(t, 'q.vdi', 16 * MiB, seed=3)
    expect_rc(t.vdk('convert', '-f', 'vdi', '-O', 'qcow2', 'q.vdi', 'x.qcow2'), 0, 'vdi -> qcow2')
    expect_rc(t.vdk('convert', '-f', 'qcow2', '-O', 'vdi', 'x.qcow2', 'y.vdi'), 0, 'qcow2 -> vdi')
    expect_rc(t.vdk('convert', '-f', 'raw', '-O', 'vdi', '-o', 'static=on', raw, 's.vdi'), 0, 'raw -> static vdi')
    for img in ('y.vdi', 's.vdi'):
        qemu_check_clean(t, img)
        compare_raw(t, img, raw)
    # holes stay holes: blocks qemu never wrote are not allocated in y.vdi
    mq = [e for e in jparse(t.qemu_img('map', '--output=json', 'q.vdi'), 'map') if e['data']]
    my = [e for e in jparse(t.qemu_img('map', '--output=json', 'y.vdi'), 'map') if e['data']]
    expect(sum(e['length'] for e in my) <= sum(e['length'] for e in mq), 'convert allocates no more than the source')


def t_info(t):
    qemu_image(t, 'q.vdi', 6 * MiB, seed=5, n=5)
    for args in (['--output=json'], []):
        rq = t.qemu_img('info', *args, 'q.vdi')
        rv = t.vdk('info', *args, 'q.vdi')
        expect_rc(rv, 0, 'vdk info')
        if args:
            a, b = jparse(rv, 'vdk info'), jparse(rq, 'qemu-img info')
            a.pop('actual-size'), b.pop('actual-size')
            expect_eq(a, b, 'info --output=json')
        else:
            strip = lambda s: [l for l in s.splitlines() if not l.startswith('disk size')]
            expect_eq(strip(rv.out), strip(rq.out), 'info (human)')


# ---------------------------------------------------------------- check

# (name, corruption, reads that must pass after the repair)
CORRUPTIONS = [
    ('out-of-range', lambda p: bmap_put(p, 0, 7), ['read -P 3 4M 1M', 'read -P 4 2M 512', 'read -P 0 0 1M']),
    ('duplicate', lambda p: bmap_put(p, 2, bmap_get(p, 1)), ['read -P 3 4M 1M', 'read -P 1 2M 4k', 'read -P 1 1M 4k']),
    ('count-high', lambda p: hdr_put(p, 'allocated', hdr_get(p, 'allocated') + 1),
     ['read -P 3 4M 1M', 'read -P 4 2M 512', 'read -P 2 3M 4k']),
    ('count-low', lambda p: hdr_put(p, 'allocated', hdr_get(p, 'allocated') - 1),
     ['read -P 3 4M 1M', 'read -P 4 2M 512', 'read -P 2 3M 4k']),
    ('all', lambda p: (bmap_put(p, 0, 7), bmap_put(p, 2, bmap_get(p, 1))), ['read -P 3 4M 1M', 'read -P 1 2M 4k']),
    # a hole in the data area (a failed write or a crash): compacted
    ('hole', lambda p: (bmap_put(p, 1, 0xffffffff)), ['read -P 3 4M 1M', 'read -P 4 2M 512', 'read -P 0 1M 1M']),
]


def t_check(t, name, corrupt, reads):
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'q.vdi', '5M'), 0, 'create')
    t.qemu_io('q.vdi', 'write -P 1 1M 4k', 'write -P 2 3M 4k', 'write -P 3 4M 1M', 'write -P 4 2M 512', fmt='vdi')
    corrupt(t.path('q.vdi'))
    for args in ([], ['--output=json']):
        rq = t.qemu_img('check', *args, 'q.vdi')
        rv = t.vdk('check', *args, 'q.vdi')
        expect_eq(rv.rc, rq.rc, 'check exit code', rv)
        expect_eq(rv.out.replace('vdk', 'qemu-img'), rq.out, 'check output', rv)
        expect_eq(rv.err, rq.err, 'check messages', rv)
    # vdk repairs what qemu-img cannot (it answers -r with "not supported")
    before = t.content('q.vdi')
    rv = t.vdk('check', '-r', 'all', 'q.vdi')
    expect_rc(rv, 0, 'vdk check -r all')
    expect('Double checking the fixed image now...' in rv.out, 'repair report', rv)
    qemu_check_clean(t, 'q.vdi')
    expect_rc(t.vdk('check', 'q.vdi'), 0, 'vdk check after repair')
    # blocks no corruption touched keep their data
    res = t.qemu_io_raw('q.vdi', reads, fmt='vdi')
    expect(res.rc == 0 and 'Pattern verification failed' not in res.out, 'data kept by the repair', res)
    if name == 'hole':
        expect_eq(t.size('q.vdi'), hdr_get(t.path('q.vdi'), 'offset_data') + 3 * MiB, 'file compacted')
    expect(before != t.content('q.vdi'), 'repair changed the file')


def t_check_short_file(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'q.vdi', '5M'), 0, 'create')
    t.qemu_io('q.vdi', 'write -P 1 0 3M', fmt='vdi')
    os.truncate(t.path('q.vdi'), t.size('q.vdi') - MiB)
    rv = t.vdk('check', 'q.vdi')
    expect_rc(rv, 2, 'vdk check of a truncated image')
    expect('shorter' in rv.err, 'names the short file', rv)
    expect_rc(t.vdk('check', '-r', 'all', 'q.vdi'), 0, 'repair')
    qemu_check_clean(t, 'q.vdi')
    res = t.qemu_io_raw('q.vdi', ['read -P 1 0 2M', 'read -P 0 2M 1M'], fmt='vdi')
    expect(res.rc == 0 and 'Pattern verification failed' not in res.out, 'data after repair', res)


def t_corrupt_open(t):
    """A map with bad entries: a writable open is refused, a read-only one
    reads the good blocks and fails the bad ones."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'q.vdi', '5M'), 0, 'create')
    t.qemu_io('q.vdi', 'write -P 1 0 1M', 'write -P 2 1M 1M', fmt='vdi')
    bmap_put(t.path('q.vdi'), 0, 9)
    rv = t.vdk('io', '-f', 'vdi', '-c', 'write 2M 4k', 'q.vdi')
    expect(rv.rc != 0 and 'block map entry 0 is out of range' in rv.err, 'writable open refused', rv)
    rv = t.vdk('io', '-r', '-f', 'vdi', '-c', 'read -P 2 1M 1M', 'q.vdi')
    expect(rv.rc == 0 and 'failed' not in rv.out + rv.err, 'read-only read of a good block', rv)
    rv = t.vdk('io', '-r', '-f', 'vdi', '-c', 'read 0 4k', 'q.vdi')
    expect('Input/output error' in rv.out + rv.err, 'the bad block fails with EIO', rv)


# ---------------------------------------------------------------- resize

def t_resize(t, creator, target):
    if creator == 'qemu':
        raw = qemu_image(t, 'i.vdi', 40 * MiB, seed=11, n=15)
    else:
        expect_rc(t.vdk('create', '-f', 'vdi', 'i.vdi', '40M'), 0, 'create')
        t.sparse('r.raw', 40 * MiB)
        cmds = write_cmds(12, 40 * MiB, 15)
        t.vdk_io('i.vdi', *cmds, fmt='vdi')
        t.qemu_io('r.raw', *cmds)
        raw = 'r.raw'
    bmap_before = hdr_get(t.path('i.vdi'), 'offset_data')
    rv = t.vdk('resize', '-f', 'vdi', 'i.vdi', str(target))
    expect_rc(rv, 0, 'vdk resize')
    os.truncate(t.path(raw), target)
    qemu_check_clean(t, 'i.vdi')
    compare_raw(t, 'i.vdi', raw)
    moved = hdr_get(t.path('i.vdi'), 'offset_data') != bmap_before
    expect_eq(moved, creator == 'qemu', 'the block map had to move')
    # writes past the old end
    t.vdk_io('i.vdi', 'write -P 0x66 %d 8192' % (target - 8192), fmt='vdi')
    t.qemu_io(raw, 'write -P 0x66 %d 8192' % (target - 8192))
    qemu_check_clean(t, 'i.vdi')
    compare_raw(t, 'i.vdi', raw)


def t_resize_refused(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'f.vdi', '3M'), 0, 'create')
    t.qemu_io('f.vdi', 'write -P 9 0 3M', fmt='vdi')
    before = t.content('f.vdi')
    rv = t.vdk('resize', '-f', 'vdi', 'f.vdi', '1G')
    expect(rv.rc == 1 and 'cannot grow' in rv.err, 'grow refused when the map cannot move', rv)
    expect(t.content('f.vdi') == before, 'the image is untouched')
    rv = t.vdk('resize', '-f', 'vdi', '--shrink', 'f.vdi', '1M')
    expect(rv.rc == 1 and 'shrinking is not supported' in rv.err, 'shrink refused', rv)
    # static images grow with new preallocated blocks
    expect_rc(t.vdk('create', '-f', 'vdi', '-o', 'static=on', 's.vdi', '3M'), 0, 'create static')
    expect_rc(t.vdk('resize', '-f', 'vdi', 's.vdi', '9M'), 0, 'grow static')
    qemu_check_clean(t, 's.vdi')
    expect_eq(hdr_get(t.path('s.vdi'), 'allocated'), 9, 'static blocks allocated')


# ---------------------------------------------------------------- hostile headers

HOSTILE = [
    ('signature', 0x12345678, 'signature'),
    ('version', 0x00010000, 'version'),
    ('header_size', 0x10, 'header size'),
    ('header_size', 0xffffffff, 'header size'),
    ('image_type', 3, 'undo'),
    ('image_type', 9, 'image type'),
    ('sector_size', 4096, 'sector size'),
    ('block_size', 2 * MiB, 'block size'),
    ('block_extra', 512, 'extra data'),
    ('offset_bmap', 0x201, 'block map offset'),
    ('offset_bmap', 0x0, 'block map offset'),
    ('offset_data', 0x201, 'data offset'),
    ('offset_data', 0x200, 'data offset'),
    ('blocks', 0xffffffff, 'blocks in image'),
    ('blocks', 2, 'disk size'),
    ('allocated', 100, 'blocks allocated'),
    ('disk_size', 1 << 62, 'disk size'),
    ('uuid_parent', 1, 'differencing'),
    ('uuid_link', 1, 'differencing'),
]


def t_hostile(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'base.vdi', '5M'), 0, 'create')
    t.qemu_io('base.vdi', 'write -P 1 0 2M', fmt='vdi')
    good = t.content('base.vdi')
    for i, (field, value, needle) in enumerate(HOSTILE):
        name = 'h%02d.vdi' % i
        t.write_bytes(name, good)
        fmt = '<Q' if field == 'disk_size' else '<I'
        hdr_put(t.path(name), field, value, fmt)
        for args in (['info', '-f', 'vdi', name], ['check', '-f', 'vdi', name],
                     ['convert', '-f', 'vdi', '-O', 'raw', name, 'o.raw']):
            rv = t.vdk(*args)
            expect(rv.rc == 1, '%s=%#x: %s fails' % (field, value, args[0]), rv)
            lines = rv.err.strip().splitlines()
            expect(len(lines) == 1 and needle in lines[0] and lines[0].startswith('vdk: '),
                   '%s=%#x: one error line naming %r' % (field, value, needle), rv)
    # block map entries out of range were covered by t_corrupt_open; a
    # file cut inside the block map
    t.write_bytes('cut.vdi', good[:0x202])
    rv = t.vdk('info', 'cut.vdi')
    expect(rv.rc == 1 and 'ends inside the block map' in rv.err and len(rv.err.strip().splitlines()) == 1,
           'a file cut inside the block map', rv)


def t_probe(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'p.vdi', '1M'), 0, 'create')
    j = jparse(t.vdk('info', '--output=json', 'p.vdi'), 'info')
    expect_eq(j['format'], 'vdi', 'probed format')


# ---------------------------------------------------------------- differencing

def t_differencing(t):
    """A differencing image made by hand (qemu-img cannot make one): blocks
    the child has come from it, the rest from the named parent."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'base.vdi', '4M'), 0, 'create')
    t.qemu_io('base.vdi', 'write -P 0xb0 0 4M', fmt='vdi')
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'child.vdi', '4M'), 0, 'create')
    t.qemu_io('child.vdi', 'write -P 0xc1 1M 1M', fmt='vdi')
    c = t.path('child.vdi')
    hdr_put(c, 'image_type', 4)
    with open(t.path('base.vdi'), 'rb') as f:
        f.seek(OFF['uuid_image'])
        base_uuid = f.read(16)
    with open(c, 'r+b') as f:
        f.seek(OFF['uuid_link'])
        f.write(base_uuid)
        f.write(b'\x01' * 16)  # parent modification UUID
    bmap_put(c, 3, 0xfffffffe)  # discarded: zeroes, not the parent's data
    rv = t.vdk('info', 'child.vdi')
    expect(rv.rc == 1 and 'differencing image' in rv.err and 'parent=' in rv.err, 'refused without a parent', rv)
    opts = 'driver=vdi,file.filename=child.vdi,parent=base.vdi'
    rv = t.vdk('convert', '--image-opts', opts, '-O', 'raw', 'flat.raw')
    expect_rc(rv, 0, 'convert with the parent named')
    data = t.content('flat.raw')
    expect(data[:MiB] == b'\xb0' * MiB and data[MiB:2 * MiB] == b'\xc1' * MiB and
           data[2 * MiB:3 * MiB] == b'\xb0' * MiB and data[3 * MiB:] == bytes(MiB), 'layers read right')
    # writes allocate in the child, copying the parent's rest of the block
    rv = t.vdk('io', '--image-opts', '-c', 'write -P 0xd2 %d 4096' % (2 * MiB + 4096), opts)
    expect_rc(rv, 0, 'write to the child')
    rv = t.vdk('io', '--image-opts', '-c', 'read -P 0xb0 %d 4096' % (2 * MiB), '-c',
               'read -P 0xd2 %d 4096' % (2 * MiB + 4096), '-c', 'read -P 0xb0 %d 8192' % (2 * MiB + 8192), opts)
    expect(rv.rc == 0 and 'failed' not in rv.out + rv.err, 'copy-on-write from the parent', rv)
    rv = t.vdk('info', '--output=json', '--image-opts', opts)
    expect_rc(rv, 0, 'info with the parent named')
    expect_eq(jparse(rv, 'info').get('backing-filename'), 'base.vdi', 'info names the parent')
    # the wrong parent is refused by UUID
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'other.vdi', '4M'), 0, 'create')
    rv = t.vdk('info', '--image-opts', 'driver=vdi,file.filename=child.vdi,parent=other.vdi')
    expect(rv.rc == 1 and 'UUID' in rv.err, 'wrong parent refused', rv)
    rv = t.vdk('info', '--image-opts', 'driver=vdi,file.filename=base.vdi,parent=other.vdi')
    expect(rv.rc == 1 and 'not a differencing image' in rv.err, 'parent on a plain image refused', rv)
    # -b PARENT on the reading commands does the same
    expect(rv.rc == 1 and rv.err.count('\n') == 1, 'one line', rv)
    rv = t.vdk('info', 'child.vdi')
    expect('-b PARENT' in rv.err, 'the refusal names -b', rv)
    expect_rc(t.vdk('convert', '--image-opts', opts, '-O', 'raw', 'flat.raw'), 0, 'convert again')
    rv = t.vdk('convert', '-b', 'base.vdi', '-O', 'raw', 'child.vdi', 'flat2.raw')
    expect_rc(rv, 0, 'convert -b')
    expect(t.content('flat2.raw') == t.content('flat.raw'), 'convert -b reads the same layers')
    rv = t.vdk('compare', '-b', 'base.vdi', 'child.vdi', 'flat.raw')
    expect(rv.rc == 0 and 'Images are identical' in rv.out, 'compare -b', rv)
    rv = t.vdk('info', '-b', 'base.vdi', '--output=json', 'child.vdi')
    expect_eq(jparse(rv, 'info -b').get('backing-filename'), 'base.vdi', 'info -b names the parent')
    rv = t.vdk('map', '-b', 'base.vdi', '--output=json', 'child.vdi')
    depth = {e['start'] // MiB: e['depth'] for e in jparse(rv, 'map -b') for _ in [0]}
    expect(depth.get(0) == 1 and depth.get(1) == 0, 'map -b shows the parent at depth 1', rv)
    rv = t.vdk('check', '-b', 'base.vdi', 'child.vdi')
    expect_rc(rv, 0, 'check -b')
    rv = t.vdk('io', '-b', 'base.vdi', '-c', 'read -P 0xb0 0 4096', 'child.vdi')
    expect(rv.rc == 0 and 'failed' not in rv.out + rv.err, 'io -b', rv)
    rv = t.vdk('dd', '-b', 'base.vdi', '-O', 'raw', 'if=child.vdi', 'of=dd.raw')
    expect_rc(rv, 0, 'dd -b')
    expect(t.content('dd.raw') == t.content('flat.raw'), 'dd -b reads the same layers')
    rv = t.vdk('measure', '-b', 'base.vdi', '-O', 'raw', 'child.vdi')
    expect_rc(rv, 0, 'measure -b')
    rv = t.vdk('info', '-b', 'base.vdi', 'base.vdi')
    expect(rv.rc == 1 and 'not a differencing image' in rv.err, '-b on a plain vdi refused', rv)
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'q.qcow2', '4M'), 0, 'create')
    rv = t.vdk('info', '-b', 'base.vdi', 'q.qcow2')
    expect(rv.rc == 1 and 'differencing vdi' in rv.err and rv.err.count('\n') == 1, '-b on a qcow2 refused', rv)


def t_fuzz(t, seed):
    """Mutated headers and block maps (fixed seeds) through every command:
    no crash, no hang, only the documented exit codes (63: the signature
    broke and the file probed as raw); after a repair that
    reports a clean image, qemu-img check agrees."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'vdi', 'base.vdi', '9M'), 0, 'create')
    t.qemu_io('base.vdi', 'write -P 1 0 2M', 'write -P 2 5M 1M', 'write -P 3 8M 4k', fmt='vdi')
    good = t.content('base.vdi')
    rnd = random.Random(seed)
    for i in range(12):
        data = bytearray(good)
        for _ in range(rnd.randrange(1, 4)):
            if rnd.random() < 0.5:
                off = rnd.choice([0x44, 0x48, 0x4c, 0x154, 0x158, 0x168, 0x170, 0x174, 0x178, 0x17c, 0x180,
                                  0x184, 0x1a8, 0x1b8]) + rnd.randrange(0, 4)
            else:
                off = 0x200 + rnd.randrange(0, 9 * 4)
            data[off] = rnd.choice([0, 1, 2, 0x7f, 0x80, 0xfe, 0xff, rnd.randrange(256)])
        name = 'f%02d.vdi' % i
        t.write_bytes(name, bytes(data))
        for args in (['info', '--output=json', name], ['check', name], ['map', '--output=json', name],
                     ['convert', '-O', 'raw', name, 'o.raw'], ['io', '-c', 'write -P 9 1M 8k', '-c', 'read 0 9M', name],
                     ['resize', name, '20M']):
            rv = t.vdk(*args, timeout=60)
            expect(rv.rc in (0, 1, 2, 3, 63), 'mutation %d: vdk %s exit %d' % (i, args[0], rv.rc), rv)
            expect('runtime error' not in rv.err and 'AddressSanitizer' not in rv.err,
                   'mutation %d: vdk %s sanitizer report' % (i, args[0]), rv)
        rv = t.vdk('check', '-r', 'all', name, timeout=60)
        expect(rv.rc in (0, 1, 2, 3, 63), 'mutation %d: check -r all exit %d' % (i, rv.rc), rv)
        if rv.rc == 0:
            res = t.qemu_img('check', name)
            expect(res.rc == 0, 'mutation %d: qemu-img check after a clean repair' % i, res)


suite.add('read/dynamic', t_read, False)
suite.add('read/static', t_read, True)
suite.add_io('read-patterns', t_read_engine)
suite.add('create/formatting-info', t_formatting)
for o in ('', 'static=on', 'preallocation=falloc', 'preallocation=full'):
    suite.add('write/%s' % (o or 'dynamic'), t_write, o)
suite.add('write/odd-size', t_write, '', 13 * MiB + 3 * 512)
suite.add('write/odd-size-static', t_write, 'static=on', 13 * MiB + 3 * 512)
suite.add('write/sparse-allocation', t_sparse_alloc)
suite.add_io('write-mix', t_write_engine)
suite.add('convert', t_convert)
suite.add('info', t_info)
for n, f, r in CORRUPTIONS:
    suite.add('check/%s' % n, t_check, n, f, r)
suite.add('check/short-file', t_check_short_file)
suite.add('check/corrupt-open', t_corrupt_open)
suite.add('resize/in-place', t_resize, 'vdk', 300 * MiB)
suite.add('resize/map-moves', t_resize, 'qemu', 600 * MiB)
suite.add('resize/refused', t_resize_refused)
suite.add('hostile-headers', t_hostile)
suite.add('probe', t_probe)
suite.add('differencing', t_differencing)
suite.add_io('discard-unmaps-at-close', t_discard_unmap)
suite.add('discard-killed-at-each-write', t_discard_crash)
for seed in (1, 2, 3):
    suite.add('fuzz/seed-%d' % seed, t_fuzz, seed)

if __name__ == '__main__':
    main(suite)
