"""Xenstore, typed and small: a thin layer over pyxs's ``Client``.

Channel setup is published in xenstore: the zone writes only under its own
``/local/domain/<domid>/`` subtree and lets the host read it; the host answers in a subtree of
its own that the zone may read but not write. Values here are short ASCII strings; errors
become XenstoreError naming the path and the errno.

pyxs limitations that matter here: a ``Client`` over /dev/xen/xenbus (inside a zone) cannot
watch (pyxs refuses), and pyxs cannot write an empty value.
"""

import errno
import os
import queue
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

import pyxs
import structlog

from idm.xen._device import Closing, describe

log = structlog.get_logger(__name__)

XENBUS = "/dev/xen/xenbus"


def default_socket() -> str:
    """Where xenstored listens in the host, as libxenstore finds it."""
    rundir = os.environ.get("XENSTORED_RUNDIR", "/var/run/xenstored")
    return os.environ.get("XENSTORED_PATH") or os.path.join(rundir, "socket")


class XenstoreError(OSError):
    """A xenstore request failed; ``errno`` says how (ENOENT, EACCES, ...), ``path`` where."""

    def __init__(self, code: int, path: str, message: str) -> None:
        super().__init__(code, message, path)
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return self.message


def _encode(path: str) -> bytes:
    return path.encode("ascii")


def _error(exc: Exception, op: str, path: str) -> XenstoreError:
    """XenstoreError for a pyxs failure: xenstore's errno if it sent one, else EIO."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else errno.EIO
    why = describe(code) if code != errno.EIO else str(exc)
    return XenstoreError(code, path, f"xenstore {op} {path}: {why}")


class Xenstore(Closing):
    """One connection to xenstore (the host's xenstored socket, or xenbus inside a zone)."""

    def __init__(self, client: Any, where: str) -> None:
        self._client = client
        self.where = where

    @classmethod
    def connect(cls, *, socket_path: str | None = None, xenbus_path: str | None = None) -> Self:
        """Connect to ``socket_path`` or ``xenbus_path``; with neither, to the xenstored socket
        if there is one (the host), else to xenbus (a zone)."""
        if socket_path is None and xenbus_path is None:
            if Path(default_socket()).exists():
                socket_path = default_socket()
            elif Path(XENBUS).exists():
                xenbus_path = XENBUS
            else:
                raise XenstoreError(
                    errno.ENOENT,
                    default_socket(),
                    f"no xenstore here: neither {default_socket()} nor {XENBUS} exists "
                    "(not a Xen domain, or xenstored is not running)",
                )
        if socket_path is not None:
            client, where = pyxs.Client(unix_socket_path=socket_path), socket_path
        else:
            client, where = pyxs.Client(xen_bus_path=xenbus_path), str(xenbus_path)
        try:
            client.connect()
        except pyxs.PyXSError as exc:
            raise XenstoreError(errno.ECONNREFUSED, where, f"xenstore at {where}: {exc}") from exc
        return cls(client, where)

    def _call(self, op: str, path: str, *args: Any) -> Any:
        """Run one pyxs request. pyxs's ValueErrors (bad path or value) are the caller's bug and
        pass through; what xenstore refused becomes XenstoreError."""
        try:
            return getattr(self._client, op)(_encode(path), *args)
        except ValueError:
            raise
        except pyxs.PyXSError as exc:
            raise _error(exc, op, path) from exc

    def read(self, path: str) -> str | None:
        """The value at ``path``, or None if there is no such node. Non-ASCII bytes come back
        escaped, so a peer's junk shows up in error messages instead of breaking decoding."""
        try:
            value: bytes = self._call("read", path)
        except XenstoreError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value.decode("ascii", errors="backslashreplace")

    def directory(self, path: str) -> list[str]:
        """The names of ``path``'s children; none if ``path`` does not exist."""
        try:
            names: list[bytes] = self._call("list", path)
        except XenstoreError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise
        return [name.decode("ascii", errors="backslashreplace") for name in names]

    def write(self, path: str, value: str) -> None:
        """Set ``path`` (created with its parents if missing) to a non-empty ASCII ``value``."""
        if not value:
            raise ValueError(f"xenstore write {path}: empty values cannot be sent through pyxs")
        self._call("write", path, value.encode("ascii"))

    def mkdir(self, path: str) -> None:
        """Create ``path`` and its missing parents; existing nodes keep their values."""
        self._call("mkdir", path)

    def remove(self, path: str) -> None:
        """Delete ``path`` and its subtree; nothing to do if it is already gone."""
        try:
            self._call("delete", path)
        except XenstoreError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def set_perms(self, path: str, owner: int, readers: Iterable[int] = ()) -> None:
        """``owner`` may do anything, ``readers`` may read, every other domain nothing."""
        perms = [f"n{owner}".encode()] + [f"r{domid}".encode() for domid in readers]
        self._call("set_perms", path, perms)

    def get_perms(self, path: str) -> list[str]:
        """Permissions in xenstore's form: ``["n5", "r0"]`` (owner first)."""
        perms: list[bytes] = self._call("get_perms", path)
        return [p.decode("ascii") for p in perms if p]

    def own_domid(self) -> int:
        """Our domain id, from the ``domid`` key the toolstack writes in every domain's home."""
        value = self.read("domid")
        if value is None or not value.isdecimal():
            raise XenstoreError(
                errno.ENOENT, "domid", f"xenstore key 'domid' is {value!r}, not a domain id"
            )
        return int(value)

    def watch(self, path: str) -> "Watch":
        """Watch ``path`` and its subtree. Xenstore fires once right away, so a change made
        before the watch was set is never missed."""
        token = secrets.token_hex(8).encode()
        try:
            monitor = self._client.monitor()
        except pyxs.PyXSError as exc:
            why = f"pyxs cannot watch over xenbus ({self.where})"
            raise XenstoreError(errno.ENOTSUP, path, f"xenstore watch {path}: {why}") from exc
        try:
            monitor.watch(_encode(path), token)
        except ValueError:
            raise
        except pyxs.PyXSError as exc:
            raise _error(exc, "watch", path) from exc
        return Watch(monitor, path, token)

    def close(self) -> None:
        self._client.close()


class Watch(Closing):
    """Change events for one watched path; each event is the path of the node that changed."""

    def __init__(self, monitor: Any, path: str, token: bytes) -> None:
        self._monitor = monitor
        self.path = path
        self._token = token

    def wait(self, timeout: float | None = None) -> str | None:
        """The next changed path, or None if nothing changed within ``timeout`` seconds."""
        try:
            event = self._monitor.events.get(timeout=timeout)
        except queue.Empty:
            return None
        changed: bytes = event.path
        return changed.decode("ascii", errors="backslashreplace")

    def close(self) -> None:
        try:
            self._monitor.unwatch(_encode(self.path), self._token)
        except pyxs.PyXSError as exc:
            log.warning("xenstore unwatch failed", path=self.path, error=str(exc))
