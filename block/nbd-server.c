/* SPDX-License-Identifier: MIT */
/*
 * nbd-server.c - the NBD protocol, server side, over the async queue.
 *
 * Spec: the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md)
 * and QEMU's docs/interop/nbd for the qemu:allocation-depth context.
 *
 * Supported: fixed newstyle handshake (NBD_OPT_EXPORT_NAME, ABORT, LIST,
 * INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT), simple
 * and structured replies, READ WRITE DISC FLUSH TRIM CACHE WRITE_ZEROES
 * BLOCK_STATUS with FUA, NO_HOLE, FAST_ZERO, DF and REQ_ONE; the contexts
 * base:allocation and qemu:allocation-depth.  Not supported: TLS
 * (STARTTLS gets NBD_REP_ERR_UNSUP), extended headers, oldstyle
 * negotiation, dirty bitmaps.
 *
 * Every client is untrusted.  Its bytes are parsed from a fixed-size input
 * buffer; an option's data is buffered only up to NBD_MAX_OPTION (longer
 * ones are read and dropped, then refused with NBD_REP_ERR_TOO_BIG); READ
 * and WRITE payloads above NBD_MAX_PAYLOAD are refused with NBD_EINVAL (a
 * write's payload is read and dropped, so the stream stays in step);
 * ranges past the end of the export, unknown commands and flags get the
 * errors the spec names.  A bad magic number (the stream cannot be
 * resynchronised) or an unknown client flag closes the connection.  Per
 * connection at most CONN_MAX_REQS requests and CONN_MAX_BYTES of buffers
 * are held at once, counting replies the client has not read yet: past
 * that the connection's socket is not read until replies drain.  All
 * connections together (closed ones whose requests are still in the queue
 * included) hold at most SERVER_MAX_BYTES; idle requests keep at most
 * REQ_CACHE_BYTES of buffers for reuse.
 *
 * Multi-conn: every connection's requests go through the one queue of one
 * image in this process, so a flush on any connection covers every write
 * completed on all of them; NBD_FLAG_CAN_MULTI_CONN is advertised whenever
 * more than one client may connect.
 */
#include "config.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <stdarg.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "block/nbd-server.h"

/* Magic numbers (proto.md "Handshake" and "Transmission"). */
#define NBD_MAGIC UINT64_C(0x4e42444d41474943)      /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC UINT64_C(0x49484156454f5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC UINT64_C(0x3e889045565a9)
#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

/* Handshake and client flags. */
#define NBD_FLAG_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_NO_ZEROES (1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES (1u << 1)

/* Transmission flags. */
#define NBD_FLAG_HAS_FLAGS (1u << 0)
#define NBD_FLAG_READ_ONLY (1u << 1)
#define NBD_FLAG_SEND_FLUSH (1u << 2)
#define NBD_FLAG_SEND_FUA (1u << 3)
#define NBD_FLAG_SEND_TRIM (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN (1u << 8)
#define NBD_FLAG_SEND_CACHE (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO (1u << 11)

/* Options. */
#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_LIST 3
#define NBD_OPT_STARTTLS 5
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7
#define NBD_OPT_STRUCTURED_REPLY 8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT 10

/* Option replies. */
#define NBD_REP_ACK 1u
#define NBD_REP_SERVER 2u
#define NBD_REP_INFO 3u
#define NBD_REP_META_CONTEXT 4u
#define NBD_REP_ERR_UNSUP 0x80000001u
#define NBD_REP_ERR_POLICY 0x80000002u
#define NBD_REP_ERR_INVALID 0x80000003u
#define NBD_REP_ERR_UNKNOWN 0x80000006u
#define NBD_REP_ERR_SHUTDOWN 0x80000007u
#define NBD_REP_ERR_TOO_BIG 0x80000009u

#define NBD_INFO_EXPORT 0
#define NBD_INFO_NAME 1
#define NBD_INFO_DESCRIPTION 2
#define NBD_INFO_BLOCK_SIZE 3

/* Commands and command flags. */
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_CACHE 5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7

#define NBD_CMD_FLAG_FUA (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE (1u << 1)
#define NBD_CMD_FLAG_DF (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

/* Structured replies. */
#define NBD_REPLY_FLAG_DONE (1u << 0)
#define NBD_REPLY_TYPE_NONE 0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR 0x8001u

/* Error values (proto.md "Error values"). */
#define NBD_EPERM 1
#define NBD_EIO 5
#define NBD_ENOMEM 12
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP 95
#define NBD_ESHUTDOWN 108

/* Block status flags. */
#define NBD_STATE_HOLE (1u << 0)
#define NBD_STATE_ZERO (1u << 1)

/* Metadata context ids we hand out (transient per the spec). */
#define META_ID_BASE 1u
#define META_ID_DEPTH 2u

/* Limits.  The payload limit is the spec's "SHOULD NOT be considered a
 * denial of service" floor (2^25), advertised in NBD_INFO_BLOCK_SIZE. */
#define NBD_MAX_PAYLOAD (32u << 20)
#define NBD_MAX_STRING 4096u           /* the spec's string length limit */
#define NBD_MAX_OPTION (64u << 10)     /* option data buffered; longer is refused */
#define CONN_INBUF (256u << 10)        /* per-connection input buffer */
#define CONN_DIRECT_RECV (64u << 10)   /* payload left to read that goes straight to its buffer */
#define CONN_MAX_REQS 512u             /* requests held per connection (queued, in flight, unsent) */
#define CONN_MAX_BYTES (256u << 20)    /* buffer bytes held per connection */
#define CONN_MAX_HS_OUT (64u << 10)    /* handshake replies not yet read before we stop reading */
#define BS_MAX_STEPS 65536u            /* block status lookups for one request (<= 2^20 extents) */
#define SERVER_QUEUE_DEPTH 1024u
#define HANDSHAKE_TIMEOUT_US (10 * G_USEC_PER_SEC) /* qemu-nbd's default handshake limit */
#define REQ_CACHE_MAX 256u             /* idle request structs kept for reuse */
#define REQ_KEEP_BUF (128u << 10)      /* largest buffer an idle request keeps */
#define REQ_CACHE_BYTES (8u << 20)     /* buffer bytes idle requests keep in all */
#define SERVER_MAX_BYTES (512u << 20)  /* buffer bytes held by all connections (closed ones too) */
#define ALIGN 4096u

/* epoll tags that are not connections (connections are tagged by pointer). */
#define TAG_QUEUE 1u
#define TAG_STOP 2u
#define TAG_LISTEN 16u /* + listener index */

enum { PH_CLIENT_FLAGS, PH_OPTIONS, PH_TRANS, PH_CLOSING };

enum { OP_NONE, OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_ZERO, OP_BS };

typedef struct NbdConn NbdConn;
typedef struct NbdReq NbdReq;

typedef struct {
    uint32_t len, flags;
} Extent;

struct NbdReq {
    NbdConn *conn;
    NbdReq *next; /* wait list, output queue or cache */
    uint64_t cookie, offset;
    uint32_t length;
    uint16_t type, flags;
    int op;        /* what to issue next (OP_*) */
    unsigned vflags; /* VDK_REQ_* for op */
    bool flush_after; /* TRIM with FUA: flush once the discard completed */
    uint64_t io_offset, io_length;
    void *buf;
    size_t buf_cap;
    /* block status */
    VdkBlockStatus bs;
    uint64_t bs_end;
    uint32_t bs_steps;
    Extent *ext[2]; /* base:allocation, qemu:allocation-depth */
    uint32_t n_ext[2], cap_ext[2];
    uint8_t *bs_payload;
    /* reply */
    uint8_t hdr[192];
    struct iovec iov[4];
    int iovcnt, iov_idx;
    size_t iov_off;
};

