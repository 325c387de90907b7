"""LocalLink: the IDM channel between processes on one host (process zone backend, tests).

The zone side creates a sealed memfd and four eventfds and offers them over a unix socket
(``idm_local_connect`` in C, the same code libvgpu runs); the host validates every fd before it
maps anything (``idm_local_accept``). The socket stays open: when the zone process dies the
host sees it hang up, which is how a dead zone is noticed without any timeout.
"""

import contextlib
import os
import select
import socket
import struct
from pathlib import Path
from typing import Any

import structlog

from idm._ring import ffi, lib
from idm.channel import (
    STALL_TIMEOUT_MS,
    Bell,
    BellKind,
    Channel,
    ChannelError,
    RingLayout,
    Side,
)

log = structlog.get_logger(__name__)

_FD_REQ_DATA, _FD_REQ_SPACE, _FD_RSP_DATA, _FD_RSP_SPACE = 1, 2, 3, 4
_WHY_LEN = 256


class LocalLink:
    """Shared memory + eventfd doorbells of one local channel (either side)."""

    def __init__(self, c_link: Any, side: Side, layout: RingLayout) -> None:
        self._c = c_link
        self._side = side
        self._layout = layout
        self._memory = ffi.buffer(c_link.base, c_link.len)

    @classmethod
    def connect(cls, path: str | Path, layout: RingLayout | None = None) -> "LocalLink":
        """Zone side: create the region and offer it to the host listening at ``path``."""
        layout = layout or RingLayout()
        c_link = ffi.new("struct idm_local_link *")
        why = ffi.new("char[]", _WHY_LEN)
        rc = lib.idm_local_connect(c_link, os.fsencode(path), layout.to_c(), why, _WHY_LEN)
        if rc:
            raise ChannelError(-rc, ffi.string(why).decode(errors="replace"))
        return cls(c_link, Side.ZONE, layout)

    @classmethod
    def accept(cls, sock: socket.socket) -> "LocalLink":
        """Host side: take the offer on an accepted connection (the link owns the socket)."""
        c_link = ffi.new("struct idm_local_link *")
        why = ffi.new("char[]", _WHY_LEN)
        rc = lib.idm_local_accept(c_link, sock.detach(), why, _WHY_LEN)
        if rc:
            raise ChannelError(-rc, ffi.string(why).decode(errors="replace"))
        # On the host side the request ring is received and the response ring sent.
        ep = c_link.ep
        layout = RingLayout(
            req_order=int(ep.rx_size).bit_length() - 1, rsp_order=int(ep.tx_size).bit_length() - 1
        )
        return cls(c_link, Side.HOST, layout)

    @property
    def layout(self) -> RingLayout:
        return self._layout

    @property
    def memory(self) -> Any:
        return self._memory

    @property
    def socket_fd(self) -> int:
        """Readable (EOF) when the peer process is gone."""
        return int(self._c.sock)

    def peer_alive(self) -> bool:
        """False once the peer's end of the socket is closed (its process exited or died)."""
        ready = select.select([self._c.sock], [], [], 0)[0]
        if not ready:
            return True
        with socket.socket(fileno=os.dup(self._c.sock)) as s:
            s.setblocking(False)
            try:
                return s.recv(1, socket.MSG_PEEK) != b""
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False

    def peer_credentials(self) -> tuple[int, int, int]:
        """(pid, uid, gid) of the process on the other end, from the kernel (SO_PEERCRED)."""
        with socket.socket(fileno=os.dup(self._c.sock)) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return pid, uid, gid

    def bells(self) -> tuple[Bell, Bell]:
        f = self._c.fds
        if self._side == Side.ZONE:
            tx = Bell(BellKind.EVENTFD, f[_FD_REQ_SPACE], f[_FD_REQ_DATA])
            rx = Bell(BellKind.EVENTFD, f[_FD_RSP_DATA], f[_FD_RSP_SPACE])
        else:
            tx = Bell(BellKind.EVENTFD, f[_FD_RSP_SPACE], f[_FD_RSP_DATA])
            rx = Bell(BellKind.EVENTFD, f[_FD_REQ_DATA], f[_FD_REQ_SPACE])
        return tx, rx

    def close(self) -> None:
        lib.idm_local_release(self._c)

    def open_channel(
        self, *, spin_ns: int | None = None, stall_timeout_ms: int = STALL_TIMEOUT_MS
    ) -> Channel:
        return Channel(self, self._side, spin_ns=spin_ns, stall_timeout_ms=stall_timeout_ms)


class LocalListener:
    """The host's unix socket where zone processes offer their rings."""

    def __init__(self, path: str | Path, *, backlog: int = 64, mode: int = 0o600) -> None:
        self.path = Path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.path.is_socket():
            self.path.unlink()
        self._sock.bind(str(self.path))
        os.chmod(self.path, mode)
        self._sock.listen(backlog)

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> LocalLink:
        """Wait for one zone and take its offer. A bad offer raises ChannelError (logged); the
        listener stays usable. A zone that connects and then says nothing holds this call for
        up to 10 s, so a daemon accepts on a thread of its own and serves each link on another."""
        conn, _ = self._sock.accept()
        try:
            return LocalLink.accept(conn)
        except ChannelError as exc:
            log.warning("local link refused", socket=str(self.path), reason=exc.reason)
            raise

    def close(self) -> None:
        """Stop listening; a thread blocked in ``accept`` wakes with OSError (shutdown does
        that on Linux, close alone does not)."""
        with contextlib.suppress(OSError):  # already shut down
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self.path.unlink(missing_ok=True)
