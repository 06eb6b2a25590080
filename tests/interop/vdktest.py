# SPDX-License-Identifier: MIT
"""Shared helpers for vdk's interop tests (Python 3, stdlib only).

Every test script builds a Suite, registers test cases on it and calls
suite.main().  The suite prints TAP ("1..N", "ok N - name", "not ok N - name",
"ok N - name # SKIP reason"), runs every case in its own directory under a
temporary directory ($TMPDIR or /var/tmp) that is deleted at the end (set
VDK_KEEP_TMP=1 to keep it), and skips everything when qemu-img or qemu-io is
missing.

A test case is a function taking a Case; it fails by raising Fail (use the
expect*() helpers) or any other exception, and skips by raising Skip.
Cases registered with add_io() run once per I/O engine and cache mode and
are named ENGINE/CACHE/NAME.

Environment:
  VDK            path of the vdk CLI (default: ../../build/tools/vdk)
  QEMU_IMG       path of qemu-img (default: from $PATH)
  QEMU_IO        path of qemu-io (default: from $PATH)
  VDK_KEEP_TMP   keep the temporary directory
  VDK_TEST_FILTER  only run cases whose name contains this string
"""

import difflib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ENGINES = ('io_uring', 'native', 'threads')
CACHES = ('none', 'writeback')

KiB = 1024
MiB = 1024 * 1024


def _default_vdk():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, '..', '..', 'build', 'tools', 'vdk'))


VDK = os.path.abspath(os.environ.get('VDK') or _default_vdk())
QEMU_IMG = os.environ.get('QEMU_IMG') or shutil.which('qemu-img')
QEMU_IO = os.environ.get('QEMU_IO') or shutil.which('qemu-io')


class Fail(Exception):
    """A test assertion failed."""


class Skip(Exception):
    """The test cannot run here."""


class Result:
    """The outcome of one command: args, rc, out (stdout), err (stderr)."""

    def __init__(self, args, rc, out, err, elapsed):
        self.args = args
        self.rc = rc
        self.out = out
        self.err = err
        self.elapsed = elapsed

    def describe(self):
        lines = ['command: ' + ' '.join(_quote(a) for a in self.args),
                 'exit code: %s' % self.rc]
        for label, text in (('stdout', self.out), ('stderr', self.err)):
            if text:
                lines.append('%s:' % label)
                lines.extend('  ' + l for l in _clip(text).splitlines())
            else:
                lines.append('%s: (empty)' % label)
        return '\n'.join(lines)

    def __repr__(self):
        return '<Result rc=%s %r>' % (self.rc, self.args)


def _quote(a):
    if a and re.fullmatch(r'[A-Za-z0-9_./=:+,@%-]+', a):
        return a
    return "'" + a.replace("'", "'\\''") + "'"


def _clip(text, limit=4000):
    if len(text) > limit:
        return text[:limit] + '\n... (%d more characters)' % (len(text) - limit)
    return text


