// The load client in C: what bench/load.ts does, at a fraction of its CPU, so
// that the servers and not the client are the limit. bench/run.ts compiles it
// (cc -O2) and falls back to load.ts when there is no C compiler.
//
//   cc -O2 -o etcp-load bench/load.c
//   cc -O2 -DETCP_TLS -o etcp-load-tls bench/load.c -lssl -lcrypto
//   ./etcp-load --port P [--host 127.0.0.1] [--connections 50] [--size 64]
//     [--depth 1] [--duration 5] [--warmup 1] [--mode echo|accept]
//     [--server-pid PID] [--tls --ca FILE]
//
// Same flags, same frames (bench/_frames.ts: 4-byte big-endian length, then a
// payload that starts with the frame's sequence number and goes on with a
// 256-periodic pattern from an offset the sequence number picks) and the same
// one JSON line as load.ts: see there for the fields. One thread, one epoll
// loop, non-blocking sockets with TCP_NODELAY.
//
// echo: each connection keeps `depth` frames in flight; every echoed frame is
// checked (length, sequence number, content: a mismatch counts as `corrupt`
// and ends the connection), and the frames that one read's echoes release go
// out in one write (a writev from the pattern table for payloads of 4 KiB and
// more, so bulk runs copy no payload in user space). accept: `connections` loops of non-blocking connect → one
// frame → its echo → close. Only what completes in the measured window counts.
// The process always exits within warmup + duration + 5 s.
//
// --tls (only when built with -DETCP_TLS and OpenSSL): every connection speaks
// TLS (OpenSSL, non-blocking, read-ahead), verified against the CA in --ca and
// --host as the server name (an IP address is checked against the
// certificate's IP SANs). Echo mode only; handshakes finish before the warmup
// starts. Frames go through SSL_write from one buffer (no writev: bulk frames
// are copied once from the pattern table, as the server has to encrypt them
// anyway) into a memory BIO, so that the records of one send go out in one
// write; reads use an 80 KiB read-ahead buffer and go on while OpenSSL holds
// buffered records. Deno's TLS servers cannot turn Nagle off and hold the tail
// of a big echo until its head is ACKed: a connection with part of an echo
// received sets TCP_QUICKACK, or Linux's delayed ACK would stall it by 40 ms.

#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#ifdef ETCP_TLS
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#endif

#define HEADER 4
#define MIN_SIZE 4
#define GRACE_S 5.0
#define MAX_EVENTS 512
#define MAX_ERRORS_SHOWN 5
// Echo frames from this payload size on are written with writev straight from
// the pattern table: no copy of the payload per frame.
#define BIG_FRAME 4096
#define IOV_FRAMES 256 // frames per writev (2 iovecs each, IOV_MAX is 1024)

static const char USAGE[] =
    "usage: etcp-load --port P [--host 127.0.0.1] [--connections 50]\n"
    "  [--size 64] [--depth 1] [--duration 5] [--warmup 1] [--mode echo|accept]\n"
    "  [--server-pid PID] [--tls --ca FILE]\n";

// No libm (cc without -lm must do): floor and ceil for |x| < 2^63.
static double dfloor(double x) {
    double t = (double)(long long)x;
    return t > x ? t - 1 : t;
}

static double dceil(double x) {
    double t = (double)(long long)x;
    return t < x ? t + 1 : t;
}

// ------------------------------------------------------------------ options

static struct {
    const char *host;
    long port, connections, size, depth, server_pid;
    double duration, warmup;
    int accept_mode;
    int tls;
    const char *ca;
} opt = {"127.0.0.1", 0, 50, 64, 1, 0, 5, 1, 0, 0, NULL};

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n\n%s", USAGE);
    exit(2);
}

static double parse_number(const char *name, const char *value) {
    char *end;
    errno = 0;
    double x = strtod(value, &end);
    if (!*value || *end || errno || !(x - x == 0)) fail("--%s wants a number, got %s", name, value);
    return x;
}

static long parse_int(const char *name, const char *value) {
    double x = parse_number(name, value);
    if (x > 1e9 || x < -1e9 || x != dfloor(x)) fail("--%s wants an integer, got %s", name, value);
    return (long)x;
}

