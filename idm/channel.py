"""A channel endpoint: Python's handle on one side of the C ring over a link's shared memory.

Everything that touches shared memory happens in C (idm/csrc/ring.c), with the GIL released by
cffi, so a blocked receive never stalls other Python threads. Messages returned to Python are
private copies: a zone rewriting its ring cannot change what the host already validated.
"""

import errno
import mmap
import os
import threading
from collections.abc import Container, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple, Protocol, overload

from pydantic import BaseModel, ConfigDict, Field

from idm._ring import ffi, lib
from idm.callcodec import Buffer
from idm.wire import HEADER, TABLE_DIGEST, Header

PAGE_SIZE: int = lib.IDM_PAGE_SIZE
DEFAULT_BATCH_BYTES = 256 * 1024
DEFAULT_BATCH_MSGS = 512
# Once a message has started, the rest must keep coming: a peer silent this long mid-message is
# treated as dead or hostile and the channel is closed.
STALL_TIMEOUT_MS = 10_000

_UNPACK = HEADER.unpack_from
_HDR = HEADER.size
_EMSGSIZE = -errno.EMSGSIZE
_ETIMEDOUT = -errno.ETIMEDOUT
_new_header = tuple.__new__
_send_msg = lib.idm_send_msg
_REPLY: int = lib.IDM_F_REPLY
# Below this, joining reply parts costs less than building an iovec array through cffi.
_GATHER_MIN = 64 * 1024


class Side(IntEnum):
    ZONE = lib.IDM_SIDE_ZONE
    HOST = lib.IDM_SIDE_HOST


class RingLayout(BaseModel):
    """Sizes of the two rings as powers of two; agreed at link setup, never read back from
    shared memory. 512 KiB each fits the 896 grant refs a control page can list."""

    model_config = ConfigDict(frozen=True)

    req_order: int = Field(default=19, ge=lib.IDM_RING_ORDER_MIN, le=lib.IDM_RING_ORDER_MAX)
    rsp_order: int = Field(default=19, ge=lib.IDM_RING_ORDER_MIN, le=lib.IDM_RING_ORDER_MAX)

    @property
    def region_size(self) -> int:
        size: int = lib.idm_region_size(self.to_c())
        return size

    @property
    def data_pages(self) -> int:
        return (self.region_size - PAGE_SIZE) // PAGE_SIZE

    def to_c(self) -> Any:
        return ffi.new("struct idm_layout *", (self.req_order, self.rsp_order))


class BellKind(IntEnum):
    EVENTFD = lib.IDM_BELL_EVENTFD
    EVTCHN = lib.IDM_BELL_EVTCHN


class Bell(NamedTuple):
    """One ring's doorbell as seen from one side: wait on ``wait_fd``, ring ``notify_fd``."""

    kind: BellKind
    wait_fd: int
    notify_fd: int
    port: int = 0


class Link(Protocol):
    """Shared pages plus doorbells between a zone and the host (LocalLink, GrantLink)."""

    @property
    def layout(self) -> RingLayout: ...

    @property
    def memory(self) -> mmap.mmap | Any: ...

    def bells(self) -> tuple[Bell, Bell]: ...

    def close(self) -> None: ...


