/* SPDX-License-Identifier: MIT */
/*
 * cmd-bench.c - vdk bench: qemu-img bench's flags and output, plus access
 * patterns (--pattern=seq|rand), mixed workloads (--rw=randrw), timed runs
 * (--time) and a JSON summary with IOPS, throughput and latency
 * percentiles.  It drives one queue exactly as a VMM would: keep `depth`
 * requests in flight, one submit per batch of completions.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tools/tool.h"

static const char bench_help[] =
    "usage: vdk bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N] [--no-drain]\n"
    "                 [-i AIO | --aio=AIO] [-n] [-o OFFSET] [--pattern=seq|rand|BYTE] [-q]\n"
    "                 [-s BUFSIZE] [-S STEP] [-t CACHE] [-w] [--rw=read|write|randrw]\n"
    "                 [--time=SECONDS] [--batch=N] [--json] [-U] FILENAME\n"
    "\n"
    "Run COUNT requests (default 75000) of BUFSIZE bytes (default 4k) with DEPTH\n"
    "(default 64) in flight and report the time taken, IOPS, throughput and latency.\n"
    "\n"
    "  -w              write instead of read (same as --rw=write)\n"
    "  --rw=MODE       read, write or randrw (50% each)\n"
    "  --pattern=P     seq (default: offsets advance by STEP, qemu-img's behaviour),\n"
    "                  rand (uniform random BUFSIZE-aligned offsets), or a number:\n"
    "                  the byte written (qemu-img's --pattern)\n"
    "  --time=SECONDS  run for this long instead of COUNT requests\n"
    "  -t CACHE        cache mode (default writeback; 'none' for O_DIRECT)\n"
    "  -i, --aio=AIO   io_uring, native, threads or auto; -n means native\n"
    "  --flush-interval=N  flush after every N writes (draining first unless --no-drain)\n"
    "  --batch=N       submit every N new requests (default 4).  Small batches keep\n"
    "                  a device busy whose backend completes a whole batch at once\n"
    "                  (virtio on many hypervisors); fio's default is 1\n"
    "  --json          print one JSON object: iops, bytes_per_second, latency_us{...}\n";

/* Latency histogram: exact below 256 ns, then 128 buckets per power of two
 * (under 1% error), enough for any latency a uint64 of ns can hold. */
#define HIST_SUB 7
#define HIST_BUCKETS (((64 - HIST_SUB) << HIST_SUB) + (1 << HIST_SUB))

typedef struct {
    uint64_t count[HIST_BUCKETS];
    uint64_t n;
    uint64_t sum;
    uint64_t min, max;
} Hist;

static unsigned
hist_index(uint64_t v)
{
    if (v < (1u << (HIST_SUB + 1))) {
        return (unsigned)v;
    }
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    return ((e - HIST_SUB + 1) << HIST_SUB) + (unsigned)((v >> (e - HIST_SUB)) & ((1u << HIST_SUB) - 1));
}

static double
hist_value(unsigned idx)
{
    if (idx < (1u << (HIST_SUB + 1))) {
        return idx;
    }
    unsigned e = (idx >> HIST_SUB) + HIST_SUB - 1;
    unsigned m = idx & ((1u << HIST_SUB) - 1);
    double lo = (double)(((uint64_t)(1u << HIST_SUB) + m) << (e - HIST_SUB));
    double width = (double)(1ULL << (e - HIST_SUB));
    return lo + width / 2;
}

static void
hist_add(Hist *h, uint64_t v)
{
    h->count[hist_index(v)]++;
    h->n++;
    h->sum += v;
    if (h->n == 1 || v < h->min) {
        h->min = v;
    }
    if (v > h->max) {
        h->max = v;
    }
}

static double
hist_pct(const Hist *h, double p)
{
    if (h->n == 0) {
        return 0;
    }
    uint64_t want = (uint64_t)ceil(p * (double)h->n);
    if (want == 0) {
        want = 1;
    }
    uint64_t acc = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        acc += h->count[i];
        if (acc >= want) {
            return MIN(hist_value(i), (double)h->max);
        }
    }
    return (double)h->max;
}

static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t
xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

typedef enum { RW_READ, RW_WRITE, RW_RANDRW } RwMode;

typedef struct {
    int64_t start;
    bool is_write;
    bool is_flush;
} BenchSlot;

