#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk io (qemu-io style commands) against qemu-io, plus a random model test."""

import random

from vdktest import (KiB, MiB, Suite, expect, expect_eq, expect_rc, first_difference, main, strip_timing,
                     zero_ranges, ranges_cover)

suite = Suite('io')
SIZE = 64 * MiB

# (pattern, offset, length): unaligned, aligned, crossing 4k blocks, at the end
CHUNKS = [(0x5a, 1000, 3000), (0xa5, 5 * MiB + 7, 12345), (0x3c, 8 * MiB, 64 * KiB),
          (0x0f, 9 * MiB - 100, 200), (0x33, SIZE - 1000, 1000), (0x81, 0, 1), (0xfe, 33 * MiB + 511, 1)]


def no_failure(res, what):
    expect(res.rc == 0 and 'Pattern verification failed' not in res.out + res.err
           and 'failed' not in res.out + res.err, '%s failed' % what, res)


def t_vdk_writes_qemu_reads(t):
    t.sparse('disk.img', SIZE)
    res = t.vdk_io_raw('disk.img', ['write -P 0x%02x %d %d' % c for c in CHUNKS])
    no_failure(res, 'vdk io write')
    expect_eq(res.out.count('wrote '), len(CHUNKS), "number of 'wrote' lines", res)
    res = t.qemu_io_raw('disk.img', ['read -P 0x%02x %d %d' % c for c in CHUNKS])
    no_failure(res, 'qemu-io read -P')
    # and nothing else was written
    data = t.content('disk.img')
    model = bytearray(SIZE)
    for p, o, n in CHUNKS:
        model[o:o + n] = bytes([p]) * n
    expect(data == bytes(model), 'file differs from the expected content at offset %s'
           % first_difference(data, bytes(model)))


def t_qemu_writes_vdk_reads(t):
    t.sparse('disk.img', SIZE)
    no_failure(t.qemu_io_raw('disk.img', ['write -P 0x%02x %d %d' % c for c in CHUNKS]), 'qemu-io write')
    res = t.vdk_io_raw('disk.img', ['read -P 0x%02x %d %d' % c for c in CHUNKS] +
                       ['read -P 0 %d %d' % (20 * MiB, 4 * MiB), 'read -P 0 4000 4000'])
    no_failure(res, 'vdk io read -P')
    expect_eq(res.out.count('read '), len(CHUNKS) + 2, "number of 'read' lines", res)


def t_wrong_pattern(t):
    t.sparse('disk.img', 4 * MiB)
    t.qemu_io('disk.img', 'write -P 0x5a 1000 3000')
    res = t.vdk_io_raw('disk.img', ['read -P 0x5b 1000 3000'])
    expect_rc(res, 1)
    expect('Pattern verification failed' in res.out + res.err, "no 'Pattern verification failed'", res)
    # a hole read with a non-zero pattern fails too
    res = t.vdk_io_raw('disk.img', ['read -P 0x01 2M 4096'])
    expect_rc(res, 1)
    expect('Pattern verification failed' in res.out + res.err, "no 'Pattern verification failed' on a hole", res)
    # the exit code reflects a failure in an earlier command too
    res = t.vdk_io_raw('disk.img', ['read -P 0x5b 1000 3000', 'length'])
    expect_rc(res, 1, 'failed read followed by a good command')


def t_write_zeroes(t):
    t.sparse('disk.img', 8 * MiB)
    t.qemu_io('disk.img', 'write -P 0x99 0 8M')
    res = t.vdk_io_raw('disk.img', ['write -z 1000 5000', 'write -z -u 1M 1M', 'write -z %d 4096' % (3 * MiB),
                                    'write -z -u %d 1' % (5 * MiB + 3), 'write -z %d 512' % (8 * MiB - 512)])
    no_failure(res, 'vdk io write -z')
    no_failure(t.qemu_io_raw('disk.img', [
        'read -P 0x99 0 1000', 'read -P 0 1000 5000', 'read -P 0x99 6000 %d' % (MiB - 6000),
        'read -P 0 1M 1M', 'read -P 0x99 2M 1M', 'read -P 0 3M 4096', 'read -P 0x99 %d 4096' % (3 * MiB + 4096),
        'read -P 0x99 %d 3' % (5 * MiB), 'read -P 0 %d 1' % (5 * MiB + 3), 'read -P 0x99 %d 10' % (5 * MiB + 4),
        'read -P 0x99 %d %d' % (8 * MiB - 4096, 4096 - 512), 'read -P 0 %d 512' % (8 * MiB - 512)]), 'qemu-io read back')


