#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk convert raw -> raw copy offload: reflink (FICLONE) by default where
the filesystem shares extents (an XFS loop mount with reflink=1 here),
copy_file_range per allocated extent with -C, and the fallback to the
normal pipeline (--no-copy-offload; a target on another filesystem, where
the kernel answers EXDEV; O_DIRECT).  Every case checks the bytes, the
holes and what `--stats` says was used; durability is checked with strace
(one fdatasync at the end unless -t unsafe)."""

import contextlib
import json
import os
import shutil
import subprocess
import tempfile

from vdktest import (KiB, MiB, Skip, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main,
                     ranges_cover, zero_ranges)

suite = Suite('convert-offload')
SIZE = 64 * MiB


def make_source(t, name='src.img', size=SIZE, tail=0):
    """Scattered data, holes between, an allocated zero run, and an
    optional unaligned tail (a file length that is not whole sectors)."""
    t.sparse(name, size)
    cmds = [(0x11, 0, MiB), (0x22, 5 * MiB, 4 * KiB), (0x33, 20 * MiB, 3 * MiB), (0, 30 * MiB, MiB),
            (0x44, size - 64 * KiB, 64 * KiB)]
    t.qemu_io(name, *['write -P 0x%x %d %d' % c for c in cmds if c[1] + c[2] <= size])
    if tail:
        with open(t.path(name), 'ab') as f:
            f.write(b'\x5a' * tail)
    return name


def stats_of(res):
    lines = [l for l in res.out.splitlines() if l.startswith('{')]
    expect(lines, 'no --stats line', res)
    o = json.loads(lines[-1])
    expect_eq(o.get('type'), 'stats', 'stats line type', res)
    return o


def convert(t, *args, ok=True):
    res = t.vdk('convert', '--stats', *args)
    if ok:
        expect_rc(res, 0, 'vdk convert')
    return res


def same_bytes(t, src, dst, dst_size=None):
    a, b = t.content(src), t.content(dst)
    want = a + bytes((dst_size or (len(a) + 511) // 512 * 512) - len(a))
    expect(b == want, '%s does not hold the bytes of %s' % (dst, src))


def holes_kept(t, src, dst):
    src_holes = zero_ranges(t.qemu_map(src))
    dst_holes = zero_ranges(t.qemu_map(dst))
    expect(ranges_cover(dst_holes, src_holes), 'a hole of the source is allocated in the target\n'
           'source holes: %r\ntarget holes: %r' % (src_holes, dst_holes))
    expect(t.blocks_bytes(dst) <= t.blocks_bytes(src) + 64 * KiB,
           'target not sparse: %d bytes allocated, source %d' % (t.blocks_bytes(dst), t.blocks_bytes(src)))


def t_copy_range(t):
    make_source(t)
    o = stats_of(convert(t, '-C', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img'))
    expect(o['copy_offload'] in ('copy_file_range', 'reflink'), '-C on one filesystem did not offload: %r' % o)
    same_bytes(t, 'src.img', 'dst.img')
    holes_kept(t, 'src.img', 'dst.img')


def t_copy_range_concat_unaligned(t):
    """Two sources, the first with a length that is not whole sectors: the
    second lands at the first's rounded-up size, the gap reads as zeroes."""
    make_source(t, 'a.img', 8 * MiB, tail=1000)
    make_source(t, 'b.img', 16 * MiB)
    o = stats_of(convert(t, '-C', '-f', 'raw', '-O', 'raw', 'a.img', 'b.img', 'dst.img'))
    expect(o['copy_offload'] in ('copy_file_range', 'reflink'), '-C did not offload: %r' % o)
    a, b = t.content('a.img'), t.content('b.img')
    pad = (len(a) + 511) // 512 * 512 - len(a)
    expect(t.content('dst.img') == a + bytes(pad) + b, 'concatenated target bytes differ')
    expect_eq(o['bytes'], len(a) + pad + len(b), 'stats bytes')


