/*
 * LocalLink: the IDM channel on one host (process zone backend, tests). It mirrors GrantLink's
 * trust model: the zone owns the memory (a memfd it seals against shrinking, so the host can
 * never take SIGBUS) and offers it, with four eventfds, over a unix socket; the host validates
 * every fd before mapping. The socket stays open as the liveness signal of the zone process.
 */
#define _GNU_SOURCE
#include "idm.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define ACK_TIMEOUT_MS 30000
#define OFFER_TIMEOUT_S 10
#define REQUIRED_SEALS (F_SEAL_SHRINK | F_SEAL_GROW)

enum { FD_MEM, FD_REQ_DATA, FD_REQ_SPACE, FD_RSP_DATA, FD_RSP_SPACE };

struct ack {
    int32_t status; /* 0 or -errno */
    char why[124];
};

static int fail(char *why, size_t why_len, int err, const char *what)
{
    if (why && why_len)
        snprintf(why, why_len, "%s: %s", what, strerror(err));
    return -err;
}

static void link_reset(struct idm_local_link *link)
{
    memset(link, 0, sizeof(*link));
    link->sock = -1;
    link->base = MAP_FAILED;
    for (int i = 0; i < IDM_LOCAL_NFDS; i++)
        link->fds[i] = -1;
}

void idm_local_release(struct idm_local_link *link)
{
    if (link->ep.ctrl)
        idm_ep_close(&link->ep);
    if (link->base != MAP_FAILED && link->base)
        munmap(link->base, link->len);
    for (int i = 0; i < IDM_LOCAL_NFDS; i++)
        if (link->fds[i] >= 0)
            close(link->fds[i]);
    if (link->sock >= 0)
        close(link->sock);
    link_reset(link);
}

static void bells(const struct idm_local_link *link, int side, struct idm_bell *tx,
                  struct idm_bell *rx)
{
    const int *f = link->fds;
    /* A producer rings the ring's data bell and sleeps on its space bell; a consumer the reverse. */
    if (side == IDM_SIDE_ZONE) {
        *tx = (struct idm_bell){IDM_BELL_EVENTFD, f[FD_REQ_SPACE], f[FD_REQ_DATA], 0};
        *rx = (struct idm_bell){IDM_BELL_EVENTFD, f[FD_RSP_DATA], f[FD_RSP_SPACE], 0};
    } else {
        *tx = (struct idm_bell){IDM_BELL_EVENTFD, f[FD_RSP_SPACE], f[FD_RSP_DATA], 0};
        *rx = (struct idm_bell){IDM_BELL_EVENTFD, f[FD_REQ_DATA], f[FD_REQ_SPACE], 0};
    }
}

static int send_offer(int sock, const struct idm_local_offer *offer, const int *fds)
{
    char control[CMSG_SPACE(sizeof(int) * IDM_LOCAL_NFDS)];
    struct iovec iov = {(void *)offer, sizeof(*offer)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof(control)};
    struct cmsghdr *c;

    memset(control, 0, sizeof(control));
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * IDM_LOCAL_NFDS);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * IDM_LOCAL_NFDS);
    return sendmsg(sock, &msg, MSG_NOSIGNAL) == (ssize_t)sizeof(*offer) ? 0 : -1;
}

int idm_local_connect(struct idm_local_link *link, const char *path,
                      const struct idm_layout *lay, char *why, size_t why_len)
{
    struct idm_local_offer offer = {IDM_LOCAL_MAGIC, IDM_LAYOUT_VERSION, *lay};
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    struct idm_bell tx, rx;
    struct pollfd p;
    struct ack ack;
    size_t size = idm_region_size(lay);
    int rc;

    link_reset(link);
    if (!size)
        return fail(why, why_len, EINVAL, "invalid ring layout");
    if (strlen(path) >= sizeof(addr.sun_path))
        return fail(why, why_len, ENAMETOOLONG, "socket path");
    strcpy(addr.sun_path, path);

    link->fds[FD_MEM] = memfd_create("idm-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (link->fds[FD_MEM] < 0 || ftruncate(link->fds[FD_MEM], (off_t)size) < 0 ||
        fcntl(link->fds[FD_MEM], F_ADD_SEALS, REQUIRED_SEALS | F_SEAL_SEAL) < 0) {
        rc = fail(why, why_len, errno, "creating the ring memfd");
        goto out;
    }
    link->len = size;
    link->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, link->fds[FD_MEM], 0);
    if (link->base == MAP_FAILED) {
        rc = fail(why, why_len, errno, "mapping the ring memfd");
        goto out;
    }
    idm_region_format(link->base, lay);
    for (int i = FD_REQ_DATA; i <= FD_RSP_SPACE; i++) {
        link->fds[i] = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (link->fds[i] < 0) {
            rc = fail(why, why_len, errno, "creating a doorbell eventfd");
            goto out;
        }
    }
    link->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (link->sock < 0 || connect(link->sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        char what[160];
        snprintf(what, sizeof(what), "connecting to %s", path);
        rc = fail(why, why_len, errno, what);
        goto out;
    }
    if (send_offer(link->sock, &offer, link->fds) < 0) {
        rc = fail(why, why_len, errno, "sending the ring offer");
        goto out;
    }
    p = (struct pollfd){.fd = link->sock, .events = POLLIN};
    if (poll(&p, 1, ACK_TIMEOUT_MS) != 1) {
        rc = fail(why, why_len, ETIMEDOUT, "waiting for the host to accept the ring");
        goto out;
    }
    if (recv(link->sock, &ack, sizeof(ack), MSG_WAITALL) != (ssize_t)sizeof(ack)) {
        rc = fail(why, why_len, ECONNRESET, "reading the host's answer");
        goto out;
    }
    if (ack.status) {
        ack.why[sizeof(ack.why) - 1] = 0;
        if (why && why_len)
            snprintf(why, why_len, "host refused the ring: %s", ack.why);
        rc = ack.status < 0 ? ack.status : -EPROTO;
        goto out;
    }
    bells(link, IDM_SIDE_ZONE, &tx, &rx);
    return idm_ep_init(&link->ep, link->base, link->len, lay, IDM_SIDE_ZONE, &tx, &rx);
out:
    idm_local_release(link);
    return rc;
}