// `--name value` or `--name=value`, as bench/_common.ts's parseFlags.
static void parse_flags(int argc, char **argv) {
    const char *mode = "echo";
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "-h") || !strcmp(arg, "--help")) {
            fputs(USAGE, stdout);
            exit(0);
        }
        if (strncmp(arg, "--", 2)) fail("unexpected argument: %s", arg);
        char name[64];
        const char *eq = strchr(arg, '=');
        size_t len = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
        if (len >= sizeof name) fail("unknown option: %s", arg);
        memcpy(name, arg + 2, len);
        name[len] = 0;
        const char *value = eq ? eq + 1 : NULL;
        static const char *const known[] = {"host",     "port",   "connections", "size",
                                             "depth",    "duration", "warmup",   "mode",
                                             "server-pid", "tls", "ca"};
        int found = 0;
        for (size_t k = 0; k < sizeof known / sizeof *known; k++) found |= !strcmp(name, known[k]);
        if (!found) fail("unknown option: --%s", name);
        if (!strcmp(name, "tls")) { // a boolean: --tls, --tls=true|1|false|0
            opt.tls = !value || !strcmp(value, "true") || !strcmp(value, "1");
            continue;
        }
        if (!value) {
            if (i + 1 >= argc) fail("--%s needs a value", name);
            value = argv[++i];
        }
        if (!strcmp(name, "host")) opt.host = value;
        else if (!strcmp(name, "mode")) mode = value;
        else if (!strcmp(name, "port")) opt.port = parse_int(name, value);
        else if (!strcmp(name, "connections")) opt.connections = parse_int(name, value);
        else if (!strcmp(name, "size")) opt.size = parse_int(name, value);
        else if (!strcmp(name, "depth")) opt.depth = parse_int(name, value);
        else if (!strcmp(name, "server-pid")) opt.server_pid = parse_int(name, value);
        else if (!strcmp(name, "duration")) opt.duration = parse_number(name, value);
        else if (!strcmp(name, "warmup")) opt.warmup = parse_number(name, value);
        else if (!strcmp(name, "ca")) opt.ca = value;
    }
    if (!opt.port) fail("--port is required");
    if (opt.port < 0 || opt.port > 65535) fail("bad --port");
    if (opt.size < MIN_SIZE) fail("--size must be at least %d", MIN_SIZE);
    if (opt.size > 0x7fffffffL - HEADER) fail("--size too large");
    if (opt.depth < 1 || opt.connections < 1) fail("bad --depth/--connections");
    if (opt.duration < 0 || opt.warmup < 0) fail("bad --duration/--warmup");
    if (!strcmp(mode, "accept")) opt.accept_mode = 1;
    else if (strcmp(mode, "echo")) fail("bad --mode");
    if (opt.ca && !opt.tls) fail("--ca is for --tls");
    if (opt.tls) {
#ifndef ETCP_TLS
        fail("--tls: this build has no TLS (cc -DETCP_TLS ... -lssl -lcrypto)");
#endif
        if (!opt.ca) fail("--tls needs --ca FILE (the CA that signed the server's certificate)");
        if (opt.accept_mode) fail("--tls: echo mode only (bench/load.ts does --mode accept over TLS)");
    }
}

// -------------------------------------------------------------------- clock

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

// ------------------------------------------------------------------- frames

static size_t FRAME; // HEADER + size
static int big;      // echo mode with payloads of BIG_FRAME or more
static uint8_t *pattern;

static void put_u32(uint8_t *b, uint32_t v) {
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}

