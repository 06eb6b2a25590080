#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Internal snapshots, both ways with qemu-img: snapshots vdk creates are
listed, read (qemu-img convert -l), applied and deleted by qemu-img, and
the other way round; qemu-img check is clean after every step and the
guest-visible content of the image and of every snapshot matches a model.
Covers cluster sizes, compat 0.10, extended L2, compressed and zero
clusters, refcount widths, and qemu-img's list/info output and errors."""

import json
import os
import random
import shutil

from vdktest import VDK, KiB, MiB, Skip, Suite, expect, expect_eq, expect_rc, main

suite = Suite('qcow2-snapshot')

SIZE = 16 * MiB

CONFIGS = {
    '64k': 'cluster_size=65536',
    '512': 'cluster_size=512',
    '4k-refcount2': 'cluster_size=4096,refcount_bits=2',
    '2M-refcount64': 'cluster_size=2M,refcount_bits=64',
    'v2': 'compat=0.10,cluster_size=16384',
    'extl2': 'cluster_size=65536,extended_l2=on',
    'lazy': 'lazy_refcounts=on',
}


class Model:
    def __init__(self, size):
        self.data = bytearray(size)

    def write(self, off, length, byte):
        self.data[off:off + length] = bytes([byte]) * length

    def zero(self, off, length):
        self.data[off:off + length] = bytes(length)


def qemu_check(t, name='img.qcow2', what=''):
    res = t.qemu_img('check', name)
    expect(res.rc == 0 and 'No errors were found' in res.out,
           'qemu-img check is clean%s' % (' (%s)' % what if what else ''), res)


def content(t, name='img.qcow2', snapshot=None, tool='vdk'):
    out = t.path('content.raw')
    if os.path.exists(out):
        os.unlink(out)
    args = ['convert', '-f', 'qcow2', '-O', 'raw']
    if snapshot:
        args += ['-l', 'snapshot.name=' + snapshot]
    if tool == 'vdk':
        res = t.vdk(*args, name, 'content.raw')
    else:
        res = t.qemu_img(*args, name, 'content.raw')
    expect_rc(res, 0, '%s convert%s' % (tool, ' -l ' + snapshot if snapshot else ''))
    with open(out, 'rb') as f:
        return f.read()


def expect_content(t, model, what, name='img.qcow2', snapshot=None, tool='vdk'):
    got = content(t, name, snapshot, tool)
    if got != bytes(model.data):
        pos = next(i for i in range(len(got)) if got[i] != model.data[i])
        expect(False, '%s: content differs from the model first at offset %d (got 0x%02x, want 0x%02x)' %
               (what, pos, got[pos], model.data[pos]))


def cluster_size(opts):
    kv = dict(o.split('=', 1) for o in opts.split(','))
    v = kv.get('cluster_size', '65536')
    return 2 * MiB if v == '2M' else int(v)


