"""GrantChannelBroker: how a Xen zone's CUDA processes reach gpu-proxy in Dom0.

Each CUDA process (libvgpu with ``VGPU_LINK=grant``) connects to the broker's unix socket, which
gpu containers see at ``/run/vgpu/proxy.sock``. Per connection the broker offers a GrantLink
``gpu-<n>`` to Dom0 under ``data/vgpu/`` (gpu-proxy's XenZoneWatcher attaches it), waits, bounded,
for the host's ``state=connected``, and then sends the process a header
(``idm.links.grant_fd``) with the gntalloc fd and the two evtchn fds (SCM_RIGHTS). The process
maps the pages, says hello to gpu-proxy and runs its calls over the ring; the broker only holds
the offer:

- The process hangs up (it exited, or closed its channel): the broker marks the zone side of the
  ring closed (gpu-proxy's serving thread wakes at once), ends the grants, unbinds the ports and
  withdraws the offer, which gpu-proxy takes as the channel's end.
- gpu-proxy's side goes away (its ``backend/vgpu/<domid>/gpu-<n>/state`` disappears): the broker
  hangs up on the process, whose watchdog closes its channel, and withdraws the offer.

Why fds are passed rather than opened: container processes never get /dev/xen/* (a device there
would let any container grant pages or bind ports in the zone's name), the agent, which outlives
them, owns every grant and port and can always withdraw them, and the socket is the liveness
signal both ways. pyxs cannot watch xenstore over /dev/xen/xenbus, so the host's state is polled
(one small read per channel per ``liveness_poll_s``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from idm.channel import RingLayout
from idm.links.grant import STATE_CONNECTED, GrantLink, host_path, zone_path
from idm.links.grant_fd import GrantFdOffer, GrantFdRefusal, refusal
from idm.xen.xenstore import Xenstore, XenstoreError

log = structlog.get_logger(__name__)

CHANNEL_PREFIX = "gpu-"
_CHANNEL_NAME = re.compile(r"gpu-[0-9]{1,19}")
CONNECT_TIMEOUT_S = 30.0  # gpu-proxy attaches within a second or two, even under emulation
CONNECT_POLL_S = 0.05
LIVENESS_POLL_S = 0.5
JOIN_TIMEOUT_S = 10.0
# Any uid in a gpu container may use the GPU, as with /dev/nvidia* on a plain node.
SOCKET_MODE = 0o666


class _Hangup(Exception):
    """The process hung up or the broker is closing: there is nobody to answer."""


class _Session:
    """One process's connection and the channel offered for it."""

    def __init__(self, name: str, conn: socket.socket) -> None:
        self.name = name
        self.conn = conn
        self.thread: threading.Thread | None = None
        self.log: Any = log.bind(channel=name)


def _peer_pid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", raw)[0]
    return pid


