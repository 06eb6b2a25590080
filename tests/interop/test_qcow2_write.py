#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk -> qemu: qcow2 images created and written by vdk, checked by qemu.

For every configuration of the qcow2 matrix vdk create must print the same
'Formatting ...' line as qemu-img create and build an image qemu-img check
accepts; vdk io then writes a mix of patterns, unaligned requests, zero
writes (-z, -z -u), cluster-aligned discards and compressed clusters,
mirrored into a raw file by qemu-io: qemu-img check must find no errors and
no leaks and qemu-img compare must find the image identical to the mirror.
A random model test runs per I/O engine and cache mode, on a plain image and
on an extended-L2 image over a backing file; writes to the top of backing
chains must copy the backing data and leave the backing files untouched."""

import hashlib
import os
import random

from vdktest import KiB, MiB, Suite, expect, expect_eq, expect_rc, main
from qcow2util import (CHAINS, CONFIGS, CONFIG_BY_NAME, ENGINE_CONFIGS, Model, drop_actual_size,
                       expect_bytes, mix_commands, no_failure, parse_json, qemu_check_clean, qemu_compare_identical,
                       qemu_to_raw, read_checks)

suite = Suite('qcow2-write')


def formatting_lines(t, opts_args, size, extra=()):
    """Create img.qcow2 with qemu-img (in q/) and vdk (in v/); both lines."""
    for d in ('q', 'v'):
        os.makedirs(t.path(d), exist_ok=True)
    rq = t.qemu_img('create', '-f', 'qcow2', *extra, *opts_args, 'img.qcow2', str(size), cwd=t.path('q'))
    expect_rc(rq, 0, 'qemu-img create (test premise)')
    rv = t.vdk('create', '-f', 'qcow2', *extra, *opts_args, 'img.qcow2', str(size), cwd=t.path('v'))
    expect_rc(rv, 0, 'vdk create')
    expect_eq(rv.out, rq.out, "vdk create's 'Formatting' line vs qemu-img create's", rv)
    expect_eq(rv.err, '', 'vdk create stderr', rv)
    return rv, rq


def t_create(t, cfg):
    opts = ['-o', cfg.opts] if cfg.opts else []
    formatting_lines(t, opts, cfg.size)
    qemu_check_clean(t, 'v/img.qcow2', 'qemu-img check of the new image')
    infos = []
    for d in ('q', 'v'):
        res = t.qemu_img('info', '--output=json', 'img.qcow2', cwd=t.path(d))
        expect_rc(res, 0, 'qemu-img info %s/img.qcow2' % d)
        infos.append(drop_actual_size(parse_json(res, 'qemu-img info')))
    expect_eq(infos[1], infos[0], 'qemu-img info --output=json of the vdk-created image vs the qemu-created one')
    maps = []
    for d in ('q', 'v'):
        res = t.qemu_img('map', '--output=json', 'img.qcow2', cwd=t.path(d))
        expect_rc(res, 0, 'qemu-img map %s/img.qcow2' % d)
        maps.append([{k: v for k, v in e.items() if k != 'offset'} for e in parse_json(res, 'qemu-img map')])
    expect_eq(maps[1], maps[0], 'qemu-img map of the vdk-created image vs the qemu-created one (offsets ignored)')
    data = qemu_to_raw(t, 'v/img.qcow2', 'v.raw')
    expect(data == bytes(cfg.size), 'the new image does not read as zeroes')


SPELLINGS = [('cluster-size-suffixes', ['cluster_size=4k', 'cluster_size=2M', 'extended_l2=on,cluster_size=128k']),
             ('compat-v3-features', ['compat=v3', 'compat=1.1,lazy_refcounts=on,refcount_bits=64',
                                     'compression_type=zstd,extended_l2=on,compat=1.1'])]


def t_create_spelling(t, variants):
    """Option values as the user spelled them: qemu-img prints them parsed."""
    for opts in variants:
        for d in ('q', 'v'):
            if os.path.exists(t.path(d + '/img.qcow2')):
                os.unlink(t.path(d + '/img.qcow2'))
        formatting_lines(t, ['-o', opts], '48M')
        qemu_check_clean(t, 'v/img.qcow2', 'qemu-img check of the new image')
        res = t.qemu_img('info', '--output=json', 'v/img.qcow2')
        expect_eq(parse_json(res, 'qemu-img info')['virtual-size'], 48 * MiB, 'virtual size')


def t_create_backing(t):
    """vdk create -b with a relative backing name in a subdirectory."""
    os.makedirs(t.path('q/sub'))
    os.makedirs(t.path('v/sub'))
    for d in ('q', 'v'):
        t.sparse('%s/sub/base.raw' % d, 8 * MiB)
        t.qemu_io('%s/sub/base.raw' % d, 'write -P 0x71 1000 70000')
    # backing file and size taken from the backing file
    rq = t.qemu_img('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'sub/top.qcow2', cwd=t.path('q'))
    expect_rc(rq, 0, 'qemu-img create -b (test premise)')
    rv = t.vdk('create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'sub/top.qcow2', cwd=t.path('v'))
    expect_rc(rv, 0, 'vdk create -b')
    lines = [(rv, rq, '-b, size from the backing file')]
    infos = []
    for d in ('q', 'v'):
        res = t.qemu_img('info', '--backing-chain', '--output=json', 'sub/top.qcow2', cwd=t.path(d))
        expect_rc(res, 0, 'qemu-img info --backing-chain')
        infos.append(drop_actual_size(parse_json(res, 'qemu-img info')))
    expect_eq(infos[1], infos[0], 'qemu-img info --backing-chain of the vdk-created image vs the qemu-created one')
    qemu_check_clean(t, 'v/sub/top.qcow2')
    no_failure(t.qemu_io_raw('v/sub/top.qcow2', ['read -P 0x71 1000 70000', 'read -P 0 71000 10000'], fmt='qcow2'),
               'qemu-io reads the backing data through the vdk-created overlay')
    # an explicit size and options
    rq = t.qemu_img('create', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', '-o',
                    'cluster_size=4096,extended_l2=off', 'sub/top2.qcow2', '16M', cwd=t.path('q'))
    expect_rc(rq, 0, 'qemu-img create -b -o (test premise)')
    rv = t.vdk('create', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', '-o', 'cluster_size=4096,extended_l2=off',
               'sub/top2.qcow2', '16M', cwd=t.path('v'))
    expect_rc(rv, 0, 'vdk create -b -o')
    lines.append((rv, rq, '-b -o SIZE'))
    qemu_check_clean(t, 'v/sub/top2.qcow2')
    for rv, rq, what in lines:
        expect_eq(rv.out, rq.out, "vdk create %s: 'Formatting' line vs qemu-img create's" % what, rv)


def t_create_backing_checks(t):
    """The backing file is checked before the 'Formatting' line (no line,
    exit 1, nothing created), -u skips the open but needs a size, and
    preallocation with a backing file needs extended L2 entries (the
    preallocated subclusters still read from the backing file)."""
    t.sparse('base.raw', 4 * MiB)
    t.qemu_io('base.raw', 'write -P 0x5a 0 4M')
    cases = [
        (['-b', 'missing.qcow2', '-F', 'qcow2', 'a.qcow2', '1M'], 'a missing backing file'),
        (['-b', 'base.raw', 'a.qcow2'], 'no backing format'),
        (['-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'a.qcow2'], '-u without a size'),
        (['-u', '-b', 'missing.qcow2', 'a.qcow2', '1M'], '-u without a backing format'),
    ]
    for args, what in cases:
        rq = t.qemu_img('create', '-f', 'qcow2', *args)
        rv = t.vdk('create', '-f', 'qcow2', *args)
        expect_rc(rq, 1, 'qemu-img create with %s (test premise)' % what)
        expect_eq(rv.rc, 1, 'vdk create with %s: exit code' % what, rv)
        expect_eq(rv.out, rq.out, 'vdk create with %s: stdout vs qemu-img' % what, rv)
        expect(rv.err.startswith('vdk: a.qcow2: ') and len(rv.err.splitlines()) == 1,
               'vdk create with %s: one "vdk: a.qcow2: " error line' % what, rv)
        expect(not os.path.exists(t.path('a.qcow2')), 'vdk create with %s left a file behind' % what)
    # -u: the name is recorded without opening it
    rq = t.qemu_img('create', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'q.qcow2', '1M')
    rv = t.vdk('create', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', '-F', 'qcow2', 'v.qcow2', '1M')
    expect_rc(rq, 0, 'qemu-img create -u (test premise)')
    expect_rc(rv, 0, 'vdk create -u')
    expect_eq(rv.out.replace("'v.qcow2'", "'q.qcow2'"), rq.out, "vdk create -u: 'Formatting' line vs qemu-img's", rv)
    with open(t.path('v.qcow2'), 'rb') as f:
        expect(b'missing.qcow2' in f.read(65536), 'vdk create -u recorded the backing name')
    # preallocation and a backing file
    args = ['-o', 'preallocation=metadata', '-b', 'base.raw', '-F', 'raw', 'p.qcow2']
    rq = t.qemu_img('create', '-f', 'qcow2', *args)
    rv = t.vdk('create', '-f', 'qcow2', *args)
    expect_eq(rv.rc, rq.rc, 'vdk create -o preallocation=metadata -b: exit code vs qemu-img', rv)
    expect_eq(rq.rc, 1, 'qemu-img create -o preallocation=metadata -b (test premise)')
    for mode in ('metadata', 'falloc', 'full'):
        if os.path.exists(t.path('p.qcow2')):
            os.unlink(t.path('p.qcow2'))
        rv = t.vdk('create', '-q', '-f', 'qcow2', '-o', 'preallocation=%s,extended_l2=on' % mode, '-b', 'base.raw',
                   '-F', 'raw', 'p.qcow2')
        expect_rc(rv, 0, 'vdk create -o preallocation=%s,extended_l2=on -b' % mode)
        qemu_check_clean(t, 'p.qcow2')
        no_failure(t.qemu_io_raw('p.qcow2', ['read -P 0x5a 0 4M'], fmt='qcow2', extra=['-r']),
                   'preallocation=%s: the backing data shows through' % mode)
        no_failure(t.vdk_io_raw('p.qcow2', ['write -P 0x21 5000 3000'], fmt='qcow2'), 'vdk io write')
        no_failure(t.qemu_io_raw('p.qcow2', ['read -P 0x5a 0 5000', 'read -P 0x21 5000 3000',
                                             'read -P 0x5a 8000 %d' % (4 * MiB - 8000)], fmt='qcow2', extra=['-r']),
                   'preallocation=%s: read back after a write' % mode)
        qemu_check_clean(t, 'p.qcow2')


def split_batches(cmds, n=2):
    k = (len(cmds) + n - 1) // n
    return [cmds[i:i + k] for i in range(0, len(cmds), k)]


def t_mix(t, cfg, creator='vdk'):
    opts = ['-o', cfg.opts] if cfg.opts else []
    if creator == 'vdk':
        expect_rc(t.vdk('create', '-q', '-f', 'qcow2', *opts, 'img.qcow2', str(cfg.size)), 0, 'vdk create')
    else:
        expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', *opts, 'img.qcow2', str(cfg.size)), 0, 'qemu-img create')
    cmds, mirror, _, model = mix_commands(cfg, seed_pattern=0x33)
    # two opens: the second one works on what the first one left
    for i, batch in enumerate(split_batches(cmds)):
        res = t.vdk_io_raw('img.qcow2', batch, fmt='qcow2')
        no_failure(res, 'vdk io batch %d' % i)
        expect_eq(res.out.count('wrote ') + res.out.count('discard '), len(batch), "number of 'wrote'/'discard' lines",
                  res)
    t.sparse('mirror.raw', cfg.size)
    t.qemu_io('mirror.raw', *mirror)
    expect_bytes(t.content('mirror.raw'), model.bytes(), 'mirror written by qemu-io vs the model (test premise)')
    qemu_check_clean(t, 'img.qcow2')
    qemu_compare_identical(t, 'img.qcow2', 'mirror.raw')
    checks = read_checks(model)
    no_failure(t.qemu_io_raw('img.qcow2', checks, fmt='qcow2', extra=['-r']), 'qemu-io read -P of vdk-written data')
    # the header still says what was asked for
    res = t.qemu_img('info', '--output=json', 'img.qcow2')
    info = parse_json(res, 'qemu-img info')
    spec = info['format-specific']['data']
    expect_eq(info['cluster-size'], cfg.cluster, 'cluster size after the writes')
    expect_eq(spec['compat'], '0.10' if cfg.v2 else '1.1', 'compat after the writes')
    if not cfg.v2:
        expect_eq(spec.get('extended-l2', False), cfg.extl2, 'extended-l2 after the writes')


# ---------------------------------------------------------------------------
# random model test


MODEL_SIZE = 16 * MiB
MODEL_OPS = 150
MODEL_BATCHES = 4


def rand_op(rnd, size, cs):
    r = rnd.random()
    if r < 0.12:        # cluster-aligned discard
        n = rnd.randrange(1, 4)
        off = rnd.randrange(0, size // cs - n + 1) * cs
        return 'discard', off, n * cs
    kind = rnd.random()
    if kind < 0.25:     # 4k aligned
        length = rnd.randrange(1, 33) * 4096
        off = rnd.randrange(0, (size - length) // 4096 + 1) * 4096
    elif kind < 0.4:    # 512 aligned
        length = rnd.randrange(1, 129) * 512
        off = rnd.randrange(0, (size - length) // 512 + 1) * 512
    elif kind < 0.5:    # tiny
        length = rnd.randrange(1, 16)
        off = rnd.randrange(0, size - length + 1)
    elif kind < 0.55:   # touching the end
        length = rnd.randrange(1, 20000)
        off = size - length
    elif kind < 0.65:   # crossing a cluster boundary
        length = rnd.randrange(2, 3 * cs)
        off = max(0, min(size - length, rnd.randrange(1, size // cs) * cs - rnd.randrange(1, length)))
    else:               # anything
        length = rnd.randrange(1, 300000)
        off = rnd.randrange(0, size - length + 1)
    if r < 0.75:
        return 'write', off, length
    if r < 0.87:
        return 'zero', off, length
    return 'zero-unmap', off, length


def model_run(t, img, model, seed, cs):
    rnd = random.Random(seed)
    size = len(model)
    per_batch = (MODEL_OPS + MODEL_BATCHES - 1) // MODEL_BATCHES
    ops = 0
    batch = 0
    while ops < MODEL_OPS:
        cmds = []
        for _ in range(min(per_batch, MODEL_OPS - ops)):
            op, off, length = rand_op(rnd, size, cs)
            p = 0
            if op == 'write':
                p = rnd.randrange(1, 256)
                cmds.append('write -P 0x%02x %d %d' % (p, off, length))
                model[off:off + length] = bytes([p]) * length
            elif op == 'zero':
                cmds.append('write -z %d %d' % (off, length))
                model[off:off + length] = bytes(length)
            elif op == 'zero-unmap':
                cmds.append('write -z -u %d %d' % (off, length))
                model[off:off + length] = bytes(length)
            else:
                cmds.append('discard %d %d' % (off, length))
                model[off:off + length] = bytes(length)
            ops += 1
            if rnd.random() < 0.2:
                cmds.append('read -P 0x%02x %d %d' % (p, off, length))
            if rnd.random() < 0.05:
                cmds.append('flush')
        batch += 1
        no_failure(t.vdk_io_raw(img, cmds, fmt='qcow2'), 'vdk io batch %d' % batch)
    t.write_bytes('model.raw', bytes(model))
    qemu_check_clean(t, img)
    data = qemu_to_raw(t, img, 'out.raw')
    expect_bytes(data, bytes(model), 'qcow2 content (qemu-img convert) vs the model')


def t_model_plain(t, seed):
    expect_rc(t.vdk('create', '-q', '-f', 'qcow2', 'img.qcow2', str(MODEL_SIZE)), 0, 'vdk create')
    model_run(t, 'img.qcow2', bytearray(MODEL_SIZE), seed, 64 * KiB)


def t_model_backing(t, seed):
    """extended L2 (64k clusters, 2k subclusters) over a qcow2 backing file
    that qemu filled with data."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'base.qcow2', str(MODEL_SIZE)), 0)
    rnd = random.Random(seed + 7)
    base_cmds = ['write -P 0x%02x %d %d' % (rnd.randrange(1, 256), i * MiB + rnd.randrange(0, 4096),
                                             rnd.randrange(100, 700 * KiB)) for i in range(0, 16, 2)]
    base_cmds.append('write -P 0xee %d 4096' % (MODEL_SIZE - 4096))
    t.qemu_io('base.qcow2', *base_cmds, fmt='qcow2')
    expect_rc(t.vdk('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'base.qcow2', '-F', 'qcow2',
                    'img.qcow2'), 0, 'vdk create -b')
    base = qemu_to_raw(t, 'base.qcow2', 'base.raw')
    before = hashlib.sha256(t.content('base.qcow2')).hexdigest()
    model_run(t, 'img.qcow2', bytearray(base), seed, 64 * KiB)
    expect_eq(hashlib.sha256(t.content('base.qcow2')).hexdigest(), before, 'checksum of the backing file')