def write_ops(rng, model, size, tool, step, cs, compress):
    """A few writes of each kind; returns qemu-io/vdk io command strings.
    The last 8 compression units are kept for compressed writes (qemu
    compresses only whole clusters that were never allocated)."""
    unit = max(64 * KiB, cs)
    data_end = size - 8 * unit
    cmds = []
    if tool == 'qemu' and compress:
        off = data_end + step * unit
        cmds.append('write -c -P 0x77 %d %d' % (off, unit))
        model.write(off, unit, 0x77)
    for _ in range(6):
        off = rng.randrange(0, data_end - 200 * KiB)
        length = rng.randrange(1, 200 * KiB)
        byte = rng.randrange(1, 256)
        cmds.append('write -P 0x%02x %d %d' % (byte, off, length))
        model.write(off, length, byte)
    off = rng.randrange(0, data_end // unit - 1) * unit
    cmds.append('write -z %d %d' % (off, unit))
    model.zero(off, unit)
    return cmds


def t_roundtrip(t, cfg):
    """vdk and qemu-img take turns creating, applying and deleting snapshots
    on one image; every state is checked against the model."""
    opts = CONFIGS[cfg]
    cs = cluster_size(opts)
    size = max(SIZE, 8 * 8 * cs)
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', opts, 'img.qcow2', str(size)), 0)
    rng = random.Random('snap-' + cfg)
    model = Model(size)
    saved = {}
    # refcount_bits=2: at most 3 references per cluster, so no packed
    # compressed clusters (one reference each) and at most 2 snapshots
    refcount2 = 'refcount_bits=2' in opts
    for step in range(6):
        tool = 'vdk' if step % 2 == 0 else 'qemu'
        cmds = write_ops(rng, model, size, tool, step, cs, not refcount2)
        if tool == 'vdk':
            t.vdk_io('img.qcow2', *cmds, fmt='qcow2')
        else:
            t.qemu_io('img.qcow2', *cmds, fmt='qcow2')
        name = 's%d' % step
        creator = t.vdk if step % 3 != 1 else t.qemu_img
        expect_rc(creator('snapshot', '-c', name, 'img.qcow2'), 0, 'snapshot -c %s' % name)
        saved[name] = bytes(model.data)
        qemu_check(t, what='after creating %s' % name)
        if refcount2 and len(saved) >= 2:
            # two snapshots and the active image already use 3 references
            victim = sorted(saved)[0]
            deleter = t.qemu_img if step % 2 else t.vdk
            expect_rc(deleter('snapshot', '-d', victim, 'img.qcow2'), 0, 'snapshot -d %s' % victim)
            del saved[victim]
    # the lists agree
    rv, rq = t.vdk('snapshot', '-l', 'img.qcow2'), t.qemu_img('snapshot', '-l', 'img.qcow2')
    expect_eq(rv.out, rq.out, 'vdk snapshot -l vs qemu-img snapshot -l', rv)
    for name, data in saved.items():
        m = Model(size)
        m.data[:] = data
        expect_content(t, m, 'snapshot %s read by qemu-img convert -l' % name, snapshot=name, tool='qemu')
        expect_content(t, m, 'snapshot %s read by vdk convert -l' % name, snapshot=name)
    expect_content(t, model, 'the active image')
    # apply each snapshot with one tool, check the content with the other
    for i, name in enumerate(sorted(saved)):
        applier = t.vdk if i % 2 == 0 else t.qemu_img
        expect_rc(applier('snapshot', '-a', name, 'img.qcow2'), 0, 'snapshot -a %s' % name)
        qemu_check(t, what='after applying %s' % name)
        m = Model(size)
        m.data[:] = saved[name]
        expect_content(t, m, 'after applying %s (read by vdk)' % name)
        expect_content(t, m, 'after applying %s (read by qemu-img)' % name, tool='qemu')
        # write after the apply: the snapshot must not change
        t.vdk_io('img.qcow2', 'write -P 0xee 0 100k', fmt='qcow2')
        m.write(0, 100 * KiB, 0xee)
        expect_content(t, m, 'written after applying %s' % name)
        ms = Model(size)
        ms.data[:] = saved[name]
        expect_content(t, ms, 'snapshot %s after writing to the applied state' % name, snapshot=name, tool='qemu')
        model = m
    # delete them all, alternating tools; the space comes back
    for i, name in enumerate(sorted(saved)):
        deleter = t.vdk if i % 2 == 1 else t.qemu_img
        expect_rc(deleter('snapshot', '-d', name, 'img.qcow2'), 0, 'snapshot -d %s' % name)
        qemu_check(t, what='after deleting %s' % name)
        expect_content(t, model, 'after deleting %s' % name)
    res = t.vdk('snapshot', '-l', 'img.qcow2')
    expect(res.rc == 0 and res.out == '', 'no snapshots left', res)
    res = t.vdk('check', 'img.qcow2')
    expect_rc(res, 0, 'vdk check at the end')


def t_info(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'img.qcow2', '64M'), 0)
    t.qemu_io('img.qcow2', 'write -P 1 0 1M', fmt='qcow2')
    expect_rc(t.vdk('snapshot', '-c', 'first', 'img.qcow2'), 0)
    expect_rc(t.qemu_img('snapshot', '-c', 'second', 'img.qcow2'), 0)
    expect_rc(t.vdk('snapshot', '-c', 'first', 'img.qcow2'), 0, 'a second snapshot with the same name')
    for args in (['info'], ['info', '--output=json'], ['snapshot', '-l']):
        rq = t.qemu_img(*args, 'img.qcow2')
        rv = t.vdk(*args, 'img.qcow2')
        expect_rc(rv, 0, 'vdk ' + ' '.join(args))
        expect_eq(rv.out, rq.out, 'vdk %s vs qemu-img (byte for byte)' % ' '.join(args), rv)
    j = json.loads(t.vdk('info', '--output=json', 'img.qcow2').out)
    expect_eq([s['id'] for s in j['snapshots']], ['1', '2', '3'], 'snapshot IDs')
    # apply by ID, delete by name (the first one of that name), as qemu-img
    expect_rc(t.vdk('snapshot', '-a', '2', 'img.qcow2'), 0, 'apply by ID')
    expect_rc(t.vdk('snapshot', '-d', 'first', 'img.qcow2'), 0, 'delete by name')
    rq = t.qemu_img('snapshot', '-l', 'img.qcow2')
    expect('first' in rq.out and 'second' in rq.out and '\n1 ' not in rq.out, 'snapshot 1 is gone, 3 stays', rq)
    qemu_check(t)


