#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk serve (NBD server) against real NBD clients and a hostile one.

Real clients from Debian packages: qemu-img info/convert/compare and
qemu-io over nbd+unix://, nbdinfo --map (libnbd-bin) against vdk map,
nbdcopy (multi-conn), fio's nbd engine with verification.  The core
read/write case runs once per I/O engine.  A hand-written client sends
malformed handshakes and requests, oversized lengths, offsets past the
end, unknown commands and flags, floods of requests without reading the
replies and disconnects in the middle of a write: each must get a
protocol error or a closed connection, the server must stay up, and the
image must pass qemu-img check afterwards with the expected content.
"""

import functools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vdktest import (VDK, Fail, MiB, KiB, Suite, expect, expect_eq, expect_rc, main, run)  # noqa: E402

NBDINFO = shutil.which('nbdinfo')
NBDCOPY = shutil.which('nbdcopy')
FIO = shutil.which('fio')

suite = Suite('serve')

# ---------------------------------------------------------------------------
# the server


LIVE = []  # servers started by the running case (killed if it fails)


def reaped(func):
    """The case, then any server it left running is killed (a failed case
    must not leave a server behind holding its image)."""
    @functools.wraps(func)
    def case(t, *a):
        try:
            return func(t, *a)
        finally:
            while LIVE:
                LIVE.pop().kill()
    return case


class Server:
    """`vdk serve` on a unix socket in the case's directory."""

    def __init__(self, t, image, *args, sock='nbd.sock', wait=True):
        LIVE.append(self)
        self.t = t
        self.sock = t.path(sock)
        self.uri = 'nbd+unix:///?socket=' + self.sock
        self.args = [VDK, 'serve', '-k', self.sock] + list(args) + [image]
        self.p = subprocess.Popen(self.args, cwd=t.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        if wait:
            self.wait_ready()

    def wait_ready(self):
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.p.poll() is not None:
                out, err = self.p.communicate()
                raise Fail('vdk serve exited with %s before listening\n%s' % (self.p.returncode, err))
            if time.monotonic() > deadline:
                self.kill()
                raise Fail('vdk serve did not create %s within 20 s' % self.sock)
            time.sleep(0.02)

    def alive(self):
        return self.p.poll() is None

    def expect_alive(self, what):
        if not self.alive():
            raise Fail('vdk serve died after %s (exit %s): %s' % (what, self.p.returncode, self.p.stderr.read()))

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Signal the server (if still running) and check it exits 0 silently."""
        if self.alive():
            self.p.send_signal(sig)
        return self.finish(timeout)

    def finish(self, timeout=30):
        """Wait for the server to exit by itself; it must exit 0, print
        nothing and remove its socket."""
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise Fail('vdk serve did not exit within %s s' % timeout)
        expect(self.p.returncode == 0 and out == '' and err == '',
               'vdk serve: exit %s, stdout %r, stderr %r' % (self.p.returncode, out, err))
        expect(not os.path.exists(self.sock), 'vdk serve left its socket %s behind' % self.sock)

    def kill(self):
        if self.alive():
            self.p.kill()
            self.p.communicate()


def check_clean(t, image, fmt='qcow2'):
    res = t.qemu_img('check', '-f', fmt, image)
    expect_rc(res, 0, 'qemu-img check ' + image)


def qemu_io_nbd(t, uri, *cmds, ro=False):
    args = ['-f', 'raw'] + (['-r'] if ro else [])
    for c in cmds:
        args += ['-c', c]
    res = t.run(['qemu-io'] + args + [uri])
    expect(res.rc == 0 and 'failed' not in res.out + res.err and 'error' not in res.err.lower(),
           'qemu-io over NBD failed', res)
    return res


# ---------------------------------------------------------------------------
# real clients

def t_info_exits_after_last_client(t):
    t.qemu_img('create', '-f', 'qcow2', 'a.qcow2', '64M')
    s = Server(t, 'a.qcow2')
    res = t.qemu_img('info', '--output=json', s.uri)
    expect_rc(res, 0, 'qemu-img info over NBD')
    expect_eq(json.loads(res.out)['virtual-size'], 64 * MiB, 'virtual size over NBD')
    s.finish()  # no --persistent: gone once the only client left
    check_clean(t, 'a.qcow2')


# (offset, length, pattern) writes, some unaligned, FUA, zeroes and discards
RW_SCRIPT = [
    'write -P 0x11 0 64k',
    'write -P 0x22 1M 1M',
    'write -f -P 0x33 3M 4k',           # FUA
    'write -P 0x44 5000 3000',          # unaligned
    'write -z 1536k 128k',              # write zeroes (may unmap)
    'discard 2M 64k',                   # never written
    'discard 1792k 64k',                # written: unspecified until ...
    'write -P 0x77 1792k 64k',          # ... written again
    'aio_write -P 0x55 8M 256k',
    'aio_write -P 0x66 9M 256k',
    'aio_flush',
    'flush',
]
RW_CHECK = [
    'read -P 0x11 0 4096',
    'read -P 0x44 5000 3000',
    'read -P 0x11 8000 57536',
    'read -P 0x22 1M 512k',
    'read -P 0 1536k 128k',
    'read -P 0x22 1664k 128k',
    'read -P 0x77 1792k 64k',
    'read -P 0x22 1856k 192k',
    'read -P 0 2M 64k',
    'read -P 0x33 3M 4k',
    'read -P 0x55 8M 256k',
    'read -P 0x66 9M 256k',
    'read -P 0 10M 1M',
]


def t_read_write(t):
    """qemu-io writes patterns (plain, FUA, unaligned, zeroes, discard,
    parallel aio) through vdk serve with this case's engine; reads back over
    NBD, then directly from the image, which qemu-img check finds clean and
    qemu-img compare finds equal to the same writes done on a raw file."""
    t.qemu_img('create', '-f', 'qcow2', 'a.qcow2', '16M')
    s = Server(t, 'a.qcow2', *t.eio(), '--persistent')
    qemu_io_nbd(t, s.uri, *RW_SCRIPT)
    qemu_io_nbd(t, s.uri, *RW_CHECK)
    # the server keeps the image locked while it runs (as qemu-nbd does)
    res = t.qemu_img('info', 'a.qcow2')
    expect(res.rc != 0, 'qemu-img opened the image vdk serve has open for writing', res)
    s.stop()
    check_clean(t, 'a.qcow2')
    t.qemu_io('a.qcow2', *RW_CHECK, fmt='qcow2')
    t.sparse('ref.raw', 16 * MiB)
    t.qemu_io('ref.raw', *[c for c in RW_SCRIPT if not c.startswith('discard')], fmt='raw')
    res = t.qemu_img('compare', '-f', 'qcow2', '-F', 'raw', 'a.qcow2', 'ref.raw')
    expect_rc(res, 0, 'qemu-img compare with the reference')


def make_sample(t, name='a.qcow2', size='64M'):
    """A qcow2 with data, zero clusters and unallocated ranges."""
    t.qemu_img('create', '-f', 'qcow2', name, size)
    t.qemu_io(name, 'write -P 0xa1 0 1M', 'write -P 0xb2 3M 192k', 'write -z 8M 1M',
              'write -P 0xc3 20M 64k', 'write -P 0 30M 64k', fmt='qcow2')
    return name


def t_convert_compare(t):
    make_sample(t)
    s = Server(t, 'a.qcow2', '-r', '--persistent', '-e', '4')
    res = t.qemu_img('convert', '-f', 'raw', '-O', 'qcow2', s.uri, 'copy.qcow2')
    expect_rc(res, 0, 'qemu-img convert from NBD')
    res = t.qemu_img('compare', '-f', 'raw', '-F', 'qcow2', s.uri, 'copy.qcow2')
    expect(res.rc == 0 and 'identical' in res.out, 'qemu-img compare NBD vs copy', res)
    # the copy is as sparse as the source (holes came over as holes)
    res = t.vdk('map', '--output=json', 'copy.qcow2')
    data = sum(e['length'] for e in json.loads(res.out) if e['data'])
    expect(data <= 2 * MiB, 'convert over NBD allocated %d bytes of data' % data)
    res = t.run([NBDCOPY, s.uri, t.path('copy.raw')])
    expect_rc(res, 0, 'nbdcopy from NBD')
    s.stop()
    res = t.qemu_img('compare', '-f', 'qcow2', '-F', 'raw', 'a.qcow2', 'copy.raw')
    expect(res.rc == 0 and 'identical' in res.out, 'qemu-img compare source vs nbdcopy', res)


def t_nbdcopy_multiconn_write(t):
    """nbdcopy writes into the export over several connections (multi-conn
    advertised with --shared > 1) and flushes; the image matches the source."""
    t.sparse('src.raw', 32 * MiB)
    t.qemu_io('src.raw', 'write -P 0x5a 0 5M', 'write -P 0x6b 12M 7M', 'write -P 0x7c 31M 1M', fmt='raw')
    t.qemu_img('create', '-f', 'qcow2', 'dst.qcow2', '32M')
    s = Server(t, 'dst.qcow2', '-e', '8', '--persistent')
    res = t.run([NBDINFO, '--can', 'multi-conn', s.uri])
    expect_rc(res, 0, 'nbdinfo --can multi-conn')
    res = t.run([NBDCOPY, '--connections=4', '--requests=16', t.path('src.raw'), s.uri])
    expect_rc(res, 0, 'nbdcopy into NBD')
    res = t.qemu_img('compare', '-f', 'raw', '-F', 'raw', 'src.raw', s.uri)
    expect(res.rc == 0 and 'identical' in res.out, 'compare over NBD', res)
    s.stop()
    check_clean(t, 'dst.qcow2')
    res = t.qemu_img('compare', '-f', 'raw', '-F', 'qcow2', 'src.raw', 'dst.qcow2')
    expect(res.rc == 0 and 'identical' in res.out, 'compare image after nbdcopy', res)


def merge(entries):
    out = []
    for start, length, typ in entries:
        if out and out[-1][2] == typ and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, typ)
        else:
            out.append((start, length, typ))
    return out


def nbdinfo_map(t, uri, context=None):
    args = [NBDINFO, '--map'] if context is None else [NBDINFO, '--map=' + context]
    res = t.run(args + ['--json', uri])
    expect_rc(res, 0, 'nbdinfo --map')
    return merge([(e['offset'], e['length'], e['type']) for e in json.loads(res.out)])


def t_nbdinfo_map(t):
    """nbdinfo --map (base:allocation) and --map=qemu:allocation-depth agree
    with vdk map, on a two-layer chain."""
    t.qemu_img('create', '-f', 'qcow2', 'base.qcow2', '64M')
    t.qemu_io('base.qcow2', 'write -P 0x10 0 4M', 'write -P 0x20 16M 1M', fmt='qcow2')
    t.qemu_img('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2')
    t.qemu_io('top.qcow2', 'write -P 0x30 1M 1M', 'write -z 3M 2M', 'write -P 0x40 40M 512k', fmt='qcow2')
    res = t.vdk('map', '--output=json', 'top.qcow2')
    expect_rc(res, 0, 'vdk map')
    vmap = json.loads(res.out)
    want_base = merge([(e['start'], e['length'], (0 if e['data'] else 1) | (2 if e['zero'] else 0)) for e in vmap])
    want_depth = merge([(e['start'], e['length'], e['depth'] + 1 if e['present'] else 0) for e in vmap])
    s = Server(t, 'top.qcow2', '-r', '--persistent')
    expect_eq(nbdinfo_map(t, s.uri), want_base, 'nbdinfo --map vs vdk map')
    expect_eq(nbdinfo_map(t, s.uri, 'qemu:allocation-depth'), want_depth,
              'nbdinfo --map=qemu:allocation-depth vs vdk map')
    # the depths are what the layers say: base data at 2, top data at 1
    expect((0, 1 * MiB, 2) in want_depth and (1 * MiB, 1 * MiB, 1) in want_depth,
           'unexpected depth map %r' % want_depth)
    res = t.run([NBDINFO, '--json', s.uri])
    expect_rc(res, 0, 'nbdinfo')
    info = json.loads(res.out)['exports'][0]
    expect_eq(sorted(info['contexts']), ['base:allocation', 'qemu:allocation-depth'], 'contexts')
    expect_eq(info['is_read_only'], True, 'is_read_only')
    expect_eq(info['export-size'], 64 * MiB, 'export-size')
    s.stop()


def t_fio(t):
    """fio's nbd engine: random writes at depth 16 with crc32c verification."""
    t.qemu_img('create', '-f', 'qcow2', 'a.qcow2', '32M')
    s = Server(t, 'a.qcow2', *t.eio(), '--persistent')
    res = t.run([FIO, '--name=verify', '--ioengine=nbd', '--uri=' + s.uri, '--rw=randwrite', '--bs=4k',
                 '--iodepth=16', '--size=32M', '--io_size=8M', '--verify=crc32c', '--do_verify=1',
                 '--verify_fatal=1', '--output-format=json'], timeout=300)
    expect(res.rc == 0, 'fio nbd engine failed', res)
    s.stop()
    check_clean(t, 'a.qcow2')


def t_read_only(t):
    """-r: the export says read-only; a writable client open is refused
    (as with qemu-nbd -r), reads work, and a write request sent anyway gets
    EPERM and changes nothing."""
    make_sample(t)
    s = Server(t, 'a.qcow2', '-r', '--persistent')
    qemu_io_nbd(t, s.uri, 'read -P 0xa1 0 1M', ro=True)
    res = t.run(['qemu-io', '-f', 'raw', '-c', 'write -P 1 0 4k', s.uri])
    expect(res.rc != 0 and 'Permission denied' in res.out + res.err,
           'a writable qemu-io open of a read-only export was not refused', res)
    c = Client(s.sock)
    c.handshake()
    expect(c.tflags & 2, 'NBD_FLAG_READ_ONLY not set on a -r export')
    for cmd in (CMD_WRITE, CMD_TRIM, CMD_WZ):
        data = b'\x01' * 4096 if cmd == CMD_WRITE else b''
        expect_eq(c.call(cmd, cookie=cmd, offset=0, length=4096, data=data)[:2], (cmd, EPERM),
                  'command %d on a read-only export' % cmd)
    c.close()
    s.stop()
    t.qemu_io('a.qcow2', 'read -P 0xa1 0 1M', fmt='qcow2')
    check_clean(t, 'a.qcow2')


def t_export_name(t):
    make_sample(t)
    s = Server(t, 'a.qcow2', '-x', 'disk0', '-D', 'the first disk', '--persistent')
    res = t.run([NBDINFO, '--list', '--json', s.uri])
    expect_rc(res, 0, 'nbdinfo --list')
    exports = json.loads(res.out)['exports']
    expect_eq([e['export-name'] for e in exports], ['disk0'], 'export list')
    res = t.qemu_img('info', 'nbd+unix:///nope?socket=' + s.sock)
    expect(res.rc != 0, 'qemu-img opened an export that does not exist', res)
    qemu_io_nbd(t, 'nbd+unix:///disk0?socket=' + s.sock, 'read -P 0xb2 3M 192k')
    s.expect_alive('a client asked for an unknown export')
    s.stop()


def free_port():
    with socket.socket() as so:
        so.bind(('127.0.0.1', 0))
        return so.getsockname()[1]


def t_tcp(t):
    make_sample(t)
    port = free_port()
    p = subprocess.Popen([VDK, 'serve', '-p', str(port), '-b', '127.0.0.1', '-r', 'a.qcow2'], cwd=t.dir,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hexport = ':%04X' % port
        deadline = time.monotonic() + 20
        while True:  # wait for the listening socket without connecting to it
            with open('/proc/net/tcp') as f:
                if any(l.split()[1].endswith(hexport) and l.split()[3] == '0A' for l in f.readlines()[1:]):
                    break
            expect(p.poll() is None and time.monotonic() < deadline, 'vdk serve -p did not listen')
            time.sleep(0.02)
        res = t.qemu_img('compare', '-U', '-f', 'raw', '-F', 'qcow2', 'nbd://127.0.0.1:%d/' % port, 'a.qcow2')
        expect(res.rc == 0 and 'identical' in res.out, 'compare over TCP', res)
        out, err = p.communicate(timeout=30)
        expect(p.returncode == 0 and err == '', 'vdk serve -p: exit %s, %r' % (p.returncode, err))
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def t_sigint_during_io(t):
    """SIGINT with a client connected and writes in flight: the server exits
    0, and every write it acknowledged is in the image, which is clean."""
    t.qemu_img('create', '-f', 'qcow2', 'a.qcow2', '64M')
    s = Server(t, 'a.qcow2', '--persistent')
    c = Client(s.sock)
    c.handshake()
    for i in range(64):
        c.send_request(CMD_WRITE, cookie=i, offset=i * 256 * KiB, length=64 * KiB, data=bytes([i + 1]) * (64 * KiB))
    acked = set()
    for _ in range(32):
        cookie, err, _ = c.read_reply()
        expect_eq(err, 0, 'write reply error')
        acked.add(cookie)
    s.stop(signal.SIGINT)
    c.close()
    check_clean(t, 'a.qcow2')
    t.qemu_io('a.qcow2', *['read -P %d %d 64k' % (i + 1, i * 256 * KiB) for i in sorted(acked)], fmt='qcow2')


# ---------------------------------------------------------------------------
# a hand-written client for hostile traffic

NBD_MAGIC = 0x4e42444d41474943
OPTS_MAGIC = 0x49484156454f5054
REP_MAGIC = 0x3e889045565a9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668e33ef

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_SR, OPT_LIST_META, OPT_SET_META = \
    1, 2, 3, 5, 6, 7, 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = 0x80000001, 0x80000003, 0x80000006, 0x80000009
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WZ, CMD_BS = range(8)
EPERM, EINVAL, ENOSPC = 1, 22, 28


class Closed(Exception):
    pass


class Client:
    def __init__(self, path, timeout=20):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.structured = False

    def close(self):
        self.s.close()

    def recv(self, n):
        buf = b''
        while len(buf) < n:
            try:
                d = self.s.recv(n - len(buf))
            except ConnectionResetError:
                d = b''
            if not d:
                raise Closed('connection closed after %d of %d bytes' % (len(buf), n))
            buf += d
        return buf

    def send(self, data):
        self.s.sendall(data)

    def greeting(self):
        magic, opts, hflags = struct.unpack('>QQH', self.recv(18))
        expect(magic == NBD_MAGIC and opts == OPTS_MAGIC, 'bad greeting')
        expect(hflags & 1, 'server is not fixed newstyle')
        return hflags

    def option(self, opt, data=b''):
        self.send(struct.pack('>QII', OPTS_MAGIC, opt, len(data)) + data)

    def option_replies(self, opt):
        """Replies up to the final one: [(type, data)]."""
        out = []
        while True:
            magic, ropt, rtype, rlen = struct.unpack('>QIII', self.recv(20))
            expect(magic == REP_MAGIC, 'bad option reply magic %#x' % magic)
            expect_eq(ropt, opt, 'option echoed in the reply')
            data = self.recv(rlen)
            out.append((rtype, data))
            if rtype not in (REP_SERVER, REP_INFO, REP_META):
                return out

    def handshake(self, structured=True, meta=(), name=b''):
        self.greeting()
        self.send(struct.pack('>I', 3))
        if structured:
            self.option(OPT_SR)
            expect_eq(self.option_replies(OPT_SR)[-1][0], REP_ACK, 'structured reply ack')
            self.structured = True
        if meta:
            q = b''.join(struct.pack('>I', len(m)) + m for m in meta)
            self.option(OPT_SET_META, struct.pack('>I', len(name)) + name + struct.pack('>I', len(meta)) + q)
            self.option_replies(OPT_SET_META)
        self.option(OPT_GO, struct.pack('>I', len(name)) + name + struct.pack('>H', 0))
        reps = self.option_replies(OPT_GO)
        expect_eq(reps[-1][0], REP_ACK, 'NBD_OPT_GO reply')
        for rtype, data in reps:
            if rtype == REP_INFO and struct.unpack('>H', data[:2])[0] == 0:
                self.size, self.tflags = struct.unpack('>QH', data[2:12])

    def send_request(self, cmd, cookie=1, offset=0, length=0, flags=0, data=b'', magic=REQ_MAGIC):
        self.send(struct.pack('>IHHQQI', magic, flags, cmd, cookie, offset, length) + data)

    def read_reply(self):
        """(cookie, error, [chunks]) of one reply; read data is collected
        into chunks as (type, payload)."""
        magic = struct.unpack('>I', self.recv(4))[0]
        if magic == SIMPLE_MAGIC:
            err, cookie = struct.unpack('>IQ', self.recv(12))
            return cookie, err, []
        expect(magic == STRUCT_MAGIC, 'bad reply magic %#x' % magic)
        chunks = []
        err = 0
        while True:
            flags, typ, cookie, length = struct.unpack('>HHQI', self.recv(16))
            payload = self.recv(length)
            if typ & 0x8000:
                err = struct.unpack('>I', payload[:4])[0]
            chunks.append((typ, payload))
            if flags & 1:
                return cookie, err, chunks
            magic = struct.unpack('>I', self.recv(4))[0]
            expect(magic == STRUCT_MAGIC, 'bad chunk magic %#x' % magic)

    def expect_closed(self, what):
        try:
            while True:
                self.recv(1 << 16)
        except Closed:
            return
        except socket.timeout:
            raise Fail('server did not close the connection after %s' % what)

    def call(self, cmd, **kw):
        self.send_request(cmd, **kw)
        return self.read_reply()


def hostile_setup(t):
    make_sample(t)
    return Server(t, 'a.qcow2', '--persistent', '-e', '0')


def hostile_finish(t, s):
    """The server is alive, still serves a real client correctly, shuts down
    cleanly, and the image is clean with its original content."""
    s.expect_alive('hostile traffic')
    qemu_io_nbd(t, s.uri, 'read -P 0xa1 0 1M', 'read -P 0xb2 3M 192k', 'read -P 0 8M 1M')
    s.stop()
    check_clean(t, 'a.qcow2')
    t.qemu_io('a.qcow2', 'read -P 0xa1 0 1M', 'read -P 0xc3 20M 64k', fmt='qcow2')


def t_hostile_handshake(t):
    s = hostile_setup(t)
    # connect and leave at once, or in the middle of the greeting
    Client(s.sock).close()
    c = Client(s.sock)
    c.recv(5)
    c.close()
    # unknown client flags: the spec says drop the connection
    c = Client(s.sock)
    c.greeting()
    c.send(struct.pack('>I', 0xfffffff0))
    c.expect_closed('unknown client flags')
    # a bad option magic
    c = Client(s.sock)
    c.greeting()
    c.send(struct.pack('>I', 1) + b'GARBAGE!' + b'\0' * 8)
    c.expect_closed('a bad option magic')
    # option length 4 GiB - 1: refused without buffering; the client leaves half way
    c = Client(s.sock)
    c.greeting()
    c.send(struct.pack('>I', 1) + struct.pack('>QII', OPTS_MAGIC, OPT_GO, 0xffffffff) + b'x' * 100000)
    c.close()
    # a 100000-byte option is read, dropped and refused; the session goes on
    c = Client(s.sock)
    c.greeting()
    c.send(struct.pack('>I', 1))
    c.option(OPT_INFO, b'\0' * 100000)
    expect_eq(c.option_replies(OPT_INFO)[-1][0], ERR_TOO_BIG, 'reply to an oversized option')
    # malformed INFO/GO: name length beyond the data, trailing bytes, bad counts
    for data in (struct.pack('>I', 1000) + b'ab\0\0', b'\0\0', struct.pack('>IH', 0, 5) + b'\0\0',
                 struct.pack('>IH', 0, 0) + b'extra'):
        c.option(OPT_INFO, data)
        expect_eq(c.option_replies(OPT_INFO)[-1][0], ERR_INVALID, 'reply to INFO data %r' % data)
    # an unknown export, unknown options, STARTTLS, metadata before structured replies
    c.option(OPT_GO, struct.pack('>I', 4) + b'nope' + struct.pack('>H', 0))
    expect_eq(c.option_replies(OPT_GO)[-1][0], ERR_UNKNOWN, 'GO to an unknown export')
    for opt in (0, 4, 11, 0x7fffffff, OPT_STARTTLS):
        c.option(opt, b'123')
        expect_eq(c.option_replies(opt)[-1][0], ERR_UNSUP, 'reply to option %d' % opt)
    c.option(OPT_SET_META, struct.pack('>II', 0, 0))
    expect_eq(c.option_replies(OPT_SET_META)[-1][0], ERR_INVALID, 'SET_META_CONTEXT before structured replies')
    c.option(OPT_LIST, b'x')
    expect_eq(c.option_replies(OPT_LIST)[-1][0], ERR_INVALID, 'LIST with data')
    c.option(OPT_LIST)
    reps = c.option_replies(OPT_LIST)
    expect_eq([r[0] for r in reps], [REP_SERVER, REP_ACK], 'LIST replies')
    c.option(OPT_SR)
    expect_eq(c.option_replies(OPT_SR)[-1][0], REP_ACK, 'structured replies')
    # meta context queries whose lengths overrun the option
    c.option(OPT_LIST_META, struct.pack('>II', 0, 3) + struct.pack('>I', 50) + b'base:')
    expect_eq(c.option_replies(OPT_LIST_META)[-1][0], ERR_INVALID, 'overrunning meta query')
    c.option(OPT_LIST_META, struct.pack('>II', 0, 0))
    reps = c.option_replies(OPT_LIST_META)
    expect_eq(sorted(r[1][4:] for r in reps if r[0] == REP_META), [b'base:allocation', b'qemu:allocation-depth'],
              'LIST_META_CONTEXT with no query')
    c.option(OPT_ABORT)
    expect_eq(c.option_replies(OPT_ABORT)[-1][0], REP_ACK, 'ABORT')
    c.expect_closed('NBD_OPT_ABORT')
    # EXPORT_NAME for an unknown export can only be answered by closing
    c = Client(s.sock)
    c.greeting()
    c.send(struct.pack('>I', 1))
    c.option(OPT_EXPORT_NAME, b'nope')
    c.expect_closed('EXPORT_NAME of an unknown export')
    # a simple-reply session through EXPORT_NAME (no structured replies)
    c = Client(s.sock)
    c.greeting()
    c.send(struct.pack('>I', 3))
    c.option(OPT_EXPORT_NAME, b'')
    size, flags = struct.unpack('>QH', c.recv(10))  # NO_ZEROES was negotiated
    expect_eq(size, 64 * MiB, 'export size')
    c.send_request(CMD_READ, cookie=7, offset=3 * MiB, length=4096)
    cookie, err, _ = c.read_reply()
    expect_eq((cookie, err), (7, 0), 'simple read reply')
    expect_eq(c.recv(4096), b'\xb2' * 4096, 'simple read data')
    c.send_request(CMD_READ, cookie=8, offset=64 * MiB, length=4096)
    expect_eq(c.read_reply()[:2], (8, EINVAL), 'simple read past the end')
    c.send_request(CMD_DISC)
    c.expect_closed('NBD_CMD_DISC')
    hostile_finish(t, s)


def t_hostile_requests(t):
    s = hostile_setup(t)
    c = Client(s.sock)
    c.handshake(meta=[b'base:allocation'])
    size = c.size
    cases = [
        ('read past the end', dict(cmd=CMD_READ, offset=size - 512, length=1024), EINVAL),
        ('read with offset overflow', dict(cmd=CMD_READ, offset=2**64 - 512, length=1024), EINVAL),
        ('read over 32 MiB', dict(cmd=CMD_READ, offset=0, length=33 * MiB), EINVAL),
        ('read of 4 GiB - 1', dict(cmd=CMD_READ, offset=0, length=0xffffffff), EINVAL),
        ('trim past the end', dict(cmd=CMD_TRIM, offset=size, length=4096), EINVAL),
        ('zeroes past the end', dict(cmd=CMD_WZ, offset=size - 4096, length=8192), ENOSPC),
        ('cache past the end', dict(cmd=CMD_CACHE, offset=size + 1, length=1), EINVAL),
        ('block status past the end', dict(cmd=CMD_BS, offset=size, length=1), EINVAL),
        ('unknown command', dict(cmd=99, offset=0, length=4096), EINVAL),
        ('unknown command 0xffff', dict(cmd=0xffff, offset=0, length=0), EINVAL),
        ('unknown flags', dict(cmd=CMD_READ, offset=0, length=4096, flags=0x8000), EINVAL),
        ('REQ_ONE on a read', dict(cmd=CMD_READ, offset=0, length=4096, flags=8), EINVAL),
        ('FAST_ZERO on a trim', dict(cmd=CMD_TRIM, offset=0, length=4096, flags=16), EINVAL),
    ]
    for i, (what, req, err) in enumerate(cases):
        cookie, got, chunks = c.call(cookie=1000 + i, **req)
        expect_eq((cookie, got), (1000 + i, err), what)
    # writes with bad ranges or sizes: the payload is read and dropped, the
    # stream stays in step (the next request is answered)
    for what, off, n, err in (('write past the end', size - 4096, 8192, ENOSPC),
                              ('write over 32 MiB', 0, 33 * MiB, EINVAL)):
        c.send_request(CMD_WRITE, cookie=77, offset=off, length=n, data=b'\xee' * n)
        expect_eq(c.read_reply()[:2], (77, err), what)
        cookie, err2, chunks = c.call(CMD_READ, cookie=78, offset=0, length=4096)
        expect_eq((cookie, err2), (78, 0), 'read after ' + what)
        expect_eq(chunks[0][1][8:], b'\xa1' * 4096, 'data after ' + what)
    # a zero-length write and read succeed and change nothing
    expect_eq(c.call(CMD_WRITE, cookie=5, offset=0, length=0)[:2], (5, 0), 'zero-length write')
    expect_eq(c.call(CMD_READ, cookie=6, offset=0, length=0)[:2], (6, 0), 'zero-length read')
    # block status: REQ_ONE gives one extent no longer than asked
    cookie, err, chunks = c.call(CMD_BS, cookie=9, offset=0, length=512 * KiB, flags=8)
    expect_eq(err, 0, 'block status error')
    expect_eq(len(chunks), 1, 'block status chunks')
    ext = chunks[0][1][4:]
    expect_eq(struct.unpack('>II', ext), (512 * KiB, 0), 'REQ_ONE extent')
    # a flood of 1 MiB reads sent without reading the replies: the server
    # stops reading at its bound instead of buffering without limit, then
    # answers all of them
    n = 300
    req = b''.join(struct.pack('>IHHQQI', REQ_MAGIC, 0, CMD_READ, 10000 + i, (i % 64) * MiB, MiB)
                   for i in range(n))
    c.s.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    while sent < len(req) and time.monotonic() < deadline:
        try:
            sent += c.s.send(req[sent:])
        except BlockingIOError:
            time.sleep(0.05)
    c.s.settimeout(60)
    if sent < len(req):
        c.send(req[sent:])
    seen = set()
    for _ in range(n):
        cookie, err, chunks = c.read_reply()
        expect_eq(err, 0, 'flooded read %d' % cookie)
        seen.add(cookie)
    expect_eq(len(seen), n, 'replies to the flood')
    s.expect_alive('a flood of requests')
    # a bad request magic cannot be resynchronised: the connection closes
    c.send_request(CMD_READ, magic=0x12345678, length=4096)
    c.expect_closed('a bad request magic')
    # block status without a negotiated context
    c = Client(s.sock)
    c.handshake()
    expect_eq(c.call(CMD_BS, cookie=3, offset=0, length=4096)[:2], (3, EINVAL), 'block status without context')
    c.close()
    hostile_finish(t, s)


def t_hostile_disconnects(t):
    s = hostile_setup(t)
    # disconnect in the middle of a write's payload: nothing of it lands
    c = Client(s.sock)
    c.handshake()
    c.send_request(CMD_WRITE, cookie=1, offset=0, length=MiB, data=b'\x99' * (MiB // 2))
    c.close()
    # disconnect in the middle of a request header
    c = Client(s.sock)
    c.handshake()
    c.send(struct.pack('>IHH', REQ_MAGIC, 0, CMD_READ))
    c.close()
    # disconnect with many reads in flight, never reading a reply
    c = Client(s.sock)
    c.handshake()
    c.send(b''.join(struct.pack('>IHHQQI', REQ_MAGIC, 0, CMD_READ, i, i * MiB, MiB) for i in range(32)))
    c.close()
    # disconnect with writes in flight (to a range we check afterwards)
    c = Client(s.sock)
    c.handshake()
    for i in range(16):
        c.send_request(CMD_WRITE, cookie=i, offset=40 * MiB + i * 64 * KiB, length=64 * KiB,
                       data=b'\x42' * (64 * KiB))
    c.close()
    # a client that half-closes after its requests still gets the replies
    c = Client(s.sock)
    c.handshake()
    c.send_request(CMD_READ, cookie=5, offset=20 * MiB, length=64 * KiB)
    c.s.shutdown(socket.SHUT_WR)
    cookie, err, chunks = c.read_reply()
    expect_eq((cookie, err, chunks[0][1][8:]), (5, 0, b'\xc3' * 64 * KiB), 'reply after half-close')
    c.expect_closed('EOF from the client')
    time.sleep(0.2)
    s.expect_alive('early disconnects')
    # the interrupted write left nothing; the in-flight ones are whole or absent
    qemu_io_nbd(t, s.uri, 'read -P 0xa1 0 1M')
    c = Client(s.sock)
    c.handshake()
    for i in range(16):
        cookie, err, chunks = c.call(CMD_READ, cookie=i, offset=40 * MiB + i * 64 * KiB, length=64 * KiB)
        expect_eq(err, 0, 'read back block %d' % i)
        blk = chunks[0][1][8:]
        expect(blk in (b'\x42' * 64 * KiB, b'\0' * 64 * KiB), 'torn 64k write at block %d' % i)
    c.close()
    hostile_finish(t, s)


def t_shared_limit(t):
    """--shared 1 (the default): a second client waits until the first leaves."""
    make_sample(t)
    s = Server(t, 'a.qcow2', '--persistent')
    a = Client(s.sock)
    a.handshake()
    b = Client(s.sock, timeout=1)
    try:
        b.recv(18)
        raise Fail('a second client was served with --shared 1')
    except socket.timeout:
        pass
    a.close()
    b.s.settimeout(20)
    b.handshake()
    expect_eq(b.call(CMD_READ, cookie=1, offset=0, length=4096)[:2], (1, 0), 'second client read')
    b.close()
    s.stop()


# ---------------------------------------------------------------------------
# soak: fio load plus clients that disconnect at random points

SOAK_SECONDS = int(os.environ.get('VDK_SOAK_SECONDS', '60'))


def proc_rss(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * KiB
    return 0


def proc_fds(pid):
    return len(os.listdir('/proc/%d/fd' % pid))


def t_soak(t):
    """VDK_SOAK_SECONDS (default 60; hours for a long run) of fio's nbd
    engine doing verified random writes and reads on one half of a qcow2
    while other clients hammer the other half and disconnect at random
    points (mid-header, mid-payload, with requests in flight, after a
    flush).  The server must stay up, its memory and file descriptors must
    not grow after the warm-up, every fio pass must verify, and the image
    must be clean afterwards."""
    import random
    rnd = random.Random(int(os.environ.get('VDK_SOAK_SEED', '1')))
    t.qemu_img('create', '-f', 'qcow2', '-o', 'cluster_size=64k', 'a.qcow2', '64M')
    s = Server(t, 'a.qcow2', '--persistent', '-e', '0')
    deadline = time.monotonic() + SOAK_SECONDS
    fio_args = [FIO, '--name=soak', '--ioengine=nbd', '--uri=' + s.uri, '--rw=randwrite', '--bs=4k',
                '--iodepth=16', '--offset=0', '--size=32M', '--io_size=16M', '--verify=crc32c',
                '--do_verify=1', '--verify_fatal=1', '--output-format=json']
    fio = subprocess.Popen(fio_args, cwd=t.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    passes = clients = 0
    samples = []
    warm = time.monotonic() + min(10, SOAK_SECONDS / 4)
    try:
        while time.monotonic() < deadline or fio.poll() is None:
            if fio.poll() is not None:
                out, err = fio.communicate()
                expect(fio.returncode == 0, 'fio pass %d failed: %s' % (passes + 1, err[-2000:]))
                passes += 1
                if time.monotonic() < deadline:
                    fio = subprocess.Popen(fio_args, cwd=t.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
                continue
            s.expect_alive('%d soak clients' % clients)
            c = Client(s.sock)
            clients += 1
            try:
                c.handshake(meta=[b'base:allocation'] if rnd.random() < 0.5 else ())
                for _ in range(rnd.randrange(1, 40)):
                    off = 32 * MiB + rnd.randrange(0, 32 * MiB - 64 * KiB, 512)
                    n = rnd.choice((512, 4096, 65536))
                    kind = rnd.random()
                    if kind < 0.4:
                        c.send_request(CMD_WRITE, cookie=1, offset=off, length=n, data=bytes([rnd.randrange(256)]) * n)
                    elif kind < 0.7:
                        c.send_request(CMD_READ, cookie=2, offset=off, length=n)
                    elif kind < 0.8:
                        c.send_request(CMD_TRIM, cookie=3, offset=off, length=n)
                    elif kind < 0.9:
                        c.send_request(CMD_WZ, cookie=4, offset=off, length=n)
                    else:
                        c.send_request(CMD_FLUSH, cookie=5)
                end = rnd.random()
                if end < 0.25:
                    c.send(struct.pack('>IHH', REQ_MAGIC, 0, CMD_WRITE))       # cut mid-header
                elif end < 0.5:
                    c.send(struct.pack('>IHHQQI', REQ_MAGIC, 0, CMD_WRITE, 9, 40 * MiB, 65536) + b'x' * 1000)
                elif end < 0.75:
                    c.read_reply()                                              # read a little, then leave
                else:
                    c.send_request(CMD_DISC)                                    # a polite goodbye
            except (Closed, OSError):
                pass
            finally:
                c.close()
            if time.monotonic() > warm:
                samples.append((proc_rss(s.p.pid), proc_fds(s.p.pid)))
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.communicate()
    expect(passes >= 1 and clients >= 10, 'soak ran %d fio passes, %d clients' % (passes, clients))
    time.sleep(0.5)  # let the last disconnects be noticed
    s.expect_alive('the soak')
    rss_end, fds_end = proc_rss(s.p.pid), proc_fds(s.p.pid)
    # the backlog of requests left by clients that leave is bounded, so
    # memory reaches a plateau during the warm-up; a leak keeps growing
    first = samples[:max(1, len(samples) // 4)]
    rss_warm = max(r for r, _ in first)
    expect(rss_end <= rss_warm + 16 * MiB and rss_end < 600 * MiB,
           'server memory grew from %d to %d KiB over %d clients' % (rss_warm // KiB, rss_end // KiB, clients))
    expect(fds_end <= min(f for _, f in samples), 'server holds %d fds after the soak' % fds_end)
    s.stop()
    check_clean(t, 'a.qcow2')
    print('# soak: %d s, %d fio passes, %d disconnecting clients, RSS %d -> %d KiB'
          % (SOAK_SECONDS, passes, clients, rss_warm // KiB, rss_end // KiB))


# ---------------------------------------------------------------------------

suite.add('info-exits-after-last-client', reaped(t_info_exits_after_last_client))
suite.add_io('read-write', reaped(t_read_write), caches=('none',))
suite.add_io('fio-verify', reaped(t_fio), engines=('io_uring',), caches=('none',))
suite.add('convert-compare-nbdcopy', reaped(t_convert_compare))
suite.add('nbdcopy-multi-conn-write', reaped(t_nbdcopy_multiconn_write))
suite.add('nbdinfo-map', reaped(t_nbdinfo_map))
suite.add('read-only', reaped(t_read_only))
suite.add('export-name', reaped(t_export_name))
suite.add('tcp', reaped(t_tcp))
suite.add('shared-limit', reaped(t_shared_limit))
suite.add('sigint-during-io', reaped(t_sigint_during_io))
suite.add('hostile-handshake', reaped(t_hostile_handshake))
suite.add('hostile-requests', reaped(t_hostile_requests))
suite.add('hostile-disconnects', reaped(t_hostile_disconnects))
suite.add('soak', reaped(t_soak))

if __name__ == '__main__':
    main(suite)
