/*
 * The IDM ring: byte-stream SPSC rings in shared memory, one per direction (see idm.h).
 *
 * Ordering: the producer copies bytes, then publishes `prod` with release semantics; the consumer
 * reads `prod` with acquire semantics, then copies. Sleeping uses the "set flag, full fence,
 * re-check" pattern on the waiter and "publish, full fence, check flag" on the waker, so at least
 * one of the two always sees the other and no wakeup is lost. The waker rings the doorbell only if
 * the peer said it sleeps (notification suppression).
 */
#define _GNU_SOURCE
#include "idm.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define HDR_SIZE ((uint64_t)sizeof(struct idm_hdr))
#define DEFAULT_SPIN_NS 50000u
/* Longest single sleep: a close by another thread of ours is noticed within this even where the
 * doorbell cannot be rung from our own side (Xen event channels). */
#define MAX_SLEEP_MS 1000

_Static_assert(sizeof(struct idm_hdr) == 32, "wire header is 32 bytes");
_Static_assert(sizeof(struct idm_hello) == 16, "hello payload is 16 bytes");
_Static_assert(sizeof(struct idm_dir_ctrl) == 256, "direction control is four cache lines");
_Static_assert(sizeof(struct idm_ctrl) == 576, "control block layout");
_Static_assert(sizeof(struct idm_ctrl) <= IDM_CTRL_GREFS_OFFSET, "grant refs follow the control block");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire format is little-endian");

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int ep_break(struct idm_endpoint *ep, int code, const char *fmt, ...)
{
    if (!ep->broken) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ep->why, sizeof(ep->why), fmt, ap);
        va_end(ap);
        ep->broken = code;
        __atomic_store_n(ep->my_closed, 1u, __ATOMIC_SEQ_CST);
        idm_bell_notify(&ep->tx_bell);
        idm_bell_notify(&ep->rx_bell);
    }
    return -ep->broken;
}

size_t idm_region_size(const struct idm_layout *lay)
{
    if (lay->req_order < IDM_RING_ORDER_MIN || lay->req_order > IDM_RING_ORDER_MAX ||
        lay->rsp_order < IDM_RING_ORDER_MIN || lay->rsp_order > IDM_RING_ORDER_MAX)
        return 0;
    return IDM_PAGE_SIZE + ((size_t)1 << lay->req_order) + ((size_t)1 << lay->rsp_order);
}

void idm_region_format(void *base, const struct idm_layout *lay)
{
    struct idm_ctrl *ctrl = base;
    (void)lay;
    memset(base, 0, IDM_PAGE_SIZE);
    ctrl->magic = IDM_CTRL_MAGIC;
    ctrl->layout_version = IDM_LAYOUT_VERSION;
}

int idm_ep_init(struct idm_endpoint *ep, void *base, size_t len, const struct idm_layout *lay,
                int side, const struct idm_bell *tx_bell, const struct idm_bell *rx_bell)
{
    size_t need = idm_region_size(lay);
    struct idm_ctrl *ctrl = base;
    uint8_t *req = (uint8_t *)base + IDM_PAGE_SIZE;
    uint8_t *rsp = req + ((size_t)1 << lay->req_order);

    if (!need || len < need || (side != IDM_SIDE_ZONE && side != IDM_SIDE_HOST))
        return -EINVAL;
    memset(ep, 0, sizeof(*ep));
    ep->ctrl = ctrl;
    ep->side = side;
    ep->tx_bell = *tx_bell;
    ep->rx_bell = *rx_bell;
    ep->max_payload = IDM_MAX_PAYLOAD;
    ep->spin_ns = DEFAULT_SPIN_NS;
    if (side == IDM_SIDE_ZONE) {
        ep->tx = &ctrl->req, ep->tx_data = req, ep->tx_size = (uint64_t)1 << lay->req_order;
        ep->rx = &ctrl->rsp, ep->rx_data = rsp, ep->rx_size = (uint64_t)1 << lay->rsp_order;
        ep->my_closed = &ctrl->zone_closed, ep->peer_closed = &ctrl->host_closed;
    } else {
        ep->tx = &ctrl->rsp, ep->tx_data = rsp, ep->tx_size = (uint64_t)1 << lay->rsp_order;
        ep->rx = &ctrl->req, ep->rx_data = req, ep->rx_size = (uint64_t)1 << lay->req_order;
        ep->my_closed = &ctrl->host_closed, ep->peer_closed = &ctrl->zone_closed;
    }
    return 0;
}

