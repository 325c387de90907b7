"""cffi builder for ``idm.xen._xenioctl``: the Xen device ioctls, taken from the kernel headers.

Ioctl numbers and struct layouts come from <xen/gntalloc.h>, <xen/gntdev.h> and <xen/evtchn.h>
through the C compiler (``...`` in the cdef), never restated in Python. The ioctls themselves are
small C helpers returning 0 (or a port) or -errno, so Python never packs a kernel struct by hand;
the variable-length requests (one grant ref per page) are sized and filled in C.
"""

from cffi import FFI

CDEF = """
#define IOCTL_GNTALLOC_ALLOC_GREF ...
#define IOCTL_GNTALLOC_DEALLOC_GREF ...
#define IOCTL_GNTDEV_MAP_GRANT_REF ...
#define IOCTL_GNTDEV_UNMAP_GRANT_REF ...
#define IOCTL_EVTCHN_BIND_UNBOUND_PORT ...
#define IOCTL_EVTCHN_BIND_INTERDOMAIN ...
#define IOCTL_EVTCHN_NOTIFY ...
#define IOCTL_EVTCHN_UNBIND ...
#define GNTALLOC_FLAG_WRITABLE ...
#define IDMX_MAX_PAGES ...

struct ioctl_gntalloc_alloc_gref {
    uint16_t domid; uint16_t flags; uint32_t count; uint64_t index; uint32_t gref_ids[1]; ...;
};
struct ioctl_gntalloc_dealloc_gref { uint64_t index; uint32_t count; ...; };
struct ioctl_gntdev_grant_ref { uint32_t domid; uint32_t ref; ...; };
struct ioctl_gntdev_map_grant_ref {
    uint32_t count; uint32_t pad; uint64_t index; struct ioctl_gntdev_grant_ref refs[1]; ...;
};
struct ioctl_gntdev_unmap_grant_ref { uint64_t index; uint32_t count; uint32_t pad; ...; };
struct ioctl_evtchn_bind_unbound_port { unsigned int remote_domain; ...; };
struct ioctl_evtchn_bind_interdomain { unsigned int remote_domain; unsigned int remote_port; ...; };
struct ioctl_evtchn_notify { unsigned int port; ...; };
struct ioctl_evtchn_unbind { unsigned int port; ...; };

int idmx_gntalloc_alloc(int fd, uint16_t domid, uint32_t count, uint64_t *index,
                        uint32_t *grefs);
int idmx_gntalloc_dealloc(int fd, uint64_t index, uint32_t count);
int idmx_gntdev_map(int fd, uint32_t domid, uint32_t count, const uint32_t *refs,
                    uint64_t *index);
int idmx_gntdev_unmap(int fd, uint64_t index, uint32_t count);
int idmx_evtchn_bind_unbound_port(int fd, uint32_t remote_domid);
int idmx_evtchn_bind_interdomain(int fd, uint32_t remote_domid, uint32_t remote_port);
int idmx_evtchn_notify(int fd, uint32_t port);
int idmx_evtchn_unbind(int fd, uint32_t port);
"""

SOURCE = r"""
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
/* The Linux UAPI headers use these Xen types without defining them. */
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#include <xen/evtchn.h>
#include <xen/gntalloc.h>
#include <xen/gntdev.h>

/* Upper bound on one request, so a bad count can never make the size computation overflow. */
#define IDMX_MAX_PAGES (1u << 20)

/* Allocate `count` writable pages shared with `domid`; their refs go to grefs[count]. */
static int idmx_gntalloc_alloc(int fd, uint16_t domid, uint32_t count, uint64_t *index,
                               uint32_t *grefs)
{
    size_t head = offsetof(struct ioctl_gntalloc_alloc_gref, gref_ids);
    size_t size = head + (size_t)count * sizeof(uint32_t);
    struct ioctl_gntalloc_alloc_gref *op;

    if (count == 0 || count > IDMX_MAX_PAGES)
        return -EINVAL;
    op = calloc(1, size < sizeof(*op) ? sizeof(*op) : size);
    if (!op)
        return -ENOMEM;
    op->domid = domid;
    op->flags = GNTALLOC_FLAG_WRITABLE;
    op->count = count;
    if (ioctl(fd, IOCTL_GNTALLOC_ALLOC_GREF, op) < 0) {
        int err = errno;
        free(op);
        return -err;
    }
    *index = op->index;
    memcpy(grefs, (const char *)op + head, (size_t)count * sizeof(uint32_t));
    free(op);
    return 0;
}

static int idmx_gntalloc_dealloc(int fd, uint64_t index, uint32_t count)
{
    struct ioctl_gntalloc_dealloc_gref op = {.index = index, .count = count};
    return ioctl(fd, IOCTL_GNTALLOC_DEALLOC_GREF, &op) < 0 ? -errno : 0;
}

/* Map `count` refs granted by `domid` as one range; *index is the mmap offset for it. */
static int idmx_gntdev_map(int fd, uint32_t domid, uint32_t count, const uint32_t *refs,
                           uint64_t *index)
{
    size_t head = offsetof(struct ioctl_gntdev_map_grant_ref, refs);
    size_t size = head + (size_t)count * sizeof(struct ioctl_gntdev_grant_ref);
    struct ioctl_gntdev_map_grant_ref *op;
    struct ioctl_gntdev_grant_ref *slots;

    if (count == 0 || count > IDMX_MAX_PAGES)
        return -EINVAL;
    op = calloc(1, size < sizeof(*op) ? sizeof(*op) : size);
    if (!op)
        return -ENOMEM;
    op->count = count;
    slots = (struct ioctl_gntdev_grant_ref *)((char *)op + head);
    for (uint32_t i = 0; i < count; i++) {
        slots[i].domid = domid;
        slots[i].ref = refs[i];
    }
    if (ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, op) < 0) {
        int err = errno;
        free(op);
        return -err;
    }
    *index = op->index;
    free(op);
    return 0;
}

static int idmx_gntdev_unmap(int fd, uint64_t index, uint32_t count)
{
    struct ioctl_gntdev_unmap_grant_ref op = {.index = index, .count = count};
    return ioctl(fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &op) < 0 ? -errno : 0;
}

/* The bind ioctls return the new local port. */
static int idmx_evtchn_bind_unbound_port(int fd, uint32_t remote_domid)
{
    struct ioctl_evtchn_bind_unbound_port op = {.remote_domain = remote_domid};
    int port = ioctl(fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &op);
    return port < 0 ? -errno : port;
}

static int idmx_evtchn_bind_interdomain(int fd, uint32_t remote_domid, uint32_t remote_port)
{
    struct ioctl_evtchn_bind_interdomain op = {.remote_domain = remote_domid,
                                               .remote_port = remote_port};
    int port = ioctl(fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, &op);
    return port < 0 ? -errno : port;
}

static int idmx_evtchn_notify(int fd, uint32_t port)
{
    struct ioctl_evtchn_notify op = {.port = port};
    return ioctl(fd, IOCTL_EVTCHN_NOTIFY, &op) < 0 ? -errno : 0;
}

static int idmx_evtchn_unbind(int fd, uint32_t port)
{
    struct ioctl_evtchn_unbind op = {.port = port};
    return ioctl(fd, IOCTL_EVTCHN_UNBIND, &op) < 0 ? -errno : 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "idm.xen._xenioctl",
    SOURCE,
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"],
)
