/*
 * One guest process of the gpu-proxy zone benchmark (tests/bench/gpu_proxy_zones.py).
 *   zone_client calls PATH WARMUP_NS RUN_NS SPIN_NS
 *       connect to the zone socket at PATH, say hello, print "ready", wait for a line on stdin,
 *       then make synchronous cuDriverGetVersion calls for WARMUP_NS (discarded) + RUN_NS and
 *       print one JSON object: {"calls", "p50_ns", "p99_ns", "mean_ns"}.
 *   zone_client idle PATH
 *       connect, say hello, print "ready", then hold the channel open until stdin closes
 *       (the memory-per-idle-zone measurement: the host-side cost of a connected, quiet zone).
 * SPIN_NS is this side's busy-wait budget before it sleeps on the doorbell. The library default
 * (50 us) suits one client on its own core; with 64 clients sharing a CPU or two, each spinning
 * 50 us would starve the host of the CPU it needs to answer them, so the benchmark passes a small
 * budget (2 us): a reply that is not back that soon is waited for asleep.
 * With IDM_BENCH_CPUS="H,C" the client pins itself to CPU C (the host runs on CPU H).
 */
#include "bench.h"
#include "idm.h"
#include "vgpu_calls.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Ready handshake with the benchmark: all zones connect first, then all start together. */
static void ready_then_wait(void)
{
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin))
        exit(0); /* the benchmark gave up */
}

static void get_version(struct idm_endpoint *ep, uint64_t seq)
{
    struct idm_hdr h;
    uint8_t reply[16];
    int64_t n;
    int rc = idm_send_msg(ep, VGPU_OP_cuDriverGetVersion, 0, seq, 0, NULL, 0, -1);
    if (rc)
        die("send", rc);
    n = idm_recv_hdr(ep, &h, 10000);
    if (n < 0)
        die("receive", (int)n);
    if (h.seq != seq || !(h.flags & IDM_F_REPLY) || h.status || n != 4)
        die("unexpected reply", EPROTO);
    rc = idm_recv_payload(ep, reply, (uint64_t)n, 10000);
    if (rc)
        die("receive payload", rc);
}

static void run_calls(struct idm_endpoint *ep, uint64_t warmup_ns, uint64_t run_ns)
{
    size_t cap = 1 << 16, n = 0;
    uint64_t *lat = malloc(cap * sizeof(*lat)), seq = 1, start, end;
    double sum = 0;

    if (!lat)
        die("malloc", ENOMEM);
    for (uint64_t t0 = now_ns(); now_ns() - t0 < warmup_ns;)
        get_version(ep, seq++);
    start = now_ns();
    end = start + run_ns;
    for (uint64_t t = start; t < end;) {
        uint64_t t1;
        get_version(ep, seq++);
        t1 = now_ns();
        if (n == cap) {
            lat = realloc(lat, (cap *= 2) * sizeof(*lat));
            if (!lat)
                die("realloc", ENOMEM);
        }
        lat[n++] = t1 - t;
        t = t1;
    }
    if (!n)
        die("no calls completed", ETIMEDOUT);
    qsort(lat, n, sizeof(*lat), cmp_u64);
    for (size_t i = 0; i < n; i++)
        sum += (double)lat[i];
    printf("{\"calls\": %zu, \"seconds\": %.6f, \"p50_ns\": %llu, \"p99_ns\": %llu, "
           "\"mean_ns\": %.1f}\n",
           n, (double)(now_ns() - start) / 1e9, (unsigned long long)lat[n / 2],
           (unsigned long long)lat[n * 99 / 100], sum / (double)n);
    free(lat);
}

int main(int argc, char **argv)
{
    struct idm_local_link link;
    const char *mode = argc > 1 ? argv[1] : "";

    pin_self(1);
    if (!strcmp(mode, "calls") && argc == 6) {
        connect_local(&link, argv[2], 19); /* the library default */
        link.ep.spin_ns = (uint32_t)strtoul(argv[5], NULL, 0);
        ready_then_wait();
        run_calls(&link.ep, strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0));
    } else if (!strcmp(mode, "idle") && argc == 3) {
        char line[16];
        connect_local(&link, argv[2], 19); /* the library default */
        printf("ready\n");
        fflush(stdout);
        while (fgets(line, sizeof(line), stdin))
            ;
    } else {
        fprintf(stderr, "usage: see the comment at the top of zone_client.c\n");
        return 2;
    }
    idm_local_release(&link);
    return 0;
}