# ---------------------------------------------------------------------------
# writing to the top of a backing chain


def sha(t, name):
    return hashlib.sha256(t.content(name)).hexdigest()


def t_chain_write(t, maker):
    size, _ = maker(t)
    lower = sorted('sub/' + n for n in os.listdir(t.path('sub')) if n != 'top.qcow2')
    sums = {n: sha(t, n) for n in lower}
    model = bytearray(qemu_to_raw(t, 'sub/top.qcow2', 'before.raw'))
    cmds = []

    def w(p, off, length):
        cmds.append('write -P 0x%02x %d %d' % (p, off, length))
        model[off:off + length] = bytes([p]) * length

    def z(off, length, unmap=False):
        cmds.append('write -z %s%d %d' % ('-u ' if unmap else '', off, length))
        model[off:off + length] = bytes(length)

    # partial-cluster writes over backing data: the rest of the cluster must
    # be copied from below
    w(0xa1, 100, 10)
    w(0xa2, MiB + 4000, 300)
    w(0xa3, 3 * MiB - 7, 14)
    w(0xa4, 6 * MiB + 60, 2000)
    w(0xa5, 10 * MiB + 5000, 70000)
    w(0xa6, 8 * MiB + 100, 5)
    z(5 * MiB + 1000, 3000)
    z(2 * MiB + 512, 512, unmap=True)
    w(0xa7, 16 * MiB + 512, 1024)
    w(0xa8, size - 5, 5)
    no_failure(t.vdk_io_raw('sub/top.qcow2', cmds, fmt='qcow2'), 'vdk io on the top of the chain')
    t.write_bytes('model.raw', bytes(model))
    qemu_compare_identical(t, 'sub/top.qcow2', 'model.raw')
    qemu_check_clean(t, 'sub/top.qcow2')
    for n in lower:
        expect_eq(sha(t, n), sums[n], 'checksum of %s' % n)
    # and vdk reads its own writes through the chain
    no_failure(t.vdk_io_raw('sub/top.qcow2', read_checks(Model(size, model)), fmt='qcow2', extra=['-r']),
               'vdk io read -P of the chain')