int
cmd_bench(int argc, char **argv)
{
    enum { OPT_FLUSH = 256, OPT_NODRAIN, OPT_PATTERN, OPT_RW, OPT_TIME, OPT_JSON, OPT_AIO, OPT_BATCH };
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"flush-interval", required_argument, NULL, OPT_FLUSH},
        {"no-drain", no_argument, NULL, OPT_NODRAIN},
        {"pattern", required_argument, NULL, OPT_PATTERN},
        {"rw", required_argument, NULL, OPT_RW},
        {"time", required_argument, NULL, OPT_TIME},
        {"json", no_argument, NULL, OPT_JSON},
        {"aio", required_argument, NULL, OPT_AIO},
        {"batch", required_argument, NULL, OPT_BATCH},
        {"force-share", no_argument, NULL, 'U'},
        {"image-opts", no_argument, NULL, 'I'},
        {"object", required_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    ToolOpen o = {.cache = "writeback"};
    uint64_t count = 75000;
    bool count_given = false;
    uint64_t depth = 64;
    uint64_t offset = 0;
    uint64_t bufsize = 4096;
    uint64_t step = 0;
    uint64_t flush_interval = 0;
    bool drain = true;
    bool rand_pattern = false;
    uint8_t fill = 0;
    RwMode rw = RW_READ;
    double seconds = 0;
    bool json = false;
    bool quiet = tool_quiet;
    uint64_t batch = 4;
    int c;

    while ((c = getopt_long(argc, argv, "hc:d:f:i:no:qs:S:t:wU", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
            tool_usage(stdout, bench_help);
            return 0;
        case 'c':
            if (!tool_parse_uint(optarg, INT64_MAX, &count) || count == 0) {
                tool_error(NULL, "Invalid request count specified");
                return 1;
            }
            count_given = true;
            break;
        case 'd':
            if (!tool_parse_uint(optarg, 4096, &depth) || depth == 0) {
                tool_error(NULL, "Invalid queue depth specified (1 to 4096)");
                return 1;
            }
            break;
        case 'f':
            o.format = optarg;
            break;
        case 'i':
        case OPT_AIO:
            o.aio = optarg;
            break;
        case 'n':
            o.aio = "native";
            break;
        case 'o':
            if (!vdk_parse_size(optarg, &offset, NULL)) {
                tool_error(NULL, "Invalid offset specified");
                return 1;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 's':
            if (!vdk_parse_size(optarg, &bufsize, NULL) || bufsize == 0 || bufsize > VDK_MAX_REQUEST_BYTES) {
                tool_error(NULL, "Invalid buffer size specified");
                return 1;
            }
            break;
        case 'S':
            if (!vdk_parse_size(optarg, &step, NULL)) {
                tool_error(NULL, "Invalid step size specified");
                return 1;
            }
            break;
        case 't':
            o.cache = optarg;
            break;
        case 'w':
            rw = RW_WRITE;
            break;
        case OPT_FLUSH:
            if (!tool_parse_uint(optarg, INT64_MAX, &flush_interval)) {
                tool_error(NULL, "Invalid flush interval specified");
                return 1;
            }
            break;
        case OPT_NODRAIN:
            drain = false;
            break;
        case OPT_PATTERN:
            if (!strcmp(optarg, "rand")) {
                rand_pattern = true;
            } else if (!strcmp(optarg, "seq")) {
                rand_pattern = false;
            } else {
                uint64_t v;
                if (!tool_parse_uint(optarg, 255, &v)) {
                    tool_error(NULL, "Invalid pattern byte specified (seq, rand or 0..255)");
                    return 1;
                }
                fill = (uint8_t)v;
            }
            break;
        case OPT_RW:
            if (!strcmp(optarg, "read")) {
                rw = RW_READ;
            } else if (!strcmp(optarg, "write")) {
                rw = RW_WRITE;
            } else if (!strcmp(optarg, "randrw")) {
                rw = RW_RANDRW;
            } else {
                tool_error(NULL, "invalid --rw '%s' (expected read, write or randrw)", optarg);
                return 1;
            }
            break;
        case OPT_TIME: {
            char *end = NULL;
            seconds = g_ascii_strtod(optarg, &end);
            if (!end || *end || !(seconds > 0) || seconds > 1e7) {
                tool_error(NULL, "invalid --time '%s' (seconds, > 0)", optarg);
                return 1;
            }
            break;
        }
        case OPT_JSON:
            json = true;
            break;
        case OPT_BATCH:
            if (!tool_parse_uint(optarg, 4096, &batch) || batch == 0) {
                tool_error(NULL, "invalid --batch '%s' (1 to 4096)", optarg);
                return 1;
            }
            break;
        case 'U':
            o.force_share = true;
            break;
        case 'I':
            o.image_opts = true;
            break;
        case 'j':
            if (!tool_add_object(optarg)) {
                return 1;
            }
            break;
        default:
            tool_usage(stderr, bench_help);
            return 1;
        }
    }
    if (optind != argc - 1) {
        tool_error(NULL, "Expecting one image file name");
        return 1;
    }
    if (flush_interval && flush_interval < depth) {
        tool_error(NULL, "Flush interval can't be smaller than depth");
        return 1;
    }
    if (step == 0) {
        step = bufsize;
    }
    if (seconds > 0 && !count_given) {
        count = UINT64_MAX;
    }
    o.read_only = rw == RW_READ;
    const char *filename = argv[optind];
    GError *err = NULL;
    VdkImage *img = tool_open(filename, &o);
    if (!img) {
        return 1;
    }
    uint64_t size = vdk_image_get_size(img);
    if (bufsize > size || offset > size - bufsize) {
        tool_error(filename, "the image (%" PRIu64 " bytes) is too small for %" PRIu64 "-byte requests at offset %" PRIu64,
                   size, bufsize, offset);
        vdk_image_close(img, NULL);
        return 1;
    }
    VdkQueue *q = vdk_queue_new(img, (unsigned)depth + 1, &err);
    if (!q) {
        tool_gerror(filename, err);
        vdk_image_close(img, NULL);
        return 1;
    }
    uint8_t *bufs = NULL;
    uint64_t bufs_len;
    if (vdk_mul_overflows(depth, bufsize, &bufs_len) || posix_memalign((void **)&bufs, 4096, (size_t)bufs_len)) {
        tool_error(NULL, "cannot allocate %" PRIu64 " buffers of %" PRIu64 " bytes", depth, bufsize);
        vdk_queue_free(q);
        vdk_image_close(img, NULL);
        return 1;
    }
    memset(bufs, fill, (size_t)bufs_len);
    BenchSlot *slots = g_new0(BenchSlot, depth + 1);
    unsigned *free_slots = g_new(unsigned, depth);
    unsigned nfree = (unsigned)depth;
    for (unsigned i = 0; i < depth; i++) {
        free_slots[i] = (unsigned)depth - 1 - i;
    }
    Hist *hist = g_new0(Hist, 1);
    VdkCompletion *comps = g_new0(VdkCompletion, depth + 1);

    const char *rw_name = rw == RW_READ ? "read" : rw == RW_WRITE ? "write" : "randrw";
    if (!quiet && !json) {
        char *what = rand_pattern ? g_strdup("random offsets")
                                  : g_strdup_printf("step size %" PRIu64, step);
        if (count == UINT64_MAX) {
            printf("Sending %s requests for %.3g seconds, %" PRIu64 " bytes each, %" PRIu64
                   " in parallel (starting at offset %" PRIu64 ", %s)\n",
                   rw == RW_RANDRW ? "read/write" : rw_name, seconds, bufsize, depth, offset, what);
        } else {
            printf("Sending %" PRIu64 " %s requests, %" PRIu64 " bytes each, %" PRIu64
                   " in parallel (starting at offset %" PRIu64 ", %s)\n",
                   count, rw == RW_RANDRW ? "read/write" : rw_name, bufsize, depth, offset, what);
        }
        g_free(what);
        fflush(stdout);
    }
    uint64_t seed = (uint64_t)now_ns() | 1;
    uint64_t next_off = offset;
    uint64_t span = (size - offset) / bufsize; /* random slots */
    uint64_t issued = 0, completed = 0, bytes = 0, writes_since_flush = 0;
    unsigned inflight = 0;
    uint64_t queued_since_submit = 0;
    bool flush_pending = false;
    bool stop = false;
    int error = 0;
    int64_t t0 = now_ns();
    int64_t deadline = seconds > 0 ? t0 + (int64_t)(seconds * 1e9) : INT64_MAX;

    /* Slot `depth` is reserved for flushes. */
    for (;;) {
        /* Refill. */
        while (!stop && !error && inflight < depth && issued < count && !flush_pending) {
            unsigned slot = free_slots[--nfree];
            uint64_t off;
            if (rand_pattern) {
                off = offset + (xorshift(&seed) % span) * bufsize;
            } else {
                off = next_off;
                next_off += step;
                if (next_off + bufsize > size) {
                    next_off = offset;
                }
            }
            bool is_write = rw == RW_WRITE || (rw == RW_RANDRW && (xorshift(&seed) & 1));
            void *buf = bufs + (uint64_t)slot * bufsize;
            int r = is_write ? vdk_queue_write(q, off, buf, (size_t)bufsize, 0, slot)
                             : vdk_queue_read(q, off, buf, (size_t)bufsize, slot);
            if (r < 0) {
                free_slots[nfree++] = slot;
                error = r;
                break;
            }
            slots[slot].start = now_ns();
            if (++queued_since_submit >= batch) {
                vdk_queue_submit(q);
                queued_since_submit = 0;
            }
            slots[slot].is_write = is_write;
            inflight++;
            issued++;
            if (is_write && flush_interval && ++writes_since_flush >= flush_interval) {
                writes_since_flush = 0;
                flush_pending = true;
            }
        }
        if (flush_pending && (!drain || inflight == 0) && slots[depth].start == 0) {
            if (vdk_queue_flush(q, depth) == 0) {
                slots[depth].start = now_ns();
                slots[depth].is_flush = true;
                inflight++;
            }
            flush_pending = false;
        }
        if (inflight == 0) {
            break;
        }
        queued_since_submit = 0;
        int n = vdk_queue_submit_and_wait(q, comps, (unsigned)depth + 1, 1, -1);
        if (n < 0) {
            error = n;
            break;
        }
        int64_t t = now_ns();
        for (int i = 0; i < n; i++) {
            unsigned slot = (unsigned)comps[i].user_data;
            if (comps[i].result < 0 && !error) {
                error = (int)comps[i].result;
            }
            if (!slots[slot].is_flush) {
                hist_add(hist, (uint64_t)(t - slots[slot].start));
                completed++;
                bytes += bufsize;
                free_slots[nfree++] = slot;
            }
            slots[slot].start = 0;
            slots[slot].is_flush = false;
            inflight--;
        }
        if (t >= deadline) {
            stop = true;
        }
    }
    int64_t t1 = now_ns();
    double secs = (double)(t1 - t0) / 1e9;
    int ret = 0;
    if (error) {
        tool_error(filename, "%s failed: %s", rw_name, g_strerror(-error));
        ret = 1;
    } else if (json) {
        Json j;
        json_init(&j, true);
        json_begin_object(&j, NULL);
        json_str(&j, "filename", filename);
        json_str(&j, "format", vdk_image_get_format(img));
        json_str(&j, "aio", vdk_image_get_engine(img));
        json_str(&j, "cache", vdk_image_get_cache(img));
        json_str(&j, "rw", rw_name);
        json_str(&j, "pattern", rand_pattern ? "rand" : "seq");
        json_uint(&j, "depth", depth);
        json_uint(&j, "batch", batch);
        json_uint(&j, "bufsize", bufsize);
        json_uint(&j, "requests", completed);
        json_uint(&j, "bytes", bytes);
        json_double(&j, "seconds", secs);
        json_double(&j, "iops", secs > 0 ? (double)completed / secs : 0);
        json_double(&j, "bytes_per_second", secs > 0 ? (double)bytes / secs : 0);
        json_begin_object(&j, "latency_us");
        json_double(&j, "min", (double)hist->min / 1e3);
        json_double(&j, "mean", hist->n ? (double)hist->sum / (double)hist->n / 1e3 : 0);
        json_double(&j, "p50", hist_pct(hist, 0.50) / 1e3);
        json_double(&j, "p90", hist_pct(hist, 0.90) / 1e3);
        json_double(&j, "p99", hist_pct(hist, 0.99) / 1e3);
        json_double(&j, "p999", hist_pct(hist, 0.999) / 1e3);
        json_double(&j, "max", (double)hist->max / 1e3);
        json_end_object(&j);
        json_end_object(&j);
        char *s = json_finish(&j);
        printf("%s\n", s);
        g_free(s);
    } else if (!quiet) {
        printf("Run completed in %.3f seconds.\n", secs);
        char *bw = tool_cvtstr(secs > 0 ? (double)bytes / secs : 0);
        printf("%.0f IOPS, %s/s; latency us: p50 %.1f, p99 %.1f, p99.9 %.1f (aio %s, cache %s)\n",
               secs > 0 ? (double)completed / secs : 0, bw, hist_pct(hist, 0.5) / 1e3, hist_pct(hist, 0.99) / 1e3,
               hist_pct(hist, 0.999) / 1e3, vdk_image_get_engine(img), vdk_image_get_cache(img));
        g_free(bw);
    }
    g_free(comps);
    g_free(free_slots);
    g_free(hist);
    g_free(slots);
    free(bufs);
    vdk_queue_free(q);
    if (!vdk_image_close(img, &err)) {
        tool_gerror(filename, err);
        ret = 1;
    }
    return ret;
}
