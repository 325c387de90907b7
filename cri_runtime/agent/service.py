"""The agent's end of the control channel: connect, announce READY, serve, reconnect.

The agent is the zone side of an IDM channel, but here the host asks and the zone answers:
requests arrive on the host→zone ring and replies go back with the REPLY flag. Each request runs
on a thread of its own (a STOP with a 30 s grace must not hold up a STATUS); replies share one
lock. When the channel breaks (the runtime restarted), containers keep running and the agent
connects again, with backoff up to RETRY_MAX_S, and announces READY with what it runs.

How the channel is made is the connector's business: a LocalLink to the runtime's unix socket
(process backend), or a GrantLink offered to Dom0 (Xen, agent/xen.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydantic import BaseModel, ValidationError

from cri_runtime.agent.client import AgentError
from cri_runtime.agent.config import AgentConfig
from cri_runtime.agent.containers import ContainerManager
from cri_runtime.agent.protocol import (
    PROTOCOL_DIGEST,
    REQUESTS,
    AgentFailure,
    AgentOp,
    AgentReady,
    AgentStatus,
    ContainerList,
    ContainerRef,
    Empty,
    Stop,
)
from idm.channel import Channel, ChannelError
from idm.links.local import LocalLink
from idm.wire import MAX_PAYLOAD, Flags

log = structlog.get_logger(__name__)

POLL_MS = 250  # how often an idle channel checks that the runtime's process is still there
HELLO_TIMEOUT_MS = 10_000
RETRY_MIN_S = 0.05
RETRY_MAX_S = 1.0

Reply = tuple[int, bytes]


class ControlConnection(Protocol):
    """A fresh control channel to the runtime, before the hello."""

    channel: Channel

    def alive(self) -> bool:
        """False once the runtime's end is gone (checked whenever the channel is idle)."""
        ...


class ControlConnector(Protocol):
    def connect(self, give_up: float) -> ControlConnection:
        """A new channel, the runtime attached by monotonic time ``give_up``; ChannelError if
        the runtime cannot be reached now (the agent backs off and tries again)."""
        ...


class _LocalControl:
    def __init__(self, link: LocalLink) -> None:
        self.channel = link.open_channel()
        self.alive = link.peer_alive


