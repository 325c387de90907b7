"""What the agent does as the zone's init before it serves: give the zone a network namespace of
its own (a pod network), name the zone and bring up its loopback (a fresh network namespace
starts with `lo` down)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CLONE_NEWNET = 0x40000000
_IFREQ = struct.Struct("16sh22x")  # struct ifreq: name, then ifr_flags in the 24-byte union
_libc = ctypes.CDLL(None, use_errno=True)


def enter_new_network_namespace() -> None:
    """unshare(CLONE_NEWNET). Namespaces belong to threads: only the calling thread moves, and
    what it starts afterwards (threads, then the OCI runtime and the containers they spawn)
    inherits the new namespace; so the main thread calls this before it starts request threads.
    A standby agent, which starts in the host's network, does it when it is given a pod zone."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare(CLONE_NEWNET): {os.strerror(code)}")


def bring_up_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        current = fcntl.ioctl(sock, SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
        flags = _IFREQ.unpack(current)[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | IFF_UP))


def set_hostname(name: str) -> None:
    socket.sethostname(name)
