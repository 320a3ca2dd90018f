// Load generators and the echo upstream for bench/run. One binary, four subcommands:
//
//   tools echo  ADDR PORT THREADS             echo server (epoll, one loop per thread)
//   tools lat   ADDR PORT COUNT WARMUP SIZE [proxy]
//                                             request/response round trips on one connection
//                                             (proxy: a PROXY v1 header first, as from a
//                                             trusted proxy)
//   tools rate  ADDR PORT INFLIGHT SECONDS SIZE MAXCONNS
//                                             connect, SIZE-byte echo, close; INFLIGHT at once
//   tools idle  ADDR PORT COUNT INFLIGHT SIZE open COUNT connections, echo on each, hold until
//                                             a line arrives on stdin, echo on each again
//   tools floor ADDR PORT UPPORT [PORT UPPORT ...]
//                                             the least a relay can be: per connection two
//                                             threads, each a blocking recv then send, one wake
//                                             and two syscalls per message; no limits, no logs,
//                                             no timeouts (the kernel's share of relaying)
//
// Results are one JSON object a line on stdout. Every wait is bounded: a connection that
// does not answer within TIMEOUT_MS counts as a failure. Compiled by bench/run at run time
// (gcc -O2 -pthread), never installed.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TIMEOUT_MS 5000
#define MAXSIZE 65536

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "tools: %s: %s\n", what, strerror(errno));
    exit(2);
}

static struct sockaddr_in parse_addr(const char *host, const char *port) {
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "tools: bad IPv4 address %s\n", host);
        exit(2);
    }
    return sa;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void fill(unsigned char *buf, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)(seed * 131u + i * 7u + 1u);
}

/* ---------------------------------------------------------------- echo server */

static int echo_listener;

static void write_all_blocking(int fd, const char *buf, ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, (size_t)n);
        if (w > 0) {
            buf += w;
            n -= w;
        } else if (w < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, TIMEOUT_MS) <= 0) return;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else {
            return;
        }
    }
}

static void *echo_loop(void *arg) {
    (void)arg;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.fd = echo_listener};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, echo_listener, &ev) < 0) die("epoll_ctl listener");
    static __thread char buf[MAXSIZE];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == echo_listener) {
                for (int k = 0; k < 64; k++) {
                    int c = accept4(echo_listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) break;
                    nodelay(c);
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev) < 0) close(c);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                write_all_blocking(fd, buf, r);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(fd); /* closing removes it from the epoll set */
            }
        }
    }
    return NULL;
}

static int cmd_echo(int argc, char **argv) {
    if (argc < 3) return 2;
    struct sockaddr_in sa = parse_addr(argv[0], argv[1]);
    int threads = atoi(argv[2]);
    if (threads < 1) threads = 1;
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    echo_listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(echo_listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(echo_listener, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(echo_listener, 4096) < 0) die("listen");
    pthread_t t[64];
    if (threads > 64) threads = 64;
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, echo_loop, NULL);
    printf("{\"ready\":true}\n");
    fflush(stdout);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    return 0;
}

/* ---------------------------------------------------------------- latency client */

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int read_exact(int fd, unsigned char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r > 0) got += (size_t)r;
        else if (r < 0 && errno == EINTR) continue;
        else return -1;
    }
    return 0;
}