struct NbdConn {
    VdkNbdServer *srv;
    NbdConn *prev, *next;
    int fd;
    int phase;
    bool eof;      /* client finished sending (EOF or NBD_CMD_DISC) */
    bool structured;
    bool no_zeroes;
    bool meta[2];
    uint32_t ep_events;
    int64_t start_us;
    /* input */
    uint8_t *in;
    size_t in_start, in_end;
    uint64_t discard_left;
    bool discard_is_option;
    uint32_t discard_opt;
    NbdReq *rx_req; /* write whose payload is being received */
    size_t rx_got;
    /* output: handshake bytes first, then replies */
    GByteArray *hs_out;
    size_t hs_off;
    NbdReq *out_head, *out_tail;
    /* requests of this connection not yet freed, and their buffer bytes */
    unsigned nreqs;
    size_t nbytes;
};

struct VdkNbdServer {
    VdkImage *img;
    VdkQueue *q;
    uint64_t size;
    bool read_only;
    char *export_name;
    char *description;
    unsigned max_clients;
    bool persistent;
    int stop_fd;
    int epfd;
    int qfd;
    GArray *listeners; /* int */
    bool accepting;
    NbdConn *conns;
    unsigned nclients;
    bool had_client;
    bool stopping;
    unsigned queued;
    NbdReq *wait_head, *wait_tail;
    bool queue_full;
    NbdReq *cache;
    unsigned ncache;
    size_t cache_bytes; /* buffer bytes idle requests keep */
    size_t nbytes;      /* buffer bytes held by every connection's requests */
    uint16_t tflags;
};

/* ------------------------------------------------------------------------ */
/* byte order helpers                                                        */

static inline uint16_t
ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return be16toh(v);
}

static inline uint32_t
ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return be32toh(v);
}

static inline uint64_t
ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return be64toh(v);
}

static inline void
st16(uint8_t *p, uint16_t v)
{
    v = htobe16(v);
    memcpy(p, &v, 2);
}

static inline void
st32(uint8_t *p, uint32_t v)
{
    v = htobe32(v);
    memcpy(p, &v, 4);
}

static inline void
st64(uint8_t *p, uint64_t v)
{
    v = htobe64(v);
    memcpy(p, &v, 8);
}

static void
ba_put16(GByteArray *b, uint16_t v)
{
    uint8_t x[2];
    st16(x, v);
    g_byte_array_append(b, x, 2);
}

static void
ba_put32(GByteArray *b, uint32_t v)
{
    uint8_t x[4];
    st32(x, v);
    g_byte_array_append(b, x, 4);
}

static void
ba_put64(GByteArray *b, uint64_t v)
{
    uint8_t x[8];
    st64(x, v);
    g_byte_array_append(b, x, 8);
}

static int
nbd_errno(int err)
{
    switch (err) {
    case 0:
        return 0;
    case EPERM:
    case EROFS:
        return NBD_EPERM;
    case ENOMEM:
        return NBD_ENOMEM;
    case EINVAL:
        return NBD_EINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case ENOTSUP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    default:
        return NBD_EIO;
    }
}

/* ------------------------------------------------------------------------ */
/* requests                                                                  */

/* Buffer bytes held for a connection's requests count against its own
 * bound and the server's: requests of connections already closed stay
 * until the queue completes them, so only the server's bound keeps
 * clients that connect, send and leave again and again from piling up
 * memory. */
static inline void
conn_acct(NbdConn *c, ssize_t delta)
{
    c->nbytes += (size_t)delta;
    c->srv->nbytes += (size_t)delta;
}

/* Request buffers.  Up to REQ_KEEP_BUF they come from the heap in
 * power-of-two sizes, so a buffer an idle request keeps fits the next
 * request of its class and the few classes cannot fragment the heap (a
 * mix of sizes did: the heap grew without bound under a soak test while
 * little of it was in use); larger ones are mapped and unmapped whole. */
