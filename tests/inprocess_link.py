"""Both ends of a real IDM link inside one process, for ring-level tests.

The memory is a real shared mapping and the doorbells are real eventfds; only the process
boundary is missing (LocalLink tests cover that). ``raw`` gives tests the shared bytes so they can
play a hostile zone.
"""

import mmap
import os
from typing import Any

from idm._ring import ffi, lib
from idm.channel import Bell, BellKind, Channel, RingLayout, Side


class InProcessRegion:
    def __init__(self, layout: RingLayout) -> None:
        self.layout = layout
        self.raw = mmap.mmap(-1, layout.region_size)
        buf = ffi.from_buffer(self.raw)
        lib.idm_region_format(buf, layout.to_c())
        ffi.release(buf)
        # req data, req space, rsp data, rsp space
        self.fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]

    def side(self, side: Side) -> "InProcessLink":
        return InProcessLink(self, side)

    def channel(self, side: Side, **kwargs: Any) -> Channel:
        return Channel(self.side(side), side, **kwargs)

    @property
    def req_offset(self) -> int:
        return int(lib.IDM_PAGE_SIZE)

    @property
    def rsp_offset(self) -> int:
        return int(lib.IDM_PAGE_SIZE) + (1 << self.layout.req_order)

    def ctrl_offset(self, direction: str, field: str) -> int:
        return int(ffi.offsetof("struct idm_ctrl", direction)) + int(
            ffi.offsetof("struct idm_dir_ctrl", field)
        )

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.raw.close()


class InProcessLink:
    def __init__(self, region: InProcessRegion, side: Side) -> None:
        self._region = region
        self._side = side

    @property
    def layout(self) -> RingLayout:
        return self._region.layout

    @property
    def memory(self) -> mmap.mmap:
        return self._region.raw

    def bells(self) -> tuple[Bell, Bell]:
        req_data, req_space, rsp_data, rsp_space = self._region.fds
        if self._side == Side.ZONE:
            return (
                Bell(BellKind.EVENTFD, req_space, req_data),
                Bell(BellKind.EVENTFD, rsp_data, rsp_space),
            )
        return (
            Bell(BellKind.EVENTFD, rsp_space, rsp_data),
            Bell(BellKind.EVENTFD, req_data, req_space),
        )

    def close(self) -> None:
        """The region outlives both sides; the test closes it."""