static int cmd_lat(int argc, char **argv) {
    if (argc < 5) return 2;
    struct sockaddr_in sa = parse_addr(argv[0], argv[1]);
    long count = atol(argv[2]), warmup = atol(argv[3]);
    size_t size = (size_t)atol(argv[4]);
    if (size < 1 || size > MAXSIZE || count < 1) return 2;
    signal(SIGPIPE, SIG_IGN);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct timeval tv = {.tv_sec = TIMEOUT_MS / 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("connect");
    nodelay(fd);
    if (argc > 5 && !strcmp(argv[5], "proxy")) {
        const char *hdr = "PROXY TCP4 192.0.2.7 127.0.0.1 40000 22\r\n";
        if (write(fd, hdr, strlen(hdr)) != (ssize_t)strlen(hdr)) die("write PROXY header");
    }
    unsigned char out[MAXSIZE], in[MAXSIZE];
    uint64_t *rtt = calloc((size_t)count, sizeof *rtt);
    long errors = 0;
    for (long i = -warmup; i < count; i++) {
        fill(out, size, (unsigned)i);
        uint64_t t0 = now_ns();
        if (write(fd, out, size) != (ssize_t)size) die("write");
        if (read_exact(fd, in, size) < 0) die("read");
        uint64_t t1 = now_ns();
        if (memcmp(in, out, size) != 0) errors++;
        if (i >= 0) rtt[i] = t1 - t0;
    }
    close(fd);
    double sum = 0;
    for (long i = 0; i < count; i++) sum += rtt[i];
    qsort(rtt, (size_t)count, sizeof *rtt, cmp_u64);
#define PCT(p) (rtt[(long)((p) * (count - 1) + 0.5)] / 1000.0)
    printf("{\"count\":%ld,\"mismatch\":%ld,\"min_us\":%.2f,\"p50_us\":%.2f,\"p90_us\":%.2f,"
           "\"p99_us\":%.2f,\"p999_us\":%.2f,\"max_us\":%.2f,\"mean_us\":%.2f}\n",
           count, errors, rtt[0] / 1000.0, PCT(0.50), PCT(0.90), PCT(0.99), PCT(0.999),
           rtt[count - 1] / 1000.0, sum / count / 1000.0);
    return errors ? 1 : 0;
}

/* ---------------------------------------------------------------- connection rate */

enum { S_FREE, S_CONNECTING, S_READING };

struct slot {
    int fd;
    int state;
    size_t got;
    double deadline;
    unsigned seed;
};

struct fails {
    long connect, reset, eof, timeout, mismatch, other;
};

static long total_fails(const struct fails *f) {
    return f->connect + f->reset + f->eof + f->timeout + f->mismatch + f->other;
}

static int start_conn(struct slot *s, const struct sockaddr_in *sa, long idx,
                      struct fails *f) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        f->other++;
        return -1;
    }
    nodelay(fd);
    int r = connect(fd, (const struct sockaddr *)sa, sizeof *sa);
    if (r < 0 && errno != EINPROGRESS) {
        f->connect++;
        close(fd);
        return -1;
    }
    s->fd = fd;
    s->state = S_CONNECTING;
    s->got = 0;
    s->seed = (unsigned)idx;
    s->deadline = now_s() + TIMEOUT_MS / 1000.0;
    return fd;
}

/* Drive one slot after an event. Returns 1 when the connection finished (ok or failed). */
static int step_conn(struct slot *s, size_t size, long *ok, struct fails *f) {
    unsigned char out[MAXSIZE], in[MAXSIZE];
    if (s->state == S_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            f->connect++;
            return 1;
        }
        struct sockaddr_in peer;
        socklen_t pl = sizeof peer;
        if (getpeername(s->fd, (struct sockaddr *)&peer, &pl) < 0) return 0; /* not yet */
        fill(out, size, s->seed);
        ssize_t w = write(s->fd, out, size);
        if (w != (ssize_t)size) {
            if (w < 0 && errno == EAGAIN) return 0;
            if (w < 0 && (errno == ECONNRESET || errno == EPIPE)) f->reset++;
            else f->other++;
            return 1;
        }
        s->state = S_READING;
        return 0;
    }
    for (;;) {
        ssize_t r = read(s->fd, in + 0, size - s->got);
        if (r > 0) {
            /* compare this chunk against the expected bytes at its offset */
            fill(out, size, s->seed);
            if (memcmp(in, out + s->got, (size_t)r) != 0) {
                f->mismatch++;
                return 1;
            }
            s->got += (size_t)r;
            if (s->got == size) {
                (*ok)++;
                return 1;
            }
            continue;
        }
        if (r == 0) {
            f->eof++;
            return 1;
        }
        if (errno == EAGAIN) return 0;
        if (errno == EINTR) continue;
        if (errno == ECONNRESET) f->reset++;
        else f->other++;
        return 1;
    }
}

