"""Container output → the CRI log file kubelet reads.

One line per entry: ``<RFC3339Nano UTC> <stdout|stderr> <F|P> <content>``. A line longer than
MAX_LINE is written as P(artial) chunks ending with an F(ull) one, as containerd does; output
that ends without a newline is written as a full line when the stream closes.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

MAX_LINE = 16 * 1024
READ_SIZE = 64 * 1024
LOG_BUFFER_BYTES = 4 << 20  # per container, in the zone's memory, until the runtime reads it


def rfc3339nano(ns: int) -> str:
    """UTC time with nanoseconds: 2016-10-06T00:17:09.669794202Z (always nine digits, so
    entries also sort as text)."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"


def format_entry(ns: int, stream: str, partial: bool, content: bytes) -> bytes:
    tag = b"P" if partial else b"F"
    return b"%s %s %s %s\n" % (rfc3339nano(ns).encode(), stream.encode(), tag, content)


def split_lines(pending: bytes, *, eof: bool) -> tuple[list[tuple[bool, bytes]], bytes]:
    """(partial?, content) entries ready in ``pending``, and what must wait for more data."""
    entries: list[tuple[bool, bytes]] = []
    start = 0
    while True:
        newline = pending.find(b"\n", start, start + MAX_LINE + 1)
        if newline >= 0:
            entries.append((False, pending[start:newline]))
            start = newline + 1
        elif len(pending) - start > MAX_LINE:
            entries.append((True, pending[start : start + MAX_LINE]))
            start += MAX_LINE
        else:
            break
    rest = pending[start:]
    if eof and rest:
        entries.append((False, rest))
        rest = b""
    return entries, rest


class CriLog:
    """The log file of one container, shared by its stdout and stderr pumps; ``reopen``
    starts a new file at the same path after kubelet rotated the old one away."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = self._open()

    def _open(self) -> int | None:
        if self.path is None:
            return None
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, stream: str, entries: list[tuple[bool, bytes]], ns: int) -> None:
        data = b"".join(format_entry(ns, stream, partial, c) for partial, c in entries)
        with self._lock:
            if self._fd is not None and data:
                os.write(self._fd, data)

    def reopen(self) -> None:
        with self._lock:
            fresh = self._open()
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fresh

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class CriLogBuffer:
    """The log of a container whose log file the agent cannot write (a Xen zone: the file is
    on the host): entries wait here, formatted as in the file, until the runtime fetches them
    (READ_LOG) and appends them to the file. Offsets count the log's bytes since the container
    was created; the runtime's read at offset N acknowledges everything before N, which is
    then dropped. Bounded: a full buffer blocks the pumps, and with them the container's
    writes, until the runtime reads (as a file on a stalled disk would)."""

    path = None

    def __init__(self, capacity: int = LOG_BUFFER_BYTES) -> None:
        self.capacity = capacity
        self._cond = threading.Condition()
        self._data = bytearray()
        self._start = 0  # offset of _data[0]
        self._closed = False

    @property
    def end(self) -> int:
        with self._cond:
            return self._start + len(self._data)

    def write(self, stream: str, entries: list[tuple[bool, bytes]], ns: int) -> None:
        data = b"".join(format_entry(ns, stream, partial, c) for partial, c in entries)
        with self._cond:
            # one write may exceed the capacity (a 64 KiB read split into entries): it waits
            # for an empty buffer instead of forever
            while self._data and len(self._data) + len(data) > self.capacity and not self._closed:
                self._cond.wait()
            if not self._closed:
                self._data += data

    def read(self, offset: int | None, max_bytes: int) -> tuple[int, bytes]:
        """(offset of the data, up to ``max_bytes`` from ``offset``); bytes before ``offset``
        are dropped. ``offset`` None (a runtime that lost count) or one already dropped reads
        from the oldest byte kept. ValueError for an offset past the end."""
        with self._cond:
            end = self._start + len(self._data)
            if offset is not None and offset > end:
                raise ValueError(f"offset {offset} is past the log's end {end}")
            if offset is not None and offset > self._start:
                del self._data[: offset - self._start]
                self._start = offset
                self._cond.notify_all()
            return self._start, bytes(self._data[:max_bytes])

    def reopen(self) -> None:
        """Nothing here: the runtime reopens the host's file."""

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._data.clear()
            self._cond.notify_all()


LogSink = CriLog | CriLogBuffer


def pump(fd: int, stream: str, sink: LogSink) -> None:
    """Copy one output pipe into the log until every writer closed it; closes ``fd``."""
    pending = b""
    try:
        while True:
            chunk = os.read(fd, READ_SIZE)
            entries, pending = split_lines(pending + chunk, eof=not chunk)
            if entries:
                try:
                    sink.write(stream, entries, time.time_ns())
                except OSError as exc:
                    log.warning("cannot write container log", path=str(sink.path), error=str(exc))
            if not chunk:
                return
    finally:
        os.close(fd)


def start_pump(fd: int, stream: str, sink: LogSink, name: str) -> threading.Thread:
    thread = threading.Thread(target=pump, args=(fd, stream, sink), name=name, daemon=True)
    thread.start()
    return thread
