#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""qcow2 operations: convert to qcow2 (options, -B), resize (grow, shrink),
check and repair of injected refcount errors, lazy refcounts after a crash,
the corrupt bit, and refused features (unknown incompatible bits, encryption,
external data files)."""

import hashlib
import os
import random
import re
import signal
import struct

from vdktest import KiB, MiB, Suite, expect, expect_eq, expect_rc, main
from qcow2util import (CHAINS, CONFIG_BY_NAME, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, EXT_DATA_FILE,
                       add_feature_name, compare_json, compare_text, expect_bytes, expect_single_error,
                       feature_names, get_refcount, mix_commands, no_failure, parse_json, qemu_check_clean,
                       qemu_compare_identical, qemu_to_raw, read_header, set_crypt_method, set_incompat,
                       set_refcount, write_extensions)

suite = Suite('qcow2-ops')
SIZE = 32 * MiB


def sha(t, name):
    return hashlib.sha256(t.content(name)).hexdigest()


def qemu_info(t, name, *extra):
    res = t.qemu_img('info', '--output=json', *extra, name)
    expect_rc(res, 0, 'qemu-img info')
    return parse_json(res, 'qemu-img info')


def qemu_check_json(t, name):
    res = t.qemu_img('check', '--output=json', name)
    return parse_json(res, 'qemu-img check'), res


# ---------------------------------------------------------------------------
# convert


def raw_source(t, name='src.raw', size=SIZE, seed=5):
    """A raw file with scattered data (unaligned, at the end) and an
    allocated all-zero region."""
    rnd = random.Random(seed)
    t.sparse(name, size)
    cmds = ['write -P 0x%02x %d %d' % (rnd.randrange(1, 256), o, n)
            for o, n in ((1000, 3000), (5 * MiB, MiB), (7 * MiB + 4095, 1), (size - 3864, 3864))]
    for _ in range(30):
        n = rnd.choice((1, 511, 4096, 65536, rnd.randrange(1, 300 * KiB)))
        cmds.append('write -P 0x%02x %d %d' % (rnd.randrange(1, 256), rnd.randrange(0, size - n), n))
    cmds.append('write -P 0 %d %d' % (20 * MiB, MiB))
    t.qemu_io(name, *cmds)
    return name


def vdk_convert(t, *args):
    extra = ['--aio=' + t.engine, '-t', t.cache, '-T', t.cache] if t.engine else []
    res = t.vdk('convert', *extra, *args)
    expect_rc(res, 0, 'vdk convert')
    expect_eq(res.err, '', 'vdk convert stderr', res)
    return res


def expect_options(t, name, opts):
    info = qemu_info(t, name)
    spec = info['format-specific']['data']
    kv = dict(o.split('=', 1) for o in opts.split(',') if o)
    if 'cluster_size' in kv:
        expect_eq(info['cluster-size'], int(kv['cluster_size']), 'cluster size of the target')
    expect_eq(spec['compat'], '0.10' if kv.get('compat') == '0.10' else '1.1', 'compat of the target')
    if 'compression_type' in kv:
        expect_eq(spec['compression-type'], kv['compression_type'], 'compression type of the target')
    if 'extended_l2' in kv:
        expect_eq(spec['extended-l2'], kv['extended_l2'] == 'on', 'extended-l2 of the target')
    if 'refcount_bits' in kv:
        expect_eq(spec['refcount-bits'], int(kv['refcount_bits']), 'refcount bits of the target')
    if 'lazy_refcounts' in kv:
        expect_eq(spec['lazy-refcounts'], kv['lazy_refcounts'] == 'on', 'lazy refcounts of the target')


def allocated_clusters(t, name):
    j, res = qemu_check_json(t, name)
    expect_rc(res, 0, 'qemu-img check --output=json')
    return j['allocated-clusters']


def t_convert_from_raw(t, opts):
    raw_source(t)
    o = ['-o', opts] if opts else []
    vdk_convert(t, '-f', 'raw', '-O', 'qcow2', *o, 'src.raw', 'out.qcow2')
    qemu_check_clean(t, 'out.qcow2')
    qemu_compare_identical(t, 'src.raw', 'out.qcow2', 'raw', 'qcow2')
    expect_options(t, 'out.qcow2', opts)
    # as sparse as qemu-img convert's result: zero runs stay unallocated
    expect_rc(t.qemu_img('convert', '-f', 'raw', '-O', 'qcow2', *o, 'src.raw', 'ref.qcow2'), 0, 'qemu-img convert')
    va, qa = allocated_clusters(t, 'out.qcow2'), allocated_clusters(t, 'ref.qcow2')
    expect(va <= qa, 'vdk convert allocated %d clusters, qemu-img convert %d' % (va, qa))


def t_convert_from_qcow2(t, src_cfg, opts):
    cfg = CONFIG_BY_NAME[src_cfg]
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', *cfg.create_args()), 0)
    cmds, _, _, model = mix_commands(cfg)
    t.qemu_io('img.qcow2', *cmds, fmt='qcow2')
    o = ['-o', opts] if opts else []
    vdk_convert(t, '-O', 'qcow2', *o, 'img.qcow2', 'out.qcow2')
    qemu_check_clean(t, 'out.qcow2')
    qemu_compare_identical(t, 'img.qcow2', 'out.qcow2', 'qcow2', 'qcow2')
    expect_bytes(qemu_to_raw(t, 'out.qcow2', 'out.raw'), model.bytes(), 'converted content vs the model')
    expect_options(t, 'out.qcow2', opts)


def t_convert_chain(t, maker):
    """A backing chain is flattened into a standalone image."""
    maker(t)
    vdk_convert(t, '-O', 'qcow2', '-o', 'cluster_size=4096', 'sub/top.qcow2', 'flat.qcow2')
    qemu_check_clean(t, 'flat.qcow2')
    qemu_compare_identical(t, 'sub/top.qcow2', 'flat.qcow2', 'qcow2', 'qcow2')
    info = qemu_info(t, 'flat.qcow2')
    expect('backing-filename' not in info, 'the flattened image has a backing file: %r' % info.get('backing-filename'))


def t_convert_backing(t, src_fmt, fmt_args=('-F', 'raw')):
    """vdk convert -B base.raw -F raw: the backing file is recorded and the
    target reads like the source."""
    t.sparse('base.raw', SIZE)
    t.qemu_io('base.raw', 'write -P 0x11 0 8M', 'write -P 0x12 %d 4096' % (SIZE - 4096), 'write -P 0x13 20M 3M')
    if src_fmt == 'raw':
        with open(t.path('base.raw'), 'rb') as f, open(t.path('src.img'), 'wb') as g:
            g.write(f.read())
        src = ['-f', 'raw', 'src.img']
    else:
        expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'src.img'), 0)
        src = ['-f', 'qcow2', 'src.img']
    t.qemu_io('src.img', 'write -P 0x21 1000 3000', 'write -z 2M 1M', 'write -P 0x22 %d 100' % (SIZE - 100),
              'write -P 0x23 12M 64k', fmt=src_fmt)
    res = t.qemu_img('convert', *src, '-O', 'qcow2', '-B', 'base.raw', '-F', 'raw', 'ref.qcow2')
    expect_rc(res, 0, 'qemu-img convert -B -F (test premise)')
    vdk_convert(t, *src, '-O', 'qcow2', '-B', 'base.raw', *fmt_args, 'out.qcow2')
    info = qemu_info(t, 'out.qcow2')
    expect_eq(info.get('backing-filename'), 'base.raw', 'backing file recorded in the target')
    expect_eq(info.get('backing-filename-format'), 'raw', 'backing file format recorded in the target')
    expect_eq(info['virtual-size'], SIZE, 'virtual size of the target')
    qemu_check_clean(t, 'out.qcow2')
    qemu_compare_identical(t, 'src.img', 'out.qcow2', src_fmt, 'qcow2')
    # the target reads like the source without the help of the backing file
    # only where it holds data itself; the rest must come from base.raw
    expect_bytes(qemu_to_raw(t, 'out.qcow2', 'out.raw'), qemu_to_raw(t, 'src.img', 'src-flat.raw', src_fmt),
                 'content of the target vs the source')


# ---------------------------------------------------------------------------
# resize


def resize_pair(t, cfg_opts, size, cmds):
    """img.qcow2 (for vdk) and ref.qcow2 (for qemu-img) with the same data."""
    for n in ('img.qcow2', 'ref.qcow2'):
        expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', cfg_opts, n, str(size)), 0)
        t.qemu_io(n, *cmds, fmt='qcow2')


def both_resize(t, *args, rc=0):
    rv = t.vdk('resize', *args[:-2], 'img.qcow2', args[-1]) if len(args) >= 2 else None
    rq = t.qemu_img('resize', *args[:-2], 'ref.qcow2', args[-1])
    expect_rc(rq, rc, 'qemu-img resize (test premise)')
    expect_eq(rv.rc, rq.rc, 'vdk resize exit code vs qemu-img', rv)
    expect_eq(rv.out, rq.out, 'vdk resize stdout vs qemu-img', rv)
    return rv, rq


def t_resize_grow(t, opts, size, new):
    cmds = ['write -P 0x31 0 64k', 'write -P 0x32 %d 5000' % (size // 2 - 1000), 'write -P 0x33 %d 3' % (size - 3)]
    resize_pair(t, opts, size, cmds)
    model = bytearray(qemu_to_raw(t, 'img.qcow2', 'before.raw'))
    both_resize(t, '-f', 'qcow2', 'img.qcow2', str(new))
    qemu_check_clean(t, 'img.qcow2')
    expect_eq(qemu_info(t, 'img.qcow2')['virtual-size'], new, 'virtual size after vdk resize')
    model += bytes(new - size)
    t.write_bytes('model.raw', bytes(model))
    qemu_compare_identical(t, 'img.qcow2', 'model.raw')
    qemu_compare_identical(t, 'img.qcow2', 'ref.qcow2', 'qcow2', 'qcow2')
    # the grown part is usable by vdk and qemu
    no_failure(t.vdk_io_raw('img.qcow2', ['write -P 0x34 %d 70000' % (new - 70000), 'write -P 0x35 %d 512' % size],
                            fmt='qcow2'), 'vdk io write in the grown part')
    no_failure(t.qemu_io_raw('img.qcow2', ['read -P 0x34 %d 70000' % (new - 70000), 'read -P 0x35 %d 512' % size,
                                           'read -P 0x33 %d 3' % (size - 3), 'read -P 0 %d %d' % (size + 512, MiB)],
                             fmt='qcow2'), 'qemu-io read back')
    qemu_check_clean(t, 'img.qcow2', 'qemu-img check after writing the grown part')
    # relative sizes
    both_resize(t, 'img.qcow2', '+1M')
    expect_eq(qemu_info(t, 'img.qcow2')['virtual-size'], new + MiB, 'virtual size after vdk resize +1M')
    qemu_check_clean(t, 'img.qcow2')


def t_resize_shrink(t, opts):
    size = SIZE
    cmds = ['write -P 0x41 0 1M', 'write -P 0x42 %d 300000' % (10 * MiB - 150000), 'write -P 0x43 20M 2M',
            'write -c -P 0x44 24M 64k', 'write -P 0x45 %d 4096' % (size - 4096)]
    resize_pair(t, opts, size, cmds)
    before = sha(t, 'img.qcow2')
    rv, rq = both_resize(t, 'img.qcow2', '10M', rc=1)
    expect_eq(sha(t, 'img.qcow2'), before, 'image after a refused shrink')
    norm = [re.sub(r'^(qemu-img|vdk)(: img\.qcow2|: ref\.qcow2)?: ', '', l) for l in (rv.err + rq.err).splitlines()]
    half = len(rv.err.splitlines())
    expect_eq(norm[:half], norm[half:], 'vdk resize stderr vs qemu-img (prefixes removed)', rv)
    model = qemu_to_raw(t, 'img.qcow2', 'before.raw')
    new = 10 * MiB
    both_resize(t, '--shrink', 'img.qcow2', str(new))
    qemu_check_clean(t, 'img.qcow2')
    expect_eq(qemu_info(t, 'img.qcow2')['virtual-size'], new, 'virtual size after vdk resize --shrink')
    expect_bytes(qemu_to_raw(t, 'img.qcow2', 'after.raw'), model[:new], 'content after shrinking')
    # grow again: the cut-off data must not come back
    both_resize(t, 'img.qcow2', str(size))
    qemu_check_clean(t, 'img.qcow2')
    expect_bytes(qemu_to_raw(t, 'img.qcow2', 'regrown.raw'), model[:new] + bytes(size - new),
                 'content after shrinking and growing again')
    qemu_compare_identical(t, 'img.qcow2', 'ref.qcow2', 'qcow2', 'qcow2')


# ---------------------------------------------------------------------------
# check and repair


def refcount_image(t, name, refcount_bits, cluster_size):
    """A qemu-written image with data clusters, and a free cluster inside
    the file (left by a discard)."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'refcount_bits=%d,cluster_size=%d'
                         % (refcount_bits, cluster_size), name, str(SIZE)), 0)
    cs = cluster_size
    t.qemu_io(name, 'write -P 0x51 0 %d' % (4 * cs), 'write -P 0x52 1M %d' % (2 * cs),
              'write -P 0x53 2M %d' % cs, 'write -P 0x54 %d 4096' % (SIZE - 4096), 'discard 1M %d' % cs, fmt='qcow2')
    qemu_check_clean(t, name, 'qemu-img check of the fresh image (test premise)')