def t_discard(t):
    t.sparse('disk.img', 8 * MiB)
    t.qemu_io('disk.img', 'write -P 0x77 0 8M')
    res = t.vdk_io_raw('disk.img', ['discard 1M 2M', 'discard 5000 3000', 'discard %d 4096' % (8 * MiB - 4096)])
    no_failure(res, 'vdk io discard')
    expect('discard 2097152/2097152 bytes at offset 1048576' in res.out, 'discard line missing', res)
    no_failure(t.qemu_io_raw('disk.img', [
        'read -P 0x77 0 5000', 'read -P 0 5000 3000', 'read -P 0x77 8000 %d' % (MiB - 8000),
        'read -P 0 1M 2M', 'read -P 0x77 3M 4M', 'read -P 0 %d 4096' % (8 * MiB - 4096)]), 'qemu-io read back')
    # the aligned discard deallocated the range (raw files punch holes)
    expect(ranges_cover(zero_ranges(t.qemu_map('disk.img')), [(1 * MiB, 3 * MiB)]),
           'discarded range 1M..3M is not a hole in qemu-img map')


IO_SCRIPT = [
    'write -P 0x5a 1000 3000',
    'write -z 1M 64k',
    'write -z -u 2M 128k',
    'write -P 0x11 %d 128k' % (3 * MiB),
    'discard %d 64k' % (3 * MiB),
    'write -f -P 0x22 %d 4096' % (5 * MiB),
    'write -q -P 0x23 %d 4096' % (6 * MiB),
    'length',
    'map',
    'alloc 0 4096',
    'alloc 2M 1M',
    'alloc 0',
    'alloc 1000 1',
    'read -P 0x5a 1000 3000',
    'read -v 995 20',
    'read -v %d 40' % (3 * MiB + 64 * KiB - 20),
    'read -q -P 0x22 %d 4096' % (5 * MiB),
    'read -P 0 %d 64k' % (3 * MiB),
    'read -P 0x11 %d 64k' % (3 * MiB + 64 * KiB),
    'flush',
    'truncate 32M',
    'length',
    'truncate 48M',
    'length',
    'read -P 0 32M 16M',
    'map',
    'info',
]


def t_output_matches(t, script, expect_ok=True):
    t.sparse('v.img', SIZE)
    t.sparse('q.img', SIZE)
    t.qemu_io('v.img', 'write -P 0x44 10M 1M')
    t.qemu_io('q.img', 'write -P 0x44 10M 1M')
    rv = t.vdk_io_raw('v.img', script)
    rq = t.qemu_io_raw('q.img', script)
    if expect_ok:
        no_failure(rq, 'qemu-io (test premise)')
    expect_eq(rv.rc, rq.rc, 'vdk io exit code vs qemu-io', rv)
    expect_eq(strip_timing(rv.out), strip_timing(rq.out), 'vdk io stdout vs qemu-io (timing lines removed)', rv)
    expect_eq(strip_timing(rv.err), strip_timing(rq.err), 'vdk io stderr vs qemu-io', rv)
    expect(t.content('v.img') == t.content('q.img'), 'files differ after the same commands')


PAST_END = ('write -P 0x5a 1M 1', 'read 1048000 1000', 'write -P 0x5a 1048000 1000',
            'discard 1048000 1000', 'write -z 1048000 1000', 'write -P 0x5a 2M 4096')


