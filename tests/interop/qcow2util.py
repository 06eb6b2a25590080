# SPDX-License-Identifier: MIT
"""qcow2 helpers for the interop tests (Python 3, stdlib only).

  - the configuration matrix shared by the qcow2 read and write tests,
  - qemu-io command lists (a mix of patterns, unaligned requests, zero
    writes, discards, compressed writes and data at the very end) with their
    model of the guest-visible content,
  - direct editing of qcow2 files (header fields, feature bits, the feature
    name table, refcount entries) to inject corruptions and unsupported
    features,
  - backing chains built by qemu (raw and qcow2 layers, relative names, in
    a subdirectory),
  - a per-suite cache of qemu-built images (cached()),
  - comparisons of vdk's and qemu-img's JSON/human output.

Everything here is independent of vdk: a vdk bug cannot change what a test
expects.
"""

import json
import os
import struct
import subprocess

from vdktest import KiB, MiB, Fail, expect, expect_eq, expect_rc, first_difference

QCOW2_MAGIC = b'QFI\xfb'

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4

EXT_END = 0
EXT_BACKING_FORMAT = 0xe2792aca
EXT_FEATURE_TABLE = 0x6803f857
EXT_DATA_FILE = 0x44415441

# ---------------------------------------------------------------------------
# the configuration matrix


class Config:
    """One qcow2 creation setup: name, -o options, virtual size."""

    def __init__(self, name, opts, size=32 * MiB):
        self.name = name
        self.opts = opts
        self.size = size
        kv = dict(o.split('=', 1) for o in opts.split(',') if o)
        cs = kv.get('cluster_size', '65536')
        self.cluster = parse_size(cs)
        self.v2 = kv.get('compat') in ('0.10', 'v2')
        self.extl2 = kv.get('extended_l2') == 'on'
        self.prealloc = kv.get('preallocation', 'off')

    def create_args(self):
        return (['-o', self.opts] if self.opts else []) + ['img.qcow2', str(self.size)]

    def __repr__(self):
        return 'Config(%s)' % self.name


def parse_size(s):
    mult = {'k': KiB, 'K': KiB, 'M': MiB, 'G': 1024 * MiB}
    if s and s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


CONFIGS = [
    Config('default', ''),
    Config('cluster512', 'cluster_size=512', 16 * MiB),
    Config('cluster4k', 'cluster_size=4096'),
    Config('cluster64k', 'cluster_size=65536'),
    Config('cluster2M', 'cluster_size=2097152', 64 * MiB),
    Config('compat0.10', 'compat=0.10'),
    Config('compat0.10-cluster4k', 'compat=0.10,cluster_size=4096'),
    Config('compat1.1', 'compat=1.1'),
    Config('refcount1', 'refcount_bits=1'),
    Config('refcount16', 'refcount_bits=16,cluster_size=4096'),
    Config('refcount64', 'refcount_bits=64'),
    Config('refcount64-cluster512', 'refcount_bits=64,cluster_size=512', 16 * MiB),
    Config('lazy-refcounts', 'lazy_refcounts=on'),
    Config('extl2-16k', 'extended_l2=on,cluster_size=16384'),
    Config('extl2-64k', 'extended_l2=on'),
    Config('extl2-2M', 'extended_l2=on,cluster_size=2097152', 64 * MiB),
    Config('zlib', 'compression_type=zlib'),
    Config('zstd', 'compression_type=zstd'),
    Config('zstd-extl2-lazy', 'compression_type=zstd,extended_l2=on,lazy_refcounts=on,cluster_size=32768'),
    Config('prealloc-off', 'preallocation=off'),
    Config('prealloc-metadata', 'preallocation=metadata'),
    Config('prealloc-falloc', 'preallocation=falloc', 16 * MiB),
    Config('prealloc-full', 'preallocation=full', 16 * MiB),
    Config('prealloc-metadata-extl2', 'preallocation=metadata,extended_l2=on,cluster_size=32768'),
    Config('prealloc-full-compat0.10-4k', 'preallocation=full,compat=0.10,cluster_size=4096', 16 * MiB),
    Config('prealloc-falloc-refcount1', 'preallocation=falloc,refcount_bits=1', 16 * MiB),
]

CONFIG_BY_NAME = {c.name: c for c in CONFIGS}

# the per-engine subset
ENGINE_CONFIGS = ['cluster4k', 'extl2-64k', 'zstd']


# ---------------------------------------------------------------------------
# command mixes


