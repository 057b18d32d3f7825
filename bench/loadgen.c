/*
 * loadgen: a small closed-loop HTTP/1.1 keep-alive load generator (a minimal wrk).
 *
 * Every connection sends one request, waits for the complete response (status line,
 * Content-Length or chunked transfer encoding, or read-until-close), records the latency,
 * then sends the next request. Plain TCP over IPv4, non-blocking sockets, one epoll loop
 * per thread. Connections are reconnected when the server closes them.
 *
 * Warmup responses are not counted. Only requests that were sent after the warmup ended
 * and completed before the hard deadline are in the statistics. Latencies go into a
 * log-linear histogram (relative error below 0.4 %); mean and max are exact.
 *
 * On stderr the main thread writes "MEASURE_START" when the warmup ends and "MEASURE_END"
 * at the deadline, so a driver can sample other processes' CPU time over the same window.
 * On stdout it writes one JSON object with the results.
 *
 * Build: cc -O2 -Wall -Wextra -o loadgen loadgen.c -lpthread
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define MAX_HEADERS 64
#define RBUF_SIZE 65536
#define HBUF_SIZE 16384                         /* max response header block */
#define MAX_STATUS 1000
#define HIST_SUB_BITS 7
#define HIST_SUB (1u << HIST_SUB_BITS)          /* 128 */
#define HIST_LINEAR (2u * HIST_SUB)             /* values below this are exact */
#define HIST_BUCKETS ((64u - HIST_SUB_BITS) * HIST_SUB + HIST_SUB)
#define RECONNECT_BACKOFF_NS 10000000ull        /* 10 ms after a failed connect */

/* ---------------------------------------------------------------- options */

static const char *opt_host = "127.0.0.1";
static int opt_port = 0;
static const char *opt_path = "/";
static const char *opt_method = "GET";
static const char *opt_headers[MAX_HEADERS];
static int opt_nheaders = 0;
static const char *opt_body_file = NULL;
static int opt_connections = 16;
static double opt_duration = 10.0;
static double opt_warmup = 1.0;
static int opt_threads = 1;
static double opt_timeout = 10.0;

static char *request_buf;  /* the full request, sent as is on every iteration */
static size_t request_len;
static int request_is_head;
static struct sockaddr_in server_addr;

static uint64_t t_begin_ns, t_measure_ns, t_end_ns, timeout_ns;

/* ---------------------------------------------------------------- time */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(t / 1000000000ull);
    ts.tv_nsec = (long)(t % 1000000000ull);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static double thread_cpu_s(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) != 0) return 0.0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* ---------------------------------------------------------------- histogram */

static unsigned hist_index(uint64_t v)
{
    if (v < HIST_LINEAR) return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);   /* >= HIST_SUB_BITS + 1 */
    unsigned shift = msb - HIST_SUB_BITS;                /* >= 1 */
    unsigned sub = (unsigned)(v >> shift);               /* in [HIST_SUB, 2*HIST_SUB) */
    return shift * HIST_SUB + sub;
}

/* midpoint of a bucket's value range */
static double hist_value(unsigned idx)
{
    if (idx < HIST_LINEAR) return (double)idx;
    unsigned shift = idx / HIST_SUB - 1u;
    uint64_t sub = idx - shift * HIST_SUB;
    uint64_t lo = sub << shift;
    uint64_t hi = ((sub + 1u) << shift) - 1u;
    return ((double)lo + (double)hi) / 2.0;
}

/* ---------------------------------------------------------------- connections */

enum conn_state { C_IDLE, C_CONNECTING, C_ACTIVE, C_BACKOFF };
enum parse_state { P_HEADERS, P_BODY_LENGTH, P_BODY_CHUNKED, P_BODY_EOF, P_DONE };
enum chunk_state { CH_SIZE, CH_EXT, CH_DATA, CH_DATA_END, CH_TRAILER };

struct conn {
    int fd;
    enum conn_state state;
    uint64_t retry_at;        /* for C_BACKOFF */
    size_t wpos;              /* bytes of request_buf written */
    int want_out;             /* EPOLLOUT registered */
    int in_request;           /* a request is outstanding */
    int got_bytes;            /* response bytes received for the outstanding request */
    uint64_t req_start;
    /* response parser */
    enum parse_state pstate;
    enum chunk_state cstate;
    int status;
    int close_after;
    uint64_t remaining;       /* Content-Length left, or chunk bytes left */
    int chunk_digits;
    int trailer_line_empty;
    size_t hlen;              /* bytes of headers buffered in hbuf */
    char hbuf[HBUF_SIZE];
};

