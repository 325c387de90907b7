"""Relayed CRI logs (Xen zones): the agent's bounded buffer (agent/crilog.py CriLogBuffer) and
the runtime's pull into the host's file (cri_runtime/logs.py), with an agent stand-in that
answers READ_LOG from a real buffer as the agent's ContainerManager does."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cri_runtime.agent.client import AgentError
from cri_runtime.agent.crilog import CriLogBuffer
from cri_runtime.agent.protocol import AgentStatus, LogChunk
from cri_runtime.logs import LogRelay

CID = "e" * 64
NS = 1_475_713_029_669_794_202  # 2016-10-06T00:17:09.669794202Z


def line(text: str, stream: str = "stdout") -> bytes:
    return f"2016-10-06T00:17:09.669794202Z {stream} F {text}\n".encode()


class BufferAgent:
    """READ_LOG over one container's CriLogBuffer; ``exited`` stands for the container's end."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.buffer = CriLogBuffer(capacity)
        self.exited = False
        self.reads: list[int | None] = []

    def write(self, text: str, stream: str = "stdout") -> None:
        self.buffer.write(stream, [(False, text.encode())], NS)

    def read_log(self, container_id: str, offset: int | None, max_bytes: int) -> LogChunk:
        if container_id != CID:
            raise AgentError(AgentStatus.NOT_FOUND, f"no container {container_id}")
        self.reads.append(offset)
        finished = self.exited
        start, data = self.buffer.read(offset, max_bytes)
        return LogChunk(
            offset=start, data=data, complete=finished and start + len(data) == self.buffer.end
        )


def relay(tmp_path: Path, agent: BufferAgent, interval_s: float = 3600) -> LogRelay:
    return LogRelay(tmp_path / "offsets", lambda zone: agent, lambda cid: True,  # type: ignore[arg-type,return-value]
                    interval_s=interval_s)  # fmt: skip


def test_the_buffer_drops_what_was_read_and_blocks_when_full() -> None:
    buffer = CriLogBuffer(capacity=3 * len(line("0000")))
    for i in range(3):
        buffer.write("stdout", [(False, f"{i:04}".encode())], NS)
    assert buffer.read(None, 1 << 20) == (0, line("0000") + line("0001") + line("0002"))
    size = len(line("0000"))
    # a fourth entry waits for room
    writer = threading.Thread(target=buffer.write, args=("stderr", [(False, b"0003")], NS))
    writer.start()
    time.sleep(0.2)
    assert writer.is_alive() and buffer.end == 3 * size
    assert buffer.read(size, 1 << 20) == (size, line("0001") + line("0002"))  # acks entry 0
    writer.join(5)
    assert not writer.is_alive()
    assert buffer.read(2 * size, size)[1] == line("0002")  # max_bytes
    assert buffer.read(None, 1 << 20) == (2 * size, line("0002") + line("0003", "stderr"))
    assert buffer.read(size, 1 << 20)[0] == 2 * size  # an old offset reads from what is kept
    with pytest.raises(ValueError, match="past the log's end"):
        buffer.read(5 * size, 1)
    # closing (the container is removed) frees a blocked writer and keeps nothing
    full = CriLogBuffer(capacity=size)
    full.write("stdout", [(False, b"0000")], NS)
    blocked = threading.Thread(target=full.write, args=("stdout", [(False, b"0001")], NS))
    blocked.start()
    full.close()
    blocked.join(5)
    assert not blocked.is_alive() and full.read(None, 100)[1] == b""


def test_pulls_append_to_the_host_file_and_drain_waits_for_the_end(tmp_path: Path) -> None:
    agent = BufferAgent()
    logs = relay(tmp_path, agent)
    path = tmp_path / "c.log"
    logs.track(CID, "zone", path)
    assert path.exists() and path.read_bytes() == b""  # kubelet may look at once
    agent.write("one")
    assert logs.pull(CID) is False
    agent.write("two", "stderr")
    logs.pull(CID)
    assert path.read_bytes() == line("one") + line("two", "stderr")
    assert (tmp_path / "offsets" / CID).read_text() == str(len(path.read_bytes()))

    # the container exits while its last words are still arriving: drain waits for them
    threading.Timer(0.2, agent.write, ("three",)).start()
    threading.Timer(0.3, setattr, (agent, "exited", True)).start()
    assert logs.drain(CID, timeout_s=5)
    assert path.read_bytes().endswith(line("three"))
    reads = len(agent.reads)
    assert logs.pull(CID) and len(agent.reads) == reads  # complete: no more READ_LOGs
    logs.forget(CID)
    assert not (tmp_path / "offsets" / CID).exists() and path.exists()
    logs.close()


def test_a_restarted_runtime_goes_on_where_it_stopped(tmp_path: Path) -> None:
    agent = BufferAgent()
    first = relay(tmp_path, agent)
    path = tmp_path / "c.log"
    first.track(CID, "zone", path)
    agent.write("before")
    first.pull(CID)
    first.close()  # the runtime dies; the agent still has "before" until acknowledged
    agent.write("after")
    second = relay(tmp_path, agent)
    second.track(CID, "zone", path)
    second.pull(CID)
    assert path.read_bytes() == line("before") + line("after")  # nothing twice
    assert agent.reads[-1] == len(line("before"))
    second.close()


def test_reopen_after_rotation_sends_the_rest_to_a_new_file(tmp_path: Path) -> None:
    agent = BufferAgent()
    logs = relay(tmp_path, agent)
    path = tmp_path / "c.log"
    logs.track(CID, "zone", path)
    agent.write("old")
    logs.pull(CID)
    path.rename(tmp_path / "c.log.1")  # kubelet rotates, then asks to reopen
    logs.reopen(CID)
    agent.write("new")
    logs.pull(CID)
    assert (tmp_path / "c.log.1").read_bytes() == line("old")
    assert path.read_bytes() == line("new")
    logs.close()


def test_the_timer_pulls_running_containers_and_a_big_log_arrives_whole(tmp_path: Path) -> None:
    agent = BufferAgent(capacity=64 << 10)  # far less than what the container writes
    logs = relay(tmp_path, agent, interval_s=0.02)
    path = tmp_path / "c.log"
    logs.track(CID, "zone", path)

    def write() -> None:
        for i in range(3000):
            agent.write(f"{i:06}" * 100)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join(30)
    assert not writer.is_alive(), "the writer stayed blocked: the timer did not pull"
    agent.exited = True
    assert logs.drain(CID, timeout_s=10)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3000 and lines[-1].endswith(b"002999" * 100)
    logs.close()


def test_an_unreachable_agent_fails_the_pull_not_the_drain(tmp_path: Path) -> None:
    agent = BufferAgent()
    logs = relay(tmp_path, agent)
    logs.track("f" * 64, "zone", tmp_path / "x.log")
    with pytest.raises(AgentError, match="no container"):
        logs.pull("f" * 64)
    assert logs.drain("f" * 64, timeout_s=1) is False
    assert logs.pull("unknown") is True  # nothing tracked: nothing to wait for
    logs.close()
