"""cffi builder for ``idm._ring``: the C ring, doorbells, hello and the C links, compiled once.

gpu-proxy and the tests call the same C that libvgpu links, so both ends of a channel always run
one implementation. Struct layouts marked ``...`` are taken from the C compiler, not restated.
"""

from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["ring.c", "bell.c", "hello.c", "local_link.c", "grant_fd_link.c"]

CDEF = """
#define IDM_MAGIC ...
#define IDM_VERSION_MIN ...
#define IDM_VERSION_MAX ...
#define IDM_MAX_PAYLOAD ...
#define IDM_F_REPLY ...
#define IDM_F_ASYNC ...
#define IDM_OP_HELLO ...
#define IDM_OP_NULL ...
#define IDM_OP_FIRST_CALL ...
#define IDM_OP_MAX ...
#define IDM_ST_OK ...
#define IDM_ST_BAD_VERSION ...
#define IDM_ST_BAD_REQUEST ...
#define IDM_ST_UNKNOWN_OPCODE ...
#define IDM_ST_BAD_TABLE ...
#define IDM_PAGE_SIZE ...
#define IDM_RING_ORDER_MIN ...
#define IDM_RING_ORDER_MAX ...
#define IDM_CTRL_MAGIC ...
#define IDM_LAYOUT_VERSION ...
#define IDM_CTRL_GREFS_OFFSET ...
#define IDM_CTRL_MAX_GREFS ...
#define IDM_BELL_EVENTFD ...
#define IDM_BELL_EVTCHN ...
#define IDM_SIDE_ZONE ...
#define IDM_SIDE_HOST ...
#define IDM_LOCAL_MAGIC ...
#define IDM_LOCAL_NFDS ...
#define IDM_GRANT_FD_MAGIC ...
#define IDM_GRANT_FD_NFDS ...
#define IDM_GRANT_FD_WHY_LEN ...
#define IDM_DOMID_FIRST_RESERVED ...
#define IDM_EVTCHN_PORT_MAX ...

struct iovec { void *iov_base; size_t iov_len; };

struct idm_hdr {
    uint32_t magic; uint16_t version; uint16_t flags; uint32_t opcode; uint32_t length;
    uint64_t seq; int32_t status; uint32_t reserved;
};
struct idm_hello { uint16_t version_min; uint16_t version_max; uint32_t max_payload;
                   uint64_t table_digest; };
struct idm_dir_ctrl { uint64_t prod; uint32_t prod_waiting; uint64_t cons; uint32_t cons_waiting;
                      ...; };
struct idm_ctrl { uint32_t magic; uint32_t layout_version; uint32_t zone_closed;
                  uint32_t host_closed; struct idm_dir_ctrl req; struct idm_dir_ctrl rsp; ...; };
struct idm_layout { uint32_t req_order; uint32_t rsp_order; };
struct idm_bell { int kind; int wait_fd; int notify_fd; uint32_t port; };
struct idm_endpoint {
    uint64_t tx_size; uint64_t rx_size; uint64_t tx_prod; uint64_t rx_cons;
    uint32_t max_payload; uint32_t spin_ns; uint64_t rx_remaining;
    uint64_t notifies_sent; uint64_t sleeps; int side; int broken; char why[128];
    ...;
};
struct idm_local_offer { uint32_t magic; uint32_t layout_version; struct idm_layout layout; };
struct idm_local_link { struct idm_endpoint ep; void *base; size_t len; int sock;
                        int fds[5]; };
struct idm_grant_fd_offer {
    uint32_t magic; uint32_t layout_version; int32_t status; uint32_t peer_domid;
    struct idm_layout layout; uint64_t mmap_offset; uint64_t mmap_length;
    uint32_t req_port; uint32_t rsp_port; char why[128];
};
struct idm_grant_fd_link { struct idm_endpoint ep; void *base; size_t len; int sock;
                           int fds[3]; uint32_t peer_domid; };

size_t idm_region_size(const struct idm_layout *lay);
void idm_region_format(void *base, const struct idm_layout *lay);
int idm_ep_init(struct idm_endpoint *ep, void *base, size_t len, const struct idm_layout *lay,
                int side, const struct idm_bell *tx_bell, const struct idm_bell *rx_bell);
void idm_ep_close(struct idm_endpoint *ep);
int idm_send(struct idm_endpoint *ep, const struct idm_hdr *hdr, const void *payload,
             uint32_t len, int timeout_ms);
int idm_sendv(struct idm_endpoint *ep, const struct idm_hdr *hdr, const struct iovec *iov,
              int iovcnt, int timeout_ms);
int idm_send_msg(struct idm_endpoint *ep, uint32_t opcode, uint16_t flags, uint64_t seq,
                 int32_t status, const void *payload, uint32_t len, int timeout_ms);
int64_t idm_recv_hdr(struct idm_endpoint *ep, struct idm_hdr *hdr, int timeout_ms);
int idm_recv_payload(struct idm_endpoint *ep, void *buf, uint64_t len, int timeout_ms);
int idm_recv_batch(struct idm_endpoint *ep, void *buf, uint32_t cap, uint32_t *offsets,
                   uint32_t max_msgs, int timeout_ms);
void idm_hdr_init(struct idm_hdr *hdr, uint32_t opcode, uint16_t flags, uint64_t seq,
                  uint32_t length, int32_t status);
int idm_bell_notify(const struct idm_bell *b);
int idm_bell_wait(const struct idm_bell *b, int timeout_ms);
int idm_hello_client(struct idm_endpoint *ep, uint32_t max_payload, uint64_t table_digest,
                     uint16_t *version, uint32_t *max_payload_out, int timeout_ms);
int idm_hello_server(struct idm_endpoint *ep, uint32_t max_payload, uint64_t table_digest,
                     uint16_t *version, int timeout_ms);
int idm_local_connect(struct idm_local_link *link, const char *path,
                      const struct idm_layout *lay, char *why, size_t why_len);
int idm_local_accept(struct idm_local_link *link, int sock, char *why, size_t why_len);
void idm_local_release(struct idm_local_link *link);
int idm_grant_fd_connect(struct idm_grant_fd_link *link, const char *path, int timeout_ms,
                         char *why, size_t why_len);
void idm_grant_fd_release(struct idm_grant_fd_link *link);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "idm._ring",
    '#include "idm.h"',
    sources=[str(CSRC / name) for name in SOURCES],
    include_dirs=[str(CSRC)],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"],
)