struct thread_ctx {
    pthread_t tid;
    int index;
    int epfd;
    int nconns;
    struct conn *conns;
    int nbackoff;
    /* results (measurement window only) */
    uint64_t requests;
    uint64_t errors;
    uint64_t err_connect, err_read, err_write, err_parse, err_timeout, err_closed;
    uint64_t status[MAX_STATUS];
    uint64_t status_other;
    uint64_t hist[HIST_BUCKETS];
    uint64_t lat_sum_ns;
    uint64_t lat_max_ns;
    double cpu_start, cpu_end;
    int measuring;
    char rbuf[RBUF_SIZE];
};

static void count_error(struct thread_ctx *t, uint64_t *which)
{
    if (now_ns() >= t_measure_ns) {
        t->errors++;
        (*which)++;
    }
}

static void conn_close(struct thread_ctx *t, struct conn *c)
{
    if (c->fd >= 0) {
        epoll_ctl(t->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = C_IDLE;
    c->in_request = 0;
    c->want_out = 0;
}

static void parser_reset(struct conn *c)
{
    c->pstate = P_HEADERS;
    c->cstate = CH_SIZE;
    c->status = 0;
    c->close_after = 0;
    c->remaining = 0;
    c->chunk_digits = 0;
    c->trailer_line_empty = 1;
    c->hlen = 0;
    c->got_bytes = 0;
}

static void set_out(struct thread_ctx *t, struct conn *c, int want)
{
    if (c->want_out == want) return;
    struct epoll_event ev;
    ev.events = EPOLLIN | (want ? EPOLLOUT : 0u);
    ev.data.ptr = c;
    epoll_ctl(t->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want;
}

static void conn_start(struct thread_ctx *t, struct conn *c);

static void conn_backoff(struct thread_ctx *t, struct conn *c)
{
    conn_close(t, c);
    c->state = C_BACKOFF;
    c->retry_at = now_ns() + RECONNECT_BACKOFF_NS;
    t->nbackoff++;
}

/* Writes as much of the request as the socket takes. Returns 0, or -1 after an error. */
static int conn_write(struct thread_ctx *t, struct conn *c)
{
    while (c->wpos < request_len) {
        ssize_t n = send(c->fd, request_buf + c->wpos, request_len - c->wpos, MSG_NOSIGNAL);
        if (n > 0) {
            c->wpos += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            set_out(t, c, 1);
            return 0;
        }
        count_error(t, &t->err_write);
        conn_close(t, c);
        conn_start(t, c);
        return -1;
    }
    set_out(t, c, 0);
    return 0;
}

static void send_request(struct thread_ctx *t, struct conn *c)
{
    parser_reset(c);
    c->wpos = 0;
    c->in_request = 1;
    c->req_start = now_ns();
    conn_write(t, c);
}

static void conn_start(struct thread_ctx *t, struct conn *c)
{
    if (now_ns() >= t_end_ns) return;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        count_error(t, &t->err_connect);
        conn_backoff(t, c);
        return;
    }
    c->req_start = now_ns();  /* connect timeout reference */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->fd = fd;
    c->want_out = 1;
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLOUT;
    ev.data.ptr = c;
    if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        count_error(t, &t->err_connect);
        conn_backoff(t, c);
        return;
    }
    int r = connect(fd, (struct sockaddr *)&server_addr, sizeof(server_addr));
    if (r == 0) {
        c->state = C_ACTIVE;
        send_request(t, c);
    } else if (errno == EINPROGRESS) {
        c->state = C_CONNECTING;
    } else {
        count_error(t, &t->err_connect);
        conn_backoff(t, c);
    }
}

static void record(struct thread_ctx *t, struct conn *c, uint64_t end)
{
    if (c->req_start < t_measure_ns || end > t_end_ns) return;
    uint64_t lat = end - c->req_start;
    t->requests++;
    if (c->status >= 0 && c->status < MAX_STATUS)
        t->status[c->status]++;
    else
        t->status_other++;
    t->hist[hist_index(lat)]++;
    t->lat_sum_ns += lat;
    if (lat > t->lat_max_ns) t->lat_max_ns = lat;
}

/* Case-insensitive search for a token inside a header value. */
static int value_has_token(const char *v, size_t n, const char *tok)
{
    size_t k = strlen(tok);
    for (size_t i = 0; i + k <= n; i++)
        if (strncasecmp(v + i, tok, k) == 0) return 1;
    return 0;
}

/*
 * Parses a complete header block (status line to the blank line, inclusive).
 * Returns 1 for a final response, 0 for an interim 1xx response, -1 on error.
 */
static int parse_headers(struct conn *c, const char *h, size_t n)
{
    if (n < 12 || memcmp(h, "HTTP/1.", 7) != 0 || h[8] != ' ') return -1;
    if (!isdigit((unsigned char)h[9]) || !isdigit((unsigned char)h[10]) ||
        !isdigit((unsigned char)h[11]))
        return -1;
    int http10 = h[7] == '0';
    c->status = (h[9] - '0') * 100 + (h[10] - '0') * 10 + (h[11] - '0');
    if (c->status >= 100 && c->status < 200) return 0;

    int have_length = 0, chunked = 0, conn_close_hdr = 0, conn_keepalive_hdr = 0;
    uint64_t length = 0;
    const char *p = memchr(h, '\n', n);
    const char *end = h + n;
    while (p && ++p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) break;
        const char *le = eol;
        if (le > p && le[-1] == '\r') le--;
        if (le == p) break;  /* blank line */
        const char *colon = memchr(p, ':', (size_t)(le - p));
        if (colon) {
            size_t nlen = (size_t)(colon - p);
            const char *v = colon + 1;
            while (v < le && (*v == ' ' || *v == '\t')) v++;
            size_t vlen = (size_t)(le - v);
            if (nlen == 14 && strncasecmp(p, "content-length", 14) == 0) {
                uint64_t x = 0;
                size_t i = 0;
                for (; i < vlen && isdigit((unsigned char)v[i]); i++) x = x * 10 + (uint64_t)(v[i] - '0');
                if (i == 0) return -1;
                have_length = 1;
                length = x;
            } else if (nlen == 17 && strncasecmp(p, "transfer-encoding", 17) == 0) {
                if (value_has_token(v, vlen, "chunked")) chunked = 1;
            } else if (nlen == 10 && strncasecmp(p, "connection", 10) == 0) {
                if (value_has_token(v, vlen, "close")) conn_close_hdr = 1;
                if (value_has_token(v, vlen, "keep-alive")) conn_keepalive_hdr = 1;
            }
        }
        p = eol;
    }
    c->close_after = conn_close_hdr || (http10 && !conn_keepalive_hdr);
    if (request_is_head || c->status == 204 || c->status == 304) {
        c->pstate = P_DONE;
    } else if (chunked) {
        c->pstate = P_BODY_CHUNKED;
        c->cstate = CH_SIZE;
        c->remaining = 0;
        c->chunk_digits = 0;
    } else if (have_length) {
        c->remaining = length;
        c->pstate = length ? P_BODY_LENGTH : P_DONE;
    } else {
        c->pstate = P_BODY_EOF;
        c->close_after = 1;
    }
    return 1;
}

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Consumes chunked body bytes. Returns bytes used, or -1 on a framing error. */
static ssize_t parse_chunked(struct conn *c, const char *b, size_t n)
{
    size_t i = 0;
    while (i < n && c->pstate == P_BODY_CHUNKED) {
        char ch = b[i];
        switch (c->cstate) {
        case CH_SIZE: {
            int hv = hexval((unsigned char)ch);
            if (hv >= 0) {
                if (c->chunk_digits >= 15) return -1;
                c->remaining = c->remaining * 16 + (uint64_t)hv;
                c->chunk_digits++;
            } else if (ch == ';' || ch == ' ' || ch == '\t') {
                if (!c->chunk_digits) return -1;
                c->cstate = CH_EXT;
            } else if (ch == '\r') {
                /* wait for LF */
            } else if (ch == '\n') {
                if (!c->chunk_digits) return -1;
                c->chunk_digits = 0;
                if (c->remaining == 0) {
                    c->cstate = CH_TRAILER;
                    c->trailer_line_empty = 1;
                } else {
                    c->cstate = CH_DATA;
                }
            } else {
                return -1;
            }
            i++;
            break;
        }
        case CH_EXT:
            if (ch == '\n') {
                c->chunk_digits = 0;
                if (c->remaining == 0) {
                    c->cstate = CH_TRAILER;
                    c->trailer_line_empty = 1;
                } else {
                    c->cstate = CH_DATA;
                }
            }
            i++;
            break;
        case CH_DATA: {
            size_t take = n - i;
            if ((uint64_t)take > c->remaining) take = (size_t)c->remaining;
            c->remaining -= take;
            i += take;
            if (c->remaining == 0) c->cstate = CH_DATA_END;
            break;
        }
        case CH_DATA_END:
            if (ch == '\n') {
                c->cstate = CH_SIZE;
            } else if (ch != '\r') {
                return -1;
            }
            i++;
            break;
        case CH_TRAILER:
            if (ch == '\n') {
                if (c->trailer_line_empty) c->pstate = P_DONE;
                c->trailer_line_empty = 1;
            } else if (ch != '\r') {
                c->trailer_line_empty = 0;
            }
            i++;
            break;
        }
    }
    return (ssize_t)i;
}