static uint32_t get_u32(const uint8_t *b) {
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static void make_pattern(void) {
    size_t n = (size_t)opt.size + 256;
    pattern = malloc(n);
    if (!pattern) abort();
    for (size_t i = 0; i < n; i++) pattern[i] = (uint8_t)((i * 31 + 7) & 255);
}

// Frame `seq` (header + payload) at `dst`.
static void write_frame(uint8_t *dst, uint32_t seq) {
    put_u32(dst, (uint32_t)opt.size);
    put_u32(dst + HEADER, seq);
    memcpy(dst + HEADER + MIN_SIZE, pattern + (seq & 255) + MIN_SIZE, (size_t)opt.size - MIN_SIZE);
}

// True if the `size`-byte payload at `p` is exactly frame `seq`.
static int check_payload(const uint8_t *p, uint32_t seq) {
    return get_u32(p) == seq &&
           memcmp(p + MIN_SIZE, pattern + (seq & 255) + MIN_SIZE, (size_t)opt.size - MIN_SIZE) == 0;
}

// ---------------------------------------------------------------- histogram

// Round-trip latencies: 1 µs buckets to 20 ms, then 1 ms buckets to 10 s.
#define FINE 20000
#define COARSE 10000
static uint32_t hist[FINE + COARSE];
static uint64_t hist_n;

static void hist_record(double seconds) {
    double us = seconds * 1e6;
    if (us < 0) us = 0;
    size_t i;
    if (us < FINE) {
        i = (size_t)us;
    } else {
        double c = dfloor((us - FINE) / 1000);
        i = FINE + (size_t)(c < COARSE - 1 ? c : COARSE - 1);
    }
    hist[i]++;
    hist_n++;
}

// Microseconds at quantile q (bucket midpoint); negative if empty.
static double hist_quantile(double q) {
    if (!hist_n) return -1;
    double t = dceil(q * (double)hist_n);
    uint64_t target = t < 1 ? 1 : (uint64_t)t, seen = 0;
    for (size_t i = 0; i < FINE + COARSE; i++) {
        seen += hist[i];
        if (seen < target) continue;
        return i < FINE ? (double)i + 0.5 : FINE + (double)(i - FINE) * 1000 + 500;
    }
    return -1;
}

// -------------------------------------------------------------------- state

enum Phase { WARMUP, MEASURE, DONE };
static enum Phase phase = WARMUP;
static uint64_t frames, errors, corrupt;

enum State { CLOSED, CONNECTING, HANDSHAKE, OPEN, RETRY };

typedef struct {
    int fd;
    enum State state;
    uint32_t events; // registered with epoll
    // input: [in_start, in_end) of in[in_cap]
    uint8_t *in;
    size_t in_cap, in_start, in_end;
    // output not yet written: [out_off, out_len) of out[out_cap]
    uint8_t *out;
    size_t out_cap, out_off, out_len;
    // big: the last pend_n frames sent are not all written yet, pend_off bytes
    // of the first are; hdr holds each frame's header and sequence number
    uint8_t *hdr; // 8 bytes at [seq % depth]
    uint32_t pend_n;
    size_t pend_off;
    uint32_t sent, received; // echo: sequence numbers; accept: `sent` is this cycle's
    double *sent_at;         // echo: send time of frame seq, at [seq % depth]
    double t0;               // accept: cycle start; RETRY: when to try again
#ifdef ETCP_TLS
    SSL *ssl;  // reads from the socket, writes records into wbio
    BIO *wbio; // memory BIO: records not yet written to the socket
#endif
} Conn;

static Conn *conns;
static int ep;
static struct sockaddr_storage addr;
static socklen_t addr_len;
static uint32_t accept_seq;
static int retries_pending;

static void resolve(void) {
    struct addrinfo hints = {0}, *res;
    hints.ai_socktype = SOCK_STREAM;
    char port[16];
    snprintf(port, sizeof port, "%ld", opt.port);
    int rc = getaddrinfo(opt.host, port, &hints, &res);
    if (rc) {
        fprintf(stderr, "load: %s: %s\n", opt.host, gai_strerror(rc));
        exit(1);
    }
    memcpy(&addr, res->ai_addr, res->ai_addrlen);
    addr_len = res->ai_addrlen;
    freeaddrinfo(res);
}

static void set_events(Conn *c, uint32_t events) {
    if (c->events == events) return;
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - conns)};
    int op = c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(ep, op, c->fd, &ev) < 0) {
        perror("load: epoll_ctl");
        exit(1);
    }
    c->events = events;
}

// ---------------------------------------------------------------------- TLS

#ifdef ETCP_TLS
static SSL_CTX *tls_ctx;

// OpenSSL's queued errors as one line (and the queue emptied).
static const char *tls_errors(void) {
    static char buf[512];
    size_t n = 0;
    buf[0] = 0;
    for (unsigned long e; (e = ERR_get_error()) != 0;) {
        if (n + 2 >= sizeof buf) continue;
        if (n) buf[n++] = ';', buf[n++] = ' ';
        ERR_error_string_n(e, buf + n, sizeof buf - n);
        n = strlen(buf);
    }
    return n ? buf : "no OpenSSL error queued";
}

static void tls_init(void) {
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx) {
        fprintf(stderr, "load: SSL_CTX_new: %s\n", tls_errors());
        exit(1);
    }
    if (SSL_CTX_load_verify_locations(tls_ctx, opt.ca, NULL) != 1) {
        fprintf(stderr, "load: --ca %s: %s\n", opt.ca, tls_errors());
        exit(1);
    }
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_PEER, NULL);
    // Read-ahead into a buffer that holds a whole bulk echo: one read
    // syscall takes several records.
    SSL_CTX_set_read_ahead(tls_ctx, 1);
    SSL_CTX_set_default_read_buffer_len(tls_ctx, 80 * 1024);
    SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_OFF);
}