static void *
buf_alloc(size_t *cap)
{
    if (*cap > REQ_KEEP_BUF) {
        *cap = (*cap + ALIGN - 1) & ~(size_t)(ALIGN - 1);
        void *p = mmap(NULL, *cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return p == MAP_FAILED ? NULL : p;
    }
    size_t c = ALIGN;
    while (c < *cap) {
        c *= 2;
    }
    *cap = c;
    void *p = NULL;
    return posix_memalign(&p, ALIGN, c) == 0 ? p : NULL;
}

static void
buf_free(void *p, size_t cap)
{
    if (!p) {
        return;
    }
    if (cap > REQ_KEEP_BUF) {
        munmap(p, cap);
    } else {
        free(p);
    }
}

static NbdReq *
req_new(NbdConn *c)
{
    VdkNbdServer *s = c->srv;
    NbdReq *r = s->cache;
    if (r) {
        s->cache = r->next;
        s->ncache--;
        s->cache_bytes -= r->buf_cap;
        void *buf = r->buf;
        size_t cap = r->buf_cap;
        memset(r, 0, sizeof(*r));
        r->buf = buf;
        r->buf_cap = cap;
    } else {
        r = g_new0(NbdReq, 1);
    }
    r->conn = c;
    c->nreqs++;
    conn_acct(c, (ssize_t)r->buf_cap);
    return r;
}

static void
req_free(NbdReq *r)
{
    NbdConn *c = r->conn;
    VdkNbdServer *s = c->srv;
    c->nreqs--;
    conn_acct(c, -(ssize_t)r->buf_cap);
    for (int i = 0; i < 2; i++) {
        g_free(r->ext[i]);
        conn_acct(c, -(ssize_t)((size_t)r->cap_ext[i] * sizeof(Extent)));
    }
    g_free(r->bs_payload);
    if (r->buf_cap > REQ_KEEP_BUF || s->cache_bytes + r->buf_cap > REQ_CACHE_BYTES) {
        buf_free(r->buf, r->buf_cap);
        r->buf = NULL;
        r->buf_cap = 0;
    }
    if (s->ncache < REQ_CACHE_MAX) {
        r->ext[0] = r->ext[1] = NULL;
        r->bs_payload = NULL;
        r->next = s->cache;
        s->cache = r;
        s->ncache++;
        s->cache_bytes += r->buf_cap;
    } else {
        buf_free(r->buf, r->buf_cap);
        g_free(r);
    }
}

/* A buffer of at least @len bytes, aligned for O_DIRECT. */
static bool
req_buf(NbdReq *r, size_t len)
{
    if (r->buf_cap >= len) {
        return true;
    }
    NbdConn *c = r->conn;
    size_t cap = len;
    void *p = buf_alloc(&cap);
    if (!p) {
        return false;
    }
    buf_free(r->buf, r->buf_cap);
    conn_acct(c, -(ssize_t)r->buf_cap);
    r->buf = p;
    r->buf_cap = cap;
    conn_acct(c, (ssize_t)cap);
    return true;
}

/* ------------------------------------------------------------------------ */
/* connections: output                                                       */

static void conn_close(NbdConn *c);

static void
out_push(NbdReq *r)
{
    NbdConn *c = r->conn;
    if (c->fd < 0) {
        req_free(r);
        return;
    }
    r->next = NULL;
    r->iov_idx = 0;
    r->iov_off = 0;
    if (c->out_tail) {
        c->out_tail->next = r;
    } else {
        c->out_head = r;
    }
    c->out_tail = r;
}

static void
reply_simple(NbdReq *r, int err)
{
    st32(r->hdr, NBD_SIMPLE_REPLY_MAGIC);
    st32(r->hdr + 4, (uint32_t)err);
    st64(r->hdr + 8, r->cookie);
    r->iov[0] = (struct iovec){r->hdr, 16};
    r->iovcnt = 1;
    if (err == 0 && r->type == NBD_CMD_READ && r->length > 0) {
        r->iov[1] = (struct iovec){r->buf, r->length};
        r->iovcnt = 2;
    }
    out_push(r);
}

static void
chunk_header(uint8_t *p, uint16_t flags, uint16_t type, uint64_t cookie, uint32_t len)
{
    st32(p, NBD_STRUCTURED_REPLY_MAGIC);
    st16(p + 4, flags);
    st16(p + 6, type);
    st64(p + 8, cookie);
    st32(p + 16, len);
}

static void
reply_ok(NbdReq *r)
{
    if (r->conn->structured && r->type == NBD_CMD_READ) {
        /* a structured reply is required for every read, even an empty one */
        chunk_header(r->hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, r->cookie, 0);
        r->iov[0] = (struct iovec){r->hdr, 20};
        r->iovcnt = 1;
        out_push(r);
        return;
    }
    reply_simple(r, 0);
}

static void
reply_error(NbdReq *r, int err, const char *fmt, ...) G_GNUC_PRINTF(3, 4);

static void
reply_error(NbdReq *r, int err, const char *fmt, ...)
{
    if (!r->conn->structured) {
        r->type = NBD_CMD_FLUSH; /* no payload follows a simple error reply */
        reply_simple(r, err);
        return;
    }
    char msg[160];
    va_list ap;
    va_start(ap, fmt);
    int n = g_vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    size_t mlen = n < 0 ? 0 : MIN((size_t)n, sizeof(r->hdr) - 26);
    chunk_header(r->hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, r->cookie, (uint32_t)(6 + mlen));
    st32(r->hdr + 20, (uint32_t)err);
    st16(r->hdr + 24, (uint16_t)mlen);
    memcpy(r->hdr + 26, msg, mlen);
    r->iov[0] = (struct iovec){r->hdr, 26 + mlen};
    r->iovcnt = 1;
    out_push(r);
}

static void
reply_read(NbdReq *r)
{
    if (!r->conn->structured) {
        reply_simple(r, 0);
        return;
    }
    chunk_header(r->hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, r->cookie, 8 + r->length);
    st64(r->hdr + 20, r->offset);
    r->iov[0] = (struct iovec){r->hdr, 28};
    r->iov[1] = (struct iovec){r->buf, r->length};
    r->iovcnt = 2;
    out_push(r);
}

static void
reply_block_status(NbdReq *r)
{
    NbdConn *c = r->conn;
    uint32_t ids[2] = {META_ID_BASE, META_ID_DEPTH};
    int nchunks = (c->meta[0] ? 1 : 0) + (c->meta[1] ? 1 : 0);
    size_t total = 0;
    for (int i = 0; i < 2; i++) {
        if (c->meta[i]) {
            total += 4 + (size_t)r->n_ext[i] * 8;
        }
    }
    r->bs_payload = g_try_malloc(total);
    if (!r->bs_payload) {
        reply_error(r, NBD_ENOMEM, "out of memory for the block status reply");
        return;
    }
    uint8_t *p = r->bs_payload;
    int k = 0;
    r->iovcnt = 0;
    for (int i = 0; i < 2; i++) {
        if (!c->meta[i]) {
            continue;
        }
        size_t plen = 4 + (size_t)r->n_ext[i] * 8;
        k++;
        chunk_header(r->hdr + 20 * (k - 1), k == nchunks ? NBD_REPLY_FLAG_DONE : 0, NBD_REPLY_TYPE_BLOCK_STATUS,
                     r->cookie, (uint32_t)plen);
        st32(p, ids[i]);
        for (uint32_t e = 0; e < r->n_ext[i]; e++) {
            st32(p + 4 + 8 * e, r->ext[i][e].len);
            st32(p + 8 + 8 * e, r->ext[i][e].flags);
        }
        r->iov[r->iovcnt++] = (struct iovec){r->hdr + 20 * (k - 1), 20};
        r->iov[r->iovcnt++] = (struct iovec){p, plen};
        p += plen;
    }
    out_push(r);
}

/* Send what can be sent without blocking; false if the connection was closed. */
static bool
conn_flush(NbdConn *c)
{
    if (c->fd < 0) {
        return false;
    }
    while (c->hs_off < c->hs_out->len) {
        ssize_t n = send(c->fd, c->hs_out->data + c->hs_off, c->hs_out->len - c->hs_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                return true;
            }
            conn_close(c);
            return false;
        }
        c->hs_off += (size_t)n;
    }
    if (c->hs_off > 0) {
        g_byte_array_set_size(c->hs_out, 0);
        c->hs_off = 0;
    }
    while (c->out_head) {
        struct iovec iov[IOV_MAX < 512 ? IOV_MAX : 512];
        int cnt = 0;
        for (NbdReq *r = c->out_head; r && cnt < (int)G_N_ELEMENTS(iov) - 4; r = r->next) {
            for (int i = r->iov_idx; i < r->iovcnt; i++) {
                size_t skip = i == r->iov_idx ? r->iov_off : 0;
                iov[cnt++] = (struct iovec){(uint8_t *)r->iov[i].iov_base + skip, r->iov[i].iov_len - skip};
            }
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t n = sendmsg(c->fd, &mh, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                return true;
            }
            conn_close(c);
            return false;
        }
        size_t left = (size_t)n;
        while (c->out_head) {
            NbdReq *r = c->out_head;
            while (r->iov_idx < r->iovcnt) {
                size_t rem = r->iov[r->iov_idx].iov_len - r->iov_off;
                if (left < rem) {
                    r->iov_off += left;
                    left = 0;
                    break;
                }
                left -= rem;
                r->iov_idx++;
                r->iov_off = 0;
            }
            if (r->iov_idx < r->iovcnt) {
                break;
            }
            c->out_head = r->next;
            if (!c->out_head) {
                c->out_tail = NULL;
            }
            req_free(r);
        }
        if (c->out_head) {
            return true; /* partial write: the socket buffer is full */
        }
    }
    return true;
}

/* ------------------------------------------------------------------------ */
/* issuing requests to the queue                                             */

static void req_fail_errno(NbdReq *r, int err);

static void
wait_push(VdkNbdServer *s, NbdReq *r)
{
    r->next = NULL;
    if (s->wait_tail) {
        s->wait_tail->next = r;
    } else {
        s->wait_head = r;
    }
    s->wait_tail = r;
}

static void
req_issue(NbdReq *r)
{
    VdkNbdServer *s = r->conn->srv;
    if (r->conn->fd < 0) {
        req_free(r);
        return;
    }
    if (s->queue_full) {
        wait_push(s, r); /* retried after the next reap */
        return;
    }
    uint64_t ud = (uint64_t)(uintptr_t)r;
    int ret;
    switch (r->op) {
    case OP_READ:
        ret = vdk_queue_read(s->q, r->io_offset, r->buf, (size_t)r->io_length, ud);
        break;
    case OP_WRITE:
        ret = vdk_queue_write(s->q, r->io_offset, r->buf, (size_t)r->io_length, r->vflags, ud);
        break;
    case OP_FLUSH:
        ret = vdk_queue_flush(s->q, ud);
        break;
    case OP_DISCARD:
        ret = vdk_queue_discard(s->q, r->io_offset, r->io_length, ud);
        break;
    case OP_ZERO:
        ret = vdk_queue_write_zeroes(s->q, r->io_offset, r->io_length, r->vflags, ud);
        break;
    case OP_BS:
        ret = vdk_queue_block_status(s->q, r->io_offset, r->io_length, &r->bs, ud);
        break;
    default:
        ret = -EINVAL;
        break;
    }
    if (ret == -EAGAIN) {
        s->queue_full = true;
        wait_push(s, r);
        return;
    }
    if (ret < 0) {
        req_fail_errno(r, -ret);
        return;
    }
    s->queued++;
}

