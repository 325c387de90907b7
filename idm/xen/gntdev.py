"""Host side of grant tables: map pages another domain granted us (/dev/xen/gntdev).

All refs of one request become one contiguous mapping, in the order given, so the host sees the
zone's control page and rings exactly as the zone laid them out.
"""

import mmap
import os
from collections.abc import Sequence
from typing import Self

import structlog

from idm.xen._device import (
    Closing,
    XenDeviceError,
    check,
    check_count,
    check_domid,
    describe,
    open_device,
)
from idm.xen._xenioctl import ffi, lib

log = structlog.get_logger(__name__)

GNTDEV = "/dev/xen/gntdev"
_U32_MAX = 0xFFFFFFFF


class MappedGrants(Closing):
    """Pages granted by ``domid``, mapped read-write here as ``memory``."""

    def __init__(
        self, fd: int, device: str, domid: int, index: int, count: int, memory: mmap.mmap
    ) -> None:
        self._fd = fd
        self.device = device
        self.domid = domid
        self._index = index
        self._count = count
        self.memory = memory

    @classmethod
    def map(cls, domid: int, refs: Sequence[int], *, device: str = GNTDEV) -> Self:
        """Map ``refs`` (grant refs of ``domid``) in order as one region."""
        check_domid(domid)
        count = check_count(len(refs), lib.IDMX_MAX_PAGES)
        if any(not 0 <= ref <= _U32_MAX for ref in refs):
            raise ValueError(f"grant refs must be 32-bit unsigned: {list(refs)}")
        fd = open_device(device, "xen-gntdev")
        try:
            index = ffi.new("uint64_t *")
            rc = lib.idmx_gntdev_map(fd, domid, count, ffi.new("uint32_t[]", list(refs)), index)
            check(rc, device, f"IOCTL_GNTDEV_MAP_GRANT_REF(domid={domid}, count={count})")
            try:
                # The hypervisor maps the pages here: a ref that is not ours to map fails now.
                memory = mmap.mmap(fd, count * mmap.PAGESIZE, offset=index[0])
            except OSError as exc:
                lib.idmx_gntdev_unmap(fd, index[0], count)
                code = exc.errno or 0
                raise XenDeviceError(
                    code,
                    device,
                    f"{device}: mapping {count} grant refs of domain {domid} failed "
                    f"({describe(code)}): a ref is not granted to us or was revoked",
                ) from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, device, domid, index[0], count, memory)

    def close(self) -> None:
        """Unmap. Raises BufferError (releasing nothing) while a buffer points into ``memory``."""
        if self._fd < 0:
            return
        self.memory.close()
        rc = lib.idmx_gntdev_unmap(self._fd, self._index, self._count)
        if rc < 0:
            # Closing the fd below releases the grants anyway.
            log.warning("gntdev unmap failed", device=self.device, error=describe(-rc))
        os.close(self._fd)
        self._fd = -1