def t_convert_l(t):
    """vdk convert -l accepts qemu-img's forms and fails like it."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'img.qcow2', '4M'), 0)
    t.qemu_io('img.qcow2', 'write -P 1 0 1M', fmt='qcow2')
    expect_rc(t.qemu_img('snapshot', '-c', 'first', 'img.qcow2'), 0)
    t.qemu_io('img.qcow2', 'write -P 2 0 1M', fmt='qcow2')
    expect_rc(t.qemu_img('snapshot', '-c', 'second', 'img.qcow2'), 0)
    t.qemu_io('img.qcow2', 'write -P 3 0 1M', fmt='qcow2')
    for param in ('first', '2', 'snapshot.name=second', 'snapshot.id=1', 'snapshot.id=2,snapshot.name=second',
                  'nosuch', 'snapshot.name=nosuch', 'snapshot.id=1,snapshot.name=second', 'snapshot.foo=1'):
        for f in ('q.raw', 'v.raw'):
            if os.path.exists(t.path(f)):
                os.unlink(t.path(f))
        rq = t.qemu_img('convert', '-l', param, '-O', 'raw', 'img.qcow2', 'q.raw')
        rv = t.vdk('convert', '-l', param, '-O', 'raw', 'img.qcow2', 'v.raw')
        expect_eq(rv.rc, rq.rc, 'convert -l %s: exit code vs qemu-img' % param, rv)
        if rq.rc == 0:
            expect(t.content('v.raw') == t.content('q.raw'), 'convert -l %s: the same content as qemu-img' % param)
        else:
            expect_eq(rv.err.replace('vdk: img.qcow2: ', '').replace('vdk: ', ''),
                      rq.err.replace('qemu-img: ', ''), 'convert -l %s: the error vs qemu-img' % param, rv)
    res = t.vdk('info', '--image-opts', 'driver=qcow2,file.filename=img.qcow2,snapshot.name=first')
    expect(res.rc == 0 and 'virtual size: 4 MiB' in res.out, 'a snapshot opened through --image-opts', res)
    res = t.vdk('io', '-r', '-c', 'read -P 2 0 1M', '--image-opts', 'driver=qcow2,file.filename=img.qcow2,snapshot.id=2')
    expect(res.rc == 0 and 'verification failed' not in res.out, 'vdk io reads the snapshot', res)
    res = t.vdk('io', '-c', 'write 0 4k', '--image-opts', 'driver=qcow2,file.filename=img.qcow2,snapshot.id=2')
    expect(res.rc == 1 and 'read-only' in res.err, 'a snapshot opens read-only only', res)


def t_errors(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'img.qcow2', '1M'), 0)
    before = t.content('img.qcow2')
    for flag, verb in (('-a', 'apply'), ('-d', 'delete')):
        res = t.vdk('snapshot', flag, 'nosuch', 'img.qcow2')
        expect_eq(res.rc, 1, 'vdk snapshot %s nosuch: exit code' % flag, res)
        expect_eq(res.err.strip(), "vdk: img.qcow2: Could not %s snapshot 'nosuch': snapshot 'nosuch' not found" % verb,
                  'the error names the snapshot', res)
    res = t.vdk('snapshot', '-l', '-c', 'x', 'img.qcow2')
    expect(res.rc == 1 and "Cannot mix '-l', '-a', '-c', '-d'" in res.err, 'mixed actions refused', res)
    res = t.vdk('snapshot', '-U', '-c', 'x', 'img.qcow2')
    expect_eq(res.rc, 1, '-U with -c is refused', res)
    expect_eq(t.content('img.qcow2'), before, 'the image is unchanged')
    # formats without snapshots, and refcount_bits=1
    with open(t.path('disk.raw'), 'wb') as f:
        f.truncate(MiB)
    res = t.vdk('snapshot', '-f', 'raw', '-c', 'x', 'disk.raw')
    expect(res.rc == 1 and 'does not support internal snapshots' in res.err, 'raw has no snapshots', res)
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=1', 'r1.qcow2', '1M'), 0)
    res = t.vdk('snapshot', '-c', 'x', 'r1.qcow2')
    expect(res.rc == 1 and 'refcount_bits=1' in res.err, 'refcount_bits=1 cannot hold a snapshot', res)
    qemu_check(t, 'r1.qcow2')
    res = t.vdk('snapshot', '--help')
    expect(res.rc == 0 and 'usage: vdk snapshot' in res.out, 'vdk snapshot --help', res)
    # -l on an image without snapshots prints nothing, like qemu-img
    res = t.vdk('snapshot', '-l', 'img.qcow2')
    expect(res.rc == 0 and res.out == '', 'empty list', res)


def t_space(t):
    """Deleting the only snapshot of overwritten data gives the space back
    (clusters punched), and check finds no leaks."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'img.qcow2', '64M'), 0)
    t.vdk_io('img.qcow2', 'write -P 1 0 32M', fmt='qcow2')
    expect_rc(t.vdk('snapshot', '-c', 'a', 'img.qcow2'), 0)
    t.vdk_io('img.qcow2', 'write -P 2 0 32M', fmt='qcow2')
    used = os.stat(t.path('img.qcow2')).st_blocks * 512
    expect(used >= 64 * MiB, 'both versions are stored (%d bytes)' % used)
    expect_rc(t.vdk('snapshot', '-d', 'a', 'img.qcow2'), 0)
    after = os.stat(t.path('img.qcow2')).st_blocks * 512
    expect(after < 40 * MiB, 'the snapshot-only clusters were given back (%d bytes allocated)' % after)
    qemu_check(t)
    res = t.qemu_io_raw('img.qcow2', ['read -P 2 0 32M'], fmt='qcow2', extra=['-r'])
    expect(res.rc == 0 and 'fail' not in res.out.lower(), 'data intact', res)


