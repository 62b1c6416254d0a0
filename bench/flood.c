/* A flood of new UDP flows for python -m bench.userspace: raw IPv4 packets, each with a new
 * (source address, source port), paced to RATE per second for SECONDS, sent with sendmmsg.
 * usage: flood RATE SECONDS DESTINATION PORT BASE   -> prints "SENT ELAPSED" */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 6) return 2;
    long rate = atol(argv[1]), base = atol(argv[5]);
    double seconds = atof(argv[2]);
    int port = atoi(argv[4]);
    int s = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_in to = {.sin_family = AF_INET};
    inet_pton(AF_INET, argv[3], &to.sin_addr);
    static unsigned char packets[BATCH][28];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    long sent = 0, total = (long)(rate * seconds);
    double start = now();
    while (sent < total) {
        double elapsed = now() - start;
        if (elapsed >= seconds) break;
        long due = (long)(elapsed * rate) + BATCH;
        if (due > total) due = total;
        if (sent >= due) { usleep(100); continue; }
        int n = due - sent > BATCH ? BATCH : (int)(due - sent);
        for (int i = 0; i < n; i++) {
            long k = base + sent + i;
            struct iphdr *ip = (struct iphdr *)packets[i];
            struct udphdr *udp = (struct udphdr *)(packets[i] + 20);
            memset(packets[i], 0, 28);
            ip->version = 4; ip->ihl = 5; ip->tot_len = htons(28); ip->id = htons(k & 0xffff);
            ip->ttl = 64; ip->protocol = IPPROTO_UDP; ip->daddr = to.sin_addr.s_addr;
            ip->saddr = htonl((192u << 24) | (168u << 16) | (50u << 8) | (10 + (k / 64000) % 200));
            udp->source = htons(1024 + k % 64000); udp->dest = htons(port); udp->len = htons(8);
            iov[i] = (struct iovec){packets[i], 28};
            msgs[i] = (struct mmsghdr){.msg_hdr = {.msg_name = &to, .msg_namelen = sizeof to, .msg_iov = &iov[i], .msg_iovlen = 1}};
        }
        int done = sendmmsg(s, msgs, n, 0);
        if (done < 0) { perror("sendmmsg"); return 1; }
        sent += done;
    }
    printf("%ld %f\n", sent, now() - start);
    return 0;
}
