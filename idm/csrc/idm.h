/*
 * IDM channel: wire header, shared-memory ring layout and endpoint API.
 *
 * One header, a few short C files (ring.c, bell.c, local_link.c, hello.c), like Xen's
 * libxenvchan. libvgpu links these files directly; gpu-proxy and the tests reach the very same
 * code through cffi (idm/_build.py), so both ends of a channel always run one implementation.
 *
 * Shared region (the zone owns it: granted pages under Xen, a sealed memfd locally):
 *
 *   [ control page: struct idm_ctrl | grant refs (GrantLink) ]
 *   [ request ring:  2^req_order bytes, zone -> host ]
 *   [ response ring: 2^rsp_order bytes, host -> zone ]
 *
 * Each ring is a byte stream with free-running 64-bit producer/consumer counters. A message is a
 * 32-byte struct idm_hdr followed by `length` payload bytes; it may be larger than the ring, in
 * which case it streams through it (the producer waits for space, the consumer for data).
 *
 * Trust: the host never trusts the zone. Offsets come from the layout agreed at link setup,
 * never from shared memory. Each side keeps its own index privately and only *reads* the peer's
 * index, checking it is consistent. Headers are copied out of the ring once and validated on
 * the private copy (no double fetch). A peer that breaks the rules marks the endpoint broken:
 * every later call fails with -EPROTO and the reason is in ep->why.
 */
#ifndef IDM_H
#define IDM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* ---- wire format -------------------------------------------------------------------------- */

#define IDM_MAGIC 0x314D4449u /* "IDM1" little-endian */
#define IDM_VERSION_MIN 1
#define IDM_VERSION_MAX 1

/* Hard upper bound on one message's payload; a channel may negotiate less in its hello. */
#define IDM_MAX_PAYLOAD (64u << 20)

#define IDM_F_REPLY 0x1u /* a response to the request with the same seq */
#define IDM_F_ASYNC 0x2u /* fire-and-forget: no reply; errors surface at the next sync call */
#define IDM_F_KNOWN (IDM_F_REPLY | IDM_F_ASYNC)

/* Opcodes below IDM_OP_FIRST_CALL belong to the channel itself; calls come from the call table. */
#define IDM_OP_HELLO 0u
#define IDM_OP_NULL 1u /* echo/no-op, used by health checks and benchmarks */
#define IDM_OP_FIRST_CALL 16u
#define IDM_OP_MAX 0xFFFFu

/* Channel-level status codes (replies to IDM_OP_* requests). Call replies carry a CUresult. */
#define IDM_ST_OK 0
#define IDM_ST_BAD_VERSION 1
#define IDM_ST_BAD_REQUEST 2
#define IDM_ST_UNKNOWN_OPCODE 3
#define IDM_ST_BAD_TABLE 4 /* hello: the two sides were generated from different call tables */

struct idm_hdr {
    uint32_t magic;
    uint16_t version;
    uint16_t flags;
    uint32_t opcode;
    uint32_t length; /* payload bytes following this header */
    uint64_t seq;
    int32_t status; /* 0 in requests; CUresult / IDM_ST_* in replies */
    uint32_t reserved; /* must be 0 */
};

/*
 * Hello payload (both directions). The reply carries the chosen version in `version_max`.
 * `table_digest` is the first 64 bits of the call table's digest (VGPU_CALL_TABLE_DIGEST): a
 * zone and a host built from different tables would misread each other's calls, so they refuse.
 */
struct idm_hello {
    uint16_t version_min;
    uint16_t version_max;
    uint32_t max_payload;
    uint64_t table_digest;
};

/* ---- shared layout ------------------------------------------------------------------------ */

#define IDM_PAGE_SIZE 4096u
#define IDM_RING_ORDER_MIN 12 /* 4 KiB */
#define IDM_RING_ORDER_MAX 24 /* 16 MiB */
#define IDM_CTRL_MAGIC 0x4C52444Du /* "MDRL" */
#define IDM_LAYOUT_VERSION 1u
#define IDM_CTRL_GREFS_OFFSET 1024u
#define IDM_CTRL_MAX_GREFS ((IDM_PAGE_SIZE - IDM_CTRL_GREFS_OFFSET) / 4u)

