"""Opening /dev/xen devices, and errors that say which device failed, with what errno, and what
to check: a missing device almost always means "not a Xen domain" or "module not loaded"."""

import errno
import os
from types import TracebackType
from typing import Self

# Domain ids from DOMID_FIRST_RESERVED (0x7FF0) up name no real domain (DOMID_SELF, ...).
DOMID_LIMIT = 0x7FF0

_ABSENT = (errno.ENOENT, errno.ENODEV, errno.ENXIO)
_DENIED = (errno.EACCES, errno.EPERM)


class XenDeviceError(OSError):
    """A /dev/xen device is missing or refused an operation; ``errno`` and ``device`` say which."""

    def __init__(self, code: int, device: str, message: str) -> None:
        super().__init__(code, message, device)
        self.device = device
        self.message = message

    def __str__(self) -> str:
        return self.message


def describe(code: int) -> str:
    """``ENOENT: No such file or directory``: the symbolic name is what people search for."""
    return f"{errno.errorcode.get(code, str(code))}: {os.strerror(code)}"


def open_device(device: str, module: str) -> int:
    """Open ``device`` read-write, close-on-exec; ``module`` is the kernel module that backs it."""
    try:
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        code = exc.errno or errno.EIO
        if code in _ABSENT:
            hint = f"{device} not present ({describe(code)}): is the {module} module loaded?"
        elif code in _DENIED:
            hint = f"{device}: permission denied ({describe(code)}): run as root"
        else:
            hint = f"{device}: open failed ({describe(code)})"
        raise XenDeviceError(code, device, hint) from exc


def check(rc: int, device: str, what: str) -> int:
    """Turn a C helper's ``-errno`` into XenDeviceError; other values are returned."""
    if rc < 0:
        raise XenDeviceError(-rc, device, f"{device}: {what} failed ({describe(-rc)})")
    return rc


def check_domid(domid: int) -> int:
    """A real domain id (not DOMID_SELF and friends), so a typo cannot grant to the wrong one."""
    if not 0 <= domid < DOMID_LIMIT:
        raise ValueError(f"domid {domid} is not a domain id (0..{DOMID_LIMIT - 1})")
    return domid


def check_count(count: int, limit: int) -> int:
    """Pages per request: at least one, and few enough for the C helper to size its request."""
    if not 1 <= count <= limit:
        raise ValueError(f"page count {count} is out of range 1..{limit}")
    return count


class Closing:
    """Context-manager support for the wrappers below, which all release through ``close()``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