// Attaches a client session to the connected socket, checking --host. It
// reads from the socket and writes into a memory BIO, which tls_drain()
// writes out: all records of one send go out in one write syscall.
static int tls_attach(Conn *c) {
    c->ssl = SSL_new(tls_ctx);
    if (!c->ssl) return -1;
    BIO *r = BIO_new_socket(c->fd, BIO_NOCLOSE);
    c->wbio = BIO_new(BIO_s_mem());
    if (!r || !c->wbio) {
        BIO_free(r);
        BIO_free(c->wbio);
        c->wbio = NULL;
        return -1;
    }
    SSL_set_bio(c->ssl, r, c->wbio);
    unsigned char ip[16];
    int is_ip = inet_pton(AF_INET, opt.host, ip) == 1 || inet_pton(AF_INET6, opt.host, ip) == 1;
    if (is_ip) {
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), opt.host) != 1) return -1;
    } else if (SSL_set1_host(c->ssl, opt.host) != 1 ||
               SSL_set_tlsext_host_name(c->ssl, opt.host) != 1) {
        return -1;
    }
    SSL_set_connect_state(c->ssl);
    return 0;
}

// Writes the records waiting in wbio; returns what write() did last (< 0:
// errno tells, EAGAIN included), or 0 once nothing waits.
static ssize_t tls_write_out(Conn *c) {
    static char skip[16384];
    char *p;
    long n;
    while ((n = BIO_get_mem_data(c->wbio, &p)) > 0) {
        ssize_t w = write(c->fd, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return w;
        }
        if (w == n) {
            (void)BIO_reset(c->wbio);
            break;
        }
        // The socket took part of it (rare): drop that part.
        for (ssize_t left = w; left > 0;) {
            int k = BIO_read(c->wbio, skip, left < (ssize_t)sizeof skip ? (int)left : (int)sizeof skip);
            if (k <= 0) break;
            left -= k;
        }
    }
    return 0;
}
#endif

static void close_conn(Conn *c) {
#ifdef ETCP_TLS
    if (c->ssl) {
        // close_notify if it fits in the socket at once: a clean end for the
        // server, never a wait.
        if (c->state == OPEN && SSL_shutdown(c->ssl) >= 0) (void)tls_write_out(c);
        SSL_free(c->ssl); // and its BIOs
        c->ssl = NULL;
        c->wbio = NULL;
        ERR_clear_error();
    }
#endif
    if (c->fd >= 0) close(c->fd); // also leaves the epoll set
    c->fd = -1;
    c->events = 0;
    c->state = CLOSED;
}

// A failed connection: counted unless the window is over (then it is our own
// teardown); echo connections stay closed, accept loops retry after 1 ms.
static void conn_failed(Conn *c, int is_corrupt, const char *fmt, ...) {
    if (phase != DONE) {
        if (is_corrupt) corrupt++;
        else errors++;
        if (errors + corrupt <= MAX_ERRORS_SHOWN) {
            va_list ap;
            va_start(ap, fmt);
            fputs("load: ", stderr);
            vfprintf(stderr, fmt, ap);
            fputc('\n', stderr);
            va_end(ap);
        }
    }
    close_conn(c);
    if (opt.accept_mode) {
        c->state = RETRY; // e.g. out of ephemeral ports: don't spin
        c->t0 = now_s() + 0.001;
        retries_pending++;
    }
}

static int flush(Conn *c);

static int open_socket(Conn *c) {
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) return -1;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&addr, addr_len) < 0 && errno != EINPROGRESS) return -1;
    c->state = CONNECTING;
    // Accept mode: on loopback the handshake is usually over by now, so try
    // the frame at once and skip a wait for writability.
    if (opt.accept_mode) {
        ssize_t w = write(c->fd, c->out, c->out_len);
        if (w >= 0) {
            c->state = OPEN;
            c->out_off = (size_t)w;
            flush(c);
            return 0;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    }
    set_events(c, EPOLLOUT);
    return 0;
}

static int write_failed(Conn *c, const char *what) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
        set_events(c, EPOLLIN | EPOLLOUT);
        return 0;
    }
    conn_failed(c, 0, "%s: %s", what, strerror(errno));
    return -1;
}

