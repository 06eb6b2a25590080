#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Build the libFuzzer targets (clang, ASan + UBSan) and run each for a
fixed time from seed corpora made with qemu-img/qemu-io, after replaying
every saved regression input (tests/fuzz/regress/TARGET/*).  Prints TAP:
one case per target.

    tests/fuzz/run-fuzz.py [--seconds 30] [--build DIR] [--only TARGET]

The normal test suite runs it with a short time; a long run is the same
command with --seconds 3600 (see README, Reliability).  A crash leaves the
input under BUILD/artifacts/; copy it to tests/fuzz/regress/TARGET/ once
fixed so it is replayed on every run."""

import argparse
import os
import shutil
import struct
import subprocess
import sys

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ['qcow2', 'vdi', 'vmdk', 'qcow', 'probe', 'vmdk-desc', 'nbd']


def sh(args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, errors='replace', **kw)


def build(bdir):
    if not os.path.exists(os.path.join(bdir, 'build.ninja')):
        env = dict(os.environ, CC='clang')
        r = sh(['meson', 'setup', bdir, SRC, '-Dfuzzing=true', '-Db_sanitize=address,undefined',
                '-Db_lundef=false', '-Dwerror=true', '-Dbuildtype=debugoptimized'], env=env)
        if r.returncode != 0:
            return 'meson setup failed:\n' + r.stdout[-3000:] + r.stderr[-3000:]
    r = sh(['ninja', '-C', bdir] + ['tests/fuzz/fuzz-' + t for t in TARGETS])
    if r.returncode != 0:
        return 'build failed:\n' + r.stdout[-5000:] + r.stderr[-3000:]
    return None


def qemu_img(*args):
    r = sh(['qemu-img'] + list(args))
    if r.returncode != 0:
        raise RuntimeError('qemu-img %s: %s' % (' '.join(args), r.stderr))


def qemu_io(fmt, path, *cmds):
    args = ['qemu-io', '-f', fmt]
    for c in cmds:
        args += ['-c', c]
    r = sh(args + [path])
    if r.returncode != 0:
        raise RuntimeError('qemu-io: %s' % r.stderr)


def seeds(d):
    """Small valid images of every kind the targets read (files under 256 KiB)."""
    out = {t: os.path.join(d, t) for t in TARGETS}
    for p in out.values():
        os.makedirs(p, exist_ok=True)
    tmp = os.path.join(d, 'tmp')
    os.makedirs(tmp, exist_ok=True)

    def qcow2(name, opts, writes=(), size='1M'):
        p = os.path.join(tmp, name)
        qemu_img('create', '-q', '-f', 'qcow2', *(['-u'] if 'backing' in opts else []), '-o', opts, p, size)
        if writes:
            qemu_io('qcow2', p, *writes)
        return p

    made = []
    w = ['write -P 0x5a 0 4k', 'write -z 8k 4k', 'write -P 0x11 100k 1k']
    made.append(('qcow2', qcow2('v3.qcow2', 'cluster_size=512', w)))
    made.append(('qcow2', qcow2('v2.qcow2', 'cluster_size=512,compat=0.10', w)))
    made.append(('qcow2', qcow2('ext.qcow2', 'cluster_size=16k,extended_l2=on', w)))
    made.append(('qcow2', qcow2('r1.qcow2', 'cluster_size=512,refcount_bits=1', w)))
    made.append(('qcow2', qcow2('bk.qcow2', 'cluster_size=512,backing_file=base.raw,backing_fmt=raw')))
    zp = qcow2('z.qcow2', 'cluster_size=4k', size='64k')
    rawp = os.path.join(tmp, 'pat.raw')
    with open(rawp, 'wb') as f:
        f.write(bytes(range(256)) * 64)
    cp = os.path.join(tmp, 'c.qcow2')
    qemu_img('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k', rawp, cp)
    made.append(('qcow2', cp))
    sp = qcow2('snap.qcow2', 'cluster_size=512', w)
    qemu_img('snapshot', '-c', 's1', sp)
    qemu_io('qcow2', sp, 'write -P 0x22 0 1k')
    made.append(('qcow2', sp))
    bp = qcow2('bm.qcow2', 'cluster_size=512', w)
    qemu_img('bitmap', '--add', bp, 'b0')
    made.append(('qcow2', bp))
    del zp
    # vdi: an empty dynamic one (data blocks are 1 MiB, too big for a seed)
    vp = os.path.join(tmp, 'e.vdi')
    qemu_img('create', '-q', '-f', 'vdi', vp, '16M')
    made.append(('vdi', vp))
    # vmdk: sparse with small grains... qemu writes 64 KiB grains; keep the disk tiny
    for sub in ('monolithicSparse', 'streamOptimized'):
        p = os.path.join(tmp, sub + '.vmdk')
        qemu_img('create', '-q', '-f', 'vmdk', '-o', 'subformat=' + sub, p, '1M')
        if sub == 'monolithicSparse':
            qemu_io('vmdk', p, 'write -P 0x5a 0 4k')
        made.append(('vmdk', p))
    fp = os.path.join(tmp, 'flat.vmdk')
    qemu_img('create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', fp, '1M')
    made.append(('vmdk', fp))
    made.append(('vmdk-desc', fp))
    # qcow v1
    q1 = os.path.join(tmp, 'v1.qcow')
    qemu_img('create', '-q', '-f', 'qcow', q1, '1M')
    qemu_io('qcow', q1, 'write -P 0x5a 0 4k')
    made.append(('qcow', q1))
    for kind, p in made:
        if os.path.getsize(p) > 256 * 1024:
            continue
        shutil.copy(p, os.path.join(out[kind], os.path.basename(p)))
        if kind != 'vmdk-desc':
            shutil.copy(p, os.path.join(out['probe'], os.path.basename(p)))
    with open(os.path.join(out['vmdk-desc'], 'twogb.txt'), 'w') as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                'createType="twoGbMaxExtentSparse"\n\n'
                'RW 4194304 SPARSE "a-s001.vmdk"\nRW 2048 SPARSE "a-s002.vmdk"\n'
                'RDONLY 100 ZERO\nRW 8 FLAT "f.raw" 16\n\nddb.virtualHWVersion = "4"\n'
                'ddb.adapterType = "ide"\nparentFileNameHint="p.vmdk"\n')
    nbd_seeds(out['nbd'])
    shutil.rmtree(tmp)
    return out


def nbd_seeds(d):
    """Client byte streams: handshakes (EXPORT_NAME, GO with structured
    replies and both meta contexts, LIST, INFO) followed by one of every
    command, as a well-behaved client sends them."""
    opts_magic, req_magic = 0x49484156454f5054, 0x25609513

    def opt(o, data=b''):
        return struct.pack('>QII', opts_magic, o, len(data)) + data

    def req(cmd, cookie, off, length, flags=0, data=b''):
        return struct.pack('>IHHQQI', req_magic, flags, cmd, cookie, off, length) + data

    meta = struct.pack('>I', 0) + struct.pack('>I', 2) + struct.pack('>I', 15) + b'base:allocation' + \
        struct.pack('>I', 21) + b'qemu:allocation-depth'
    go = opt(7, struct.pack('>IH', 0, 1) + struct.pack('>H', 3))
    cmds = (req(0, 1, 0, 4096) + req(1, 2, 4096, 512, 1, b'\xab' * 512) + req(3, 3, 0, 0) +
            req(4, 4, 8192, 4096) + req(5, 5, 0, 65536) + req(6, 6, 12288, 4096, 2) +
            req(7, 7, 0, 1 << 20) + req(7, 8, 0, 1 << 20, 8) + req(0, 9, 1048064, 512, 4) + req(2, 10, 0, 0))
    seeds = {
        'export-name': struct.pack('>I', 3) + opt(1, b'') + cmds,
        'go-structured': struct.pack('>I', 3) + opt(8) + opt(10, meta) + go + cmds,
        'list-info': struct.pack('>I', 1) + opt(3) + opt(9, meta) + opt(6, struct.pack('>IH', 0, 0)) +
        opt(8) + go + cmds,
        'abort': struct.pack('>I', 1) + opt(2),
    }
    for name, data in seeds.items():
        with open(os.path.join(d, name), 'wb') as f:
            f.write(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--seconds', type=int, default=30)
    ap.add_argument('--build', default=os.path.join(os.environ.get('MESON_BUILD_ROOT', 'build'), 'fuzz-build'))
    ap.add_argument('--only')
    a = ap.parse_args()
    targets = [a.only] if a.only else TARGETS
    print('TAP version 13')
    print('1..%d' % len(targets))
    bdir = os.path.abspath(a.build)
    err = build(bdir)
    if err:
        for i, t in enumerate(targets, 1):
            print('not ok %d - fuzz-%s' % (i, t))
            print('\n'.join('# ' + l for l in err.splitlines()))
        return 1
    work = os.path.join(bdir, 'fuzz-work')
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    corpora = seeds(os.path.join(work, 'seeds'))
    arts = os.path.join(bdir, 'artifacts')
    os.makedirs(arts, exist_ok=True)
    failed = 0
    env = dict(os.environ, ASAN_OPTIONS='detect_leaks=1:allocator_may_return_null=1',
               UBSAN_OPTIONS='halt_on_error=1:print_stacktrace=1')
    for i, t in enumerate(targets, 1):
        exe = os.path.join(bdir, 'tests', 'fuzz', 'fuzz-' + t)
        corpus = os.path.join(work, 'corpus-' + t)
        shutil.copytree(corpora[t], corpus)
        common = ['-timeout=10', '-rss_limit_mb=2048', '-malloc_limit_mb=1024', '-max_len=262144',
                  '-artifact_prefix=' + arts + '/' + t + '-']
        bad = None
        regress = os.path.join(SRC, 'tests', 'fuzz', 'regress', t)
        replayed = 0
        if os.path.isdir(regress):
            files = sorted(os.path.join(regress, f) for f in os.listdir(regress))
            replayed = len(files)
            if files:
                r = sh([exe] + common + files, env=env, timeout=600)
                if r.returncode != 0:
                    bad = 'a regression input fails again:\n' + r.stderr[-4000:]
        runs = '?'
        if not bad:
            r = sh([exe] + common + ['-max_total_time=%d' % a.seconds, '-print_final_stats=1', corpus],
                   env=env, timeout=a.seconds + 600)
            for line in r.stderr.splitlines():
                if line.startswith('stat::number_of_executed_units:'):
                    runs = line.split(':')[-1].strip()
            if r.returncode != 0:
                bad = 'the fuzzer found a failure (input saved under %s):\n%s' % (arts, r.stderr[-6000:])
        if bad:
            failed += 1
            print('not ok %d - fuzz-%s' % (i, t))
            print('\n'.join('# ' + l for l in bad.splitlines()))
        else:
            print('ok %d - fuzz-%s (%s runs in %d s, %d regression inputs replayed)' % (i, t, runs, a.seconds,
                                                                                     replayed))
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