static void
req_fail_errno(NbdReq *r, int err)
{
    reply_error(r, nbd_errno(err), "%s", g_strerror(err));
}

static bool
ext_add(NbdReq *r, int i, uint32_t len, uint32_t flags)
{
    if (r->n_ext[i] > 0 && r->ext[i][r->n_ext[i] - 1].flags == flags) {
        r->ext[i][r->n_ext[i] - 1].len += len; /* sums stay below the request's u32 length */
        return true;
    }
    if (r->n_ext[i] == r->cap_ext[i]) {
        uint32_t ncap = r->cap_ext[i] ? r->cap_ext[i] * 2 : 16;
        Extent *n = g_try_renew(Extent, r->ext[i], ncap);
        if (!n) {
            return false;
        }
        conn_acct(r->conn, (ssize_t)((size_t)(ncap - r->cap_ext[i]) * sizeof(Extent)));
        r->ext[i] = n;
        r->cap_ext[i] = ncap;
    }
    r->ext[i][r->n_ext[i]++] = (Extent){len, flags};
    return true;
}

static void
req_complete(NbdReq *r, int64_t result)
{
    NbdConn *c = r->conn;
    if (c->fd < 0) {
        req_free(r);
        return;
    }
    switch (r->type) {
    case NBD_CMD_READ:
        if (result < 0) {
            reply_error(r, nbd_errno((int)-result), "read failed at offset %" G_GUINT64_FORMAT ": %s",
                        r->offset, g_strerror((int)-result));
        } else {
            reply_read(r);
        }
        return;
    case NBD_CMD_TRIM:
        /* discard is advisory: a range that cannot be discarded is not an error */
        if (result < 0 && result != -ENOTSUP && result != -EOPNOTSUPP) {
            req_fail_errno(r, (int)-result);
            return;
        }
        if (r->flush_after) {
            r->flush_after = false;
            r->op = OP_FLUSH;
            req_issue(r);
            return;
        }
        reply_ok(r);
        return;
    case NBD_CMD_CACHE:
        /* a failed prefetch changes nothing for later reads (proto.md) but is reported */
        if (result < 0) {
            req_fail_errno(r, (int)-result);
        } else {
            reply_ok(r);
        }
        return;
    case NBD_CMD_BLOCK_STATUS: {
        if (result < 0) {
            req_fail_errno(r, (int)-result);
            return;
        }
        uint64_t len = r->bs.length;
        if (len == 0 || len > r->io_length) {
            reply_error(r, NBD_EIO, "block status returned a bad length");
            return;
        }
        uint32_t base = ((r->bs.flags & VDK_BS_DATA) ? 0 : NBD_STATE_HOLE) |
                        ((r->bs.flags & VDK_BS_ZERO) ? NBD_STATE_ZERO : 0);
        uint32_t depth = (r->bs.flags & VDK_BS_ALLOCATED) ? (uint32_t)r->bs.depth + 1 : 0;
        if (!ext_add(r, 0, (uint32_t)len, base) || !ext_add(r, 1, (uint32_t)len, depth)) {
            reply_error(r, NBD_ENOMEM, "out of memory for block status extents");
            return;
        }
        r->io_offset += len;
        r->io_length -= len;
        r->bs_steps++;
        if (r->io_length > 0 && !(r->flags & NBD_CMD_FLAG_REQ_ONE) && r->bs_steps < BS_MAX_STEPS) {
            req_issue(r);
            return;
        }
        reply_block_status(r);
        return;
    }
    default:
        if (result < 0) {
            req_fail_errno(r, (int)-result);
        } else {
            reply_ok(r);
        }
        return;
    }
}

/* ------------------------------------------------------------------------ */
/* transmission phase: one request header                                    */

static const char *
cmd_name(uint16_t type)
{
    static const char *const names[] = {"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES",
                                        "BLOCK_STATUS"};
    return type < G_N_ELEMENTS(names) ? names[type] : "unknown";
}

/* Parse and start the request in @h (28 bytes).  False: close the connection. */
static bool
handle_request(NbdConn *c, const uint8_t *h)
{
    VdkNbdServer *s = c->srv;
    if (ld32(h) != NBD_REQUEST_MAGIC) {
        return false; /* the stream cannot be resynchronised */
    }
    uint16_t flags = ld16(h + 4);
    uint16_t type = ld16(h + 6);
    uint64_t cookie = ld64(h + 8);
    uint64_t offset = ld64(h + 16);
    uint32_t length = ld32(h + 24);

    if (type == NBD_CMD_DISC) {
        c->eof = true; /* finish what is in flight, then close */
        return true;
    }
    NbdReq *r = req_new(c);
    r->cookie = cookie;
    r->offset = offset;
    r->length = length;
    r->type = type;
    r->flags = flags;
    bool has_payload = type == NBD_CMD_WRITE;

    /* errors that still let a write's payload be read and dropped */
    int err = 0;
    char why[128] = "";
    uint16_t allowed = NBD_CMD_FLAG_FUA;
    switch (type) {
    case NBD_CMD_READ:
        if (c->structured) {
            allowed |= NBD_CMD_FLAG_DF;
        }
        break;
    case NBD_CMD_WRITE_ZEROES:
        allowed |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
        break;
    case NBD_CMD_BLOCK_STATUS:
        allowed |= NBD_CMD_FLAG_REQ_ONE;
        break;
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE:
        break;
    default:
        err = NBD_EINVAL;
        g_snprintf(why, sizeof(why), "unknown command %u", type);
        break;
    }
    bool is_write = type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES || type == NBD_CMD_TRIM;
    if (!err && (flags & ~allowed)) {
        err = NBD_EINVAL;
        g_snprintf(why, sizeof(why), "flags 0x%x not valid for %s", flags & ~allowed, cmd_name(type));
    }
    if (!err && (type == NBD_CMD_READ || type == NBD_CMD_WRITE) && length > NBD_MAX_PAYLOAD) {
        err = NBD_EINVAL;
        g_snprintf(why, sizeof(why), "%s length %u exceeds the maximum payload %u", cmd_name(type), length,
                   NBD_MAX_PAYLOAD);
    }
    if (!err && type != NBD_CMD_FLUSH && (offset > s->size || length > s->size - offset)) {
        err = (type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES) ? NBD_ENOSPC : NBD_EINVAL;
        g_snprintf(why, sizeof(why), "range %" G_GUINT64_FORMAT "+%u is beyond the export size %" G_GUINT64_FORMAT,
                   offset, length, s->size);
    }
    if (!err && is_write && s->read_only) {
        err = NBD_EPERM;
        g_snprintf(why, sizeof(why), "the export is read-only");
    }
    if (!err && type == NBD_CMD_BLOCK_STATUS && (!c->structured || (!c->meta[0] && !c->meta[1]))) {
        err = NBD_EINVAL;
        g_snprintf(why, sizeof(why), "no metadata context was negotiated");
    }
    if (!err && type == NBD_CMD_BLOCK_STATUS && length == 0) {
        err = NBD_EINVAL;
        g_snprintf(why, sizeof(why), "block status of an empty range");
    }
    if (!err && has_payload && !req_buf(r, MAX(length, 1u))) {
        err = NBD_ENOMEM;
        g_snprintf(why, sizeof(why), "out of memory for a %u byte write", length);
    }
    if (err) {
        reply_error(r, err, "%s", why);
        if (has_payload) {
            c->discard_left = length;
            c->discard_is_option = false;
        }
        return true;
    }

    r->io_offset = offset;
    r->io_length = length;
    switch (type) {
    case NBD_CMD_READ:
        if (length == 0) {
            reply_ok(r);
            return true;
        }
        if (!req_buf(r, length)) {
            reply_error(r, NBD_ENOMEM, "out of memory for a %u byte read", length);
            return true;
        }
        r->op = OP_READ;
        break;
    case NBD_CMD_WRITE:
        r->op = OP_WRITE;
        r->vflags = (flags & NBD_CMD_FLAG_FUA) ? VDK_REQ_FUA : 0;
        if (length == 0) {
            reply_ok(r);
            return true;
        }
        c->rx_req = r;
        c->rx_got = 0;
        return true; /* issued once the payload is in */
    case NBD_CMD_FLUSH:
        r->op = OP_FLUSH;
        break;
    case NBD_CMD_TRIM:
        if (length == 0) {
            reply_ok(r);
            return true;
        }
        r->op = OP_DISCARD;
        r->flush_after = (flags & NBD_CMD_FLAG_FUA) != 0;
        break;
    case NBD_CMD_WRITE_ZEROES:
        if (length == 0) {
            reply_ok(r);
            return true;
        }
        r->op = OP_ZERO;
        r->vflags = ((flags & NBD_CMD_FLAG_FUA) ? VDK_REQ_FUA : 0) |
                    ((flags & NBD_CMD_FLAG_NO_HOLE) ? 0 : VDK_REQ_MAY_UNMAP) |
                    ((flags & NBD_CMD_FLAG_FAST_ZERO) ? VDK_REQ_NO_FALLBACK : 0);
        break;
    case NBD_CMD_CACHE:
        /* prefetch by reading (into the page cache, where the cache mode
         * has one); at most one payload's worth */
        if (length == 0) {
            reply_ok(r);
            return true;
        }
        r->io_length = MIN(length, NBD_MAX_PAYLOAD);
        if (!req_buf(r, (size_t)r->io_length)) {
            reply_error(r, NBD_ENOMEM, "out of memory for a %u byte cache request", length);
            return true;
        }
        r->op = OP_READ;
        break;
    case NBD_CMD_BLOCK_STATUS:
        r->op = OP_BS;
        break;
    }
    req_issue(r);
    return true;
}