/*
 * One ring direction's indices, each on its own cache line: the indices move with every message,
 * the sleep flags rarely, so checking "does the peer sleep?" after each publish stays a cache hit.
 */
struct idm_dir_ctrl {
    uint64_t prod;         /* written by the producer only */
    uint8_t pad0[56];
    uint64_t cons;         /* written by the consumer only */
    uint8_t pad1[56];
    uint32_t prod_waiting; /* producer sleeps until space is freed */
    uint8_t pad2[60];
    uint32_t cons_waiting; /* consumer sleeps until data arrives */
    uint8_t pad3[60];
};

struct idm_ctrl {
    uint32_t magic;          /* IDM_CTRL_MAGIC, written by the zone at creation; informational */
    uint32_t layout_version; /* IDM_LAYOUT_VERSION */
    uint32_t zone_closed;    /* set by the zone side when it goes away */
    uint32_t host_closed;    /* set by the host side when it goes away */
    uint8_t pad[48];
    struct idm_dir_ctrl req; /* zone -> host */
    struct idm_dir_ctrl rsp; /* host -> zone */
    /* grant refs of every page after this one start at IDM_CTRL_GREFS_OFFSET (GrantLink only) */
};

struct idm_layout {
    uint32_t req_order; /* request ring is 2^req_order bytes */
    uint32_t rsp_order; /* response ring is 2^rsp_order bytes */
};

/* ---- doorbells ---------------------------------------------------------------------------- */

#define IDM_BELL_EVENTFD 1 /* wait_fd/notify_fd are eventfds (LocalLink) */
#define IDM_BELL_EVTCHN 2  /* wait_fd == notify_fd is an open /dev/xen/evtchn bound to `port` */

/* One ring's doorbell as seen by one side: wakes the peer, and is woken by it. */
struct idm_bell {
    int kind;
    int wait_fd;
    int notify_fd;
    uint32_t port;
};

/* ---- endpoint ----------------------------------------------------------------------------- */

#define IDM_SIDE_ZONE 0
#define IDM_SIDE_HOST 1

/* Private per-side state. Never placed in shared memory. */
struct idm_endpoint {
    volatile struct idm_ctrl *ctrl;
    volatile struct idm_dir_ctrl *tx, *rx;
    uint8_t *tx_data, *rx_data;
    uint64_t tx_size, rx_size; /* powers of two */
    uint64_t tx_prod;          /* authoritative copy of our producer index */
    uint64_t tx_space_seen;    /* free bytes at the last read of the peer's consumer index */
    uint64_t rx_cons;          /* authoritative copy of our consumer index */
    volatile uint32_t *my_closed, *peer_closed;
    struct idm_bell tx_bell, rx_bell;
    uint32_t max_payload;     /* largest payload accepted from the peer */
    uint32_t spin_ns;         /* busy-wait budget before sleeping on a doorbell */
    uint64_t rx_remaining;    /* payload bytes of the current message not yet received */
    uint64_t notifies_sent;   /* doorbell rings (for tests/benchmarks of suppression) */
    uint64_t sleeps;          /* times this side blocked on a doorbell */
    int side;
    int broken;               /* errno-style code once the endpoint is unusable */
    char why[128];            /* human-readable reason for `broken` */
};

/* Size of the shared region for a layout, or 0 if the layout is invalid. */
size_t idm_region_size(const struct idm_layout *lay);

/* Initialise the control page of a fresh region (the zone side does this once). */
void idm_region_format(void *base, const struct idm_layout *lay);

/* Bind an endpoint to a mapped region. Returns 0 or -EINVAL (bad layout or size). */
int idm_ep_init(struct idm_endpoint *ep, void *base, size_t len, const struct idm_layout *lay,
                int side, const struct idm_bell *tx_bell, const struct idm_bell *rx_bell);