def run(args, cwd=None, input=None, timeout=120):
    """Run a command, capture stdout/stderr (text) and the exit code."""
    args = [str(a) for a in args]
    env = dict(os.environ)
    env['LC_ALL'] = 'C'
    env['LANG'] = 'C'
    if os.path.basename(args[0]) == 'strace':
        # LeakSanitizer stops the world with ptrace, which a traced process
        # cannot (sanitizer builds only; the leak check runs everywhere else)
        env['ASAN_OPTIONS'] = env.get('ASAN_OPTIONS', '') + ':detect_leaks=0'
    t0 = time.monotonic()
    try:
        p = subprocess.run(args, cwd=cwd, input=input, capture_output=True,
                           text=True, errors='replace', env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise Fail('command timed out after %ss: %s' % (timeout, ' '.join(args))) from e
    return Result(args, p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


# ---------------------------------------------------------------------------
# assertions

def expect(cond, msg, res=None):
    if not cond:
        if res is not None:
            msg = msg + '\n' + res.describe()
        raise Fail(msg)


def expect_eq(actual, expected, what, res=None):
    if actual == expected:
        return
    msg = '%s differs\n' % what
    if isinstance(actual, str) and isinstance(expected, str) and ('\n' in actual or '\n' in expected):
        diff = difflib.unified_diff(expected.splitlines(), actual.splitlines(),
                                    'expected', 'actual', lineterm='')
        msg += '\n'.join(diff)
    else:
        msg += '  expected: %s\n  actual:   %s' % (_clip(repr(expected), 2000), _clip(repr(actual), 2000))
    if res is not None:
        msg += '\n' + res.describe()
    raise Fail(msg)


def expect_rc(res, rc, what=None):
    if res.rc != rc:
        raise Fail('%sexpected exit code %s, got %s\n%s'
                   % ((what + ': ') if what else '', rc, res.rc, res.describe()))


def expect_one_error_line(res, prefix='vdk: '):
    """stderr is exactly one line starting with prefix."""
    lines = res.err.splitlines()
    expect(len(lines) == 1 and lines[0].startswith(prefix),
           'expected exactly one stderr line starting with %r' % prefix, res)


# ---------------------------------------------------------------------------
# text helpers

_TIMING = re.compile(r', \d+ ops; [0-9:.]+ sec \(.*ops/sec\)$')


def strip_timing(text):
    """Drop qemu-io's timing lines ("2.930 KiB, 1 ops; 00.00 sec (...)")."""
    return '\n'.join(l for l in text.splitlines() if not _TIMING.search(l))


def file_blocks_bytes(path):
    """Bytes the file occupies on disk (st_blocks * 512)."""
    return os.stat(path).st_blocks * 512


def read_file(path):
    with open(path, 'rb') as f:
        return f.read()


def first_difference(a, b):
    """Offset of the first differing byte of two byte strings, or None."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return None if len(a) == len(b) else n
    lo, hi = 0, n
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return lo


def is_zero(data):
    return not data.strip(b'\0')


def zero_ranges(map_list):
    """[(start, end)] of the entries of a qemu-img map --output=json list
    that read as zero and hold no data."""
    return [(e['start'], e['start'] + e['length']) for e in map_list
            if e.get('zero') and not e.get('data')]


def ranges_cover(outer, inner):
    """True if every range of inner is covered by the union of outer."""
    outer = sorted(outer)
    for s, e in inner:
        pos = s
        for os_, oe in outer:
            if os_ <= pos < oe:
                pos = oe
                if pos >= e:
                    break
        if pos < e:
            return False
    return True


# ---------------------------------------------------------------------------
# test cases

class Case:
    """One running test case: its own directory plus command helpers.
    Files are named relative to the case's directory and every command
    runs there, so file names in tool output are deterministic."""

    def __init__(self, suite, name, directory, engine=None, cache=None):
        self.suite = suite
        self.name = name
        self.dir = directory
        self.engine = engine
        self.cache = cache

    def log(self, msg):
        """A TAP diagnostic line (counts, measurements)."""
        print('# ' + msg, flush=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    # -- commands
    def run(self, args, **kw):
        kw.setdefault('cwd', self.dir)
        return run(args, **kw)

    def vdk(self, *args, **kw):
        return self.run([VDK] + list(args), **kw)

    def qemu_img(self, *args, **kw):
        return self.run([QEMU_IMG] + list(args), **kw)

    def qemu_io_raw(self, filename, cmds, fmt='raw', extra=(), **kw):
        args = [QEMU_IO]
        if fmt:
            args += ['-f', fmt]
        args += list(extra)
        for c in cmds:
            args += ['-c', c]
        args.append(filename)
        return self.run(args, **kw)

    def qemu_io(self, filename, *cmds, fmt='raw'):
        """Run qemu-io commands that must all succeed."""
        res = self.qemu_io_raw(filename, cmds, fmt=fmt)
        expect(res.rc == 0 and 'failed' not in res.out + res.err,
               'qemu-io failed', res)
        return res

    def vdk_io_raw(self, filename, cmds, fmt='raw', engine=True, extra=(), **kw):
        args = [VDK, 'io']
        if fmt:
            args += ['-f', fmt]
        if engine:
            args += self.eio()
        args += list(extra)
        for c in cmds:
            args += ['-c', c]
        args.append(filename)
        return self.run(args, **kw)

    def vdk_io(self, filename, *cmds, fmt='raw'):
        """Run vdk io commands (with this case's engine and cache) that must all succeed."""
        res = self.vdk_io_raw(filename, cmds, fmt=fmt)
        expect(res.rc == 0 and 'failed' not in res.out + res.err, 'vdk io failed', res)
        return res

    def eio(self):
        """--aio/-t options for this case's engine and cache mode."""
        args = []
        if self.engine:
            args.append('--aio=' + self.engine)
        if self.cache:
            args += ['-t', self.cache]
        return args

    # -- files
    def sparse(self, name, size):
        """A sparse file of `size` bytes (no blocks allocated)."""
        p = self.path(name)
        with open(p, 'wb') as f:
            f.truncate(size)
        return name

    def write_bytes(self, name, data):
        with open(self.path(name), 'wb') as f:
            f.write(data)
        return name

    def size(self, name):
        return os.stat(self.path(name)).st_size

    def blocks_bytes(self, name):
        return file_blocks_bytes(self.path(name))

    def content(self, name):
        return read_file(self.path(name))

    def qemu_map(self, name, *extra):
        res = self.qemu_img('map', '--output=json', '-f', 'raw', *extra, name)
        expect_rc(res, 0, 'qemu-img map')
        return json.loads(res.out)

    def vdk_map(self, name, *extra):
        res = self.vdk('map', '--output=json', '-f', 'raw', *extra, name)
        expect_rc(res, 0, 'vdk map')
        try:
            return json.loads(res.out)
        except ValueError as e:
            raise Fail('vdk map output is not JSON: %s\n%s' % (e, res.describe()))

    def qemu_compare(self, a, b):
        """qemu-img compare -f raw -F raw must say the images are identical."""
        res = self.qemu_img('compare', '-f', 'raw', '-F', 'raw', a, b)
        expect(res.rc == 0 and 'Images are identical.' in res.out,
               'qemu-img compare: %s and %s differ' % (a, b), res)


def _io_uring_refused():
    """A reason why this kernel refuses io_uring_setup(), or None."""
    try:
        with open('/proc/sys/kernel/io_uring_disabled') as f:
            if f.read().strip() == '2':
                return 'io_uring disabled by kernel.io_uring_disabled=2'
    except OSError:
        pass
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        fd = libc.syscall(425, 1, params)          # __NR_io_uring_setup (x86_64, arm64, ...)
    except Exception:
        return None
    if fd >= 0:
        os.close(fd)
        return None
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM, errno.EACCES):
        return 'io_uring_setup() refused here: %s' % os.strerror(err)
    return None


def _odirect_refused(directory):
    """A reason why files in directory cannot be opened with O_DIRECT, or None."""
    p = os.path.join(directory, '.odirect-probe')
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | getattr(os, 'O_DIRECT', 0), 0o600)
    except OSError as e:
        return 'O_DIRECT not supported under %s: %s' % (directory, e.strerror)
    os.close(fd)
    os.unlink(p)
    return None


class Suite:
    def __init__(self, name):
        self.name = name
        self.cases = []
        self.tmp = None
        self._engines = None
        self._engine_ok = {}

    def add(self, name, func, *args, cache=None):
        """Register a case; `cache` only makes it skip where that cache
        mode cannot work (O_DIRECT)."""
        self.cases.append((name, func, args, None, cache))

    def add_io(self, name, func, *args, engines=ENGINES, caches=CACHES):
        for e in engines:
            for c in caches:
                self.cases.append(('%s/%s/%s' % (e, c, name), func, args, e, c))

    # -- environment
    def compiled_engines(self):
        if self._engines is None:
            res = run([VDK, '--help'])
            m = re.search(r'^I/O engines \(--aio\):(.*)$', res.out, re.M)
            self._engines = m.group(1).split() if m else list(ENGINES)
        return self._engines

    def check_engine(self, engine, cache):
        """Skip when the engine is not compiled into vdk or the kernel
        refuses it, or the file system under the temp dir does not take
        O_DIRECT.  These are decided without vdk, so a vdk bug cannot turn
        into a skip."""
        if engine is not None and engine not in self.compiled_engines():
            raise Skip('engine %s not compiled into vdk' % engine)
        if engine == 'io_uring':
            if 'io_uring' not in self._engine_ok:
                self._engine_ok['io_uring'] = _io_uring_refused()
            if self._engine_ok['io_uring']:
                raise Skip(self._engine_ok['io_uring'])
        if cache in ('none', 'directsync'):
            if 'odirect' not in self._engine_ok:
                self._engine_ok['odirect'] = _odirect_refused(self.tmp)
            if self._engine_ok['odirect']:
                raise Skip(self._engine_ok['odirect'])

    # -- running
    def _emit(self, line):
        sys.stdout.write(line + '\n')
        sys.stdout.flush()

    def _diag(self, text):
        for l in text.splitlines():
            self._emit('# ' + l)

    def main(self):
        for n, p in (('qemu-img', QEMU_IMG), ('qemu-io', QEMU_IO)):
            if not p or not os.access(p, os.X_OK):
                self._emit('1..0 # SKIP %s not found' % n)
                return 0
        if not os.access(VDK, os.X_OK):
            self._emit('Bail out! vdk CLI not found at %s (set VDK)' % VDK)
            return 1
        flt = os.environ.get('VDK_TEST_FILTER')
        cases = [c for c in self.cases if not flt or flt in c[0]]
        base = os.environ.get('TMPDIR') or '/var/tmp'
        self.tmp = tempfile.mkdtemp(prefix='vdk-interop-%s-' % self.name, dir=base)
        self._emit('1..%d' % len(cases))
        failed = 0
        t_start = time.monotonic()
        try:
            for i, (name, func, args, engine, cache) in enumerate(cases, 1):
                d = os.path.join(self.tmp, '%03d' % i)
                os.makedirs(d)
                case = Case(self, name, d, engine, cache)
                t0 = time.monotonic()
                try:
                    self.check_engine(engine, cache)
                    func(case, *args)
                except Skip as e:
                    self._emit('ok %d - %s # SKIP %s' % (i, name, e))
                    continue
                except Fail as e:
                    failed += 1
                    self._emit('not ok %d - %s' % (i, name))
                    self._diag(str(e))
                    continue
                except Exception:
                    failed += 1
                    self._emit('not ok %d - %s' % (i, name))
                    self._diag(traceback.format_exc())
                    continue
                finally:
                    if not os.environ.get('VDK_KEEP_TMP'):
                        shutil.rmtree(d, ignore_errors=True)
                self._emit('ok %d - %s' % (i, name))
                dt = time.monotonic() - t0
                if dt > 10:
                    self._diag('(%s took %.1fs)' % (name, dt))
        finally:
            if os.environ.get('VDK_KEEP_TMP'):
                self._diag('temporary files kept in %s' % self.tmp)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        self._diag('%s: %d of %d failed, %.1fs' % (self.name, failed, len(cases), time.monotonic() - t_start))
        # The TAP lines carry the verdict; a non-zero exit would make meson
        # report an ERROR instead of the failing cases.
        return 0


def main(suite):
    sys.exit(suite.main())
