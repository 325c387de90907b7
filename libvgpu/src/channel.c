/*
 * The process's channel to gpu-proxy, through the unix socket named by VGPU_PROXY_SOCKET
 * (default /run/vgpu/proxy.sock), opened by cuInit (or lazily by the child of a fork), hello'd
 * with the call table's digest, then used for every forwarded call. VGPU_LINK says what listens
 * there: "local" (the default) is gpu-proxy itself, and the process offers it a LocalLink;
 * "grant" is the Xen zone agent's channel broker, which hands the process a GrantLink's granted
 * pages and event channels already attached by gpu-proxy in Dom0 (idm/csrc/grant_fd_link.c).
 *
 * One call is in flight at a time: the channel lock is held from a request's first byte to its
 * reply's last, so replies always answer the request just sent (checked by seq and opcode).
 * Fire-and-forget calls hold it only while their request enters the ring.
 *
 * A channel that fails (gpu-proxy closed it, broke the ring protocol, or its process died) is
 * lost for good: its handles lived in gpu-proxy, so every later call fails with
 * CUDA_ERROR_DEVICE_UNAVAILABLE, as a real driver reports a GPU that fell off the bus. A
 * watchdog thread notices a dead gpu-proxy (its socket hangs up; the broker hangs up when
 * gpu-proxy's side of a GrantLink goes away) and closes our endpoint, which wakes any thread
 * waiting in the ring.
 */
#include "vgpu.h"

#include "idm.h"
#include "vgpu_calls.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>
#include <xen/gntalloc.h>

#define DEFAULT_SOCKET "/run/vgpu/proxy.sock"
/* 512 KiB per direction, the library default: large messages stream through it. */
#define RING_ORDER 19
/* The hello itself must not hang on a proxy that accepted the socket but does not answer. */
#define HELLO_TIMEOUT_MS 30000
/* The broker answers once gpu-proxy has attached the channel; it gives up (and says why) first. */
#define BROKER_TIMEOUT_MS 60000

enum channel_state { CH_NONE, CH_UP, CH_LOST };
enum link_kind { LINK_LOCAL, LINK_GRANT };

static struct {
    pthread_mutex_t lock;
    enum channel_state state;
    enum link_kind kind;
    struct idm_local_link local;      /* kind == LINK_LOCAL */
    struct idm_grant_fd_link grant;   /* kind == LINK_GRANT */
    struct idm_endpoint *ep;          /* the link's endpoint while the state is CH_UP */
    int sock;                         /* the link's socket: hangs up when the host goes */
    uint64_t seq;
    int host_gone; /* set by the watchdog: gpu-proxy's socket hung up */
} chan = {.lock = PTHREAD_MUTEX_INITIALIZER, .state = CH_NONE, .sock = -1};

