#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk bench: runs, reports, and really writes what it claims."""

import json
import time

from vdktest import MiB, Fail, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main

suite = Suite('bench')
SIZE = 64 * MiB


def bench(t, *args):
    return t.vdk('bench', '-f', 'raw', '--aio=' + t.engine, '-t', t.cache, *args)


def t_read(t):
    t.sparse('disk.img', SIZE)
    res = bench(t, '-c', '2000', '-d', '8', 'disk.img')
    expect_rc(res, 0)
    expect('Run completed in' in res.out, "no 'Run completed in' line", res)
    expect('Sending 2000 read requests, 4096 bytes each, 8 in parallel' in res.out,
           "no qemu-img style 'Sending 2000 read requests...' line", res)


def parse_json(res):
    try:
        return json.loads(res.out)
    except ValueError as e:
        raise Fail('bench --json output is not JSON: %s\n%s' % (e, res.describe()))


def check_json(j, res, count, rw):
    expect(j.get('iops', 0) > 0, 'iops <= 0', res)
    expect(j.get('bytes_per_second', 0) > 0, 'bytes_per_second <= 0', res)
    lat = j.get('latency_us')
    expect(isinstance(lat, dict), 'no latency_us object', res)
    for k in ('p50', 'p99', 'p999'):
        expect(isinstance(lat.get(k), (int, float)), 'latency_us.%s missing' % k, res)
    expect(0 < lat['p50'] <= lat['p99'] <= lat['p999'], 'latency percentiles out of order: %r' % lat, res)
    if 'min' in lat and 'max' in lat:
        expect(lat['min'] <= lat['p50'] and lat['p999'] <= lat['max'], 'min/max do not bracket the percentiles', res)
    if count is not None and 'requests' in j:
        expect_eq(j['requests'], count, 'requests', res)
    if 'bytes' in j and 'requests' in j and 'bufsize' in j:
        expect_eq(j['bytes'], j['requests'] * j['bufsize'], 'bytes = requests * bufsize', res)
    for key, want in (('aio', None), ('cache', None), ('rw', rw)):
        if key in j and want is not None:
            expect_eq(j[key], want, key, res)


def t_json(t, rw):
    t.sparse('disk.img', SIZE)
    args = ['-c', '2000', '-d', '8', '--json']
    if rw == 'write':
        args.append('-w')
    elif rw == 'randrw':
        args.append('--rw=randrw')
    res = bench(t, *args, 'disk.img')
    expect_rc(res, 0)
    j = parse_json(res)
    check_json(j, res, 2000, rw)
    expect_eq(j.get('aio'), t.engine, 'aio reported', res)
    expect_eq(j.get('cache'), t.cache, 'cache reported', res)


def t_time(t):
    t.sparse('disk.img', SIZE)
    t0 = time.monotonic()
    res = bench(t, '-w', '--pattern=rand', '--time=1', '-d', '16', 'disk.img')
    dt = time.monotonic() - t0
    expect_rc(res, 0)
    expect('Run completed in' in res.out, "no 'Run completed in' line", res)
    expect(0.9 <= dt <= 4.0, '--time=1 took %.2fs' % dt, res)
    expect_eq(t.size('disk.img'), SIZE, 'file size after random writes')


def t_pattern(t):
    t.sparse('disk.img', SIZE)
    res = bench(t, '--pattern=0x55', '-w', '-c', '100', '-s', '4k', 'disk.img')
    expect_rc(res, 0)
    t.qemu_io('disk.img', 'read -P 0x55 0 409600', 'read -P 0 409600 %d' % (SIZE - 409600))


def t_pattern_step(t):
    """-o OFFSET and -S STEP place the writes like qemu-img bench."""
    t.sparse('disk.img', SIZE)
    res = bench(t, '--pattern=0xa7', '-w', '-c', '10', '-s', '4k', '-S', '64k', '-o', '1M', 'disk.img')
    expect_rc(res, 0)
    cmds = []
    for i in range(10):
        off = MiB + i * 65536
        cmds += ['read -P 0xa7 %d 4096' % off, 'read -P 0 %d %d' % (off + 4096, 65536 - 4096)]
    t.qemu_io('disk.img', 'read -P 0 0 1M', *cmds)


def t_flush_interval(t):
    t.sparse('disk.img', SIZE)
    res = bench(t, '-w', '-c', '500', '-d', '8', '--flush-interval=50', '--pattern=0x31', 'disk.img')
    expect_rc(res, 0)
    t.qemu_io('disk.img', 'read -P 0x31 0 %d' % (500 * 4096))


def t_bad_args(t, args):
    t.sparse('disk.img', SIZE)
    res = t.vdk('bench', '-f', 'raw', *args, 'disk.img')
    expect_rc(res, 1)
    expect_one_error_line(res)


suite.add_io('bench-read', t_read)
suite.add_io('bench-json-read', t_json, 'read')
suite.add_io('bench-json-write', t_json, 'write')
suite.add_io('bench-json-randrw', t_json, 'randrw', caches=('none',))
suite.add_io('bench-write-random-time-1s', t_time, caches=('none',))
suite.add_io('bench-write-pattern', t_pattern)
suite.add_io('bench-write-offset-step', t_pattern_step, caches=('none',))
suite.add_io('bench-flush-interval', t_flush_interval, caches=('writeback',))
suite.add('bench-invalid-engine', t_bad_args, ['--aio=bogus'])
suite.add('bench-invalid-cache', t_bad_args, ['-t', 'bogus'])

if __name__ == '__main__':
    main(suite)
