#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vdi / vmdk benchmarks, vdk against qemu-img and fio on the same machine in
the same run (alternating, medians of RUNS, ratios):

  raw -> FMT conversion of a realistic 1 GiB image (full blocks of random
  and text-like data, blocks with a few small extents, zero blocks, holes),
  each run from a dropped page cache, at equal durability:
      vdk convert -O FMT            vs  qemu-img convert -O FMT && sync
  4 KiB random reads, QD32, O_DIRECT, io_uring on a fully allocated FMT image
      vdk bench -f FMT              vs  fio on the raw file with the same data

usage: bench/formats.py [--vdk build/tools/vdk] [--runs 5] [--secs 4]
                        [--formats vdi,vmdk] [--dir DIR]
Prints a Markdown table.  Needs qemu-img and fio.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

p = argparse.ArgumentParser()
p.add_argument("--vdk", default=os.path.join(os.path.dirname(__file__), "..", "build", "tools", "vdk"))
p.add_argument("--runs", type=int, default=5)
p.add_argument("--secs", type=float, default=4)
p.add_argument("--formats", default="vdi,vmdk")
p.add_argument("--size-mib", type=int, default=1024)
p.add_argument("--dir", default=os.environ.get("TMPDIR", "/var/tmp"))
args = p.parse_args()
VDK = os.path.abspath(args.vdk)
MiB = 1 << 20


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw).stdout


def make_source(path, size):
    """A disk-like image, 1 MiB at a time: 30% of the blocks full (random
    or text-like data), 30% with a few small extents (4-64 KiB, like
    scattered files and metadata), the rest holes or zero-filled."""
    rng = random.Random(1)
    words = b"the quick brown fox jumps over the lazy dog 0123456789 lorem ipsum\n"
    text = (words * (MiB // len(words) + 1))[:MiB]
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            k = rng.random()
            if k < 0.3:
                f.seek(off)
                f.write(os.urandom(MiB) if rng.random() < 0.5 else text)
            elif k < 0.6:
                for _ in range(rng.randint(1, 4)):
                    n = rng.randrange(4096, 65536, 4096)
                    f.seek(off + rng.randrange(0, MiB - n, 4096))
                    f.write(os.urandom(n))
            elif k < 0.7:
                f.seek(off)
                f.write(bytes(MiB))


def quiesce():
    """No writeback of earlier runs in the way: sync, and drop the page
    cache when allowed (root), so each run starts from the same state."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def timed(cmd):
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - t0


def convert_pair(d, src, fmt, opts):
    out_v, out_q = os.path.join(d, "v." + fmt), os.path.join(d, "q." + fmt)
    tv, tq = [], []
    for _ in range(args.runs):
        for f in (out_v, out_q):
            if os.path.exists(f):
                os.unlink(f)
        quiesce()
        tv.append(timed([VDK, "convert", "-f", "raw", "-O", fmt] + opts + [src, out_v]))
        quiesce()
        tq.append(timed(["sh", "-c", 'qemu-img convert -f raw -O %s %s "$0" "$1" && sync' % (fmt, " ".join(opts)),
                         src, out_q]))
    print("  %s: vdk %s qemu %s" % (fmt, ["%.2f" % x for x in tv], ["%.2f" % x for x in tq]), file=sys.stderr)
    cmp = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, out_v, out_q], stdout=subprocess.PIPE)
    if cmp.returncode != 0:
        raise SystemExit("vdk and qemu-img conversions differ (%s)" % fmt)
    return statistics.median(tv), statistics.median(tq)


def fio_randread(path):
    out = run(["fio", "--name=r", "--filename=" + path, "--rw=randread", "--bs=4k", "--iodepth=32",
               "--ioengine=io_uring", "--direct=1", "--time_based", "--runtime=%g" % args.secs, "--output-format=json"])
    return json.loads(out)["jobs"][0]["read"]["iops"]


def vdk_randread(path, fmt):
    out = run([VDK, "bench", "-f", fmt, "--aio=io_uring", "-t", "none", "-d", "32", "-s", "4k", "--pattern=rand",
               "--time=%g" % args.secs, "--json", path])
    return json.loads(out[out.index("{"):])["iops"]


def main():
    d = tempfile.mkdtemp(prefix="vdk-bench-formats-", dir=args.dir)
    rows = []
    try:
        size = args.size_mib * MiB
        src = os.path.join(d, "src.raw")
        make_source(src, size)
        full = os.path.join(d, "full.raw")
        with open(full, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        for fmt in args.formats.split(","):
            opts = {"vdi": [], "vmdk": []}.get(fmt, [])
            v, q = convert_pair(d, src, fmt, opts)
            rows.append(("raw -> %s convert, %d MiB (s, lower is better)" % (fmt, args.size_mib), v, q, q / v))
            img = os.path.join(d, "full." + fmt)
            run(["qemu-img", "convert", "-f", "raw", "-O", fmt] + (["-o", "static=on"] if fmt == "vdi" else []) +
                [full, img])
            rv, rf = [], []
            for _ in range(args.runs):
                rv.append(vdk_randread(img, fmt))
                rf.append(fio_randread(full))
            mv, mf = statistics.median(rv), statistics.median(rf)
            rows.append(("4K randread QD32 %s vs fio raw (IOPS)" % fmt, mv, mf, mv / mf))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print("| benchmark | vdk | peer | ratio (vdk advantage) |")
    print("|---|---|---|---|")
    for name, v, q, r in rows:
        print("| %s | %.3f | %.3f | %.2f |" % (name, v, q, r) if v < 100 else "| %s | %.0f | %.0f | %.2f |" %
              (name, v, q, r))


main()