// flush() for big frames: header and sequence number from `hdr`, the rest of
// the payload from the pattern table.
static int flush_big(Conn *c) {
    static struct iovec iov[2 * IOV_FRAMES];
    const size_t rest = (size_t)opt.size - MIN_SIZE;
    while (c->pend_n > 0) {
        uint32_t n = c->pend_n < IOV_FRAMES ? c->pend_n : IOV_FRAMES;
        uint32_t seq = c->sent - c->pend_n;
        int k = 0;
        for (uint32_t i = 0; i < n; i++, seq++) {
            uint8_t *h = c->hdr + (size_t)(seq % (uint32_t)opt.depth) * 8;
            uint8_t *p = pattern + (seq & 255) + MIN_SIZE;
            size_t skip = i == 0 ? c->pend_off : 0;
            if (skip < 8) {
                iov[k++] = (struct iovec){h + skip, 8 - skip};
                iov[k++] = (struct iovec){p, rest};
            } else {
                iov[k++] = (struct iovec){p + (skip - 8), rest - (skip - 8)};
            }
        }
        ssize_t w = writev(c->fd, iov, k);
        if (w < 0) {
            if (errno == EINTR) continue;
            return write_failed(c, "writev");
        }
        for (size_t left = (size_t)w; left > 0;) {
            size_t rem = FRAME - c->pend_off;
            if (left < rem) {
                c->pend_off += left;
                break;
            }
            left -= rem;
            c->pend_off = 0;
            c->pend_n--;
        }
    }
    set_events(c, EPOLLIN);
    return 0;
}

static int pending(const Conn *c) {
#ifdef ETCP_TLS
    if (c->ssl) return c->out_off < c->out_len || BIO_ctrl_pending(c->wbio) > 0;
#endif
    return big ? c->pend_n > 0 : c->out_off < c->out_len;
}

#ifdef ETCP_TLS
// flush() over TLS: encrypts the queued frames into wbio (a memory BIO takes
// all of it), then writes wbio's records out; waits for EPOLLOUT if the
// socket is full.
static int flush_tls(Conn *c) {
    if (c->out_off < c->out_len) {
        ERR_clear_error();
        errno = 0;
        int w = SSL_write(c->ssl, c->out + c->out_off, (int)(c->out_len - c->out_off));
        if (w <= 0) {
            conn_failed(c, 0, "SSL_write: %s", tls_errors());
            return -1;
        }
        c->out_off = c->out_len = 0;
    }
    if (tls_write_out(c) < 0) return write_failed(c, "write");
    set_events(c, EPOLLIN);
    return 0;
}
#endif

// Writes what is pending; waits for EPOLLOUT if the socket is full.
static int flush(Conn *c) {
    if (big) return flush_big(c);
#ifdef ETCP_TLS
    if (c->ssl) return flush_tls(c);
#endif
    while (c->out_off < c->out_len) {
        ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w < 0) {
            if (errno == EINTR) continue;
            return write_failed(c, "write");
        }
        c->out_off += (size_t)w;
    }
    c->out_off = c->out_len = 0;
    set_events(c, EPOLLIN);
    return 0;
}

// Echo mode: queues the next `k` frames and writes them in one go. What is
// queued or in flight never exceeds `depth` frames, so neither `out` nor the
// `hdr` slots of unwritten frames are ever overrun.
static void send_frames(Conn *c, uint32_t k, double now) {
    if (phase == DONE) return;
    if (big) {
        for (uint32_t i = 0; i < k; i++, c->sent++) {
            uint8_t *h = c->hdr + (size_t)(c->sent % (uint32_t)opt.depth) * 8;
            put_u32(h, (uint32_t)opt.size);
            put_u32(h + HEADER, c->sent);
            c->sent_at[c->sent % (uint32_t)opt.depth] = now;
        }
        c->pend_n += k;
        flush(c);
        return;
    }
    if (c->out_off > 0) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    for (uint32_t i = 0; i < k; i++, c->sent++) {
        write_frame(c->out + c->out_len, c->sent);
        c->out_len += FRAME;
        c->sent_at[c->sent % (uint32_t)opt.depth] = now;
    }
    flush(c);
}

// Reads once; returns bytes read, 0 if nothing to read yet, -1 if the
// connection failed (already handled).
static ssize_t read_some(Conn *c, const char *closed_msg) {
    if (c->in_start == c->in_end) c->in_start = c->in_end = 0;
    size_t used = c->in_end - c->in_start;
    // Leftover is less than one frame, and in_cap >= 2 frames: compacting
    // always leaves room for a whole frame.
    if (c->in_cap - c->in_end < 4096 || c->in_cap - c->in_end < FRAME - used) {
        memmove(c->in, c->in + c->in_start, used);
        c->in_start = 0;
        c->in_end = used;
    }
#ifdef ETCP_TLS
    if (c->ssl) {
        ERR_clear_error();
        errno = 0;
        int n = SSL_read(c->ssl, c->in + c->in_end, (int)(c->in_cap - c->in_end));
        if (n > 0) {
            c->in_end += (size_t)n;
            return n;
        }
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_READ) return 0;
        if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && !errno)) {
            conn_failed(c, 0, "%s", closed_msg);
        } else if (e == SSL_ERROR_SYSCALL) {
            conn_failed(c, 0, "SSL_read: %s", strerror(errno));
        } else {
            conn_failed(c, 0, "SSL_read: %s", tls_errors());
        }
        return -1;
    }
