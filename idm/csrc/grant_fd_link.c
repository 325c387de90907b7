/*
 * GrantFdLink: a zone process's end of a GrantLink set up by the zone agent's channel broker.
 *
 * The broker (cri_runtime/agent/gpu_broker.py) owns the grants, the event channels and the
 * xenstore offer; the process gets, over a unix socket, one struct idm_grant_fd_offer and three
 * fds (SCM_RIGHTS): the /dev/xen/gntalloc fd holding the granted pages and the two
 * /dev/xen/evtchn fds, each bound to one ring's port. So container processes never open
 * /dev/xen, and the agent, which outlives them, is the one that withdraws the offer.
 *
 * Everything received is checked before it is used: header magic, layout and sizes, port range,
 * the fd count, that every fd is a character device of the misc class Xen's devices belong to,
 * that the two doorbells are the same device and the pages another one, and, once mapped, that
 * the region's control page carries the magic and layout version the broker formatted.
 */
#define _GNU_SOURCE
#include "idm.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

/* Linux's MISC_MAJOR: /dev/xen/gntalloc and /dev/xen/evtchn are both misc devices. */
#define MISC_MAJOR 10

enum { FD_PAGES, FD_REQ, FD_RSP };

static void link_reset(struct idm_grant_fd_link *link)
{
    memset(link, 0, sizeof(*link));
    link->sock = -1;
    link->base = MAP_FAILED;
    for (int i = 0; i < IDM_GRANT_FD_NFDS; i++)
        link->fds[i] = -1;
}

void idm_grant_fd_release(struct idm_grant_fd_link *link)
{
    if (link->ep.ctrl)
        idm_ep_close(&link->ep);
    if (link->base != MAP_FAILED && link->base)
        munmap(link->base, link->len);
    for (int i = 0; i < IDM_GRANT_FD_NFDS; i++)
        if (link->fds[i] >= 0)
            close(link->fds[i]);
    if (link->sock >= 0)
        close(link->sock);
    link_reset(link);
}

/* Release everything, say why, return -err. */
__attribute__((format(printf, 5, 6))) static int refuse(struct idm_grant_fd_link *link,
                                                        char *why, size_t why_len, int err,
                                                        const char *fmt, ...)
{
    va_list ap;

    if (why && why_len) {
        va_start(ap, fmt);
        vsnprintf(why, why_len, fmt, ap);
        va_end(ap);
    }
    idm_grant_fd_release(link);
    return -err;
}

