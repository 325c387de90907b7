"""The agent's request dispatch: every bad request gets a status, never an exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cri_runtime.agent.cgroups import CgroupLayout
from cri_runtime.agent.config import AgentConfig, parse_args
from cri_runtime.agent.containers import ContainerManager
from cri_runtime.agent.oci_runtime import OciRuntime, RuntimeChoice
from cri_runtime.agent.protocol import AgentFailure, AgentOp, AgentStatus, ContainerSpec, Create
from cri_runtime.agent.reaper import Reaper
from cri_runtime.agent.service import AgentService, LocalControlConnector


@pytest.fixture
def service(tmp_path: Path) -> AgentService:
    config = AgentConfig(zone_id="z", control_socket=tmp_path / "s", zone_dir=tmp_path / "zone")
    choice = RuntimeChoice("runc", "/nonexistent/runc", "test")
    reaper = Reaper()  # never started: nothing here spawns a process
    runtime = OciRuntime(choice, config.zone_dir / "oci", config.zone_dir / "tmp", reaper)
    manager = ContainerManager(config, runtime, reaper, CgroupLayout())
    return AgentService(config, manager, "runc", LocalControlConnector(tmp_path / "s"))


def failure(reply: tuple[int, bytes]) -> tuple[int, str]:
    return reply[0], AgentFailure.model_validate_json(reply[1]).message


def test_unknown_opcodes_and_the_agents_own_are_invalid(service: AgentService) -> None:
    assert failure(service.dispatch(0x7777, b"")) == (
        AgentStatus.INVALID,
        "unknown request opcode 0x7777",
    )
    status, message = failure(service.dispatch(AgentOp.READY, b"{}"))
    assert status == AgentStatus.INVALID and "unknown request opcode 0x100" in message


@pytest.mark.parametrize(
    ("opcode", "payload", "where"),
    [
        (AgentOp.CREATE, b"{not json", "CREATE: request"),
        (AgentOp.STATUS, b'{"container_id": 5}', "STATUS: container_id"),
        (AgentOp.STOP, b'{"container_id": "x", "timeout_s": -1}', "STOP: timeout_s"),
        (AgentOp.LIST, b'{"extra": 1}', "LIST: extra"),
        (AgentOp.CREATE, b'{"spec": {"container_id": "../../x"}}', "CREATE: spec"),
    ],
)
def test_malformed_requests_are_invalid(
    service: AgentService, opcode: int, payload: bytes, where: str
) -> None:
    status, message = failure(service.dispatch(opcode, payload))
    assert status == AgentStatus.INVALID and message.startswith(where), message


def test_requests_for_unknown_containers(service: AgentService) -> None:
    ref = json.dumps({"container_id": "f" * 64}).encode()
    for opcode in (AgentOp.START, AgentOp.STATUS, AgentOp.REMOVE, AgentOp.STATS):
        assert failure(service.dispatch(opcode, ref))[0] == AgentStatus.NOT_FOUND
    assert service.dispatch(AgentOp.LIST, b"{}") == (0, b'{"containers":[]}')


def test_a_create_that_cannot_mount_leaves_nothing(service: AgentService, tmp_path: Path) -> None:
    spec = ContainerSpec(
        container_id="a" * 64, name="x", rootfs_layers=(tmp_path / "absent",), args=("sh",)
    )
    request = Create(spec=spec).model_dump_json().encode()
    status, message = failure(service.dispatch(AgentOp.CREATE, request))
    assert status == AgentStatus.INVALID and "not a directory" in message
    assert list((tmp_path / "zone" / "containers").iterdir()) == []
    assert service.dispatch(AgentOp.LIST, b"{}") == (0, b'{"containers":[]}')


def test_command_line() -> None:
    config = parse_args(
        ["--zone-id=z", "--control-socket=/s", "--zone-dir=/d", "--loopback", "--libvgpu=/l.so"]
    )
    assert config.loopback and config.libvgpu == Path("/l.so") and config.oci_runtime == "auto"
    assert config.containers_cgroup == "/vgpu-zones/z"
    assert (
        parse_args(
            [
                "--zone-id=z",
                "--control-socket=/s",
                "--zone-dir=/d",
                "--cgroup-parent=/kubepods/pod1",
            ]
        ).containers_cgroup
        == "/kubepods/pod1"
    )
