#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Smoke run of the benchmark suite (bench/run) at tiny sizes, one run:
it must finish, print the Markdown tables with every row, write JSON with
positive measurements for every conversion, workload and engine (and
every vdk output checked equal to its source by the suite itself), and a
well-formed SVG chart with a bar per measurement.  The numbers are not
judged here: a smoke run on a busy machine says nothing about speed."""

import json
import os
import sys
import xml.etree.ElementTree as ET

from vdktest import VDK, Suite, expect, expect_eq, main

suite = Suite('bench-suite')
HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.normpath(os.path.join(HERE, '..', '..', 'bench', 'run'))
CONVERSIONS = ['raw -> raw', 'raw -> qcow2', 'qcow2 -> raw', 'raw -> vmdk', 'raw -> vdi',
               'qcow2 -> vmdk streamOptimized', 'raw -> qcow2 -c zlib', 'raw -> qcow2 -c zstd',
               'qcow2 zlib -> raw', 'qcow2 zstd -> raw']
WORKLOADS = ['%s QD%d' % (w, d) for w in ('4K random read', '4K random write', '64K sequential read',
                                          '64K sequential write') for d in (1, 32)]


def t_smoke(t):
    js, svg = t.path('r.json'), t.path('r.svg')
    res = t.run([sys.executable, RUN, '--vdk', VDK, '--size', '48M', '--io-size', '16M', '--runs', '1',
                 '--secs', '0.2', '--no-drop-caches', '--dir', t.dir, '--json', js, '--svg', svg], timeout=600)
    expect(res.rc == 0, 'bench/run failed', res)
    for name in CONVERSIONS + WORKLOADS:
        expect('| %s ' % name in res.out, 'row %r missing from the Markdown output' % name, res)
    expect('| target | measured | met |' in res.out, 'no targets table', res)
    with open(js) as f:
        r = json.load(f)
    expect_eq([c['name'] for c in r['convert']], CONVERSIONS, 'conversions in the JSON')
    for c in r['convert']:
        for k in ('vdk', 'qemu-img', 'qemu-img -W -m 16', 'vdk bytes', 'qemu-img bytes', 'vdk max_rss_bytes'):
            expect(c[k] > 0, '%s: %s is %r' % (c['name'], k, c[k]))
        expect(c['vdk max_rss_bytes'] < 512 << 20, '%s: peak RSS %d' % (c['name'], c['vdk max_rss_bytes']))
        # compressed outputs are smaller than the uncompressed ones
        if '-c' in c['name'] or 'streamOptimized' in c['name']:
            plain = [x for x in r['convert'] if x['name'] == 'raw -> qcow2'][0]
            expect(c['vdk bytes'] < plain['vdk bytes'], '%s: output %d not smaller than uncompressed %d' %
                   (c['name'], c['vdk bytes'], plain['vdk bytes']))
    expect_eq([w['name'] for w in r['io']], WORKLOADS, 'workloads in the JSON')
    for w in r['io']:
        for k in ('raw', 'qcow2', 'vdi', 'vmdk', 'fio raw'):
            expect(w[k]['iops'] > 0 and w[k]['p99'] >= w[k]['p50'] > 0, '%s %s: %r' % (w['name'], k, w[k]))
        if 'sequential' in w['name']:
            expect(w['qemu-img bench qcow2']['iops'] > 0, '%s: no qemu-img bench' % w['name'])
    expect_eq([e['engine'] for e in r['engines']], ['io_uring', 'native', 'threads'], 'engines')
    expect(all(e['iops'] > 0 for e in r['engines']), 'an engine with no IOPS: %r' % r['engines'])
    expect_eq([w['name'] for w in r['serve']], ['4K randread QD32', '4K randwrite QD32'], 'NBD rows')
    for w in r['serve']:
        for k in ('vdk serve', 'qemu-nbd'):
            expect(w[k]['iops'] > 0, '%s %s: %r' % (w['name'], k, w[k]))
    expect('| 4K randread QD32 |' in res.out, 'NBD table missing', res)
    expect(len(r['targets']) == 13, 'targets judged: %r' % r['targets'])
    expect(r['source']['files_bytes'] > (48 << 20) // 4, 'source filesystem nearly empty: %r' % r['source'])
    root = ET.parse(svg).getroot()
    expect(root.tag.endswith('svg'), 'the chart is not SVG: %s' % root.tag)
    bars = [e for e in root.iter() if e.tag.endswith('rect') and e.find('{http://www.w3.org/2000/svg}title') is not None]
    expect_eq(len(bars), 2 * len(CONVERSIONS) + 3 * len(WORKLOADS), 'bars in the chart')


suite.add('bench-run-smoke', t_smoke)

if __name__ == '__main__':
    main(suite)