/* Feeds received bytes to the parser. Returns 0 ok, -1 error. May finish a response. */
static int feed(struct thread_ctx *t, struct conn *c, const char *b, size_t n)
{
    while (n > 0) {
        if (!c->in_request) return 0;  /* unsolicited bytes: ignore */
        c->got_bytes = 1;
        if (c->pstate == P_HEADERS) {
            size_t room = sizeof(c->hbuf) - c->hlen;
            size_t take = n < room ? n : room;
            size_t old = c->hlen;
            memcpy(c->hbuf + c->hlen, b, take);
            c->hlen += take;
            /* search for the end of headers, starting a little before the new bytes */
            size_t from = old >= 3 ? old - 3 : 0;
            char *e = memmem(c->hbuf + from, c->hlen - from, "\r\n\r\n", 4);
            size_t hend;
            if (e) {
                hend = (size_t)(e - c->hbuf) + 4;
            } else {
                char *e2 = memmem(c->hbuf + from, c->hlen - from, "\n\n", 2);
                if (!e2) {
                    if (c->hlen == sizeof(c->hbuf)) return -1;
                    return 0;
                }
                hend = (size_t)(e2 - c->hbuf) + 2;
            }
            int r = parse_headers(c, c->hbuf, hend);
            if (r < 0) return -1;
            size_t used = hend - old;  /* bytes of b consumed by the header block */
            b += used;
            n -= used;
            if (r == 0) {  /* interim response: parse the next header block */
                c->hlen = 0;
                continue;
            }
        } else if (c->pstate == P_BODY_LENGTH) {
            size_t take = n;
            if ((uint64_t)take > c->remaining) take = (size_t)c->remaining;
            c->remaining -= take;
            b += take;
            n -= take;
            if (c->remaining == 0) c->pstate = P_DONE;
        } else if (c->pstate == P_BODY_CHUNKED) {
            ssize_t used = parse_chunked(c, b, n);
            if (used < 0) return -1;
            b += used;
            n -= (size_t)used;
        } else if (c->pstate == P_BODY_EOF) {
            return 0;  /* everything until the close is body */
        }
        if (c->pstate == P_DONE) {
            uint64_t end = now_ns();
            record(t, c, end);
            c->in_request = 0;
            if (c->close_after) {
                conn_close(t, c);
                conn_start(t, c);
                return 1;
            }
            if (end >= t_end_ns) return 0;
            send_request(t, c);  /* any leftover bytes are unsolicited */
            return 0;
        }
    }
    return 0;
}

