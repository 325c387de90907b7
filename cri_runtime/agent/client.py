"""The runtime's end of the control channel to one zone agent: thread-safe request/reply
matched by sequence number, so a long ExecSync never blocks another CRI call on the same zone.

One reader thread receives every reply and completes the request waiting for its seq; senders
share a lock. A request that gets no reply in time raises AgentError(TIMEOUT) (its late reply is
dropped); when the channel closes, every waiting request raises AgentGone.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import structlog
from pydantic import BaseModel, ValidationError

from cri_runtime.agent import protocol as p
from idm.channel import Channel, ChannelError
from idm.wire import MAX_PAYLOAD, Flags

log = structlog.get_logger(__name__)

R = TypeVar("R", bound=BaseModel)

POLL_MS = 200  # how often an idle reader checks that the agent's process is still there
SEND_TIMEOUT_MS = 10_000
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 30.0
# The agent gives an OCI runtime command 60 s and a SIGKILLed container 10 s to go.
COMMAND_TIMEOUT_S = 90.0
MARGIN_S = 30.0


class AgentError(Exception):
    """A request failed with an AgentStatus: raised by the agent's handlers, sent as the
    reply's status and message, and raised again by the client."""

    def __init__(self, status: p.AgentStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class AgentGone(Exception):
    """The control channel is closed: the zone or its agent died."""


class AgentClient:
    ready: p.AgentReady

    def __init__(
        self,
        channel: Channel,
        ready: p.AgentReady,
        *,
        peer_alive: Callable[[], bool] | None = None,
    ) -> None:
        """Serve an established channel (see ``handshake``); ``peer_alive`` tells the reader
        the agent's process is gone even if it died without closing the channel."""
        self.ready = ready
        self._channel = channel
        self._peer_alive = peer_alive
        self._seq = itertools.count(1)
        self._lock = threading.Lock()  # _pending, _gone
        self._send_lock = threading.Lock()  # sends, and the channel's teardown
        self._pending: dict[int, Future[tuple[int, bytes]]] = {}
        self._gone: str | None = None
        self._closing = threading.Event()
        self._log = log.bind(zone_id=ready.zone_id)
        self._reader = threading.Thread(
            target=self._read, name=f"agent-{ready.zone_id}", daemon=True
        )
        self._reader.start()

    @classmethod
    def handshake(
        cls,
        channel: Channel,
        *,
        timeout_s: float = HANDSHAKE_TIMEOUT_S,
        peer_alive: Callable[[], bool] | None = None,
    ) -> AgentClient:
        """Host side of a fresh channel: answer the agent's hello (refusing another protocol
        build) and wait for its READY. Closes the channel and raises AgentGone on failure."""
        timeout_ms = int(timeout_s * 1000)
        try:
            channel.hello_server(MAX_PAYLOAD, table_digest=p.PROTOCOL_DIGEST, timeout_ms=timeout_ms)
            message = channel.recv(timeout_ms=timeout_ms)
            if message is None or message.header.opcode != p.AgentOp.READY:
                raise AgentGone("the agent did not announce READY")
            ready = p.AgentReady.model_validate_json(message.payload)
        except (ChannelError, ValidationError, AgentGone) as exc:
            channel.close()
            reason = exc.reason if isinstance(exc, ChannelError) else str(exc)
            raise AgentGone(f"control channel handshake: {reason}") from exc
        return cls(channel, ready, peer_alive=peer_alive)

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._gone is not None

    # -- requests ---------------------------------------------------------------------------

    def create(self, spec: p.ContainerSpec) -> p.ContainerInfo:
        return self._call(p.AgentOp.CREATE, p.Create(spec=spec), p.ContainerInfo, COMMAND_TIMEOUT_S)

    def start(self, container_id: str) -> p.ContainerInfo:
        request = p.ContainerRef(container_id=container_id)
        return self._call(p.AgentOp.START, request, p.ContainerInfo, COMMAND_TIMEOUT_S)

    def stop(self, container_id: str, timeout_s: float) -> p.ContainerInfo:
        request = p.Stop(container_id=container_id, timeout_s=timeout_s)
        return self._call(p.AgentOp.STOP, request, p.ContainerInfo, timeout_s + MARGIN_S)

    def remove(self, container_id: str) -> None:
        request = p.ContainerRef(container_id=container_id)
        self._call(p.AgentOp.REMOVE, request, p.Empty, COMMAND_TIMEOUT_S)

    def status(self, container_id: str) -> p.ContainerInfo:
        return self._call(
            p.AgentOp.STATUS, p.ContainerRef(container_id=container_id), p.ContainerInfo
        )

    def list(self) -> Sequence[p.ContainerInfo]:
        return self._call(p.AgentOp.LIST, p.Empty(), p.ContainerList).containers

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout_s: float) -> p.ExecResult:
        """``timeout_s`` 0 waits as long as the command runs."""
        request = p.ExecSync(container_id=container_id, cmd=tuple(cmd), timeout_s=timeout_s)
        wait = timeout_s + MARGIN_S if timeout_s else None
        return self._call(p.AgentOp.EXEC_SYNC, request, p.ExecResult, wait)

    def reopen_log(self, container_id: str) -> None:
        self._call(p.AgentOp.REOPEN_LOG, p.ContainerRef(container_id=container_id), p.Empty)

    def read_log(
        self, container_id: str, offset: int | None, max_bytes: int = p.LOG_CHUNK_MAX
    ) -> p.LogChunk:
        """A relayed container's log from ``offset`` (acknowledging what comes before)."""
        request = p.ReadLog(container_id=container_id, offset=offset, max_bytes=max_bytes)
        return self._call(p.AgentOp.READ_LOG, request, p.LogChunk)

    def stats(self, container_id: str) -> p.Stats:
        return self._call(p.AgentOp.STATS, p.ContainerRef(container_id=container_id), p.Stats)

    def update_resources(self, container_id: str, resources: p.Resources) -> p.ContainerInfo:
        request = p.UpdateResources(container_id=container_id, resources=resources)
        return self._call(p.AgentOp.UPDATE_RESOURCES, request, p.ContainerInfo, COMMAND_TIMEOUT_S)

    def shutdown(self, grace_s: float) -> None:
        """Stop and remove every container (``grace_s`` each, in parallel); the agent exits."""
        request = p.Stop(container_id="", timeout_s=grace_s)
        self._call(p.AgentOp.SHUTDOWN, request, p.Empty, grace_s + COMMAND_TIMEOUT_S)

    def call_raw(
        self, opcode: int, payload: bytes, *, timeout_s: float | None
    ) -> tuple[int, bytes]:
        """Send any opcode and payload, return (status, reply payload): the typed methods'
        transport, and the way to probe the agent with requests they would never build."""
        result: Future[tuple[int, bytes]] = Future()
        with self._lock:
            if self._gone is not None:
                raise AgentGone(self._gone)
            seq = next(self._seq)
            self._pending[seq] = result
        try:
            with self._send_lock:
                if self._closing.is_set():
                    raise AgentGone("client closed")
                self._channel.send(opcode, payload, seq=seq, timeout_ms=SEND_TIMEOUT_MS)
        except ChannelError as exc:
            self._forget(seq)
            raise AgentGone(f"send: {exc.reason}") from exc
        except AgentGone:
            self._forget(seq)
            raise
        try:
            return result.result(timeout_s)
        except FutureTimeout:
            self._forget(seq)
            raise AgentError(
                p.AgentStatus.TIMEOUT, f"no reply to {_op_name(opcode)} within {timeout_s:.0f} s"
            ) from None

    def close(self) -> None:
        """Stop reading and release the channel; waiting requests raise AgentGone."""
        with self._send_lock:
            if self._closing.is_set():
                return
            self._closing.set()
            self._channel.shutdown()
        self._reader.join()
        with self._send_lock:
            self._channel.close()

    # -- internals --------------------------------------------------------------------------

    def _call(
        self,
        op: p.AgentOp,
        request: BaseModel,
        response_type: type[R],
        timeout_s: float | None = REQUEST_TIMEOUT_S,
    ) -> R:
        assert p.REQUESTS[op] == (type(request), response_type), f"{op.name} models"
        status, payload = self.call_raw(op, request.model_dump_json().encode(), timeout_s=timeout_s)
        if status:
            raise _failure(status, payload)
        try:
            return response_type.model_validate_json(payload)
        except ValidationError as exc:
            raise AgentError(p.AgentStatus.FAILED, f"{op.name}: malformed reply: {exc}") from exc

    def _forget(self, seq: int) -> None:
        with self._lock:
            self._pending.pop(seq, None)

    def _read(self) -> None:
        reason = "closed"
        try:
            while not self._closing.is_set():
                message = self._channel.recv(timeout_ms=POLL_MS)
                if message is None:
                    if self._peer_alive is not None and not self._peer_alive():
                        reason = "the agent's process is gone"
                        break
                    continue
                header = message.header
                if not header.flags & Flags.REPLY:
                    self._log.warning("agent sent a request; ignored", opcode=header.opcode)
                    continue
                with self._lock:
                    waiting = self._pending.pop(header.seq, None)
                if waiting is not None:
                    waiting.set_result((header.status, bytes(message.payload)))
        except ChannelError as exc:
            reason = exc.reason
        except Exception as exc:  # a dead reader must not leave a client that looks alive
            self._log.exception("control channel reader failed")
            reason = f"reader failed: {type(exc).__name__}: {exc}"
        with self._lock:
            self._gone = reason
            pending, self._pending = self._pending, {}
        for waiting in pending.values():
            waiting.set_exception(AgentGone(reason))
        if not self._closing.is_set():
            self._log.warning("control channel closed", reason=reason)


def _op_name(opcode: int) -> str:
    try:
        return p.AgentOp(opcode).name
    except ValueError:
        return hex(opcode)


def _failure(status: int, payload: bytes) -> AgentError:
    try:
        message = p.AgentFailure.model_validate_json(payload).message
    except ValidationError:
        message = payload.decode(errors="replace")
    try:
        return AgentError(p.AgentStatus(status), message)
    except ValueError:
        return AgentError(p.AgentStatus.FAILED, f"status {status}: {message}")
