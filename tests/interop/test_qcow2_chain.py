#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""commit and rebase against qemu-img: the same chain is committed or
rebased by vdk and, on a copy, by qemu-img; the guest-visible content,
backing file names and exit codes must agree, every image must pass
qemu-img check, and the errors must be qemu-img's."""

import json
import os
import shutil

from vdktest import VDK, KiB, MiB, Skip, Suite, expect, expect_eq, expect_rc, main

suite = Suite('qcow2-chain')

SIZE = 8 * MiB


def build_chain(t, d, base_fmt='qcow2', base_size=SIZE, top_size=SIZE):
    """d/base <- d/mid.qcow2 <- d/top.qcow2 with data in every layer and a
    zero cluster in the top."""
    os.makedirs(t.path(d), exist_ok=True)
    base = 'base.' + base_fmt
    expect_rc(t.qemu_img('create', '-q', '-f', base_fmt, os.path.join(d, base), str(base_size)), 0)
    t.qemu_io(os.path.join(d, base), 'write -P 1 0 %d' % min(4 * MiB, base_size), fmt=base_fmt)
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-b', base, '-F', base_fmt, os.path.join(d, 'mid.qcow2'),
                         str(top_size)), 0)
    t.qemu_io(os.path.join(d, 'mid.qcow2'), 'write -P 2 1M 1M', 'write -P 5 %d 5000' % (top_size - 5000),
              fmt='qcow2')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'mid.qcow2', '-F', 'qcow2',
                         os.path.join(d, 'top.qcow2')), 0)
    t.qemu_io(os.path.join(d, 'top.qcow2'), 'write -P 3 3M 2M', 'write -z 0 64k', 'write -P 4 12345 777',
              fmt='qcow2')


def raw_of(t, name, fmt='qcow2', out='view.raw'):
    if os.path.exists(t.path(out)):
        os.unlink(t.path(out))
    expect_rc(t.qemu_img('convert', '-f', fmt, '-O', 'raw', name, out), 0, 'qemu-img convert %s' % name)
    return t.content(out)


def both(t, setup, args, rc=0):
    """Run `vdk ARGS` in v/ and `qemu-img ARGS` in q/ on identical chains."""
    for d in ('v', 'q'):
        setup(t, d)
    rv = t.vdk(*args, cwd=t.path('v'))
    rq = t.qemu_img(*args, cwd=t.path('q'))
    expect_eq(rv.rc, rq.rc, 'vdk %s: exit code vs qemu-img' % ' '.join(args), rv)
    expect_eq(rv.rc, rc, 'vdk %s: exit code' % ' '.join(args), rv)
    if rc == 0:
        expect_eq(rv.out, rq.out, 'vdk %s: output vs qemu-img' % ' '.join(args), rv)
    else:
        expect_eq(rv.err.replace('vdk: ', '', 1), rq.err.replace('qemu-img: ', '', 1),
                  'vdk %s: the error vs qemu-img' % ' '.join(args), rv)
    return rv, rq


def clean(t, name):
    res = t.qemu_img('check', name)
    expect(res.rc == 0 and 'No errors' in res.out, 'qemu-img check %s is clean' % name, res)


def top_depth0(t, name):
    m = json.loads(t.qemu_img('map', '--output=json', name).out)
    return [e for e in m if e['depth'] == 0 and (e['data'] or e['zero'])]


def t_commit(t, base_fmt, extra):
    setup = lambda t, d: build_chain(t, d, base_fmt)
    build_chain(t, 'ref', base_fmt)
    before = raw_of(t, 'ref/top.qcow2')
    both(t, setup, ['commit', *extra, 'top.qcow2'])
    base = 'base.' + base_fmt
    target = 'mid.qcow2' if '-b' not in extra else base
    for d in ('v', 'q'):
        expect(raw_of(t, '%s/top.qcow2' % d) == before, '%s: the top shows the same content after the commit' % d)
        tgt = raw_of(t, '%s/%s' % (d, target), fmt=base_fmt if target == base else 'qcow2')
        expect(tgt == before, '%s: %s holds the committed content' % (d, target))
        for img in ('top.qcow2', 'mid.qcow2') + ((base,) if base_fmt == 'qcow2' else ()):
            clean(t, '%s/%s' % (d, img))
    emptied = not extra
    for d in ('v', 'q'):
        left = top_depth0(t, '%s/top.qcow2' % d)
        expect(bool(left) != emptied, '%s: the top is %s after the commit (%r)' %
               (d, 'empty' if emptied else 'kept', left[:3]))


def t_commit_grows_base(t):
    setup = lambda t, d: build_chain(t, d, 'qcow2', base_size=4 * MiB, top_size=SIZE)
    build_chain(t, 'ref', 'qcow2', base_size=4 * MiB, top_size=SIZE)
    before = raw_of(t, 'ref/top.qcow2')
    both(t, setup, ['commit', '-b', 'base.qcow2', 'top.qcow2'])
    for d in ('v', 'q'):
        expect(raw_of(t, '%s/base.qcow2' % d) == before, '%s: the base grew and holds everything' % d)
        clean(t, '%s/base.qcow2' % d)


def t_rebase(t, new, extra):
    setup = lambda t, d: build_chain(t, d)
    build_chain(t, 'ref')
    before = raw_of(t, 'ref/top.qcow2')
    args = ['rebase', *extra, '-b', new] + (['-F', 'qcow2'] if new else []) + ['top.qcow2']
    both(t, setup, args)
    views = {}
    for d in ('v', 'q'):
        clean(t, '%s/top.qcow2' % d)
        views[d] = raw_of(t, '%s/top.qcow2' % d)
        info = json.loads(t.qemu_img('info', '--output=json', '%s/top.qcow2' % d).out)
        expect_eq(info.get('backing-filename'), new or None, '%s: the recorded backing file' % d)
        expect_eq(info.get('backing-filename-format'), 'qcow2' if new else None, '%s: the backing format' % d)
    if '-u' not in extra:
        expect(views['v'] == before, 'vdk rebase (safe): the guest content is unchanged')
    expect(views['v'] == views['q'], 'vdk and qemu-img rebase give the same content')