static void on_readable(struct thread_ctx *t, struct conn *c)
{
    ssize_t n = recv(c->fd, t->rbuf, sizeof(t->rbuf), 0);
    if (n > 0) {
        if (feed(t, c, t->rbuf, (size_t)n) < 0) {
            count_error(t, &t->err_parse);
            conn_close(t, c);
            conn_start(t, c);
        }
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n == 0 && c->in_request && c->pstate == P_BODY_EOF) {
        /* the close ends a response without a length */
        uint64_t end = now_ns();
        record(t, c, end);
        c->in_request = 0;
    } else if (n == 0 && c->in_request) {
        count_error(t, &t->err_closed);
    } else if (n < 0) {
        count_error(t, &t->err_read);
    }
    conn_close(t, c);
    conn_start(t, c);
}

static void on_writable(struct thread_ctx *t, struct conn *c)
{
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof(err);
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
            count_error(t, &t->err_connect);
            conn_backoff(t, c);
            return;
        }
        c->state = C_ACTIVE;
        send_request(t, c);
        return;
    }
    if (c->in_request && c->wpos < request_len)
        conn_write(t, c);
    else
        set_out(t, c, 0);
}

static void check_timers(struct thread_ctx *t, uint64_t now)
{
    for (int i = 0; i < t->nconns; i++) {
        struct conn *c = &t->conns[i];
        if (c->state == C_BACKOFF) {
            if (now >= c->retry_at) {
                t->nbackoff--;
                c->state = C_IDLE;
                conn_start(t, c);
            }
        } else if ((c->state == C_CONNECTING || (c->state == C_ACTIVE && c->in_request)) &&
                   now - c->req_start > timeout_ns) {
            count_error(t, &t->err_timeout);
            conn_close(t, c);
            conn_start(t, c);
        }
    }
}

