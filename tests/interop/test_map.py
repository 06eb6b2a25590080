#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk map against qemu-img map on raw images (JSON and human output)."""

import json
import random

from vdktest import MiB, Fail, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main

suite = Suite('map')
SIZE = 64 * MiB


# Each maker builds 'disk.img' in the case directory.
def mk_sparse(t):
    t.sparse('disk.img', SIZE)


def mk_vdk_created(t):
    expect_rc(t.vdk('create', '-q', '-f', 'raw', 'disk.img', '64M'), 0)


def mk_qemu_created(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'raw', 'disk.img', '64M'), 0)


def mk_scattered(t):
    t.sparse('disk.img', SIZE)
    t.qemu_io('disk.img', 'write -P 0xab 1M 64k', 'write -P 0xcd 5M 4k', 'write -P 0x11 7M 1000',
              'write -P 0x22 9437000 3000', 'write -P 0x33 20M 2M', 'write -P 0x44 33554431 1',
              'write -P 0x55 40M 512', 'write -P 0x66 50M 64k', 'write -P 0x67 %d 64k' % (50 * MiB + 65536))


def mk_start_end(t):
    t.sparse('disk.img', SIZE)
    t.qemu_io('disk.img', 'write -P 0x01 0 64k', 'write -P 0x02 %d 65536' % (SIZE - 65536))


def mk_last_byte(t):
    t.sparse('disk.img', SIZE)
    t.qemu_io('disk.img', 'write -P 0x03 %d 1' % (SIZE - 1))


def mk_fragmented(t):
    t.sparse('disk.img', SIZE)
    rnd = random.Random(42)
    cmds = []
    for i in range(150):
        off = 8 * MiB + i * 8192 + rnd.choice((0, 4096))
        cmds.append('write -P 0x%02x %d 4096' % (rnd.randrange(1, 256), off))
    t.qemu_io('disk.img', *cmds)


def mk_full(t):
    expect_rc(t.vdk('create', '-q', '-f', 'raw', '-o', 'preallocation=full', 'disk.img', '16M'), 0)


def mk_falloc(t):
    expect_rc(t.vdk('create', '-q', '-f', 'raw', '-o', 'preallocation=falloc', 'disk.img', '16M'), 0)


def mk_zeroed(t):
    """Fully written, then a write -z and a discard punch into it."""
    t.sparse('disk.img', 16 * MiB)
    t.qemu_io('disk.img', 'write -P 0x99 0 16M', 'write -z -u 4M 1M', 'discard 8M 2M', 'write -z 12M 64k')


def mk_unaligned(t):
    t.sparse('disk.img', 1000000)


def mk_unaligned_data_end(t):
    t.sparse('disk.img', 1000000)
    t.qemu_io('disk.img', 'write -P 0x33 999000 1000', 'write -P 0x34 4096 4096')


def mk_empty(t):
    t.sparse('disk.img', 0)


MAKERS = [('sparse', mk_sparse), ('vdk-created', mk_vdk_created), ('qemu-created', mk_qemu_created),
          ('scattered', mk_scattered), ('data-start-end', mk_start_end), ('last-byte', mk_last_byte),
          ('fragmented', mk_fragmented), ('prealloc-full', mk_full), ('prealloc-falloc', mk_falloc),
          ('zeroed-and-discarded', mk_zeroed), ('unaligned-size', mk_unaligned),
          ('unaligned-size-data-end', mk_unaligned_data_end), ('empty', mk_empty)]


def vdk_json(t, *extra):
    rv = t.vdk('map', '--output=json', '-f', 'raw', *extra, 'disk.img')
    expect_rc(rv, 0, 'vdk map')
    try:
        return rv, json.loads(rv.out)
    except ValueError as e:
        raise Fail('vdk map output is not JSON: %s\n%s' % (e, rv.describe()))


def t_json(t, maker, extra=()):
    maker(t)
    jq = t.qemu_map('disk.img', *extra)
    rv, jv = vdk_json(t, *extra)
    expect_eq(jv, jq, 'vdk map JSON vs qemu-img map JSON', rv)


def t_json_text(t, maker):
    """Byte-for-byte equal JSON text, not only equal after parsing."""
    maker(t)
    rq = t.qemu_img('map', '--output=json', '-f', 'raw', 'disk.img')
    rv = t.vdk('map', '--output=json', '-f', 'raw', 'disk.img')
    expect_rc(rv, 0, 'vdk map')
    expect_eq(rv.out, rq.out, 'vdk map --output=json text vs qemu-img', rv)