#endif
    for (;;) {
        ssize_t n = read(c->fd, c->in + c->in_end, c->in_cap - c->in_end);
        if (n > 0) {
            c->in_end += (size_t)n;
            return n;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (n == 0) conn_failed(c, 0, "%s", closed_msg);
        else conn_failed(c, 0, "read: %s", strerror(errno));
        return -1;
    }
}

// Payload of the next whole frame, or NULL (none yet, or corrupt: *bad set).
static const uint8_t *next_frame(Conn *c, int *bad) {
    size_t avail = c->in_end - c->in_start;
    if (avail < HEADER) return NULL;
    uint32_t len = get_u32(c->in + c->in_start);
    if (len != (uint32_t)opt.size) {
        *bad = 1;
        return NULL;
    }
    if (avail < HEADER + len) return NULL;
    const uint8_t *p = c->in + c->in_start + HEADER;
    c->in_start += HEADER + len;
    return p;
}

// OpenSSL holds records already read from the socket (read-ahead): epoll will
// not report them, so the read goes on until they are taken.
static int tls_buffered(const Conn *c) {
#ifdef ETCP_TLS
    return c->state == OPEN && c->ssl && SSL_has_pending(c->ssl);
#else
    (void)c;
    return 0;
#endif
}

static int echo_readable_once(Conn *c);

static void echo_readable(Conn *c) {
    // (A partial record may stay buffered: stop when a read finds nothing.)
    while (echo_readable_once(c) > 0 && tls_buffered(c)) {
    }
#ifdef ETCP_TLS
    if (c->ssl && c->state == OPEN) {
        // What OpenSSL wrote while reading (alerts, key updates) goes out.
        if (BIO_ctrl_pending(c->wbio) > 0) flush(c);
        // Part of an echo is still to come: ACK what came at once. A Deno TLS
        // server cannot turn Nagle off, and holds the tail of a big echo
        // until its head is ACKed; Linux would delay that ACK by up to 40 ms.
        if (c->state == OPEN && c->in_end > c->in_start) {
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
        }
    }
#endif
}

// One read and the frames it completes; returns what read_some returned.
static int echo_readable_once(Conn *c) {
    ssize_t got = read_some(c, "server closed the connection");
    if (got <= 0) return (int)got;
    double now = now_s();
    int measuring = phase == MEASURE, bad = 0;
    uint32_t echoed = 0;
    const uint8_t *p;
    while ((p = next_frame(c, &bad))) {
        uint32_t seq = c->received++;
        if (!check_payload(p, seq)) {
            conn_failed(c, 1, "frame %u: wrong echo", seq);
            return -1;
        }
        if (measuring) {
            frames++;
            hist_record(now - c->sent_at[seq % (uint32_t)opt.depth]);
        }
        echoed++;
    }
    if (bad) {
        conn_failed(c, 1, "frame %u: wrong length %u", c->received,
                    get_u32(c->in + c->in_start));
        return -1;
    }
    if (echoed) send_frames(c, echoed, now);
    return c->state == OPEN ? (int)got : -1;
}

// Accept mode: a new connect → frame → echo → close cycle.
static void start_cycle(Conn *c, double now) {
    if (phase == DONE) return;
    c->t0 = now;
    c->sent = accept_seq++;
    c->in_start = c->in_end = 0;
    c->out_off = 0;
    write_frame(c->out, c->sent);
    c->out_len = FRAME;
    if (open_socket(c) < 0) conn_failed(c, 0, "connect: %s", strerror(errno));
}

static void accept_readable(Conn *c) {
    if (read_some(c, "closed before its echo") <= 0) return;
    int bad = 0;
    const uint8_t *p = next_frame(c, &bad);
    if (!p && !bad) return; // not all of it yet
    // More than the one frame echoed is as wrong as a wrong frame.
    if (bad || !check_payload(p, c->sent) || c->in_end != c->in_start) {
        conn_failed(c, 1, "frame %u: wrong echo", c->sent);
        return;
    }
    double now = now_s();
    if (phase == MEASURE) {
        frames++;
        hist_record(now - c->t0);
    }
    close_conn(c);
    start_cycle(c, now);
}