static void *thread_main(void *arg)
{
    struct thread_ctx *t = arg;
    t->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (t->epfd < 0) {
        perror("epoll_create1");
        exit(2);
    }
    for (int i = 0; i < t->nconns; i++) {
        t->conns[i].fd = -1;
        t->conns[i].state = C_IDLE;
        conn_start(t, &t->conns[i]);
    }
    struct epoll_event events[256];
    uint64_t next_timer = now_ns() + 100000000ull;
    for (;;) {
        uint64_t now = now_ns();
        if (!t->measuring && now >= t_measure_ns) {
            t->measuring = 1;
            t->cpu_start = thread_cpu_s();
        }
        if (now >= t_end_ns) break;
        uint64_t wake = t_end_ns;
        if (!t->measuring && t_measure_ns < wake) wake = t_measure_ns;
        if (next_timer < wake) wake = next_timer;
        if (t->nbackoff > 0 && now + RECONNECT_BACKOFF_NS < wake) wake = now + RECONNECT_BACKOFF_NS;
        int timeout_ms = wake > now ? (int)((wake - now + 999999ull) / 1000000ull) : 0;
        int n = epoll_wait(t->epfd, events, (int)(sizeof(events) / sizeof(events[0])), timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            exit(2);
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            uint32_t ev = events[i].events;
            if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
                if (c->state == C_CONNECTING || (ev & EPOLLOUT)) {
                    on_writable(t, c);
                    if (c->fd < 0 || c->state != C_ACTIVE) continue;
                }
            }
            if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(t, c);
        }
        now = now_ns();
        if (now >= next_timer || t->nbackoff > 0) {
            check_timers(t, now);
            if (now >= next_timer) next_timer = now + 100000000ull;
        }
    }
    if (!t->measuring) t->cpu_start = thread_cpu_s();
    t->cpu_end = thread_cpu_s();
    for (int i = 0; i < t->nconns; i++)
        if (t->conns[i].fd >= 0) close(t->conns[i].fd);
    close(t->epfd);
    return NULL;
}

/* ---------------------------------------------------------------- setup */

static void usage(const char *prog)
{
    fprintf(stderr,
            "usage: %s --port N [--host 127.0.0.1] [--path /] [--method GET]\n"
            "          [--header 'k: v']... [--body-file F] [--connections C]\n"
            "          [--duration S] [--warmup S] [--threads T] [--timeout S]\n",
            prog);
    exit(2);
}

static double parse_double(const char *s, const char *name)
{
    char *end;
    double v = strtod(s, &end);
    if (*s == '\0' || *end != '\0' || v < 0) {
        fprintf(stderr, "loadgen: bad value for %s: %s\n", name, s);
        exit(2);
    }
    return v;
}

