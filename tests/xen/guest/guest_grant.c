/*
 * The testbed guest's payload: offer Dom0 one granted page and an unbound event channel through
 * xenstore, wait for Dom0 to write an ack into the page and signal the channel, then check the
 * page. It talks to the kernel devices directly (no libxen*) so the guest image needs nothing but
 * this static binary and busybox.
 *
 * Protocol (paths relative to the guest's home /local/domain/<domid>):
 *   guest: page[0..15] = "vgpu-testbed-v1\0", page[i] = (i * 7 + 3) & 0xff for i >= 16;
 *          data/testbed/gref, data/testbed/port, then data/testbed/state = "offered"
 *   Dom0:  maps the gref, writes "dom0-ack" at offset 4088, notifies the port
 *   guest: data/testbed/state = "acked" or "bad:<reason>"
 * The last console line is "TESTBED-GUEST-RESULT <state>"; exit status 0 only for "acked".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
/* The Linux UAPI headers use these Xen types without defining them. */
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#include <xen/evtchn.h>
#include <xen/gntalloc.h>

#define PAGE 4096
#define MAGIC "vgpu-testbed-v1"   /* 15 characters + NUL = bytes 0..15 */
#define ACK "dom0-ack"
#define ACK_OFF (PAGE - 8)
#define WAIT_MS 120000

/* xenstore wire protocol (xen/io/xs_wire.h, not shipped in the Linux UAPI headers). */
enum { XS_READ = 2, XS_WRITE = 11, XS_ERROR = 16 };
#define XS_PAYLOAD_MAX 4096
struct xs_hdr {
    uint32_t type, req_id, tx_id, len;
};

static int xs_fd = -1;
static uint32_t xs_req;

__attribute__((format(printf, 1, 2))) static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static int read_full(int fd, void *buf, size_t len)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, (char *)buf + got, len - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EPIPE;
        got += (size_t)n;
    }
    return 0;
}

/*
 * One request/reply on /dev/xen/xenbus. The reply payload (NUL-terminated) goes to out.
 * Returns 0, -errno on a device error, or -EPROTO for an XS_ERROR reply (its text is in out).
 */
static int xs_call(uint32_t type, const char *a, const char *b, char *out, size_t outlen)
{
    char msg[sizeof(struct xs_hdr) + XS_PAYLOAD_MAX];
    struct xs_hdr h = {.type = type, .req_id = ++xs_req};
    size_t la = strlen(a) + 1, lb = b ? strlen(b) : 0;
    ssize_t n;
    int r;

    if (xs_fd < 0)
        return -EBADF;
    if (la + lb > XS_PAYLOAD_MAX || outlen == 0)
        return -E2BIG;
    h.len = (uint32_t)(la + lb);
    memcpy(msg, &h, sizeof(h));
    memcpy(msg + sizeof(h), a, la);
    if (b)
        memcpy(msg + sizeof(h) + la, b, lb);
    n = write(xs_fd, msg, sizeof(h) + h.len);
    if (n < 0)
        return -errno;
    if ((size_t)n != sizeof(h) + h.len)
        return -EIO;
    r = read_full(xs_fd, &h, sizeof(h));
    if (r < 0)
        return r;
    if (h.len > XS_PAYLOAD_MAX)
        return -EPROTO;
    r = read_full(xs_fd, msg, h.len);
    if (r < 0)
        return r;
    n = h.len < outlen - 1 ? (ssize_t)h.len : (ssize_t)(outlen - 1);
    memcpy(out, msg, (size_t)n);
    out[n] = '\0';
    if (h.type == XS_ERROR)
        return -EPROTO;
    return h.type == type ? 0 : -EPROTO;
}

static int xs_write(const char *path, const char *value)
{
    char reply[64];
    int r = xs_call(XS_WRITE, path, value, reply, sizeof(reply));
    if (r == -EPROTO)
        say("guest_grant: xenstore write %s=%s refused: %s", path, value, reply);
    else if (r < 0)
        say("guest_grant: xenstore write %s=%s failed: errno %d (%s)", path, value, -r,
            strerror(-r));
    return r;
}

static int finish(const char *state)
{
    if (xs_fd >= 0)
        xs_write("data/testbed/state", state);
    say("TESTBED-GUEST-RESULT %s", state);
    return strcmp(state, "acked") == 0 ? 0 : 1;
}