#ifdef ETCP_TLS
// Drives the TLS handshake; once done, the first frames go out.
static void handshake(Conn *c) {
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(c->ssl);
    int e = r == 1 ? SSL_ERROR_NONE : SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_NONE || e == SSL_ERROR_WANT_READ) {
        // The ClientHello, or the client's Finished: out they go.
        if (flush(c) < 0) return;
        if (e == SSL_ERROR_NONE) {
            c->state = OPEN;
            send_frames(c, (uint32_t)opt.depth, now_s());
        }
        return;
    }
    if (e == SSL_ERROR_SYSCALL && errno) conn_failed(c, 0, "TLS handshake: %s", strerror(errno));
    else {
        long v = SSL_get_verify_result(c->ssl);
        if (v != X509_V_OK) {
            conn_failed(c, 0, "TLS handshake: certificate: %s", X509_verify_cert_error_string(v));
        } else {
            conn_failed(c, 0, "TLS handshake: %s", tls_errors());
        }
    }
}
#endif

// A connecting socket became writable: connected, or failed.
static void connected(Conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) {
        conn_failed(c, 0, "connect: %s", strerror(err));
        return;
    }
#ifdef ETCP_TLS
    if (opt.tls) {
        if (tls_attach(c) < 0) {
            conn_failed(c, 0, "TLS setup: %s", tls_errors());
            return;
        }
        c->state = HANDSHAKE;
        handshake(c);
        return;
    }
#endif
    c->state = OPEN;
    if (opt.accept_mode) flush(c);
    else send_frames(c, (uint32_t)opt.depth, now_s());
}

static void on_event(Conn *c, uint32_t events) {
    if (c->state == CONNECTING) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) connected(c);
        return;
    }
#ifdef ETCP_TLS
    if (c->state == HANDSHAKE) {
        if ((events & EPOLLOUT) && pending(c) && flush(c) < 0) return;
        if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) handshake(c);
        return;
    }
#endif
    if (c->state != OPEN) return;
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        if (opt.accept_mode) accept_readable(c);
        else echo_readable(c);
    }
    if (c->state == OPEN && (events & EPOLLOUT) && pending(c)) flush(c);
}

// One epoll round, waiting at most until `until` (monotonic seconds).
static void poll_once(double until) {
    static struct epoll_event evs[MAX_EVENTS];
    double now = now_s(), wait = until - now;
    if (retries_pending) {
        for (long i = 0; i < opt.connections; i++) {
            Conn *c = &conns[i];
            if (c->state != RETRY) continue;
            if (c->t0 <= now) {
                retries_pending--;
                c->state = CLOSED;
                start_cycle(c, now);
            } else if (c->t0 - now < wait) {
                wait = c->t0 - now;
            }
        }
    }
    int timeout = wait <= 0 ? 0 : (int)dceil(wait * 1000);
    int n = epoll_wait(ep, evs, MAX_EVENTS, timeout);
    if (n < 0) {
        if (errno == EINTR) return;
        perror("load: epoll_wait");
        exit(1);
    }
    for (int i = 0; i < n; i++) on_event(&conns[evs[i].data.u32], evs[i].events);
}

// --------------------------------------------------------------------- CPU

static long ticks;

static double self_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// User + system CPU seconds of `pid` so far (0 if it is gone).
static double pid_cpu(long pid) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return 0;
    // After ") ": state is field 3; utime and stime are fields 14 and 15.
    unsigned long long utime, stime;
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2)
        return 0;
    return (double)(utime + stime) / (double)ticks;
}

// CPU seconds of the whole machine: user + nice + system, as _common.ts.
static double machine_cpu(void) {
    unsigned long long user = 0, nice = 0, sys = 0;
    FILE *f = fopen("/proc/stat", "r");
    if (f) {
        if (fscanf(f, "cpu %llu %llu %llu", &user, &nice, &sys) != 3) user = nice = sys = 0;
        fclose(f);
    }
    return (double)(user + nice + sys) / (double)ticks;
}

typedef struct {
    double t, self, server, machine;
} Sample;

static Sample sample(void) {
    Sample s = {now_s(), self_cpu(), opt.server_pid ? pid_cpu(opt.server_pid) : 0, machine_cpu()};
    return s;
}

// ------------------------------------------------------------------- report

// JavaScript's Math.round(x * 10^d) / 10^d, printed as JSON.stringify would.
static void num(const char *name, double x, int d) {
    double k = 1;
    while (d-- > 0) k *= 10;
    printf(",\"%s\":%.15g", name, dfloor(x * k + 0.5) / k);
}

