#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdk's command line: --help, unknown commands and options, and qemu's
probing rule for raw images (no writes that make sector 0 look like
another format unless -f raw was given)."""

from vdktest import MiB, Suite, expect, expect_eq, expect_one_error_line, expect_rc, main

suite = Suite('cli')
COMMANDS = ('create', 'info', 'convert', 'compare', 'map', 'resize', 'check', 'bench', 'io')
PROBE_WARNING = 'probing guessed raw'
# The start of a qcow2 v3 header: magic "QFI\xfb", then the big-endian
# version.  qemu's qcow2 probe wants the magic and a version >= 2, so the
# magic with version 0 is still raw; writing the version byte is what
# qemu (and vdk) must refuse on a probed raw image.
QCOW2_MAGIC = b'QFI\xfb'


def t_help(t, cmd):
    res = t.vdk(cmd, '--help')
    expect_rc(res, 0)
    first = (res.out.splitlines() or [''])[0]
    expect(first.startswith('usage: vdk %s' % cmd), "first line is not 'usage: vdk %s ...'" % cmd, res)
    expect_eq(res.err, '', 'stderr of --help', res)


def t_help_short(t, cmd):
    res = t.vdk(cmd, '-h')
    expect_rc(res, 0)
    expect(res.out.startswith('usage: vdk %s' % cmd), 'no usage line for -h', res)


def t_global_help(t):
    res = t.vdk('--help')
    expect_rc(res, 0)
    expect(res.out.splitlines()[1].startswith('usage: vdk'), 'no usage line', res)
    for cmd in COMMANDS:
        expect(('\n  %s ' % cmd) in res.out, 'command %s not listed in --help' % cmd, res)


def t_unknown_command(t, cmd):
    res = t.vdk(cmd)
    expect_rc(res, 1)
    expect_one_error_line(res)
    expect(cmd in res.err, 'error does not name the command', res)
    expect_eq(res.out, '', 'stdout', res)


def t_unknown_option(t, cmd):
    t.sparse('disk.img', MiB)
    res = t.vdk(cmd, '--no-such-option', 'disk.img')
    expect_rc(res, 1)
    expect(res.err.startswith('vdk') or 'no-such-option' in res.err, 'no error message', res)


def t_no_command(t):
    res = t.vdk()
    expect_rc(res, 1)
    expect('usage: vdk' in res.out + res.err, 'no usage text', res)


def t_version(t):
    res = t.vdk('--help')
    expect(res.out.startswith('vdk '), 'first line does not name vdk', res)


# --------------------------------------------------------------------------
# probing

def magic_image(t, name='disk.img'):
    t.write_bytes(name, QCOW2_MAGIC + b'\0' * (MiB - len(QCOW2_MAGIC)))
    res = t.qemu_img('info', '--output=json', name)
    expect(res.rc == 0 and '"format": "raw"' in res.out, 'test premise: qemu-img probes the image as raw', res)
    return name


def t_probe_warning(t):
    t.sparse('disk.img', MiB)
    res = t.vdk_io_raw('disk.img', ['write -P 0x5a 512k 4096'], fmt=None)
    expect_rc(res, 0)
    expect(PROBE_WARNING in res.err, 'no warning about probing raw on a writable open', res)
    t.qemu_io('disk.img', 'read -P 0x5a 512k 4096')
    res = t.vdk_io_raw('disk.img', ['write -P 0x5a 512k 4096'])
    expect(PROBE_WARNING not in res.err, 'probing warning with -f raw', res)


def t_probe_sector0_allowed(t):
    """Writes to sector 0 that keep it raw are allowed on a probed image."""
    t.sparse('disk.img', MiB)
    res = t.vdk_io_raw('disk.img', ['write -P 0x5a 0 512', 'write -P 0x51 0 1'], fmt=None)
    expect_rc(res, 0)
    t.qemu_io('disk.img', 'read -P 0x51 0 1', 'read -P 0x5a 1 511')


def t_probe_qcow2_refused(t):
    magic_image(t)
    before = t.content('disk.img')
    res = t.vdk_io_raw('disk.img', ['write -P 0x03 7 1'], fmt=None)
    expect_rc(res, 1, 'write of a qcow2 version field after the magic on a probed raw image')
    expect('Operation not permitted' in res.out + res.err or 'failed' in res.out + res.err,
           'no write failure reported', res)
    expect(t.content('disk.img') == before, 'file changed by a refused write')


def t_probe_qcow2_refused_qemu_agrees(t):
    """The same write through qemu-io is refused (validates the premise)."""
    magic_image(t)
    before = t.content('disk.img')
    rq = t.qemu_io_raw('disk.img', ['write -P 0x03 7 1'], fmt=None)
    expect_rc(rq, 1, 'qemu-io on a probed raw image')
    expect(t.content('disk.img') == before, 'qemu-io changed the file')


def t_probe_qcow2_refused_whole_header(t):
    """Writing the magic byte by byte: the last write completes the magic
    of an image whose version field is already 3."""
    t.write_bytes('disk.img', b'\0\0\0\0\0\0\0\x03' + b'\0' * (MiB - 8))
    cmds = ['write -P 0x51 0 1', 'write -P 0x46 1 1', 'write -P 0x49 2 1']
    res = t.vdk_io_raw('disk.img', cmds, fmt=None)
    expect_rc(res, 0, 'writes of the first three magic bytes')
    before = t.content('disk.img')
    expect_eq(before[:8], b'QFI\0\0\0\0\x03', 'sector 0 after the allowed writes')
    t.write_bytes('q.img', before)
    rq = t.qemu_io_raw('q.img', ['write -P 0xfb 3 1'], fmt=None)
    expect_rc(rq, 1, 'test premise: qemu-io refuses the write')
    res = t.vdk_io_raw('disk.img', ['write -P 0xfb 3 1'], fmt=None)
    expect_rc(res, 1, 'write completing a qcow2 header on a probed raw image')
    expect(t.content('disk.img') == before, 'file changed by a refused write')


def t_probe_explicit_raw_allowed(t):
    magic_image(t)
    res = t.vdk_io_raw('disk.img', ['write -P 0x03 7 1'])
    expect_rc(res, 0, 'the same write with -f raw')
    expect(PROBE_WARNING not in res.err, 'probing warning with -f raw', res)
    expect_eq(t.content('disk.img')[:8], b'QFI\xfb\0\0\0\x03', 'sector 0 after the write')


def t_probe_read_only_no_restriction(t):
    """Reading a probed raw image is fine and leaves it alone."""
    magic_image(t)
    before = t.content('disk.img')
    res = t.vdk_io_raw('disk.img', ['read -P 0 8 504'], fmt=None, extra=['-r'])
    expect_rc(res, 0)
    expect(t.content('disk.img') == before, 'read-only open changed the file')


suite.add('cli-global-help', t_global_help)
suite.add('cli-help-names-vdk', t_version)
for cmd in COMMANDS:
    suite.add('cli-%s-help' % cmd, t_help, cmd)
for cmd in ('create', 'info', 'io'):
    suite.add('cli-%s-h' % cmd, t_help_short, cmd)
suite.add('cli-unknown-command', t_unknown_command, 'frobnicate')
suite.add('cli-unknown-command-img-style', t_unknown_command, 'rebase-please')
suite.add('cli-no-command', t_no_command)
for cmd in ('info', 'map', 'check', 'io'):
    suite.add('cli-%s-unknown-option' % cmd, t_unknown_option, cmd)
suite.add_io('probe-raw-write-warns', t_probe_warning)
suite.add_io('probe-raw-sector0-raw-write-allowed', t_probe_sector0_allowed)
suite.add_io('probe-raw-qcow2-header-refused', t_probe_qcow2_refused)
suite.add_io('probe-raw-qcow2-magic-refused', t_probe_qcow2_refused_whole_header)
suite.add_io('probe-raw-explicit-format-allowed', t_probe_explicit_raw_allowed)
suite.add('probe-raw-qcow2-header-refused-by-qemu-io', t_probe_qcow2_refused_qemu_agrees)
suite.add('probe-raw-read-only', t_probe_read_only_no_restriction)

if __name__ == '__main__':
    main(suite)