static int parse_int(const char *s, const char *name, int lo, int hi)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "loadgen: bad value for %s: %s (%d..%d)\n", name, s, lo, hi);
        exit(2);
    }
    return (int)v;
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) usage(argv[0]);
        if (i + 1 >= argc) usage(argv[0]);
        const char *v = argv[++i];
        if (strcmp(a, "--host") == 0) opt_host = v;
        else if (strcmp(a, "--port") == 0) opt_port = parse_int(v, a, 1, 65535);
        else if (strcmp(a, "--path") == 0) opt_path = v;
        else if (strcmp(a, "--method") == 0) opt_method = v;
        else if (strcmp(a, "--header") == 0) {
            if (opt_nheaders >= MAX_HEADERS || !strchr(v, ':')) {
                fprintf(stderr, "loadgen: bad or too many headers: %s\n", v);
                exit(2);
            }
            opt_headers[opt_nheaders++] = v;
        } else if (strcmp(a, "--body-file") == 0) opt_body_file = v;
        else if (strcmp(a, "--connections") == 0) opt_connections = parse_int(v, a, 1, 100000);
        else if (strcmp(a, "--duration") == 0) opt_duration = parse_double(v, a);
        else if (strcmp(a, "--warmup") == 0) opt_warmup = parse_double(v, a);
        else if (strcmp(a, "--threads") == 0) opt_threads = parse_int(v, a, 1, MAX_THREADS);
        else if (strcmp(a, "--timeout") == 0) opt_timeout = parse_double(v, a);
        else usage(argv[0]);
    }
    if (opt_port == 0) usage(argv[0]);
    if (opt_duration <= 0) {
        fprintf(stderr, "loadgen: --duration must be > 0\n");
        exit(2);
    }
    if (opt_threads > opt_connections) opt_threads = opt_connections;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "loadgen: cannot open %s: %s\n", path, strerror(errno));
        exit(2);
    }
    size_t cap = 65536, n = 0;
    char *buf = malloc(cap);
    if (!buf) exit(2);
    for (;;) {
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            if (!buf) exit(2);
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        if (r == 0) break;
        n += r;
    }
    fclose(f);
    *len = n;
    return buf;
}

static int header_given(const char *name)
{
    size_t k = strlen(name);
    for (int i = 0; i < opt_nheaders; i++)
        if (strncasecmp(opt_headers[i], name, k) == 0 && opt_headers[i][k] == ':') return 1;
    return 0;
}

static void build_request(void)
{
    size_t body_len = 0;
    char *body = NULL;
    if (opt_body_file) body = read_file(opt_body_file, &body_len);
    int needs_length = body_len > 0 || strcasecmp(opt_method, "POST") == 0 ||
                       strcasecmp(opt_method, "PUT") == 0 || strcasecmp(opt_method, "PATCH") == 0;
    request_is_head = strcasecmp(opt_method, "HEAD") == 0;

    size_t cap = body_len + 1024 + strlen(opt_path) + strlen(opt_host);
    for (int i = 0; i < opt_nheaders; i++) cap += strlen(opt_headers[i]) + 2;
    request_buf = malloc(cap);
    if (!request_buf) exit(2);
    int n = snprintf(request_buf, cap, "%s %s HTTP/1.1\r\n", opt_method, opt_path);
    if (!header_given("host"))
        n += snprintf(request_buf + n, cap - (size_t)n, "Host: %s:%d\r\n", opt_host, opt_port);
    for (int i = 0; i < opt_nheaders; i++)
        n += snprintf(request_buf + n, cap - (size_t)n, "%s\r\n", opt_headers[i]);
    if (needs_length && !header_given("content-length") && !header_given("transfer-encoding"))
        n += snprintf(request_buf + n, cap - (size_t)n, "Content-Length: %zu\r\n", body_len);
    n += snprintf(request_buf + n, cap - (size_t)n, "\r\n");
    if (body_len) memcpy(request_buf + n, body, body_len);
    request_len = (size_t)n + body_len;
    free(body);
}

/* ---------------------------------------------------------------- output */