void idm_ep_close(struct idm_endpoint *ep)
{
    __atomic_store_n(ep->my_closed, 1u, __ATOMIC_SEQ_CST);
    idm_bell_notify(&ep->tx_bell);
    idm_bell_notify(&ep->rx_bell);
    /* Wake our own sleepers too, where the doorbell lets us (eventfds are symmetric). */
    if (ep->tx_bell.kind == IDM_BELL_EVENTFD) {
        struct idm_bell self_tx = {IDM_BELL_EVENTFD, -1, ep->tx_bell.wait_fd, 0};
        struct idm_bell self_rx = {IDM_BELL_EVENTFD, -1, ep->rx_bell.wait_fd, 0};
        idm_bell_notify(&self_tx);
        idm_bell_notify(&self_rx);
    }
}

void idm_hdr_init(struct idm_hdr *hdr, uint32_t opcode, uint16_t flags, uint64_t seq,
                  uint32_t length, int32_t status)
{
    hdr->magic = IDM_MAGIC;
    hdr->version = IDM_VERSION_MAX;
    hdr->flags = flags;
    hdr->opcode = opcode;
    hdr->length = length;
    hdr->seq = seq;
    hdr->status = status;
    hdr->reserved = 0;
}

/* ---- index probes: read the peer's index once and check it against ours -------------------- */

static int64_t rx_avail(struct idm_endpoint *ep)
{
    uint64_t prod = __atomic_load_n(&ep->rx->prod, __ATOMIC_ACQUIRE);
    uint64_t avail = prod - ep->rx_cons;
    if (avail > ep->rx_size)
        return ep_break(ep, EPROTO, "peer producer index %llu is %llu bytes ahead of %llu-byte ring",
                        (unsigned long long)prod, (unsigned long long)avail,
                        (unsigned long long)ep->rx_size);
    return (int64_t)avail;
}

static int64_t tx_space(struct idm_endpoint *ep)
{
    uint64_t cons = __atomic_load_n(&ep->tx->cons, __ATOMIC_ACQUIRE);
    uint64_t used = ep->tx_prod - cons;
    if (used > ep->tx_size)
        return ep_break(ep, EPROTO, "peer consumer index %llu inconsistent with producer %llu",
                        (unsigned long long)cons, (unsigned long long)ep->tx_prod);
    ep->tx_space_seen = ep->tx_size - used;
    return (int64_t)ep->tx_space_seen;
}

static void publish_tx(struct idm_endpoint *ep)
{
    __atomic_store_n(&ep->tx->prod, ep->tx_prod, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&ep->tx->cons_waiting, __ATOMIC_RELAXED)) {
        ep->notifies_sent++;
        idm_bell_notify(&ep->tx_bell);
    }
}

static void publish_rx(struct idm_endpoint *ep)
{
    __atomic_store_n(&ep->rx->cons, ep->rx_cons, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&ep->rx->prod_waiting, __ATOMIC_RELAXED)) {
        ep->notifies_sent++;
        idm_bell_notify(&ep->rx_bell);
    }
}

/*
 * Wait until probe(ep) >= need: spin for ep->spin_ns, then sleep on the doorbell.
 * Returns the probe's value, -ETIMEDOUT, -EPIPE (either side closed) or the probe's error.
 */
