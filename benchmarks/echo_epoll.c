/*
 * echo_epoll: a minimal single-threaded epoll echo server, the "fast echo server" that
 * benchmarks/bench_speed.py uses to see whether a load generator (rather than the server)
 * is the bottleneck.  Listens on 127.0.0.1, port 0 unless given, and reports
 * "listening on 127.0.0.1:PORT" on stderr, and READY=1 with X_AECHO_LISTEN=127.0.0.1:PORT to
 * $NOTIFY_SOCKET (sd_notify, as aecho serve does).  SIGTERM/SIGINT end it.
 *
 *   echo_epoll [PORT]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define BUF 65536

struct conn {
    int fd;
    size_t pending, off; /* bytes read but not yet written back (the peer is slow) */
    char buf[BUF];
};

static volatile sig_atomic_t stop;

/* sd_notify without libsystemd: one datagram to the socket named by $NOTIFY_SOCKET. */
static void notify_ready(int port) {
    const char *path = getenv("NOTIFY_SOCKET");
    if (path == NULL || (path[0] != '/' && path[0] != '@')) return;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    if (len >= sizeof sa.sun_path) return;
    memcpy(sa.sun_path, path, len);
    if (path[0] == '@') sa.sun_path[0] = '\0'; /* the abstract namespace, as sd_notify reads it */
    char msg[64];
    int n = snprintf(msg, sizeof msg, "READY=1\nX_AECHO_LISTEN=127.0.0.1:%d", port);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return;
    sendto(fd, msg, (size_t)n, 0, (struct sockaddr *)&sa,
           (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    close(fd);
}
static void on_signal(int sig) { (void)sig; stop = 1; }

static void drop(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096) ||
        getsockname(ls, (struct sockaddr *)&a, &alen)) {
        perror("echo_epoll: listen");
        return 1;
    }
    fprintf(stderr, "listening on 127.0.0.1:%d\n", ntohs(a.sin_port));
    notify_ready(ntohs(a.sin_port));

    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[512];
    while (!stop) {
        int n = epoll_wait(ep, evs, 512, 200);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) { /* the listener */
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
                }
                continue;
            }
            if (c->pending) { /* writable again: flush, then read again */
                ssize_t w = write(c->fd, c->buf + c->off, c->pending);
                if (w < 0 && errno != EAGAIN) { drop(ep, c); continue; }
                if (w > 0) { c->off += (size_t)w; c->pending -= (size_t)w; }
                if (c->pending) continue;
                struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ce);
                continue;
            }
            ssize_t r = read(c->fd, c->buf, BUF);
            if (r == 0 || (r < 0 && errno != EAGAIN)) { drop(ep, c); continue; }
            if (r < 0) continue;
            ssize_t w = write(c->fd, c->buf, (size_t)r);
            if (w < 0 && errno != EAGAIN) { drop(ep, c); continue; }
            if (w < r) { /* stop reading until the rest is out */
                c->off = w > 0 ? (size_t)w : 0;
                c->pending = (size_t)r - c->off;
                struct epoll_event ce = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ce);
            }
        }
    }
    return 0;
}