/* ------------------------------------------------------------------------ */
/* handshake                                                                 */

static void
opt_reply(NbdConn *c, uint32_t opt, uint32_t type, const void *data, size_t len)
{
    ba_put64(c->hs_out, NBD_REP_MAGIC);
    ba_put32(c->hs_out, opt);
    ba_put32(c->hs_out, type);
    ba_put32(c->hs_out, (uint32_t)len);
    if (len) {
        g_byte_array_append(c->hs_out, data, (guint)len);
    }
}

static void
opt_error(NbdConn *c, uint32_t opt, uint32_t type, const char *fmt, ...) G_GNUC_PRINTF(4, 5);

static void
opt_error(NbdConn *c, uint32_t opt, uint32_t type, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    opt_reply(c, opt, type, msg, MIN(strlen(msg), (size_t)NBD_MAX_STRING));
    g_free(msg);
}

static uint16_t
conn_tflags(NbdConn *c)
{
    return (uint16_t)(c->srv->tflags | (c->structured ? NBD_FLAG_SEND_DF : 0));
}

static bool
name_matches(VdkNbdServer *s, const uint8_t *name, uint32_t len)
{
    return len == strlen(s->export_name) && memcmp(name, s->export_name, len) == 0;
}

static void
opt_info_go(NbdConn *c, uint32_t opt, const uint8_t *d, uint32_t len)
{
    VdkNbdServer *s = c->srv;
    if (len < 6) {
        opt_error(c, opt, NBD_REP_ERR_INVALID, "option data too short (%u bytes)", len);
        return;
    }
    uint32_t nlen = ld32(d);
    if (nlen > len - 6) {
        opt_error(c, opt, NBD_REP_ERR_INVALID, "export name length %u exceeds the option data", nlen);
        return;
    }
    uint16_t nreq = ld16(d + 4 + nlen);
    if ((uint64_t)4 + nlen + 2 + 2 * (uint64_t)nreq != len) {
        opt_error(c, opt, NBD_REP_ERR_INVALID, "%u information requests do not match the option length %u", nreq,
                  len);
        return;
    }
    if (!name_matches(s, d + 4, nlen)) {
        opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%.*s' not found", (int)MIN(nlen, 256u), d + 4);
        return;
    }
    if (s->stopping) {
        opt_error(c, opt, NBD_REP_ERR_SHUTDOWN, "server shutting down");
        return;
    }
    uint8_t info[14];
    st16(info, NBD_INFO_EXPORT);
    st64(info + 2, s->size);
    st16(info + 10, conn_tflags(c));
    opt_reply(c, opt, NBD_REP_INFO, info, 12);
    /* block sizes are always sent: min 1 (the block layer handles any
     * alignment), preferred 4 KiB, max payload 32 MiB */
    st16(info, NBD_INFO_BLOCK_SIZE);
    st32(info + 2, 1);
    st32(info + 6, 4096);
    st32(info + 10, NBD_MAX_PAYLOAD);
    opt_reply(c, opt, NBD_REP_INFO, info, 14);
    for (uint16_t i = 0; i < nreq; i++) {
        uint16_t what = ld16(d + 4 + nlen + 2 + 2 * i);
        if (what == NBD_INFO_NAME || (what == NBD_INFO_DESCRIPTION && s->description)) {
            const char *str = what == NBD_INFO_NAME ? s->export_name : s->description;
            size_t sl = MIN(strlen(str), (size_t)NBD_MAX_STRING);
            GByteArray *b = g_byte_array_sized_new((guint)(2 + sl));
            ba_put16(b, what);
            g_byte_array_append(b, (const guint8 *)str, (guint)sl);
            opt_reply(c, opt, NBD_REP_INFO, b->data, b->len);
            g_byte_array_free(b, TRUE);
        }
    }
    opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
    if (opt == NBD_OPT_GO) {
        c->phase = PH_TRANS;
    }
}

