/* loadgen: the harness's compiled load generator (server and client).
 *
 * Compiled by bench/loadgen.py with the system's cc at run time, so that the
 * client's own cost per request is a few microseconds of C, not a Python loop
 * that would hide the data plane's cost.
 *
 *   loadgen server PORT
 *       Echoes on TCP and UDP PORT on every address of its namespace. UDP
 *       replies leave from the address the datagram was sent to (IP_PKTINFO),
 *       so a DNATed flow to any of the Pod's addresses maps back through
 *       conntrack. Prints "ready" once bound; runs until killed.
 *
 *   loadgen MODE IP PORT COUNT SECONDS [FIRST_SOURCE_PORT]
 *       MODE is one of
 *         tcp-rr    one TCP connection, COUNT request/response round trips
 *         udp-rr    one connected UDP socket, COUNT round trips
 *         tcp-crr   COUNT times: socket, connect, request, response, close
 *         udp-crr   COUNT times: new socket (new source port), request, response, close
 *       Stops after COUNT timed requests or SECONDS, whichever comes first;
 *       the rr modes first make 50 untimed round trips. Prints one line
 *       "ok N failed M" then N lines of latencies in nanoseconds, then one
 *       line per errno seen, "errno E COUNT". Each request waits at most 1 s.
 *       Exit status 0 unless the arguments were bad or the rr flow could not
 *       be opened.
 *       With FIRST_SOURCE_PORT, udp-crr binds its sockets to that port and the
 *       ones after it (wrapping from 65000 to 1024), skipping ports in use.
 *       The caller moves it on between runs so that no port is reused while
 *       the node may still hold a conntrack entry for it: a datagram that
 *       matches an existing entry skips NAT, and that is not a first packet.
 *       TCP needs no such care: a SYN that meets an old entry in TIME_WAIT
 *       starts a new one, and a new NAT decision.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
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

#define MESSAGE 16
#define MAX_ERRNO 256

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void timeouts(int fd) {
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* also bounds a blocking connect() */
}

/* ---- server ---- */