STRACE = shutil.which('strace')


def killed_at_write(t, n, args):
    """Run vdk under strace, killed (SIGKILL) when it enters its n-th write
    system call: the file holds exactly the writes issued before."""
    return t.run([STRACE, '-f', '-qq', '-o', '/dev/null', '-e', 'trace=pwrite64,pwritev,pwritev2', '-e',
                  'inject=pwrite64,pwritev,pwritev2:signal=KILL:when=%d' % n, VDK, *args], timeout=60)


def t_crash(t, op):
    """Crash consistency: the operation killed at every one of its writes
    in turn leaves the image consistent (qemu-img check: no corruption,
    leaks and COPIED flags at most), in the old or the new state, with
    every snapshot's content intact; check -r all then makes it clean
    without changing any data."""
    if not STRACE:
        raise Skip('strace not installed')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'base.qcow2', '8M'), 0)
    t.qemu_io('base.qcow2', 'write -P 1 0 3M', 'write -c -P 2 4M 64k', fmt='qcow2')
    if op != 'create':
        expect_rc(t.qemu_img('snapshot', '-c', 'a', 'base.qcow2'), 0)
        t.qemu_io('base.qcow2', 'write -P 3 1M 2M', 'write -P 4 6M 1M', fmt='qcow2')
    old_active = content(t, 'base.qcow2', tool='qemu')
    snap = content(t, 'base.qcow2', 'a', tool='qemu') if op != 'create' else old_active
    args = {'create': ['-c', 'a'], 'apply': ['-a', 'a'], 'delete': ['-d', 'a']}[op]
    finished = False
    for n in range(1, 200):
        with open(t.path('base.qcow2'), 'rb') as f, open(t.path('img.qcow2'), 'wb') as g:
            g.write(f.read())
        res = killed_at_write(t, n, ['snapshot', '--aio=threads', *args, 'img.qcow2'])
        what = '%s killed at write %d' % (op, n)
        chk = t.qemu_img('check', 'img.qcow2')
        errors = [l for l in (chk.out + chk.err).splitlines() if l.startswith('ERROR')]
        # Between the refcount and the L2 table writes, qemu-img check
        # reports COPIED flags that disagree with the refcount (qemu's own
        # snapshot code has the same window): safe either way (a clear flag
        # only makes writes copy; a set flag on a leaked reference writes in
        # place what nothing else uses), and repaired by check -r all.
        expect(chk.rc in (0, 2, 3) and all('OFLAG_COPIED' in l for l in errors),
               '%s: qemu-img check finds nothing worse than leaks and COPIED flags (exit %d)' % (what, chk.rc), chk)
        listed = 'a' in [s['name'] for s in json.loads(t.qemu_img('info', '--output=json', 'img.qcow2').out)
                         .get('snapshots', [])]
        active = content(t, 'img.qcow2', tool='qemu')
        if op == 'create':
            expect(active == old_active, '%s: the disk content is unchanged' % what)
        elif op == 'apply':
            expect(listed, '%s: the snapshot is still there' % what)
            expect(active in (old_active, snap), '%s: the disk is in the old or the new state' % what)
        else:
            expect(active == old_active, '%s: the disk content is unchanged' % what)
        if listed:
            expect(content(t, 'img.qcow2', 'a', tool='qemu') == snap, '%s: the snapshot content is intact' % what)
        expect_rc(t.vdk('check', '-r', 'all', 'img.qcow2'), 0, '%s: vdk check -r all' % what)
        qemu_check(t, what=what + ', after check -r all')
        expect(content(t, 'img.qcow2', tool='qemu') == active, '%s: the repair changed no data' % what)
        if res.rc == 0:
            finished = True
            expect(listed == (op != 'delete'), '%s: completed: the snapshot %s' %
                   (what, 'exists' if op != 'delete' else 'is gone'))
            break
    expect(finished and n > 2, 'the operation completed when no write was interrupted (after %d writes)' % n)


for cfg in CONFIGS:
    suite.add('qcow2-snapshot/roundtrip/' + cfg, t_roundtrip, cfg)
suite.add('qcow2-snapshot/info-and-list-as-qemu-img', t_info)
suite.add('qcow2-snapshot/errors', t_errors)
suite.add('qcow2-snapshot/convert-l', t_convert_l)
suite.add('qcow2-snapshot/delete-gives-space-back', t_space)
for op in ('create', 'apply', 'delete'):
    suite.add('qcow2-snapshot/crash-during-' + op, t_crash, op)

if __name__ == '__main__':
    main(suite)