class ChannelError(Exception):
    """A channel operation failed; ``code`` is an errno value, ``reason`` says why."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{reason} ({errno.errorcode.get(code, code)})")
        self.code = code
        self.reason = reason


class ChannelClosed(ChannelError):
    """The peer (or we) closed the channel."""


class PeerViolation(ChannelError):
    """The peer broke the ring protocol; the channel is closed for good."""


@dataclass(frozen=True, slots=True)
class Message:
    header: Header
    payload: bytes | bytearray


def _raise(ep: Any, rc: int, what: str) -> None:
    code = -rc
    reason = ffi.string(ep.why).decode(errors="replace") if ep.broken else os.strerror(code)
    if code == errno.EPIPE:
        raise ChannelClosed(code, f"{what}: channel closed")
    if ep.broken:
        raise PeerViolation(code, f"{what}: {reason}")
    raise ChannelError(code, f"{what}: {reason}")


def _check_hello(ep: Any, rc: int, peer: str) -> None:
    if rc == -errno.EPROTONOSUPPORT:
        raise ChannelError(-rc, f"hello: no protocol version in common with {peer}")
    if rc == -errno.ENOMSG:
        raise ChannelError(
            -rc, f"hello: {peer} was built from another call table (regenerate and rebuild both)"
        )
    if rc:
        _raise(ep, rc, "hello")


class PayloadReader:
    """The payload of a message whose header was received but not its bytes: taken in pieces,
    straight into wherever they belong (a streamed handler's destination), instead of into a
    private buffer first. All of it must be taken (``read_into``, then ``discard`` for what is
    left) before the channel receives anything else."""

    __slots__ = ("_channel", "remaining")

    def __init__(self, channel: "Channel", length: int) -> None:
        self._channel = channel
        self.remaining = length

    def read_into(self, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` with the next ``len(buf)`` payload bytes (a private copy: the ring is
        not read again)."""
        n = memoryview(buf).nbytes
        if n > self.remaining:
            raise ValueError(f"{n} bytes asked for, {self.remaining} left in the message")
        self._channel._recv_payload(buf, n)
        self.remaining -= n

    def discard(self) -> None:
        """Take what is left of the payload and drop it."""
        chunk = memoryview(bytearray(min(self.remaining, 1 << 20)))
        while self.remaining:
            self.read_into(chunk[: min(self.remaining, len(chunk))])


class Channel:
    """One side of an IDM channel over a link it owns. One thread may send while another
    receives. ``shutdown`` may be called from any thread; ``close`` (which unmaps) only once no
    other thread is inside a send or receive."""

    def __init__(
        self,
        link: Link,
        side: Side,
        *,
        spin_ns: int | None = None,
        stall_timeout_ms: int = STALL_TIMEOUT_MS,
    ) -> None:
        self._link = link
        self.stall_timeout_ms = stall_timeout_ms
        self._memory = ffi.from_buffer(link.memory)
        tx, rx = link.bells()
        self._ep = ffi.new("struct idm_endpoint *")
        rc = lib.idm_ep_init(
            self._ep,
            self._memory,
            len(self._memory),
            link.layout.to_c(),
            side,
            ffi.new("struct idm_bell *", tuple(tx)),
            ffi.new("struct idm_bell *", tuple(rx)),
        )
        if rc:
            ffi.release(self._memory)
            raise ChannelError(-rc, "region does not match the ring layout")
        if spin_ns is not None:
            self._ep.spin_ns = spin_ns
        self._hdr = ffi.new("struct idm_hdr *")
        self._batch = bytearray(DEFAULT_BATCH_BYTES)
        self._batch_c = ffi.from_buffer(self._batch)
        self._batch_view = memoryview(self._batch)
        self._offsets = ffi.new("uint32_t[]", DEFAULT_BATCH_MSGS)
        self._scratch = bytearray()
        self._closed = False
        self._state = threading.Lock()
        self.version = 0

    # -- handshake ------------------------------------------------------------------------

    def hello_client(
        self, max_payload: int, *, table_digest: int = TABLE_DIGEST, timeout_ms: int = 10_000
    ) -> int:
        """Open the channel from the zone side; returns the agreed payload limit."""
        self._check_open()
        version, agreed = ffi.new("uint16_t *"), ffi.new("uint32_t *")
        rc = lib.idm_hello_client(self._ep, max_payload, table_digest, version, agreed, timeout_ms)
        _check_hello(self._ep, rc, "the host")
        self.version = version[0]
        return int(agreed[0])

    def hello_server(
        self, max_payload: int, *, table_digest: int = TABLE_DIGEST, timeout_ms: int = 10_000
    ) -> int:
        """Answer the zone's hello; returns the agreed payload limit."""
        self._check_open()
        version = ffi.new("uint16_t *")
        rc = lib.idm_hello_server(self._ep, max_payload, table_digest, version, timeout_ms)
        _check_hello(self._ep, rc, "the zone")
        self.version = version[0]
        return int(self._ep.max_payload)

    # -- data -----------------------------------------------------------------------------

    def send(
        self,
        opcode: int,
        payload: bytes | bytearray | memoryview = b"",
        *,
        seq: int = 0,
        flags: int = 0,
        status: int = 0,
        timeout_ms: int = -1,
    ) -> None:
        if self._closed:
            self._check_open()
        buf = payload if type(payload) is bytes else ffi.from_buffer(payload)
        rc = lib.idm_send_msg(self._ep, opcode, flags, seq, status, buf, len(payload), timeout_ms)
        if rc:
            _raise(self._ep, rc, "send")

    def reply(self, opcode: int, seq: int, status: int, payload: bytes) -> None:
        """Send a reply: ``send`` without keywords or buffer conversion, for the serving loop.
        A zone that leaves its replies unread for ``stall_timeout_ms`` is treated as stalled."""
        if self._closed:
            self._check_open()
        rc = _send_msg(
            self._ep, opcode, _REPLY, seq, status, payload, len(payload), self.stall_timeout_ms
        )
        if rc:
            self._check_reply(rc)

    def reply_parts(self, opcode: int, seq: int, status: int, parts: tuple[Buffer, ...]) -> None:
        """``reply`` with the payload given as parts, sent as their concatenation. Large parts
        (device data) are gathered straight from where they lie, with no joined copy; they must
        stay unchanged until this returns."""
        total = sum(map(len, parts))
        if total < _GATHER_MIN:
            self.reply(opcode, seq, status, b"".join(parts))
            return
        if self._closed:
            self._check_open()
        bufs = [ffi.from_buffer(p) for p in parts]
        iov = ffi.new("struct iovec[]", len(bufs))
        for i, buf in enumerate(bufs):
            iov[i].iov_base = buf
            iov[i].iov_len = len(buf)
        hdr = ffi.new("struct idm_hdr *")
        lib.idm_hdr_init(hdr, opcode, _REPLY, seq, total, status)
        try:
            rc = lib.idm_sendv(self._ep, hdr, iov, len(bufs), self.stall_timeout_ms)
        finally:
            for buf in bufs:
                ffi.release(buf)
        self._check_reply(rc)

    def _check_reply(self, rc: int) -> None:
        if rc == _ETIMEDOUT and not self._ep.broken:
            raise ChannelError(
                -rc, f"reply: the zone left its response ring full for {self.stall_timeout_ms} ms"
            )
        if rc:
            _raise(self._ep, rc, "reply")

    def _recv_header(self, timeout_ms: int) -> Header | None:
        self._check_open()
        n = lib.idm_recv_hdr(self._ep, self._hdr, timeout_ms)
        if n == -errno.ETIMEDOUT:
            return None
        if n < 0:
            _raise(self._ep, n, "receive")
        h = self._hdr
        return Header(h.magic, h.version, h.flags, h.opcode, h.length, h.seq, h.status, 0)

    def _recv_payload(self, into: bytearray | memoryview, length: int) -> None:
        if length:
            rc = lib.idm_recv_payload(
                self._ep, ffi.from_buffer(into), length, self.stall_timeout_ms
            )
            if rc:
                _raise(self._ep, rc, "receive payload")

    def recv(self, timeout_ms: int = -1) -> Message | None:
        """Next message, whatever its size, as a private copy; None on timeout."""
        header = self._recv_header(timeout_ms)
        if header is None:
            return None
        payload = bytearray(header.length)
        self._recv_payload(payload, header.length)
        return Message(header, payload)

    @overload
    def recv_batch(self, timeout_ms: int = -1) -> Iterator[tuple[Header, memoryview]]: ...

    @overload
    def recv_batch(
        self, timeout_ms: int, streamed: Container[int]
    ) -> Iterator[tuple[Header, memoryview | PayloadReader]]: ...

    def recv_batch(
        self, timeout_ms: int = -1, streamed: Container[int] = ()
    ) -> Iterator[tuple[Header, memoryview | PayloadReader]]:
        """Every complete message waiting (after waiting for the first), decoded in one pass.

        The memoryviews point into private buffers reused by the next receive: copy what you
        keep. A message too large for the batch buffer streams into a scratch buffer that is
        kept for the next one (bounded by the agreed payload limit), unless its opcode is in
        ``streamed``: then it comes with a PayloadReader, and the consumer takes the bytes.
        """
        if self._closed:
            self._check_open()
        n = lib.idm_recv_batch(
            self._ep,
            self._batch_c,
            DEFAULT_BATCH_BYTES,
            self._offsets,
            DEFAULT_BATCH_MSGS,
            timeout_ms,
        )
        if n > 0:
            # Hot path: plain locals, and tuple.__new__ builds the NamedTuple without re-checking.
            batch, view, offsets, unpack = self._batch, self._batch_view, self._offsets, _UNPACK
            for i in range(n):
                off = offsets[i]
                header = _new_header(Header, unpack(batch, off))
                yield header, view[off + _HDR : off + _HDR + header[4]]
        elif n == _EMSGSIZE:
            large = self._recv_header(timeout_ms)
            if large is not None and large.opcode in streamed:
                yield large, PayloadReader(self, large.length)
            elif large is not None:
                if len(self._scratch) < large.length:
                    self._scratch = bytearray(large.length)
                scratch = memoryview(self._scratch)[: large.length]
                self._recv_payload(scratch, large.length)
                yield large, scratch
        elif n < 0:
            _raise(self._ep, n, "receive")

    # -- state ----------------------------------------------------------------------------

    @property
    def spin_ns(self) -> int:
        """How long a wait busy-polls before sleeping on the doorbell. Settable from any thread:
        a wait in progress picks the new value up at its next check."""
        return int(self._ep.spin_ns)

    @spin_ns.setter
    def spin_ns(self, value: int) -> None:
        self._ep.spin_ns = value

    @property
    def max_payload(self) -> int:
        return int(self._ep.max_payload)

    @property
    def broken_reason(self) -> str | None:
        return ffi.string(self._ep.why).decode(errors="replace") if self._ep.broken else None

    @property
    def stats(self) -> dict[str, int]:
        return {"notifies_sent": self._ep.notifies_sent, "sleeps": self._ep.sleeps}

    @property
    def link(self) -> Link:
        return self._link

    def shutdown(self) -> None:
        """Mark our side closed and wake both sides' sleepers; pending waits end with EPIPE.
        Safe from any thread, before or after ``close``."""
        with self._state:
            if not self._closed:
                lib.idm_ep_close(self._ep)

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            lib.idm_ep_close(self._ep)
            ffi.release(self._memory)
            self._link.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed(errno.EPIPE, "channel already closed")