/* LIST_META_CONTEXT / SET_META_CONTEXT. */
static void
opt_meta(NbdConn *c, uint32_t opt, const uint8_t *d, uint32_t len)
{
    VdkNbdServer *s = c->srv;
    bool set = opt == NBD_OPT_SET_META_CONTEXT;
    if (set) {
        c->meta[0] = c->meta[1] = false; /* replaced even when the option fails */
    }
    if (!c->structured) {
        opt_error(c, opt, NBD_REP_ERR_INVALID, "structured replies were not negotiated");
        return;
    }
    /* syntax first: every length must fit */
    if (len < 8) {
        opt_error(c, opt, NBD_REP_ERR_INVALID, "option data too short (%u bytes)", len);
        return;
    }
    uint32_t nlen = ld32(d);
    if (nlen > len - 8) {
        opt_error(c, opt, NBD_REP_ERR_INVALID, "export name length %u exceeds the option data", nlen);
        return;
    }
    uint32_t nq = ld32(d + 4 + nlen);
    uint64_t pos = 8 + (uint64_t)nlen;
    for (uint32_t i = 0; i < nq; i++) {
        if (len - pos < 4) {
            opt_error(c, opt, NBD_REP_ERR_INVALID, "query %u of %u lies beyond the option data", i, nq);
            return;
        }
        uint32_t ql = ld32(d + pos);
        if (ql > len - pos - 4) {
            opt_error(c, opt, NBD_REP_ERR_INVALID, "query length %u exceeds the option data", ql);
            return;
        }
        if (ql > NBD_MAX_STRING) {
            opt_error(c, opt, NBD_REP_ERR_TOO_BIG, "query length %u exceeds %u", ql, NBD_MAX_STRING);
            return;
        }
        pos += 4 + (uint64_t)ql;
    }
    if (pos != len) {
        opt_error(c, opt, NBD_REP_ERR_INVALID, "%" G_GUINT64_FORMAT " trailing bytes after the queries",
                  (uint64_t)len - pos);
        return;
    }
    if (!name_matches(s, d + 4, nlen)) {
        opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "export '%.*s' not found", (int)MIN(nlen, 256u), d + 4);
        return;
    }
    static const char *const names[2] = {"base:allocation", "qemu:allocation-depth"};
    bool sel[2] = {nq == 0 && !set, nq == 0 && !set};
    pos = 8 + (uint64_t)nlen;
    for (uint32_t i = 0; i < nq; i++) {
        uint32_t ql = ld32(d + pos);
        const char *q = (const char *)d + pos + 4;
        pos += 4 + (uint64_t)ql;
        for (int k = 0; k < 2; k++) {
            size_t full = strlen(names[k]);
            size_t ns = (size_t)(strchr(names[k], ':') - names[k]) + 1;
            if (ql == full && !memcmp(q, names[k], full)) {
                sel[k] = true;
            } else if (!set && ql == ns && !memcmp(q, names[k], ns)) {
                sel[k] = true; /* "base:" and "qemu:" list their namespace */
            }
        }
    }
    for (int k = 0; k < 2; k++) {
        if (!sel[k]) {
            continue;
        }
        size_t nl = strlen(names[k]);
        uint8_t buf[64];
        st32(buf, k == 0 ? META_ID_BASE : META_ID_DEPTH);
        memcpy(buf + 4, names[k], nl);
        opt_reply(c, opt, NBD_REP_META_CONTEXT, buf, 4 + nl);
        if (set) {
            c->meta[k] = true;
        }
    }
    opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
}