class Model:
    """The guest-visible content of an image, built from commands."""

    def __init__(self, size, base=None):
        self.data = bytearray(base) if base is not None else bytearray(size)
        self.size = size

    def write(self, off, length, pattern):
        self.data[off:off + length] = bytes([pattern]) * length

    def zero(self, off, length):
        self.data[off:off + length] = bytes(length)

    def bytes(self):
        return bytes(self.data)


def mix_commands(cfg, seed_pattern=0x10):
    """(commands, mirror_commands, checks, model) for a config: commands
    for the qcow2 image (qemu-io or vdk io), the same commands for a raw
    mirror (compressed writes become plain writes), read -P commands that
    verify the written ranges, and the model of the content.

    Discards are cluster-aligned, compressed writes cover whole clusters."""
    size, cs = cfg.size, cfg.cluster
    big = max(cs, 64 * KiB)
    m = Model(size)
    cmds, mirror, checks = [], [], []
    p = [seed_pattern]

    def pat():
        p[0] = (p[0] * 37 + 11) % 255 + 1      # never 0
        return p[0]

    def w(off, length, pattern=None):
        pattern = pat() if pattern is None else pattern
        c = 'write -P 0x%02x %d %d' % (pattern, off, length)
        cmds.append(c)
        mirror.append(c)
        m.write(off, length, pattern)

    def z(off, length, unmap=False):
        c = 'write -z %s%d %d' % ('-u ' if unmap else '', off, length)
        cmds.append(c)
        mirror.append(c)
        m.zero(off, length)

    def comp(off, length):
        if cfg.prealloc != 'off':
            # qemu compresses only into unallocated clusters
            w(off, length)
            return
        pattern = pat()
        cmds.append('write -c -P 0x%02x %d %d' % (pattern, off, length))
        mirror.append('write -P 0x%02x %d %d' % (pattern, off, length))
        m.write(off, length, pattern)

    def disc(off, length):
        c = 'discard %d %d' % (off, length)
        cmds.append(c)
        mirror.append(c)
        m.zero(off, length)

    # unaligned data
    w(1000, 3000)
    w(4095, 2)
    # a large region, then holes punched in it
    r0 = 2 * MiB if cs < 2 * MiB else 4 * MiB
    w(r0, 4 * big)
    disc(r0 + big, big)                           # aligned discard
    z(r0 + 2 * big, big)                          # zero write (cluster)
    z(r0 + 3 * big + 512, 1000)                   # partial zero write
    z(r0 + 3 * big + 4096, 4096, unmap=True)      # -z -u, partial cluster for >4k clusters
    # zero writes in unallocated space, and unmapping whole clusters
    z(r0 + 6 * big, big, unmap=True)
    w(r0 + 8 * big, 2 * big)
    z(r0 + 8 * big, big, unmap=True)
    # compressed whole clusters (qemu only compresses into unallocated clusters)
    c0 = size // 2
    comp(c0, cs)
    comp(c0 + cs, 2 * cs)
    w(c0 + 2 * cs + 10, 100)                      # partial overwrite of a compressed cluster
    # more unaligned data, crossing cluster and L2-table boundaries
    w(r0 + 12 * big + 7, 12345)
    w(size // 4 - 100, 200)
    # overwrite partially discarded / zeroed clusters again
    w(r0 + big - 300, 600)
    w(r0 + 2 * big + 3000, 5)
    # data at the end of the image
    w(size - 3000, 3000)
    w(size - 1, 1)
    # checks: every non-zero run and a few zero ones
    checks = read_checks(m)
    return cmds, mirror, checks, m


def read_checks(model, max_checks=400):
    """read -P commands covering the model: one per uniform run (capped)."""
    d = model.data
    out = []
    i, n = 0, len(d)
    step = 64 * KiB
    while i < n and len(out) < max_checks:
        b = d[i]
        j = i + 1
        # find the end of the run of byte b, quickly over whole blocks
        while j < n and d[j] == b:
            k = min(n, j + step)
            chunk = d[j:k]
            if chunk.count(b) == len(chunk):
                j = k
            else:
                j += next(x for x, c in enumerate(chunk) if c != b)
                break
        if b or j - i < 16 * MiB:
            out.append('read -P 0x%02x %d %d' % (b, i, j - i))
        i = j
    return out


def cached(t, key, names, build):
    """Build files once per suite run and copy them into the case directory.

    build(t) makes `names` in the case directory; the result is kept under
    the suite's temporary directory (holes preserved: cp --sparse=auto keeps
    the host file's layout, which qemu-img map looks at) and later cases with
    the same key get copies.  Returns build's result (it must be cheap to
    keep: a model, a size)."""
    cache = os.path.join(t.suite.tmp, 'cache', key)
    store = getattr(t.suite, '_qcow2_cache', None)
    if store is None:
        store = t.suite._qcow2_cache = {}
    if key in store:
        for n in names:
            dst = t.path(n)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            subprocess.run(['cp', '--sparse=auto', os.path.join(cache, n), dst], check=True)
        return store[key]
    result = build(t)
    for n in names:
        dst = os.path.join(cache, n)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        subprocess.run(['cp', '--sparse=auto', t.path(n), dst], check=True)
    store[key] = result
    return result


# ---------------------------------------------------------------------------
# backing chains (built by qemu in the subdirectory sub/, relative names)


def chain_raw_base(t):
    """sub/base.raw <- sub/mid.qcow2 (4k) <- sub/top.qcow2 (64k, extended L2),
    relative backing names; returns (virtual size, all qemu-io commands)."""
    os.makedirs(t.path('sub'))
    size = 24 * MiB
    t.sparse('sub/base.raw', size)
    base_cmds = ['write -P 0x11 0 %d' % (4 * MiB), 'write -P 0x12 %d 1000' % (6 * MiB + 100),
                 'write -P 0x13 %d 4096' % (size - 4096)]
    t.qemu_io('sub/base.raw', *base_cmds)
    sub = t.path('sub')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'base.raw', '-F', 'raw',
                         'mid.qcow2', cwd=sub), 0, 'qemu-img create mid')
    mid_cmds = ['write -P 0x21 %d 5000' % (MiB + 1000), 'write -z %d 8192' % (2 * MiB), 'discard %d 4096' % (3 * MiB),
                'write -P 0x22 %d 3' % (6 * MiB + 50), 'write -P 0x23 %d 64k' % (10 * MiB)]
    t.qemu_io('sub/mid.qcow2', *mid_cmds, fmt='qcow2')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', 'mid.qcow2', '-F', 'qcow2',
                         'top.qcow2', cwd=sub), 0, 'qemu-img create top')
    top_cmds = ['write -P 0x31 %d 2048' % (MiB + 2048), 'write -P 0x32 %d 100' % (4 * MiB - 50),
                'write -z %d 4096' % (10 * MiB + 8192), 'write -z -u %d 64k' % (12 * MiB),
                'write -c -P 0x33 %d 64k' % (16 * MiB), 'write -P 0x34 %d 10' % (size - 10)]
    t.qemu_io('sub/top.qcow2', *top_cmds, fmt='qcow2')
    return size, base_cmds + mid_cmds + top_cmds


