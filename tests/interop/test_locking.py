#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Image locking against QEMU's: the same OFD byte locks, so a vdk writer
and a qemu writer see each other.

A holder keeps the image open (qemu-io with a long `sleep`, or vdk io
reading commands from a pipe that stays open); meanwhile the other tool
must refuse what QEMU refuses (a second writer; a reader without -U while
someone writes) and allow the rest (readers side by side; -U; a writer
after the holder is gone).  The lock bytes vdk takes are the ones qemu
takes (/proc/locks).  Engines do not matter here (locks are on the file)."""

import os
import shutil
import subprocess
import time

from vdktest import QEMU_IO, VDK, Suite, expect, expect_eq, expect_rc, main

suite = Suite('locking')

QEMU_NBD = os.environ.get('QEMU_NBD') or shutil.which('qemu-nbd')

MSG = 'image is in use by another process'


class Holder:
    """A process that holds an image open until stopped."""

    def __init__(self, t, tool, img, read_only=False, fmt='qcow2'):
        self.t = t
        if tool == 'qemu':
            args = [QEMU_IO, '-f', fmt] + (['-r'] if read_only else []) + ['-c', 'sleep 20000', img]
            self.p = subprocess.Popen(args, cwd=t.dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        else:
            args = [VDK, 'io', '-f', fmt] + (['-r'] if read_only else []) + [img]
            self.p = subprocess.Popen(args, cwd=t.dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        self.ino = os.stat(t.path(img)).st_ino
        deadline = time.monotonic() + 10
        while not self.locks() and time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise AssertionError('the holder exited: %s' % self.p.stderr.read().decode())
            time.sleep(0.05)
        expect(self.locks(), '%s holds locks on %s' % (tool, img))
        # the bytes are locked one at a time: wait until the set is stable
        prev = None
        while self.locks() != prev and time.monotonic() < deadline:
            prev = self.locks()
            time.sleep(0.05)

    def locks(self):
        """Byte ranges locked on the image file (from /proc/locks)."""
        return Holder.locks_of_ino(self.ino)

    @staticmethod
    def locks_of(path):
        return Holder.locks_of_ino(os.stat(path).st_ino)

    @staticmethod
    def locks_of_ino(ino):
        out = []
        with open('/proc/locks') as f:
            for line in f:
                p = line.split()
                if 'OFDLCK' in p and p[-3].endswith(':%d' % ino):
                    out.append((int(p[-2]), int(p[-1])))
        return sorted(out)

    def stop(self):
        if self.p.stdin:
            self.p.stdin.close()
        else:
            self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def lock_bytes(ranges):
    return sorted(b for a, z in ranges for b in range(a, z + 1))


def t_same_bytes(t, fmt):
    """vdk takes exactly the bytes qemu takes, as writer and as reader
    (raw writers aside: qemu-io shares writes to a raw image, vdk does not,
    like a guest device)."""
    expect_rc(t.qemu_img('create', '-q', '-f', fmt, 'a.img', '1M'), 0)
    for ro in (False, True):
        h = Holder(t, 'qemu', 'a.img', ro, fmt=fmt)
        q = lock_bytes(h.locks())
        h.stop()
        h = Holder(t, 'vdk', 'a.img', ro, fmt=fmt)
        v = lock_bytes(h.locks())
        h.stop()
        if fmt == 'raw' and not ro:
            expect_eq(q, [100, 101], 'qemu-io as a raw writer')
            expect_eq(v, [100, 101, 103, 201, 203], 'vdk as a raw writer')
        else:
            expect_eq(v, q, 'lock bytes of a %s' % ('reader' if ro else 'writer'))
        if ro:
            expect_eq(v, [100] if fmt == 'raw' else [100, 201, 203], 'a reader\'s lock bytes')


def t_same_bytes_extents(t, sub):
    """Multi-file vmdk: the descriptor and the extent files get the bytes
    qemu-io gives them (a flat extent holds only data: writes shared,
    resizes not; a sparse extent has metadata: neither)."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'vmdk', '-o', 'subformat=' + sub, 'm.vmdk', '1M'), 0)
    ext = [f for f in sorted(os.listdir(t.dir)) if f.startswith('m-')][0]
    for ro in (False, True):
        got = {}
        for tool in ('qemu', 'vdk'):
            h = Holder(t, tool, 'm.vmdk', ro, fmt='vmdk')
            deadline = time.monotonic() + 10  # the extents are locked after the descriptor
            while not Holder.locks_of(t.path(ext)) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.1)
            got[tool] = (lock_bytes(h.locks()), lock_bytes(Holder.locks_of(t.path(ext))))
            h.stop()
        expect_eq(got['vdk'], got['qemu'], '%s %s: descriptor and extent bytes' % (sub, 'reader' if ro else 'writer'))
        flat = 'Flat' in sub
        want = ([100] if ro else [100, 101, 103]) + ([] if flat else [201]) + [203]
        expect_eq(got['vdk'][1], want, 'the extent\'s bytes')