def _hung_up(conn: socket.socket, timeout_s: float) -> str | None:
    """Wait up to ``timeout_s`` for the process's end: why it is over, or None if still there.
    The process never writes to the socket, so anything readable is its end."""
    ready = select.poll()
    ready.register(conn, select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    if not ready.poll(timeout_s * 1000):
        return None
    try:
        data = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        return f"socket error ({exc})"
    return "process hung up" if not data else "process wrote to the broker socket"


class GrantChannelBroker:
    """Hands every process that connects to ``socket_path`` a GrantLink gpu-proxy serves."""

    def __init__(
        self,
        socket_path: Path,
        xs: Xenstore,
        *,
        layout: RingLayout | None = None,
        host_domid: int = 0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        liveness_poll_s: float = LIVENESS_POLL_S,
    ) -> None:
        self.socket_path = socket_path
        self._xs = xs
        self._layout = layout or RingLayout()
        self._host = host_domid
        self._connect_timeout_s = connect_timeout_s
        self._liveness_poll_s = liveness_poll_s
        self._names = itertools.count()
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._domid = -1

    def start(self) -> None:
        """Withdraw channels a previous agent left offered, then listen."""
        self._domid = self._xs.own_domid()
        self._withdraw_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if self.socket_path.is_socket():
                self.socket_path.unlink()
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, SOCKET_MODE)
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name="gpu-broker-accept")
        self._acceptor.start()
        log.info("gpu channel broker listening", socket=str(self.socket_path), domid=self._domid)

    def is_alive(self) -> bool:
        """For health checks: the accept thread ends only through ``close()``."""
        return self._acceptor is not None and self._acceptor.is_alive()

    def channels(self) -> list[str]:
        """Names of the channels held for connected processes (offered or handed over)."""
        with self._lock:
            return sorted(self._sessions)

    def close(self) -> None:
        """Stop accepting, hang up on every process and withdraw every offer."""
        self._closing.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes accept() (close alone does not)
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self.socket_path.unlink(missing_ok=True)
        if self._acceptor is not None:
            self._acceptor.join(JOIN_TIMEOUT_S)
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            with contextlib.suppress(OSError):
                session.conn.shutdown(socket.SHUT_RDWR)
        for session in sessions:
            if session.thread is not None:
                session.thread.join(JOIN_TIMEOUT_S)
        log.info("gpu channel broker closed", socket=str(self.socket_path))

    # -- threads ----------------------------------------------------------------------------

    def _withdraw_stale(self) -> None:
        base = f"/local/domain/{self._domid}/data/vgpu"
        for name in self._xs.directory(base):
            if _CHANNEL_NAME.fullmatch(name):
                self._xs.remove(f"{base}/{name}")
                log.info("stale gpu channel offer withdrawn", channel=name)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                # EMFILE and friends: keep serving once resources come back.
                log.error("gpu channel broker: accept failed", error=str(exc))
                time.sleep(0.5)
                continue
            try:
                self._start_session(conn)
            except Exception:
                log.exception("gpu channel broker: cannot start a session")
                conn.close()

    def _start_session(self, conn: socket.socket) -> None:
        session = _Session(f"{CHANNEL_PREFIX}{next(self._names)}", conn)
        session.thread = threading.Thread(
            target=self._run_session, args=(session,), name=f"gpu-broker-{session.name}"
        )
        with self._lock:
            if self._closing.is_set():
                conn.close()
                return
            self._sessions[session.name] = session
        session.thread.start()

    def _run_session(self, session: _Session) -> None:
        with contextlib.suppress(OSError):
            session.log = session.log.bind(pid=_peer_pid(session.conn))
        try:
            self._serve(session)
        except Exception:
            # A bug must cost this process its channel, never the broker.
            session.log.exception("gpu channel broker: session failed")
        finally:
            session.conn.close()
            with self._lock:
                self._sessions.pop(session.name, None)

    def _serve(self, session: _Session) -> None:
        try:
            link = GrantLink.offer(session.name, self._layout, self._xs, self._host)
        except (OSError, ValueError) as exc:
            session.log.error("gpu channel offer failed", error=str(exc))
            self._send_refusal(session, refusal(exc, "offering the channel to Dom0"))
            return
        reason = "broker closed"
        try:
            self._wait_connected(session)
            handles = link.zone_handles()
            header = GrantFdOffer.from_handles(self._layout, handles, self._host).encode()
            fds = [handles.pages_fd, handles.req_fd, handles.rsp_fd]
            try:
                socket.send_fds(session.conn, [header], fds)
            except OSError as exc:
                raise _Hangup(f"handing over failed ({exc})") from exc
            session.log.info("gpu channel handed over", req_port=handles.req_port)
            reason = self._hold(session)
        except _Hangup as exc:
            reason = str(exc)
        except TimeoutError as exc:
            reason = exc.strerror or str(exc)
            self._send_refusal(session, refusal(exc, "waiting for gpu-proxy"))
        finally:
            self._withdraw(session, link)
            session.log.info("gpu channel closed", reason=reason)

    def _host_state(self, name: str) -> str | None:
        return self._xs.read(f"{host_path(self._host, self._domid, name)}/state")

    def _wait_connected(self, session: _Session) -> None:
        """Until gpu-proxy has attached the offer; _Hangup if the process leaves first,
        TimeoutError (errno ETIMEDOUT) after ``connect_timeout_s``."""
        started = time.monotonic()
        deadline = started + self._connect_timeout_s
        while self._host_state(session.name) != STATE_CONNECTED:
            if self._closing.is_set():
                raise _Hangup("broker closed")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"gpu-proxy did not attach {zone_path(self._domid, session.name)} within "
                    f"{self._connect_timeout_s:g} s (is gpu-proxy running in Dom0?)",
                )
            gone = _hung_up(session.conn, CONNECT_POLL_S)
            if gone is not None:
                raise _Hangup(f"{gone} before the channel was attached")
        wait_s = round(time.monotonic() - started, 3)
        session.log.debug("gpu channel attached by the host", wait_s=wait_s)

    def _hold(self, session: _Session) -> str:
        """Until the process or gpu-proxy goes: why it ended. Hangs up on the process when
        gpu-proxy's side is gone."""
        while True:
            gone = _hung_up(session.conn, self._liveness_poll_s)
            if self._closing.is_set():
                return "broker closed"
            if gone is not None:
                return gone
            try:
                state = self._host_state(session.name)
            except XenstoreError as exc:
                state, why = None, f"host state unreadable ({exc})"
            else:
                why = "gpu-proxy closed the channel"
            if state != STATE_CONNECTED:
                with contextlib.suppress(OSError):
                    session.conn.shutdown(socket.SHUT_RDWR)
                return why

    def _send_refusal(self, session: _Session, answer: GrantFdRefusal) -> None:
        session.log.warning("gpu channel refused", code=answer.code, why=answer.why)
        try:
            session.conn.sendall(answer.encode())
        except OSError as exc:
            session.log.info("gpu channel refusal not delivered", error=str(exc))

    def _withdraw(self, session: _Session, link: GrantLink) -> None:
        """Mark the zone side of the ring closed (gpu-proxy's serving thread wakes at once),
        then end the grants, unbind the ports and remove the offer."""
        try:
            channel = link.open_channel()
        except Exception as exc:  # the region no longer matches its layout: a bug
            session.log.error("gpu channel: cannot mark the ring closed", error=str(exc))
            link.close()
        else:
            channel.close()  # closes the link too
