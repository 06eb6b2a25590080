# SPDX-License-Identifier: MIT
"""Shared pieces of vdk's benchmarks (bench/run, bench/qcow2.py,
bench/formats.py): running commands, timing them from a quiet page cache,
vdk bench / fio / qemu-img bench drivers that return IOPS and latency,
alternating medians, and the sources the benchmarks convert.

Rule for every number: vdk and its peer run alternately in the same
session and only medians and their ratios are reported (the machine is
shared and noisy; never compare with a number from another run)."""

import json
import os
import random
import statistics
import subprocess
import time

MiB = 1 << 20
GiB = 1 << 30


def default_vdk():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "build", "tools", "vdk")


def run(cmd, **kw):
    """Run a command that must succeed; its stdout."""
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (" ".join(cmd), r.returncode, r.stderr.strip()[-2000:]))
    return r.stdout


def json_from(out):
    """The JSON object in a tool's output (skipping any text before it)."""
    return json.loads(out[out.index("{"):])


DROP_CACHES = True


def quiesce():
    """No writeback of earlier runs in the way: sync, and drop the page
    cache when allowed (root) and not turned off (DROP_CACHES), so each
    run starts from the same state."""
    subprocess.run(["sync"], check=True)
    if not DROP_CACHES:
        return
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def timed(cmd):
    """Seconds a command takes (it must succeed); its stdout too."""
    t0 = time.monotonic()
    out = run(cmd)
    return time.monotonic() - t0, out


def median_pair(fa, fb, runs):
    a, b = [], []
    for _ in range(runs):
        a.append(fa())
        b.append(fb())
    return statistics.median(a), statistics.median(b)


def vdk_bench(vdk, img, fmt, rw="read", pattern="rand", bs="4k", depth=32, secs=None, count=None, aio="io_uring",
              cache="none", extra=(), image_opts=False):
    """vdk bench --json; returns {'iops', 'p50', 'p99'} (latencies in us)."""
    cmd = [vdk, "bench", "--aio=" + aio, "-t", cache, "-d", str(depth), "-s", str(bs), "--pattern=" + pattern,
           "--rw=" + rw, "--json"]
    if image_opts:
        cmd.append("--image-opts")
    else:
        cmd += ["-f", fmt]
    cmd += ["-c", str(count)] if count else ["--time=%g" % secs]
    j = json_from(run(cmd + list(extra) + [img]))
    return {"iops": j["iops"], "p50": j["latency_us"]["p50"], "p99": j["latency_us"]["p99"]}


def fio(target, rw, bs="4k", depth=32, secs=None, count=None, engine="io_uring", direct=True, extra=()):
    """fio, one job; target: fio options naming the file (or an nbd uri).
    Returns {'iops', 'p50', 'p99'} (completion latency, us)."""
    cmd = ["fio", "--name=b", "--rw=" + rw, "--bs=" + str(bs), "--iodepth=%d" % depth, "--ioengine=" + engine,
           "--output-format=json"]
    if direct:
        cmd.append("--direct=1")
    cmd += ["--number_ios=%d" % count] if count else ["--runtime=%g" % secs, "--time_based"]
    j = json_from(run(cmd + list(extra) + list(target)))["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {"iops": side["iops"], "p50": pct.get("50.000000", 0) / 1e3, "p99": pct.get("99.000000", 0) / 1e3}


def qemu_img_bench(img, fmt, write=False, bs="4k", depth=32, count=10000, step=None, aio="io_uring"):
    """qemu-img bench (sequential only: it has no random pattern); IOPS
    from the wall time, like the vdk bench run it is compared with."""
    cmd = ["qemu-img", "bench", "-f", fmt, "-t", "none", "-i", aio, "-d", str(depth), "-s", str(bs), "-c", str(count)]
    if step:
        cmd += ["-S", str(step)]
    if write:
        cmd.append("-w")
    t, _ = timed(cmd + [img])
    return {"iops": count / t}


def make_scattered_source(path, size):
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


def make_full_source(path, size):
    """Every byte allocated, incompressible."""
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def _stage_tree(stage, budget, root):
    """Hard-link (or copy) regular files from @root into @stage, in a
    fixed order, skipping what does not fit, until @budget bytes; returns
    the bytes staged."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            src = os.path.join(dirpath, fn)
            try:
                st = os.lstat(src)
            except OSError:
                continue
            if not os.path.isfile(src) or os.path.islink(src) or st.st_size == 0 or total + st.st_size > budget:
                continue
            dst = os.path.join(stage, os.path.relpath(src, "/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                try:
                    with open(src, "rb") as a, open(dst, "wb") as b:
                        b.write(a.read())
                except OSError:
                    continue
            total += st.st_size
            if total > budget * 0.99:
                return total
    return total


# binaries and libraries, text and documentation, headers
SYSTEM_DIRS = (("/usr/lib", 0.5), ("/usr/share", 0.3), ("/usr/bin", 0.12), ("/usr/include", 0.08))


def make_ext4_source(path, size, workdir, fill=0.6, roots=SYSTEM_DIRS):
    """A realistic disk: an ext4 filesystem of @size bytes made with
    mkfs.ext4 -d from real system files (binaries, libraries, text) up to
    @fill of its size, the rest free space (holes).  Returns the bytes of
    files copied in."""
    stage = os.path.join(workdir, "stage")
    os.makedirs(stage)
    try:
        total = 0
        for root, share in roots:
            total += _stage_tree(stage, int(size * fill * share), root)
        if os.path.exists(path):
            os.unlink(path)
        run(["mkfs.ext4", "-q", "-F", "-d", stage, "-E", "root_owner=0:0", path, str(size // 1024) + "k"])
    finally:
        subprocess.run(["rm", "-rf", stage])
    return total