def t_rebase_relative(t):
    """A relative name is opened from the image's directory and recorded as
    given; the header keeps its other extensions."""
    build_chain(t, 'sub')
    before = raw_of(t, 'sub/top.qcow2')
    res = t.vdk('rebase', '-b', 'base.qcow2', '-F', 'qcow2', 'sub/top.qcow2')
    expect_rc(res, 0, 'vdk rebase with a relative name from another directory')
    expect(raw_of(t, 'sub/top.qcow2') == before, 'content unchanged')
    res = t.vdk('info', 'sub/top.qcow2')
    expect('backing file: base.qcow2 (actual path: sub/base.qcow2)' in res.out, 'recorded as given', res)
    # a long name that still fits, then back
    long = '/'.join(c * 200 for c in 'wxyz') + '/base.qcow2'
    os.makedirs(os.path.dirname(t.path('sub/' + long)))
    shutil.copy(t.path('sub/base.qcow2'), t.path('sub/' + long))
    expect_rc(t.vdk('rebase', '-u', '-b', long, '-F', 'qcow2', 'sub/top.qcow2'), 0, 'a %d-byte name' % len(long))
    expect(raw_of(t, 'sub/top.qcow2') == before, 'content through the long name')
    clean(t, 'sub/top.qcow2')


def t_commit_crash(t):
    """commit killed at many of its writes: what the top image shows never
    changes (the base gets the data before the top is emptied), every image
    stays consistent (leaks at most), and committing again finishes."""
    strace = shutil.which('strace')
    if not strace:
        raise Skip('strace not installed')
    build_chain(t, 'ref')
    before = raw_of(t, 'ref/top.qcow2')
    trace = [strace, '-f', '-qq', '-e', 'trace=pwrite64,pwritev,pwritev2']
    res = t.run(trace[:2] + ['-c', '-o', t.path('count.txt')] + trace[2:] + [VDK, 'commit', '--aio=threads',
                                                                              'top.qcow2'], cwd=t.path('ref'))
    writes = 0
    with open(t.path('count.txt')) as f:
        for line in f:
            p = line.split()
            if p and p[-1] in ('pwrite64', 'pwritev', 'pwritev2') and p[3].isdigit():
                writes += int(p[3])
    expect(writes > 5, 'a commit writes (%d writes)' % writes)
    for n in sorted(set(range(1, 30)) | set(range(30, writes + 1, max(1, writes // 40)))):
        shutil.rmtree(t.path('c'), ignore_errors=True)
        build_chain(t, 'c')
        t.run(trace[:2] + ['-o', '/dev/null'] + trace[2:] +
              ['-e', 'inject=pwrite64,pwritev,pwritev2:signal=KILL:when=%d' % n, VDK, 'commit', '--aio=threads',
               'top.qcow2'], cwd=t.path('c'), timeout=60)
        what = 'commit killed at write %d of %d' % (n, writes)
        for img in ('top.qcow2', 'mid.qcow2'):
            chk = t.qemu_img('check', 'c/' + img)
            expect(chk.rc in (0, 3), '%s: %s has no corruption (exit %d)' % (what, img, chk.rc), chk)
        expect(raw_of(t, 'c/top.qcow2') == before, '%s: the top shows the same content' % what)
        if n % 4 == 0:
            expect_rc(t.vdk('commit', 'top.qcow2', cwd=t.path('c')), 0, what + ': commit again')
            expect(raw_of(t, 'c/mid.qcow2') == before, what + ': the backing file holds the content')


def t_errors(t):
    setup = lambda t, d: build_chain(t, d)
    both(t, setup, ['commit', '-b', 'nosuch.qcow2', 'top.qcow2'], rc=1)
    both(t, setup, ['commit', 'base.qcow2'], rc=1)
    both(t, setup, ['rebase', '-b', 'base.qcow2', 'top.qcow2'], rc=1)
    res = t.vdk('rebase', '-b', 'nosuch.qcow2', '-F', 'qcow2', 'top.qcow2', cwd=t.path('v'))
    expect(res.rc == 1 and "Could not open new backing file 'nosuch.qcow2'" in res.err, 'a missing new backing file',
           res)
    for cmd in ('commit', 'rebase'):
        res = t.vdk(cmd, '--help')
        expect(res.rc == 0 and 'usage: vdk ' + cmd in res.out, 'vdk %s --help' % cmd, res)


suite.add('chain/commit/qcow2-base', t_commit, 'qcow2', [])
suite.add('chain/commit/raw-base', t_commit, 'raw', [])
suite.add('chain/commit/-d', t_commit, 'qcow2', ['-d'])
suite.add('chain/commit/-b-base', t_commit, 'qcow2', ['-b', 'base.qcow2'])
suite.add('chain/commit/base-grows', t_commit_grows_base)
suite.add('chain/rebase/safe-onto-base', t_rebase, 'base.qcow2', [])
suite.add('chain/rebase/flatten', t_rebase, '', [])
suite.add('chain/rebase/unsafe', t_rebase, 'base.qcow2', ['-u'])
suite.add('chain/rebase/relative-and-long-names', t_rebase_relative)
suite.add('chain/commit/killed-at-many-writes', t_commit_crash)
suite.add('chain/errors', t_errors)

if __name__ == '__main__':
    main(suite)