/* One complete option.  False: close the connection. */
static bool
handle_option(NbdConn *c, uint32_t opt, const uint8_t *d, uint32_t len)
{
    VdkNbdServer *s = c->srv;
    switch (opt) {
    case NBD_OPT_EXPORT_NAME: {
        if (!name_matches(s, d, len) || s->stopping) {
            return false; /* this option has no way to report an error */
        }
        ba_put64(c->hs_out, s->size);
        ba_put16(c->hs_out, conn_tflags(c));
        if (!c->no_zeroes) {
            static const uint8_t zeroes[124];
            g_byte_array_append(c->hs_out, zeroes, sizeof(zeroes));
        }
        c->phase = PH_TRANS;
        return true;
    }
    case NBD_OPT_ABORT:
        opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
        c->phase = PH_CLOSING;
        return true;
    case NBD_OPT_LIST: {
        if (len != 0) {
            opt_error(c, opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
            return true;
        }
        size_t nl = strlen(s->export_name);
        size_t dl = s->description ? MIN(strlen(s->description), (size_t)NBD_MAX_STRING) : 0;
        GByteArray *b = g_byte_array_sized_new((guint)(4 + nl + dl));
        ba_put32(b, (uint32_t)nl);
        g_byte_array_append(b, (const guint8 *)s->export_name, (guint)nl);
        if (dl) {
            g_byte_array_append(b, (const guint8 *)s->description, (guint)dl);
        }
        opt_reply(c, opt, NBD_REP_SERVER, b->data, b->len);
        g_byte_array_free(b, TRUE);
        opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
        return true;
    }
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
        opt_info_go(c, opt, d, len);
        return true;
    case NBD_OPT_STRUCTURED_REPLY:
        if (len != 0) {
            opt_error(c, opt, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
            return true;
        }
        c->structured = true;
        opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
        return true;
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
        opt_meta(c, opt, d, len);
        return true;
    case NBD_OPT_STARTTLS:
        opt_error(c, opt, NBD_REP_ERR_UNSUP, "TLS is not supported");
        return true;
    default:
        opt_error(c, opt, NBD_REP_ERR_UNSUP, "option %u is not supported", opt);
        return true;
    }
}

/* ------------------------------------------------------------------------ */
/* input                                                                     */

static bool
conn_can_parse(NbdConn *c)
{
    switch (c->phase) {
    case PH_CLIENT_FLAGS:
    case PH_OPTIONS:
        return c->hs_out->len - c->hs_off < CONN_MAX_HS_OUT;
    case PH_TRANS:
        return !c->eof && c->nreqs < CONN_MAX_REQS && c->nbytes < CONN_MAX_BYTES &&
               c->srv->nbytes < SERVER_MAX_BYTES;
    default:
        return false;
    }
}

static bool
conn_wants_read(NbdConn *c)
{
    if (c->fd < 0 || c->eof || c->phase == PH_CLOSING) {
        return false;
    }
    return c->rx_req || c->discard_left || conn_can_parse(c);
}

/* Consume what the input buffer holds.  Stops when more bytes are needed,
 * the connection may not take more, or it was closed. */
static void
conn_process(NbdConn *c)
{
    while (c->fd >= 0) {
        size_t avail = c->in_end - c->in_start;
        const uint8_t *p = c->in + c->in_start;
        if (c->discard_left) {
            size_t n = (size_t)MIN((uint64_t)avail, c->discard_left);
            c->in_start += n;
            c->discard_left -= n;
            if (c->discard_left) {
                break;
            }
            if (c->discard_is_option) {
                if (c->discard_opt == NBD_OPT_EXPORT_NAME) {
                    conn_close(c);
                    break;
                }
                opt_error(c, c->discard_opt, NBD_REP_ERR_TOO_BIG, "option data longer than %u bytes",
                          NBD_MAX_OPTION);
            }
            continue;
        }
        if (c->rx_req) {
            NbdReq *r = c->rx_req;
            size_t n = MIN(avail, (size_t)r->length - c->rx_got);
            memcpy((uint8_t *)r->buf + c->rx_got, p, n);
            c->rx_got += n;
            c->in_start += n;
            if (c->rx_got < r->length) {
                break;
            }
            c->rx_req = NULL;
            req_issue(r);
            continue;
        }
        if (!conn_can_parse(c)) {
            break;
        }
        if (c->phase == PH_CLIENT_FLAGS) {
            if (avail < 4) {
                break;
            }
            uint32_t cf = ld32(p);
            c->in_start += 4;
            if (cf & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
                conn_close(c); /* the spec: unknown client flags drop the connection */
                break;
            }
            c->no_zeroes = (cf & NBD_FLAG_C_NO_ZEROES) != 0;
            c->phase = PH_OPTIONS;
        } else if (c->phase == PH_OPTIONS) {
            if (avail < 16) {
                break;
            }
            if (ld64(p) != NBD_OPTS_MAGIC) {
                conn_close(c);
                break;
            }
            uint32_t opt = ld32(p + 8);
            uint32_t len = ld32(p + 12);
            if (len > NBD_MAX_OPTION) {
                c->in_start += 16;
                c->discard_left = len;
                c->discard_is_option = true;
                c->discard_opt = opt;
                continue;
            }
            if (avail < 16 + (size_t)len) {
                break;
            }
            c->in_start += 16 + (size_t)len;
            if (!handle_option(c, opt, p + 16, len)) {
                conn_close(c);
                break;
            }
        } else {
            if (avail < 28) {
                break;
            }
            c->in_start += 28;
            if (!handle_request(c, p)) {
                conn_close(c);
                break;
            }
        }
    }
    if (c->in_start == c->in_end) {
        c->in_start = c->in_end = 0;
    }
}

static void
conn_on_readable(NbdConn *c)
{
    /* bounded work per wakeup; level-triggered epoll brings us back */
    for (int i = 0; i < 16 && conn_wants_read(c); i++) {
        ssize_t n;
        NbdReq *r = c->rx_req;
        if (r && c->in_start == c->in_end && r->length - c->rx_got >= CONN_DIRECT_RECV) {
            /* a large payload goes straight into its buffer */
            n = recv(c->fd, (uint8_t *)r->buf + c->rx_got, r->length - c->rx_got, 0);
            if (n > 0) {
                c->rx_got += (size_t)n;
                if (c->rx_got == r->length) {
                    c->rx_req = NULL;
                    req_issue(r);
                }
                continue;
            }
        } else {
            if (c->in_start > 0 && (c->in_end == CONN_INBUF || c->in_start > CONN_INBUF / 2)) {
                memmove(c->in, c->in + c->in_start, c->in_end - c->in_start);
                c->in_end -= c->in_start;
                c->in_start = 0;
            }
            if (c->in_end == CONN_INBUF) {
                break; /* full of requests we may not take yet */
            }
            size_t room = CONN_INBUF - c->in_end;
            n = recv(c->fd, c->in + c->in_end, room, 0);
            if (n > 0) {
                c->in_end += (size_t)n;
                conn_process(c);
                if ((size_t)n < room) {
                    break; /* drained: save the recv that would say EAGAIN */
                }
                continue;
            }
        }
        if (n == 0) {
            /* the client is done sending: a partial request is dropped;
             * in transmission, what is in flight still gets its reply */
            if (c->rx_req) {
                req_free(c->rx_req);
                c->rx_req = NULL;
            }
            if (c->phase == PH_TRANS) {
                c->eof = true;
            } else {
                conn_close(c);
            }
            break;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            conn_close(c);
        }
        break;
    }
}

/* ------------------------------------------------------------------------ */
/* connection lifetime                                                       */

static void
server_update_accepting(VdkNbdServer *s)
{
    bool want = !s->stopping && (s->max_clients == 0 || s->nclients < s->max_clients);
    if (want == s->accepting) {
        return;
    }
    for (guint i = 0; i < s->listeners->len; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_LISTEN + i};
        epoll_ctl(s->epfd, want ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, g_array_index(s->listeners, int, i), &ev);
    }
    s->accepting = want;
}

/* Hard close: the socket goes now; requests in the engine finish and are
 * freed as they complete; the struct goes once none is left. */
static void
conn_close(NbdConn *c)
{
    if (c->fd < 0) {
        return;
    }
    VdkNbdServer *s = c->srv;
    epoll_ctl(s->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    while (c->out_head) {
        NbdReq *r = c->out_head;
        c->out_head = r->next;
        req_free(r);
    }
    c->out_tail = NULL;
    if (c->rx_req) {
        req_free(c->rx_req);
        c->rx_req = NULL;
    }
    /* nothing more is read: the input buffer goes now, not when the last
     * of the connection's requests leaves the queue */
    buf_free(c->in, CONN_INBUF);
    c->in = NULL;
    c->in_start = c->in_end = 0;
    s->nclients--;
    if (s->nclients == 0 && !s->persistent && s->had_client) {
        s->stopping = true;
    }
    server_update_accepting(s);
}

static void
conn_destroy(NbdConn *c)
{
    VdkNbdServer *s = c->srv;
    if (c->prev) {
        c->prev->next = c->next;
    } else {
        s->conns = c->next;
    }
    if (c->next) {
        c->next->prev = c->prev;
    }
    g_byte_array_free(c->hs_out, TRUE);
    buf_free(c->in, CONN_INBUF);
    g_free(c);
}

/* Take @fd (a connected, non-blocking socket) as a new client: it gets
 * the greeting and is watched by the loop.  False (fd closed) on failure. */
static bool
server_adopt(VdkNbdServer *s, int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)); /* fails harmlessly on unix sockets */
    NbdConn *c = g_new0(NbdConn, 1);
    c->srv = s;
    c->fd = fd;
    c->phase = PH_CLIENT_FLAGS;
    size_t in_cap = CONN_INBUF;
    c->in = buf_alloc(&in_cap); /* mapped: see buf_alloc */
    if (!c->in) {
        g_warning("nbd: out of memory for a connection");
        close(fd);
        g_free(c);
        return false;
    }
    c->hs_out = g_byte_array_new();
    c->start_us = g_get_monotonic_time();
    ba_put64(c->hs_out, NBD_MAGIC);
    ba_put64(c->hs_out, NBD_OPTS_MAGIC);
    ba_put16(c->hs_out, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    c->ep_events = EPOLLIN;
    struct epoll_event ev = {.events = c->ep_events, .data.ptr = c};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        g_warning("nbd: epoll_ctl failed: %s", g_strerror(errno));
        close(fd);
        g_byte_array_free(c->hs_out, TRUE);
        buf_free(c->in, CONN_INBUF);
        g_free(c);
        return false;
    }
    c->next = s->conns;
    if (s->conns) {
        s->conns->prev = c;
    }
    s->conns = c;
    s->nclients++;
    s->had_client = true;
    server_update_accepting(s);
    return true;
}

static void
server_accept(VdkNbdServer *s, int lfd)
{
    while (s->accepting) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                g_warning("nbd: accept failed: %s", g_strerror(errno));
            }
            return;
        }
        server_adopt(s, fd);
    }
}

