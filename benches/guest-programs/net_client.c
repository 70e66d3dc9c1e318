/* The client of the network benchmark (benches/src/network.rs), run on the host and in guests:
 *
 *   net_client ADDR PORT connect N   N sequential TCP connects to ADDR:PORT. Each: connect()
 *                                    returning (the handshake), then reading until the server's
 *                                    close (an accept-and-close server: one round trip more),
 *                                    then close().
 *   net_client ADDR PORT stream N    N MiB to ADDR:PORT in 64 KiB writes, shutdown(SHUT_WR),
 *                                    then read until the server's close (a sink that reads to
 *                                    EOF, so every byte has been read by the server).
 *
 * Prints one line the harness parses (on a guest's serial console too, hence the prefix):
 *
 *   NET_CLIENT connect n=N connect_us=MEDIAN connect_p90_us=P90 close_us=MEDIAN mean_us=MEAN
 *              clock_res_us=R tsc=0|1
 *   NET_CLIENT stream bytes=B seconds=S
 *
 * connect_us: connect() alone; close_us: connect() to the server's close seen (EOF); mean_us:
 * the whole loop (close() and the loop included) / N by CLOCK_MONOTONIC; clock_res_us: that
 * clock's resolution; tsc=1: the medians come from the time-stamp counter (see below). A guest's
 * clock runs at real time under TCG too (QEMU's TSC and timers follow the host's).
 * Exit 0 on success, 1 on a network error (printed as "NET_CLIENT error ..."), 2 on bad usage.
 * Built static (cc -static -O2) so it runs in an initramfs with nothing but busybox. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int fail(const char *what) {
    printf("NET_CLIENT error %s: %s\n", what, strerror(errno));
    fflush(stdout);
    return 1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Quantile q (0..1) of sorted v[0..n), linear interpolation. */
static double quantile(const double *v, int n, double q) {
    double pos = q * (n - 1);
    int lo = (int)pos;
    int hi = lo + 1 < n ? lo + 1 : lo;
    return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

/* Reads until EOF; returns 0, or -1 on an error. */
static int drain(int s) {
    char buf[4096];
    for (;;) {
        ssize_t n = read(s, buf, sizeof buf);
        if (n == 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return -1;
    }
}

/* The per-connection timer: CLOCK_MONOTONIC where it resolves microseconds; else (a guest
 * whose kernel fell back to the jiffies clocksource, as under TCG without HPET or PM timer:
 * 4 ms steps) the CPU's time-stamp counter, scaled by CLOCK_MONOTONIC over the whole loop. */
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
static double tsc_now(void) { return (double)__rdtsc(); }
#define HAVE_TSC 1
#else
#define HAVE_TSC 0
static double tsc_now(void) { return now_s(); }
#endif

static int connect_mode(const struct sockaddr_in *to, int n) {
    struct timespec res;
    clock_getres(CLOCK_MONOTONIC, &res);
    long res_ns = res.tv_sec ? 1000000000L : res.tv_nsec;
    int use_tsc = HAVE_TSC && res_ns > 1000;
    double (*stamp)(void) = use_tsc ? tsc_now : now_s;
    double *conn = calloc(n, sizeof *conn);
    double *closed = calloc(n, sizeof *closed);
    if (!conn || !closed)
        return fail("calloc");
    double start = now_s(), start_stamp = stamp();
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0)
            return fail("socket");
        double t0 = stamp();
        if (connect(s, (const struct sockaddr *)to, sizeof *to) != 0)
            return fail("connect");
        double t1 = stamp();
        if (drain(s) != 0)
            return fail("read");
        double t2 = stamp();
        close(s);
        conn[i] = t1 - t0;
        closed[i] = t2 - t0;
    }
    double total = now_s() - start, total_stamp = stamp() - start_stamp;
    /* Seconds per stamp unit: 1 for the clock, measured for the TSC. */
    double scale = use_tsc ? total / total_stamp : 1.0;
    qsort(conn, n, sizeof *conn, cmp_double);
    qsort(closed, n, sizeof *closed, cmp_double);
    printf("NET_CLIENT connect n=%d connect_us=%.1f connect_p90_us=%.1f close_us=%.1f "
           "mean_us=%.1f clock_res_us=%.3f tsc=%d\n",
           n, quantile(conn, n, 0.5) * scale * 1e6, quantile(conn, n, 0.9) * scale * 1e6,
           quantile(closed, n, 0.5) * scale * 1e6, total / n * 1e6, res_ns / 1e3, use_tsc);
    fflush(stdout);
    return 0;
}

static int stream_mode(const struct sockaddr_in *to, int mib) {
    static char chunk[64 << 10];
    memset(chunk, 0x5a, sizeof chunk);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket");
    double t0 = now_s();
    if (connect(s, (const struct sockaddr *)to, sizeof *to) != 0)
        return fail("connect");
    long long total = (long long)mib << 20, sent = 0;
    while (sent < total) {
        size_t want = sizeof chunk;
        if ((long long)want > total - sent)
            want = (size_t)(total - sent);
        ssize_t n = write(s, chunk, want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail("write");
        }
        sent += n;
    }
    if (shutdown(s, SHUT_WR) != 0)
        return fail("shutdown");
    if (drain(s) != 0)
        return fail("read");
    double t1 = now_s();
    close(s);
    printf("NET_CLIENT stream bytes=%lld seconds=%.6f\n", sent, t1 - t0);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: net_client ADDR PORT connect|stream N\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[1]);
        return 2;
    }
    int n = atoi(argv[4]);
    if (n <= 0) {
        fprintf(stderr, "bad count %s\n", argv[4]);
        return 2;
    }
    if (strcmp(argv[3], "connect") == 0)
        return connect_mode(&to, n);
    if (strcmp(argv[3], "stream") == 0)
        return stream_mode(&to, n);
    fprintf(stderr, "unknown mode %s\n", argv[3]);
    return 2;
}