def t_qemu_holds(t, fmt):
    """qemu-io writing: vdk refuses to write or to read without -U."""
    expect_rc(t.qemu_img('create', '-q', '-f', fmt, 'a.img', '1M'), 0)
    h = Holder(t, 'qemu', 'a.img', fmt=fmt)
    try:
        res = t.vdk('io', '-f', fmt, '-c', 'write 0 512', 'a.img')
        expect(res.rc == 1 and MSG in res.err and res.err.count('\n') == 1, 'vdk io (write) refused', res)
        expect(res.err.startswith('vdk: a.img: '), 'error names the file', res)
        if fmt != 'raw':
            # (qemu-io shares writes to a raw image: readers may open it)
            res = t.vdk('info', '-f', fmt, 'a.img')
            expect(res.rc == 1 and MSG in res.err and 'shared "write"' in res.err, 'vdk info refused', res)
            res = t.vdk('convert', '-f', fmt, '-O', 'raw', 'a.img', 'out.raw')
            expect(res.rc == 1 and MSG in res.err, 'vdk convert refused', res)
        for args in (['info', '-U'], ['map', '-U'], ['check', '-U'], ['convert', '-U', '-O', 'raw'],
                     ['compare', '-U'], ['io', '-r', '-U', '-c', 'read 0 512']):
            if args[0] == 'check' and fmt == 'raw':
                continue
            tail = ['a.img', 'out.raw'] if args[0] == 'convert' else ['a.img', 'a.img'] if args[0] == 'compare' \
                else ['a.img']
            res = t.vdk(args[0], '-f', fmt, *args[1:], *tail)
            expect_rc(res, 0, 'vdk %s with -U while qemu writes' % ' '.join(args))
        res = t.vdk('io', '-U', '-c', 'write 0 512', '-f', fmt, 'a.img')
        expect(res.rc == 1 and 'read-only' in res.err, '-U with a writable open refused', res)
    finally:
        h.stop()
    res = t.vdk('io', '-f', fmt, '-c', 'write 0 512', 'a.img')
    expect_rc(res, 0, 'vdk io writes once qemu has gone')


def t_vdk_holds(t):
    """vdk io writing: qemu-io and qemu-img refuse, -U reads, a second vdk
    writer is refused too."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'), 0)
    h = Holder(t, 'vdk', 'a.qcow2')
    try:
        res = t.qemu_io_raw('a.qcow2', ['read 0 512'], fmt='qcow2')
        expect(res.rc != 0 and 'Failed to get "write" lock' in res.out + res.err, 'qemu-io refused', res)
        res = t.qemu_img('info', 'a.qcow2')
        expect(res.rc != 0 and 'Failed to get shared "write" lock' in res.err, 'qemu-img info refused', res)
        expect_rc(t.qemu_img('info', '-U', 'a.qcow2'), 0, 'qemu-img info -U')
        res = t.vdk('io', '-c', 'write 0 512', 'a.qcow2')
        expect(res.rc == 1 and MSG in res.err, 'a second vdk writer refused', res)
        res = t.vdk('info', 'a.qcow2')
        expect(res.rc == 1 and MSG in res.err, 'vdk info refused', res)
        expect_rc(t.vdk('info', '-U', 'a.qcow2'), 0, 'vdk info -U')
        res = t.vdk('info', '--image-opts', 'driver=qcow2,file.filename=a.qcow2,file.locking=off')
        expect_rc(res, 0, 'file.locking=off')
    finally:
        h.stop()
    expect_rc(t.qemu_img('check', 'a.qcow2'), 0, 'qemu-img check once vdk has gone')


def t_readers(t):
    """Readers side by side (vdk and qemu), and a writer is refused while
    one of them reads (qemu's rule: readers do not share write)."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'), 0)
    for tool in ('qemu', 'vdk'):
        h = Holder(t, tool, 'a.qcow2', read_only=True)
        try:
            expect_rc(t.vdk('info', 'a.qcow2'), 0, 'vdk info while %s reads' % tool)
            res = t.qemu_io_raw('a.qcow2', ['read 0 512'], fmt='qcow2', extra=['-r'])
            expect_rc(res, 0, 'qemu-io -r while %s reads' % tool)
            res = t.vdk('io', '-c', 'write 0 512', 'a.qcow2')
            expect(res.rc == 1 and MSG in res.err, 'vdk writer refused while %s reads' % tool, res)
            res = t.qemu_io_raw('a.qcow2', ['write 0 512'], fmt='qcow2')
            expect(res.rc != 0 and 'lock' in res.out + res.err, 'qemu writer refused while %s reads' % tool, res)
        finally:
            h.stop()


