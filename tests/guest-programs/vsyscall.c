/* A job binary of the CentOS 6 era: it calls the legacy vsyscall page as glibc 2.12 does
 * (gettimeofday at 0xffffffffff600000, time at 0xffffffffff600400). Without the guest kernel's
 * vsyscall emulation it dies of SIGSEGV. No libc, so one `cc -static -nostdlib` build runs in
 * any guest (run_e2e builds it). Prints what it got; exits 0 when both calls worked. */
typedef long (*gettimeofday_fn)(long *tv, void *tz);
typedef long (*time_fn)(long *t);

static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static void say(const char *s) {
    long n = 0;
    while (s[n]) n++;
    sys3(1, 1, (long)s, n);
}

static char *digits(long v, char *end) {
    *--end = 0;
    do { *--end = '0' + v % 10; v /= 10; } while (v);
    return end;
}

__attribute__((force_align_arg_pointer, noreturn)) void _start(void) {
    long tv[2] = {0, 0};
    char buf[32];
    long rc = ((gettimeofday_fn)0xffffffffff600000UL)(tv, 0);
    long t = ((time_fn)0xffffffffff600400UL)(0);
    say("vsyscall gettimeofday rc=");
    say(digits(rc, buf + sizeof buf));
    say(" sec=");
    say(digits(tv[0], buf + sizeof buf));
    say(" time=");
    say(digits(t, buf + sizeof buf));
    say("\n");
    sys3(60, rc == 0 && tv[0] > 1000000000 && t >= tv[0] ? 0 : 1, 0, 0);
    for (;;) {}
}