static int64_t wait_for(struct idm_endpoint *ep, int64_t (*probe)(struct idm_endpoint *),
                        uint64_t need, volatile uint32_t *waiting, const struct idm_bell *bell,
                        int timeout_ms)
{
    int64_t v = probe(ep);
    uint64_t start, deadline;

    if (v < 0 || (uint64_t)v >= need || timeout_ms == 0)
        return v < 0 || (uint64_t)v >= need ? v : -ETIMEDOUT;
    start = now_ns();
    deadline = timeout_ms < 0 ? UINT64_MAX : start + (uint64_t)timeout_ms * 1000000u;
    /* One pause per probe: a pause can take ~140 cycles, and latency is what the spin buys. */
    for (unsigned i = 1; ep->spin_ns; i++) {
        cpu_relax();
        v = probe(ep);
        if (v < 0 || (uint64_t)v >= need)
            return v;
        if (i % 64 == 0 && (now_ns() - start >= ep->spin_ns ||
                            __atomic_load_n(ep->peer_closed, __ATOMIC_ACQUIRE) ||
                            __atomic_load_n(ep->my_closed, __ATOMIC_RELAXED)))
            break;
    }
    for (;;) {
        uint64_t now;
        int r, wait_ms;

        __atomic_store_n(waiting, 1u, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        v = probe(ep);
        if (v < 0 || (uint64_t)v >= need)
            break;
        if (__atomic_load_n(ep->peer_closed, __ATOMIC_ACQUIRE) ||
            __atomic_load_n(ep->my_closed, __ATOMIC_RELAXED)) {
            v = probe(ep); /* the peer may have published its last bytes just before closing */
            if (v >= 0 && (uint64_t)v < need)
                v = -EPIPE;
            break;
        }
        now = now_ns();
        if (now >= deadline) {
            v = -ETIMEDOUT;
            break;
        }
        wait_ms = deadline == UINT64_MAX || deadline - now >= (uint64_t)MAX_SLEEP_MS * 1000000u
                      ? MAX_SLEEP_MS
                      : (int)((deadline - now + 999999u) / 1000000u);
        ep->sleeps++;
        r = idm_bell_wait(bell, wait_ms);
        if (r < 0) {
            v = ep_break(ep, -r, "doorbell wait failed: %s", strerror(-r));
            break;
        }
    }
    __atomic_store_n(waiting, 0u, __ATOMIC_RELAXED);
    return v;
}

/* ---- byte copies with wrap-around ---------------------------------------------------------- */

static void ring_put(uint8_t *data, uint64_t size, uint64_t pos, const uint8_t *src, uint64_t n)
{
    uint64_t off = pos & (size - 1), first = size - off < n ? size - off : n;
    memcpy(data + off, src, first);
    if (n > first)
        memcpy(data, src + first, n - first);
}

static void ring_get(const uint8_t *data, uint64_t size, uint64_t pos, uint8_t *dst, uint64_t n)
{
    uint64_t off = pos & (size - 1), first = size - off < n ? size - off : n;
    memcpy(dst, data + off, first);
    if (n > first)
        memcpy(dst + first, data, n - first);
}

/* ---- send ---------------------------------------------------------------------------------- */

int idm_sendv(struct idm_endpoint *ep, const struct idm_hdr *hdr, const struct iovec *iov,
              int iovcnt, int timeout_ms)
{
    uint64_t len = 0, total, sent = 0, chunk_goal;
    const uint8_t *src = (const uint8_t *)hdr;
    uint64_t src_left = HDR_SIZE;
    int next_iov = 0;

    if (ep->broken)
        return -ep->broken;
    for (int i = 0; i < iovcnt; i++)
        len += iov[i].iov_len;
    if (len != hdr->length)
        return -EINVAL;
    if (len > IDM_MAX_PAYLOAD)
        return -EMSGSIZE;
    if (__atomic_load_n(ep->peer_closed, __ATOMIC_ACQUIRE) || *ep->my_closed)
        return -EPIPE;
    total = HDR_SIZE + len;
    /* A message that fits is written whole, so consumers see it complete; a larger one streams. */
    chunk_goal = total <= ep->tx_size ? total : ep->tx_size / 4;
    while (sent < total) {
        uint64_t want = total - sent < chunk_goal ? total - sent : chunk_goal;
        /* Space seen earlier is still there (only we fill it): skip re-reading the peer's line. */
        int64_t space = ep->tx_space_seen >= want
                            ? (int64_t)ep->tx_space_seen
                            : wait_for(ep, tx_space, want, &ep->tx->prod_waiting, &ep->tx_bell,
                                       timeout_ms);
        uint64_t n;

        if (space < 0) {
            if (sent && space == -ETIMEDOUT)
                return ep_break(ep, ETIMEDOUT, "send timed out after %llu of %llu bytes",
                                (unsigned long long)sent, (unsigned long long)total);
            return (int)space;
        }
        n = (uint64_t)space < total - sent ? (uint64_t)space : total - sent;
        for (uint64_t left = n; left;) {
            uint64_t piece;
            while (!src_left) {
                src = iov[next_iov].iov_base;
                src_left = iov[next_iov++].iov_len;
            }
            piece = src_left < left ? src_left : left;
            ring_put(ep->tx_data, ep->tx_size, ep->tx_prod, src, piece);
            ep->tx_prod += piece;
            ep->tx_space_seen -= piece;
            src += piece;
            src_left -= piece;
            left -= piece;
        }
        sent += n;
        publish_tx(ep);
    }
    return 0;
}

int idm_send(struct idm_endpoint *ep, const struct idm_hdr *hdr, const void *payload,
             uint32_t len, int timeout_ms)
{
    struct iovec iov = {(void *)payload, len};
    return idm_sendv(ep, hdr, &iov, len ? 1 : 0, timeout_ms);
}

int idm_send_msg(struct idm_endpoint *ep, uint32_t opcode, uint16_t flags, uint64_t seq,
                 int32_t status, const void *payload, uint32_t len, int timeout_ms)
{
    struct idm_hdr hdr;
    idm_hdr_init(&hdr, opcode, flags, seq, len, status);
    return idm_send(ep, &hdr, payload, len, timeout_ms);
}

/* ---- receive ------------------------------------------------------------------------------- */

/* What is wrong with a header copy, or NULL. No side effects: see check_hdr. */
static const char *hdr_error(const struct idm_endpoint *ep, const struct idm_hdr *h, char *why,
                             size_t len)
{
    if (h->magic != IDM_MAGIC)
        snprintf(why, len, "bad magic 0x%08x", h->magic);
    else if (h->version < IDM_VERSION_MIN || h->version > IDM_VERSION_MAX)
        snprintf(why, len, "unsupported version %u", h->version);
    else if (h->flags & ~IDM_F_KNOWN)
        snprintf(why, len, "unknown flags 0x%x", h->flags);
    else if (h->reserved)
        snprintf(why, len, "reserved field is 0x%x, must be 0", h->reserved);
    else if (h->opcode > IDM_OP_MAX)
        snprintf(why, len, "opcode %u out of range", h->opcode);
    else if (h->length > ep->max_payload)
        snprintf(why, len, "payload of %u bytes exceeds the %u-byte limit", h->length,
                 ep->max_payload);
    else
        return NULL;
    return why;
}

static int check_hdr(struct idm_endpoint *ep, const struct idm_hdr *h)
{
    char why[sizeof(ep->why)];
    return hdr_error(ep, h, why, sizeof(why)) ? ep_break(ep, EPROTO, "%s", why) : 0;
}

int64_t idm_recv_hdr(struct idm_endpoint *ep, struct idm_hdr *hdr, int timeout_ms)
{
    struct idm_hdr h;
    int64_t v;
    int rc;

    if (ep->broken)
        return -ep->broken;
    if (ep->rx_remaining)
        return -EINVAL;
    v = wait_for(ep, rx_avail, HDR_SIZE, &ep->rx->cons_waiting, &ep->rx_bell, timeout_ms);
    if (v < 0)
        return v;
    ring_get(ep->rx_data, ep->rx_size, ep->rx_cons, (uint8_t *)&h, HDR_SIZE);
    rc = check_hdr(ep, &h);
    if (rc)
        return rc;
    ep->rx_cons += HDR_SIZE;
    ep->rx_remaining = h.length;
    if (!h.length)
        publish_rx(ep);
    *hdr = h;
    return h.length;
}

int idm_recv_payload(struct idm_endpoint *ep, void *buf, uint64_t len, int timeout_ms)
{
    uint8_t *dst = buf;

    if (ep->broken)
        return -ep->broken;
    if (len > ep->rx_remaining)
        return -EINVAL;
    while (len) {
        int64_t v = wait_for(ep, rx_avail, 1, &ep->rx->cons_waiting, &ep->rx_bell, timeout_ms);
        uint64_t n;

        if (v == -ETIMEDOUT)
            return ep_break(ep, ETIMEDOUT, "peer stalled with %llu payload bytes outstanding",
                            (unsigned long long)ep->rx_remaining);
        if (v < 0)
            return (int)v;
        n = (uint64_t)v < len ? (uint64_t)v : len;
        ring_get(ep->rx_data, ep->rx_size, ep->rx_cons, dst, n);
        ep->rx_cons += n;
        ep->rx_remaining -= n;
        dst += n;
        len -= n;
        publish_rx(ep);
    }
    return 0;
}

int idm_recv_batch(struct idm_endpoint *ep, void *buf, uint32_t cap, uint32_t *offsets,
                   uint32_t max_msgs, int timeout_ms)
{
    uint8_t *out = buf;
    uint64_t pos, used = 0;
    uint32_t count = 0;
    int64_t avail;
    char why[sizeof(ep->why)];

    if (ep->broken)
        return -ep->broken;
    if (ep->rx_remaining)
        return -EINVAL;
    avail = wait_for(ep, rx_avail, HDR_SIZE, &ep->rx->cons_waiting, &ep->rx_bell, timeout_ms);
    if (avail == -ETIMEDOUT)
        return 0;
    if (avail < 0)
        return (int)avail;
    pos = ep->rx_cons;
    while (count < max_msgs) {
        struct idm_hdr h;
        uint64_t start = (used + 7u) & ~(uint64_t)7u, total, have = (uint64_t)avail - (pos - ep->rx_cons);
        int rc;

        if (have < HDR_SIZE)
            break;
        ring_get(ep->rx_data, ep->rx_size, pos, (uint8_t *)&h, HDR_SIZE);
        /* Deliver the valid messages before a bad one; the next call meets it and breaks. */
        if (count && hdr_error(ep, &h, why, sizeof(why)))
            break;
        rc = check_hdr(ep, &h);
        if (rc)
            return rc;
        total = HDR_SIZE + h.length;
        if (total > cap || total > ep->rx_size) {
            if (count)
                break;
            return -EMSGSIZE;
        }
        if (start + total > cap)
            break;
        if (have < total) {
            if (count)
                break;
            /* Producers write a message that fits the ring whole; wait briefly for the rest. */
            avail = wait_for(ep, rx_avail, total, &ep->rx->cons_waiting, &ep->rx_bell,
                             timeout_ms);
            if (avail == -ETIMEDOUT)
                return 0;
            if (avail < 0)
                return (int)avail;
        }
        ring_get(ep->rx_data, ep->rx_size, pos, out + start, total);
        /* The header the caller parses is the copy we validated, not a second read. */
        memcpy(out + start, &h, HDR_SIZE);
        offsets[count++] = (uint32_t)start;
        used = start + total;
        pos += total;
    }
    ep->rx_cons = pos;
    publish_rx(ep);
    return (int)count;
}