static int cmd_rate(int argc, char **argv) {
    if (argc < 6) return 2;
    struct sockaddr_in sa = parse_addr(argv[0], argv[1]);
    int inflight = atoi(argv[2]);
    double seconds = atof(argv[3]);
    size_t size = (size_t)atol(argv[4]);
    long maxconns = atol(argv[5]);
    if (inflight < 1 || inflight > 4096 || size < 1 || size > MAXSIZE) return 2;
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct slot *slots = calloc((size_t)inflight, sizeof *slots);
    struct fails f = {0};
    long ok = 0, started = 0;
    double t0 = now_s(), stop_at = t0 + seconds;
    int active = 0;
    for (;;) {
        double t = now_s();
        /* fill free slots while the run lasts */
        for (int i = 0; i < inflight; i++) {
            if (slots[i].state != S_FREE) continue;
            if (t >= stop_at || started >= maxconns) break;
            int fd = start_conn(&slots[i], &sa, started++, &f);
            if (fd < 0) continue;
            struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)i};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            active++;
        }
        if (active == 0 && (t >= stop_at || started >= maxconns)) break;
        struct epoll_event evs[256];
        int n = epoll_wait(ep, evs, 256, 100);
        for (int k = 0; k < n; k++) {
            struct slot *s = &slots[evs[k].data.u32];
            if (s->state == S_FREE) continue;
            if (step_conn(s, size, &ok, &f)) {
                close(s->fd);
                s->state = S_FREE;
                active--;
            } else if (s->state == S_READING) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = evs[k].data.u32};
                epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
            }
        }
        t = now_s();
        for (int i = 0; i < inflight; i++) {
            if (slots[i].state != S_FREE && t > slots[i].deadline) {
                f.timeout++;
                close(slots[i].fd);
                slots[i].state = S_FREE;
                active--;
            }
        }
    }
    double elapsed = now_s() - t0;
    printf("{\"ok\":%ld,\"failed\":%ld,\"fail_connect\":%ld,\"fail_reset\":%ld,\"fail_eof\":%ld,"
           "\"fail_timeout\":%ld,\"fail_mismatch\":%ld,\"fail_other\":%ld,\"elapsed_s\":%.3f,"
           "\"conns_per_s\":%.1f}\n",
           ok, total_fails(&f), f.connect, f.reset, f.eof, f.timeout, f.mismatch, f.other, elapsed,
           ok / elapsed);
    return 0;
}

/* ---------------------------------------------------------------- idle scale */

/* Echo once on each fd in fds[0..n) with at most `inflight` at once. Returns how many
   succeeded; failed fds are closed and set to -1. When `connect_first`, fds are opened here. */
static long echo_round(int *fds, long n, int inflight, size_t size, const struct sockaddr_in *sa,
                       int connect_first, struct fails *f) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct slot *slots = calloc((size_t)inflight, sizeof *slots);
    long *owner = calloc((size_t)inflight, sizeof *owner);
    long next = 0, ok = 0;
    int active = 0;
    for (;;) {
        for (int i = 0; i < inflight && next < n; i++) {
            if (slots[i].state != S_FREE) continue;
            long idx = next++;
            struct slot *s = &slots[i];
            if (connect_first) {
                if (start_conn(s, sa, idx, f) < 0) {
                    fds[idx] = -1;
                    continue;
                }
            } else {
                if (fds[idx] < 0) continue;
                s->fd = fds[idx];
                s->state = S_CONNECTING; /* connected already: step_conn writes at once */
                s->got = 0;
                s->seed = (unsigned)idx + 7777u;
                s->deadline = now_s() + TIMEOUT_MS / 1000.0;
            }
            owner[i] = idx;
            fds[idx] = s->fd;
            struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)i};
            epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
            active++;
        }
        if (active == 0 && next >= n) break;
        struct epoll_event evs[256];
        int m = epoll_wait(ep, evs, 256, 100);
        for (int k = 0; k < m; k++) {
            int i = (int)evs[k].data.u32;
            struct slot *s = &slots[i];
            if (s->state == S_FREE) continue;
            long before_ok = ok;
            if (step_conn(s, size, &ok, f)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                if (ok == before_ok) {
                    close(s->fd);
                    fds[owner[i]] = -1;
                }
                s->state = S_FREE;
                active--;
            } else if (s->state == S_READING) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)i};
                epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
            }
        }
        double t = now_s();
        for (int i = 0; i < inflight; i++) {
            if (slots[i].state != S_FREE && t > slots[i].deadline) {
                f->timeout++;
                epoll_ctl(ep, EPOLL_CTL_DEL, slots[i].fd, NULL);
                close(slots[i].fd);
                fds[owner[i]] = -1;
                slots[i].state = S_FREE;
                active--;
            }
        }
    }
    close(ep);
    free(slots);
    free(owner);
    return ok;
}