def free_cluster(t, name):
    h = read_header(t.path(name))
    cs = h.cluster_size
    for c in range(1, t.size(name) // cs - 1):
        if get_refcount(t.path(name), c * cs) == 0:
            return c * cs
    raise AssertionError('no free cluster inside the file (test premise)')


def data_cluster(t, name):
    res = t.qemu_img('map', '--output=json', name)
    cs = read_header(t.path(name)).cluster_size
    for e in parse_json(res, 'qemu-img map'):
        if e.get('data') and 'offset' in e:
            return e['offset'] - e['offset'] % cs
    raise AssertionError('no data cluster (test premise)')


def inject(t, kind, bits, cs):
    refcount_image(t, 'img.qcow2', bits, cs)
    if kind == 'leak':
        off = free_cluster(t, 'img.qcow2')
        set_refcount(t.path('img.qcow2'), off, 1)
    else:
        off = data_cluster(t, 'img.qcow2')
        expect_eq(get_refcount(t.path('img.qcow2'), off), 1, 'refcount of a data cluster (test premise)')
        set_refcount(t.path('img.qcow2'), off, 0)
    with open(t.path('img.qcow2'), 'rb') as f, open(t.path('ref.qcow2'), 'wb') as g:
        g.write(f.read())
    return off


def t_check_injected(t, kind, bits, cs):
    """vdk check (no repair): same exit code, report and JSON as qemu-img."""
    inject(t, kind, bits, cs)
    before = sha(t, 'img.qcow2')
    want_rc = 3 if kind == 'leak' else 2
    rv, rq = compare_text(t, ['check', 'img.qcow2'], 'check', rc=want_rc)
    expect_eq(rv.err, rq.err, 'vdk check stderr vs qemu-img', rv)
    compare_json(t, ['check', '--output=json', '-f', 'qcow2', 'img.qcow2'], 'check --output=json', rc=want_rc)
    expect_eq(sha(t, 'img.qcow2'), before, 'image after vdk check without -r')


def strip_end_offset(text):
    return '\n'.join(l for l in text.splitlines() if not l.startswith('Image end offset: '))


def t_repair(t, kind, mode, bits, cs):
    """vdk check -r MODE repairs what qemu-img check -r MODE repairs, with the
    same exit code; the image is clean afterwards and reads like a copy
    repaired by qemu-img."""
    inject(t, kind, bits, cs)
    content = qemu_to_raw(t, 'img.qcow2', 'before.raw')
    rq = t.qemu_img('check', '-r', mode, 'ref.qcow2')
    rv = t.vdk('check', '-r', mode, 'img.qcow2')
    expect_eq(rv.rc, rq.rc, 'vdk check -r %s exit code vs qemu-img' % mode, rv)
    repaired = kind == 'leak' or mode == 'all'
    if repaired:
        expect_rc(rq, 0, 'qemu-img check -r %s (test premise)' % mode)
        qemu_check_clean(t, 'img.qcow2', 'qemu-img check after vdk check -r %s' % mode)
        qemu_compare_identical(t, 'img.qcow2', 'ref.qcow2', 'qcow2', 'qcow2')
        expect_bytes(qemu_to_raw(t, 'img.qcow2', 'after.raw'), content, 'content after the repair')
    else:
        # -r leaks cannot repair a refcount that is too low: both refuse
        expect_rc(rq, 1, 'qemu-img check -r leaks on a corruption (test premise)')
        expect(rv.err.splitlines() and rv.err.splitlines()[-1].startswith('vdk: '),
               'no vdk: error line after a refused repair', rv)
        jq, _ = qemu_check_json(t, 'ref.qcow2')
        jv, _ = qemu_check_json(t, 'img.qcow2')
        expect_eq(jv, dict(jq, filename='img.qcow2'), 'qemu-img check of the image after a refused vdk repair')
    # the report: equal to qemu-img's, except the image end offset (vdk
    # writes the rebuilt refcount structure past the end of the file)
    expect_eq(strip_end_offset(rv.out), strip_end_offset(rq.out), 'vdk check -r %s stdout vs qemu-img' % mode, rv)


def norm_err(text):
    return [re.sub(r'^(qemu-img|vdk)(: (img|ref)\.qcow2)?: ', '', l) for l in text.splitlines()]


def t_repair_messages(t, kind, mode):
    """The per-cluster messages of a repair (stderr) are qemu-img's."""
    inject(t, kind, 16, 65536)
    rq = t.qemu_img('check', '-r', mode, 'ref.qcow2')
    rv = t.vdk('check', '-r', mode, 'img.qcow2')
    expect_eq(norm_err(rv.err), norm_err(rq.err), 'vdk check -r %s stderr vs qemu-img (prefixes removed)' % mode, rv)


def t_repair_corrupt_bit(t, mode):
    """An image marked corrupt without any actual error: check -r clears
    the bit, as qemu-img does, so the image can be opened read-write again."""
    refcount_image(t, 'img.qcow2', 16, 65536)
    set_incompat(t.path('img.qcow2'), INCOMPAT_CORRUPT)
    with open(t.path('img.qcow2'), 'rb') as f, open(t.path('ref.qcow2'), 'wb') as g:
        g.write(f.read())
    rq = t.qemu_img('check', '-r', mode, 'ref.qcow2')
    expect_rc(rq, 0, 'qemu-img check -r (test premise)')
    expect(not read_header(t.path('ref.qcow2')).incompat & INCOMPAT_CORRUPT,
           'qemu-img check -r %s cleared the corrupt bit (test premise)' % mode)
    rv = t.vdk('check', '-r', mode, 'img.qcow2')
    expect_eq(rv.rc, rq.rc, 'exit code vs qemu-img', rv)
    expect_eq(rv.out, rq.out, 'stdout vs qemu-img', rv)
    expect(not read_header(t.path('img.qcow2')).incompat & INCOMPAT_CORRUPT,
           'vdk check -r %s left the corrupt bit set (qemu-img clears it)' % mode, rv)
    no_failure(t.vdk_io_raw('img.qcow2', ['write -P 0x61 0 4096'], fmt='qcow2'), 'vdk io write after the repair')


# ---------------------------------------------------------------------------
# lazy refcounts


def crashed_lazy_image(t, cs=65536):
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=%d' % cs,
                         'img.qcow2', str(SIZE)), 0)
    cmds = ['write -P 0x71 0 128k', 'write -P 0x72 %d 5000' % (3 * MiB + 100), 'write -P 0x73 %d 4096' % (SIZE - 4096),
            'write -z 64k 4096', 'flush', 'abort']
    res = t.qemu_io_raw('img.qcow2', cmds, fmt='qcow2')
    expect_eq(res.rc, -signal.SIGABRT, 'qemu-io abort exit status (test premise)', res)
    expect(read_header(t.path('img.qcow2')).incompat & INCOMPAT_DIRTY, 'dirty bit after the crash (test premise)')
    return ['read -P 0x71 0 64k', 'read -P 0 64k 4096', 'read -P 0x71 %d %d' % (68 * KiB, 60 * KiB),
            'read -P 0x72 %d 5000' % (3 * MiB + 100), 'read -P 0x73 %d 4096' % (SIZE - 4096),
            'read -P 0 %d 1M' % (4 * MiB)]