static double percentile(const uint64_t *hist, uint64_t total, double q)
{
    if (total == 0) return 0.0;
    uint64_t rank = (uint64_t)(q * (double)total);
    if (rank >= total) rank = total - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen > rank) return hist_value(i);
    }
    return 0.0;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stderr, NULL, _IONBF, 0);
    build_request();

    memset(&server_addr, 0, sizeof(server_addr));
    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)opt_port);
    if (inet_pton(AF_INET, opt_host, &server_addr.sin_addr) != 1) {
        fprintf(stderr, "loadgen: --host must be an IPv4 address: %s\n", opt_host);
        return 2;
    }

    t_begin_ns = now_ns();
    t_measure_ns = t_begin_ns + (uint64_t)(opt_warmup * 1e9);
    t_end_ns = t_measure_ns + (uint64_t)(opt_duration * 1e9);
    timeout_ns = (uint64_t)(opt_timeout * 1e9);
    if (timeout_ns == 0) timeout_ns = UINT64_MAX / 2;

    struct thread_ctx *threads = calloc((size_t)opt_threads, sizeof(*threads));
    struct conn *conns = calloc((size_t)opt_connections, sizeof(*conns));
    if (!threads || !conns) {
        fprintf(stderr, "loadgen: out of memory\n");
        return 2;
    }
    int given = 0;
    for (int i = 0; i < opt_threads; i++) {
        struct thread_ctx *t = &threads[i];
        t->index = i;
        t->nconns = opt_connections / opt_threads + (i < opt_connections % opt_threads ? 1 : 0);
        t->conns = conns + given;
        given += t->nconns;
        if (pthread_create(&t->tid, NULL, thread_main, t) != 0) {
            fprintf(stderr, "loadgen: pthread_create failed\n");
            return 2;
        }
    }
    sleep_until(t_measure_ns);
    fputs("MEASURE_START\n", stderr);
    sleep_until(t_end_ns);
    fputs("MEASURE_END\n", stderr);
    for (int i = 0; i < opt_threads; i++) pthread_join(threads[i].tid, NULL);

    /* merge */
    static uint64_t hist[HIST_BUCKETS];
    static uint64_t status[MAX_STATUS];
    uint64_t requests = 0, errors = 0, status_other = 0, sum = 0, max = 0;
    uint64_t e_connect = 0, e_read = 0, e_write = 0, e_parse = 0, e_timeout = 0, e_closed = 0;
    double cpu = 0.0;
    for (int i = 0; i < opt_threads; i++) {
        struct thread_ctx *t = &threads[i];
        requests += t->requests;
        errors += t->errors;
        e_connect += t->err_connect;
        e_read += t->err_read;
        e_write += t->err_write;
        e_parse += t->err_parse;
        e_timeout += t->err_timeout;
        e_closed += t->err_closed;
        status_other += t->status_other;
        sum += t->lat_sum_ns;
        if (t->lat_max_ns > max) max = t->lat_max_ns;
        for (unsigned b = 0; b < HIST_BUCKETS; b++) hist[b] += t->hist[b];
        for (int s = 0; s < MAX_STATUS; s++) status[s] += t->status[s];
        cpu += t->cpu_end - t->cpu_start;
    }
    double dur = (double)(t_end_ns - t_measure_ns) / 1e9;

    printf("{\"requests\": %llu, \"errors\": %llu, \"status\": {", (unsigned long long)requests,
           (unsigned long long)errors);
    int first = 1;
    for (int s = 0; s < MAX_STATUS; s++) {
        if (!status[s]) continue;
        printf("%s\"%d\": %llu", first ? "" : ", ", s, (unsigned long long)status[s]);
        first = 0;
    }
    if (status_other) printf("%s\"other\": %llu", first ? "" : ", ", (unsigned long long)status_other);
    printf("}, \"duration_s\": %.6f, \"rps\": %.2f, ", dur, (double)requests / dur);
    printf("\"latency_ms\": {\"p50\": %.4f, \"p90\": %.4f, \"p99\": %.4f, \"max\": %.4f, "
           "\"mean\": %.4f}, ",
           percentile(hist, requests, 0.50) / 1e6, percentile(hist, requests, 0.90) / 1e6,
           percentile(hist, requests, 0.99) / 1e6, (double)max / 1e6,
           requests ? (double)sum / (double)requests / 1e6 : 0.0);
    printf("\"error_kinds\": {\"connect\": %llu, \"read\": %llu, \"write\": %llu, \"parse\": %llu, "
           "\"timeout\": %llu, \"closed\": %llu}, ",
           (unsigned long long)e_connect, (unsigned long long)e_read, (unsigned long long)e_write,
           (unsigned long long)e_parse, (unsigned long long)e_timeout, (unsigned long long)e_closed);
    printf("\"connections\": %d, \"threads\": %d, \"loadgen_cpu_s\": %.4f}\n", opt_connections,
           opt_threads, cpu);
    fflush(stdout);
    free(conns);
    free(threads);
    free(request_buf);
    return 0;
}