class LocalControlConnector:
    """The process backend's way: connect to the runtime's unix socket."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def connect(self, give_up: float) -> ControlConnection:
        return _LocalControl(LocalLink.connect(self.socket_path))


def failure(status: AgentStatus, message: str) -> Reply:
    return int(status), AgentFailure(message=message).model_dump_json().encode()


class AgentService:
    def __init__(
        self,
        config: AgentConfig,
        manager: ContainerManager,
        oci_runtime: str,
        connector: ControlConnector,
    ) -> None:
        self._config = config
        self._connector = connector
        self._manager = manager
        self._oci_runtime = oci_runtime
        self._stopping = threading.Event()
        self.containers_removed = False  # a SHUTDOWN request already stopped everything
        self._handlers: dict[AgentOp, Callable[[Any], BaseModel]] = {
            AgentOp.CREATE: lambda r: manager.create(r.spec),
            AgentOp.START: lambda r: manager.start(r.container_id),
            AgentOp.STOP: lambda r: manager.stop(r.container_id, r.timeout_s),
            AgentOp.REMOVE: self._remove,
            AgentOp.STATUS: lambda r: manager.status(r.container_id),
            AgentOp.LIST: lambda r: ContainerList(containers=tuple(manager.list())),
            AgentOp.EXEC_SYNC: lambda r: manager.exec_sync(r.container_id, r.cmd, r.timeout_s),
            AgentOp.REOPEN_LOG: self._reopen_log,
            AgentOp.STATS: lambda r: manager.stats(r.container_id),
            AgentOp.UPDATE_RESOURCES: lambda r: manager.update_resources(
                r.container_id, r.resources
            ),
            AgentOp.SHUTDOWN: self._shutdown,
            AgentOp.READ_LOG: lambda r: manager.read_log(r.container_id, r.offset, r.max_bytes),
        }

    def stop(self) -> None:
        """Leave the serving loop (from any thread, or a signal handler)."""
        self._stopping.set()

    def run(self) -> None:
        """Connect, serve, reconnect, until stop() or a SHUTDOWN request."""
        delay = RETRY_MIN_S
        unreachable_logged = False
        while not self._stopping.is_set():
            try:
                connection = self._connector.connect(time.monotonic() + HELLO_TIMEOUT_MS / 1000)
            except ChannelError as exc:
                if not unreachable_logged:
                    log.info("runtime unreachable; retrying", reason=exc.reason)
                    unreachable_logged = True
                self._stopping.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            channel = connection.channel
            try:
                channel.hello_client(
                    MAX_PAYLOAD, table_digest=PROTOCOL_DIGEST, timeout_ms=HELLO_TIMEOUT_MS
                )
                delay, unreachable_logged = RETRY_MIN_S, False
                log.info("connected to the runtime")
                self._serve(connection)
            except ChannelError as exc:
                log.warning("control channel lost", reason=exc.reason)
                self._stopping.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)
            finally:
                channel.close()

    def dispatch(self, opcode: int, payload: bytes) -> Reply:
        """One request → (status, reply payload). Never raises: a bad request costs its reply."""
        try:
            op = AgentOp(opcode)
            request_type, _ = REQUESTS[op]
        except (ValueError, KeyError):
            return failure(AgentStatus.INVALID, f"unknown request opcode {opcode:#x}")
        try:
            request = request_type.model_validate_json(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            return failure(AgentStatus.INVALID, f"{op.name}: {where}: {first['msg']}")
        try:
            response = self._handlers[op](request)
        except AgentError as exc:
            return failure(exc.status, str(exc))
        except Exception as exc:
            log.exception("request failed", op=op.name)
            return failure(AgentStatus.FAILED, f"{op.name}: internal error: {exc!r}")
        return 0, response.model_dump_json().encode()

    def _remove(self, request: ContainerRef) -> Empty:
        self._manager.remove(request.container_id)
        return Empty()

    def _reopen_log(self, request: ContainerRef) -> Empty:
        self._manager.reopen_log(request.container_id)
        return Empty()

    def _shutdown(self, request: Stop) -> Empty:
        self._manager.shutdown(request.timeout_s)
        self.containers_removed = True
        return Empty()

    def _serve(self, connection: ControlConnection) -> None:
        channel = connection.channel
        replies = _Replies(channel)
        ready = AgentReady(
            zone_id=self._config.zone_id,
            agent_pid=os.getpid(),
            oci_runtime=self._oci_runtime,
            containers=tuple(self._manager.list()),
        )
        replies.announce(ready)
        try:
            while not self._stopping.is_set():
                message = channel.recv(timeout_ms=POLL_MS)
                if message is None:
                    if not connection.alive():
                        log.warning("runtime gone")
                        return
                    continue
                header = message.header
                if header.flags & (Flags.REPLY | Flags.ASYNC):
                    log.warning("ignoring a message that is no request", opcode=header.opcode)
                    continue
                threading.Thread(
                    target=self._answer,
                    args=(replies, header.opcode, header.seq, bytes(message.payload)),
                    name=f"request-{header.seq}",
                    daemon=True,
                ).start()
        finally:
            replies.close()

    def _answer(self, replies: _Replies, opcode: int, seq: int, payload: bytes) -> None:
        status, body = self.dispatch(opcode, payload)
        replies.send(opcode, seq, status, body)
        if opcode == AgentOp.SHUTDOWN and status == 0:
            self.stop()


class _Replies:
    """Sends on one channel from many request threads; once closed (the channel is being torn
    down) late replies are dropped instead of touching unmapped memory."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._open = True

    def announce(self, ready: AgentReady) -> None:
        with self._lock:
            self._channel.send(
                AgentOp.READY,
                ready.model_dump_json().encode(),
                flags=Flags.ASYNC,
                timeout_ms=HELLO_TIMEOUT_MS,
            )

    def send(self, opcode: int, seq: int, status: int, body: bytes) -> None:
        with self._lock:
            if not self._open:
                log.info("reply dropped: its channel is gone", opcode=opcode, seq=seq)
                return
            try:
                self._channel.reply(opcode, seq, status, body)
            except ChannelError as exc:
                log.warning("reply not delivered", opcode=opcode, seq=seq, reason=exc.reason)

    def close(self) -> None:
        with self._lock:
            self._open = False
            self._channel.shutdown()