def t_lazy_crash(t, cs):
    reads = crashed_lazy_image(t, cs)
    info = compare_json(t, ['info', '--output=json', 'img.qcow2'], 'info --output=json of a dirty image')
    expect_eq(info.get('dirty-flag'), True, 'dirty-flag in vdk info --output=json')
    compare_text(t, ['check', 'img.qcow2'], 'check of a dirty image')
    # a read-only open reads the data and changes nothing
    before = sha(t, 'img.qcow2')
    no_failure(t.vdk_io_raw('img.qcow2', reads, fmt='qcow2', extra=['-r']), 'vdk io -r on a dirty image')
    expect_eq(sha(t, 'img.qcow2'), before, 'image after a read-only open')
    # a read-write open repairs it
    no_failure(t.vdk_io_raw('img.qcow2', reads, fmt='qcow2'), 'vdk io (read-write) on a dirty image')
    expect(not read_header(t.path('img.qcow2')).incompat & INCOMPAT_DIRTY,
           'dirty bit still set after a read-write open')
    qemu_check_clean(t, 'img.qcow2', 'qemu-img check after the repair on open')
    no_failure(t.qemu_io_raw('img.qcow2', reads, fmt='qcow2', extra=['-r']), 'qemu-io read back')
    expect_eq(qemu_info(t, 'img.qcow2').get('dirty-flag'), False, 'dirty-flag after the repair')