def t_backing(t):
    """A backing file held by a qemu writer cannot be opened under an
    overlay (it is opened read-only, and someone writes it)."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'base.qcow2', '1M'), 0)
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'), 0)
    h = Holder(t, 'qemu', 'base.qcow2')
    try:
        res = t.vdk('info', 'top.qcow2')
        expect(res.rc == 1 and MSG in res.err and 'base.qcow2' in res.err, 'the backing file is in use', res)
    finally:
        h.stop()
    expect_rc(t.vdk('info', 'top.qcow2'), 0, 'fine once the writer has gone')


def t_replace(t):
    """create --force, convert and dd onto an image someone has open are
    refused (qemu-img refuses them too) and leave the open file in place;
    likewise an extent file of a multi-file vmdk."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'), 0)
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'b.qcow2', '1M'), 0)
    ino = os.stat(t.path('a.qcow2')).st_ino
    for ro in (False, True):
        h = Holder(t, 'qemu', 'a.qcow2', read_only=ro)
        try:
            for args in (['create', '-q', '-f', 'raw', '--force', 'a.qcow2', '1M'],
                         ['convert', '-O', 'raw', 'b.qcow2', 'a.qcow2'],
                         ['dd', '-O', 'raw', 'if=b.qcow2', 'of=a.qcow2']):
                res = t.vdk(*args)
                expect(res.rc == 1 and res.err.startswith('vdk: a.qcow2: ') and MSG in res.err
                       and '-U' not in res.err, 'vdk %s refused while qemu-io%s holds it' %
                       (args[0], ' -r' if ro else ''), res)
                expect_eq(os.stat(t.path('a.qcow2')).st_ino, ino, 'the open file is still there')
        finally:
            h.stop()
    expect_rc(t.qemu_img('check', 'a.qcow2'), 0, 'qemu-img check after the refusals')
    expect_rc(t.vdk('convert', '-O', 'raw', 'b.qcow2', 'a.qcow2'), 0, 'convert once qemu has gone')
    # qemu-img create refuses likewise while vdk writes
    h = Holder(t, 'vdk', 'b.qcow2')
    try:
        res = t.qemu_img('create', '-q', '-f', 'qcow2', 'b.qcow2', '1M')
        expect(res.rc != 0 and 'Failed to get "write" lock' in res.err, 'qemu-img create refused', res)
    finally:
        h.stop()
    # a vmdk extent file someone has open as raw: qemu-io shares writes and
    # resizes (qemu-io -f vmdk may write then, and so may vdk); qemu-nbd
    # does not share resizes (both refuse, "resize" lock).  Replacing it is
    # refused either way.
    expect_rc(t.vdk('create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentFlat', 'm.vmdk', '1M'), 0)
    h = Holder(t, 'qemu', 'm-f001.vmdk', fmt='raw')
    try:
        res = t.vdk('create', '-q', '-f', 'vmdk', '--force', '-o', 'subformat=twoGbMaxExtentFlat', 'm.vmdk', '1M')
        expect(res.rc == 1 and 'm-f001.vmdk' in res.err and MSG in res.err, 'an extent in use', res)
        expect_rc(t.qemu_io_raw('m.vmdk', ['write 0 512'], fmt='vmdk'), 0, 'qemu-io writes the vmdk')
        expect_rc(t.vdk('io', '-f', 'vmdk', '-c', 'write 0 512', 'm.vmdk'), 0, 'vdk io writes the vmdk')
    finally:
        h.stop()
    sock = t.path('nbd.sock')
    p = subprocess.Popen([QEMU_NBD, '-f', 'raw', '-k', sock, 'm-f001.vmdk'], cwd=t.dir, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        res = t.qemu_io_raw('m.vmdk', ['write 0 512'], fmt='vmdk')
        expect(res.rc != 0 and '"resize" lock' in res.out + res.err, 'qemu-io refused', res)
        res = t.vdk('io', '-f', 'vmdk', '-c', 'write 0 512', 'm.vmdk')
        expect(res.rc == 1 and 'm-f001.vmdk' in res.err and MSG in res.err and '"resize" lock' in res.err,
               'vdk io: an extent in use', res)
    finally:
        p.terminate()
        p.wait(10)


def t_locking_option(t):
    """--image-opts file.locking=on|off|auto; a bad value is one clear error."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'a.qcow2', '1M'), 0)
    h = Holder(t, 'qemu', 'a.qcow2')
    try:
        for v, ok in (('on', False), ('auto', False), ('off', True)):
            res = t.vdk('info', '--image-opts', 'driver=qcow2,file.filename=a.qcow2,file.locking=' + v)
            expect(res.rc == 0 if ok else (res.rc == 1 and MSG in res.err), 'file.locking=%s' % v, res)
        res = t.vdk('info', '--image-opts', 'driver=qcow2,file.filename=a.qcow2,file.locking=maybe')
        expect(res.rc == 1 and "invalid locking value 'maybe'" in res.err and res.err.count('\n') == 1,
               'a bad locking value', res)
    finally:
        h.stop()


def t_qemu_nbd_holds(t, fmt):
    """qemu-nbd serving an image read-write (what a running QEMU does):
    vdk writers are refused; readers as qemu-img decides (qemu-nbd shares
    writes to a raw image, so a raw reader may look)."""
    expect_rc(t.qemu_img('create', '-q', '-f', fmt, 'a.img', '1M'), 0)
    sock = t.path('nbd.sock')
    p = subprocess.Popen([QEMU_NBD, '-f', fmt, '-k', sock, 'a.img'], cwd=t.dir, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            expect(p.poll() is None, 'qemu-nbd is running')
            time.sleep(0.05)
        res = t.vdk('io', '-f', fmt, '-c', 'write 0 512', 'a.img')
        expect(res.rc == 1 and MSG in res.err, 'vdk io (write) refused while qemu-nbd serves', res)
        res = t.vdk('info', '-f', fmt, 'a.img')
        q = t.qemu_img('info', '-f', fmt, 'a.img')
        expect_eq(res.rc == 0, q.rc == 0, 'vdk info and qemu-img info agree (%s / %s)' % (res.err, q.err))
        expect_eq(res.rc == 0, fmt == 'raw', 'a reader may look only at a raw image')
    finally:
        p.terminate()
        p.wait(10)


def t_rebase_new_backing(t):
    """rebase onto a backing file qemu-io writes: refused, as by qemu-img;
    -U opens it anyway (qemu-img rebase -U), and the image itself is still
    locked as a writer."""
    for name in ('a.qcow2', 'b.qcow2'):
        expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', name, '1M'), 0)
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', 'top.qcow2'), 0)
    h = Holder(t, 'qemu', 'b.qcow2')
    try:
        res = t.qemu_img('rebase', '-b', 'b.qcow2', '-F', 'qcow2', 'top.qcow2')
        expect(res.rc != 0 and 'lock' in res.err, 'qemu-img rebase refused', res)
        res = t.vdk('rebase', '-b', 'b.qcow2', '-F', 'qcow2', 'top.qcow2')
        expect(res.rc == 1 and MSG in res.err and 'b.qcow2' in res.err, 'vdk rebase refused', res)
        expect_rc(t.vdk('rebase', '-U', '-b', 'b.qcow2', '-F', 'qcow2', 'top.qcow2'), 0, 'vdk rebase -U')
        info = t.vdk('info', '-U', 'top.qcow2')
        expect('backing file: b.qcow2' in info.out, 'rebased', info)
    finally:
        h.stop()
    h = Holder(t, 'qemu', 'top.qcow2')
    try:
        res = t.vdk('rebase', '-U', '-b', 'a.qcow2', '-F', 'qcow2', 'top.qcow2')
        expect(res.rc == 1 and MSG in res.err, '-U does not cover the image being rebased', res)
    finally:
        h.stop()


for f in ('qcow2', 'raw', 'vmdk', 'vdi'):
    suite.add('same-lock-bytes-as-qemu/%s' % f, t_same_bytes, f)
for sub in ('twoGbMaxExtentFlat', 'twoGbMaxExtentSparse', 'monolithicFlat'):
    suite.add('same-lock-bytes-as-qemu/vmdk-%s' % sub, t_same_bytes_extents, sub)
for f in ('qcow2', 'raw', 'vmdk', 'vdi'):
    suite.add('qemu-writer-blocks-vdk/%s' % f, t_qemu_holds, f)
suite.add('vdk-writer-blocks-qemu', t_vdk_holds)
for f in ('qcow2', 'raw'):
    suite.add('qemu-nbd-holds/%s' % f, t_qemu_nbd_holds, f)
suite.add('readers-side-by-side', t_readers)
suite.add('backing-file-in-use', t_backing)
suite.add('no-replacing-an-open-image', t_replace)
suite.add('locking-option', t_locking_option)
suite.add('rebase-U-new-backing', t_rebase_new_backing)

if __name__ == '__main__':
    main(suite)