def t_human(t, maker, extra=()):
    maker(t)
    rq = t.qemu_img('map', '-f', 'raw', *extra, 'disk.img')
    expect_rc(rq, 0, 'qemu-img map')
    rv = t.vdk('map', '-f', 'raw', *extra, 'disk.img')
    expect_rc(rv, 0, 'vdk map')
    expect_eq(rv.out, rq.out, 'vdk map human output vs qemu-img', rv)


def t_probed(t):
    """Without -f (probing, read-only: no warning expected on stdout)."""
    mk_scattered(t)
    rq = t.qemu_img('map', '--output=json', 'disk.img')
    rv = t.vdk('map', '--output=json', 'disk.img')
    expect_rc(rv, 0, 'vdk map')
    expect_eq(json.loads(rv.out), json.loads(rq.out), 'probed map JSON', rv)


def t_covers(t, maker):
    """The entries tile [0, size) without gaps or overlaps and data entries
    really hold the written bytes (independent of qemu-img)."""
    maker(t)
    rv, jv = vdk_json(t)
    pos = 0
    for e in jv:
        expect_eq(e['start'], pos, 'start of the next map entry', rv)
        expect(e['length'] > 0, 'empty map entry', rv)
        pos += e['length']
    expect_eq(pos, t.size('disk.img'), 'end of the last map entry', rv)
    data = t.content('disk.img')
    for e in jv:
        if not e['data']:
            chunk = data[e['start']:e['start'] + e['length']]
            expect(not chunk.strip(b'\0'), 'entry %r claims no data but the file has some there' % e, rv)


def t_bad_offset(t, opt):
    mk_sparse(t)
    rq = t.qemu_img('map', '-f', 'raw', opt, 'disk.img')
    expect(rq.rc != 0, 'qemu-img accepted %s (test premise)' % opt, rq)
    rv = t.vdk('map', '-f', 'raw', opt, 'disk.img')
    expect_rc(rv, 1)
    expect_one_error_line(rv)


def t_missing(t):
    rv = t.vdk('map', '-f', 'raw', 'nonexistent.img')
    rq = t.qemu_img('map', '-f', 'raw', 'nonexistent.img')
    expect_eq(rv.rc, rq.rc, 'exit code vs qemu-img', rv)
    expect_one_error_line(rv)


# An empty image is left out of the JSON cases: qemu-img prints a
# zero-length "present": false entry there (as for --start-offset at or past
# the end), a quirk vdk does not copy.
for name, maker in MAKERS[:-1]:
    suite.add('map-json-%s' % name, t_json, maker)
for name, maker in MAKERS:
    suite.add('map-human-%s' % name, t_human, maker)
for name, maker in (('scattered', mk_scattered), ('data-start-end', mk_start_end)):
    suite.add('map-json-text-%s' % name, t_json_text, maker)

RANGES = [('--start-offset=4096', '--max-length=2000000'),
          ('--start-offset=1000',),
          ('--start-offset=1M', '--max-length=1000'),
          ('--start-offset=%d' % (MiB + 512),),
          ('--start-offset=%d' % (5 * MiB + 100), '--max-length=%d' % (15 * MiB)),
          ('--max-length=100M',),
          ('--max-length=7M',),
          ('--start-offset=66060289',),
          ('--start-offset=33554431', '--max-length=1')]
for r in RANGES:
    label = ','.join(a.lstrip('-') for a in r)
    suite.add('map-json-scattered-%s' % label, t_json, mk_scattered, r)
    suite.add('map-human-scattered-%s' % label, t_human, mk_scattered, r)
suite.add('map-json-data-start-end-start-offset=64M-64k', t_json, mk_start_end, ('--start-offset=%d' % (SIZE - 65536),))
suite.add('map-json-probed', t_probed)
for name, maker in (('scattered', mk_scattered), ('fragmented', mk_fragmented), ('zeroed-and-discarded', mk_zeroed)):
    suite.add('map-entries-tile-image-%s' % name, t_covers, maker)
for opt in ('--start-offset=-1', '--max-length=abc'):
    suite.add('map-invalid-%s' % opt.lstrip('-').split('=')[0], t_bad_offset, opt)
suite.add('map-missing-file', t_missing)

if __name__ == '__main__':
    main(suite)
