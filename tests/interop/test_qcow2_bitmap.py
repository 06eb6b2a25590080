#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Persistent dirty bitmaps, both ways with qemu-img/qemu-io:

  - bitmaps qemu-img makes are listed by vdk info (text and JSON) exactly as
    qemu-img info lists them, and vdk check agrees with qemu-img check;
  - bitmaps vdk bitmap makes are listed, checked, merged, removed and
    converted (--bitmaps) by qemu-img;
  - writes, zero writes and discards through vdk io set exactly the bits
    the same requests through qemu-io set (the bitmap data is parsed here
    from the file), for several cluster sizes, extended L2 and lazy
    refcounts; disabled bitmaps do not change;
  - every vdk bitmap action gives the bitmaps qemu-img bitmap gives, and
    qemu-img's messages for errors;
  - resize grows the bitmaps as qemu does; snapshot apply and compact refuse;
  - measure counts the source's bitmaps as qemu-img measure does;
  - a writer or a bitmap command killed at each of its writes (strace
    inject) leaves every bitmap either in use (inconsistent) or covering
    every change, and the image without corruption;
  - hostile directories give one clear error line and leave the file
    unchanged; bitmaps vdk cannot maintain are kept byte for byte.

The bitmap parser here is independent of vdk."""

import json
import os
import random
import shutil
import struct

from vdktest import VDK, KiB, MiB, Skip, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main

suite = Suite('qcow2-bitmap')

EXT_BITMAPS = 0x23852875
IN_USE, AUTO = 1, 2


# ---------------------------------------------------------------------------
# Reading the bitmaps straight from the file
# ---------------------------------------------------------------------------

def header_ext(path):
    """(cluster size, virtual size, autoclear, (ext offset, nb, dir size, dir offset) or None)."""
    with open(path, 'rb') as f:
        h = f.read(2 * MiB)
    cs = 1 << struct.unpack('>I', h[20:24])[0]
    size = struct.unpack('>Q', h[24:32])[0]
    autoclear = struct.unpack('>Q', h[88:96])[0]
    off = struct.unpack('>I', h[100:104])[0]
    while off + 8 <= cs:
        t, length = struct.unpack('>II', h[off:off + 8])
        if t == 0:
            break
        if t == EXT_BITMAPS:
            nb, _, dsz, doff = struct.unpack('>IIQQ', h[off + 8:off + 32])
            return cs, size, autoclear, (off, nb, dsz, doff)
        off += 8 + ((length + 7) & ~7)
    return cs, size, autoclear, None


def directory(path):
    """[(entry offset in the file, fields dict)] of the bitmap directory."""
    cs, size, autoclear, ext = header_ext(path)
    if not ext:
        return []
    _, nb, dsz, doff = ext
    with open(path, 'rb') as f:
        f.seek(doff)
        d = f.read(dsz)
    out, p = [], 0
    for _ in range(nb):
        toff, tsz, flags, typ, gb, nl, el = struct.unpack('>QIIBBHI', d[p:p + 24])
        out.append((doff + p, dict(table_offset=toff, table_size=tsz, flags=flags, type=typ, gran_bits=gb,
                                   name=d[p + 24 + el:p + 24 + el + nl].decode(), extra=d[p + 24:p + 24 + el],
                                   raw=d[p:p + ((24 + el + nl + 7) & ~7)])))
        p += (24 + el + nl + 7) & ~7
    return out


def read_bitmaps(path):
    """{name: (flags, granularity, set of dirty bit numbers)}; {} when the
    autoclear bit says the extension is not valid."""
    cs, size, autoclear, ext = header_ext(path)
    if not ext or not autoclear & 1:
        return {}
    out = {}
    with open(path, 'rb') as f:
        for _, e in directory(path):
            f.seek(e['table_offset'])
            tbl = struct.unpack('>%dQ' % e['table_size'], f.read(e['table_size'] * 8))
            gran = 1 << e['gran_bits']
            nbits = -(-size // gran)
            data = bytearray()
            for ent in tbl:
                o = ent & 0x00fffffffffffe00
                if o:
                    f.seek(o)
                    data += f.read(cs)
                else:
                    data += (b'\xff' if ent & 1 else b'\0') * cs
            bits = {i for i in range(nbits) if data[i // 8] >> (i % 8) & 1}
            tail = {i for i in range(nbits, -(-nbits // 8) * 8) if data[i // 8] >> (i % 8) & 1}
            expect(not tail, 'bitmap %s: unused tail bits are zero' % e['name'])
            out[e['name']] = (e['flags'], gran, bits)
    return out


def granules(ranges, gran):
    s = set()
    for off, length in ranges:
        if length:
            s |= set(range(off // gran, (off + length - 1) // gran + 1))
    return s


def info_both(t, name, what):
    """vdk info and qemu-img info agree (text and JSON, but the disk usage)."""
    for args in ((), ('--output=json',)):
        rq = t.qemu_img('info', *args, name)
        rv = t.vdk('info', *args, name)
        expect_rc(rq, 0, 'qemu-img info ' + what)
        expect_rc(rv, 0, 'vdk info ' + what)
        if args:
            jq, jv = json.loads(rq.out), json.loads(rv.out)
            for j in (jq, jv):
                j.pop('actual-size', None)
            expect_eq(jv, jq, 'vdk info --output=json = qemu-img\'s (%s)' % what)
        else:
            strip = lambda s: [ln for ln in s.splitlines() if not ln.startswith('disk size')]
            expect_eq(strip(rv.out), strip(rq.out), 'vdk info = qemu-img info (%s)' % what)


def check_both(t, name, what, leaks_ok=False):
    rq = t.qemu_img('check', name)
    rv = t.vdk('check', name)
    expect_eq((rv.rc, rv.out), (rq.rc, rq.out), 'vdk check = qemu-img check (%s)' % what)
    expect(rq.rc == 0 or (leaks_ok and rq.rc == 3), 'qemu-img check is clean (%s)' % what, rq)


def qemu_made(t, name='img.qcow2', opts='', size='16M'):
    args = ['create', '-q', '-f', 'qcow2'] + (['-o', opts] if opts else []) + [name, size]
    expect_rc(t.qemu_img(*args), 0)
    expect_rc(t.qemu_img('bitmap', '--add', name, 'b0'), 0)
    expect_rc(t.qemu_img('bitmap', '--add', '-g', '512', name, 'fine'), 0)
    expect_rc(t.qemu_img('bitmap', '--add', '-g', '1M', name, 'coarse'), 0)
    expect_rc(t.qemu_img('bitmap', '--add', '--disable', name, 'off'), 0)


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

def t_qemu_listed(t):
    qemu_made(t)
    t.qemu_io('img.qcow2', 'write -P 1 0 64k', 'write -P 2 5M 1M', 'discard 8M 64k', fmt='qcow2')
    expect_rc(t.qemu_img('bitmap', '--add', 'img.qcow2', 'a name with "quotes" \\ and spaces'), 0)
    info_both(t, 'img.qcow2', 'bitmaps by qemu')
    check_both(t, 'img.qcow2', 'bitmaps by qemu')
    # an inconsistent bitmap (flag set by hand) is listed "in-use"
    shutil.copy(t.path('img.qcow2'), t.path('inuse.qcow2'))
    off, e = directory(t.path('inuse.qcow2'))[0]
    with open(t.path('inuse.qcow2'), 'r+b') as f:
        f.seek(off + 12)
        f.write(struct.pack('>I', e['flags'] | IN_USE))
    info_both(t, 'inuse.qcow2', 'an in-use bitmap')
    check_both(t, 'inuse.qcow2', 'an in-use bitmap')
    for act in (['--clear'], ['--enable'], ['--merge', 'fine']):
        rv = t.vdk('bitmap', *act, 'inuse.qcow2', 'b0')
        expect(rv.rc == 1 and "Bitmap 'b0' is inconsistent and cannot be used" in rv.err, 'in use: refused', rv)
    expect_rc(t.vdk('bitmap', '--remove', 'inuse.qcow2', 'b0'), 0, 'an in-use bitmap can be removed')
    expect('b0' not in read_bitmaps(t.path('inuse.qcow2')), 'removed')
    check_both(t, 'inuse.qcow2', 'after removing the in-use bitmap')


def t_vdk_made(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'img.qcow2', '16M'), 0)
    expect_rc(t.vdk('bitmap', '--add', 'img.qcow2', 'b0'), 0)
    expect_rc(t.vdk('bitmap', '--add', '-g', '512', 'img.qcow2', 'fine'), 0)
    expect_rc(t.vdk('bitmap', '--add', '-g', '1M', 'img.qcow2', 'coarse'), 0)
    expect_rc(t.vdk('bitmap', '--add', '--disable', 'img.qcow2', 'off'), 0)
    qemu_made(t, 'ref.qcow2')
    info_both(t, 'img.qcow2', 'bitmaps by vdk')
    check_both(t, 'img.qcow2', 'bitmaps by vdk')
    listing = lambda n: json.loads(t.vdk('info', '--output=json', n).out)['format-specific']
    expect_eq(listing('img.qcow2'), listing('ref.qcow2'), 'the same listing as qemu-img bitmap\'s')
    t.vdk_io('img.qcow2', 'write -P 3 1M 100k', 'write -z 3M 64k', fmt='qcow2')
    expect(read_bitmaps(t.path('img.qcow2'))['b0'][2] == {16, 17, 48}, 'vdk tracked its writes',)
    # qemu uses what vdk wrote
    expect_rc(t.qemu_img('bitmap', '--add', '--disable', 'img.qcow2', 'q'), 0)
    expect_rc(t.qemu_img('bitmap', '--merge', 'b0', 'img.qcow2', 'q'), 0, 'qemu-img merges a vdk bitmap')
    expect_eq(read_bitmaps(t.path('img.qcow2'))['q'][2], {16, 17, 48}, 'the merged bits')
    expect_rc(t.qemu_img('bitmap', '--remove', 'img.qcow2', 'fine'), 0, 'qemu-img removes a vdk bitmap')
    check_both(t, 'img.qcow2', 'after qemu changed vdk\'s bitmaps')
    expect_rc(t.qemu_img('convert', '--bitmaps', '-O', 'qcow2', 'img.qcow2', 'conv.qcow2'), 0,
              'qemu-img convert --bitmaps')
    a, b = read_bitmaps(t.path('img.qcow2')), read_bitmaps(t.path('conv.qcow2'))
    expect_eq({k: v[1:] for k, v in b.items()}, {k: v[1:] for k, v in a.items()}, 'converted bitmaps')
    # the other way: vdk reads what qemu wrote after vdk
    info_both(t, 'img.qcow2', 'after qemu changed vdk\'s bitmaps')


def t_measure(t):
    qemu_made(t, 'img.qcow2')
    expect_rc(t.qemu_img('bitmap', '--add', 'img.qcow2', 'x' * 100), 0)
    for args in (['-O', 'qcow2'], ['-O', 'qcow2', '-o', 'cluster_size=4k'], ['-O', 'qcow2', '-o', 'cluster_size=2M'],
                 ['-O', 'qcow2', '-o', 'compat=0.10'], ['-O', 'raw'], ['--output=json', '-O', 'qcow2']):
        rv = t.vdk('measure', *args, 'img.qcow2')
        rq = t.qemu_img('measure', *args, 'img.qcow2')
        expect_eq((rv.rc, rv.out), (rq.rc, rq.out), 'vdk measure %s = qemu-img\'s' % ' '.join(args))
    expect('bitmaps size: ' in t.vdk('measure', '-O', 'qcow2', 'img.qcow2').out, 'the bitmaps size is shown')


def random_ops(rng, size, n, cs):
    ops = []
    for _ in range(n):
        kind = rng.choice(['write', 'write', 'zero', 'discard'])
        if rng.random() < 0.5:
            off = rng.randrange(0, size // cs) * cs
            length = cs * rng.randrange(1, 4)
        else:
            off = rng.randrange(0, size - 1)
            length = rng.randrange(1, 300 * KiB)
        length = min(length, size - off)
        if kind == 'discard':
            # qemu-io discard wants sector alignment
            off, length = off // 512 * 512, max(512, length // 512 * 512)
            length = min(length, size - off)
        ops.append((kind, off, length))
    return ops


def io_cmds(ops):
    c = []
    for kind, off, length in ops:
        if kind == 'write':
            c.append('write -P 0x%x %d %d' % (1 + off % 250, off, length))
        elif kind == 'zero':
            c.append('write -z %d %d' % (off, length))
        else:
            c.append('discard %d %d' % (off, length))
    return c


def t_writes_tracked(t, opts):
    rng = random.Random(opts)
    size = 16 * MiB
    qemu_made(t, 'v.qcow2', opts)
    shutil.copy(t.path('v.qcow2'), t.path('q.qcow2'))
    cs = read_cs = header_ext(t.path('v.qcow2'))[0]
    ops = random_ops(rng, size, 60, cs)
    cmds = io_cmds(ops)
    for i in range(0, len(cmds), 20):
        t.vdk_io('v.qcow2', *cmds[i:i + 20], fmt='qcow2')
        t.qemu_io('q.qcow2', *cmds[i:i + 20], fmt='qcow2')
    bv, bq = read_bitmaps(t.path('v.qcow2')), read_bitmaps(t.path('q.qcow2'))
    expect_eq(sorted(bv), sorted(bq), 'the same bitmaps')
    written = [(o, n) for k, o, n in ops if k != 'discard']
    for name in bq:
        fv, gv, sv = bv[name]
        fq, gq, sq = bq[name]
        expect_eq((fv, gv), (fq, gq), '%s: flags and granularity' % name)
        if name == 'off':
            expect_eq(sv, set(), 'a disabled bitmap does not change')
            continue
        # every written granule is dirty; discards (which qemu may skip
        # where nothing is allocated) at most add granules they cover
        need = granules(written, gv)
        expect(need <= sv, '%s: every write is in the bitmap (missing %s)' % (name, sorted(need - sv)[:10]))
        may = granules([(o, n) for _, o, n in ops], gv)
        expect(sv <= may, '%s: only written ranges are dirty (extra %s)' % (name, sorted(sv - may)[:10]))
        expect(sq <= sv, '%s: every bit qemu sets, vdk sets (missing %s)' % (name, sorted(sq - sv)[:10]))
    check_both(t, 'v.qcow2', 'after writes through vdk')
    info_both(t, 'v.qcow2', 'after writes through vdk')
    del read_cs


def t_actions(t):
    """each vdk bitmap action against qemu-img bitmap's on a copy"""
    qemu_made(t, 'v.qcow2')
    t.qemu_io('v.qcow2', 'write -P 1 0 64k', 'write -P 2 5M 1M', 'write 15M 600k', fmt='qcow2')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'other.qcow2', '16M'), 0)
    expect_rc(t.qemu_img('bitmap', '--add', '-g', '4k', 'other.qcow2', 'src'), 0)
    t.qemu_io('other.qcow2', 'write 9M 10k', 'write 12345 1', fmt='qcow2')
    shutil.copy(t.path('v.qcow2'), t.path('q.qcow2'))
    steps = [
        ['--add', '-g', '128k', '{}', 'new'],
        ['--merge', 'b0', '{}', 'new'],
        ['--merge', 'fine', '{}', 'coarse'],
        ['--merge', 'src', '-b', 'other.qcow2', '{}', 'off'],
        ['--merge', 'src', '-b', 'other.qcow2', '-F', 'qcow2', '{}', 'fine'],
        ['--clear', '{}', 'b0'],
        ['--disable', '{}', 'b0'],
        ['--enable', '{}', 'off'],
        ['--remove', '{}', 'coarse'],
        ['--add', '--disable', '{}', 'x'],
        ['--clear', '--enable', '{}', 'new'],
    ]
    for st in steps:
        rv = t.vdk('bitmap', *[a.replace('{}', 'v.qcow2') for a in st])
        rq = t.qemu_img('bitmap', *[a.replace('{}', 'q.qcow2') for a in st])
        expect_eq((rv.rc, rv.out), (rq.rc, rq.out), 'vdk bitmap %s: exit status' % ' '.join(st))
        expect_eq(read_bitmaps(t.path('v.qcow2')), read_bitmaps(t.path('q.qcow2')),
                  'after %s: the same bitmaps as qemu-img' % ' '.join(st))
    t.vdk_io('v.qcow2', 'write 2M 4k', fmt='qcow2')
    t.qemu_io('q.qcow2', 'write 2M 4k', fmt='qcow2')
    expect_eq(read_bitmaps(t.path('v.qcow2')), read_bitmaps(t.path('q.qcow2')), 'writes after the actions')
    info_both(t, 'v.qcow2', 'after the actions')
    check_both(t, 'v.qcow2', 'after the actions')
    errors = [
        (['--add', '{}', 'b0'], 'Operation add on bitmap b0 failed: Bitmap already exists: b0'),
        (['--remove', '{}', 'nope'], "Operation remove on bitmap nope failed: Dirty bitmap 'nope' not found"),
        (['--clear', '{}', 'nope'], "Operation clear on bitmap nope failed: Dirty bitmap 'nope' not found"),
        (['--add', '-g', '1000', '{}', 'y'], 'Granularity must be power of 2 and at least 512'),
        (['--add', '-g', '256', '{}', 'y'], 'Granularity must be power of 2 and at least 512'),
        (['--add', '-g', '4G', '{}', 'y'], 'Granularity must be power of 2 and at least 512'),
        (['--merge', 'nope', '{}', 'b0'], "Dirty bitmap 'nope' not found"),
        (['--disable', '--add', '{}', 'zz'], "Operation disable on bitmap zz failed: Dirty bitmap 'zz' not found"),
        (['--clear', '-g', '64k', '{}', 'b0'], 'granularity only supported with --add'),
        (['--clear', '-b', 'other.qcow2', '{}', 'b0'], 'Merge bitmap source file only supported with --merge'),
        (['{}', 'b0'], 'Need at least one of --add, --remove, --clear, --enable, --disable, or --merge'),
        (['--add', '{}'], 'Expecting filename and bitmap name'),
        (['--add', '{}', 'n' * 1024], 'Name length exceeds maximum (1023 characters)'),
    ]
    for args, msg in errors:
        before = t.content('v.qcow2')
        rv = t.vdk('bitmap', *[a.replace('{}', 'v.qcow2') for a in args])
        rq = t.qemu_img('bitmap', *[a.replace('{}', 'q.qcow2') for a in args])
        expect(rv.rc == 1 and rq.rc == 1, 'both refuse %s' % args[:3], rv)
        expect(msg in rv.err and msg in rq.err, 'message %r from both' % msg, rv)
        expect_one_error_line(rv)
        expect(t.content('v.qcow2') == before, 'a refused action changes nothing')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '1M'), 0)
    rv = t.vdk('bitmap', '--add', 'v2.qcow2', 'x')
    expect(rv.rc == 1 and 'Cannot store dirty bitmaps in qcow2 v2 files' in rv.err, 'v2 refused', rv)
    expect_rc(t.qemu_img('create', '-q', '-f', 'raw', 'r.raw', '1M'), 0)
    rv = t.vdk('bitmap', '--add', '-f', 'raw', 'r.raw', 'x')
    expect(rv.rc == 1 and 'persistent bitmaps' in rv.err, 'raw refused', rv)
    rv = t.vdk('bitmap', '--help')
    expect(rv.rc == 0 and 'usage: vdk bitmap' in rv.out, 'vdk bitmap --help', rv)


