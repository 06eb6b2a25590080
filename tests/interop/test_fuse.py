#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk fuse: an image shown as one regular file (libfuse3).

For raw, qcow2, vdi and vmdk: mount over a regular file, write with dd,
read back with cmp, punch holes and zero ranges with fallocate, find data
and holes with lseek(SEEK_DATA/SEEK_HOLE), unmount (fusermount3 -u, or
SIGTERM / SIGINT to vdk), then qemu-img check and qemu-img compare against
a raw mirror.  A read-only export refuses writes.  Needs /dev/fuse (this
machine and CI have it)."""

import os
import shutil
import signal
import subprocess
import time

from vdktest import QEMU_IO, MiB, VDK, Suite, expect, expect_eq, expect_rc, main

suite = Suite('fuse')

SIZE = 64 * MiB


class Mount:
    def __init__(self, t, img, fmt, extra=()):
        self.t = t
        self.mnt = t.path('mnt')
        open(self.mnt, 'w').close()
        self.p = subprocess.Popen([VDK, 'fuse', '-f', fmt, *extra, img, self.mnt], cwd=t.dir,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise AssertionError('vdk fuse exited: %s' % self.p.stderr.read().decode())
            if self.mounted():
                return
            time.sleep(0.05)
        raise AssertionError('vdk fuse did not mount')

    def mounted(self):
        with open('/proc/mounts') as f:
            return any(l.split()[1] == self.mnt for l in f)

    def stop(self, how='fusermount'):
        if how == 'fusermount':
            r = subprocess.run(['fusermount3', '-u', self.mnt], capture_output=True, text=True)
            expect(r.returncode == 0, 'fusermount3 -u: %s' % r.stderr)
        else:
            self.p.send_signal(how)
        try:
            out, err = self.p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise AssertionError('vdk fuse did not stop')
        expect(not self.mounted(), 'unmounted')
        return self.p.returncode, err.decode()


def dd(t, *args):
    r = subprocess.run(['dd', 'status=none', *args], cwd=t.dir, capture_output=True, text=True)
    expect(r.returncode == 0, 'dd %s: %s' % (' '.join(args), r.stderr))


def t_rw(t, fmt, stop):
    expect_rc(t.vdk('create', '-q', '-f', fmt, 'img', str(SIZE)), 0, 'create')
    t.sparse('mirror.raw', SIZE)
    with open(t.path('pat'), 'wb') as f:
        f.write(os.urandom(3 * MiB + 4097))
    m = Mount(t, 'img', fmt)
    expect_eq(os.stat(m.mnt).st_size, SIZE, 'the file has the disk size')
    for target in (m.mnt, t.path('mirror.raw')):
        dd(t, 'if=pat', 'of=' + target, 'bs=4096', 'seek=1283', 'conv=notrunc,fsync')
        dd(t, 'if=pat', 'of=' + target, 'bs=1M', 'seek=40', 'count=2', 'conv=notrunc')
    r = subprocess.run(['cmp', m.mnt, t.path('mirror.raw')], capture_output=True, text=True)
    expect(r.returncode == 0, 'cmp through the mount: %s' % r.stdout)
    # punch a hole and zero a range: they read as zeroes afterwards
    for target in (m.mnt, t.path('mirror.raw')):
        r = subprocess.run(['fallocate', '-p', '-o', str(41 * MiB), '-l', str(MiB), target], capture_output=True,
                           text=True)
        expect(r.returncode == 0, 'fallocate -p %s: %s' % (target, r.stderr))
        r = subprocess.run(['fallocate', '-z', '-o', str(5 * MiB + 100), '-l', '5000', target], capture_output=True,
                           text=True)
        expect(r.returncode == 0, 'fallocate -z %s: %s' % (target, r.stderr))
    r = subprocess.run(['cmp', m.mnt, t.path('mirror.raw')], capture_output=True, text=True)
    expect(r.returncode == 0, 'cmp after fallocate: %s' % r.stdout)
    # SEEK_DATA / SEEK_HOLE from block status
    fd = os.open(m.mnt, os.O_RDONLY)
    try:
        first = os.lseek(fd, 0, os.SEEK_DATA)
        expect(first <= 1283 * 4096, 'SEEK_DATA finds the first data (%d)' % first)
        expect(first >= 4 * MiB if fmt != 'raw' else True, 'nothing before the first write is data (%d)' % first)
        hole = os.lseek(fd, 40 * MiB, os.SEEK_HOLE)
        expect(40 * MiB < hole <= 42 * MiB, 'SEEK_HOLE after the second write (%d)' % hole)
        try:
            os.lseek(fd, SIZE - 4096, os.SEEK_DATA)
            nodata = False
        except OSError:
            nodata = True
        expect(nodata, 'no data at the end: ENXIO')
    finally:
        os.close(fd)
    # writing past the end fails
    r = subprocess.run(['dd', 'status=none', 'if=pat', 'of=' + m.mnt, 'bs=1M', 'seek=64', 'count=1',
                        'conv=notrunc'], capture_output=True, text=True)
    expect(r.returncode != 0, 'a write past the end fails')
    rc, err = m.stop(stop)
    expect(rc == 0 and err == '', 'vdk fuse exits cleanly (%s): %r' % (stop, err))
    if fmt != 'raw':
        r = t.qemu_img('check', '-f', fmt, 'img')
        expect(r.rc == 0, 'qemu-img check', r)
    r = t.qemu_img('compare', '-f', fmt, '-F', 'raw', 'img', 'mirror.raw')
    expect(r.rc == 0, 'qemu-img compare with the mirror', r)


def t_read_only(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'img', str(SIZE)), 0)
    t.qemu_io('img', 'write -P 0x5a 0 1M', fmt='qcow2')
    before = t.content('img')
    m = Mount(t, 'img', 'qcow2', ['-r'])
    expect_eq(os.stat(m.mnt).st_mode & 0o777, 0o444, 'read-only mode bits')
    with open(m.mnt, 'rb') as f:
        expect(f.read(MiB) == b'\x5a' * MiB, 'reads the data')
    try:
        os.open(m.mnt, os.O_WRONLY)
        opened = True
    except OSError:
        opened = False
    expect(not opened, 'opening for writing is refused')
    r = subprocess.run(['fallocate', '-p', '-o', '0', '-l', '4096', m.mnt], capture_output=True, text=True)
    expect(r.returncode != 0, 'fallocate refused')
    rc, err = m.stop(signal.SIGINT)
    expect_eq(rc, 0, 'exit status after SIGINT')
    expect(t.content('img') == before, 'the image is unchanged')


def t_parallel(t, fmt):
    """Several writers and readers at once (the export serves requests on
    several threads, one queue each): every region reads back as written,
    and the image is consistent."""
    expect_rc(t.vdk('create', '-q', '-f', fmt, 'img', str(SIZE)), 0, 'create')
    t.sparse('mirror.raw', SIZE)
    pats = []
    for i in range(6):
        with open(t.path('pat%d' % i), 'wb') as f:
            f.write(os.urandom(2 * MiB + 512 * i))
        pats.append('pat%d' % i)
    m = Mount(t, 'img', fmt)
    try:
        procs = []
        for i, pat in enumerate(pats):
            # interleaved 64 KiB pieces: neighbours share clusters and L2 tables
            procs.append(subprocess.Popen(['dd', 'status=none', 'if=' + pat, 'of=' + m.mnt, 'bs=64k',
                                           'seek=%d' % (i * 40 + 3), 'conv=notrunc'], cwd=t.dir))
            procs.append(subprocess.Popen(['dd', 'status=none', 'if=' + m.mnt, 'of=/dev/null', 'bs=256k'],
                                          cwd=t.dir))
        for p in procs:
            expect_eq(p.wait(60), 0, 'dd exit status')
        for i, pat in enumerate(pats):
            dd(t, 'if=' + pat, 'of=' + t.path('mirror.raw'), 'bs=64k', 'seek=%d' % (i * 40 + 3), 'conv=notrunc')
        r = subprocess.run(['cmp', m.mnt, t.path('mirror.raw')], capture_output=True, text=True)
        expect(r.returncode == 0, 'cmp after parallel writes: %s' % r.stdout)
    finally:
        rc, err = m.stop()
    expect(rc == 0 and err == '', 'vdk fuse exits cleanly: %r' % err)
    if fmt != 'raw':
        expect_rc(t.qemu_img('check', '-f', fmt, 'img'), 0, 'qemu-img check')
    r = t.qemu_img('compare', '-f', fmt, '-F', 'raw', 'img', 'mirror.raw')
    expect(r.rc == 0, 'qemu-img compare with the mirror', r)


def t_term_while_writing(t, fmt):
    """SIGTERM while a writer is busy: vdk fuse unmounts, flushes and exits
    0; the image is consistent, and everything the writer had fsync'ed
    before is there."""
    expect_rc(t.vdk('create', '-q', '-f', fmt, 'img', str(SIZE)), 0, 'create')
    with open(t.path('pat'), 'wb') as f:
        f.write(os.urandom(4 * MiB))
    m = Mount(t, 'img', fmt)
    dd(t, 'if=pat', 'of=' + m.mnt, 'bs=1M', 'conv=notrunc,fsync')
    # 4 KiB writes from 5 MiB to the end: seconds of work
    w = subprocess.Popen(['dd', 'status=none', 'if=/dev/urandom', 'of=' + m.mnt, 'bs=4k', 'seek=1280',
                          'conv=notrunc'], cwd=t.dir, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    expect(w.poll() is None, 'the writer is still writing when SIGTERM comes')
    rc, err = m.stop(signal.SIGTERM)
    w.wait(30)
    expect(rc == 0 and err == '', 'vdk fuse exits cleanly after SIGTERM: %r' % err)
    if fmt != 'raw':
        expect_rc(t.qemu_img('check', '-f', fmt, 'img'), 0, 'qemu-img check after SIGTERM')
    r = subprocess.run([VDK, 'dd', '-f', fmt, 'if=img', 'of=head.raw', 'bs=1M', 'count=4'], cwd=t.dir,
                       capture_output=True, text=True)
    expect(r.returncode == 0, 'vdk dd: %s' % r.stderr)
    expect(t.content('head.raw') == t.content('pat'), 'the fsync\'ed data survived')


def t_errors(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'img', '1M'), 0)
    os.mkdir(t.path('dir'))
    r = t.vdk('fuse', 'img', 'dir')
    expect(r.rc == 1 and 'regular file' in r.err and r.err.count('\n') == 1, 'a directory mountpoint', r)
    r = t.vdk('fuse', 'img', 'nosuch')
    expect(r.rc == 1 and r.err.startswith('vdk: nosuch: '), 'a missing mountpoint', r)
    # an image another process writes: refused as by every writer; -r -U peeks
    open(t.path('mnt'), 'w').close()
    q = subprocess.Popen([QEMU_IO, '-f', 'qcow2', '-c', 'sleep 20000', 'img'], cwd=t.dir,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ino = os.stat(t.path('img')).st_ino
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                ':%d ' % ino in l for l in open('/proc/locks')):
            time.sleep(0.05)
        r = t.vdk('fuse', '-f', 'qcow2', 'img', 'mnt')
        expect(r.rc == 1 and r.err.startswith('vdk: img: ') and 'image is in use by another process' in r.err,
               'an image in use', r)
        m = Mount(t, 'img', 'qcow2', ['-r', '-U'])
        with open(m.mnt, 'rb') as f:
            expect(f.read(4096) == bytes(4096), 'reads through -r -U')
        rc, err = m.stop()
        expect_eq(rc, 0, 'exit status')
    finally:
        q.kill()
        q.wait()
    r = t.vdk('fuse', '--help')
    expect(r.rc == 0 and 'usage: vdk fuse' in r.out, '--help', r)


for fmt in ('raw', 'qcow2', 'vdi', 'vmdk'):
    suite.add('rw/%s' % fmt, t_rw, fmt, 'fusermount')
suite.add('rw/qcow2-sigterm', t_rw, 'qcow2', signal.SIGTERM)
for fmt in ('qcow2', 'vdi', 'vmdk', 'raw'):
    suite.add('parallel/%s' % fmt, t_parallel, fmt)
for fmt in ('qcow2', 'vdi'):
    suite.add('sigterm-while-writing/%s' % fmt, t_term_while_writing, fmt)
suite.add('read-only', t_read_only)
suite.add('errors', t_errors)

if __name__ == '__main__':
    main(suite)