def t_past_end(t):
    """Requests past the end fail (exit 1) and change nothing."""
    t.sparse('v.img', MiB)
    for cmd in PAST_END:
        rv = t.vdk_io_raw('v.img', [cmd])
        expect_rc(rv, 1, cmd)
        expect('failed' in rv.out + rv.err, '%r: no failure message' % cmd, rv)
    expect_eq(t.size('v.img'), MiB, 'size after out-of-range requests')
    expect(not t.content('v.img').strip(b'\0'), 'out-of-range requests changed the file')


def t_past_end_messages(t):
    t.sparse('v.img', MiB)
    t.sparse('q.img', MiB)
    problems = []
    for cmd in PAST_END:
        rv = t.vdk_io_raw('v.img', [cmd])
        rq = t.qemu_io_raw('q.img', [cmd])
        ov, oq = strip_timing(rv.out + rv.err), strip_timing(rq.out + rq.err)
        if rv.rc != rq.rc or ov != oq:
            problems.append('%r: vdk io exit %d %r, qemu-io exit %d %r' % (cmd, rv.rc, ov, rq.rc, oq))
    expect(not problems, 'out-of-range requests differ from qemu-io:\n' + '\n'.join(problems))


def t_unaligned_size(t):
    """qemu-io sees a 1000000-byte raw file as 1000448 bytes (whole sectors)."""
    script = ['length', 'read -P 0x33 999000 1000', 'read -P 0 1000000 448', 'alloc 0', 'map']
    for name in ('v.img', 'q.img'):
        t.sparse(name, 1000000)
        t.qemu_io(name, 'write -P 0x33 999000 1000')
    rv = t.vdk_io_raw('v.img', script, engine=False)
    rq = t.qemu_io_raw('q.img', script)
    no_failure(rq, 'qemu-io (test premise)')
    expect_eq(rv.rc, rq.rc, 'vdk io exit code vs qemu-io', rv)
    expect_eq(strip_timing(rv.out + rv.err), strip_timing(rq.out + rq.err), 'vdk io output vs qemu-io', rv)


def t_stdin(t):
    t.sparse('disk.img', 4 * MiB)
    script = 'write -P 0x42 0 4096\nwrite -P 0x43 5000 100\nread -P 0x42 0 4096\n'
    res = t.vdk('io', '-f', 'raw', *t.eio(), 'disk.img', input=script)
    no_failure(res, 'vdk io from stdin')
    no_failure(t.qemu_io_raw('disk.img', ['read -P 0x42 0 4096', 'read -P 0x43 5000 100', 'read -P 0 5100 1000']),
               'qemu-io read back')


def t_read_only(t):
    t.sparse('disk.img', 4 * MiB)
    t.qemu_io('disk.img', 'write -P 0x42 0 4096')
    before = t.content('disk.img')
    res = t.vdk_io_raw('disk.img', ['write -P 0x01 0 512'], extra=['-r'])
    expect_rc(res, 1, 'write on a read-only open')
    expect_eq(t.content('disk.img'), before, 'file content after a refused write')
    res = t.vdk_io_raw('disk.img', ['read -P 0x42 0 4096'], extra=['-r'])
    no_failure(res, 'read on a read-only open')


def t_truncate_prealloc(t):
    t.sparse('disk.img', 4 * MiB)
    res = t.vdk_io_raw('disk.img', ['truncate -m falloc 16M', 'length'])
    no_failure(res, 'vdk io truncate -m falloc')
    expect_eq(t.size('disk.img'), 16 * MiB, 'size after truncate')
    expect(t.blocks_bytes('disk.img') >= 12 * MiB,
           'grown part not allocated: %d bytes allocated' % t.blocks_bytes('disk.img'))
    no_failure(t.qemu_io_raw('disk.img', ['read -P 0 0 16M']), 'qemu-io read back')


# --------------------------------------------------------------------------
# random model test

MODEL_SIZE = 8 * MiB
MODEL_OPS = 200
MODEL_BATCH = 40