/* Mark our side closed and wake the peer. Does not unmap or close fds (the link owns them). */
void idm_ep_close(struct idm_endpoint *ep);

/*
 * Send one message: hdr (length == len) then payload, streamed through the ring.
 * timeout_ms < 0 waits forever; 0 never waits. Returns 0, -ETIMEDOUT (if part of the message
 * was already written the endpoint is broken, since the stream is cut mid-message), -EPIPE (a side
 * closed), -EPROTO (the peer corrupted the ring), -EMSGSIZE, -EINVAL (hdr->length != len).
 */
int idm_send(struct idm_endpoint *ep, const struct idm_hdr *hdr, const void *payload,
             uint32_t len, int timeout_ms);

/* idm_send with the header built from scalars: one call from a binding instead of nine. */
int idm_send_msg(struct idm_endpoint *ep, uint32_t opcode, uint16_t flags, uint64_t seq,
                 int32_t status, const void *payload, uint32_t len, int timeout_ms);

/* Gather form of idm_send: the payload is the concatenation of iov[0..iovcnt). */
int idm_sendv(struct idm_endpoint *ep, const struct idm_hdr *hdr, const struct iovec *iov,
              int iovcnt, int timeout_ms);

/*
 * Receive the next message's header into *hdr (validated: magic, flags, reserved, length within
 * max_payload). Returns the payload length, then the caller must take exactly that many bytes with
 * idm_recv_payload. -ETIMEDOUT (nothing consumed), -EPIPE, -EPROTO.
 */
int64_t idm_recv_hdr(struct idm_endpoint *ep, struct idm_hdr *hdr, int timeout_ms);

/* Receive `len` bytes of the current message's payload (may be called in pieces). */
int idm_recv_payload(struct idm_endpoint *ep, void *buf, uint64_t len, int timeout_ms);

/*
 * Batch receive for small messages: waits up to timeout_ms for one complete message, then copies
 * every complete message already in the ring that fits into buf (each is header + payload,
 * starting at offsets[i], 8-byte aligned), up to max_msgs. Returns the count, 0 on timeout,
 * -EMSGSIZE when the next message is too large for batching (use idm_recv_hdr/payload),
 * -EPIPE, -EPROTO.
 */
int idm_recv_batch(struct idm_endpoint *ep, void *buf, uint32_t cap, uint32_t *offsets,
                   uint32_t max_msgs, int timeout_ms);

/* Fill *hdr for a request/reply. */
void idm_hdr_init(struct idm_hdr *hdr, uint32_t opcode, uint16_t flags, uint64_t seq,
                  uint32_t length, int32_t status);

/* ---- doorbells (bell.c) ------------------------------------------------------------------- */

int idm_bell_notify(const struct idm_bell *b);
/* Wait until woken or timeout (ms, <0 forever). Returns 1 woken, 0 timeout, -errno. */
int idm_bell_wait(const struct idm_bell *b, int timeout_ms);

/* ---- hello (hello.c) ---------------------------------------------------------------------- */

/*
 * Zone side: send hello, wait for the reply; on success *version and *max_payload_out are set.
 * -EPROTONOSUPPORT: no common version; -ENOMSG: the host has another call table.
 */
int idm_hello_client(struct idm_endpoint *ep, uint32_t max_payload, uint64_t table_digest,
                     uint16_t *version, uint32_t *max_payload_out, int timeout_ms);

/* Host side: receive the hello and answer it; refusals return the same codes as the client. */
int idm_hello_server(struct idm_endpoint *ep, uint32_t max_payload, uint64_t table_digest,
                     uint16_t *version, int timeout_ms);

/* ---- LocalLink (local_link.c) ------------------------------------------------------------- */

/*
 * The zone side creates the region (sealed memfd) and four eventfds and hands them to the host
 * over a connected unix socket with SCM_RIGHTS; the host checks seals and size before mapping.
 */