def chain_qcow2(t):
    """sub/base.qcow2 (64k, compat 0.10, 16 MiB) <- sub/mid.qcow2 (512, 24 MiB)
    <- sub/top.qcow2 (2M, 24 MiB): a backing file shorter than its overlay;
    returns (virtual size, all qemu-io commands)."""
    os.makedirs(t.path('sub'))
    sub = t.path('sub')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'base.qcow2', '16M', cwd=sub), 0)
    base_cmds = ['write -P 0x41 0 3M', 'write -P 0x42 %d 777' % (5 * MiB + 3),
                 'write -P 0x43 %d 64k' % (16 * MiB - 65536), 'write -c -P 0x44 %d 64k' % (8 * MiB)]
    t.qemu_io('sub/base.qcow2', *base_cmds, fmt='qcow2')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', '-b', 'base.qcow2', '-F', 'qcow2',
                         'mid.qcow2', '24M', cwd=sub), 0)
    mid_cmds = ['write -P 0x51 %d 1000' % (MiB - 500), 'write -z %d 1M' % (2 * MiB),
                'write -P 0x52 %d 4096' % (17 * MiB), 'write -P 0x53 %d 3' % (8 * MiB + 511)]
    t.qemu_io('sub/mid.qcow2', *mid_cmds, fmt='qcow2')
    expect_rc(t.qemu_img('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', '-b', 'mid.qcow2', '-F', 'qcow2',
                         'top.qcow2', '24M', cwd=sub), 0)
    top_cmds = ['write -P 0x61 %d 4096' % (4 * MiB + 8192), 'write -P 0x62 %d 100' % (20 * MiB),
                'write -z %d 2M' % (6 * MiB), 'write -P 0x63 %d 1' % (24 * MiB - 1)]
    t.qemu_io('sub/top.qcow2', *top_cmds, fmt='qcow2')
    return 24 * MiB, base_cmds + mid_cmds + top_cmds


CHAINS = [('raw-qcow2-4k-qcow2-64k-extl2', chain_raw_base), ('qcow2-64k-v2-512-2M', chain_qcow2)]


