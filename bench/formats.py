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
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import MiB, quiesce, run  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--vdk", default=benchlib.default_vdk())
p.add_argument("--runs", type=int, default=5)
p.add_argument("--secs", type=float, default=4)
p.add_argument("--formats", default="vdi,vmdk")
p.add_argument("--size-mib", type=int, default=1024)
p.add_argument("--dir", default=os.environ.get("TMPDIR", "/var/tmp"))
args = p.parse_args()
VDK = os.path.abspath(args.vdk)


def timed(cmd):
    return benchlib.timed(cmd)[0]


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
    return benchlib.fio(["--filename=" + path], "randread", secs=args.secs)["iops"]


def vdk_randread(path, fmt):
    return benchlib.vdk_bench(VDK, path, fmt, secs=args.secs)["iops"]


def main():
    d = tempfile.mkdtemp(prefix="vdk-bench-formats-", dir=args.dir)
    rows = []
    try:
        size = args.size_mib * MiB
        src = os.path.join(d, "src.raw")
        benchlib.make_scattered_source(src, size)
        full = os.path.join(d, "full.raw")
        benchlib.make_full_source(full, size)
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
