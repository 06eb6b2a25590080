#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""qemu -> vdk: images written by qemu-img/qemu-io, read by vdk.

For every configuration of the qcow2 matrix (cluster sizes, compat levels,
refcount widths, lazy refcounts, extended L2, compression types,
preallocation modes) qemu-io writes a mix of patterns, unaligned requests,
zero writes, discards, compressed clusters and data at the very end; vdk
must then convert it to the same bytes as qemu-img convert, verify the
patterns with vdk io, and print the same map, info and check output as
qemu-img.  Backing chains (raw and qcow2 layers, relative names, a
subdirectory) are read through vdk and compared the same way."""

import os

from vdktest import MiB, Suite, expect, expect_eq, expect_rc, main
from qcow2util import (CHAINS, CONFIGS, CONFIG_BY_NAME, ENGINE_CONFIGS, Model, cached, compare_json, compare_text,
                       expect_bytes, mix_commands, no_failure, qemu_to_raw, read_checks)

suite = Suite('qcow2-read')


def build_image(t, cfg):
    res = t.qemu_img('create', '-q', '-f', 'qcow2', *cfg.create_args())
    expect_rc(res, 0, 'qemu-img create (test premise)')
    cmds, _, _, model = mix_commands(cfg)
    t.qemu_io('img.qcow2', *cmds, fmt='qcow2')
    return model


def make_image(t, cfg):
    """img.qcow2 written by qemu-io (built once per configuration); returns
    the model."""
    return cached(t, 'mix-' + cfg.name, ['img.qcow2'], lambda t: build_image(t, cfg))


def t_convert(t, cfg):
    model = make_image(t, cfg)
    ref = qemu_to_raw(t, 'img.qcow2', 'ref.raw')
    expect_bytes(ref, model.bytes(), 'qemu-img convert vs the model (test premise)')
    args = ['convert', '-f', 'qcow2', '-O', 'raw']
    if t.engine:
        args += ['--aio=' + t.engine, '-T', t.cache]
    res = t.vdk(*args, 'img.qcow2', 'out.raw')
    expect_rc(res, 0, 'vdk convert')
    expect_bytes(t.content('out.raw'), ref, 'vdk convert -O raw vs qemu-img convert -O raw')
    # probing picks qcow2 too, and vdk compare agrees
    res = t.vdk('convert', '-O', 'raw', 'img.qcow2', 'probed.raw')
    expect_rc(res, 0, 'vdk convert (format probed)')
    expect_bytes(t.content('probed.raw'), ref, 'vdk convert (format probed) vs qemu-img convert')
    res = t.vdk('compare', '-f', 'qcow2', '-F', 'raw', 'img.qcow2', 'ref.raw')
    expect(res.rc == 0 and 'Images are identical.' in res.out, 'vdk compare qcow2 vs raw', res)


def t_io_read(t, cfg):
    model = make_image(t, cfg)
    checks = read_checks(model)
    res = t.vdk_io_raw('img.qcow2', checks, fmt='qcow2', extra=['-r'])
    no_failure(res, 'vdk io read -P')
    expect_eq(res.out.count('read '), len(checks), "number of 'read' lines", res)
    # and a wrong pattern is noticed
    first = checks[0].split()
    bad = 'read -P 0x%02x %s %s' % ((int(first[2], 16) + 1) % 256, first[3], first[4])
    res = t.vdk_io_raw('img.qcow2', [bad], fmt='qcow2', extra=['-r'])
    expect_rc(res, 1, 'read with a wrong pattern')
    expect('Pattern verification failed' in res.out + res.err, 'no pattern failure reported', res)


def t_map_sparse_host(t, cfg):
    """qemu-img map on the image as qemu-io left it: the host file has holes
    inside allocated clusters.  When the host file occupies less than 90% of
    the clusters its refcounts claim, qemu's qcow2 driver assumes metadata
    preallocation and reports the host file's holes inside data clusters as
    "zero": true (qcow2_detect_metadata_preallocation), so such data
    clusters are split into data/zero entries.  vdk must print the same."""
    make_image(t, cfg)
    compare_json(t, ['map', '--output=json', '-f', 'qcow2', 'img.qcow2'], 'map --output=json')


def densify(t, name):
    """Fill the holes of the host file (same bytes, no holes), so that
    qemu-img map does not look below the qcow2 layer."""
    data = t.content(name)
    os.unlink(t.path(name))
    t.write_bytes(name, data)


def t_map(t, cfg):
    make_image(t, cfg)
    densify(t, 'img.qcow2')
    compare_json(t, ['map', '--output=json', '-f', 'qcow2', 'img.qcow2'], 'map --output=json')
    compare_json(t, ['map', '--output=json', '--start-offset=%d' % (MiB + 4096 + 3), '--max-length=%d' % (9 * MiB),
                     'img.qcow2'], 'map --output=json --start-offset --max-length')
    compare_text(t, ['map', '-f', 'qcow2', 'img.qcow2'], 'map (human)')


def t_info(t, cfg):
    make_image(t, cfg)
    compare_json(t, ['info', '--output=json', '-f', 'qcow2', 'img.qcow2'], 'info --output=json')
    compare_json(t, ['info', '--output=json', 'img.qcow2'], 'info --output=json (format probed)')
    compare_text(t, ['info', 'img.qcow2'], 'info (human)', rc=0)


def t_check(t, cfg):
    make_image(t, cfg)
    compare_text(t, ['check', 'img.qcow2'], 'check', rc=0)
    compare_json(t, ['check', '-f', 'qcow2', '--output=json', 'img.qcow2'], 'check --output=json')


def t_io_map(t, cfg):
    """vdk io's map and alloc commands print what qemu-io prints."""
    make_image(t, cfg)
    size = cfg.size
    cmds = ['map', 'alloc 0', 'alloc 0 %d' % size, 'alloc 1000 3000', 'alloc %d %d' % (size // 2, 3 * cfg.cluster),
            'alloc %d 1' % (size - 1), 'length']
    rq = t.qemu_io_raw('img.qcow2', cmds, fmt='qcow2', extra=['-r'])
    no_failure(rq, 'qemu-io (test premise)')
    rv = t.vdk_io_raw('img.qcow2', cmds, fmt='qcow2', extra=['-r'])
    expect_eq(rv.rc, rq.rc, 'exit code vs qemu-io', rv)
    expect_eq(rv.out, rq.out, 'vdk io map/alloc output vs qemu-io', rv)


# ---------------------------------------------------------------------------
# backing chains (built by qcow2util.CHAINS in sub/)


def t_chain_convert(t, maker):
    maker(t)
    ref = qemu_to_raw(t, 'sub/top.qcow2', 'ref.raw')
    res = t.vdk('convert', '-f', 'qcow2', '-O', 'raw', 'sub/top.qcow2', 'out.raw')
    expect_rc(res, 0, 'vdk convert')
    expect_bytes(t.content('out.raw'), ref, 'vdk convert of the chain vs qemu-img convert')
    # and from inside the subdirectory
    res = t.vdk('convert', '-O', 'raw', 'top.qcow2', '../out2.raw', cwd=t.path('sub'))
    expect_rc(res, 0, 'vdk convert (cwd sub/)')
    expect_bytes(t.content('out2.raw'), ref, 'vdk convert of the chain (cwd sub/) vs qemu-img convert')


def t_chain_io(t, maker):
    maker(t)
    ref = qemu_to_raw(t, 'sub/top.qcow2', 'ref.raw')
    checks = read_checks(Model(len(ref), ref))
    res = t.vdk_io_raw('sub/top.qcow2', checks, fmt='qcow2', extra=['-r'])
    no_failure(res, 'vdk io read -P through the chain')
    expect_eq(res.out.count('read '), len(checks), "number of 'read' lines", res)


def t_chain_info(t, maker):
    maker(t)
    compare_json(t, ['info', '--backing-chain', '--output=json', 'sub/top.qcow2'], 'info --backing-chain --output=json')
    compare_json(t, ['info', '--output=json', 'sub/top.qcow2'], 'info --output=json')
    compare_text(t, ['info', '--backing-chain', 'sub/top.qcow2'], 'info --backing-chain (human)', rc=0)


def t_chain_map(t, maker):
    maker(t)
    for name in os.listdir(t.path('sub')):
        densify(t, 'sub/' + name)
    compare_json(t, ['map', '--output=json', 'sub/top.qcow2'], 'map --output=json (chain)')
    compare_json(t, ['map', '--output=json', '-f', 'qcow2', 'sub/mid.qcow2'], 'map --output=json (mid)')


def t_chain_map_human(t, maker):
    """The human map stops with an error at the first compressed cluster
    (it has no host offset to show); everything before it is printed."""
    maker(t)
    for name in os.listdir(t.path('sub')):
        densify(t, 'sub/' + name)
    compare_text(t, ['map', 'sub/top.qcow2'], 'map (human, chain)')
    compare_text(t, ['map', 'sub/mid.qcow2'], 'map (human, mid)')


for cfg in CONFIGS:
    suite.add('qcow2-read/%s/convert' % cfg.name, t_convert, cfg)
    suite.add('qcow2-read/%s/io-read' % cfg.name, t_io_read, cfg)
    suite.add('qcow2-read/%s/map' % cfg.name, t_map, cfg)
    if cfg.name in ('default', 'cluster4k', 'extl2-64k', 'prealloc-metadata'):
        suite.add('qcow2-read/%s/map-sparse-host' % cfg.name, t_map_sparse_host, cfg)
    suite.add('qcow2-read/%s/info' % cfg.name, t_info, cfg)
    suite.add('qcow2-read/%s/check' % cfg.name, t_check, cfg)
for name in ('cluster512', 'cluster4k', 'extl2-64k', 'compat0.10', 'prealloc-metadata'):
    suite.add('qcow2-read/%s/io-map-alloc' % name, t_io_map, CONFIG_BY_NAME[name])
for name, maker in CHAINS:
    suite.add('qcow2-read-chain/%s/convert' % name, t_chain_convert, maker)
    suite.add('qcow2-read-chain/%s/io-read' % name, t_chain_io, maker)
    suite.add('qcow2-read-chain/%s/info' % name, t_chain_info, maker)
    suite.add('qcow2-read-chain/%s/map' % name, t_chain_map, maker)
    suite.add('qcow2-read-chain/%s/map-human' % name, t_chain_map_human, maker)
for name in ENGINE_CONFIGS:
    suite.add_io('qcow2-read/%s/convert' % name, t_convert, CONFIG_BY_NAME[name])
    suite.add_io('qcow2-read/%s/io-read' % name, t_io_read, CONFIG_BY_NAME[name])

if __name__ == '__main__':
    main(suite)