/* After every loop turn: send, close what is finished, set epoll interest. */
static void
server_sweep(VdkNbdServer *s)
{
    int64_t now = -1;
    for (NbdConn *c = s->conns, *next; c; c = next) {
        next = c->next;
        if (c->fd >= 0) {
            conn_flush(c);
        }
        if (c->fd >= 0 && c->phase != PH_TRANS) {
            if (now < 0) {
                now = g_get_monotonic_time();
            }
            if (now - c->start_us > HANDSHAKE_TIMEOUT_US) {
                conn_close(c); /* a client that never finishes the handshake holds no slot */
            }
        }
        if (c->fd >= 0 && s->stopping) {
            conn_close(c);
        }
        if (c->fd >= 0) {
            bool out_pending = c->out_head || c->hs_off < c->hs_out->len;
            if ((c->eof || c->phase == PH_CLOSING) && !out_pending && c->nreqs == 0 && !c->rx_req) {
                conn_close(c); /* soft disconnect: everything answered */
            } else if (c->phase == PH_TRANS && c->in_start < c->in_end && conn_can_parse(c)) {
                conn_process(c); /* requests held back by the limits */
            }
        }
        if (c->fd >= 0) {
            uint32_t want = (conn_wants_read(c) ? EPOLLIN : 0) |
                            ((c->out_head || c->hs_off < c->hs_out->len) ? EPOLLOUT : 0);
            if (want != c->ep_events) {
                struct epoll_event ev = {.events = want, .data.ptr = c};
                if (epoll_ctl(s->epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0) {
                    c->ep_events = want;
                } else {
                    conn_close(c);
                }
            }
        }
        if (c->fd < 0 && c->nreqs == 0) {
            conn_destroy(c);
        }
    }
}

static void
server_reap(VdkNbdServer *s)
{
    VdkCompletion comp[256];
    int n;
    do {
        n = vdk_queue_reap(s->q, comp, G_N_ELEMENTS(comp));
        if (n > 0) {
            s->queue_full = false;
        }
        for (int i = 0; i < n; i++) {
            req_complete((NbdReq *)(uintptr_t)comp[i].user_data, comp[i].result);
        }
        while (s->wait_head && !s->queue_full) {
            NbdReq *r = s->wait_head;
            s->wait_head = r->next;
            if (!s->wait_head) {
                s->wait_tail = NULL;
            }
            req_issue(r);
        }
    } while (n == (int)G_N_ELEMENTS(comp)); /* a short harvest emptied the queue */
}

/* ------------------------------------------------------------------------ */
/* public                                                                    */

VdkNbdServer *
vdk_nbd_server_new(VdkImage *img, const VdkNbdServerConfig *cfg, GError **error)
{
    VdkNbdServer *s = g_new0(VdkNbdServer, 1);
    s->img = img;
    s->size = vdk_image_get_size(img);
    s->read_only = vdk_image_is_read_only(img);
    s->export_name = g_strdup(cfg->export_name ? cfg->export_name : "");
    s->description = g_strdup(cfg->description);
    s->max_clients = cfg->max_clients;
    s->persistent = cfg->persistent;
    s->stop_fd = cfg->stop_fd;
    s->listeners = g_array_new(FALSE, FALSE, sizeof(int));
    s->epfd = -1;
    if (strlen(s->export_name) > NBD_MAX_STRING) {
        g_set_error(error, VDK_ERROR, EINVAL, "nbd: export name longer than %u bytes", NBD_MAX_STRING);
        goto fail;
    }
    s->tflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;
    if (s->read_only) {
        s->tflags |= NBD_FLAG_READ_ONLY;
    } else {
        s->tflags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    }
    if (s->max_clients != 1) {
        s->tflags |= NBD_FLAG_CAN_MULTI_CONN;
    }
    s->q = vdk_queue_new(img, SERVER_QUEUE_DEPTH, error);
    if (!s->q) {
        goto fail;
    }
    s->qfd = vdk_queue_get_fd(s->q);
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (s->epfd < 0) {
        g_set_error(error, VDK_ERROR, errno, "nbd: epoll_create1: %s", g_strerror(errno));
        goto fail;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_QUEUE};
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->qfd, &ev) < 0) {
        g_set_error(error, VDK_ERROR, errno, "nbd: epoll_ctl: %s", g_strerror(errno));
        goto fail;
    }
    if (s->stop_fd >= 0) {
        ev = (struct epoll_event){.events = EPOLLIN, .data.u64 = TAG_STOP};
        if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->stop_fd, &ev) < 0) {
            g_set_error(error, VDK_ERROR, errno, "nbd: epoll_ctl: %s", g_strerror(errno));
            goto fail;
        }
    }
    return s;
fail:
    vdk_nbd_server_free(s);
    return NULL;
}

bool
vdk_nbd_server_add_listener(VdkNbdServer *s, int fd, GError **error)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        g_set_error(error, VDK_ERROR, errno, "nbd: cannot make the listening socket non-blocking: %s",
                    g_strerror(errno));
        close(fd);
        return false;
    }
    if (s->accepting) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_LISTEN + s->listeners->len};
        if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            g_set_error(error, VDK_ERROR, errno, "nbd: epoll_ctl: %s", g_strerror(errno));
            close(fd);
            return false;
        }
    }
    g_array_append_val(s->listeners, fd);
    server_update_accepting(s);
    return true;
}

bool
vdk_nbd_server_add_client(VdkNbdServer *s, int fd, GError **error)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        g_set_error(error, VDK_ERROR, errno, "nbd: cannot make the client socket non-blocking: %s",
                    g_strerror(errno));
        close(fd);
        return false;
    }
    if (!server_adopt(s, fd)) {
        g_set_error(error, VDK_ERROR, EIO, "nbd: cannot watch the client socket");
        return false;
    }
    return true;
}

bool
vdk_nbd_server_run(VdkNbdServer *s, GError **error)
{
    server_update_accepting(s);
    struct epoll_event evs[64];
    for (;;) {
        if (s->stopping && !s->conns && vdk_queue_pending(s->q) == 0) {
            break;
        }
        bool handshaking = false;
        for (NbdConn *c = s->conns; c; c = c->next) {
            handshaking |= c->fd >= 0 && c->phase != PH_TRANS;
        }
        int n = epoll_wait(s->epfd, evs, G_N_ELEMENTS(evs), handshaking || s->stopping ? 1000 : -1);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            g_set_error(error, VDK_ERROR, errno, "nbd: epoll_wait: %s", g_strerror(errno));
            return false;
        }
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            if (tag == TAG_QUEUE) {
                server_reap(s);
            } else if (tag == TAG_STOP) {
                s->stopping = true;
                server_update_accepting(s);
                /* leave the fd readable for the caller; stop watching it */
                epoll_ctl(s->epfd, EPOLL_CTL_DEL, s->stop_fd, NULL);
            } else if (tag >= TAG_LISTEN && tag < TAG_LISTEN + s->listeners->len) {
                server_accept(s, g_array_index(s->listeners, int, tag - TAG_LISTEN));
            } else {
                NbdConn *c = evs[i].data.ptr;
                /* a connection closed earlier in this batch is still in the
                 * list (destroyed only by the sweep), so the pointer is valid */
                if (c->fd >= 0 && (evs[i].events & EPOLLOUT)) {
                    conn_flush(c);
                }
                if (c->fd >= 0 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
                    if (conn_wants_read(c)) {
                        conn_on_readable(c);
                    } else if (evs[i].events & (EPOLLHUP | EPOLLERR)) {
                        conn_close(c);
                    }
                }
            }
        }
        if (s->queued) {
            int r = vdk_queue_submit(s->q);
            if (r < 0) {
                g_warning("nbd: submitting requests failed: %s", g_strerror(-r));
            }
            s->queued = 0;
        }
        server_sweep(s);
        if (s->queued) {
            vdk_queue_submit(s->q);
            s->queued = 0;
        }
    }
    return true;
}

void
vdk_nbd_server_free(VdkNbdServer *s)
{
    if (!s) {
        return;
    }
    for (NbdConn *c = s->conns; c; c = c->next) {
        if (c->fd >= 0) {
            close(c->fd);
            c->fd = -1;
        }
    }
    if (s->q) {
        vdk_queue_free(s->q); /* waits for what is in flight */
    }
    while (s->conns) {
        NbdConn *c = s->conns;
        s->conns = c->next;
        g_byte_array_free(c->hs_out, TRUE);
        buf_free(c->in, CONN_INBUF);
        g_free(c);
    }
    /* requests of freed connections are gone with the queue; the cache holds
     * only idle ones */
    while (s->cache) {
        NbdReq *r = s->cache;
        s->cache = r->next;
        buf_free(r->buf, r->buf_cap);
        g_free(r);
    }
    for (guint i = 0; i < s->listeners->len; i++) {
        close(g_array_index(s->listeners, int, i));
    }
    g_array_free(s->listeners, TRUE);
    if (s->epfd >= 0) {
        close(s->epfd);
    }
    g_free(s->export_name);
    g_free(s->description);
    g_free(s);
}
