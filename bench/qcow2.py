#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""qcow2 benchmarks, vdk against its peers on the same machine in the same
run: each pair is measured alternately, RUNS times, and the medians and their
ratio are reported (the machine is shared and noisy: never compare with a
number from another run).

  4 KiB random reads,  QD32, O_DIRECT, io_uring, fully allocated 4 GiB qcow2
      vdk bench (qcow2)            vs  fio on a raw file with the same data
  4 KiB random writes into allocated clusters, same setup
      vdk bench (qcow2)            vs  fio on the raw file
  4 KiB sequential allocating writes into an empty 4 GiB qcow2
      vdk bench                    vs  qemu-img bench -w
  4 KiB random allocating writes into an empty 4 GiB qcow2
      vdk bench                    vs  qemu-nbd + fio's nbd engine
  small-cache curve: 4 KiB random reads over a 2 TiB image with 256 MiB of L2
      tables (metadata preallocated, data sparse) for several L2 cache sizes

usage: bench/qcow2.py [--vdk build/tools/vdk] [--runs 5] [--secs 4] [--dir DIR]
Prints a Markdown table.  Needs fio, qemu-img, qemu-nbd.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import run  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--vdk", default=benchlib.default_vdk())
p.add_argument("--runs", type=int, default=5)
p.add_argument("--secs", type=float, default=4)
p.add_argument("--dir", default=os.environ.get("TMPDIR", "/var/tmp"))
p.add_argument("--skip-curve", action="store_true")
args = p.parse_args()
VDK = os.path.abspath(args.vdk)


def vdk_bench(img, fmt, rw, pattern, count=None, extra=()):
    return benchlib.vdk_bench(VDK, img, fmt, rw=rw, pattern=pattern, secs=args.secs, count=count, extra=extra)["iops"]


def vdk_bench_spec(spec):
    return benchlib.vdk_bench(VDK, spec, None, secs=args.secs, image_opts=True)["iops"]


def fio(target, rw, engine="io_uring", count=None, extra=()):
    return benchlib.fio(list(extra) + target, rw, secs=args.secs, count=count, engine=engine, direct=False)["iops"]


def median_pair(fa, fb):
    return benchlib.median_pair(fa, fb, args.runs)


rows = []
work = tempfile.mkdtemp(prefix="vdk-bench-", dir=args.dir)
try:
    raw = os.path.join(work, "data.raw")
    qc = os.path.join(work, "data.qcow2")
    run(["fio", "--name=fill", "--filename=" + raw, "--size=4G", "--rw=write", "--bs=1M",
         "--ioengine=libaio", "--direct=1", "--iodepth=8"])
    run([VDK, "convert", "-f", "raw", "-O", "qcow2", raw, qc])

    v, f = median_pair(lambda: vdk_bench(qc, "qcow2", "read", "rand"),
                       lambda: fio(["--filename=" + raw, "--size=4G", "--direct=1"], "randread"))
    rows.append(("4K random read, QD32, allocated qcow2", "vdk bench", v, "fio on raw", f))
    v, f = median_pair(lambda: vdk_bench(qc, "qcow2", "write", "rand"),
                       lambda: fio(["--filename=" + raw, "--size=4G", "--direct=1"], "randwrite"))
    rows.append(("4K random write, QD32, allocated clusters", "vdk bench", v, "fio on raw", f))
    os.unlink(raw)
    os.unlink(qc)

    empty = os.path.join(work, "empty.qcow2")
    N = 40000

    def vdk_alloc(pattern):
        if os.path.exists(empty):
            os.unlink(empty)
        run([VDK, "create", "-q", "-f", "qcow2", empty, "4G"])
        return vdk_bench(empty, "qcow2", "write", pattern, count=N)

    def qemu_bench_alloc():
        if os.path.exists(empty):
            os.unlink(empty)
        run(["qemu-img", "create", "-q", "-f", "qcow2", empty, "4G"])
        t = time.monotonic()
        run(["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-i", "io_uring", "-w", "-d", "32", "-s", "4k",
             "-c", str(N), empty])
        return N / (time.monotonic() - t)

    def qemu_nbd_alloc():
        if os.path.exists(empty):
            os.unlink(empty)
        run(["qemu-img", "create", "-q", "-f", "qcow2", empty, "4G"])
        sock = os.path.join(work, "nbd.sock")
        srv = subprocess.Popen(["qemu-nbd", "-t", "-f", "qcow2", "--cache=none", "--aio=io_uring", "-k", sock, empty],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            return fio(["--uri=nbd+unix:///?socket=" + sock, "--size=4G"], "randwrite", engine="nbd", count=N)
        finally:
            srv.terminate()
            srv.wait()

    v, q = median_pair(lambda: vdk_alloc("seq"), qemu_bench_alloc)
    rows.append(("4K sequential allocating write, QD32, empty qcow2", "vdk bench", v, "qemu-img bench -w", q))
    v, q = median_pair(lambda: vdk_alloc("rand"), qemu_nbd_alloc)
    rows.append(("4K random allocating write, QD32, empty qcow2", "vdk bench", v, "qemu-nbd + fio nbd", q))
    os.unlink(empty)

    curve = []
    if not args.skip_curve:
        big = os.path.join(work, "big.qcow2")
        run([VDK, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", big, "2T"])
        for cache in ("256M", "32M", "8M", "1M"):
            spec = "driver=qcow2,file.filename=%s,l2-cache-size=%s" % (big.replace(",", ",,"), cache)
            vals = [vdk_bench_spec(spec) for _ in range(max(1, args.runs // 2))]
            curve.append((cache, statistics.median(vals)))
        os.unlink(big)
finally:
    shutil.rmtree(work, ignore_errors=True)

print("| workload | vdk | IOPS | peer | IOPS | ratio |")
print("|---|---|---|---|---|---|")
for w, a, av, b, bv in rows:
    print(f"| {w} | {a} | {av:,.0f} | {b} | {bv:,.0f} | {av / bv:.2f} |")
if curve:
    print()
    print("| L2 cache (256 MiB of L2 tables, random 4K reads) | IOPS |")
    print("|---|---|")
    for c, v in curve:
        print(f"| {c} | {v:,.0f} |")
print(f"\n(medians of {args.runs} alternating runs; {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')})")
