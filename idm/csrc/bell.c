/*
 * Doorbells: how one side wakes the other. LocalLink uses eventfds; GrantLink uses a Xen
 * interdomain event channel opened through /dev/xen/evtchn (one fd per port, so a thread waiting
 * on one ring never consumes the wakeup meant for another).
 */
#define _GNU_SOURCE
#include "idm.h"

#include <errno.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>
/* <xen/evtchn.h> uses domid_t without defining it. */
typedef uint16_t domid_t;
#include <xen/evtchn.h>

int idm_bell_notify(const struct idm_bell *b)
{
    if (b->kind == IDM_BELL_EVENTFD) {
        uint64_t one = 1;
        /* EAGAIN means the counter is saturated: the peer has a wakeup pending anyway. */
        if (write(b->notify_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
            return -errno;
        return 0;
    }
    if (b->kind == IDM_BELL_EVTCHN) {
        struct ioctl_evtchn_notify n = {.port = b->port};
        return ioctl(b->notify_fd, IOCTL_EVTCHN_NOTIFY, &n) < 0 ? -errno : 0;
    }
    return -EINVAL;
}

static void drain(const struct idm_bell *b)
{
    if (b->kind == IDM_BELL_EVENTFD) {
        uint64_t count;
        (void)!read(b->wait_fd, &count, sizeof(count));
    } else {
        uint32_t ports[16];
        ssize_t n = read(b->wait_fd, ports, sizeof(ports));
        /* The driver masks a port when it fires; writing the port back unmasks it. */
        for (ssize_t i = 0; i < n / (ssize_t)sizeof(uint32_t); i++)
            (void)!write(b->wait_fd, &ports[i], sizeof(uint32_t));
    }
}

int idm_bell_wait(const struct idm_bell *b, int timeout_ms)
{
    struct pollfd p = {.fd = b->wait_fd, .events = POLLIN};
    int r;

    if (b->kind != IDM_BELL_EVENTFD && b->kind != IDM_BELL_EVTCHN)
        return -EINVAL;
    r = poll(&p, 1, timeout_ms);
    if (r < 0)
        return errno == EINTR ? 1 : -errno;
    if (r == 0)
        return 0;
    if (p.revents & (POLLERR | POLLNVAL))
        return -EBADF;
    drain(b);
    return 1;
}
