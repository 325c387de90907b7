"""The header a Xen zone's channel broker sends a zone process with a GrantLink's fds: the Python
side of ``struct idm_grant_fd_offer`` (idm/csrc/idm.h), which the process reads and checks in C
(idm/csrc/grant_fd_link.c, linked into libvgpu).

One fixed-size header per connection. On success it comes with exactly three fds in the same
``sendmsg`` (SCM_RIGHTS), in this order: the /dev/xen/gntalloc fd holding the granted region
(mapped at ``mmap_offset``), the request ring's /dev/xen/evtchn fd (bound to ``req_port``), the
response ring's (bound to ``rsp_port``). A broker that cannot set a channel up sends the header
alone, with a negative errno and a reason the process logs.
"""

import errno
import struct
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from idm._ring import lib
from idm.channel import PAGE_SIZE, RingLayout
from idm.links.grant import ZoneHandles

MAGIC: int = lib.IDM_GRANT_FD_MAGIC
LAYOUT_VERSION: int = lib.IDM_LAYOUT_VERSION
NFDS: int = lib.IDM_GRANT_FD_NFDS
WHY_LEN: int = lib.IDM_GRANT_FD_WHY_LEN
PORT_MAX: int = lib.IDM_EVTCHN_PORT_MAX
DOMID_FIRST_RESERVED: int = lib.IDM_DOMID_FIRST_RESERVED
# magic, layout_version, status, peer_domid, req_order, rsp_order, mmap_offset, mmap_length,
# req_port, rsp_port, why
HEADER = struct.Struct(f"<IIiIIIQQII{WHY_LEN}s")
_OFFSET_MAX = (1 << 63) - 1  # off_t


class GrantFdOffer(BaseModel):
    """A channel ready to use: where its region lies in the gntalloc fd, and its two ports."""

    model_config = ConfigDict(frozen=True)

    layout: RingLayout
    peer_domid: int = Field(ge=0, lt=DOMID_FIRST_RESERVED)
    mmap_offset: int = Field(ge=0, le=_OFFSET_MAX)
    mmap_length: int = Field(gt=0)
    req_port: int = Field(ge=1, le=PORT_MAX)
    rsp_port: int = Field(ge=1, le=PORT_MAX)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.mmap_offset % PAGE_SIZE:
            raise ValueError(f"mmap_offset {self.mmap_offset} is not page aligned")
        if self.mmap_length != self.layout.region_size:
            raise ValueError(
                f"mmap_length {self.mmap_length} is not the layout's region size "
                f"{self.layout.region_size}"
            )
        if self.mmap_offset > _OFFSET_MAX - self.mmap_length:
            raise ValueError(f"mmap_offset {self.mmap_offset} leaves no room for the region")
        if self.req_port == self.rsp_port:
            raise ValueError(f"req_port and rsp_port are both {self.req_port}")
        return self

    @classmethod
    def from_handles(cls, layout: RingLayout, handles: ZoneHandles, peer_domid: int) -> Self:
        return cls(
            layout=layout,
            peer_domid=peer_domid,
            mmap_offset=handles.pages_offset,
            mmap_length=handles.pages_length,
            req_port=handles.req_port,
            rsp_port=handles.rsp_port,
        )

    def encode(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            LAYOUT_VERSION,
            0,
            self.peer_domid,
            self.layout.req_order,
            self.layout.rsp_order,
            self.mmap_offset,
            self.mmap_length,
            self.req_port,
            self.rsp_port,
            b"",
        )


class GrantFdRefusal(BaseModel):
    """No channel: ``code`` (an errno) and a reason the process logs."""

    model_config = ConfigDict(frozen=True)

    code: int = Field(ge=1, le=4095)
    why: str = Field(min_length=1)

    def encode(self) -> bytes:
        """The reason is cut to fit (on a character boundary) and always NUL-terminated."""
        why = self.why.encode()[: WHY_LEN - 1].decode(errors="ignore").encode()
        return HEADER.pack(MAGIC, LAYOUT_VERSION, -self.code, 0, 0, 0, 0, 0, 0, 0, why)


def refusal(exc: BaseException, what: str) -> GrantFdRefusal:
    """A refusal for a failure while ``what``: the OSError's errno if it has one, else EIO."""
    if isinstance(exc, OSError) and exc.errno:
        return GrantFdRefusal(code=exc.errno, why=f"{what}: {exc.strerror or exc}")
    return GrantFdRefusal(code=errno.EIO, why=f"{what}: {exc}")
