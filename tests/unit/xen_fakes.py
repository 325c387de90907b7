"""Stand-ins for Xen so GrantLink and the xenstore wrapper run on a machine without it.

``FakeXenstored`` speaks xenstore's real wire protocol (xs_wire.h: a 16-byte header, NUL-separated
payload) on one unix socket per domain, so pyxs and ``idm.xen.xenstore`` are exercised for real,
and it enforces xenstore's permission model (owner, then per-domain r/w/b/n, Dom0 privileged).
``FakeXen`` is a grant table and event channels between domains: granted pages are memfd pages,
so a "host mapping" really shares memory with the "zone", and ports are eventfds.
"""

import contextlib
import errno
import mmap
import os
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idm.xen._device import XenDeviceError

# xs_wire.h message types
XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH = 1, 2, 3, 4, 5
XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS, XS_WATCH_EVENT, XS_ERROR = 11, 12, 13, 14, 15, 16
_HEADER = struct.Struct("<IIII")
PAGE = mmap.PAGESIZE


@dataclass
class _Node:
    value: bytes
    perms: list[str]  # "n5", "r0": owner and default first, then per-domain entries


class FakeXenstored:
    """A xenstored in memory. ``listen(domid)`` gives the socket a domain's clients use."""

    def __init__(self, rundir: Path) -> None:
        self.rundir = rundir
        self.nodes: dict[str, _Node] = {"/": _Node(b"", ["n0"]), "/local": _Node(b"", ["n0"])}
        self._lock = threading.Lock()
        self._watches: list[tuple[socket.socket, threading.Lock, str, bytes]] = []
        self._listeners: list[socket.socket] = []
        self._conns: list[socket.socket] = []

    def add_domain(self, domid: int) -> None:
        """What the toolstack does for a new domain: a home it owns, with its ``domid`` key."""
        with self._lock:
            self.nodes.setdefault("/local/domain", _Node(b"", ["n0"]))
            home = f"/local/domain/{domid}"
            self.nodes[home] = _Node(b"", [f"n{domid}"])
            self.nodes[f"{home}/domid"] = _Node(str(domid).encode(), [f"n{domid}"])
            self.nodes[f"{home}/data"] = _Node(b"", [f"n{domid}"])

    def listen(self, domid: int) -> str:
        path = str(self.rundir / f"xenstored-{domid}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen()
        self._listeners.append(sock)
        threading.Thread(target=self._accept, args=(sock, domid), daemon=True).start()
        return path

    def close(self) -> None:
        for sock in self._listeners + self._conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket, domid: int) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn, domid), daemon=True).start()

    def _serve(self, conn: socket.socket, domid: int) -> None:
        send_lock = threading.Lock()
        try:
            while True:
                head = _recv_exact(conn, _HEADER.size)
                op, rq_id, tx_id, size = _HEADER.unpack(head)
                payload = _recv_exact(conn, size)
                try:
                    reply_op, body = op, self._handle(conn, send_lock, domid, op, payload)
                except OSError as exc:
                    reply_op, body = XS_ERROR, errno.errorcode[exc.errno or errno.EIO].encode()
                    body += b"\0"
                with send_lock:
                    conn.sendall(_HEADER.pack(reply_op, rq_id, tx_id, len(body)) + body)
        except (ConnectionError, OSError):
            return

    # -- the store ----------------------------------------------------------------------------

    def _abs(self, domid: int, path: str) -> str:
        return path if path.startswith("/") else f"/local/domain/{domid}/{path}"

    def _may(self, domid: int, node: _Node, want: str) -> bool:
        if domid == 0 or node.perms[0][1:] == str(domid):
            return True
        access = node.perms[0][0]
        for perm in node.perms[1:]:
            if perm[1:] == str(domid):
                access = perm[0]
        return access == "b" or access == want

    def _get(self, domid: int, path: str, want: str) -> _Node:
        node = self.nodes.get(path)
        if node is None:
            raise OSError(errno.ENOENT, path)
        if not self._may(domid, node, want):
            raise OSError(errno.EACCES, path)
        return node

    def _create(self, domid: int, path: str) -> _Node:
        """Create ``path`` and missing parents; new nodes inherit the parent's permissions, with
        the creating domain as owner unless it is Dom0 (as C xenstored does)."""
        node = self.nodes.get(path)
        if node is not None:
            return node
        parent = self._create(domid, path.rsplit("/", 1)[0] or "/")
        if not self._may(domid, parent, "w"):
            raise OSError(errno.EACCES, path)
        perms = list(parent.perms)
        if domid != 0:
            perms[0] = perms[0][0] + str(domid)
        node = self.nodes[path] = _Node(b"", perms)
        return node

    def _handle(
        self, conn: socket.socket, send_lock: threading.Lock, domid: int, op: int, payload: bytes
    ) -> bytes:
        parts = payload.split(b"\0")
        path = self._abs(domid, parts[0].decode())
        changed: str | None = None
        with self._lock:
            if op == XS_READ:
                return self._get(domid, path, "r").value
            if op == XS_DIRECTORY:
                self._get(domid, path, "r")
                kids = {
                    p[len(path) + 1 :].split("/")[0] for p in self.nodes if p.startswith(path + "/")
                }
                return b"".join(k.encode() + b"\0" for k in sorted(kids))
            if op == XS_GET_PERMS:
                return b"".join(p.encode() + b"\0" for p in self._get(domid, path, "r").perms)
            if op == XS_WRITE:
                existing = self.nodes.get(path)
                node = self._get(domid, path, "w") if existing else self._create(domid, path)
                node.value = payload[len(parts[0]) + 1 :]
                changed = path
            elif op == XS_MKDIR:
                self._create(domid, path)
                changed = path
            elif op == XS_RM:
                if path not in self.nodes:
                    parent = path.rsplit("/", 1)[0] or "/"
                    if parent not in self.nodes:
                        raise OSError(errno.ENOENT, path)
                    return b"OK\0"
                self._get(domid, path, "w")
                for p in [p for p in self.nodes if p == path or p.startswith(path + "/")]:
                    del self.nodes[p]
                changed = path
            elif op == XS_SET_PERMS:
                node = self._get(domid, path, "w")
                if domid != 0 and node.perms[0][1:] != str(domid):
                    raise OSError(errno.EPERM, path)
                node.perms = [p.decode() for p in parts[1:] if p]
                changed = path
            elif op == XS_WATCH:
                self._watches.append((conn, send_lock, path, parts[1]))
                changed = path
            elif op == XS_UNWATCH:
                self._watches = [
                    w for w in self._watches if (w[0], w[2], w[3]) != (conn, path, parts[1])
                ]
            else:
                raise OSError(errno.ENOSYS, path)
            watches = list(self._watches)
        for wconn, wlock, wpath, token in watches:
            if changed and (
                changed == wpath
                or changed.startswith(wpath + "/")
                or wpath.startswith(changed + "/")
            ):
                if op == XS_WATCH and (wconn, wpath, token) != (conn, path, parts[1]):
                    continue
                event = changed.encode() + b"\0" + token + b"\0"
                with wlock:
                    wconn.sendall(_HEADER.pack(XS_WATCH_EVENT, 0, 0, len(event)) + event)
        return b"OK\0"


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