static int cmd_idle(int argc, char **argv) {
    if (argc < 5) return 2;
    struct sockaddr_in sa = parse_addr(argv[0], argv[1]);
    long count = atol(argv[2]);
    int inflight = atoi(argv[3]);
    size_t size = (size_t)atol(argv[4]);
    if (count < 1 || inflight < 1 || inflight > 4096 || size < 1 || size > MAXSIZE) return 2;
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    int *fds = calloc((size_t)count, sizeof *fds);
    struct fails f1 = {0}, f2 = {0};
    double t0 = now_s();
    long ok1 = echo_round(fds, count, inflight, size, &sa, 1, &f1);
    printf("{\"phase\":\"open\",\"ok\":%ld,\"failed\":%ld,\"fail_connect\":%ld,\"fail_reset\":%ld,"
           "\"fail_eof\":%ld,\"fail_timeout\":%ld,\"fail_mismatch\":%ld,\"fail_other\":%ld,"
           "\"elapsed_s\":%.3f}\n",
           ok1, total_fails(&f1), f1.connect, f1.reset, f1.eof, f1.timeout, f1.mismatch, f1.other,
           now_s() - t0);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) { /* parent gone: stop */
    }
    t0 = now_s();
    long ok2 = echo_round(fds, count, inflight, size, &sa, 0, &f2);
    printf("{\"phase\":\"after\",\"ok\":%ld,\"failed\":%ld,\"fail_connect\":%ld,\"fail_reset\":%ld,"
           "\"fail_eof\":%ld,\"fail_timeout\":%ld,\"fail_mismatch\":%ld,\"fail_other\":%ld,"
           "\"elapsed_s\":%.3f}\n",
           ok2, total_fails(&f2), f2.connect, f2.reset, f2.eof, f2.timeout, f2.mismatch, f2.other,
           now_s() - t0);
    fflush(stdout);
    for (long i = 0; i < count; i++)
        if (fds[i] >= 0) close(fds[i]);
    return 0;
}

/* ---------------------------------------------------------------- floor relay */

struct floor_pair {
    int client, upstream;
    int done; /* directions finished; the second closes both sockets */
    pthread_mutex_t lock;
};

struct floor_dir {
    struct floor_pair *pair;
    int from, to;
};

static void *floor_copy(void *arg) {
    struct floor_dir *d = arg;
    char buf[MAXSIZE];
    for (;;) {
        ssize_t r = recv(d->from, buf, sizeof buf, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        ssize_t off = 0;
        while (off < r) {
            ssize_t w = send(d->to, buf + off, (size_t)(r - off), MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) goto out;
            off += w;
        }
    }
out:
    shutdown(d->to, SHUT_WR);
    struct floor_pair *p = d->pair;
    free(d);
    pthread_mutex_lock(&p->lock);
    int last = ++p->done == 2;
    pthread_mutex_unlock(&p->lock);
    if (last) {
        close(p->client);
        close(p->upstream);
        pthread_mutex_destroy(&p->lock);
        free(p);
    }
    return NULL;
}

struct floor_listener {
    int fd;
    struct sockaddr_in upstream;
};

static void floor_start(pthread_attr_t *attr, struct floor_pair *p, int from, int to) {
    struct floor_dir *d = malloc(sizeof *d);
    d->pair = p;
    d->from = from;
    d->to = to;
    pthread_t t;
    if (pthread_create(&t, attr, floor_copy, d) != 0) die("pthread_create");
}

static void *floor_accept(void *arg) {
    struct floor_listener *l = arg;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 4 * MAXSIZE);
    for (;;) {
        int c = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            die("accept4");
        }
        int u = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (u < 0 || connect(u, (struct sockaddr *)&l->upstream, sizeof l->upstream) < 0) {
            if (u >= 0) close(u);
            close(c);
            continue;
        }
        nodelay(c);
        nodelay(u);
        struct floor_pair *p = calloc(1, sizeof *p);
        p->client = c;
        p->upstream = u;
        pthread_mutex_init(&p->lock, NULL);
        floor_start(&attr, p, c, u);
        floor_start(&attr, p, u, c);
    }
    return NULL;
}

static int cmd_floor(int argc, char **argv) {
    if (argc < 3 || (argc - 1) % 2) return 2;
    int n = (argc - 1) / 2;
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    pthread_t t[64];
    if (n > 64) return 2;
    for (int i = 0; i < n; i++) {
        struct floor_listener *l = calloc(1, sizeof *l);
        struct sockaddr_in sa = parse_addr(argv[0], argv[1 + 2 * i]);
        l->upstream = parse_addr(argv[0], argv[2 + 2 * i]);
        l->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(l->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(l->fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
        if (listen(l->fd, 4096) < 0) die("listen");
        pthread_create(&t[i], NULL, floor_accept, l);
    }
    for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2) {
        if (!strcmp(argv[1], "echo")) return cmd_echo(argc - 2, argv + 2);
        if (!strcmp(argv[1], "lat")) return cmd_lat(argc - 2, argv + 2);
        if (!strcmp(argv[1], "rate")) return cmd_rate(argc - 2, argv + 2);
        if (!strcmp(argv[1], "idle")) return cmd_idle(argc - 2, argv + 2);
        if (!strcmp(argv[1], "floor")) return cmd_floor(argc - 2, argv + 2);
    }
    fprintf(stderr, "usage: tools echo|lat|rate|idle|floor ... (see the comment at the top of tools.c)\n");
    return 2;
}