/* A failed system call: name the step and errno, record "bad:<step>". */
static int fail(const char *step, int err)
{
    char state[64];
    say("guest_grant: step %s failed: errno %d (%s)", step, err, strerror(err));
    snprintf(state, sizeof(state), "bad:%s", step);
    return finish(state);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for an event on `port`, then unmask it. Returns 0, -ETIMEDOUT or -errno. */
static int wait_event(int fd, uint32_t port)
{
    int64_t deadline = now_ms() + WAIT_MS;
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int64_t left = deadline - now_ms();
        uint32_t fired;
        ssize_t n;
        int r;

        if (left <= 0)
            return -ETIMEDOUT;
        r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return -ETIMEDOUT;
        n = read(fd, &fired, sizeof(fired));
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n < 0)
            return -errno;
        if (n != sizeof(fired))
            return -EIO;
        /* The driver masks a port when it fires; writing the port back unmasks it. */
        n = write(fd, &fired, sizeof(fired));
        if (n < 0)
            return -errno;
        if (n != sizeof(fired))
            return -EIO;
        if (fired == port)
            return 0;
        say("guest_grant: event on unexpected port %u, still waiting for %u", fired, port);
    }
}

int main(void)
{
    struct ioctl_gntalloc_alloc_gref alloc = {.domid = 0, .flags = GNTALLOC_FLAG_WRITABLE,
                                              .count = 1};
    struct ioctl_evtchn_bind_unbound_port bind = {.remote_domain = 0};
    volatile unsigned char *page;
    char buf[64];
    int gfd, efd, port, r;

    /* xenstore first, so every later failure can be recorded there. */
    xs_fd = open("/dev/xen/xenbus", O_RDWR | O_CLOEXEC);
    if (xs_fd < 0)
        return fail("xenbus-open", errno);
    r = xs_call(XS_READ, "domid", NULL, buf, sizeof(buf));
    if (r == -EPROTO) {
        say("guest_grant: xenstore read domid refused: %s", buf);
        return fail("xenstore-read", EPROTO);
    }
    if (r < 0)
        return fail("xenstore-read", -r);
    say("guest_grant: domid %s", buf);

    gfd = open("/dev/xen/gntalloc", O_RDWR | O_CLOEXEC);
    if (gfd < 0)
        return fail("gntalloc-open", errno);
    if (ioctl(gfd, IOCTL_GNTALLOC_ALLOC_GREF, &alloc) < 0)
        return fail("gntalloc-alloc", errno);
    page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, (off_t)alloc.index);
    if (page == MAP_FAILED)
        return fail("gntalloc-mmap", errno);
    memcpy((unsigned char *)page, MAGIC, sizeof(MAGIC));
    for (unsigned i = sizeof(MAGIC); i < PAGE; i++)
        page[i] = (unsigned char)((i * 7 + 3) & 0xff);

    efd = open("/dev/xen/evtchn", O_RDWR | O_CLOEXEC);
    if (efd < 0)
        return fail("evtchn-open", errno);
    port = ioctl(efd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &bind);
    if (port < 0)
        return fail("evtchn-bind", errno);

    snprintf(buf, sizeof(buf), "%u", alloc.gref_ids[0]);
    if ((r = xs_write("data/testbed/gref", buf)) < 0)
        return fail("xenstore-write", r == -EPROTO ? EPROTO : -r);
    snprintf(buf, sizeof(buf), "%d", port);
    if ((r = xs_write("data/testbed/port", buf)) < 0)
        return fail("xenstore-write", r == -EPROTO ? EPROTO : -r);
    if ((r = xs_write("data/testbed/state", "offered")) < 0)
        return fail("xenstore-write", r == -EPROTO ? EPROTO : -r);
    say("guest_grant: offered gref %u port %d", alloc.gref_ids[0], port);

    r = wait_event(efd, (uint32_t)port);
    if (r == -ETIMEDOUT) {
        say("guest_grant: step wait failed: no event from Dom0 in %d s", WAIT_MS / 1000);
        return finish("bad:timeout");
    }
    if (r < 0)
        return fail("evtchn-wait", -r);

    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    for (unsigned i = 0; i < sizeof(ACK) - 1; i++) {
        if (page[ACK_OFF + i] != (unsigned char)ACK[i]) {
            say("guest_grant: step check failed: no \"" ACK "\" at offset %d (byte %u is 0x%02x)",
                ACK_OFF, ACK_OFF + i, page[ACK_OFF + i]);
            return finish("bad:no-ack");
        }
    }
    for (unsigned i = sizeof(MAGIC); i < ACK_OFF; i++) {
        if (page[i] != (unsigned char)((i * 7 + 3) & 0xff)) {
            say("guest_grant: step check failed: Dom0 changed byte %u (0x%02x, expected 0x%02x)",
                i, page[i], (i * 7 + 3) & 0xff);
            return finish("bad:page-modified");
        }
    }
    return finish("acked");
}