def t_compressed_overwrite(t, opts):
    """vdk compresses into clusters that already hold data (plain or
    compressed); the old clusters are released and qemu sees the new data."""
    expect_rc(t.vdk('create', '-q', '-f', 'qcow2', '-o', opts, 'img.qcow2', '16M'), 0, 'vdk create')
    cs = parse_json(t.qemu_img('info', '--output=json', 'img.qcow2'), 'qemu-img info')['cluster-size']
    m = Model(16 * MiB)
    cmds = []
    for p, off, n, c in ((0x11, 0, 4 * cs, False), (0x12, cs, cs, True), (0x13, cs, cs, True),
                         (0x14, 2 * cs, 2 * cs, True), (0x15, 2 * cs + 100, 10, False), (0x16, 8 * cs, cs, True),
                         (0x17, 8 * cs, cs, False), (0x18, 16 * MiB - cs, cs, True)):
        cmds.append('write %s-P 0x%02x %d %d' % ('-c ' if c else '', p, off, n))
        m.write(off, n, p)
    no_failure(t.vdk_io_raw('img.qcow2', cmds, fmt='qcow2'), 'vdk io write -c')
    qemu_check_clean(t, 'img.qcow2')
    expect_bytes(qemu_to_raw(t, 'img.qcow2', 'out.raw'), m.bytes(), 'content vs the model')
    res = t.qemu_img('check', '--output=json', 'img.qcow2')
    j = parse_json(res, 'qemu-img check')
    expect(j.get('compressed-clusters', 0) >= 3, 'fewer than 3 compressed clusters: %r' % j, res)


