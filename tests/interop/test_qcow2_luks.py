#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""LUKS-encrypted qcow2 against qemu-img / qemu-io: images qemu encrypts
read back in vdk with the same passphrase and the other way round (guest
data, qemu-img check, compare, map, info), --object secret spellings, key
slots added and removed by amend on both sides, wrong passphrases and
hostile LUKS headers refused with one line, quickly."""

import json
import os
import shutil
import struct
import time

from vdktest import KiB, MiB, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main

suite = Suite('qcow2-luks')

PASS = 'correct horse'
SEC = 'secret,id=sec0,data=' + PASS
# a short PBKDF2 time keeps the tests fast (qemu's default is 2 s)
CREATE_OPTS = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10'

WRITES = [
    ('write -P 0x5a 0 64k', 'read -P 0x5a 0 64k'),
    ('write -P 0x33 100k 3k', 'read -P 0x33 100k 3k'),
    ('write -P 0x77 1M 1M', 'read -P 0x77 1M 1M'),
    ('write -P 0x11 3000000 777', 'read -P 0x11 3000000 777'),
    ('write -z 2560k 64k', 'read -P 0 2560k 64k'),
    ('write -P 0x22 5M 100', 'read -P 0x22 5M 100'),
    ('write -P 0x44 63M 1M', 'read -P 0x44 63M 1M'),
]
# bytes around the writes that must read as zeroes (COW of new clusters)
ZERO_READS = ['read -P 0 64k 36k', 'read -P 0 103k 25k', 'read -P 0 2999000 1000', 'read -P 0 3000777 1000',
              'read -P 0 5242980 1000', 'read -P 0 10M 1M']


def opts(name, secret='sec0', extra=''):
    return 'driver=qcow2,file.filename=%s,encrypt.key-secret=%s%s' % (name, secret, extra)


def qemu_create(t, name, size='64M', extra=''):
    # qemu measures its PBKDF2 speed in CPU time: 10 ms is too short for it
    for _ in range(10):
        res = t.qemu_img('create', '-q', '-f', 'qcow2', '--object', SEC, '-o',
                         CREATE_OPTS.replace('=10', '=100') + extra, name, size)
        if 'accurate CPU usage' not in res.err:
            break
    expect_rc(res, 0, 'qemu-img create')


def vdk_create(t, name, size='64M', extra=''):
    res = t.vdk('create', '-q', '-f', 'qcow2', '--object', SEC, '-o', CREATE_OPTS + extra, name, size)
    expect_rc(res, 0, 'vdk create')


def qemu_io(t, name, cmds, secret=SEC, sid='sec0'):
    args = ['--object', secret, '--image-opts']
    res = t.qemu_io_raw(opts(name, sid), cmds, fmt=None, extra=args)
    expect(res.rc == 0 and 'fail' not in (res.out + res.err).lower(), 'qemu-io on %s' % name, res)
    return res


def vdk_io(t, name, cmds, secret=SEC, sid='sec0'):
    args = ['--object', secret, '--image-opts']
    res = t.vdk_io_raw(opts(name, sid), cmds, fmt=None, extra=args)
    expect(res.rc == 0 and 'fail' not in (res.out + res.err).lower(), 'vdk io on %s' % name, res)
    return res


def qemu_check(t, name, secret=SEC, sid='sec0'):
    res = t.qemu_img('check', '--object', secret, '--image-opts', opts(name, sid))
    expect(res.rc == 0 and 'No errors were found' in res.out, 'qemu-img check of %s' % name, res)


def t_qemu_to_vdk(t):
    """qemu writes, vdk reads the same bytes (this case's engine/cache)."""
    qemu_create(t, 'q.qcow2')
    qemu_io(t, 'q.qcow2', [w for w, _ in WRITES])
    vdk_io(t, 'q.qcow2', [r for _, r in WRITES] + ZERO_READS)
    # and to raw: the same as qemu's conversion
    res = t.vdk('convert', '--object', SEC, '-O', 'raw', '--image-opts', opts('q.qcow2'), 'v.raw')
    expect_rc(res, 0, 'vdk convert to raw')
    res = t.qemu_img('convert', '--object', SEC, '-O', 'raw', '--image-opts', opts('q.qcow2'), 'q.raw')
    expect_rc(res, 0, 'qemu-img convert to raw')
    t.qemu_compare('q.raw', 'v.raw')


def t_vdk_to_qemu(t):
    """vdk creates and writes (aligned, unaligned, zeroes, discard), qemu
    reads it with the same passphrase; qemu-img check clean."""
    vdk_create(t, 'v.qcow2')
    vdk_io(t, 'v.qcow2', [w for w, _ in WRITES] + ['write -P 0x66 7M 1000', 'discard 7M 64k',
                                                   'write -P 0x67 9M 1', 'write -P 0x68 9437185 511'])
    qemu_check(t, 'v.qcow2')
    qemu_io(t, 'v.qcow2', [r for _, r in WRITES] + ZERO_READS +
            ['read -P 0 7M 64k', 'read -P 0x67 9M 1', 'read -P 0x68 9437185 511', 'read -P 0 9437696 1000'])
    vdk_io(t, 'v.qcow2', [r for _, r in WRITES] + ZERO_READS + ['read -P 0 7M 64k'])
    # the raw files the same commands make with qemu-io are identical
    t.sparse('ref.raw', 64 * MiB)
    t.qemu_io('ref.raw', *([w for w, _ in WRITES] + ['write -P 0x66 7M 1000', 'write -z 7M 64k',
                                                     'write -P 0x67 9M 1', 'write -P 0x68 9437185 511']))
    res = t.qemu_img('compare', '--object', SEC, '--image-opts', 'driver=raw,file.filename=ref.raw', opts('v.qcow2'))
    expect(res.rc == 0 and 'identical' in res.out, 'qemu-img compare with the raw reference', res)
    # the data is really encrypted: no plaintext pattern in the file
    data = t.content('v.qcow2')
    expect(bytes([0x77]) * 4096 not in data and bytes([0x5a]) * 4096 not in data, 'no plaintext on disk')


def t_convert(t):
    """vdk convert raw -> encrypted qcow2 (and back); qemu compares."""
    with open(t.path('src.raw'), 'wb') as f:
        f.write(os.urandom(3 * MiB + 512))
        f.truncate(16 * MiB)
    res = t.vdk('convert', '--object', SEC, '-O', 'qcow2', '-o', CREATE_OPTS, 'src.raw', 'c.qcow2')
    expect_rc(res, 0, 'vdk convert to encrypted qcow2')
    qemu_check(t, 'c.qcow2')
    res = t.qemu_img('compare', '--object', SEC, '--image-opts', 'driver=raw,file.filename=src.raw', opts('c.qcow2'))
    expect(res.rc == 0 and 'identical' in res.out, 'qemu-img compare', res)
    res = t.vdk('compare', '--object', SEC, '--image-opts', 'driver=raw,file.filename=src.raw', opts('c.qcow2'))
    expect(res.rc == 0 and 'identical' in res.out, 'vdk compare', res)
    # map: qemu shows no host offsets for encrypted data; vdk neither
    q = t.qemu_img('map', '--output=json', '--object', SEC, '--image-opts', opts('c.qcow2'))
    v = t.vdk('map', '--output=json', '--object', SEC, '--image-opts', opts('c.qcow2'))
    expect_rc(v, 0, 'vdk map')
    expect_eq(json.loads(v.out), json.loads(q.out), 'map --output=json vs qemu-img')


def t_info(t):
    """info needs no passphrase; JSON and text as qemu-img's."""
    for mk in (qemu_create, vdk_create):
        mk(t, 'i.qcow2')
        q = t.qemu_img('info', '--output=json', 'i.qcow2')
        v = t.vdk('info', '--output=json', 'i.qcow2')
        expect_rc(v, 0, 'vdk info --output=json')
        expect_eq(json.loads(v.out), json.loads(q.out), '%s: info --output=json vs qemu-img' % mk.__name__)
        q = t.qemu_img('info', 'i.qcow2')
        v = t.vdk('info', 'i.qcow2')
        expect_eq(v.out, q.out, '%s: info vs qemu-img' % mk.__name__)
        expect('encrypted: yes' in v.out, 'encrypted: yes', v)
        os.unlink(t.path('i.qcow2'))


def t_passphrase_errors(t):
    qemu_create(t, 'p.qcow2')
    qemu_io(t, 'p.qcow2', ['write -P 1 0 64k'])
    t0 = time.monotonic()
    res = t.vdk('io', '--object', 'secret,id=sec0,data=wrong', '-c', 'read 0 512', '--image-opts', opts('p.qcow2'))
    expect_rc(res, 1, 'wrong passphrase')
    expect_one_error_line(res)
    expect_eq(res.err.strip(), 'vdk: p.qcow2: qcow2: invalid password (no key slot matches)', 'wrong passphrase message')
    expect(res.out == '', 'no data output with a wrong passphrase', res)
    expect(time.monotonic() - t0 < 20, 'wrong passphrase answered quickly')
    res = t.vdk('io', '-c', 'read 0 512', 'p.qcow2')
    expect_rc(res, 1, 'no passphrase')
    expect_one_error_line(res)
    expect('encrypted' in res.err and 'key-secret' in res.err, 'no passphrase: says what is needed', res)
    res = t.vdk('io', '--object', SEC, '-c', 'read 0 512', '--image-opts', opts('p.qcow2', 'nosuch'))
    expect_rc(res, 1, 'unknown secret id')
    expect_eq(res.err.strip(), "vdk: p.qcow2: No secret with id 'nosuch'", 'unknown secret id message')
    # secrets from a file and base64, as qemu takes them
    t.write_bytes('pw.txt', PASS.encode())
    vdk_io(t, 'p.qcow2', ['read -P 1 0 64k'], secret='secret,id=sec0,file=pw.txt')
    import base64
    b64 = base64.b64encode(PASS.encode()).decode()
    vdk_io(t, 'p.qcow2', ['read -P 1 0 64k'], secret='secret,id=sec0,data=%s,format=base64' % b64)
    # the same for check, map, compare, convert, dd
    for args in (['check'], ['map'], ['convert', '-O', 'raw'], ['dd', 'of=x.raw', '-O', 'raw']):
        cmd = [args[0], '--object', 'secret,id=sec0,data=nope'] + args[1:]
        if args[0] == 'dd':
            cmd += ['--image-opts', 'if=' + opts('p.qcow2')]
        else:
            cmd += ['--image-opts', opts('p.qcow2')]
        if args[0] == 'convert':
            cmd.append('x.raw')
        res = t.vdk(*cmd)
        expect(res.rc != 0 and 'invalid password' in res.err, '%s with a wrong passphrase fails' % args[0], res)
    # --object errors
    for bad, msg in (('secret,id=a', 'exactly one of data= and file='),
                     ('secret,id=a,data=x,file=y', 'exactly one of data= and file='),
                     ('tls-creds-x509,id=a', 'only secret objects'),
                     ('secret,data=x', "'id' is missing"),
                     ('secret,id=a,data=!!,format=base64', 'not valid base64'),
                     ('secret,id=a,file=/nonexistent/pw', 'secret \'a\'')):
        res = t.vdk('info', '--object', bad, 'p.qcow2')
        expect_rc(res, 1, '--object %s' % bad)
        expect_one_error_line(res)
        expect(msg in res.err, '--object %s: message' % bad, res)
        expect('!!' not in res.err or 'base64' in res.err, 'no echo of the data', res)


def t_amend(t):
    """Key slots: vdk adds and removes, qemu opens with what is left; qemu
    adds, vdk opens."""
    vdk_create(t, 'a.qcow2')
    vdk_io(t, 'a.qcow2', ['write -P 9 0 128k'])
    both = ['--object', SEC, '--object', 'secret,id=new,data=second pass']
    res = t.vdk('amend', *both, '-o', 'encrypt.state=active,encrypt.new-secret=new,encrypt.iter-time=10',
                '--image-opts', opts('a.qcow2'))
    expect_rc(res, 0, 'vdk amend adds a key slot')
    info = json.loads(t.qemu_img('info', '--output=json', 'a.qcow2').out)
    slots = info['format-specific']['data']['encrypt']['slots']
    expect_eq([s['active'] for s in slots], [True, True] + [False] * 6, 'slots 0 and 1 active')
    qemu_io(t, 'a.qcow2', ['read -P 9 0 128k'], secret='secret,id=new,data=second pass', sid='new')
    qemu_io(t, 'a.qcow2', ['read -P 9 0 128k'])
    qemu_check(t, 'a.qcow2')
    # remove slot 0 by number: the old passphrase no longer opens it
    res = t.vdk('amend', *both, '-o', 'encrypt.state=inactive,encrypt.keyslot=0', '--image-opts', opts('a.qcow2', 'new'))
    expect_rc(res, 0, 'vdk amend removes slot 0')
    res = t.qemu_io_raw(opts('a.qcow2'), ['read 0 512'], fmt=None, extra=['--object', SEC, '--image-opts'])
    expect(res.rc != 0 and 'Invalid password' in res.err, 'qemu refuses the removed passphrase', res)
    # the last slot is never removed
    res = t.vdk('amend', *both, '-o', 'encrypt.state=inactive,encrypt.old-secret=new', '--image-opts',
                opts('a.qcow2', 'new'))
    expect_rc(res, 1, 'removing the last slot is refused')
    expect_one_error_line(res)
    expect('refusing' in res.err, 'says why', res)
    # qemu adds a slot; vdk opens with it
    for _ in range(10):  # qemu's PBKDF2 benchmark flake, as in qemu_create
        res = t.qemu_img('amend', '--object', 'secret,id=new,data=second pass', '--object',
                         'secret,id=q,data=qemu pass', '-o', 'encrypt.state=active,encrypt.new-secret=q,'
                         'encrypt.iter-time=100', '--image-opts', opts('a.qcow2', 'new'))
        if 'accurate CPU usage' not in res.err:
            break
    expect_rc(res, 0, 'qemu-img amend adds a slot')
    vdk_io(t, 'a.qcow2', ['read -P 9 0 128k'], secret='secret,id=q,data=qemu pass', sid='q')
    # remove by passphrase with vdk; qemu still opens with the other one
    res = t.vdk('amend', '--object', 'secret,id=q,data=qemu pass', '--object', 'secret,id=new,data=second pass',
                '-o', 'encrypt.state=inactive,encrypt.old-secret=q', '--image-opts', opts('a.qcow2', 'new'))
    expect_rc(res, 0, 'vdk amend removes the slot matching a passphrase')
    qemu_io(t, 'a.qcow2', ['read -P 9 0 128k'], secret='secret,id=new,data=second pass', sid='new')
    qemu_check(t, 'a.qcow2', secret='secret,id=new,data=second pass', sid='new')
    res = t.vdk('io', '--object', 'secret,id=q,data=qemu pass', '-c', 'read 0 1', '--image-opts', opts('a.qcow2', 'q'))
    expect(res.rc == 1 and 'invalid password' in res.err, 'removed passphrase refused by vdk', res)


def luks_offset(data):
    """Offset of the LUKS header (from the qcow2 crypto header extension)."""
    off = struct.unpack('>I', data[100:104])[0]
    while off + 8 <= 65536:
        typ, ln = struct.unpack('>II', data[off:off + 8])
        if typ == 0x0537be77:
            return off, struct.unpack('>Q', data[off + 8:off + 16])[0]
        if typ == 0:
            break
        off += 8 + ((ln + 7) & ~7)
    raise AssertionError('no crypto header extension')


def t_hostile(t):
    """Mutated LUKS headers and crypto extensions: one line naming the
    field, exit 1, never a hang (huge iteration counts are bounded)."""
    vdk_create(t, 'base.qcow2')
    vdk_io(t, 'base.qcow2', ['write -P 3 0 64k'])
    base = t.content('base.qcow2')
    ext, lo = luks_offset(base)
    slot = lambda i, f: lo + 208 + i * 48 + f
    cases = [
        ('magic', lo, b'LUKX', 'bad magic'),
        ('version', lo + 6, struct.pack('>H', 2), 'unsupported version 2'),
        ('cipher', lo + 8, b'twofish\0', 'cipher twofish-xts-plain64 is not supported'),
        ('mode', lo + 40, b'cbc-essiv:sha256\0', 'not supported'),
        ('hash', lo + 72, b'md5\0', "hash spec 'md5'"),
        ('payload', lo + 104, struct.pack('>I', 0x7fffffff), 'payload offset 2147483647'),
        ('key-bytes', lo + 108, struct.pack('>I', 48), 'key bytes 48'),
        ('mk-iter', lo + 164, struct.pack('>I', 0xffffffff), 'master key digest iterations 4294967295'),
        ('slot-iter', slot(0, 4), struct.pack('>I', 0xffffffff), 'key slot 0: iterations 4294967295'),
        ('slot-state', slot(1, 0), struct.pack('>I', 0x12345678), 'key slot 1: state 0x12345678'),
        ('stripes', slot(0, 44), struct.pack('>I', 4001), 'key slot 0: stripes 4001'),
        ('key-offset', slot(2, 40), struct.pack('>I', 0xfffffff0), 'key slot 2: key material'),
        ('overlap', slot(3, 40), struct.pack('>I', 0x208), 'overlaps'),
        ('ext-offset', ext + 8, struct.pack('>Q', 0x12345), 'crypto header offset 0x12345'),
        ('ext-length', ext + 16, struct.pack('>Q', 1 << 40), 'crypto header length 1099511627776'),
        ('ext-short', ext + 16, struct.pack('>Q', 100), 'crypto header length 100'),
    ]
    for name, off, patch, msg in cases:
        data = bytearray(base)
        data[off:off + len(patch)] = patch
        fn = 'h-%s.qcow2' % name
        t.write_bytes(fn, bytes(data))
        t0 = time.monotonic()
        res = t.vdk('io', '--object', SEC, '-c', 'read -P 3 0 64k', '--image-opts', opts(fn))
        dt = time.monotonic() - t0
        expect_rc(res, 1, 'hostile %s' % name)
        expect_one_error_line(res)
        expect(msg in res.err, 'hostile %s: message names the field (%s)' % (name, msg), res)
        expect(dt < 20, 'hostile %s: answered in %.1fs' % (name, dt))
        res = t.vdk('info', fn)
        expect(res.rc in (0, 1), 'hostile %s: info does not crash' % name, res)
    # a corrupted key slot (flipped key material) is a wrong passphrase, not garbage
    data = bytearray(base)
    km = lo + 4096 + 1000
    data[km] ^= 0xff
    t.write_bytes('h-km.qcow2', bytes(data))
    res = t.vdk('io', '--object', SEC, '-c', 'read 0 512', '--image-opts', opts('h-km.qcow2'))
    expect(res.rc == 1 and 'invalid password' in res.err, 'damaged key material: no key slot matches', res)


def t_concurrent(t):
    """Many requests in flight (the cipher runs on a pool): the image stays
    clean and equal to a reference written the same way by vdk."""
    vdk_create(t, 'b.qcow2', '32M')
    res = t.vdk('bench', '--object', SEC, '-w', '-c', '2000', '-d', '32', '-s', '4k', '--pattern=rand',
                '--image-opts', opts('b.qcow2'))
    expect_rc(res, 0, 'vdk bench -w on an encrypted image')
    qemu_check(t, 'b.qcow2')
    res = t.vdk('bench', '--object', SEC, '-c', '2000', '-d', '32', '-s', '4k', '--pattern=rand',
                '--image-opts', opts('b.qcow2'))
    expect_rc(res, 0, 'vdk bench reads on an encrypted image')
    # reads of every byte agree between vdk and qemu
    res = t.vdk('convert', '--object', SEC, '-O', 'raw', '--image-opts', opts('b.qcow2'), 'v.raw')
    expect_rc(res, 0, 'vdk convert')
    res = t.qemu_img('convert', '--object', SEC, '-O', 'raw', '--image-opts', opts('b.qcow2'), 'q.raw')
    expect_rc(res, 0, 'qemu-img convert')
    t.qemu_compare('q.raw', 'v.raw')


def t_create_errors(t):
    for o, msg in (('encrypt.format=luks', 'needs encrypt.key-secret'),
                   ('encrypt.format=luks,encrypt.key-secret=nosuch', "No secret with id 'nosuch'"),
                   ('encrypt.format=aes,encrypt.key-secret=sec0', "encrypt.format 'aes' is not supported"),
                   ('encryption=on', 'legacy AES'),
                   ('encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-mode=cbc', "cipher-mode 'cbc'"),
                   ('encrypt.format=luks,encrypt.key-secret=sec0,preallocation=metadata', 'preallocation')):
        res = t.vdk('create', '-f', 'qcow2', '--object', SEC, '-o', o, 'e.qcow2', '1M')
        expect_rc(res, 1, 'create -o %s' % o)
        expect(msg in res.err, 'create -o %s: message' % o, res)
        expect(not os.path.exists(t.path('e.qcow2')), 'create -o %s: no file left' % o)
    # aes-128 works both ways
    vdk_create(t, 'k.qcow2', '4M', ',encrypt.cipher-alg=aes-128')
    vdk_io(t, 'k.qcow2', ['write -P 4 0 1M'])
    qemu_io(t, 'k.qcow2', ['read -P 4 0 1M'])
    info = json.loads(t.qemu_img('info', '--output=json', 'k.qcow2').out)
    expect_eq(info['format-specific']['data']['encrypt']['cipher-alg'], 'aes-128', 'cipher-alg')

    # compression: qemu-img convert refuses it, qemu-io writes compressed
    # clusters unencrypted; vdk reads those and never writes any
    t.sparse('z.raw', 4 * MiB)
    res = t.vdk('convert', '-c', '--object', SEC, '-O', 'qcow2', '-o', CREATE_OPTS, 'z.raw', 'zc.qcow2')
    expect(res.rc == 1 and 'Compression and encryption not supported at the same time' in res.err,
           'convert -c to an encrypted image refused', res)
    expect(not os.path.exists(t.path('zc.qcow2')), 'no target left behind')
    qemu_io(t, 'k.qcow2', ['write -c -P 0x41 2M 64k'])
    vdk_io(t, 'k.qcow2', ['read -P 0x41 2M 64k', 'read -P 4 0 1M'])
    res = t.vdk('io', '--object', SEC, '-c', 'write -c 3M 64k', '--image-opts', opts('k.qcow2'))
    expect('write failed: Operation not supported' in res.out + res.err, 'vdk io write -c refused', res)


def t_ops(t):
    """vdk check counts the LUKS header area (no leaks; -r never frees it),
    measure adds it as qemu-img does, compact and downgrade refuse,
    allocate and resize keep the data readable."""
    qemu_create(t, 'o.qcow2')
    qemu_io(t, 'o.qcow2', ['write -P 5 0 1M', 'write -P 6 10M 100k'])
    for img, sec in (('o.qcow2', SEC),):
        res = t.vdk('check', '--object', sec, '--image-opts', opts(img))
        expect(res.rc == 0 and 'No errors were found' in res.out, 'vdk check: clean, no leaks', res)
        res = t.vdk('check', '-r', 'all', '--object', sec, '--image-opts', opts(img))
        expect_rc(res, 0, 'vdk check -r all')
        qemu_io(t, img, ['read -P 5 0 1M', 'read -P 6 10M 100k'])
    # (qemu-img measure runs a PBKDF2 benchmark: keep it short)
    for o in ('encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100',
              'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100,'
              'encrypt.cipher-alg=aes-128,cluster_size=4k'):
        for size in ('1G', '20G'):
            for _ in range(10):
                # qemu's PBKDF2 benchmark (thread CPU time of 2^15 iterations) reads
                # 0 ms now and then: "Unable to get accurate CPU usage"; retry
                q = t.qemu_img('measure', '--object', SEC, '-O', 'qcow2', '-o', o, '--size', size)
                if 'accurate CPU usage' not in q.err:
                    break
            expect_rc(q, 0, 'qemu-img measure')
            v = t.vdk('measure', '--object', SEC, '-O', 'qcow2', '-o', o, '--size', size)
            expect_eq(v.out, q.out, 'measure -o %s --size %s vs qemu-img' % (o, size))
    res = t.vdk('compact', '--object', SEC, '--image-opts', opts('o.qcow2'))
    expect(res.rc == 1 and 'encrypted' in res.err, 'compact refuses encrypted images', res)
    res = t.vdk('amend', '--object', SEC, '-o', 'compat=0.10', '--image-opts', opts('o.qcow2'))
    expect(res.rc == 1 and 'encrypted' in res.err, 'downgrade refused with the reason', res)
    res = t.vdk('resize', '--object', SEC, '--image-opts', opts('o.qcow2'), '128M')
    expect_rc(res, 0, 'vdk resize')
    vdk_io(t, 'o.qcow2', ['write -P 7 100M 64k'])
    res = t.vdk('allocate', '--object', SEC, '--image-opts', opts('o.qcow2'))
    expect_rc(res, 0, 'vdk allocate')
    qemu_check(t, 'o.qcow2')
    qemu_io(t, 'o.qcow2', ['read -P 5 0 1M', 'read -P 6 10M 100k', 'read -P 7 100M 64k', 'read -P 0 50M 1M',
                           'read -P 0 127M 1M'])


def t_backing(t):
    """An overlay over an encrypted backing file: backing.encrypt.key-secret."""
    qemu_create(t, 'b.qcow2')
    qemu_io(t, 'b.qcow2', ['write -P 0x5a 0 64k'])
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'ov.qcow2'), 0)
    spec = 'driver=qcow2,file.filename=ov.qcow2,backing.encrypt.key-secret=sec0'
    res = t.vdk_io_raw(spec, ['read -P 0x5a 0 64k', 'write -P 0x99 0 4k'], fmt=None, extra=['--object', SEC,
                                                                                        '--image-opts'])
    expect(res.rc == 0 and 'fail' not in res.out + res.err, 'vdk reads through and writes the overlay', res)
    res = t.qemu_io_raw(spec, ['read -P 0x99 0 4k', 'read -P 0x5a 4k 60k'], fmt=None,
                        extra=['--object', SEC, '--image-opts'])
    expect(res.rc == 0 and 'fail' not in res.out + res.err, 'qemu reads the result', res)
    res = t.vdk('io', '-c', 'read 0 1', 'ov.qcow2')
    expect(res.rc == 1 and "cannot open backing file 'b.qcow2'" in res.err and 'encrypted' in res.err,
           'no passphrase for the backing file: says so', res)
    # creating an overlay reads the backing file's size only: no passphrase
    res = t.vdk('create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', 'ov2.qcow2')
    expect_rc(res, 0, 'vdk create over an encrypted backing file')
    expect_eq(t.vdk('info', 'ov2.qcow2').out, t.qemu_img('info', 'ov2.qcow2').out, 'overlay info vs qemu-img')


suite.add_io('qcow2-luks/qemu-to-vdk', t_qemu_to_vdk)
suite.add_io('qcow2-luks/vdk-to-qemu', t_vdk_to_qemu)
suite.add('qcow2-luks/convert', t_convert)
suite.add('qcow2-luks/info', t_info)
suite.add('qcow2-luks/passphrase-errors', t_passphrase_errors)
suite.add('qcow2-luks/amend-keyslots', t_amend)
suite.add('qcow2-luks/hostile-headers', t_hostile)
suite.add('qcow2-luks/concurrent', t_concurrent)
suite.add('qcow2-luks/create-errors', t_create_errors)
suite.add('qcow2-luks/encrypted-backing', t_backing)
suite.add('qcow2-luks/check-measure-compact-allocate', t_ops)

if __name__ == '__main__':
    main(suite)