void vgpu_log(const char *fmt, ...)
{
    static const char prefix[] = "libvgpu: ";
    char line[512];
    size_t len = sizeof(prefix) - 1;
    va_list ap;
    int n;

    memcpy(line, prefix, len);
    va_start(ap, fmt);
    n = vsnprintf(line + len, sizeof(line) - len - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    len += (size_t)n < sizeof(line) - len - 1 ? (size_t)n : sizeof(line) - len - 2;
    line[len++] = '\n';
    /* One write: lines from several threads or processes do not interleave. */
    (void)!write(STDERR_FILENO, line, len);
}

static const char *socket_path(void)
{
    const char *path = getenv("VGPU_PROXY_SOCKET");
    return path && *path ? path : DEFAULT_SOCKET;
}

/* Blocks until gpu-proxy's end of the socket hangs up, then closes our endpoint so that every
 * thread waiting in the ring wakes with -EPIPE instead of waiting for a reply that cannot come. */
static void *watchdog(void *arg)
{
    struct idm_endpoint *ep = arg;
    struct pollfd p = {.fd = chan.sock, .events = POLLRDHUP};
    char byte;

    for (;;) {
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        /* Neither gpu-proxy nor the broker writes to the socket once the ring is handed over:
         * any event is its end. */
        if (recv(p.fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) < 0 &&
            (errno == EAGAIN || errno == EINTR))
            continue;
        break;
    }
    __atomic_store_n(&chan.host_gone, 1, __ATOMIC_SEQ_CST);
    idm_ep_close(ep);
    return NULL;
}

static int start_watchdog(void)
{
    pthread_attr_t attr;
    pthread_t thread;
    sigset_t all, old;
    int rc;

    /* The application's signals belong to its own threads. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 << 10);
    rc = pthread_create(&thread, &attr, watchdog, chan.ep);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

static void release_link(void)
{
    if (chan.kind == LINK_GRANT)
        idm_grant_fd_release(&chan.grant);
    else
        idm_local_release(&chan.local);
    chan.ep = NULL;
    chan.sock = -1;
}

/* Open the link VGPU_LINK names; returns 0 or logs why and returns -1. */
static int open_link(const char *path)
{
    struct idm_layout layout = {RING_ORDER, RING_ORDER};
    const char *kind = getenv("VGPU_LINK");
    char why[256];

    if (!kind || !*kind || !strcmp(kind, "local")) {
        chan.kind = LINK_LOCAL;
        if (idm_local_connect(&chan.local, path, &layout, why, sizeof(why))) {
            vgpu_log("cannot reach gpu-proxy at %s (%s): no GPU for this process", path, why);
            return -1;
        }
        chan.ep = &chan.local.ep;
        chan.sock = chan.local.sock;
        return 0;
    }
    if (!strcmp(kind, "grant")) {
        chan.kind = LINK_GRANT;
        if (idm_grant_fd_connect(&chan.grant, path, BROKER_TIMEOUT_MS, why, sizeof(why))) {
            vgpu_log("cannot reach gpu-proxy through the zone agent at %s (%s): no GPU for "
                     "this process", path, why);
            return -1;
        }
        chan.ep = &chan.grant.ep;
        chan.sock = chan.grant.sock;
        return 0;
    }
    vgpu_log("VGPU_LINK=%.64s is not a link this libvgpu knows (local, grant): no GPU for this "
             "process", kind);
    return -1;
}

static CUresult connect_locked(void)
{
    const char *path = socket_path();
    uint32_t max_payload;
    uint16_t version;
    int rc;

    if (open_link(path))
        return CUDA_ERROR_NO_DEVICE;
    rc = idm_hello_client(chan.ep, IDM_MAX_PAYLOAD, VGPU_CALL_TABLE_DIGEST, &version,
                          &max_payload, HELLO_TIMEOUT_MS);
    if (rc) {
        CUresult result = CUDA_ERROR_NO_DEVICE;
        if (rc == -ENOMSG || rc == -EPROTONOSUPPORT) {
            vgpu_log("gpu-proxy at %s refused this libvgpu: %s (call table digest %016llx)",
                     path, rc == -ENOMSG ? "it was built from another call table"
                                         : "no common protocol version",
                     (unsigned long long)VGPU_CALL_TABLE_DIGEST);
            result = CUDA_ERROR_SYSTEM_DRIVER_MISMATCH;
        } else {
            vgpu_log("gpu-proxy at %s did not complete the hello: %s", path, strerror(-rc));
        }
        release_link();
        return result;
    }
    chan.host_gone = 0;
    if (start_watchdog()) {
        vgpu_log("cannot start the channel watchdog thread");
        release_link();
        return CUDA_ERROR_OPERATING_SYSTEM;
    }
    chan.seq = 0;
    chan.state = CH_UP;
    return CUDA_SUCCESS;
}

/* The channel is unusable from now on; say why once. */
static CUresult lose_locked(const char *what, int err)
{
    if (chan.state == CH_UP) {
        const char *why = chan.ep->why[0] ? chan.ep->why : strerror(err);
        if (__atomic_load_n(&chan.host_gone, __ATOMIC_SEQ_CST))
            why = "gpu-proxy went away (its socket hung up)";
        else if (err == EPIPE)
            why = "gpu-proxy closed the channel";
        vgpu_log("lost the channel to gpu-proxy while %s: %s", what, why);
        idm_ep_close(chan.ep);
        chan.state = CH_LOST;
    }
    return CUDA_ERROR_DEVICE_UNAVAILABLE;
}

/* Connect on first use; a connection that fails stays failed (said once, on stderr). */
static CUresult ready_locked(void)
{
    CUresult r;

    if (chan.state == CH_UP)
        return CUDA_SUCCESS;
    if (chan.state == CH_LOST)
        return CUDA_ERROR_DEVICE_UNAVAILABLE;
    r = connect_locked();
    if (r)
        chan.state = CH_LOST;
    return r;
}

CUresult vgpu_channel_connect(void)
{
    CUresult r;
    pthread_mutex_lock(&chan.lock);
    r = ready_locked();
    pthread_mutex_unlock(&chan.lock);
    return r;
}

size_t vgpu_channel_max_payload(void)
{
    size_t n;
    pthread_mutex_lock(&chan.lock);
    n = chan.state == CH_UP ? chan.ep->max_payload : IDM_MAX_PAYLOAD;
    pthread_mutex_unlock(&chan.lock);
    return n;
}

static CUresult send_locked(uint32_t opcode, uint16_t flags, const struct iovec *req, int n,
                            uint64_t *seq)
{
    struct idm_hdr h;
    size_t len = 0;
    int rc;

    for (int i = 0; i < n; i++)
        len += req[i].iov_len;
    if (len > chan.ep->max_payload)
        return CUDA_ERROR_INVALID_VALUE; /* callers split what may be large; nothing was sent */
    *seq = ++chan.seq;
    idm_hdr_init(&h, opcode, flags, *seq, (uint32_t)len, 0);
    rc = idm_sendv(chan.ep, &h, req, n, -1);
    return rc ? lose_locked("sending a request", -rc) : CUDA_SUCCESS;
}

/* Receive the header of the reply to (opcode, seq); returns its payload length or -1 (lost). */
static int64_t reply_hdr_locked(uint32_t opcode, uint64_t seq, CUresult *status)
{
    struct idm_hdr h;
    int64_t len = idm_recv_hdr(chan.ep, &h, -1);

    if (len < 0) {
        *status = lose_locked("waiting for a reply", (int)-len);
        return -1;
    }
    if (!(h.flags & IDM_F_REPLY) || h.seq != seq || h.opcode != opcode) {
        snprintf(chan.ep->why, sizeof(chan.ep->why),
                 "reply (opcode 0x%x, seq %llu) does not answer request (opcode 0x%x, seq %llu)",
                 h.opcode, (unsigned long long)h.seq, opcode, (unsigned long long)seq);
        *status = lose_locked("reading a reply", EPROTO);
        return -1;
    }
    if (h.status != CUDA_SUCCESS && len != 0) {
        snprintf(chan.ep->why, sizeof(chan.ep->why),
                 "error reply to opcode 0x%x carries %lld payload bytes", opcode, (long long)len);
        *status = lose_locked("reading a reply", EPROTO);
        return -1;
    }
    *status = (CUresult)h.status;
    return len;
}

static CUresult reply_locked(uint32_t opcode, uint64_t seq, void *rep, size_t cap, size_t *rep_len)
{
    CUresult status;
    int64_t len = reply_hdr_locked(opcode, seq, &status);
    int rc;

    if (len < 0)
        return status;
    if ((uint64_t)len > cap) {
        snprintf(chan.ep->why, sizeof(chan.ep->why),
                 "reply to opcode 0x%x has %lld payload bytes, at most %zu expected", opcode,
                 (long long)len, cap);
        return lose_locked("reading a reply", EPROTO);
    }
    rc = idm_recv_payload(chan.ep, rep, (uint64_t)len, -1);
    if (rc)
        return lose_locked("reading a reply", -rc);
    *rep_len = (size_t)len;
    return status;
}

CUresult vgpu_call(uint32_t opcode, const struct iovec *req, int n, void *rep, size_t cap,
                   size_t *rep_len)
{
    uint64_t seq;
    CUresult r;

    pthread_mutex_lock(&chan.lock);
    r = ready_locked();
    if (!r)
        r = send_locked(opcode, 0, req, n, &seq);
    if (!r)
        r = reply_locked(opcode, seq, rep, cap, rep_len);
    pthread_mutex_unlock(&chan.lock);
    return r;
}

CUresult vgpu_call_async(uint32_t opcode, const struct iovec *req, int n)
{
    uint64_t seq;
    CUresult r;

    pthread_mutex_lock(&chan.lock);
    r = ready_locked();
    if (!r)
        r = send_locked(opcode, IDM_F_ASYNC, req, n, &seq);
    pthread_mutex_unlock(&chan.lock);
    return r;
}

CUresult vgpu_call_blob(uint32_t opcode, const struct iovec *req, int n, void *dst, size_t len)
{
    uint8_t prefix[4];
    uint64_t seq;
    int64_t got;
    CUresult r;
    int rc;

    pthread_mutex_lock(&chan.lock);
    r = ready_locked();
    if (!r)
        r = send_locked(opcode, 0, req, n, &seq);
    if (r)
        goto out;
    got = reply_hdr_locked(opcode, seq, &r);
    if (got < 0 || r != CUDA_SUCCESS)
        goto out;
    if ((uint64_t)got != sizeof(prefix) + (uint64_t)len) {
        snprintf(chan.ep->why, sizeof(chan.ep->why),
                 "reply to opcode 0x%x has %lld payload bytes, %zu expected", opcode,
                 (long long)got, sizeof(prefix) + len);
        r = lose_locked("reading a reply", EPROTO);
        goto out;
    }
    rc = idm_recv_payload(chan.ep, prefix, sizeof(prefix), -1);
    if (!rc && ((uint32_t)prefix[0] | (uint32_t)prefix[1] << 8 | (uint32_t)prefix[2] << 16 |
                (uint32_t)prefix[3] << 24) != len) {
        snprintf(chan.ep->why, sizeof(chan.ep->why),
                 "reply to opcode 0x%x announces another length than %zu bytes", opcode, len);
        r = lose_locked("reading a reply", EPROTO);
        goto out;
    }
    if (!rc)
        rc = idm_recv_payload(chan.ep, dst, len, -1);
    if (rc)
        r = lose_locked("reading a reply", -rc);
out:
    pthread_mutex_unlock(&chan.lock);
    return r;
}

CUresult vgpu_call_batch(struct vgpu_batch_call *calls, size_t n)
{
    uint64_t first = 0, seq;
    CUresult r;
    size_t i;

    pthread_mutex_lock(&chan.lock);
    r = ready_locked();
    for (i = 0; !r && i < n; i++) {
        struct iovec iov = {calls[i].req, calls[i].req_len};
        r = send_locked(calls[i].opcode, 0, &iov, calls[i].req_len ? 1 : 0, &seq);
        if (i == 0)
            first = seq;
    }
    for (i = 0; !r && i < n; i++) {
        size_t len = 0;
        calls[i].status = reply_locked(calls[i].opcode, first + i, calls[i].rep,
                                       sizeof(calls[i].rep), &len);
        calls[i].rep_len = (uint32_t)len;
        if (calls[i].status == CUDA_ERROR_DEVICE_UNAVAILABLE && chan.state == CH_LOST)
            r = calls[i].status;
    }
    pthread_mutex_unlock(&chan.lock);
    return r;
}

/* ---- pinned host memory -------------------------------------------------------------------- */

#define SHARE_MAGIC 0x4E495056u /* "VPIN": gpu_proxy/shared_host.py */

struct share_message {
    uint32_t magic;
    uint32_t reserved;
    uint64_t arena;
    uint64_t size;
};

/* Pass `fd` over the LocalLink's socket, then name it in vgpuHostShare, both under the channel
 * lock so that gpu-proxy finds this message, and no other thread's, when it handles the call.
 * CUDA_ERROR_NOT_SUPPORTED where the link has no socket for it (grant link). */
CUresult vgpu_channel_share_fd(int fd, uint64_t arena, uint64_t size)
{
    struct share_message m = {SHARE_MAGIC, 0, arena, size};
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec data = {&m, sizeof(m)};
    struct msghdr msg = {.msg_iov = &data, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof(control)};
    struct cmsghdr *c;
    uint8_t req[16], rep[8];
    struct iovec iov = {req, 0};
    uint64_t seq;
    size_t len;
    CUresult r;

    memset(control, 0, sizeof(control));
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    iov.iov_len = (size_t)vgpu_marshal_vgpuHostShare(req, sizeof(req), arena, size);
    pthread_mutex_lock(&chan.lock);
    r = ready_locked();
    if (!r && chan.kind != LINK_LOCAL)
        r = CUDA_ERROR_NOT_SUPPORTED;
    if (!r && sendmsg(chan.sock, &msg, MSG_NOSIGNAL) != (ssize_t)sizeof(m))
        r = lose_locked("passing pinned memory", errno);
    if (!r)
        r = send_locked(VGPU_OP_vgpuHostShare, 0, &iov, 1, &seq);
    if (!r)
        r = reply_locked(VGPU_OP_vgpuHostShare, seq, rep, sizeof(rep), &len);
    pthread_mutex_unlock(&chan.lock);
    return r;
}

CUresult vgpu_channel_share_grants(size_t len, uint64_t arena, void **base, uint64_t *index)
{
    static int reported;
    size_t pages = len / IDM_PAGE_SIZE, refs_len = pages * sizeof(uint32_t);
    size_t head = offsetof(struct ioctl_gntalloc_alloc_gref, gref_ids), rep_len;
    size_t req_cap = 32 + refs_len;
    struct ioctl_gntalloc_alloc_gref *op;
    struct ioctl_gntalloc_dealloc_gref undo;
    struct iovec iov;
    uint8_t *req, rep[8];
    void *p = MAP_FAILED;
    int n, err = 0;
    CUresult r;

    if (!pages || refs_len > VGPU_MAX_vgpuHostShareGrants_refs)
        return CUDA_ERROR_NOT_SUPPORTED; /* more than one arena may be: copied instead */
    op = calloc(1, head + refs_len);
    req = malloc(req_cap);
    if (!op || !req) {
        free(op);
        free(req);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    op->flags = GNTALLOC_FLAG_WRITABLE;
    op->count = (uint32_t)pages;
    pthread_mutex_lock(&chan.lock);
    r = ready_locked();
    if (!r && chan.kind != LINK_GRANT)
        r = CUDA_ERROR_NOT_SUPPORTED;
    if (!r) {
        op->domid = (uint16_t)chan.grant.peer_domid;
        if (ioctl(chan.grant.fds[0], IOCTL_GNTALLOC_ALLOC_GREF, op) < 0) {
            err = errno;
        } else if ((p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, chan.grant.fds[0],
                             (off_t)op->index)) == MAP_FAILED) {
            err = errno;
            undo = (struct ioctl_gntalloc_dealloc_gref){op->index, op->count};
            (void)ioctl(chan.grant.fds[0], IOCTL_GNTALLOC_DEALLOC_GREF, &undo);
        }
        if (err)
            r = CUDA_ERROR_NOT_SUPPORTED;
    }
    pthread_mutex_unlock(&chan.lock);
    if (err && !reported) {
        reported = 1;
        vgpu_log("granting %zu pages of pinned memory to gpu-proxy failed (%s): such buffers are "
                 "copied through the channel (see /sys/module/xen_gntalloc/parameters/limit and "
                 "the zone's max_grant_frames)",
                 pages, strerror(err));
    }
    if (!r) {
        n = vgpu_marshal_vgpuHostShareGrants(req, req_cap, arena, len, op->gref_ids,
                                             (unsigned)refs_len);
        iov = (struct iovec){req, n < 0 ? 0 : (size_t)n};
        r = n < 0 ? CUDA_ERROR_INVALID_VALUE
                  : vgpu_call(VGPU_OP_vgpuHostShareGrants, &iov, 1, rep, sizeof(rep), &rep_len);
        if (r) {
            vgpu_channel_ungrant(p, len, op->index);
        } else {
            *base = p;
            *index = op->index;
        }
    }
    free(op);
    free(req);
    return r;
}

void vgpu_channel_ungrant(void *base, size_t len, uint64_t index)
{
    struct ioctl_gntalloc_dealloc_gref d = {index, (uint32_t)(len / IDM_PAGE_SIZE)};

    munmap(base, len);
    pthread_mutex_lock(&chan.lock);
    if (chan.kind == LINK_GRANT && chan.grant.fds[0] >= 0)
        (void)ioctl(chan.grant.fds[0], IOCTL_GNTALLOC_DEALLOC_GREF, &d);
    pthread_mutex_unlock(&chan.lock);
}

/* ---- fork ----------------------------------------------------------------------------------- */

/* The child's copy of the channel is its parent's: close our copies of the descriptors without
 * touching the shared pages (marking them closed would close the parent's channel), so that the
 * parent's socket hangs up when the parent, not the child, goes away. */
static void forget_mapping(void *base, size_t len, const int *fds, int nfds, int sock)
{
    if (base != MAP_FAILED && base)
        munmap(base, len);
    for (int i = 0; i < nfds; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    if (sock >= 0)
        close(sock);
}

static void forget_parent_channel(void)
{
    if (chan.state != CH_NONE && chan.kind == LINK_LOCAL)
        forget_mapping(chan.local.base, chan.local.len, chan.local.fds, IDM_LOCAL_NFDS,
                       chan.local.sock);
    if (chan.state != CH_NONE && chan.kind == LINK_GRANT)
        forget_mapping(chan.grant.base, chan.grant.len, chan.grant.fds, IDM_GRANT_FD_NFDS,
                       chan.grant.sock);
    memset(&chan.local, 0, sizeof(chan.local));
    memset(&chan.grant, 0, sizeof(chan.grant));
    chan.ep = NULL;
    chan.sock = -1;
    chan.state = CH_NONE;
    chan.seq = 0;
    chan.host_gone = 0;
}

void vgpu_channel_atfork(enum vgpu_fork_phase phase)
{
    if (phase == VGPU_FORK_PREPARE) {
        pthread_mutex_lock(&chan.lock); /* no call is in flight while the process is copied */
        return;
    }
    if (phase == VGPU_FORK_CHILD)
        forget_parent_channel();
    pthread_mutex_unlock(&chan.lock);
}