# ---------------------------------------------------------------------------
# qcow2 file editing


class Header:
    """The qcow2 header fields (v2 and v3) and its extensions."""

    FIELDS_V2 = '>4sIQIIQIIQQIIQ'

    def __init__(self, raw):
        (self.magic, self.version, self.backing_offset, self.backing_size, self.cluster_bits, self.size,
         self.crypt_method, self.l1_size, self.l1_offset, self.refcount_table_offset,
         self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset) = \
            struct.unpack_from(self.FIELDS_V2, raw, 0)
        if self.magic != QCOW2_MAGIC:
            raise Fail('not a qcow2 file')
        if self.version >= 3:
            (self.incompat, self.compat, self.autoclear, self.refcount_order,
             self.header_length) = struct.unpack_from('>QQQII', raw, 72)
        else:
            self.incompat = self.compat = self.autoclear = 0
            self.refcount_order = 4
            self.header_length = 72
        self.extensions = []
        off = self.header_length
        while off + 8 <= len(raw):
            typ, length = struct.unpack_from('>II', raw, off)
            if typ == EXT_END:
                break
            self.extensions.append((typ, raw[off + 8:off + 8 + length]))
            off += 8 + ((length + 7) & ~7)
        self.ext_end = off + 8

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self):
        return 1 << self.refcount_order


def read_header(path):
    with open(path, 'rb') as f:
        raw = f.read(64 * KiB)
    return Header(raw)


def _pwrite(path, off, data):
    with open(path, 'r+b') as f:
        f.seek(off)
        f.write(data)


def _pread(path, off, length):
    with open(path, 'rb') as f:
        f.seek(off)
        return f.read(length)


def set_incompat(path, bits, clear=0):
    h = read_header(path)
    expect(h.version >= 3, 'set_incompat needs a v3 image')
    _pwrite(path, 72, struct.pack('>Q', (h.incompat | bits) & ~clear))


def set_crypt_method(path, method):
    _pwrite(path, 32, struct.pack('>I', method))


def write_extensions(path, extensions):
    """Rewrite the header extension area (v3), which must still fit in
    front of the backing file name (or in cluster 0)."""
    h = read_header(path)
    out = b''
    for typ, data in extensions:
        out += struct.pack('>II', typ, len(data)) + data + bytes(-len(data) % 8)
    out += bytes(8)
    limit = h.backing_offset if h.backing_offset else h.cluster_size
    expect(h.header_length + len(out) <= limit, 'header extensions do not fit')
    _pwrite(path, h.header_length, out)


def add_feature_name(path, ftype, bit, name):
    """Add (ftype, bit, name) to the feature name table (creating it)."""
    h = read_header(path)
    exts = list(h.extensions)
    entry = struct.pack('>BB46s', ftype, bit, name.encode())
    for i, (typ, data) in enumerate(exts):
        if typ == EXT_FEATURE_TABLE:
            exts[i] = (typ, data + entry)
            break
    else:
        exts.insert(0, (EXT_FEATURE_TABLE, entry))
    write_extensions(path, exts)


def feature_names(path):
    h = read_header(path)
    names = {}
    for typ, data in h.extensions:
        if typ == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                ftype, bit, name = struct.unpack_from('>BB46s', data, i)
                names[(ftype, bit)] = name.rstrip(b'\0').decode()
    return names