def t_v2_backing_zeroes(t):
    """compat=0.10 has no zero flag: zero writes over backing data must
    still read as zeroes."""
    t.sparse('base.raw', 16 * MiB)
    t.qemu_io('base.raw', 'write -P 0x99 0 16M')
    expect_rc(t.vdk('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'base.raw', '-F', 'raw', 'img.qcow2'), 0,
              'vdk create')
    cmds = ['write -z 0 64k', 'write -z -u 1M 128k', 'write -z %d 1000' % (3 * MiB + 10),
            'write -z -u %d 4096' % (4 * MiB), 'write -z %d 3' % (16 * MiB - 3)]
    no_failure(t.vdk_io_raw('img.qcow2', cmds, fmt='qcow2'), 'vdk io write -z')
    qemu_check_clean(t, 'img.qcow2')
    m = Model(16 * MiB, b'\x99' * (16 * MiB))
    for off, n in ((0, 65536), (MiB, 131072), (3 * MiB + 10, 1000), (4 * MiB, 4096), (16 * MiB - 3, 3)):
        m.zero(off, n)
    expect_bytes(qemu_to_raw(t, 'img.qcow2', 'out.raw'), m.bytes(), 'content vs the model')


for cfg in CONFIGS:
    suite.add('qcow2-write/%s/create' % cfg.name, t_create, cfg)
    suite.add('qcow2-write/%s/io-mix' % cfg.name, t_mix, cfg)
for what, variants in SPELLINGS:
    suite.add('qcow2-write/create-option-spelling/%s' % what, t_create_spelling, variants)
suite.add('qcow2-write/create-backing-relative', t_create_backing)
suite.add('qcow2-write/create-backing-checks', t_create_backing_checks)
for name in ('cluster512', 'compat0.10', 'extl2-64k', 'refcount1', 'prealloc-metadata', 'zstd'):
    suite.add('qcow2-write/%s/io-mix-qemu-created' % name, t_mix, CONFIG_BY_NAME[name], 'qemu')
for name, maker in CHAINS:
    suite.add('qcow2-write-chain/%s' % name, t_chain_write, maker)
suite.add('qcow2-write/compressed-overwrite/64k', t_compressed_overwrite, 'cluster_size=65536')
suite.add('qcow2-write/compressed-overwrite/16k-zstd-extl2', t_compressed_overwrite,
          'cluster_size=16384,compression_type=zstd,extended_l2=on')
suite.add('qcow2-write/compressed-overwrite/512-compat0.10', t_compressed_overwrite, 'cluster_size=512,compat=0.10')
suite.add('qcow2-write/compat0.10-backing-write-zeroes', t_v2_backing_zeroes)
for name in ENGINE_CONFIGS:
    suite.add_io('qcow2-write/%s/io-mix' % name, t_mix, CONFIG_BY_NAME[name])
for i, (e, c) in enumerate((e, c) for e in ('io_uring', 'native', 'threads') for c in ('none', 'writeback')):
    suite.add_io('qcow2-write/random-model-64k', t_model_plain, 3000 + i, engines=(e,), caches=(c,))
    suite.add_io('qcow2-write/random-model-extl2-backing', t_model_backing, 4000 + i, engines=(e,), caches=(c,))

if __name__ == '__main__':
    main(suite)