def t_resize_and_refusals(t):
    qemu_made(t, 'v.qcow2')
    t.qemu_io('v.qcow2', 'write 0 64k', 'write 15M 1M', fmt='qcow2')
    shutil.copy(t.path('v.qcow2'), t.path('q.qcow2'))
    expect_rc(t.vdk('resize', 'v.qcow2', '40M'), 0, 'vdk resize grows an image with bitmaps')
    expect_rc(t.qemu_img('resize', 'q.qcow2', '40M'), 0)
    expect_eq(read_bitmaps(t.path('v.qcow2')), read_bitmaps(t.path('q.qcow2')), 'grown bitmaps as qemu')
    t.vdk_io('v.qcow2', 'write 39M 1M', fmt='qcow2')
    t.qemu_io('q.qcow2', 'write 39M 1M', fmt='qcow2')
    expect_eq(read_bitmaps(t.path('v.qcow2')), read_bitmaps(t.path('q.qcow2')), 'writes in the grown part')
    check_both(t, 'v.qcow2', 'grown')
    expect_rc(t.vdk('resize', '--shrink', 'v.qcow2', '8M'), 0, 'vdk resize shrinks')
    bv = read_bitmaps(t.path('v.qcow2'))
    expect(0 in bv['b0'][2] and max(bv['b0'][2]) < 128, 'shrunk bitmap keeps its bits below the end', )
    check_both(t, 'v.qcow2', 'shrunk')
    info_both(t, 'v.qcow2', 'shrunk')
    expect_rc(t.vdk('snapshot', '-c', 's1', 'v.qcow2'), 0, 'snapshot -c with bitmaps')
    rv = t.vdk('snapshot', '-a', 's1', 'v.qcow2')
    rq = t.qemu_img('snapshot', '-a', 's1', 'v.qcow2')
    expect(rv.rc == 1 and rq.rc == 1 and 'Device has active dirty bitmaps' in rv.err, 'snapshot -a refused', rv)
    expect_rc(t.vdk('snapshot', '-d', 's1', 'v.qcow2'), 0)
    rv = t.vdk('compact', 'v.qcow2')
    expect(rv.rc == 1 and 'persistent bitmaps' in rv.err, 'compact refused with bitmaps', rv)
    expect_one_error_line(rv)
    rv = t.vdk('amend', '-o', 'compat=0.10', 'v.qcow2')
    expect(rv.rc == 1 and 'persistent bitmaps' in rv.err, 'downgrade refused', rv)
    expect_rc(t.vdk('amend', '-o', 'refcount_bits=8', 'v.qcow2'), 0, 'amend refcount_bits keeps the bitmaps')
    check_both(t, 'v.qcow2', 'amended')
    expect_eq(read_bitmaps(t.path('v.qcow2')), bv, 'bitmaps survive the refcount rebuild')


