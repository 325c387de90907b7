/* Helpers every C benchmark driver here shares (header-only: each driver is one program). */
#ifndef BENCH_H
#define BENCH_H

#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "idm.h"
#include "vgpu_calls.h"

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void die(const char *what, int rc)
{
    fprintf(stderr, "%s: %s: %s\n", program_invocation_short_name, what,
            strerror(rc < 0 ? -rc : rc));
    exit(1);
}

/* IDM_BENCH_CPUS="H,C": role 0 (host side) runs on CPU H, role 1 (client) on CPU C. */
static inline void pin_self(int role)
{
    const char *spec = getenv("IDM_BENCH_CPUS");
    int cpus[2];
    cpu_set_t set;

    if (!spec || sscanf(spec, "%d,%d", &cpus[0], &cpus[1]) != 2)
        return;
    CPU_ZERO(&set);
    CPU_SET(cpus[role], &set);
    if (sched_setaffinity(0, sizeof(set), &set))
        die("sched_setaffinity", errno);
}

static inline int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The zone side of a LocalLink to the host listening at `path`, hello done; exits on failure. */
static inline void connect_local(struct idm_local_link *link, const char *path, uint32_t order)
{
    struct idm_layout lay = {order, order};
    char why[256];
    uint16_t version;
    uint32_t agreed;
    int rc = idm_local_connect(link, path, &lay, why, sizeof(why));

    if (rc) {
        fprintf(stderr, "%s: %s\n", program_invocation_short_name, why);
        exit(1);
    }
    rc = idm_hello_client(&link->ep, IDM_MAX_PAYLOAD, VGPU_CALL_TABLE_DIGEST, &version, &agreed,
                          10000);
    if (rc)
        die("hello", rc);
}

#endif