def rand_range(rnd, size):
    kind = rnd.random()
    if kind < 0.3:      # 4k aligned
        length = rnd.randrange(1, 33) * 4096
        off = rnd.randrange(0, (size - length) // 4096 + 1) * 4096
    elif kind < 0.5:    # 512 aligned
        length = rnd.randrange(1, 129) * 512
        off = rnd.randrange(0, (size - length) // 512 + 1) * 512
    elif kind < 0.6:    # tiny
        length = rnd.randrange(1, 16)
        off = rnd.randrange(0, size - length + 1)
    elif kind < 0.65:   # touching the end
        length = rnd.randrange(1, 20000)
        off = size - length
    else:               # anything
        length = rnd.randrange(1, 200000)
        off = rnd.randrange(0, size - length + 1)
    return off, length


def t_model(t, seed):
    rnd = random.Random(seed)
    t.sparse('disk.img', MODEL_SIZE)
    model = bytearray(MODEL_SIZE)
    ops = 0
    batches = 0
    while ops < MODEL_OPS:
        cmds = []
        for _ in range(MODEL_BATCH):
            off, length = rand_range(rnd, MODEL_SIZE)
            r = rnd.random()
            if r < 0.6:
                p = rnd.randrange(0, 256)
                cmds.append('write -P 0x%02x %d %d' % (p, off, length))
                model[off:off + length] = bytes([p]) * length
            elif r < 0.75:
                cmds.append('write -z %s%d %d' % ('-u ' if rnd.random() < 0.5 else '', off, length))
                model[off:off + length] = bytes(length)
                p = 0
            else:
                cmds.append('discard %d %d' % (off, length))
                model[off:off + length] = bytes(length)
                p = 0
            ops += 1
            if rnd.random() < 0.3:
                cmds.append('read -P 0x%02x %d %d' % (p, off, length))
            if rnd.random() < 0.05:
                cmds.append('flush')
        res = t.vdk_io_raw('disk.img', cmds)
        batches += 1
        no_failure(res, 'vdk io batch %d' % batches)
    data = t.content('disk.img')
    expect_eq(len(data), MODEL_SIZE, 'file size')
    diff = first_difference(data, bytes(model))
    expect(diff is None, 'file differs from the model at offset %s (file %r, model %r)'
           % (diff, data[diff:diff + 8] if diff is not None else b'', bytes(model[diff:diff + 8]) if diff is not None else b''))
    t.write_bytes('model.img', bytes(model))
    t.qemu_compare('model.img', 'disk.img')


suite.add_io('io-vdk-writes-qemu-io-reads', t_vdk_writes_qemu_reads)
suite.add_io('io-qemu-io-writes-vdk-reads', t_qemu_writes_vdk_reads)
suite.add_io('io-read-wrong-pattern', t_wrong_pattern)
suite.add_io('io-write-zeroes', t_write_zeroes)
suite.add_io('io-discard', t_discard)
suite.add_io('io-output-matches-qemu-io', t_output_matches, IO_SCRIPT)
suite.add_io('io-pattern-failure-output-matches-qemu-io', t_output_matches,
             ['write -P 0x5a 1000 3000', 'read -P 0x5b 1000 3000', 'read -P 0x01 2M 512', 'length'], False)
suite.add_io('io-commands-from-stdin', t_stdin)
suite.add_io('io-read-only', t_read_only)
suite.add_io('io-truncate-falloc', t_truncate_prealloc)
suite.add_io('io-past-end-refused', t_past_end)
suite.add('io-past-end-messages-match-qemu-io', t_past_end_messages)
suite.add('io-unaligned-size-matches-qemu-io', t_unaligned_size)
for i, e in enumerate(('io_uring', 'native', 'threads')):
    suite.add_io('io-random-model', t_model, 1000 + i, engines=(e,), caches=('none',))
suite.add_io('io-random-model', t_model, 2000, engines=('io_uring',), caches=('writeback',))

if __name__ == '__main__':
    main(suite)
