/*
 * loadgen: a compiled epoll echo load generator, the yardstick for aecho's servers and
 * for `aecho bench` itself.  One thread, non-blocking sockets, every echoed byte compared.
 *
 *   loadgen HOST PORT [-c CONNS] [-d SECONDS] [-w WARMUP] [-s BYTES] [-p PIPELINE]
 *
 * Each connection keeps PIPELINE messages of BYTES in flight (1 = ping-pong).  Prints one
 * JSON object: messages, msgs_per_s, mib_per_s, errors, mismatches, latency percentiles.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Log-linear latency histogram: 64 sub-buckets per power of two (< 1.6% error). */
#define SUB 64
#define POW 40
static uint64_t hist[POW * SUB];

static void record(uint64_t ns) {
    uint64_t v = ns < SUB ? SUB : ns;
    int p = 63 - __builtin_clzll(v) - 6; /* v in [SUB<<p, SUB<<(p+1)) */
    int s = (int)(v >> p) - SUB;
    if (p >= POW) { p = POW - 1; s = SUB - 1; }
    hist[p * SUB + s]++;
}

static double percentile(double q, uint64_t total) {
    uint64_t want = (uint64_t)(q * (double)total), seen = 0;
    for (int i = 0; i < POW * SUB; i++) {
        seen += hist[i];
        if (seen > want && hist[i]) {
            int p = i / SUB, s = i % SUB;
            return (double)(((uint64_t)(SUB + s) << p) + ((1ULL << p) / 2)) / 1000.0;
        }
    }
    return 0;
}

struct conn {
    int fd;
    size_t tx_left;     /* bytes of queued messages not yet written */
    size_t tx_off;      /* offset into the payload of the next byte to write */
    size_t rx_off;      /* offset into the payload of the next byte expected */
    uint64_t *sent_at;  /* ring of send timestamps, one per message in flight */
    unsigned head, tail;
    int want_out;
};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static unsigned char *payload;
static size_t size = 64;
static unsigned pipeline = 1;
static int ep;

static int flush(struct conn *c) {
    while (c->tx_left) {
        size_t n = size - c->tx_off;
        if (n > c->tx_left) n = c->tx_left;
        ssize_t w = send(c->fd, payload + c->tx_off, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) break;
            return -1;
        }
        c->tx_left -= (size_t)w;
        c->tx_off = (c->tx_off + (size_t)w) % size;
    }
    int want = c->tx_left > 0;
    if (want != c->want_out) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = want;
    }
    return 0;
}

static void send_message(struct conn *c) {
    c->sent_at[c->head++ % pipeline] = now_ns();
    c->tx_left += size;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: loadgen HOST PORT [-c N] [-d S] [-w S] [-s BYTES] [-p K]\n");
        return 2;
    }
    const char *host = argv[1], *port = argv[2];
    int nconn = 50;
    double duration = 5, warmup = 1;
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-c")) nconn = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-d")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "-w")) warmup = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "-s")) size = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "-p")) pipeline = (unsigned)atoi(argv[i + 1]);
        else { fprintf(stderr, "loadgen: unknown option %s\n", argv[i]); return 2; }
    }
    if (nconn < 1 || size < 1 || pipeline < 1) { fprintf(stderr, "loadgen: bad values\n"); return 2; }

    payload = malloc(size);
    for (size_t i = 0; i < size; i++) payload[i] = (unsigned char)(i * 131 + 7);

    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
    int rc = getaddrinfo(host, port, &hints, &ai);
    if (rc) { fprintf(stderr, "loadgen: %s: %s\n", host, gai_strerror(rc)); return 1; }

    ep = epoll_create1(0);
    struct conn *conns = calloc((size_t)nconn, sizeof *conns);
    for (int i = 0; i < nconn; i++) {
        struct conn *c = &conns[i];
        c->fd = socket(ai->ai_family, SOCK_STREAM, 0);
        if (c->fd < 0 || connect(c->fd, ai->ai_addr, ai->ai_addrlen) < 0) {
            fprintf(stderr, "loadgen: connect %d: %s\n", i, strerror(errno));
            return 1;
        }
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, O_NONBLOCK);
        c->sent_at = calloc(pipeline, sizeof(uint64_t));
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    }
    freeaddrinfo(ai);

    uint64_t start = now_ns();
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
    uint64_t end = measure_from + (uint64_t)(duration * 1e9);
    for (int i = 0; i < nconn; i++) {
        for (unsigned k = 0; k < pipeline; k++) send_message(&conns[i]);
        flush(&conns[i]);
    }

    uint64_t messages = 0, errors = 0, mismatches = 0;
    static unsigned char buf[1 << 16];
    struct epoll_event evs[512];
    int open_conns = nconn;
    while (open_conns > 0) {
        uint64_t t = now_ns();
        if (t >= end) break;
        int n = epoll_wait(ep, evs, 512, 100);
        for (int e = 0; e < n; e++) {
            struct conn *c = evs[e].data.ptr;
            if (c->fd < 0) continue;
            if (evs[e].events & EPOLLOUT && flush(c) < 0) goto broken;
            if (!(evs[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP))) continue;
            ssize_t r = recv(c->fd, buf, sizeof buf, 0);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0) goto broken;
            uint64_t done_at = now_ns();
            for (size_t off = 0; off < (size_t)r;) {
                size_t chunk = size - c->rx_off;
                if (chunk > (size_t)r - off) chunk = (size_t)r - off;
                if (memcmp(buf + off, payload + c->rx_off, chunk)) mismatches++;
                off += chunk;
                c->rx_off += chunk;
                if (c->rx_off == size) {
                    c->rx_off = 0;
                    uint64_t sent = c->sent_at[c->tail++ % pipeline];
                    if (sent >= measure_from && done_at < end) {
                        messages++;
                        record(done_at - sent);
                    }
                    send_message(c);
                }
            }
            if (flush(c) < 0) goto broken;
            continue;
        broken:
            errors++;
            close(c->fd);
            c->fd = -1;
            open_conns--;
        }
    }
    double secs = duration;
    printf("{\"connections\": %d, \"size\": %zu, \"pipeline\": %u, \"duration_s\": %.3f, "
           "\"messages\": %llu, \"msgs_per_s\": %.1f, \"mib_per_s\": %.3f, \"errors\": %llu, "
           "\"mismatches\": %llu, \"latency_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, "
           "\"p999\": %.1f}}\n",
           nconn, size, pipeline, secs, (unsigned long long)messages, (double)messages / secs,
           (double)messages * (double)size / secs / 1048576.0, (unsigned long long)errors,
           (unsigned long long)mismatches, percentile(0.5, messages), percentile(0.9, messages),
           percentile(0.99, messages), percentile(0.999, messages));
    for (int i = 0; i < nconn; i++)
        if (conns[i].fd >= 0) close(conns[i].fd);
    return errors || mismatches ? 1 : 0;
}
