/*
 * IDM benchmark driver (C side). Modes:
 *   local-null PATH N SIZE     sync round trips to a host listening at PATH (LocalLink)
 *   local-async PATH N SIZE    N fire-and-forget messages, then one sync call
 *   local-bulk PATH BYTES REPS REPS messages of BYTES (streamed), then one sync call
 *   unix-null PATH N SIZE      the same request/response over a plain unix socket (baseline)
 *   c2c-null|c2c-async N SIZE, c2c-bulk BYTES REPS   as above against a C host in a child process
 *   memcpy BYTES REPS          memcpy bandwidth between two warm buffers (baseline)
 * Prints one JSON object on stdout. With IDM_BENCH_CPUS="H,C" the host side (the c2c child) runs
 * on CPU H and the client on CPU C, so runs do not depend on where the scheduler puts them.
 */
#include "bench.h"
#include "idm.h"
#include "vgpu_calls.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Latency runs start only after this much warm-up: the first few hundred ms of a run on these
 * machines are measurably slower (caches, frequency, the host's scheduler settling). */
#define WARMUP_NS 300000000ull

static void print_latency(const char *mode, uint64_t *lat, long n, size_t size)
{
    double sum = 0;
    qsort(lat, (size_t)n, sizeof(*lat), cmp_u64);
    for (long i = 0; i < n; i++)
        sum += (double)lat[i];
    printf("{\"mode\": \"%s\", \"calls\": %ld, \"size\": %zu, \"p50_ns\": %llu, \"p99_ns\": %llu, "
           "\"mean_ns\": %.1f}\n",
           mode, n, size, (unsigned long long)lat[n / 2], (unsigned long long)lat[n * 99 / 100],
           sum / (double)n);
}

static void sync_call(struct idm_endpoint *ep, uint64_t seq, const void *buf, uint32_t size,
                      void *reply)
{
    struct idm_hdr h;
    int64_t n;
    int rc = idm_send_msg(ep, IDM_OP_NULL, 0, seq, 0, buf, size, -1);
    if (rc)
        die("send", rc);
    n = idm_recv_hdr(ep, &h, 10000);
    if (n < 0)
        die("receive", (int)n);
    if (h.seq != seq || !(h.flags & IDM_F_REPLY) || h.status)
        die("unexpected reply", EPROTO);
    rc = idm_recv_payload(ep, reply, (uint64_t)n, 10000);
    if (rc)
        die("receive payload", rc);
}

static void run_null(struct idm_endpoint *ep, const char *mode, long n, size_t size)
{
    char *buf = calloc(1, size + 1), *reply = calloc(1, size + 1);
    uint64_t *lat = calloc((size_t)n, sizeof(uint64_t));
    for (uint64_t i = 1, t0 = now_ns(); now_ns() - t0 < WARMUP_NS; i++)
        sync_call(ep, i, buf, (uint32_t)size, reply);
    for (long i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        sync_call(ep, (uint64_t)i + 1, buf, (uint32_t)size, reply);
        lat[i] = now_ns() - t0;
    }
    print_latency(mode, lat, n, size);
    free(buf), free(reply), free(lat);
}

static void run_async(struct idm_endpoint *ep, const char *mode, long n, size_t size)
{
    char *buf = calloc(1, size + 1), reply[8];
    uint64_t t0;
    for (long i = 0; i < 1000; i++) /* warm-up */
        if (idm_send_msg(ep, IDM_OP_NULL, IDM_F_ASYNC, 0, 0, buf, (uint32_t)size, -1))
            die("send", -1);
    sync_call(ep, 1, NULL, 0, reply);
    t0 = now_ns();
    for (long i = 0; i < n; i++) {
        int rc = idm_send_msg(ep, IDM_OP_NULL, IDM_F_ASYNC, (uint64_t)i, 0, buf, (uint32_t)size, -1);
        if (rc)
            die("send", rc);
    }
    sync_call(ep, 2, NULL, 0, reply);
    double s = (double)(now_ns() - t0) / 1e9;
    printf("{\"mode\": \"%s\", \"messages\": %ld, \"size\": %zu, \"seconds\": %.6f, "
           "\"msgs_per_s\": %.0f}\n", mode, n, size, s, (double)n / s);
    free(buf);
}

static void run_bulk(struct idm_endpoint *ep, const char *mode, size_t bytes, long reps)
{
    char *buf = malloc(bytes), reply[8];
    uint64_t best = UINT64_MAX;
    memset(buf, 0x5a, bytes);
    for (long r = 0; r <= reps; r++) { /* rep 0 warms both sides' buffers */
        uint64_t t0 = now_ns(), dt;
        int rc = idm_send_msg(ep, IDM_OP_NULL, IDM_F_ASYNC, 0, 0, buf, (uint32_t)bytes, -1);
        if (rc)
            die("send", rc);
        sync_call(ep, (uint64_t)r + 1, NULL, 0, reply);
        dt = now_ns() - t0;
        if (r && dt < best)
            best = dt;
    }
    printf("{\"mode\": \"%s\", \"bytes\": %zu, \"reps\": %ld, \"best_s\": %.6f, "
           "\"gib_per_s\": %.3f}\n", mode, bytes, reps, (double)best / 1e9,
           (double)bytes / ((double)best / 1e9) / (1u << 30));
    free(buf);
}

static void run_memcpy(size_t bytes, long reps)
{
    char *a = malloc(bytes), *b = malloc(bytes);
    uint64_t best = UINT64_MAX;
    memset(a, 1, bytes), memset(b, 2, bytes);
    for (long r = 0; r < reps; r++) {
        uint64_t t0 = now_ns(), dt;
        memcpy(b, a, bytes);
        __asm__ __volatile__("" ::"r"(b) : "memory");
        dt = now_ns() - t0;
        if (dt < best)
            best = dt;
    }
    printf("{\"mode\": \"memcpy\", \"bytes\": %zu, \"reps\": %ld, \"best_s\": %.6f, "
           "\"gib_per_s\": %.3f}\n", bytes, reps, (double)best / 1e9,
           (double)bytes / ((double)best / 1e9) / (1u << 30));
    free(a), free(b);
}

/* The C host for c2c modes: echo sync requests, swallow async ones, until the zone leaves. */
static int serve_c(int listen_fd)
{
    static uint8_t batch[256 * 1024];
    uint32_t offsets[512];
    uint8_t *scratch = NULL;
    uint64_t scratch_len = 0;
    struct idm_local_link link;
    char why[256];
    uint16_t version;
    int sock = accept(listen_fd, NULL, NULL), rc;

    if (sock < 0 || idm_local_accept(&link, sock, why, sizeof(why)))
        return 1;
    if (idm_hello_server(&link.ep, IDM_MAX_PAYLOAD, VGPU_CALL_TABLE_DIGEST, &version, 10000))
        return 1;
    for (;;) {
        int n = idm_recv_batch(&link.ep, batch, sizeof(batch), offsets, 512, 1000);
        if (n == -EMSGSIZE) {
            struct idm_hdr h;
            int64_t len = idm_recv_hdr(&link.ep, &h, 1000);
            if (len < 0)
                break;
            if ((uint64_t)len > scratch_len)
                scratch = realloc(scratch, scratch_len = (uint64_t)len);
            if (idm_recv_payload(&link.ep, scratch, (uint64_t)len, 10000))
                break;
            continue; /* bulk messages are async */
        }
        if (n < 0)
            break;
        for (int i = 0; i < n; i++) {
            struct idm_hdr *h = (struct idm_hdr *)(batch + offsets[i]);
            if (h->flags & IDM_F_ASYNC)
                continue;
            rc = idm_send_msg(&link.ep, h->opcode, IDM_F_REPLY, h->seq, 0, h + 1, h->length, -1);
            if (rc)
                break;
        }
    }
    idm_local_release(&link);
    free(scratch);
    return 0;
}

static int unix_connect(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die("connect", errno);
    return fd;
}

static void run_unix_null(const char *path, long n, size_t size)
{
    int fd = unix_connect(path);
    size_t total = sizeof(struct idm_hdr) + size;
    uint8_t *msg = calloc(1, total), *reply = calloc(1, total);
    uint64_t *lat = calloc((size_t)n, sizeof(uint64_t));
    idm_hdr_init((struct idm_hdr *)msg, IDM_OP_NULL, 0, 0, (uint32_t)size, 0);
    for (uint64_t t0 = now_ns(), t = t0; t - t0 < WARMUP_NS; t = now_ns())
        if (send(fd, msg, total, 0) != (ssize_t)total ||
            recv(fd, reply, total, MSG_WAITALL) != (ssize_t)total)
            die("unix round trip", errno);
    for (long i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        if (send(fd, msg, total, 0) != (ssize_t)total ||
            recv(fd, reply, total, MSG_WAITALL) != (ssize_t)total)
            die("unix round trip", errno);
        lat[i] = now_ns() - t0;
    }
    print_latency("unix-null", lat, n, size);
    close(fd);
}

int main(int argc, char **argv)
{
    struct idm_local_link link;
    const char *mode = argc > 1 ? argv[1] : "";
    char path[108];
    pid_t child = 0;

    pin_self(1);
    if (!strcmp(mode, "memcpy") && argc == 4) {
        run_memcpy(strtoull(argv[2], NULL, 0), atol(argv[3]));
        return 0;
    }
    if (!strcmp(mode, "unix-null") && argc == 5) {
        run_unix_null(argv[2], atol(argv[3]), strtoull(argv[4], NULL, 0));
        return 0;
    }
    if (!strncmp(mode, "c2c-", 4) && argc == 4) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        int lfd = socket(AF_UNIX, SOCK_STREAM, 0);
        snprintf(path, sizeof(path), "/tmp/idm-bench-%d.sock", getpid());
        unlink(path);
        strcpy(addr.sun_path, path);
        if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 1))
            die("listen", errno);
        child = fork();
        if (child == 0) {
            pin_self(0);
            _exit(serve_c(lfd));
        }
        close(lfd);
        argv[1] += 4; /* "null" | "async" | "bulk" */
        memmove(argv + 3, argv + 2, 2 * sizeof(char *));
        argv[2] = path;
        argc = 5;
    } else if (argc == 5 && !strncmp(mode, "local-", 6)) {
        argv[1] += 6;
    } else {
        fprintf(stderr, "usage: see the comment at the top of idm_bench.c\n");
        return 2;
    }
    connect_local(&link, argv[2], 20);
    if (!strcmp(argv[1], "null"))
        run_null(&link.ep, child ? "c2c-null" : "local-null", atol(argv[3]), strtoull(argv[4], NULL, 0));
    else if (!strcmp(argv[1], "async"))
        run_async(&link.ep, child ? "c2c-async" : "local-async", atol(argv[3]), strtoull(argv[4], NULL, 0));
    else if (!strcmp(argv[1], "bulk"))
        run_bulk(&link.ep, child ? "c2c-bulk" : "local-bulk", strtoull(argv[3], NULL, 0), atol(argv[4]));
    else
        die("unknown mode", EINVAL);
    idm_local_release(&link);
    if (child) {
        waitpid(child, NULL, 0);
        unlink(path);
    }
    return 0;
}
