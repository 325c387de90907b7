"""The host side's per-channel serving loop: receive, dispatch by opcode, reply.

gpu-proxy runs one ``ChannelServer`` per zone channel, with its handler table generated from the
call table. Small messages are drained in batches (one C call for many messages); anything larger
streams through ``Channel.recv``. A peer that breaks the protocol gets its channel closed with the
reason logged; it never takes the serving process down.
"""

import errno
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import structlog

from idm.callcodec import Buffer
from idm.channel import Channel, ChannelClosed, ChannelError, PayloadReader, PeerViolation
from idm.wire import Flags, Header, Op, Status

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Reply:
    status: int = 0
    # Bytes, or parts sent as their concatenation (gathered: large device data is not joined).
    payload: bytes | tuple[Buffer, ...] = b""


# A handler gets the validated header and a payload view valid only during the call. It returns
# the reply for sync requests; for fire-and-forget requests its return value is ignored.
Handler = Callable[[Header, memoryview], Reply | None]
# A streamed handler gets a large message's payload as a reader, to receive the bytes straight
# where they belong (a copy's destination) instead of into a private buffer first. Whatever it
# leaves unread is discarded after it returns.
StreamedHandler = Callable[[Header, PayloadReader], Reply | None]

POLL_MS = 200


_REPLY = int(Flags.REPLY)
_ASYNC = int(Flags.ASYNC)
_EMPTY_OK = Reply()


def null_handler(header: Header, payload: memoryview) -> Reply | None:
    """IDM_OP_NULL: echo the payload of sync requests (health checks, benchmarks)."""
    if header.flags & _ASYNC:
        return None
    return Reply(Status.OK, bytes(payload)) if len(payload) else _EMPTY_OK


class FailureStatuses(NamedTuple):
    """Reply statuses for requests no handler answered. A channel whose replies carry another
    status space (gpu-proxy's carry CUresults) must map these into it: IDM's BAD_REQUEST (2)
    would read as CUDA_ERROR_OUT_OF_MEMORY in a zone."""

    unknown_opcode: int = Status.UNKNOWN_OPCODE
    handler_failed: int = Status.BAD_REQUEST


IDM_FAILURES = FailureStatuses()


class ChannelServer:
    """Serves one channel until the peer leaves, breaks the protocol, or ``stop`` is called."""

    def __init__(
        self,
        channel: Channel,
        handlers: Mapping[int, Handler],
        *,
        max_payload: int,
        name: str = "",
        peer_alive: Callable[[], bool] | None = None,
        failures: FailureStatuses = IDM_FAILURES,
        streamed: Mapping[int, StreamedHandler] | None = None,
    ) -> None:
        self.channel = channel
        self.streamed = dict(streamed or {})
        self.failures = failures
        self.handlers = dict(handlers)
        self.handlers.setdefault(Op.NULL, null_handler)
        self.max_payload = max_payload
        self.name = name
        self.peer_alive = peer_alive
        self.served = 0
        self.close_reason: str | None = None
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        self.channel.shutdown()

    def serve(self) -> None:
        """Run the handshake then the loop; always closes the channel before returning."""
        log_ = log.bind(channel=self.name)
        try:
            self.channel.hello_server(self.max_payload)
            log_.debug("channel up", version=self.channel.version)
            # The hot loop of every forwarded call: locals, plain ints, no enum arithmetic.
            recv_batch, dispatch, stopped, streamed = (
                self.channel.recv_batch,
                self._dispatch,
                self._stop.is_set,
                self.streamed,
            )
            while not stopped():
                idle = True
                for header, payload in recv_batch(POLL_MS, streamed):
                    idle = False
                    dispatch(header, payload)
                if idle and self.peer_alive is not None and not self.peer_alive():
                    self.close_reason = "peer process gone"
                    break
        except ChannelClosed:
            self.close_reason = "closed"
        except ChannelError as exc:
            self.close_reason = exc.reason
            if not self._stop.is_set():
                log_.warning("channel closed on error", reason=exc.reason, errno=exc.code)
        finally:
            self.channel.close()
            log_.debug("channel down", served=self.served, reason=self.close_reason)

    def _dispatch(self, header: Header, payload: memoryview | PayloadReader) -> None:
        self.served += 1
        flags = header.flags
        if flags & _REPLY:
            raise PeerViolation(
                errno.EPROTO, f"zone sent a reply (opcode {header.opcode}) as a request"
            )
        if isinstance(payload, PayloadReader):
            reply = self._run_streamed(header, payload)
        else:
            handler = self.handlers.get(header.opcode)
            if handler is None:
                if not flags & _ASYNC:
                    status = self.failures.unknown_opcode
                    self.channel.reply(header.opcode, header.seq, status, b"")
                return
            try:
                reply = handler(header, payload)
            except Exception:
                # A handler bug must cost this request, not the zone's channel or the process.
                log.exception(
                    "handler failed", channel=self.name, opcode=header.opcode, seq=header.seq
                )
                reply = Reply(self.failures.handler_failed)
        if not flags & _ASYNC:
            reply = reply or _EMPTY_OK
            out = reply.payload
            if isinstance(out, tuple):
                self.channel.reply_parts(header.opcode, header.seq, reply.status, out)
            else:
                self.channel.reply(header.opcode, header.seq, reply.status, out)

    def _run_streamed(self, header: Header, reader: PayloadReader) -> Reply | None:
        try:
            reply = self.streamed[header.opcode](header, reader)
        except ChannelError:
            raise  # the ring broke mid-message: the channel is done
        except Exception:
            log.exception("handler failed", channel=self.name, opcode=header.opcode, seq=header.seq)
            reply = Reply(self.failures.handler_failed)
        reader.discard()
        return reply
