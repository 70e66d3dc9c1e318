/* A UDP round trip for the network tests: `udp_echo ADDRESS PORT MESSAGE` sends MESSAGE from a
 * connected socket and prints the reply, or the error (a refused port is ECONNREFUSED on a
 * connected socket once the ICMP port-unreachable arrives). Exit 0 on a reply, 1 otherwise.
 * Built static on the host by the test, run in the guest's initramfs (busybox nc has no UDP). */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: udp_echo ADDRESS PORT MESSAGE\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[1]);
        return 2;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct timeval patience = {.tv_sec = 5};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &patience, sizeof patience);
    if (connect(s, (struct sockaddr *)&to, sizeof to) != 0) {
        printf("connect: %s\n", strerror(errno));
        return 1;
    }
    char reply[512];
    /* A few tries: the first datagram may go before passt knows the guest's MAC. */
    for (int attempt = 0; attempt < 3; attempt++) {
        if (send(s, argv[3], strlen(argv[3]), 0) < 0) {
            printf("send: %s\n", strerror(errno));
            return 1;
        }
        ssize_t n = recv(s, reply, sizeof reply - 1, 0);
        if (n >= 0) {
            reply[n] = 0;
            printf("reply: %s\n", reply);
            return 0;
        }
        if (errno != EAGAIN) {
            printf("recv: %s\n", strerror(errno));
            return 1;
        }
    }
    printf("recv: no reply\n");
    return 1;
}