def killed_at(t, strace, n, args, cwd):
    t.run([strace, '-f', '-qq', '-o', '/dev/null', '-e', 'trace=pwrite64,pwritev,pwritev2,fdatasync,fsync',
           '-e', 'inject=pwrite64,pwritev,pwritev2:signal=KILL:when=%d' % n, VDK] + args, cwd=cwd, timeout=60)


def count_writes(t, strace, args):
    out = t.path('count.txt')
    t.run([strace, '-f', '-qq', '-c', '-o', out, '-e', 'trace=pwrite64,pwritev,pwritev2', VDK] + args, timeout=120)
    writes = 0
    with open(out) as f:
        for line in f:
            p = line.split()
            if p and p[-1] in ('pwrite64', 'pwritev', 'pwritev2') and p[3].isdigit():
                writes += int(p[3])
    return writes


def t_killed(t):
    """SIGKILL at each write of a vdk io session and of vdk bitmap: every
    bitmap is either in use or covers every change; no corruption."""
    strace = shutil.which('strace')
    if not strace:
        raise Skip('strace not installed')
    qemu_made(t, 'base.qcow2')
    t.qemu_io('base.qcow2', 'write -P 7 0 2M', fmt='qcow2')
    base = t.content('base.qcow2')
    io = ['io', '--aio=threads', '-f', 'qcow2', '-c', 'write -P 1 1M 128k', '-c', 'write -z 3M 64k', '-c',
          'discard 0 64k', '-c', 'write -P 2 9M 300k', '-c', 'flush', '-c', 'write -P 3 15M 4k', 'k.qcow2']
    bm = ['bitmap', '--aio=threads', '--remove', '--add', '-g', '4k', '--merge', 'b0', 'k.qcow2', 'coarse']
    old = read_bitmaps(t.path('base.qcow2'))
    merged = {i for b in old['b0'][2] for i in range(b * 16, b * 16 + 16)}
    total = 0
    for label, args in (('io', io), ('bitmap', bm)):
        with open(t.path('k.qcow2'), 'wb') as f:
            f.write(base)
        writes = count_writes(t, strace, args)
        expect(writes > 5, '%s writes (%d)' % (label, writes))
        for n in range(1, writes + 1):
            with open(t.path('k.qcow2'), 'wb') as f:
                f.write(base)
            killed_at(t, strace, n, args, t.dir)
            what = 'vdk %s killed at write %d of %d' % (label, n, writes)
            chk = t.qemu_img('check', 'k.qcow2')
            expect(chk.rc in (0, 3), what + ': no corruption (exit %d)' % chk.rc, chk)
            expect_rc(t.qemu_img('info', 'k.qcow2'), 0, what + ': qemu-img opens it')
            expect_rc(t.vdk('info', 'k.qcow2'), 0, what + ': vdk opens it')
            t.qemu_img('convert', '-O', 'raw', 'k.qcow2', 'k.raw')
            t.qemu_img('convert', '-O', 'raw', 'base.qcow2', 'b.raw')
            a, b = t.content('k.raw'), t.content('b.raw')
            now = read_bitmaps(t.path('k.qcow2'))
            if label == 'bitmap':
                # the open marks the enabled bitmaps in use before anything else
                unmarked = {k: (f & ~IN_USE, g, b) for k, (f, g, b) in now.items()}
                expect(all(f & AUTO for f, _, _ in now.values() if f & IN_USE), what + ': only enabled ones in use')
                expect(unmarked == old or (now['coarse'] == (AUTO, 4 * KiB, merged) and
                                      {k: v for k, v in now.items() if k != 'coarse'} ==
                                      {k: v for k, v in old.items() if k != 'coarse'}),
                       what + ': the old bitmaps or the new ones')
            for name, (flags, gran, bits) in now.items():
                if flags & IN_USE or not flags & AUTO or label == 'bitmap':
                    continue
                changed = {i // gran for i in range(0, len(a), 512) if a[i:i + 512] != b[i:i + 512]}
                expect(changed <= bits, what + ': consistent bitmap %s covers every change' % name)
            total += 1
            if label == 'io' and n % 5 == 0:
                rv = t.vdk('bitmap', '--remove', 'k.qcow2', 'b0')
                expect_rc(rv, 0, what + ': the bitmap can be removed afterwards')
                check_both(t, 'k.qcow2', what + ', bitmap removed', leaks_ok=True)
    t.log('%d killed runs' % total)


def mutate(path, off, fmt, value):
    with open(path, 'r+b') as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


def t_hostile(t):
    qemu_made(t, 'base.qcow2')
    expect_rc(t.qemu_img('bitmap', '--add', 'base.qcow2', 'b1'), 0)
    t.qemu_io('base.qcow2', 'write 0 1M', fmt='qcow2')
    p = t.path('base.qcow2')
    cs, size, _, (ext_off, nb, dsz, doff) = header_ext(p)
    with open(p, 'r+b') as f:  # whole clusters: the directory's cluster can hold more
        f.truncate(-(-os.path.getsize(p) // cs) * cs)
    ents = directory(p)
    e0, f0 = ents[0]
    fsize = os.path.getsize(p)
    with open(p, 'rb') as f:
        f.seek(f0['table_offset'])
        t0 = struct.unpack('>Q', f.read(8))[0]
    cases = [
        ('ext-length', ext_off + 4, '>I', 16, 'bitmaps extension length'),
        ('nb-zero', ext_off + 8, '>I', 0, 'nb_bitmaps 0'),
        ('nb-huge', ext_off + 8, '>I', 70000, 'nb_bitmaps 70000'),
        ('nb-more', ext_off + 8, '>I', nb + 1, 'entry %d starts at byte' % nb),
        ('reserved', ext_off + 12, '>I', 1, 'reserved field'),
        ('dir-size-zero', ext_off + 16, '>Q', 0, 'bitmap_directory_size 0'),
        ('dir-size-huge', ext_off + 16, '>Q', 1 << 40, 'bitmap_directory_size'),
        ('dir-size-short', ext_off + 16, '>Q', dsz - 8, 'bitmap directory'),
        ('dir-size-long', ext_off + 16, '>Q', dsz + 8, 'after the last'),
        ('dir-unaligned', ext_off + 24, '>Q', doff + 8, 'bitmap_directory_offset'),
        ('dir-past-end', ext_off + 24, '>Q', fsize // cs * cs + 100 * cs, 'bitmap_directory_offset'),
        ('dir-at-header', ext_off + 24, '>Q', 0, 'bitmap_directory_offset'),
        ('dir-near-2^64', ext_off + 24, '>Q', (1 << 64) - cs, 'bitmap_directory_offset'),
        ('name-zero', e0 + 18, '>H', 0, 'name length 0'),
        ('name-long', e0 + 18, '>H', 2000, 'name length 2000'),
        ('extra-huge', e0 + 20, '>I', 0xffffffff, 'runs past the directory'),
        ('flags-reserved', e0 + 12, '>I', AUTO | 8, 'reserved flags 0x8'),
        ('type', e0 + 16, '>B', 2, 'type 2'),
        ('granularity-64', e0 + 17, '>B', 64, 'granularity_bits 64'),
        ('table-size-zero', e0 + 8, '>I', 0, 'bitmap_table_size 0'),
        ('table-size-huge', e0 + 8, '>I', 0xffffffff, 'bitmap_table_size'),
        ('table-size-small', e0 + 17, '>B', 0, 'bitmap_table_size 1 is invalid (32 entries'),
        ('table-unaligned', e0, '>Q', f0['table_offset'] + 8, 'bitmap_table_offset'),
        ('table-past-end', e0, '>Q', fsize // cs * cs + 100 * cs, 'bitmap_table_offset'),
        ('table-on-l1', e0, '>Q', struct.unpack('>Q', open(p, 'rb').read(48)[40:48])[0], 'bitmap_table_offset'),
        ('padding', e0 + 24 + len(f0['name']), '>B', 0x55, 'padding'),
        ('duplicate-name', ents[4][0] + 24, '>2s', b'b0', "the name 'b0' appears twice"),
        ('nul-in-name', ents[3][0] + 24, '>3s', b'b0\0', 'NUL'),
    ]
    for name, off, fmt, value, msg in cases:
        shutil.copy(p, t.path('h.qcow2'))
        mutate(t.path('h.qcow2'), off, fmt, value)
        before = t.content('h.qcow2')
        for args in (['info', 'h.qcow2'], ['io', '-f', 'qcow2', '-c', 'write 0 4k', 'h.qcow2'],
                     ['bitmap', '--add', 'h.qcow2', 'zz']):
            rv = t.vdk(*args, timeout=10)
            expect(rv.rc == 1 and msg in rv.err, '%s: vdk %s fails with %r' % (name, args[0], msg), rv)
            expect_one_error_line(rv)
            expect(t.content('h.qcow2') == before, '%s: vdk %s leaves the file unchanged' % (name, args[0]))
        rv = t.vdk('check', 'h.qcow2', timeout=10)
        if rv.rc == 1:  # a header field: no check at all, as qemu-img
            expect(msg in rv.err, '%s: vdk check fails with %r' % (name, msg), rv)
            expect_one_error_line(rv)
        else:
            expect(rv.rc == 2 and 'ERROR' in rv.out + rv.err, '%s: vdk check reports it' % name, rv)
    # bad table entries: found when the data is needed (read-write open)
    for name, value, msg in (('entry-reserved', t0 | 2, 'table entry 0'), ('entry-unaligned', t0 + 512, 'table entry 0'),
                             ('entry-past-end', (fsize // cs + 100) * cs, 'table entry 0'),
                             ('entry-ones-with-offset', t0 | 1, 'table entry 0')):
        shutil.copy(p, t.path('h.qcow2'))
        mutate(t.path('h.qcow2'), f0['table_offset'], '>Q', value)
        before = t.content('h.qcow2')
        rv = t.vdk('io', '-f', 'qcow2', '-c', 'write 0 4k', 'h.qcow2', timeout=10)
        expect(rv.rc == 1 and msg in rv.err, '%s: a read-write open fails' % name, rv)
        expect_one_error_line(rv)
        expect(t.content('h.qcow2') == before, '%s: file unchanged' % name)
        rv = t.vdk('check', 'h.qcow2', timeout=10)
        expect(rv.rc in (2, 3), '%s: vdk check reports it (exit %d)' % (name, rv.rc), rv)
    # the autoclear bit clear: every bitmap is inconsistent and ignored
    shutil.copy(p, t.path('h.qcow2'))
    mutate(t.path('h.qcow2'), 88, '>Q', 0)
    info_both(t, 'h.qcow2', 'autoclear bit clear')
    t.vdk_io('h.qcow2', 'write 0 4k', fmt='qcow2')
    expect_eq(header_ext(t.path('h.qcow2'))[2], 0, 'vdk leaves the autoclear bit clear')
    # an unknown autoclear bit: cleared by a writer, the bitmaps kept
    shutil.copy(p, t.path('h.qcow2'))
    mutate(t.path('h.qcow2'), 88, '>Q', 1 | 1 << 5)
    t.vdk_io('h.qcow2', 'write 0 4k', fmt='qcow2')
    expect_eq(header_ext(t.path('h.qcow2'))[2], 1, 'unknown autoclear bits are cleared')
    check_both(t, 'h.qcow2', 'unknown autoclear bit')


def add_extra(src, dst, idx, extra, flags_or):
    """Copy @src with bitmap @idx given extra data (the directory rewritten
    in its cluster)."""
    shutil.copy(src, dst)
    cs, size, _, (ext_off, nb, dsz, doff) = header_ext(dst)
    ents = directory(dst)
    out = b''
    for i, (_, e) in enumerate(ents):
        raw = e['raw']
        if i == idx:
            toff, tsz, flags, typ, gb, nl, el = struct.unpack('>QIIBBHI', raw[:24])
            body = struct.pack('>QIIBBHI', toff, tsz, flags | flags_or, typ, gb, nl, len(extra)) + extra + \
                e['name'].encode()
            raw = body + b'\0' * (-len(body) % 8)
        out += raw
    # in place: the directory's cluster is its own (refcount 1)
    assert len(out) <= cs
    with open(dst, 'r+b') as f:
        f.seek(doff)
        f.write(out)
        f.seek(ext_off + 16)
        f.write(struct.pack('>Q', len(out)))
    return out


def t_unusable_kept(t):
    """extra data without extra_data_compatible: kept byte for byte; an
    enabled one makes a writer clear the autoclear bit (all inconsistent)"""
    qemu_made(t, 'base.qcow2')
    # a disabled bitmap (idx 3, 'off') with unknown extra data: the others stay usable
    dir_before = add_extra(t.path('base.qcow2'), t.path('d.qcow2'), 3, b'EXTRADATA', 0)
    t.vdk_io('d.qcow2', 'write 0 64k', fmt='qcow2')
    expect_eq(header_ext(t.path('d.qcow2'))[2] & 1, 1, 'a disabled unusable bitmap keeps the bit')
    ents = {e['name']: e for _, e in directory(t.path('d.qcow2'))}
    old = {e['name']: e for _, e in directory(t.path('base.qcow2'))}
    expect_eq(ents['off']['extra'], b'EXTRADATA', 'extra data kept')
    expect_eq(ents['off']['table_offset'], old['off']['table_offset'], 'its table untouched')
    expect_rc(t.vdk('bitmap', '--add', 'd.qcow2', 'more'), 0)
    ents = {e['name']: e for _, e in directory(t.path('d.qcow2'))}
    expect_eq(ents['off']['extra'], b'EXTRADATA', 'extra data kept by a new directory')
    rv = t.vdk('bitmap', '--clear', 'd.qcow2', 'off')
    expect(rv.rc == 1 and 'cannot be used by vdk' in rv.err, 'an unusable bitmap is not changed', rv)
    expect_rc(t.vdk('check', 'd.qcow2'), 0, 'vdk check')
    # enabled (b0) with unknown extra data: a writer clears the autoclear bit
    add_extra(t.path('base.qcow2'), t.path('e.qcow2'), 0, b'X', 0)
    d1 = directory(t.path('e.qcow2'))
    res = t.vdk_io_raw('e.qcow2', ['write 0 64k'], fmt='qcow2')
    expect(res.rc == 0 and 'cannot be maintained' in res.err, 'a warning says why', res)
    expect_eq(header_ext(t.path('e.qcow2'))[2] & 1, 0, 'the autoclear bit is cleared')
    expect_eq(directory(t.path('e.qcow2')), d1, 'the directory is untouched')
    info_both(t, 'e.qcow2', 'bitmaps inconsistent after an unusable one')
    # with the compatible flag, the bitmap is used and the extra data kept
    add_extra(t.path('base.qcow2'), t.path('c.qcow2'), 0, b'Y' * 5, 4)
    t.vdk_io('c.qcow2', 'write 0 64k', fmt='qcow2')
    ents = {e['name']: e for _, e in directory(t.path('c.qcow2'))}
    expect_eq((ents['b0']['extra'], ents['b0']['flags']), (b'Y' * 5, AUTO | 4), 'compatible extra data kept')
    expect_eq(read_bitmaps(t.path('c.qcow2'))['b0'][2], {0}, 'and the bitmap tracked')
    del dir_before


def t_convert_bitmaps(t):
    """convert --bitmaps and --skip-broken-bitmaps as qemu-img's: the same
    bitmaps (name, flags, granularity, bits) in the target, the same
    messages for what cannot be done; vdk leaves no target behind when it
    refuses (qemu-img leaves the one it created)."""
    qemu_made(t)
    t.qemu_io('img.qcow2', 'write -P 1 0 64k', 'write -P 2 5M 1M', 'write -z 9M 200k', 'discard 12M 64k',
              fmt='qcow2')
    expect_rc(t.qemu_img('bitmap', '--add', '-g', '128k', 'img.qcow2', 'late'), 0)
    t.qemu_io('img.qcow2', 'write -P 3 3M 4k', fmt='qcow2')
    for opts in ([], ['-o', 'cluster_size=4096'], ['-c']):
        for f in ('v.qcow2', 'q.qcow2'):
            if os.path.exists(t.path(f)):
                os.unlink(t.path(f))
        what = 'convert --bitmaps %s' % ' '.join(opts)
        expect_rc(t.vdk('convert', '--bitmaps', '-O', 'qcow2', *opts, 'img.qcow2', 'v.qcow2'), 0, 'vdk ' + what)
        expect_rc(t.qemu_img('convert', '--bitmaps', '-O', 'qcow2', *opts, 'img.qcow2', 'q.qcow2'), 0,
                  'qemu-img ' + what)
        bv, bq = read_bitmaps(t.path('v.qcow2')), read_bitmaps(t.path('q.qcow2'))
        expect_eq(sorted(bv), ['b0', 'coarse', 'fine', 'late', 'off'], what + ': bitmap names')
        expect_eq(bv, bq, what + ': flags, granularity and bits as qemu-img\'s')
        expect(bv['b0'][2], what + ': b0 has bits set')
        expect_eq([e['name'] for _, e in directory(t.path('v.qcow2'))],
                  [e['name'] for _, e in directory(t.path('q.qcow2'))], what + ': directory order')
        info_both(t, 'v.qcow2', what)
        check_both(t, 'v.qcow2', what)
        expect_rc(t.qemu_img('compare', 'img.qcow2', 'v.qcow2'), 0, what + ': content')
    # what cannot be done: the same message and exit code as qemu-img
    with open(t.path('plain.raw'), 'wb') as f:
        f.truncate(16 * MiB)
    shutil.copy(t.path('img.qcow2'), t.path('inuse.qcow2'))
    ents = directory(t.path('inuse.qcow2'))
    for off, e in ents:
        if e['name'] in ('fine', 'off'):
            with open(t.path('inuse.qcow2'), 'r+b') as f:
                f.seek(off + 12)
                f.write(struct.pack('>I', e['flags'] | IN_USE))
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'has.qcow2', '16M'), 0)
    expect_rc(t.qemu_img('bitmap', '--add', 'has.qcow2', 'coarse'), 0)
    cases = [
        (['-O', 'raw', 'img.qcow2', 'x.raw'], 'x.raw'),
        (['-O', 'qcow2', '-o', 'compat=0.10', 'img.qcow2', 'x.qcow2'], 'x.qcow2'),
        (['-f', 'raw', '-O', 'qcow2', 'plain.raw', 'x.qcow2'], 'x.qcow2'),
        (['-O', 'qcow2', 'img.qcow2', 'img.qcow2', 'x.qcow2'], 'x.qcow2'),
        (['-O', 'qcow2', 'inuse.qcow2', 'x.qcow2'], 'x.qcow2'),
        (['-n', '-O', 'qcow2', 'img.qcow2', 'has.qcow2'], None),
    ]
    for args, out in cases:
        if out is None:
            # qemu-img adds bitmaps (last to first) until one clashes;
            # vdk checks every name first and changes nothing
            shutil.copy(t.path('has.qcow2'), t.path('has-q.qcow2'))
            shutil.copy(t.path('has.qcow2'), t.path('has-v.qcow2'))
            rq = t.qemu_img('convert', '--bitmaps', *args[:-1], 'has-q.qcow2')
            rv = t.vdk('convert', '--bitmaps', *args[:-1], 'has-v.qcow2')
            expect_eq(directory(t.path('has-v.qcow2')), directory(t.path('has.qcow2')), 'clash: target unchanged')
        else:
            rq = t.qemu_img('convert', '--bitmaps', *args)
            if os.path.exists(t.path(out)):
                os.unlink(t.path(out))
            rv = t.vdk('convert', '--bitmaps', *args)
        what = 'convert --bitmaps ' + ' '.join(args)
        expect_eq(rv.rc, rq.rc, what + ': exit code as qemu-img\'s', rv)
        expect_eq(rv.err.replace('vdk: ', '').replace('vdk bitmap', 'qemu-img bitmap'),
                  rq.err.replace('qemu-img: ', ''), what + ': message as qemu-img\'s', rv)
        expect(rv.rc == 0 or not out or not os.path.exists(t.path(out)), what + ': no target left', rv)
    rq = t.qemu_img('convert', '--skip-broken-bitmaps', '-O', 'qcow2', 'img.qcow2', 'x.qcow2')
    rv = t.vdk('convert', '--skip-broken-bitmaps', '-O', 'qcow2', 'img.qcow2', 'x.qcow2')
    expect_eq((rv.rc, rv.err.replace('vdk: ', '')), (rq.rc, rq.err.replace('qemu-img: ', '')),
              '--skip-broken-bitmaps alone', rv)
    # --skip-broken-bitmaps: the consistent ones are copied, with warnings
    for f in ('v.qcow2', 'q.qcow2'):
        if os.path.exists(t.path(f)):
            os.unlink(t.path(f))
    rq = t.qemu_img('convert', '--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', 'inuse.qcow2', 'q.qcow2')
    rv = t.vdk('convert', '--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', 'inuse.qcow2', 'v.qcow2')
    expect_eq((rv.rc, rv.err.replace('vdk: ', '')), (rq.rc, rq.err.replace('qemu-img: ', '')),
              '--skip-broken-bitmaps: exit code and warnings as qemu-img\'s', rv)
    bv = read_bitmaps(t.path('v.qcow2'))
    expect_eq(sorted(bv), ['b0', 'coarse', 'late'], '--skip-broken-bitmaps: the consistent ones copied')
    expect_eq(bv, read_bitmaps(t.path('q.qcow2')), '--skip-broken-bitmaps: as qemu-img\'s')
    check_both(t, 'v.qcow2', '--skip-broken-bitmaps')


suite.add('bitmap/qemu-made-listed', t_qemu_listed)
suite.add('bitmap/vdk-made-used-by-qemu', t_vdk_made)
for label, opts in (('64k', ''), ('512', 'cluster_size=512'), ('2M', 'cluster_size=2M'),
                    ('extl2', 'extended_l2=on'), ('lazy', 'lazy_refcounts=on'), ('refcount1', 'refcount_bits=1')):
    suite.add('bitmap/writes-tracked/' + label, t_writes_tracked, opts)
suite.add('bitmap/actions-as-qemu-img', t_actions)
suite.add('bitmap/measure', t_measure)
suite.add('bitmap/resize-snapshot-compact-amend', t_resize_and_refusals)
suite.add('bitmap/killed-at-every-write', t_killed)
suite.add('bitmap/hostile-directories', t_hostile)
suite.add('bitmap/unusable-kept', t_unusable_kept)
suite.add('bitmap/convert-bitmaps', t_convert_bitmaps)

if __name__ == '__main__':
    main(suite)
