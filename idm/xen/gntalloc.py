"""Zone side of grant tables: share pages of our memory with one peer domain (/dev/xen/gntalloc).

The pages belong to us; the peer maps them by grant reference. All pages of one allocation are
mapped here as one contiguous region, so a ring never has to care where a page boundary falls.
"""

import mmap
import os
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

GNTALLOC = "/dev/xen/gntalloc"


class GrantedPages(Closing):
    """``count`` zeroed pages shared writable with ``domid``; ``grefs[i]`` names page ``i``."""

    def __init__(
        self,
        fd: int,
        device: str,
        domid: int,
        index: int,
        grefs: tuple[int, ...],
        memory: mmap.mmap,
    ) -> None:
        self._fd = fd
        self.device = device
        self.domid = domid
        self._index = index
        self.grefs = grefs
        self.memory = memory

    @classmethod
    def allocate(cls, domid: int, count: int, *, device: str = GNTALLOC) -> Self:
        """Grant ``count`` new pages to ``domid`` and map them here."""
        check_domid(domid)
        check_count(count, lib.IDMX_MAX_PAGES)
        fd = open_device(device, "xen-gntalloc")
        try:
            index = ffi.new("uint64_t *")
            grefs = ffi.new("uint32_t[]", count)
            rc = lib.idmx_gntalloc_alloc(fd, domid, count, index, grefs)
            check(rc, device, f"IOCTL_GNTALLOC_ALLOC_GREF(domid={domid}, count={count})")
            try:
                memory = mmap.mmap(fd, count * mmap.PAGESIZE, offset=index[0])
            except OSError as exc:
                lib.idmx_gntalloc_dealloc(fd, index[0], count)
                code = exc.errno or 0
                raise XenDeviceError(
                    code,
                    device,
                    f"{device}: mmap of {count} granted pages failed ({describe(code)})",
                ) from exc
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, device, domid, index[0], tuple(grefs), memory)

    @property
    def fd(self) -> int:
        """The open gntalloc device: another process given this fd maps the same pages with
        ``mmap(fd, length, offset)`` (the zone agent hands a channel's pages to a process)."""
        return self._fd

    @property
    def offset(self) -> int:
        """Where these pages lie in ``fd``'s mmap space."""
        return self._index

    def close(self) -> None:
        """Unmap and end the grants. The hypervisor keeps a page alive while the peer still maps
        it, so this is safe at any time. Raises BufferError (releasing nothing) while a buffer
        still points into ``memory``."""
        if self._fd < 0:
            return
        self.memory.close()
        rc = lib.idmx_gntalloc_dealloc(self._fd, self._index, len(self.grefs))
        if rc < 0:
            # Closing the fd below ends the grants anyway; worth a line in the log, not a raise.
            log.warning("gntalloc dealloc failed", device=self.device, error=describe(-rc))
        os.close(self._fd)
        self._fd = -1