def _refcount_location(path, host_offset):
    """(file offset of the refcount entry's containing unit, bit shift,
    unit size in bytes, refcount_bits) for the cluster at host_offset."""
    h = read_header(path)
    cs = h.cluster_size
    bits = h.refcount_bits
    cluster = host_offset // cs
    per_block = cs * 8 // bits
    rt_index, block_index = divmod(cluster, per_block)
    expect(rt_index < h.refcount_table_clusters * cs // 8, 'cluster beyond the refcount table')
    (rb_offset,) = struct.unpack('>Q', _pread(path, h.refcount_table_offset + 8 * rt_index, 8))
    rb_offset &= ~0x1ff
    expect(rb_offset != 0, 'no refcount block for host offset %d' % host_offset)
    bit_pos = block_index * bits
    if bits >= 8:
        return rb_offset + bit_pos // 8, 0, bits // 8, bits
    # sub-byte refcounts: bit order within a byte is LSB first
    return rb_offset + bit_pos // 8, bit_pos % 8, 1, bits


def get_refcount(path, host_offset):
    off, shift, unit, bits = _refcount_location(path, host_offset)
    v = int.from_bytes(_pread(path, off, unit), 'big')
    return (v >> shift) & ((1 << bits) - 1)


def set_refcount(path, host_offset, value):
    off, shift, unit, bits = _refcount_location(path, host_offset)
    v = int.from_bytes(_pread(path, off, unit), 'big')
    mask = ((1 << bits) - 1) << shift
    v = (v & ~mask) | ((value << shift) & mask)
    _pwrite(path, off, v.to_bytes(unit, 'big'))


# ---------------------------------------------------------------------------
# comparing with qemu-img


def parse_json(res, what):
    try:
        return json.loads(res.out)
    except ValueError as e:
        raise Fail('%s: output is not JSON (%s)\n%s' % (what, e, res.describe()))


def json_of(t, tool, *args, what=None, rc=0):
    res = (t.vdk if tool == 'vdk' else t.qemu_img)(*args)
    expect_rc(res, rc, what or '%s %s' % (tool, ' '.join(args)))
    return parse_json(res, what or tool), res


def compare_json(t, args, what, rc=0, fixup=None):
    """vdk ARGS and qemu-img ARGS give the same parsed JSON."""
    q, _ = json_of(t, 'qemu-img', *args, rc=rc, what='qemu-img ' + what)
    v, rv = json_of(t, 'vdk', *args, rc=rc, what='vdk ' + what)
    if fixup:
        q, v = fixup(q), fixup(v)
    if v != q:
        _json_diff(v, q, what, rv)
    return v


def _json_diff(v, q, what, res):
    vs = json.dumps(v, indent=2, sort_keys=True)
    qs = json.dumps(q, indent=2, sort_keys=True)
    expect_eq(vs, qs, '%s (vdk vs qemu-img, parsed JSON)' % what, res)


def drop_actual_size(obj):
    """info JSON without the host allocation sizes (they depend on how each
    tool wrote the file)."""
    if isinstance(obj, list):
        return [drop_actual_size(o) for o in obj]
    obj = dict(obj)
    obj.pop('actual-size', None)
    if 'backing-image' in obj:
        obj['backing-image'] = drop_actual_size(obj['backing-image'])
    return obj


def compare_text(t, args, what, rc=None):
    """vdk ARGS and qemu-img ARGS: same exit code and stdout."""
    rq = t.qemu_img(*args)
    rv = t.vdk(*args)
    if rc is not None:
        expect_rc(rq, rc, 'qemu-img %s (test premise)' % what)
    expect_eq(rv.rc, rq.rc, '%s exit code (vdk vs qemu-img)' % what, rv)
    expect_eq(rv.out, rq.out, '%s stdout (vdk vs qemu-img)' % what, rv)
    expect_eq(bool(rv.err), bool(rq.err), '%s: stderr empty (vdk vs qemu-img %r)' % (what, rq.err), rv)
    return rv, rq


def expect_bytes(actual, expected, what):
    if actual == expected:
        return
    d = first_difference(actual, expected)
    raise Fail('%s: content differs at offset %s (sizes %d/%d): actual %r, expected %r'
               % (what, d, len(actual), len(expected), actual[d:d + 8], expected[d:d + 8]))


def qemu_to_raw(t, img, out, fmt='qcow2'):
    res = t.qemu_img('convert', '-f', fmt, '-O', 'raw', img, out)
    expect_rc(res, 0, 'qemu-img convert -O raw')
    return t.content(out)


def qemu_check_clean(t, img, what='qemu-img check'):
    res = t.qemu_img('check', img)
    expect(res.rc == 0 and 'No errors were found on the image.' in res.out and 'leaked' not in res.out,
           '%s: image not clean' % what, res)
    return res


def qemu_compare_identical(t, a, b, fa='qcow2', fb='raw'):
    res = t.qemu_img('compare', '-f', fa, '-F', fb, a, b)
    expect(res.rc == 0 and 'Images are identical.' in res.out,
           'qemu-img compare: %s and %s differ' % (a, b), res)


def no_failure(res, what):
    expect(res.rc == 0 and 'Pattern verification failed' not in res.out + res.err
           and 'failed' not in res.out + res.err, '%s failed' % what, res)


def expect_single_error(res, *needles):
    """exit 1, exactly one stderr line 'vdk: ...' containing every needle
    (case-insensitive), nothing on stdout."""
    expect_rc(res, 1)
    lines = res.err.splitlines()
    expect(len(lines) == 1 and lines[0].startswith('vdk: '),
           'expected exactly one stderr line starting with "vdk: "', res)
    for n in needles:
        expect(n.lower() in lines[0].lower(), 'error message does not mention %r' % n, res)