static int serve(int port) {
    struct sockaddr_in any = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    int one = 1;
    int tcp = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int udp = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (tcp < 0 || udp < 0) return perror("socket"), 1;
    setsockopt(tcp, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(udp, IPPROTO_IP, IP_PKTINFO, &one, sizeof one);
    if (bind(tcp, (struct sockaddr *)&any, sizeof any) || listen(tcp, 4096) ||
        bind(udp, (struct sockaddr *)&any, sizeof any))
        return perror("bind"), 1;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = tcp;
    epoll_ctl(ep, EPOLL_CTL_ADD, tcp, &ev);
    ev.data.fd = udp;
    epoll_ctl(ep, EPOLL_CTL_ADD, udp, &ev);
    printf("ready\n");
    fflush(stdout);

    char buf[2048];
    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(ep, events, 64, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == tcp) {
                int c;
                while ((c = accept4(tcp, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
            } else if (fd == udp) {
                for (;;) {
                    struct sockaddr_in peer;
                    char control[CMSG_SPACE(sizeof(struct in_pktinfo))];
                    struct iovec iov = {buf, sizeof buf};
                    struct msghdr msg = {.msg_name = &peer, .msg_namelen = sizeof peer, .msg_iov = &iov,
                                         .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
                    ssize_t got = recvmsg(udp, &msg, 0);
                    if (got < 0) break;
                    struct in_pktinfo *info = NULL;
                    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
                        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO)
                            info = (struct in_pktinfo *)CMSG_DATA(c);
                    char out_control[CMSG_SPACE(sizeof(struct in_pktinfo))];
                    memset(out_control, 0, sizeof out_control);
                    iov.iov_len = (size_t)got;
                    struct msghdr reply = {.msg_name = &peer, .msg_namelen = sizeof peer, .msg_iov = &iov,
                                           .msg_iovlen = 1};
                    if (info) {
                        reply.msg_control = out_control;
                        reply.msg_controllen = sizeof out_control;
                        struct cmsghdr *c = CMSG_FIRSTHDR(&reply);
                        c->cmsg_level = IPPROTO_IP;
                        c->cmsg_type = IP_PKTINFO;
                        c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
                        struct in_pktinfo *out = (struct in_pktinfo *)CMSG_DATA(c);
                        out->ipi_spec_dst = info->ipi_addr; /* answer from the address that was asked */
                    }
                    sendmsg(udp, &reply, 0);
                }
            } else {
                ssize_t got = read(fd, buf, sizeof buf);
                if (got > 0) {
                    if (write(fd, buf, (size_t)got) < 0) close(fd);
                } else if (got == 0 || errno != EAGAIN) {
                    close(fd); /* also leaves the epoll set */
                }
            }
        }
    }
}

/* ---- client ---- */

static int exchange(int fd) {
    char out[MESSAGE] = "dataplane-bench", in[MESSAGE];
    if (send(fd, out, MESSAGE, 0) != MESSAGE) return -1;
    size_t have = 0;
    while (have < MESSAGE) {
        ssize_t got = recv(fd, in + have, MESSAGE - have, 0);
        if (got < 0) return -1;
        if (got == 0) return errno = ECONNRESET, -1;
        have += (size_t)got;
    }
    return 0;
}

#define PORT_LOW 1024
#define PORT_HIGH 65000

static int next_port; /* 0: the kernel picks source ports */

static int bind_next(int fd) {
    for (int tries = 0; tries < 100; tries++) {
        struct sockaddr_in from = {.sin_family = AF_INET, .sin_port = htons(next_port)};
        next_port = next_port >= PORT_HIGH ? PORT_LOW : next_port + 1;
        if (bind(fd, (struct sockaddr *)&from, sizeof from) == 0) return 0;
        if (errno != EADDRINUSE) return -1;
    }
    return -1;
}

static int open_flow(int type, const struct sockaddr_in *to) {
    int fd = socket(AF_INET, type, 0);
    if (fd < 0) return -1;
    int one = 1;
    timeouts(fd);
    if (type == SOCK_DGRAM && next_port && bind_next(fd)) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    if (type == SOCK_STREAM) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (const struct sockaddr *)to, sizeof *to)) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "server")) return serve(atoi(argv[2]));
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: loadgen server PORT | "
                        "loadgen tcp-rr|udp-rr|tcp-crr|udp-crr IP PORT COUNT SECONDS [FIRST_SOURCE_PORT]\n");
        return 2;
    }
    if (argc == 7) {
        next_port = atoi(argv[6]);
        if (next_port < PORT_LOW || next_port > PORT_HIGH) {
            fprintf(stderr, "loadgen: FIRST_SOURCE_PORT must be within %d-%d\n", PORT_LOW, PORT_HIGH);
            return 2;
        }
    }
    const char *mode = argv[1];
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    long count = atol(argv[4]);
    double seconds = atof(argv[5]);
    if (inet_pton(AF_INET, argv[2], &to.sin_addr) != 1 || count <= 0 || seconds <= 0) {
        fprintf(stderr, "loadgen: bad address, count or seconds\n");
        return 2;
    }
    int stream = !strncmp(mode, "tcp", 3);
    int persistent = !strcmp(mode + 3, "-rr");
    if (strcmp(mode + 3, "-rr") && strcmp(mode + 3, "-crr")) {
        fprintf(stderr, "loadgen: unknown mode %s\n", mode);
        return 2;
    }
    int type = stream ? SOCK_STREAM : SOCK_DGRAM;
    uint32_t *samples = calloc((size_t)count, sizeof *samples);
    long errors[MAX_ERRNO] = {0};
    long ok = 0, failed = 0;
    int fd = -1;
    if (persistent) {
        fd = open_flow(type, &to);
        if (fd < 0) return perror("loadgen: connect"), 1;
        for (int i = 0; i < 50; i++)
            if (exchange(fd)) return perror("loadgen: warm-up"), 1;
    }
    uint64_t deadline = now_ns() + (uint64_t)(seconds * 1e9);
    for (long i = 0; i < count && now_ns() < deadline; i++) {
        uint64_t start = now_ns();
        int result;
        if (persistent) {
            result = exchange(fd);
        } else {
            int c = open_flow(type, &to);
            result = c < 0 ? -1 : exchange(c);
            if (c >= 0) close(c);
        }
        uint64_t elapsed = now_ns() - start;
        if (result == 0) {
            samples[ok++] = elapsed > UINT32_MAX ? UINT32_MAX : (uint32_t)elapsed;
        } else {
            failed++;
            errors[errno > 0 && errno < MAX_ERRNO ? errno : 0]++;
            if (persistent) break; /* the flow is gone: report what was measured */
        }
    }
    printf("ok %ld failed %ld\n", ok, failed);
    for (long i = 0; i < ok; i++) printf("%u\n", samples[i]);
    for (int e = 0; e < MAX_ERRNO; e++)
        if (errors[e]) printf("errno %d %ld\n", e, errors[e]);
    return 0;
}
