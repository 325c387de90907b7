"""Xen event channels through /dev/xen/evtchn: the doorbell between a zone and the host.

Every port gets its own open of the device. A read on an evtchn fd returns whichever of its ports
fired, so two rings sharing one fd would steal each other's wakeups; one fd per port makes
"wait on this fd" mean "wait for this ring". Waiting and unmasking are done in C (idm/csrc/bell.c).
"""

import os
from typing import Self

import structlog

from idm.xen._device import Closing, check, check_domid, describe, open_device
from idm.xen._xenioctl import lib

log = structlog.get_logger(__name__)

EVTCHN = "/dev/xen/evtchn"
_U32_MAX = 0xFFFFFFFF


class EventChannel(Closing):
    """One local ``port`` bound on its own evtchn ``fd`` (wait on the fd, notify the port)."""

    def __init__(self, fd: int, device: str, port: int) -> None:
        self.fd = fd
        self.device = device
        self.port = port

    @classmethod
    def bind_unbound_port(cls, remote_domid: int, *, device: str = EVTCHN) -> Self:
        """Allocate a port that ``remote_domid`` may bind to (the side that offers)."""
        check_domid(remote_domid)
        fd = open_device(device, "xen-evtchn")
        try:
            rc = lib.idmx_evtchn_bind_unbound_port(fd, remote_domid)
            port = check(rc, device, f"IOCTL_EVTCHN_BIND_UNBOUND_PORT(remote_domid={remote_domid})")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, device, port)

    @classmethod
    def bind_interdomain(cls, remote_domid: int, remote_port: int, *, device: str = EVTCHN) -> Self:
        """Connect to the unbound port ``remote_port`` that ``remote_domid`` offered to us."""
        check_domid(remote_domid)
        if not 0 < remote_port <= _U32_MAX:
            raise ValueError(f"event channel port {remote_port} is not a port")
        fd = open_device(device, "xen-evtchn")
        try:
            rc = lib.idmx_evtchn_bind_interdomain(fd, remote_domid, remote_port)
            what = f"IOCTL_EVTCHN_BIND_INTERDOMAIN(domid={remote_domid}, port={remote_port})"
            port = check(rc, device, what)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, device, port)

    def notify(self) -> None:
        """Signal the peer's end of this channel."""
        check(lib.idmx_evtchn_notify(self.fd, self.port), self.device, f"notify port {self.port}")

    def close(self) -> None:
        """Unbind the port and close the fd (the peer sees the channel closed)."""
        if self.fd < 0:
            return
        rc = lib.idmx_evtchn_unbind(self.fd, self.port)
        if rc < 0:
            # Closing the fd unbinds every port on it anyway.
            log.warning("evtchn unbind failed", port=self.port, error=describe(-rc))
        os.close(self.fd)
        self.fd = -1
