"""AgentClient over a real in-process IDM channel, with the zone side played by the test:
handshake, replies matched by seq (in any order), failures, timeouts, a closing channel."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest

from cri_runtime.agent import protocol as p
from cri_runtime.agent.client import AgentClient, AgentError, AgentGone
from idm.channel import Channel, ChannelError, Message
from idm.wire import MAX_PAYLOAD, TABLE_DIGEST, Flags
from tests.conftest import Pair

CID = "c" * 64
READY = p.AgentReady(zone_id="z", agent_pid=1, oci_runtime="runc")


def info(state: p.ContainerState = p.ContainerState.RUNNING) -> p.ContainerInfo:
    return p.ContainerInfo(container_id=CID, state=state, created_at=datetime.now(UTC))


def hello_and_ready(zone: Channel, digest: int = p.PROTOCOL_DIGEST) -> None:
    zone.hello_client(MAX_PAYLOAD, table_digest=digest, timeout_ms=5000)
    zone.send(p.AgentOp.READY, READY.model_dump_json().encode(), flags=Flags.ASYNC)


@pytest.fixture
def connected(make_pair: Callable[..., Pair]) -> Iterator[tuple[AgentClient, Channel]]:
    _, zone, host = make_pair()
    agent = threading.Thread(target=hello_and_ready, args=(zone,))
    agent.start()
    client = AgentClient.handshake(host, timeout_s=5)
    agent.join()
    yield client, zone
    client.close()


def test_handshake_reads_ready(connected: tuple[AgentClient, Channel]) -> None:
    client, _ = connected
    assert client.ready == READY and not client.closed


def test_handshake_refuses_an_agent_of_another_protocol(make_pair: Callable[..., Pair]) -> None:
    _, zone, host = make_pair()
    refused: list[ChannelError] = []

    def other_build() -> None:
        try:
            hello_and_ready(zone, digest=1)
        except ChannelError as exc:
            refused.append(exc)

    agent = threading.Thread(target=other_build)
    agent.start()
    with pytest.raises(AgentGone, match="handshake"):
        AgentClient.handshake(host, timeout_s=5)
    agent.join()
    assert refused and "another call table" in refused[0].reason


def test_handshake_needs_ready_first(make_pair: Callable[..., Pair]) -> None:
    _, zone, host = make_pair()

    def agent() -> None:
        zone.hello_client(MAX_PAYLOAD, table_digest=p.PROTOCOL_DIGEST, timeout_ms=5000)
        zone.send(p.AgentOp.LIST, b"{}")

    thread = threading.Thread(target=agent)
    thread.start()
    with pytest.raises(AgentGone, match="did not announce READY"):
        AgentClient.handshake(host, timeout_s=5)
    thread.join()
    assert TABLE_DIGEST != p.PROTOCOL_DIGEST  # the control channel is not a CUDA channel


def test_replies_are_matched_by_seq_in_any_order(connected: tuple[AgentClient, Channel]) -> None:
    client, zone = connected
    statuses: list[p.ContainerInfo] = []
    listings: list[object] = []
    threads = [
        threading.Thread(target=lambda: statuses.append(client.status(CID))),
        threading.Thread(target=lambda: listings.append(client.list())),
    ]
    for thread in threads:
        thread.start()
    requests: list[Message] = []
    while len(requests) < 2:
        message = zone.recv(timeout_ms=5000)
        assert message is not None
        requests.append(message)
    exited = info(p.ContainerState.EXITED)
    for message in reversed(requests):  # answer the later one first
        if message.header.opcode == p.AgentOp.STATUS:
            assert p.ContainerRef.model_validate_json(message.payload).container_id == CID
            body = exited.model_dump_json().encode()
        else:
            body = p.ContainerList(containers=()).model_dump_json().encode()
        zone.reply(message.header.opcode, message.header.seq, 0, body)
    for thread in threads:
        thread.join()
    assert statuses == [exited] and listings == [()]


def answer_next(zone: Channel, status: int, body: bytes) -> p.AgentOp:
    message = zone.recv(timeout_ms=5000)
    assert message is not None
    zone.reply(message.header.opcode, message.header.seq, status, body)
    return p.AgentOp(message.header.opcode)


def test_failure_replies_raise_agent_error(connected: tuple[AgentClient, Channel]) -> None:
    client, zone = connected
    failure = p.AgentFailure(message="no container x").model_dump_json().encode()
    thread = threading.Thread(target=answer_next, args=(zone, p.AgentStatus.NOT_FOUND, failure))
    thread.start()
    with pytest.raises(AgentError, match="no container x") as err:
        client.remove(CID)
    thread.join()
    assert err.value.status == p.AgentStatus.NOT_FOUND
    # a status the protocol does not define, and a body that is not a failure
    thread = threading.Thread(target=answer_next, args=(zone, 99, b"plain text"))
    thread.start()
    with pytest.raises(AgentError, match="status 99: plain text") as err:
        client.start(CID)
    thread.join()
    assert err.value.status == p.AgentStatus.FAILED


def test_a_malformed_reply_is_a_failure(connected: tuple[AgentClient, Channel]) -> None:
    client, zone = connected
    thread = threading.Thread(target=answer_next, args=(zone, 0, b'{"nope": 1}'))
    thread.start()
    with pytest.raises(AgentError, match="malformed reply") as err:
        client.stats(CID)
    thread.join()
    assert err.value.status == p.AgentStatus.FAILED


def test_exec_results_carry_binary_output(connected: tuple[AgentClient, Channel]) -> None:
    client, zone = connected
    result = p.ExecResult(stdout=b"\xff\x00bin", stderr=b"", exit_code=3)
    thread = threading.Thread(target=answer_next, args=(zone, 0, result.model_dump_json().encode()))
    thread.start()
    assert client.exec_sync(CID, ["cat"], 5) == result
    thread.join()


def test_a_silent_agent_times_out_and_its_late_reply_is_dropped(
    connected: tuple[AgentClient, Channel],
) -> None:
    client, zone = connected
    started = time.monotonic()
    with pytest.raises(AgentError, match="no reply to LIST") as err:
        client.call_raw(p.AgentOp.LIST, b"{}", timeout_s=0.3)
    assert err.value.status == p.AgentStatus.TIMEOUT and time.monotonic() - started < 2
    late = zone.recv(timeout_ms=5000)
    assert late is not None
    zone.reply(late.header.opcode, late.header.seq, 0, b'{"containers": []}')
    thread = threading.Thread(
        target=answer_next,
        args=(zone, 0, p.ContainerList(containers=()).model_dump_json().encode()),
    )
    thread.start()
    assert client.list() == ()
    thread.join()


def test_a_closing_channel_fails_waiting_requests(connected: tuple[AgentClient, Channel]) -> None:
    client, zone = connected
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            client.status(CID)
        except AgentGone as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    assert zone.recv(timeout_ms=5000) is not None
    zone.shutdown()  # the agent goes away
    thread.join(5)
    assert len(errors) == 1 and client.closed
    with pytest.raises(AgentGone):
        client.list()


def test_close_is_idempotent_and_ends_requests(connected: tuple[AgentClient, Channel]) -> None:
    client, _ = connected
    client.close()
    client.close()
    with pytest.raises(AgentGone):
        client.status(CID)