def t_lazy_write_after_crash(t):
    """Writes on the repairing open land correctly and leave a clean image."""
    reads = crashed_lazy_image(t)
    cmds = ['write -P 0x74 %d 70000' % (5 * MiB + 3), 'write -P 0x75 100 10']
    no_failure(t.vdk_io_raw('img.qcow2', cmds, fmt='qcow2'), 'vdk io write on a dirty image')
    qemu_check_clean(t, 'img.qcow2')
    reads = [r for r in reads if not r.startswith('read -P 0x71 0 ')]
    reads += ['read -P 0x74 %d 70000' % (5 * MiB + 3), 'read -P 0x71 0 100', 'read -P 0x75 100 10',
              'read -P 0x71 110 %d' % (64 * KiB - 110)]
    no_failure(t.qemu_io_raw('img.qcow2', reads, fmt='qcow2', extra=['-r']), 'qemu-io read back')


def t_lazy_vdk_dirty(t):
    """vdk with lazy refcounts sets the dirty bit while writing and clears it
    on a clean close."""
    expect_rc(t.vdk('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'img.qcow2', str(SIZE)), 0)
    no_failure(t.vdk_io_raw('img.qcow2', ['write -P 0x76 0 1M', 'write -P 0x77 %d 3' % (SIZE - 3)], fmt='qcow2'),
               'vdk io write')
    expect(not read_header(t.path('img.qcow2')).incompat & INCOMPAT_DIRTY, 'dirty bit after a clean close')
    qemu_check_clean(t, 'img.qcow2')
    no_failure(t.qemu_io_raw('img.qcow2', ['read -P 0x76 0 1M', 'read -P 0x77 %d 3' % (SIZE - 3)], fmt='qcow2'),
               'qemu-io read back')


# ---------------------------------------------------------------------------
# the corrupt bit


def t_corrupt_bit(t):
    refcount_image(t, 'img.qcow2', 16, 65536)
    set_incompat(t.path('img.qcow2'), INCOMPAT_CORRUPT)
    before = sha(t, 'img.qcow2')
    no_failure(t.vdk_io_raw('img.qcow2', ['read -P 0x51 0 256k', 'read -P 0x53 2M 64k'], fmt='qcow2', extra=['-r']),
               'vdk io -r on an image marked corrupt')
    info = compare_json(t, ['info', '--output=json', 'img.qcow2'], 'info --output=json of a corrupt image')
    expect_eq(info['format-specific']['data'].get('corrupt'), True, "'corrupt' in vdk info")
    res = t.vdk_io_raw('img.qcow2', ['write -P 0x01 0 512'], fmt='qcow2')
    expect_single_error(res, 'corrupt')
    res = t.vdk_io_raw('img.qcow2', ['read -P 0x51 0 512'], fmt='qcow2')
    expect_single_error(res, 'corrupt')
    res = t.vdk('resize', 'img.qcow2', '64M')
    expect_single_error(res, 'corrupt')
    expect_eq(sha(t, 'img.qcow2'), before, 'image after refused read-write opens')


# ---------------------------------------------------------------------------
# refused features


def plain_image(t):
    refcount_image(t, 'img.qcow2', 16, 65536)


def refused(t, *needles):
    before = sha(t, 'img.qcow2')
    for args in (['info', 'img.qcow2'], ['info', '--output=json', '-f', 'qcow2', 'img.qcow2'],
                 ['map', 'img.qcow2'], ['check', 'img.qcow2'], ['convert', '-O', 'raw', 'img.qcow2', 'out.raw'],
                 ['io', '-r', '-c', 'read 0 512', 'img.qcow2'], ['io', '-c', 'write 0 512', 'img.qcow2'],
                 ['resize', 'img.qcow2', '64M'], ['compare', 'img.qcow2', 'img.qcow2']):
        res = t.vdk(*args)
        if args[0] == 'compare':
            expect_rc(res, 2, 'vdk compare')
            lines = res.err.splitlines()
            expect(len(lines) == 1 and lines[0].startswith('vdk: '), 'expected one stderr line', res)
        else:
            expect_single_error(res, *needles)
        expect_eq(res.out, '', 'stdout of a refused %s' % args[0], res)
    expect(not os.path.exists(t.path('out.raw')), 'a refused convert left out.raw behind')
    expect_eq(sha(t, 'img.qcow2'), before, 'image after refused opens')


def t_unknown_incompat(t, named):
    plain_image(t)
    set_incompat(t.path('img.qcow2'), 1 << 10)
    needles = ['feature']
    if named:
        add_feature_name(t.path('img.qcow2'), 0, 10, 'frobnicate')
        expect_eq(feature_names(t.path('img.qcow2')).get((0, 10)), 'frobnicate', 'feature table (test premise)')
        needles.append('frobnicate')
    rq = t.qemu_img('info', 'img.qcow2')
    expect(rq.rc == 1 and ('frobnicate' in rq.err if named else 'Unknown incompatible feature' in rq.err),
           'qemu-img refuses the image (test premise)', rq)
    refused(t, *needles)


def t_crypt(t, method):
    plain_image(t)
    set_crypt_method(t.path('img.qcow2'), method)
    refused(t, 'encrypt')


def t_data_file(t, with_ext):
    if with_ext:
        # a real one, made by qemu-img
        expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'data_file=data.raw', 'img.qcow2', str(SIZE)), 0)
        t.qemu_io('img.qcow2', 'write -P 0x81 1M 64k', fmt='qcow2')
        expect(any(typ == EXT_DATA_FILE for typ, _ in read_header(t.path('img.qcow2')).extensions),
               'no data file header extension (test premise)')
    else:
        plain_image(t)
    set_incompat(t.path('img.qcow2'), INCOMPAT_DATA_FILE)
    refused(t, 'data file')