static int is_eventfd(int fd)
{
    char proc[64], target[64];
    ssize_t n;

    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
    n = readlink(proc, target, sizeof(target) - 1);
    if (n < 0)
        return 0;
    target[n] = 0;
    return strcmp(target, "anon_inode:[eventfd]") == 0;
}

static int refuse(struct idm_local_link *link, char *why, size_t why_len, int err,
                  const char *fmt, const char *detail)
{
    struct ack ack = {.status = -err};

    snprintf(ack.why, sizeof(ack.why), fmt, detail);
    if (why && why_len)
        snprintf(why, why_len, "%s", ack.why);
    (void)!send(link->sock, &ack, sizeof(ack), MSG_NOSIGNAL);
    idm_local_release(link);
    return -err;
}

int idm_local_accept(struct idm_local_link *link, int sock, char *why, size_t why_len)
{
    char control[CMSG_SPACE(sizeof(int) * IDM_LOCAL_NFDS)];
    struct idm_local_offer offer;
    struct iovec iov = {&offer, sizeof(offer)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof(control)};
    struct cmsghdr *c;
    struct idm_bell tx, rx;
    struct ack ok = {0, "ok"};
    struct timeval offer_timeout = {.tv_sec = OFFER_TIMEOUT_S};
    struct stat st;
    size_t size, nfds = 0;
    ssize_t n;
    int seals;

    link_reset(link);
    link->sock = sock;
    /* A zone that connects and then says nothing must not hold the host's accept path. */
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &offer_timeout, sizeof(offer_timeout));
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    for (c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *in = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < k; i++) {
            if (nfds < IDM_LOCAL_NFDS)
                link->fds[nfds] = in[i];
            else
                close(in[i]);
            nfds++;
        }
    }
    if (n < 0)
        return refuse(link, why, why_len, errno, "reading the offer: %s", strerror(errno));
    if (n != (ssize_t)sizeof(offer))
        return refuse(link, why, why_len, EPROTO, "offer truncated%s", "");
    if (msg.msg_flags & MSG_CTRUNC || nfds != IDM_LOCAL_NFDS)
        return refuse(link, why, why_len, EPROTO, "offer must carry exactly 5 fds%s", "");
    if (offer.magic != IDM_LOCAL_MAGIC || offer.layout_version != IDM_LAYOUT_VERSION)
        return refuse(link, why, why_len, EPROTO, "bad offer magic or layout version%s", "");
    size = idm_region_size(&offer.layout);
    if (!size)
        return refuse(link, why, why_len, EINVAL, "ring orders out of range%s", "");
    seals = fcntl(link->fds[FD_MEM], F_GET_SEALS);
    if (seals < 0 || (seals & REQUIRED_SEALS) != REQUIRED_SEALS)
        return refuse(link, why, why_len, EPERM, "ring memory is not a memfd sealed against "
                      "shrinking and growing%s", "");
    if (fstat(link->fds[FD_MEM], &st) < 0 || (size_t)st.st_size != size)
        return refuse(link, why, why_len, EINVAL, "ring memory size does not match the layout%s",
                      "");
    for (int i = FD_REQ_DATA; i <= FD_RSP_SPACE; i++) {
        if (!is_eventfd(link->fds[i]))
            return refuse(link, why, why_len, EBADF, "doorbell fd is not an eventfd%s", "");
        /* The nonblocking flag lives on the shared file description: set it ourselves. */
        if (fcntl(link->fds[i], F_SETFL, O_NONBLOCK) < 0)
            return refuse(link, why, why_len, errno, "doorbell fd: %s", strerror(errno));
    }
    link->len = size;
    link->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, link->fds[FD_MEM], 0);
    if (link->base == MAP_FAILED)
        return refuse(link, why, why_len, errno, "mapping the ring: %s", strerror(errno));
    bells(link, IDM_SIDE_HOST, &tx, &rx);
    idm_ep_init(&link->ep, link->base, link->len, &offer.layout, IDM_SIDE_HOST, &tx, &rx);
    if (send(sock, &ok, sizeof(ok), MSG_NOSIGNAL) != (ssize_t)sizeof(ok)) {
        int err = errno;
        idm_local_release(link);
        return fail(why, why_len, err, "answering the offer");
    }
    return 0;
}