static int connect_socket(struct idm_grant_fd_link *link, const char *path, int timeout_ms)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};

    if (strlen(path) >= sizeof(addr.sun_path))
        return -ENAMETOOLONG;
    strcpy(addr.sun_path, path);
    link->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (link->sock < 0)
        return -errno;
    if (connect(link->sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return -errno;
    /* The broker answers once the host has attached the channel: bounded, never forever. */
    if (timeout_ms >= 0 && setsockopt(link->sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0)
        return -errno;
    return 0;
}

/* Receive the header and keep at most IDM_GRANT_FD_NFDS fds (extras are closed); returns the
 * bytes read or -errno, and the number of fds that came in *nfds. */
static ssize_t receive(struct idm_grant_fd_link *link, struct idm_grant_fd_offer *offer,
                       size_t *nfds, int *truncated)
{
    char control[CMSG_SPACE(sizeof(int) * IDM_GRANT_FD_NFDS)];
    struct iovec iov = {offer, sizeof(*offer)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof(control)};
    struct cmsghdr *c;
    ssize_t n;

    memset(control, 0, sizeof(control));
    n = recvmsg(link->sock, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    if (n < 0)
        return -errno;
    *nfds = 0;
    for (c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(fd));
            if (*nfds < IDM_GRANT_FD_NFDS)
                link->fds[*nfds] = fd;
            else
                close(fd);
            (*nfds)++;
        }
    }
    *truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
    return n;
}

static const char *fd_name(int i)
{
    return i == FD_PAGES ? "gntalloc" : i == FD_REQ ? "request evtchn" : "response evtchn";
}

int idm_grant_fd_connect(struct idm_grant_fd_link *link, const char *path, int timeout_ms,
                         char *why, size_t why_len)
{
    struct idm_grant_fd_offer offer;
    struct stat st[IDM_GRANT_FD_NFDS];
    struct idm_bell tx, rx;
    volatile struct idm_ctrl *ctrl;
    size_t nfds = 0, size;
    int truncated = 0, rc;
    ssize_t n;

    link_reset(link);
    memset(&offer, 0, sizeof(offer));
    rc = connect_socket(link, path, timeout_ms);
    if (rc)
        return refuse(link, why, why_len, -rc, "connecting to %s: %s", path, strerror(-rc));
    n = receive(link, &offer, &nfds, &truncated);
    if (n == -EAGAIN || n == -EWOULDBLOCK)
        return refuse(link, why, why_len, ETIMEDOUT,
                      "the zone agent sent no channel within %d ms", timeout_ms);
    if (n < 0)
        return refuse(link, why, why_len, (int)-n, "reading the zone agent's channel: %s",
                      strerror((int)-n));
    if (n == 0)
        return refuse(link, why, why_len, ECONNRESET,
                      "the zone agent hung up before sending a channel");
    if ((size_t)n != sizeof(offer))
        return refuse(link, why, why_len, EPROTO, "the zone agent's header is %zd bytes, not %zu",
                      n, sizeof(offer));
    if (offer.magic != IDM_GRANT_FD_MAGIC)
        return refuse(link, why, why_len, EPROTO,
                      "bad header magic 0x%08x (is this the zone agent's channel socket?)",
                      offer.magic);
    if (offer.layout_version != IDM_LAYOUT_VERSION)
        return refuse(link, why, why_len, EPROTO, "layout version %u, this side speaks %u",
                      offer.layout_version, IDM_LAYOUT_VERSION);
    if (offer.status) {
        offer.why[sizeof(offer.why) - 1] = 0;
        return refuse(link, why, why_len,
                      offer.status < 0 && offer.status > -4096 ? -offer.status : EPROTO,
                      "the zone agent could not set up the channel: %s", offer.why);
    }
    if (offer.peer_domid >= IDM_DOMID_FIRST_RESERVED)
        return refuse(link, why, why_len, EPROTO, "peer domain %u is not a domain id",
                      offer.peer_domid);
    if (truncated || nfds != IDM_GRANT_FD_NFDS)
        return refuse(link, why, why_len, EPROTO, "the channel came with %zu fds, not %d", nfds,
                      IDM_GRANT_FD_NFDS);
    size = idm_region_size(&offer.layout);
    if (!size)
        return refuse(link, why, why_len, EINVAL, "ring orders %u/%u are out of range %d..%d",
                      offer.layout.req_order, offer.layout.rsp_order, IDM_RING_ORDER_MIN,
                      IDM_RING_ORDER_MAX);
    if (offer.mmap_length != size)
        return refuse(link, why, why_len, EINVAL,
                      "region length %llu does not match the layout's %zu bytes",
                      (unsigned long long)offer.mmap_length, size);
    if (offer.mmap_offset % IDM_PAGE_SIZE || offer.mmap_offset > (uint64_t)INT64_MAX - size)
        return refuse(link, why, why_len, EINVAL, "region offset %llu is not a page offset",
                      (unsigned long long)offer.mmap_offset);
    if (!offer.req_port || offer.req_port > IDM_EVTCHN_PORT_MAX || !offer.rsp_port ||
        offer.rsp_port > IDM_EVTCHN_PORT_MAX || offer.req_port == offer.rsp_port)
        return refuse(link, why, why_len, EINVAL,
                      "ports %u/%u must be distinct and in 1..%u", offer.req_port,
                      offer.rsp_port, IDM_EVTCHN_PORT_MAX);
    for (int i = 0; i < IDM_GRANT_FD_NFDS; i++) {
        if (fstat(link->fds[i], &st[i]) < 0 || !S_ISCHR(st[i].st_mode) ||
            major(st[i].st_rdev) != MISC_MAJOR)
            return refuse(link, why, why_len, EBADF,
                          "the %s fd is not a Xen device (not a misc character device)",
                          fd_name(i));
    }
    if (st[FD_REQ].st_rdev != st[FD_RSP].st_rdev || st[FD_PAGES].st_rdev == st[FD_REQ].st_rdev)
        return refuse(link, why, why_len, EBADF,
                      "the two evtchn fds must be one device and the gntalloc fd another");
    link->len = size;
    link->peer_domid = offer.peer_domid;
    link->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, link->fds[FD_PAGES],
                      (off_t)offer.mmap_offset);
    if (link->base == MAP_FAILED)
        return refuse(link, why, why_len, errno, "mapping the granted region: %s",
                      strerror(errno));
    ctrl = link->base;
    if (ctrl->magic != IDM_CTRL_MAGIC || ctrl->layout_version != IDM_LAYOUT_VERSION ||
        ctrl->zone_closed || ctrl->host_closed)
        return refuse(link, why, why_len, EPROTO,
                      "the granted region is not a fresh channel (control page magic 0x%08x)",
                      ctrl->magic);
    tx = (struct idm_bell){IDM_BELL_EVTCHN, link->fds[FD_REQ], link->fds[FD_REQ], offer.req_port};
    rx = (struct idm_bell){IDM_BELL_EVTCHN, link->fds[FD_RSP], link->fds[FD_RSP], offer.rsp_port};
    rc = idm_ep_init(&link->ep, link->base, link->len, &offer.layout, IDM_SIDE_ZONE, &tx, &rx);
    if (rc)
        return refuse(link, why, why_len, -rc, "binding the endpoint: %s", strerror(-rc));
    return 0;
}