# ---------------------------------------------------------------------------

def t_unknown_extension_kept(t):
    """Header extensions vdk does not know are kept byte for byte when it
    rewrites the header (resize, the lazy-refcount dirty bit), and unknown
    autoclear bits are cleared, as the spec asks of such writers."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'img.qcow2', '16M'), 0)
    h = read_header(t.path('img.qcow2'))
    unknown = [(0x7a6b0001, b'vdk keeps this'), (0x7a6b0002, bytes(range(1, 20)))]
    write_extensions(t.path('img.qcow2'), list(h.extensions) + unknown)
    with open(t.path('img.qcow2'), 'r+b') as f:
        f.seek(88)
        f.write((1 << 7).to_bytes(8, 'big'))  # an autoclear bit vdk does not know
    qemu_check_clean(t, 'img.qcow2', 'qemu-img check of the prepared image (test premise)')
    no_failure(t.vdk_io_raw('img.qcow2', ['write -P 0x3c 0 1M', 'write -P 0x3d 5M 4096'], fmt='qcow2'), 'vdk io write')
    expect_rc(t.vdk('resize', 'img.qcow2', '40M'), 0, 'vdk resize')
    h2 = read_header(t.path('img.qcow2'))
    for ext in unknown:
        expect(ext in h2.extensions, 'extension 0x%x lost or changed by vdk' % ext[0])
    expect_eq(h2.autoclear, 0, 'autoclear bits after vdk wrote the image')
    expect_eq(h2.size, 40 * MiB, 'size in the header after vdk resize')
    qemu_check_clean(t, 'img.qcow2')
    no_failure(t.qemu_io_raw('img.qcow2', ['read -P 0x3c 0 1M', 'read -P 0x3d 5M 4096', 'read -P 0 16M 24M'],
                             fmt='qcow2', extra=['-r']), 'qemu-io read back')


def t_free_small_refcount_cache(t):
    """Frees whose refcount blocks are not cached (a 2 KiB refcount cache,
    512-byte clusters: ~100 refcount blocks) are fetched asynchronously and
    applied over several flushes; the image ends clean, holes punched."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'img.qcow2', '16M'), 0)
    t.qemu_io('img.qcow2', 'write -P 0x11 0 12M', fmt='qcow2')
    before = os.stat(t.path('img.qcow2')).st_blocks
    spec = 'driver=qcow2,file.filename=img.qcow2,refcount-cache-size=2k,l2-cache-size=64k'
    cmds = ['discard 0 6M', 'flush', 'flush', 'write -P 0x22 1M 4096', 'flush', 'discard 8M 1M', 'flush']
    no_failure(t.vdk_io_raw(spec, cmds, fmt=None, extra=['--image-opts']), 'vdk io discard with a tiny refcount cache')
    qemu_check_clean(t, 'img.qcow2')
    no_failure(t.qemu_io_raw('img.qcow2', ['read -P 0 0 1M', 'read -P 0x22 1M 4096', 'read -P 0 %d %d' % (MiB + 4096, 5 * MiB - 4096),
                                           'read -P 0x11 6M 2M', 'read -P 0 8M 1M', 'read -P 0x11 9M 3M'],
                             fmt='qcow2', extra=['-r']), 'qemu-io read back')
    after = os.stat(t.path('img.qcow2')).st_blocks
    expect(after * 512 < before * 512 - 6 * MiB, 'discarded clusters were not punched out (%d -> %d blocks)' % (before, after))
    # closing right after a large discard: every free is applied, none leaked
    no_failure(t.vdk_io_raw(spec, ['discard 0 16M'], fmt=None, extra=['--image-opts']), 'vdk io discard, then close')
    qemu_check_clean(t, 'img.qcow2', 'qemu-img check after a discard of everything and a close')