def t_copy_range_n_target_is_zero(t):
    make_source(t)
    t.sparse('dst.img', SIZE + 8 * MiB)
    o = stats_of(convert(t, '-C', '-n', '--target-is-zero', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img'))
    expect(o['copy_offload'] in ('copy_file_range', 'reflink'), '-C -n --target-is-zero did not offload: %r' % o)
    expect_eq(t.size('dst.img'), SIZE + 8 * MiB, 'existing target size')
    same_bytes(t, 'src.img', 'dst.img', SIZE + 8 * MiB)


def t_n_not_zero_no_offload(t):
    """-n into a target with old data: holes must be written, the offload
    (which only copies data) must not be used."""
    make_source(t)
    t.write_bytes('dst.img', b'\xee' * SIZE)
    o = stats_of(convert(t, '-C', '-n', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img'))
    expect_eq(o['copy_offload'], 'none', 'offload into a target that does not read as zeroes')
    same_bytes(t, 'src.img', 'dst.img')


def t_forced_off(t):
    make_source(t)
    o = stats_of(convert(t, '--no-copy-offload', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img'))
    expect_eq(o['copy_offload'], 'none', '--no-copy-offload')
    same_bytes(t, 'src.img', 'dst.img')
    holes_kept(t, 'src.img', 'dst.img')
    # the normal path finds the allocated zero run and leaves it a hole
    expect(ranges_cover(zero_ranges(t.qemu_map('dst.img')), [(30 * MiB, 31 * MiB)]),
           'the allocated zero run became data without offload')


def t_default_keeps_zero_detection(t):
    """Without -C no copy_file_range (it cannot skip zero runs inside
    allocated extents); a reflink (shared, no new space) is allowed."""
    make_source(t)
    o = stats_of(convert(t, '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img'))
    expect(o['copy_offload'] in ('none', 'reflink'), 'default convert used %r' % o['copy_offload'])
    same_bytes(t, 'src.img', 'dst.img')
    if o['copy_offload'] == 'none':
        expect(ranges_cover(zero_ranges(t.qemu_map('dst.img')), [(30 * MiB, 31 * MiB)]),
               'the allocated zero run became data')


def t_cross_fs_fallback(t):
    """A target on tmpfs, the source on the test directory's filesystem:
    the kernel refuses copy_file_range across them (EXDEV) and the
    normal pipeline does the copy."""
    shm = '/dev/shm'
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(t.dir).st_dev:
        raise Skip('no second filesystem at /dev/shm')
    make_source(t)
    d = tempfile.mkdtemp(prefix='vdk-offload-', dir=shm)
    try:
        dst = os.path.join(d, 'dst.img')
        o = stats_of(convert(t, '-C', '-f', 'raw', '-O', 'raw', 'src.img', dst))
        expect_eq(o['copy_offload'], 'none', 'copy offload across filesystems')
        with open(dst, 'rb') as f:
            expect(f.read() == t.content('src.img'), 'fallback target bytes differ')
        expect(os.stat(dst).st_blocks * 512 <= t.blocks_bytes('src.img') + 64 * KiB, 'fallback target not sparse')
    finally:
        shutil.rmtree(d, ignore_errors=True)


def t_odirect(t):
    """-t none / -T none: whatever the kernel does with O_DIRECT files, the
    bytes must be right."""
    make_source(t, tail=1000)
    for extra in (('-t', 'none'), ('-T', 'none')):
        if os.path.exists(t.path('dst.img')):
            os.unlink(t.path('dst.img'))
        convert(t, '-C', *extra, '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
        same_bytes(t, 'src.img', 'dst.img')


def t_refusals(t):
    make_source(t, size=4 * MiB)
    res = convert(t, '-C', '-S', '4k', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img', ok=False)
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect('-S' in res.err, 'the -C -S refusal does not name -S', res)
    res = convert(t, '-C', '-c', '-f', 'raw', '-O', 'qcow2', 'src.img', 'dst.img', ok=False)
    expect_rc(res, 1)
    expect('-c' in res.err, 'the -C -c refusal does not name -c', res)
    expect(not os.path.exists(t.path('dst.img')), 'a refused convert left dst.img')


def syncs(t, *args):
    log = t.path('strace.log')
    res = t.run(['strace', '-f', '-qq', '-e', 'trace=fsync,fdatasync,copy_file_range', '-o', log, *args])
    expect_rc(res, 0, 'strace vdk convert')
    with open(log) as f:
        text = f.read()
    return text, res


def t_durability(t):
    """The offloaded copy is flushed once at the end, after the last
    copy_file_range; -t unsafe skips it."""
    if not shutil.which('strace'):
        raise Skip('strace not installed')
    from vdktest import VDK
    make_source(t)
    text, res = syncs(t, VDK, 'convert', '--stats', '-C', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    o = stats_of(res)
    lines = text.splitlines()
    cfr = [i for i, l in enumerate(lines) if 'copy_file_range(' in l and '= -1' not in l]
    fds = [i for i, l in enumerate(lines) if 'fdatasync(' in l or 'fsync(' in l]
    if o['copy_offload'] == 'copy_file_range':
        expect(cfr, 'no successful copy_file_range in the trace', res)
        expect(fds and fds[-1] > cfr[-1], 'no fdatasync after the last copy_file_range:\n' + text[-2000:])
    else:
        expect(fds, 'no fdatasync at the end:\n' + text[-2000:])
    os.unlink(t.path('dst.img'))
    text, res = syncs(t, VDK, 'convert', '-C', '-t', 'unsafe', '-f', 'raw', '-O', 'raw', 'src.img', 'dst.img')
    lines = text.splitlines()
    cfr = [i for i, l in enumerate(lines) if 'copy_file_range(' in l and '= -1' not in l]
    expect(cfr, 'no successful copy_file_range with -t unsafe', res)
    late = [l for l in lines[cfr[-1]:] if 'fdatasync(' in l or 'fsync(' in l]
    expect(not late, '-t unsafe still synced after the copy:\n' + text[-2000:])
    same_bytes(t, 'src.img', 'dst.img')


@contextlib.contextmanager
def xfs_reflink_mount(t):
    if os.geteuid() != 0:
        raise Skip('mounting a loop filesystem needs root')
    if not shutil.which('mkfs.xfs'):
        raise Skip('mkfs.xfs not installed (xfsprogs)')
    img = t.path('xfs.img')
    mnt = t.path('mnt')
    os.mkdir(mnt)
    with open(img, 'wb') as f:
        f.truncate(512 * MiB)
    r = subprocess.run(['mkfs.xfs', '-q', '-m', 'reflink=1', img], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    expect(r.returncode == 0, 'mkfs.xfs failed: %s' % r.stdout)
    r = subprocess.run(['mount', '-o', 'loop', img, mnt], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise Skip('cannot mount a loop device here: %s' % r.stdout.decode(errors='replace').strip())
    try:
        yield mnt
    finally:
        subprocess.run(['umount', mnt])


def used_kib(mnt):
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024


def t_reflink(t):
    with xfs_reflink_mount(t) as mnt:
        src = os.path.join(mnt, 'src.img')
        with open(src, 'wb') as f:
            f.truncate(256 * MiB)
            f.seek(0)
            f.write(os.urandom(8 * MiB))
            f.seek(100 * MiB)
            f.write(os.urandom(8 * MiB))
            f.seek(256 * MiB - 4096)
            f.write(os.urandom(4096))
        os.sync()
        before = used_kib(mnt)
        o = stats_of(convert(t, '-f', 'raw', '-O', 'raw', src, os.path.join(mnt, 'dst.img')))
        expect_eq(o['copy_offload'], 'reflink', 'default convert on XFS with reflink')
        os.sync()
        grew = used_kib(mnt) - before
        expect(grew < 4 * 1024, 'the reflinked copy took %d KiB of new space (the data is 16 MiB)' % grew)
        with open(src, 'rb') as a, open(os.path.join(mnt, 'dst.img'), 'rb') as b:
            expect(a.read() == b.read(), 'reflinked target bytes differ')
        # a target larger than the source (-n) is not cloned: FICLONE
        # would replace it whole
        big = os.path.join(mnt, 'big.img')
        with open(big, 'wb') as f:
            f.truncate(300 * MiB)
        o = stats_of(convert(t, '-n', '--target-is-zero', '-f', 'raw', '-O', 'raw', src, big))
        expect_eq(o['copy_offload'], 'none', 'FICLONE into a larger -n target')
        expect_eq(os.stat(big).st_size, 300 * MiB, '-n target size')
        # -S 0 asks for a fully allocated target: no clone (holes would stay)
        full = os.path.join(mnt, 'full.img')
        o = stats_of(convert(t, '-S', '0', '-f', 'raw', '-O', 'raw', src, full))
        expect_eq(o['copy_offload'], 'none', '-S 0')
        expect(os.stat(full).st_blocks * 512 >= 256 * MiB, '-S 0 target not fully allocated')
        # a preallocated target keeps its blocks: cloning would give them back
        small = os.path.join(mnt, 'small.img')
        with open(small, 'wb') as f:
            f.truncate(32 * MiB)
            f.write(os.urandom(MiB))
        pre = os.path.join(mnt, 'pre.img')
        o = stats_of(convert(t, '-o', 'preallocation=falloc', '-f', 'raw', '-O', 'raw', small, pre))
        expect_eq(o['copy_offload'], 'none', 'preallocation=falloc')
        expect(os.stat(pre).st_blocks * 512 >= 32 * MiB, 'preallocated target lost its blocks to a clone')
        with open(small, 'rb') as a, open(pre, 'rb') as b:
            expect(a.read() == b.read(), 'preallocated target bytes differ')
        os.unlink(pre)
        os.unlink(small)
        os.unlink(big)
        os.unlink(full)
        # unaligned source length: cloned, then the target grows to whole sectors
        odd = os.path.join(mnt, 'odd.img')
        with open(odd, 'wb') as f:
            f.write(os.urandom(3 * MiB + 1000))
        o = stats_of(convert(t, '-f', 'raw', '-O', 'raw', odd, os.path.join(mnt, 'odd.out')))
        expect_eq(o['copy_offload'], 'reflink', 'unaligned source on XFS')
        with open(odd, 'rb') as a, open(os.path.join(mnt, 'odd.out'), 'rb') as b:
            da, db = a.read(), b.read()
        expect(db == da + bytes(len(db) - len(da)) and len(db) == 3 * MiB + 1024, 'unaligned reflink target')


suite.add('offload-copy-range', t_copy_range)
suite.add('offload-copy-range-concat-unaligned', t_copy_range_concat_unaligned)
suite.add('offload-copy-range-n-target-is-zero', t_copy_range_n_target_is_zero)
suite.add('offload-n-nonzero-target-not-offloaded', t_n_not_zero_no_offload)
suite.add('offload-forced-off', t_forced_off)
suite.add('offload-default-keeps-zero-detection', t_default_keeps_zero_detection)
suite.add('offload-cross-fs-fallback', t_cross_fs_fallback)
suite.add('offload-odirect', t_odirect, cache='none')
suite.add('offload-refusals', t_refusals)
suite.add('offload-durability', t_durability)
suite.add('offload-reflink-xfs', t_reflink)

if __name__ == '__main__':
    main(suite)