static void report(Sample a, Sample b) {
    double seconds = b.t - a.t;
    double server = b.server - a.server, self = b.self - a.self;
    double other = b.machine - a.machine - server - self;
    printf("{\"mode\":\"%s\"", opt.accept_mode ? "accept" : "echo");
    num("connections", (double)opt.connections, 0);
    num("size", (double)opt.size, 0);
    num("depth", opt.accept_mode ? 1 : (double)opt.depth, 0);
    num("frames", (double)frames, 0);
    num("seconds", seconds, 3);
    num("framesPerSec", (double)frames / seconds, 1);
    num("mbPerSec", (double)frames * (double)FRAME / seconds / 1e6, 2);
    double p50 = hist_quantile(0.5), p99 = hist_quantile(0.99);
    if (p50 < 0) printf(",\"p50us\":null,\"p99us\":null");
    else printf(",\"p50us\":%.15g,\"p99us\":%.15g", p50, p99);
    num("errors", (double)errors, 0);
    num("corrupt", (double)corrupt, 0);
    num("cpuSeconds", self_cpu(), 3);
    num("cpuPct", self / seconds * 100, 1);
    if (opt.server_pid) {
        num("serverCpuPct", server / seconds * 100, 1);
        if (frames) num("serverUsPerFrame", server * 1e6 / (double)frames, 2);
        else printf(",\"serverUsPerFrame\":null");
        num("otherCpuPct", (other > 0 ? other : 0) / seconds * 100, 1);
    }
    printf("}\n");
    fflush(stdout);
}

// --------------------------------------------------------------------- main

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "load: did not finish in time\n";
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    (void)ignored;
    _exit(3);
}

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "load: out of memory\n");
        exit(1);
    }
    return p;
}

int main(int argc, char **argv) {
    parse_flags(argc, argv);
    ticks = sysconf(_SC_CLK_TCK);
    if (ticks <= 0) ticks = 100;
    signal(SIGPIPE, SIG_IGN);

    // Hard bound: whatever happens (a server that stops answering, connects
    // that hang), this process is gone after warmup + duration + grace.
    signal(SIGALRM, on_alarm);
    double bound = opt.warmup + opt.duration + GRACE_S;
    struct itimerval it = {{0, 0}, {(time_t)bound, (suseconds_t)((bound - dfloor(bound)) * 1e6)}};
    setitimer(ITIMER_REAL, &it, NULL);

    FRAME = HEADER + (size_t)opt.size;
    big = !opt.accept_mode && !opt.tls && opt.size >= BIG_FRAME;
    make_pattern();
    resolve();
#ifdef ETCP_TLS
    if (opt.tls) tls_init();
#endif
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("load: epoll_create1");
        return 1;
    }

    conns = xcalloc((size_t)opt.connections, sizeof *conns);
    for (long i = 0; i < opt.connections; i++) {
        Conn *c = &conns[i];
        c->fd = -1;
        if (opt.accept_mode) {
            c->in_cap = 2 * FRAME;
            c->out_cap = FRAME;
        } else {
            c->in_cap = FRAME * 2 > 64 * 1024 ? FRAME * 2 : 64 * 1024;
            c->out_cap = big ? 1 : FRAME * (size_t)opt.depth;
            c->sent_at = xcalloc((size_t)opt.depth, sizeof *c->sent_at);
            if (big) c->hdr = xcalloc((size_t)opt.depth, 8);
        }
        c->in = xcalloc(c->in_cap, 1);
        c->out = xcalloc(c->out_cap, 1);
    }

    if (opt.accept_mode) {
        double now = now_s();
        for (long i = 0; i < opt.connections; i++) start_cycle(&conns[i], now);
    } else {
        // All connections first (as load.ts), then the clock starts. Any
        // connection that fails here fails the run.
        for (long i = 0; i < opt.connections; i++) {
            if (open_socket(&conns[i]) < 0) {
                fprintf(stderr, "load: connect: %s\n", strerror(errno));
                return 1;
            }
        }
        for (;;) {
            long connecting = 0;
            for (long i = 0; i < opt.connections; i++) {
                if (conns[i].state == CLOSED) {
                    fprintf(stderr, "load: a connection to %s:%ld failed before the run started\n", opt.host, opt.port);
                    return 1;
                }
                connecting += conns[i].state == CONNECTING || conns[i].state == HANDSHAKE;
            }
            if (!connecting) break;
            poll_once(now_s() + 1);
        }
    }

    double t = now_s();
    double measure_at = t + opt.warmup;
    while ((t = now_s()) < measure_at) poll_once(measure_at);
    phase = MEASURE;
    Sample start = sample();
    double end_at = start.t + opt.duration;
    while (now_s() < end_at) poll_once(end_at);
    phase = DONE;
    Sample end = sample();
    for (long i = 0; i < opt.connections; i++) close_conn(&conns[i]);
    report(start, end);
    return 0;
}