def t_check_bad_entries(t, how):
    """L2 entries pointing into a refcount block, past the end of the file
    and at an unaligned offset; an L1 entry past the end: vdk check reports
    them with qemu-img's messages, counters, JSON and exit code, and -r all
    repairs what qemu-img repairs."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', 'img.qcow2', '1G'), 0)
    t.qemu_io('img.qcow2', 'write -P 1 0 128k', 'write -P 2 32M 64k', fmt='qcow2')
    h = read_header(t.path('img.qcow2'))
    with open(t.path('img.qcow2'), 'r+b') as f:
        f.seek(h.l1_offset)
        l1 = [int.from_bytes(f.read(8), 'big') for _ in range(2)]
        l2 = l1[0] & 0x00fffffffffffe00
        f.seek(h.refcount_table_offset)
        rb = int.from_bytes(f.read(8), 'big')
        if how == 'l2':
            for idx, entry in ((1, rb), (2, 1 << 40), (3, rb + 512)):
                f.seek(l2 + 8 * idx)
                f.write(((1 << 63) | entry).to_bytes(8, 'big'))
        elif how == 'reftable':
            f.seek(h.refcount_table_offset)
            f.write((rb | 1).to_bytes(8, 'big'))
        else:
            f.seek(h.l1_offset + 8)
            f.write(((1 << 63) | (1 << 41)).to_bytes(8, 'big'))
    with open(t.path('img.qcow2'), 'rb') as f, open(t.path('ref.qcow2'), 'wb') as g:
        g.write(f.read())
    rv, rq = compare_text(t, ['check', 'img.qcow2'], 'check', rc=2)
    expect_eq(norm_err(rv.err), norm_err(rq.err), 'vdk check stderr vs qemu-img', rv)
    compare_json(t, ['check', '--output=json', 'img.qcow2'], 'check --output=json', rc=2)
    if how == 'reftable':
        # qemu-img 7.2 fails this repair ("Preventing invalid write on
        # metadata"); vdk rebuilds the structure
        expect_rc(t.vdk('check', '-r', 'all', 'img.qcow2'), 0, 'vdk check -r all')
        qemu_check_clean(t, 'img.qcow2')
        no_failure(t.qemu_io_raw('img.qcow2', ['read -P 1 0 128k', 'read -P 2 32M 64k'], fmt='qcow2', extra=['-r']),
                   'qemu-io read back after the repair')
        return
    rq = t.qemu_img('check', '-r', 'all', 'ref.qcow2')
    rv = t.vdk('check', '-r', 'all', 'img.qcow2')
    expect_eq(rv.rc, rq.rc, 'vdk check -r all exit code vs qemu-img', rv)
    expect_eq(strip_end_offset(rv.out), strip_end_offset(rq.out), 'vdk check -r all stdout vs qemu-img', rv)
    expect_eq(norm_err(rv.err), norm_err(rq.err), 'vdk check -r all stderr vs qemu-img', rv)
    jq, _ = qemu_check_json(t, 'ref.qcow2')
    jv, _ = qemu_check_json(t, 'img.qcow2')
    for j in (jq, jv):
        j.pop('image-end-offset', None)
        j.pop('filename', None)
    expect_eq(jv, jq, 'qemu-img check of the image repaired by vdk vs by qemu-img')


RAW_CONVERT_OPTS = ['', 'cluster_size=4096', 'cluster_size=512,refcount_bits=64', 'compat=0.10',
                    'compression_type=zstd', 'extended_l2=on,cluster_size=32768', 'refcount_bits=1,lazy_refcounts=on',
                    'cluster_size=2097152']
QCOW2_CONVERT = [('cluster4k', 'cluster_size=65536'), ('cluster64k', 'compat=0.10,cluster_size=512'),
                 ('zstd', 'compression_type=zlib,extended_l2=on'), ('extl2-64k', 'cluster_size=4096,refcount_bits=1'),
                 ('compat0.10', 'compression_type=zstd')]

for opts in RAW_CONVERT_OPTS:
    suite.add('qcow2-convert/raw-to-qcow2/%s' % (opts or 'default'), t_convert_from_raw, opts)
for src, opts in QCOW2_CONVERT:
    suite.add('qcow2-convert/qcow2-%s-to-qcow2/%s' % (src, opts), t_convert_from_qcow2, src, opts)
for name, maker in CHAINS:
    suite.add('qcow2-convert/chain-%s-flattened' % name, t_convert_chain, maker)
suite.add('qcow2-convert/raw-B-backing', t_convert_backing, 'raw')
suite.add('qcow2-convert/qcow2-with-backing-B-backing-o-backing_fmt', t_convert_backing, 'qcow2',
          ('-o', 'backing_fmt=raw'))
suite.add('qcow2-convert/raw-B-backing-o-backing_fmt', t_convert_backing, 'raw', ('-o', 'backing_fmt=raw'))
suite.add_io('qcow2-convert/raw-to-qcow2/cluster_size=4096', t_convert_from_raw, 'cluster_size=4096')
suite.add_io('qcow2-convert/qcow2-zstd-to-qcow2/extended_l2', t_convert_from_qcow2, 'zstd', 'extended_l2=on')

def t_convert_fails_cleanly(t):
    """A source whose metadata turns out bad part-way (an L1 entry with
    reserved bits after a zero range) fails the convert with the offset,
    like qemu-img, instead of hanging: the zero range planned before the
    failure must not keep the copy loop waiting (-n: it is a real
    write_zeroes request, not skipped)."""
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'img.qcow2', '8M'), 0)
    t.qemu_io('img.qcow2', 'write -P 7 2M 64k', fmt='qcow2')
    h = read_header(t.path('img.qcow2'))
    with open(t.path('img.qcow2'), 'r+b') as f:
        f.seek(h.l1_offset + 8)  # the L2 table covering 2M..4M
        f.write((0xffffffff00000000).to_bytes(8, 'big'))
    with open(t.path('out.raw'), 'wb') as f:
        f.truncate(8 * MiB)
    for extra in (['-n'], []):
        res = t.vdk('convert', '-O', 'raw', *extra, 'img.qcow2', 'out.raw', timeout=20)
        expect_eq(res.rc, 1, 'vdk convert %s exit code' % ' '.join(extra), res)
        expect('offset 2097152' in res.err and 'Input/output error' in res.err,
               'the error names the failing offset', res)
    expect(not os.path.exists(t.path('out.raw')), 'the failed convert left no target behind')


def compressed_clusters(path):
    """guest cluster index -> 'c' (compressed) or 'd' (data), from the L2 tables."""
    with open(path, 'rb') as f:
        h = f.read(104)
        cb = struct.unpack_from('>I', h, 20)[0]
        l1n = struct.unpack_from('>I', h, 36)[0]
        l1o = struct.unpack_from('>Q', h, 40)[0]
        cs = 1 << cb
        n = cs // 8
        f.seek(l1o)
        l1 = struct.unpack('>%dQ' % l1n, f.read(8 * l1n))
        res = {}
        for i, e in enumerate(l1):
            t = e & 0x00fffffffffffe00
            if not t:
                continue
            f.seek(t)
            for j, x in enumerate(struct.unpack('>%dQ' % n, f.read(cs))):
                if x & (1 << 62):
                    res[i * n + j] = 'c'
                elif x & 0x00fffffffffffe00:
                    res[i * n + j] = 'd'
        return res


def t_convert_compressed(t, opts):
    """convert -c: the same clusters compressed as qemu-img convert -c (an
    incompressible cluster does not stop compression of the ones after it),
    qemu-img check clean, the same content."""
    words = b'the quick brown fox jumps over the lazy dog 0123456789\n'
    text = (words * (MiB // len(words) + 1))[:MiB]
    rng = random.Random(7)
    with open(t.path('src.raw'), 'wb') as f:
        f.truncate(24 * MiB + 12345)
        for k in range(24):
            f.seek(k * MiB)
            kind = rng.randrange(4)
            if kind == 0:
                f.write(rng.randbytes(MiB))  # incompressible
            elif kind == 1:
                f.write(text)
            elif kind == 2:
                f.seek(k * MiB + rng.randrange(0, MiB - 8192, 512))
                f.write(os.urandom(rng.randrange(1, 8192)))
        f.seek(24 * MiB)
        f.write(text[:12345])
    args = ['-O', 'qcow2'] + (['-o', opts] if opts else []) + ['src.raw']
    expect_rc(t.vdk('convert', '-c', *args, 'v.qcow2'), 0, 'vdk convert -c')
    expect_rc(t.qemu_img('convert', '-c', *args, 'q.qcow2'), 0, 'qemu-img convert -c')
    qemu_check_clean(t, 'v.qcow2')
    res = t.qemu_img('compare', 'v.qcow2', 'src.raw')
    expect(res.rc == 0, 'vdk convert -c: same content', res)
    cv, cq = compressed_clusters(t.path('v.qcow2')), compressed_clusters(t.path('q.qcow2'))
    expect(sum(1 for v in cv.values() if v == 'c') > 0, 'some clusters are compressed')
    diff = sorted(g for g in set(cv) | set(cq) if cv.get(g) != cq.get(g))
    expect(not diff, 'the same clusters compressed/stored as qemu-img (first differences: %r)' %
           [(g, cv.get(g), cq.get(g)) for g in diff[:5]])
    res = t.vdk('convert', '-c', '-O', 'raw', 'src.raw', 'x.raw')
    expect(res.rc == 1 and 'Compression not supported for this file format' in res.err, '-c to raw refused', res)


suite.add('qcow2-convert/bad-l1-entry-fails-cleanly', t_convert_fails_cleanly)
for opts in ('', 'cluster_size=4096', 'compression_type=zstd,cluster_size=16384', 'compat=0.10,cluster_size=2M'):
    suite.add('qcow2-convert/compressed/%s' % (opts or 'default'), t_convert_compressed, opts)

suite.add('qcow2-resize/grow-512-L1-grows', t_resize_grow, 'cluster_size=512', 16 * MiB, 64 * MiB)
suite.add('qcow2-resize/grow-64k', t_resize_grow, 'cluster_size=65536', 16 * MiB, 48 * MiB + 12345 * 512)
suite.add('qcow2-resize/grow-extl2-lazy', t_resize_grow, 'extended_l2=on,lazy_refcounts=on', 16 * MiB, 40 * MiB)
suite.add('qcow2-resize/grow-compat0.10-refcount', t_resize_grow, 'compat=0.10,cluster_size=4096', 8 * MiB, 600 * MiB)
suite.add('qcow2-resize/shrink-64k', t_resize_shrink, 'cluster_size=65536')
suite.add('qcow2-resize/shrink-4k-extl2', t_resize_shrink, 'cluster_size=16384,extended_l2=on')

for bits, cs in ((16, 65536), (1, 65536), (64, 4096), (16, 512)):
    for kind in ('leak', 'error'):
        tag = 'refcount%d-cluster%d' % (bits, cs)
        suite.add('qcow2-check/%s/%s' % (kind, tag), t_check_injected, kind, bits, cs)
        for mode in ('leaks', 'all'):
            suite.add('qcow2-check/%s/-r-%s/%s' % (kind, mode, tag), t_repair, kind, mode, bits, cs)
for kind in ('leak', 'error'):
    for mode in ('leaks', 'all'):
        suite.add('qcow2-check/%s/-r-%s/messages' % (kind, mode), t_repair_messages, kind, mode)
for mode in ('leaks', 'all'):
    suite.add('qcow2-check/corrupt-bit-cleared-by-r-%s' % mode, t_repair_corrupt_bit, mode)

suite.add('qcow2-lazy-refcounts/crash-64k', t_lazy_crash, 65536)
suite.add('qcow2-lazy-refcounts/crash-4k', t_lazy_crash, 4096)
suite.add('qcow2-lazy-refcounts/write-after-crash', t_lazy_write_after_crash)
suite.add('qcow2-lazy-refcounts/vdk-clean-close', t_lazy_vdk_dirty)
suite.add('qcow2-corrupt-bit/read-only-only', t_corrupt_bit)
suite.add('qcow2-header/unknown-extensions-kept', t_unknown_extension_kept)
suite.add('qcow2-check/bad-l2-entries', t_check_bad_entries, 'l2')
suite.add('qcow2-check/l1-entry-past-eof', t_check_bad_entries, 'l1')
suite.add('qcow2-check/refcount-table-reserved-bits', t_check_bad_entries, 'reftable')
suite.add_io('qcow2-discard/frees-with-small-refcount-cache', t_free_small_refcount_cache)

suite.add('qcow2-refused/unknown-incompatible-bit', t_unknown_incompat, False)
suite.add('qcow2-refused/unknown-incompatible-bit-named', t_unknown_incompat, True)
suite.add('qcow2-refused/crypt-aes', t_crypt, 1)
suite.add('qcow2-refused/crypt-luks', t_crypt, 2)
suite.add('qcow2-refused/external-data-file-bit', t_data_file, False)
suite.add('qcow2-refused/external-data-file', t_data_file, True)

if __name__ == '__main__':
    main(suite)
