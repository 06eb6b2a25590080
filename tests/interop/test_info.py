#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk info against qemu-img info on raw images."""

import json

from vdktest import MiB, Fail, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main

suite = Suite('info')


# Each maker builds 'disk.img' in the case directory.
def mk_sparse(t):
    t.sparse('disk.img', 64 * MiB)


def mk_vdk_created(t):
    expect_rc(t.vdk('create', '-q', '-f', 'raw', 'disk.img', '64M'), 0)


def mk_qemu_created(t):
    expect_rc(t.qemu_img('create', '-q', '-f', 'raw', 'disk.img', '64M'), 0)


def mk_data(t):
    t.sparse('disk.img', 64 * MiB)
    t.qemu_io('disk.img', 'write -P 0xab 1M 64k', 'write -P 0x12 1000 3000',
              'write -P 0x77 10M 3M', 'write -P 0x01 67104000 4864')


def mk_full(t):
    expect_rc(t.vdk('create', '-q', '-f', 'raw', '-o', 'preallocation=full', 'disk.img', '16M'), 0)


def mk_falloc(t):
    expect_rc(t.vdk('create', '-q', '-f', 'raw', '-o', 'preallocation=falloc', 'disk.img', '16M'), 0)


def mk_unaligned(t):
    t.sparse('disk.img', 1000000)
    t.qemu_io('disk.img', 'write -P 0x33 999000 1000')


def mk_empty(t):
    t.sparse('disk.img', 0)


MAKERS = [('sparse', mk_sparse), ('vdk-created', mk_vdk_created), ('qemu-created', mk_qemu_created),
          ('data', mk_data), ('prealloc-full', mk_full), ('prealloc-falloc', mk_falloc),
          ('unaligned-size', mk_unaligned), ('empty', mk_empty)]


def parse_json(res, what):
    try:
        return json.loads(res.out)
    except ValueError as e:
        raise Fail('%s: output is not JSON (%s)\n%s' % (what, e, res.describe()))


def t_json(t, maker, fmt_args):
    maker(t)
    rq = t.qemu_img('info', '--output=json', *fmt_args, 'disk.img')
    expect_rc(rq, 0, 'qemu-img info')
    rv = t.vdk('info', '--output=json', *fmt_args, 'disk.img')
    expect_rc(rv, 0, 'vdk info')
    jv = parse_json(rv, 'vdk info')
    jq = parse_json(rq, 'qemu-img info')
    expect_eq(sorted(jv), sorted(jq), 'JSON keys', rv)
    expect_eq(jv, jq, 'vdk info JSON vs qemu-img info JSON', rv)


HUMAN_KEYS = ('image:', 'file format:', 'virtual size:', 'disk size:')


def human_lines(text):
    return [l for l in text.splitlines() if l.startswith(HUMAN_KEYS)]


def t_human(t, maker):
    maker(t)
    rq = t.qemu_img('info', 'disk.img')
    expect_rc(rq, 0, 'qemu-img info')
    rv = t.vdk('info', 'disk.img')
    expect_rc(rv, 0, 'vdk info')
    lq = human_lines(rq.out)
    expect_eq(len(lq), 4, 'qemu-img info lines found (test premise)', rq)
    expect_eq('\n'.join(human_lines(rv.out)), '\n'.join(lq), 'vdk info human lines vs qemu-img', rv)


def t_backing_chain(t, maker):
    maker(t)
    rq = t.qemu_img('info', '--backing-chain', '--output=json', 'disk.img')
    expect_rc(rq, 0, 'qemu-img info')
    rv = t.vdk('info', '--backing-chain', '--output=json', 'disk.img')
    expect_rc(rv, 0, 'vdk info')
    jv = parse_json(rv, 'vdk info')
    expect(isinstance(jv, list) and len(jv) == 1, 'expected a one-element list', rv)
    expect_eq(jv, parse_json(rq, 'qemu-img info'), 'vdk vs qemu-img --backing-chain JSON', rv)


def t_backing_chain_human(t):
    mk_data(t)
    rq = t.qemu_img('info', '--backing-chain', 'disk.img')
    rv = t.vdk('info', '--backing-chain', 'disk.img')
    expect_rc(rv, 0, 'vdk info')
    expect_eq('\n'.join(human_lines(rv.out)), '\n'.join(human_lines(rq.out)),
              'vdk vs qemu-img --backing-chain human lines', rv)


def t_absolute_path(t):
    mk_data(t)
    p = t.path('disk.img')
    rq = t.qemu_img('info', '--output=json', p)
    rv = t.vdk('info', '--output=json', p)
    expect_rc(rv, 0, 'vdk info')
    expect_eq(parse_json(rv, 'vdk info'), parse_json(rq, 'qemu-img info'), 'JSON with an absolute path', rv)


def t_missing(t):
    rq = t.qemu_img('info', 'nonexistent.img')
    rv = t.vdk('info', 'nonexistent.img')
    expect_eq(rv.rc, rq.rc, 'exit code vs qemu-img', rv)
    expect_rc(rv, 1)
    expect_one_error_line(rv)
    expect('nonexistent.img' in rv.err, 'error does not name the file', rv)
    expect_eq(rv.out, '', 'stdout', rv)


def t_json_changes(t):
    """actual-size follows writes: info before and after qemu-io writes."""
    mk_vdk_created(t)
    j0 = parse_json(t.vdk('info', '--output=json', 'disk.img'), 'vdk info')
    t.qemu_io('disk.img', 'write -P 0x5 0 8M')
    rv = t.vdk('info', '--output=json', 'disk.img')
    j1 = parse_json(rv, 'vdk info')
    expect(j1['actual-size'] >= 8 * MiB > j0['actual-size'],
           'actual-size did not follow the write: %d -> %d' % (j0['actual-size'], j1['actual-size']), rv)
    jq = parse_json(t.qemu_img('info', '--output=json', 'disk.img'), 'qemu-img info')
    expect_eq(j1, jq, 'vdk vs qemu-img JSON after writing', rv)


for name, maker in MAKERS:
    suite.add('info-json-%s' % name, t_json, maker, [])
for name, maker in MAKERS[:4]:
    suite.add('info-json-f-raw-%s' % name, t_json, maker, ['-f', 'raw'])
for name, maker in MAKERS:
    suite.add('info-human-%s' % name, t_human, maker)
for name, maker in (('sparse', mk_sparse), ('data', mk_data)):
    suite.add('info-backing-chain-json-%s' % name, t_backing_chain, maker)
suite.add('info-backing-chain-human', t_backing_chain_human)
suite.add('info-json-absolute-path', t_absolute_path)
suite.add('info-json-actual-size-follows-writes', t_json_changes)
suite.add('info-missing-file', t_missing)

if __name__ == '__main__':
    main(suite)
