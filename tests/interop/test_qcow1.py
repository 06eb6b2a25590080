#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Legacy qcow (version 1): images made by qemu-img create -f qcow and
written by qemu-io (patterns, unaligned requests, zero writes, compressed
clusters, data at the very end, backing files) read identically through
vdk: convert output, io read patterns, map and info JSON as qemu-img's.
Writable opens and the legacy AES encryption are refused with a clear
message; every validated header field and bad table entry gives a one-line
error naming it, fast, never a crash."""

import json
import os
import random
import struct
import time

from vdktest import KiB, MiB, Suite, expect, expect_eq, expect_rc, main

suite = Suite('qcow1')

SIZE = 10 * MiB + 3 * 512  # not a whole number of clusters or L2 ranges


def make_image(t, name='img.qcow', size=SIZE, backing=None, backing_fmt=None):
    args = ['create', '-q', '-f', 'qcow']
    if backing:
        args += ['-b', backing]
        if backing_fmt:
            args += ['-F', backing_fmt]
    expect_rc(t.qemu_img(*args, name, str(size)), 0, 'qemu-img create -f qcow (test premise)')
    return name


def mix(t, name, seed=1, size=SIZE):
    rng = random.Random(seed)
    cmds = ['write -P 0x11 0 100k', 'write -P 0x22 12345 7000', 'write -z 200k 64k',
            'write -c -P 0x33 1M 4k', 'write -c -P 0x34 %d 4k' % (3 * MiB), 'write -P 0x44 %d 5000' % (size - 5000)]
    for _ in range(20):
        off = rng.randrange(4 * MiB, size - 70000)  # below 4 MiB: the patterns read back
        cmds.append('write -P 0x%02x %d %d' % (rng.randrange(1, 256), off, rng.randrange(1, 70000)))
    t.qemu_io(name, *cmds, fmt='qcow')


def qemu_raw(t, name, out):
    expect_rc(t.qemu_img('convert', '-f', 'qcow', '-O', 'raw', name, out), 0, 'qemu-img convert (test premise)')
    return t.content(out)


def t_read(t):
    make_image(t)
    mix(t, 'img.qcow')
    ref = qemu_raw(t, 'img.qcow', 'ref.raw')
    args = ['convert', '-O', 'raw']
    if t.engine:
        args += ['--aio=' + t.engine, '-T', t.cache]
    res = t.vdk(*args, 'img.qcow', 'out.raw')
    expect_rc(res, 0, 'vdk convert qcow -> raw')
    expect(t.content('out.raw') == ref, 'vdk convert output equals qemu-img convert output')
    res = t.vdk('compare', 'img.qcow', 'ref.raw')
    expect(res.rc == 0 and 'Images are identical.' in res.out, 'vdk compare qcow vs raw', res)
    # pattern reads through the queue, with this case's engine
    res = t.vdk_io_raw('img.qcow', ['read -P 0x11 0 12345', 'read -P 0x33 1M 4k', 'read -P 0x34 %d 4k' % (3 * MiB)],
                       fmt='qcow', extra=['-r'])
    expect(res.rc == 0 and 'failed' not in res.out + res.err and 'Pattern verification failed' not in res.out,
           'vdk io read -P', res)


def t_map_info(t):
    make_image(t)
    mix(t, 'img.qcow', seed=2)
    for cmd in (['map', '--output=json'], ['map'], ['info', '--output=json'], ['info']):
        rq = t.qemu_img(*cmd, 'img.qcow')
        rv = t.vdk(*cmd, 'img.qcow')
        # the human map stops at a compressed cluster, like qemu-img's
        expect_eq(rv.rc, rq.rc, 'vdk %s exit code vs qemu-img' % ' '.join(cmd), rv)
        expect_eq(rv.err.replace('vdk: img.qcow: ', ''), rq.err.replace('qemu-img: ', ''),
                  'vdk %s stderr vs qemu-img' % ' '.join(cmd), rv)
        if cmd[-1] == '--output=json':
            expect_eq(json.loads(rv.out), json.loads(rq.out), 'vdk %s vs qemu-img' % ' '.join(cmd), rv)
        else:
            expect_eq(rv.out, rq.out, 'vdk %s vs qemu-img' % ' '.join(cmd), rv)


def t_backing(t, backing_fmt):
    os.makedirs(t.path('sub'))
    if backing_fmt == 'qcow':
        make_image(t, 'sub/base.qcow')
        t.qemu_io('sub/base.qcow', 'write -P 0x55 0 2M', 'write -c -P 0x56 4M 4k', fmt='qcow')
        base = 'base.qcow'
    else:
        with open(t.path('sub/base.raw'), 'wb') as f:
            f.write(bytes([0x55]) * (2 * MiB))
            f.truncate(SIZE)
        base = 'base.raw'
    # a relative name: resolved against the overlay's directory
    make_image(t, 'sub/top.qcow', backing=base, backing_fmt=backing_fmt)
    t.qemu_io('sub/top.qcow', 'write -P 0x66 1M 8k', 'write -P 0x67 5M 4k', fmt='qcow')
    ref = qemu_raw(t, 'sub/top.qcow', 'ref.raw')
    expect_rc(t.vdk('convert', '-O', 'raw', 'sub/top.qcow', 'out.raw'), 0, 'vdk convert through the backing file')
    expect(t.content('out.raw') == ref, 'content through the backing chain equals qemu-img convert')
    for cmd in (['info', '--output=json', '--backing-chain'], ['map', '--output=json']):
        rq = t.qemu_img(*cmd, 'sub/top.qcow')
        rv = t.vdk(*cmd, 'sub/top.qcow')
        expect_rc(rv, 0, 'vdk ' + ' '.join(cmd))
        expect_eq(json.loads(rv.out), json.loads(rq.out), 'vdk %s vs qemu-img' % ' '.join(cmd), rv)


def t_convert_to_qcow2(t):
    make_image(t)
    mix(t, 'img.qcow', seed=3)
    expect_rc(t.vdk('convert', '-O', 'qcow2', 'img.qcow', 'out.qcow2'), 0, 'vdk convert qcow -> qcow2')
    expect_rc(t.qemu_img('check', 'out.qcow2'), 0, 'qemu-img check of the converted image')
    res = t.qemu_img('compare', '-f', 'qcow', '-F', 'qcow2', 'img.qcow', 'out.qcow2')
    expect(res.rc == 0, 'qemu-img compare qcow vs converted qcow2', res)


def t_read_only(t):
    make_image(t)
    before = t.content('img.qcow')
    res = t.vdk_io_raw('img.qcow', ['write -P 1 0 4k'], fmt='qcow', engine=False)
    expect_eq(res.rc, 1, 'vdk io write on a qcow v1 image: exit code', res)
    expect('read-only in vdk' in res.err and res.err.startswith('vdk: img.qcow: qcow: '),
           'the refusal says the format is read-only', res)
    res = t.vdk('check', 'img.qcow')
    expect_eq(res.rc, 63, 'vdk check on qcow v1: exit code (qemu-img: no checks)', res)
    expect_eq(t.content('img.qcow'), before, 'the image is unchanged')


def t_aes(t):
    res = t.qemu_img('create', '-q', '-f', 'qcow', '--object', 'secret,id=s0,data=pw', '-o',
                     'encrypt.format=aes,encrypt.key-secret=s0', 'enc.qcow', '1M')
    expect_rc(res, 0, 'qemu-img create an AES qcow (test premise)')
    for cmd in (['info'], ['convert', '-O', 'raw', 'enc.qcow', 'out.raw']):
        args = cmd + (['enc.qcow'] if cmd == ['info'] else [])
        res = t.vdk(*args)
        expect_eq(res.rc, 1, 'vdk %s on an AES qcow: exit code' % cmd[0], res)
        expect('legacy qcow AES encryption (crypt_method 1)' in res.err, 'the refusal names the encryption', res)
    expect(not os.path.exists(t.path('out.raw')), 'no target left behind')


# (field description, patch function(data) -> data, expected text in the error)
def put(data, off, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def l2_offset(data):
    l1 = struct.unpack_from('>Q', data, 40)[0]
    return struct.unpack_from('>Q', data, l1)[0]


def set_l2_entry(data, idx, value):
    return put(data, l2_offset(data) + 8 * idx, '>Q', value)


CORRUPTIONS = [
    ('version-7', lambda d: put(d, 4, '>I', 7), 'unsupported version 7'),
    ('cluster_bits-8', lambda d: put(d, 32, 'B', 8), 'invalid cluster_bits 8'),
    ('cluster_bits-17', lambda d: put(d, 32, 'B', 17), 'invalid cluster_bits 17'),
    ('l2_bits-5', lambda d: put(d, 33, 'B', 5), 'invalid l2_bits 5'),
    ('l2_bits-255', lambda d: put(d, 33, 'B', 255), 'invalid l2_bits 255'),
    ('crypt_method-2', lambda d: put(d, 36, '>I', 2), 'invalid crypt_method 2'),
    ('size-2^64-1', lambda d: put(d, 24, '>Q', (1 << 64) - 1), 'image too large'),
    ('size-petabyte', lambda d: put(d, 24, '>Q', 1 << 50), 'image too large'),
    ('l1-past-eof', lambda d: put(d, 40, '>Q', 1 << 40), 'invalid l1_table_offset'),
    ('l1-overflow', lambda d: put(d, 40, '>Q', (1 << 64) - 8), 'invalid l1_table_offset'),
    ('l1-unaligned', lambda d: put(d, 40, '>Q', 0x31), 'invalid l1_table_offset'),
    ('l1-in-header', lambda d: put(d, 40, '>Q', 8), 'invalid l1_table_offset'),
    ('backing-size-1024', lambda d: put(put(d, 8, '>Q', 48), 16, '>I', 1024), 'invalid backing_file_size 1024'),
    ('backing-offset-past-eof', lambda d: put(put(d, 8, '>Q', 1 << 40), 16, '>I', 10), 'invalid backing_file_offset'),
    ('backing-offset-2^64-1', lambda d: put(put(d, 8, '>Q', (1 << 64) - 1), 16, '>I', 10),
     'invalid backing_file_offset'),
    ('backing-offset-zero-size', lambda d: put(put(d, 8, '>Q', 4096), 16, '>I', 0), 'invalid backing_file_size 0'),
]

# bad table entries: the open succeeds, reading the range fails with EIO
ENTRY_CORRUPTIONS = [
    ('l1-entry-unaligned', lambda d: put(d, struct.unpack_from('>Q', d, 40)[0], '>Q', l2_offset(d) + 8),
     'invalid L2 table offset'),
    ('l1-entry-past-eof', lambda d: put(d, struct.unpack_from('>Q', d, 40)[0], '>Q', 1 << 50),
     'invalid L2 table offset'),
    ('l2-entry-unaligned', lambda d: set_l2_entry(d, 0, 4096 + 1), 'invalid cluster offset'),
    ('l2-entry-past-eof', lambda d: set_l2_entry(d, 0, 1 << 40), 'invalid cluster offset'),
    ('l2-entry-in-header', lambda d: set_l2_entry(d, 0, 0), None),  # 0 = unallocated: legal
    ('compressed-past-eof', lambda d: set_l2_entry(d, 0, (1 << 63) | (100 << 51) | (1 << 40)),
     'compressed cluster at guest offset 0'),
    ('compressed-zero-length', lambda d: set_l2_entry(d, 0, (1 << 63) | 4096), 'compressed cluster at guest offset 0'),
    ('compressed-garbage', lambda d: set_l2_entry(d, 0, (1 << 63) | (200 << 51) | 48), None),
]


def base_image(t):
    make_image(t)
    t.qemu_io('img.qcow', 'write -P 0x11 0 64k', fmt='qcow')
    return t.content('img.qcow')


def t_corrupt_header(t, name, patch, text):
    data = patch(base_image(t))
    t.write_bytes('bad.qcow', data)
    for cmd in (['info', '-f', 'qcow', 'bad.qcow'], ['convert', '-f', 'qcow', '-O', 'raw', 'bad.qcow', 'out.raw'],
                ['map', '-f', 'qcow', 'bad.qcow']):
        t0 = time.monotonic()
        res = t.vdk(*cmd, timeout=20)
        expect(time.monotonic() - t0 < 2, 'vdk %s answers in under 2 s' % cmd[0], res)
        expect_eq(res.rc, 1, 'vdk %s on a corrupted header (%s): exit code' % (cmd[0], name), res)
        lines = res.err.strip().splitlines()
        expect(len(lines) == 1 and lines[0].startswith('vdk: bad.qcow: qcow: ') and text in lines[0],
               'one line "vdk: bad.qcow: qcow: ...%s..."' % text, res)
    expect_eq(t.content('bad.qcow'), data, 'the image is unchanged')


def t_corrupt_entry(t, name, patch, text):
    data = patch(base_image(t))
    t.write_bytes('bad.qcow', data)
    expect_rc(t.vdk('info', 'bad.qcow'), 0, 'vdk info (the header is fine)')
    res = t.vdk('convert', '-O', 'raw', 'bad.qcow', 'out.raw', timeout=20)
    if text is None:
        # legal (0 = unallocated) or undecodable data: no crash, a clean outcome
        expect(res.rc in (0, 1), 'vdk convert: exit code 0 or 1', res)
        return
    expect_eq(res.rc, 1, 'vdk convert through a bad entry (%s): exit code' % name, res)
    expect(text in res.err and 'Input/output error' in res.err, 'the warning names the entry (%s)' % text, res)
    expect(not os.path.exists(t.path('out.raw')), 'no target left behind')
    res = t.vdk_io_raw('bad.qcow', ['read 0 4k'], fmt='qcow', engine=False, extra=['-r'], timeout=20)
    expect('read failed: Input/output error' in res.err + res.out, 'vdk io read fails with EIO', res)
    expect_eq(t.content('bad.qcow'), data, 'the image is unchanged')


def t_truncated(t):
    data = base_image(t)
    for n in (0, 4, 8, 40, 47):
        t.write_bytes('bad.qcow', data[:n])
        res = t.vdk('info', '-f', 'qcow', 'bad.qcow', timeout=20)
        expect_eq(res.rc, 1, 'vdk info on a %d-byte file: exit code' % n, res)
        expect(res.err.startswith('vdk: bad.qcow: qcow: '), 'a one-line qcow error', res)


suite.add_io('qcow1/read-mix', t_read)
suite.add('qcow1/map-and-info-as-qemu-img', t_map_info)
suite.add('qcow1/backing-qcow-relative', t_backing, 'qcow')
suite.add('qcow1/backing-raw-relative', t_backing, 'raw')
suite.add('qcow1/convert-to-qcow2', t_convert_to_qcow2)
suite.add('qcow1/writes-refused', t_read_only)
suite.add('qcow1/aes-refused', t_aes)
suite.add('qcow1/truncated-header', t_truncated)
for name, patch, text in CORRUPTIONS:
    suite.add('qcow1/bad-header/' + name, t_corrupt_header, name, patch, text)
for name, patch, text in ENTRY_CORRUPTIONS:
    suite.add('qcow1/bad-entry/' + name, t_corrupt_entry, name, patch, text)

if __name__ == '__main__':
    main(suite)