#define IDM_LOCAL_MAGIC 0x4B4E4C49u /* "ILNK" */
#define IDM_LOCAL_NFDS 5           /* memfd, req data bell, req space bell, rsp data bell, rsp space bell */

struct idm_local_offer {
    uint32_t magic;
    uint32_t layout_version;
    struct idm_layout layout;
};

struct idm_local_link {
    struct idm_endpoint ep;
    void *base;
    size_t len;
    int sock;
    int fds[IDM_LOCAL_NFDS];
};

/* Zone side: create the region, connect to `path`, offer it. Returns 0 or -errno (why filled). */
int idm_local_connect(struct idm_local_link *link, const char *path,
                      const struct idm_layout *lay, char *why, size_t why_len);

/* Host side: receive an offer on an accepted socket, validate and map it. Returns 0 or -errno. */
int idm_local_accept(struct idm_local_link *link, int sock, char *why, size_t why_len);

/* Close our endpoint, unmap, close every fd. Safe on a partially set-up link. */
void idm_local_release(struct idm_local_link *link);

/* ---- GrantFdLink (grant_fd_link.c) -------------------------------------------------------- */

/*
 * A zone process's side of a GrantLink that the zone agent's channel broker set up for it: the
 * broker offers the channel to the host (grants, unbound ports, xenstore), waits until the host
 * has attached it, and hands the process the open /dev/xen/gntalloc fd (to map the region at
 * mmap_offset) and one /dev/xen/evtchn fd per ring, with this header, over a unix socket
 * (SCM_RIGHTS). Container processes never open /dev/xen themselves. The socket stays open: the
 * broker withdraws the offer when the process hangs up, and hangs up when the host goes away.
 */
#define IDM_GRANT_FD_MAGIC 0x44464749u /* "IGFD" */
#define IDM_GRANT_FD_NFDS 3           /* gntalloc, request ring's evtchn, response ring's evtchn */
#define IDM_GRANT_FD_WHY_LEN 128
#define IDM_DOMID_FIRST_RESERVED 0x7FF0u /* DOMID_SELF and friends name no real domain */
#define IDM_EVTCHN_PORT_MAX ((1u << 17) - 1) /* no event channel ABI has a larger port */

struct idm_grant_fd_offer {
    uint32_t magic;          /* IDM_GRANT_FD_MAGIC */
    uint32_t layout_version; /* IDM_LAYOUT_VERSION */
    int32_t status;          /* 0: the fds follow; -errno: the broker failed, `why` says how */
    uint32_t peer_domid;     /* the domain the pages are granted to (gpu-proxy's) */
    struct idm_layout layout;
    uint64_t mmap_offset;    /* where the region lies in the gntalloc fd (page aligned) */
    uint64_t mmap_length;    /* idm_region_size(&layout) */
    uint32_t req_port;       /* local port bound on the request ring's evtchn fd */
    uint32_t rsp_port;       /* local port bound on the response ring's evtchn fd */
    char why[IDM_GRANT_FD_WHY_LEN]; /* NUL-terminated */
};

struct idm_grant_fd_link {
    struct idm_endpoint ep;
    void *base;
    size_t len;
    int sock;
    int fds[IDM_GRANT_FD_NFDS]; /* gntalloc (the pages), request evtchn, response evtchn */
    uint32_t peer_domid;        /* where the pages are granted: gpu-proxy's domain */
};

/*
 * Connect to the broker at `path`, wait up to timeout_ms for its header and fds, validate them,
 * map the region and bind the endpoint (zone side). Returns 0 or -errno (why filled).
 */
int idm_grant_fd_connect(struct idm_grant_fd_link *link, const char *path, int timeout_ms,
                         char *why, size_t why_len);

/* Close our endpoint, unmap, close every fd and the socket. Safe on a partially set-up link. */
void idm_grant_fd_release(struct idm_grant_fd_link *link);

#endif