# -- grant table and event channels ------------------------------------------------------------


@dataclass
class _Grant:
    grantee: int
    memfd: int
    offset: int


@dataclass
class _Port:
    remote: int
    efd: int
    peer: tuple[int, int] | None = None


@dataclass
class FakeXen:
    """Grants and ports of every domain. ``devices(domid)`` gives stand-ins for GrantedPages,
    MappedGrants and EventChannel acting as that domain."""

    grants: dict[tuple[int, int], _Grant] = field(default_factory=dict)
    ports: dict[tuple[int, int], _Port] = field(default_factory=dict)
    mappings: int = 0
    next_ref: int = 8
    next_port: int = 1

    def devices(self, domid: int) -> tuple[type[Any], type[Any], type[Any]]:
        xen = self

        class GrantedPages:
            def __init__(self, remote: int, count: int) -> None:
                self.memfd = os.memfd_create("fake-gntalloc")
                os.ftruncate(self.memfd, count * PAGE)
                self.grefs = tuple(range(xen.next_ref, xen.next_ref + count))
                xen.next_ref += count
                for i, ref in enumerate(self.grefs):
                    xen.grants[(domid, ref)] = _Grant(remote, self.memfd, i * PAGE)
                self.memory = mmap.mmap(self.memfd, count * PAGE)
                self.fd, self.offset = self.memfd, 0  # what the zone agent hands on

            @classmethod
            def allocate(cls, remote: int, count: int) -> "GrantedPages":
                return cls(remote, count)

            def close(self) -> None:
                self.memory.close()
                for ref in self.grefs:
                    del xen.grants[(domid, ref)]
                os.close(self.memfd)

        class MappedGrants:
            def __init__(self, memory: mmap.mmap) -> None:
                self.memory = memory
                xen.mappings += 1

            @classmethod
            def map(cls, remote: int, refs: Sequence[int]) -> "MappedGrants":
                grants = [xen.grants.get((remote, ref)) for ref in refs]
                if any(g is None or g.grantee != domid for g in grants):
                    raise XenDeviceError(errno.EINVAL, "fake-gntdev", f"refs {refs} not ours")
                first = grants[0]
                assert first is not None
                contiguous = [
                    _Grant(domid, first.memfd, first.offset + i * PAGE) for i in range(len(refs))
                ]
                if grants != contiguous:
                    raise NotImplementedError("the fake maps only consecutive pages of one grant")
                return cls(mmap.mmap(first.memfd, len(refs) * PAGE, offset=first.offset))

            def close(self) -> None:
                self.memory.close()
                xen.mappings -= 1

            def __enter__(self) -> "MappedGrants":
                return self

            def __exit__(self, *exc: object) -> None:
                self.close()

        class EventChannel:
            def __init__(self, remote: int) -> None:
                self.port = xen.next_port
                xen.next_port += 1
                self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                xen.ports[(domid, self.port)] = _Port(remote, self.fd)

            @classmethod
            def bind_unbound_port(cls, remote: int) -> "EventChannel":
                return cls(remote)

            @classmethod
            def bind_interdomain(cls, remote: int, remote_port: int) -> "EventChannel":
                theirs = xen.ports.get((remote, remote_port))
                if theirs is None or theirs.remote != domid or theirs.peer is not None:
                    raise XenDeviceError(errno.EINVAL, "fake-evtchn", f"port {remote_port}")
                ours = cls(remote)
                theirs.peer = (domid, ours.port)
                xen.ports[(domid, ours.port)].peer = (remote, remote_port)
                return ours

            def close(self) -> None:
                del xen.ports[(domid, self.port)]
                os.close(self.fd)

        return GrantedPages, MappedGrants, EventChannel
