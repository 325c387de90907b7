"""The process zone backend and the zone agent for real: namespaces, overlayfs, runc/crun,
cgroups, the IDM control channel. Needs root (as CI and the dev VM run)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cri_runtime.agent import protocol as p
from cri_runtime.agent.client import AgentClient, AgentError
from cri_runtime.agent.crilog import LOG_BUFFER_BYTES
from cri_runtime.agent.protocol import AgentStatus, ContainerState
from cri_runtime.logs import LogRelay
from cri_runtime.zones import pids
from cri_runtime.zones.base import GpuAccess, NetworkMode, ZoneError, ZoneSpec, ZoneState
from cri_runtime.zones.process import ProcessZoneBackend
from devkit.busybox import write_busybox_rootfs

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("runc") or shutil.which("crun")),
    reason="needs root and an OCI runtime",
)

CRI_LINE = re.compile(
    rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([FP]) (.*)$", re.M
)


@dataclass
class Zone:
    zone_id: str
    agent: AgentClient
    layer: Path
    logs: Path

    def spec(self, *args: str, **fields: object) -> p.ContainerSpec:
        cid = secrets.token_hex(32)
        values: dict[str, object] = {
            "container_id": cid,
            "name": f"c-{cid[:6]}",
            "rootfs_layers": (self.layer,),
            "args": args,
            "log_path": self.logs / f"{cid[:12]}.log",
        }
        return p.ContainerSpec.model_validate(values | fields)

    def run(self, *args: str, **fields: object) -> p.ContainerSpec:
        """Create and start a container."""
        spec = self.spec(*args, **fields)
        self.agent.create(spec)
        self.agent.start(spec.container_id)
        return spec


def new_zone_id() -> str:
    return f"t{secrets.token_hex(4)}"


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_for_output(path: Path | None, text: bytes) -> None:
    assert path is not None
    wait_for(repr(text), lambda: path.exists() and text in path.read_bytes())


def wait_exited(agent: AgentClient, container_id: str) -> p.ContainerInfo:
    wait_for("exit", lambda: agent.status(container_id).state == ContainerState.EXITED)
    return agent.status(container_id)


def log_entries(path: Path) -> list[tuple[str, str, bytes]]:
    """(stream, tag, content) of every line, checking the whole file is in CRI format."""
    data = path.read_bytes()
    entries = [(m[2].decode(), m[3].decode(), m[4]) for m in CRI_LINE.finditer(data)]
    assert len(entries) == data.count(b"\n"), data
    return entries


def output(path: Path, stream: str = "stdout") -> str:
    return "\n".join(c.decode() for s, _, c in log_entries(path) if s == stream)


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    return write_busybox_rootfs(tmp_path / "layer")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ProcessZoneBackend]:
    backend = ProcessZoneBackend(tmp_path / "zones")
    yield backend
    backend.close()
    cleanup = ProcessZoneBackend(tmp_path / "zones")
    for zone in cleanup.list():
        cleanup.stop(zone.zone_id, grace_s=0)
    cleanup.close()


@pytest.fixture
def zone(backend: ProcessZoneBackend, layer: Path, tmp_path: Path) -> Zone:
    zone_id = new_zone_id()
    backend.boot(ZoneSpec(zone_id=zone_id, hostname="zone-host"))
    logs = tmp_path / "logs"
    logs.mkdir()
    return Zone(zone_id, backend.agent(zone_id), layer, logs)


def processes_in_cgroup(fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cgroup").read_text():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(prefix)
    ]


# -- booting ----------------------------------------------------------------------------------


def test_boot_waits_for_ready_and_lists_the_zone(
    backend: ProcessZoneBackend, tmp_path: Path
) -> None:
    zone_id = new_zone_id()
    info = backend.boot(ZoneSpec(zone_id=zone_id))
    assert info.state == ZoneState.RUNNING and info.pid
    agent = backend.agent(zone_id)
    assert agent.ready.zone_id == zone_id and agent.ready.agent_pid == 1  # init of its pid ns
    assert agent.ready.oci_runtime in ("crun", "runc") and agent.ready.containers == ()
    assert [z.zone_id for z in backend.list()] == [zone_id]
    agent_log = (backend.zone_dir(zone_id) / "agent.log").read_text()
    assert '"OCI runtime chosen"' in agent_log and f'"zone_id": "{zone_id}"' in agent_log
    assert backend.boot(ZoneSpec(zone_id=zone_id)).pid == info.pid  # idempotent


def test_a_failed_boot_leaves_nothing_and_says_why(tmp_path: Path) -> None:
    backend = ProcessZoneBackend(tmp_path / "zones", python="/bin/false")
    try:
        with pytest.raises(ZoneError, match="did not boot: agent exited with status 1"):
            backend.boot(ZoneSpec(zone_id="broken", boot_timeout_s=10))
        assert not (tmp_path / "zones" / "broken").exists() and backend.list() == []
    finally:
        backend.close()


def test_a_silent_agent_times_out_the_boot_and_is_killed(tmp_path: Path) -> None:
    silent = tmp_path / "silent-python"
    silent.write_text("#!/bin/sh\necho never connecting >&2\nsleep 1000\n")
    silent.chmod(0o755)
    backend = ProcessZoneBackend(tmp_path / "zones", python=str(silent))
    try:
        started = time.monotonic()
        with pytest.raises(ZoneError, match="did not connect within 1 s") as err:
            backend.boot(ZoneSpec(zone_id="silent", boot_timeout_s=1))
        assert time.monotonic() - started < 5 and "never connecting" in str(err.value)
        assert not (tmp_path / "zones" / "silent").exists()
        sleepers = [
            entry
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and str(tmp_path).encode() in _cmdline(entry)
        ]
        assert sleepers == []
    finally:
        backend.close()


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""


# -- containers -------------------------------------------------------------------------------


def test_output_goes_to_the_cri_log_and_the_exit_code_is_recorded(zone: Zone) -> None:
    long_line = "dd if=/dev/zero bs=1000 count=20 2>/dev/null | tr '\\0' a"
    spec = zone.run("sh", "-c", f"echo out; echo err >&2; {long_line}; exit 3")
    info = wait_exited(zone.agent, spec.container_id)
    assert info.exit_code == 3 and info.reason == "Error" and info.pid == 0
    assert info.started_at is not None and info.finished_at is not None
    assert info.created_at <= info.started_at <= info.finished_at
    assert spec.log_path is not None
    entries = log_entries(spec.log_path)
    assert ("stdout", "F", b"out") in entries and ("stderr", "F", b"err") in entries
    # 20000 bytes without a newline: a 16 KiB partial entry, then the rest when the pipe closes
    assert [(t, len(c)) for s, t, c in entries if c.startswith(b"aaa")] == [
        ("P", 16384),
        ("F", 20000 - 16384),
    ]
    stamps = CRI_LINE.findall(spec.log_path.read_bytes())
    assert all(s[0].endswith(b"Z") for s in stamps)


def test_zero_exit_is_completed(zone: Zone) -> None:
    spec = zone.run("true")
    info = wait_exited(zone.agent, spec.container_id)
    assert (info.exit_code, info.reason) == (0, "Completed")


def test_env_cwd_and_user_take_effect(zone: Zone) -> None:
    script = "id -u; id -g; id -G; pwd; printenv FOO; hostname"
    as_nobody = zone.run(
        "sh", "-c", script, env=("FOO=bar",), working_dir="/tmp", user=p.User(uid=65534)
    )
    as_app = zone.run(
        "sh",
        "-c",
        script,
        env=("FOO=baz",),
        working_dir="/work",
        hostname="c-host",
        user=p.User(username="app", supplemental_groups=(2000,)),
    )
    for spec in (as_nobody, as_app):
        assert wait_exited(zone.agent, spec.container_id).exit_code == 0
    assert as_nobody.log_path is not None and as_app.log_path is not None
    assert output(as_nobody.log_path).split("\n") == [
        "65534",
        "65534",
        "65534",
        "/tmp",
        "bar",
        "zone-host",
    ]
    uid, gid, groups, cwd, foo, host = output(as_app.log_path).split("\n")
    assert (uid, gid, cwd, foo, host) == ("1000", "1000", "/work", "baz", "c-host")
    assert set(groups.split()) == {"1000", "44", "2000"}


def test_an_unknown_username_is_invalid(zone: Zone) -> None:
    with pytest.raises(AgentError) as err:
        zone.agent.create(zone.spec("true", user=p.User(username="ghost")))
    assert err.value.status == AgentStatus.INVALID and "ghost" in str(err.value)


def test_readonly_rootfs_refuses_writes(zone: Zone) -> None:
    security = p.Security(readonly_rootfs=True)
    spec = zone.run("sh", "-c", "touch /x || exit 9; exit 0", security=security)
    assert wait_exited(zone.agent, spec.container_id).exit_code == 9
    assert spec.log_path is not None and "Read-only file system" in output(spec.log_path, "stderr")


def test_capabilities_default_drop_all_and_privileged(zone: Zone) -> None:
    def effective(security: p.Security) -> int:
        spec = zone.run("grep", "CapEff", "/proc/self/status", security=security)
        wait_exited(zone.agent, spec.container_id)
        assert spec.log_path is not None
        return int(output(spec.log_path).split()[1], 16)

    default = effective(p.Security())
    assert default == 0xA80425FB  # containerd's default set
    assert effective(p.Security(capabilities_drop=("ALL",), capabilities_add=("KILL",))) == 1 << 5
    assert effective(p.Security(privileged=True)) > default


def test_stop_sends_sigterm_then_sigkill_after_the_timeout(zone: Zone) -> None:
    stubborn = zone.run(
        "sh", "-c", "trap 'echo got TERM' TERM; echo ready; while true; do sleep 0.1; done"
    )
    polite = zone.run("sh", "-c", "trap 'exit 0' TERM; echo ready; while true; do sleep 0.1; done")
    wait_for_output(stubborn.log_path, b"ready")
    wait_for_output(polite.log_path, b"ready")
    started = time.monotonic()
    info = zone.agent.stop(polite.container_id, timeout_s=10)
    assert (info.state, info.exit_code) == (ContainerState.EXITED, 0)
    assert time.monotonic() - started < 3
    started = time.monotonic()
    info = zone.agent.stop(stubborn.container_id, timeout_s=1)
    assert 1 <= time.monotonic() - started < 5
    assert (info.state, info.exit_code, info.reason) == (ContainerState.EXITED, 137, "Error")
    assert stubborn.log_path is not None and "got TERM" in output(stubborn.log_path)
    assert zone.agent.stop(stubborn.container_id, timeout_s=1).exit_code == 137  # idempotent


def test_exec_sync_output_exit_code_and_timeout(zone: Zone) -> None:
    spec = zone.run("sleep", "60", env=("GREETING=hi",), working_dir="/tmp")
    result = zone.agent.exec_sync(
        spec.container_id, ["sh", "-c", "echo $GREETING; pwd; echo oops >&2; exit 7"], 10
    )
    assert (result.stdout, result.stderr, result.exit_code) == (b"hi\n/tmp\n", b"oops\n", 7)
    assert not result.timed_out
    binary = zone.agent.exec_sync(spec.container_id, ["head", "-c", "256", "/dev/urandom"], 10)
    assert len(binary.stdout) == 256
    started = time.monotonic()
    slow = zone.agent.exec_sync(spec.container_id, ["sleep", "30"], 1)
    assert slow.timed_out and time.monotonic() - started < 5
    with pytest.raises(AgentError) as err:
        zone.agent.exec_sync(spec.container_id, ["/no/such/tool"], 10)
    assert err.value.status == AgentStatus.FAILED and "/no/such/tool" in str(err.value)
    assert zone.agent.status(spec.container_id).state == ContainerState.RUNNING


def test_reopen_log_after_rotation(zone: Zone) -> None:
    spec = zone.run(
        "sh", "-c", "echo one; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo two; sleep 60"
    )
    assert spec.log_path is not None
    wait_for_output(spec.log_path, b"one")
    rotated = spec.log_path.with_suffix(".1")
    spec.log_path.rename(rotated)
    zone.agent.reopen_log(spec.container_id)
    zone.agent.exec_sync(spec.container_id, ["touch", "/tmp/go"], 10)
    wait_for_output(spec.log_path, b"two")
    assert output(rotated) == "one" and output(spec.log_path) == "two"


def test_stats_of_a_running_container(zone: Zone) -> None:
    spec = zone.run(
        "sh", "-c", "dd if=/dev/zero of=/tmp/blob bs=1024 count=2048; echo done; sleep 60"
    )
    wait_for_output(spec.log_path, b"done")
    stats = zone.agent.stats(spec.container_id)
    assert stats.container_id == spec.container_id
    assert stats.cpu_usage_ns > 0 and stats.memory_working_set_bytes > 0
    assert stats.writable_layer_bytes >= 2 << 20 and stats.writable_layer_inodes >= 2


def test_resources_are_applied_and_updated(zone: Zone) -> None:
    spec = zone.run(
        "sleep", "60", resources=p.Resources(memory_limit_bytes=64 << 20, cpu_shares=512)
    )
    cgroup = f"vgpu-zones/{zone.zone_id}/{spec.container_id}"
    memory = Path("/sys/fs/cgroup/memory") / cgroup / "memory.limit_in_bytes"
    if not memory.exists():
        memory = Path("/sys/fs/cgroup") / cgroup / "memory.max"
    assert int(memory.read_text()) == 64 << 20
    zone.agent.update_resources(
        spec.container_id, p.Resources(memory_limit_bytes=32 << 20, oom_score_adj=500)
    )
    assert int(memory.read_text()) == 32 << 20
    result = zone.agent.exec_sync(spec.container_id, ["cat", "/proc/1/oom_score_adj"], 10)
    assert result.stdout == b"500\n"


def test_out_of_memory_is_reported(zone: Zone) -> None:
    spec = zone.run(
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=64M",
        "count=1",
        resources=p.Resources(memory_limit_bytes=16 << 20),
    )
    info = wait_exited(zone.agent, spec.container_id)
    assert (info.exit_code, info.reason) == (137, "OOMKilled")


def test_remove_deletes_everything_of_the_container(
    zone: Zone, backend: ProcessZoneBackend
) -> None:
    spec = zone.run("sleep", "60")
    container_dir = backend.zone_dir(zone.zone_id) / "containers" / spec.container_id
    assert container_dir.is_dir()
    zone.agent.remove(spec.container_id)  # running: killed first
    assert not container_dir.exists()
    assert not (backend.zone_dir(zone.zone_id) / "oci" / spec.container_id).exists()
    assert not processes_in_cgroup(spec.container_id)
    assert not zone.agent.list()


def test_a_created_container_has_no_process_and_stop_or_remove_clean_it_up(
    zone: Zone, backend: ProcessZoneBackend
) -> None:
    kept, removed = zone.spec("sleep", "60"), zone.spec("sleep", "60")
    for spec in (kept, removed):
        info = zone.agent.create(spec)
        assert (info.state, info.pid, info.started_at) == (ContainerState.CREATED, 0, None)
    oci_state = backend.zone_dir(zone.zone_id) / "oci"
    assert not (oci_state / kept.container_id).exists()  # the OCI runtime's create is START's
    assert not processes_in_cgroup(kept.container_id)
    started = time.monotonic()
    info = zone.agent.stop(kept.container_id, timeout_s=10)
    assert time.monotonic() - started < 2 and info.state == ContainerState.EXITED
    with pytest.raises(AgentError) as err:
        zone.agent.start(kept.container_id)
    assert err.value.status == AgentStatus.INVALID
    for spec in (kept, removed):
        zone.agent.remove(spec.container_id)
        assert not (backend.zone_dir(zone.zone_id) / "containers" / spec.container_id).exists()
    assert not zone.agent.list() and not mounts_under(backend.zone_dir(zone.zone_id))


def test_a_container_the_oci_runtime_cannot_run_fails_its_start_and_exits(
    zone: Zone, backend: ProcessZoneBackend
) -> None:
    spec = zone.spec("/bin/absent")
    assert zone.agent.create(spec).state == ContainerState.CREATED
    with pytest.raises(AgentError) as err:
        zone.agent.start(spec.container_id)
    assert err.value.status == AgentStatus.FAILED and "/bin/absent" in str(err.value)
    info = zone.agent.status(spec.container_id)
    assert (info.state, info.exit_code, info.reason, info.pid) == (
        ContainerState.EXITED,
        128,
        "ContainerCannotRun",
        0,
    )
    assert info.message == str(err.value)
    assert info.started_at is not None and info.finished_at is not None
    assert info.created_at <= info.started_at <= info.finished_at
    with pytest.raises(AgentError) as again:
        zone.agent.start(spec.container_id)
    assert again.value.status == AgentStatus.INVALID
    assert zone.agent.stop(spec.container_id, timeout_s=1).reason == "ContainerCannotRun"
    zone.agent.remove(spec.container_id)
    assert not (backend.zone_dir(zone.zone_id) / "containers" / spec.container_id).exists()
    assert not (backend.zone_dir(zone.zone_id) / "oci" / spec.container_id).exists()
    assert not processes_in_cgroup(spec.container_id) and not zone.agent.list()


def test_bad_requests_get_statuses_and_the_agent_keeps_serving(zone: Zone) -> None:
    survivor = zone.run("sleep", "60")
    missing = "f" * 64

    def status_of(call: Callable[[], object]) -> AgentStatus:
        with pytest.raises(AgentError) as err:
            call()
        return err.value.status

    assert status_of(lambda: zone.agent.status(missing)) == AgentStatus.NOT_FOUND
    assert status_of(lambda: zone.agent.start(missing)) == AgentStatus.NOT_FOUND
    assert status_of(lambda: zone.agent.stop(missing, 1)) == AgentStatus.NOT_FOUND
    assert status_of(lambda: zone.agent.remove(missing)) == AgentStatus.NOT_FOUND
    assert status_of(lambda: zone.agent.exec_sync(missing, ["true"], 1)) == AgentStatus.NOT_FOUND
    assert status_of(lambda: zone.agent.stats(missing)) == AgentStatus.NOT_FOUND
    assert status_of(lambda: zone.agent.reopen_log(missing)) == AgentStatus.NOT_FOUND
    duplicate = p.ContainerSpec(
        container_id=survivor.container_id, name="again", rootfs_layers=(zone.layer,), args=("x",)
    )
    assert status_of(lambda: zone.agent.create(duplicate)) == AgentStatus.ALREADY_EXISTS
    assert status_of(lambda: zone.agent.start(survivor.container_id)) == AgentStatus.INVALID
    no_layer = zone.spec("true", rootfs_layers=(zone.layer.parent / "absent",))
    assert status_of(lambda: zone.agent.create(no_layer)) == AgentStatus.INVALID
    bad_cap = zone.spec("true", security=p.Security(capabilities_add=("FLY",)))
    assert status_of(lambda: zone.agent.create(bad_cap)) == AgentStatus.INVALID
    # what the typed client never sends
    assert zone.agent.call_raw(p.AgentOp.CREATE, b"{not json", timeout_s=10)[0] == 2
    assert zone.agent.call_raw(p.AgentOp.STOP, b'{"container_id": 5}', timeout_s=10)[0] == 2
    assert zone.agent.call_raw(p.AgentOp.READY, b"{}", timeout_s=10)[0] == 2
    status, body = zone.agent.call_raw(0x7777, b"\x00\xff", timeout_s=10)
    assert status == AgentStatus.INVALID and b"unknown request opcode" in body
    assert [c.container_id for c in zone.agent.list()] == [survivor.container_id]
    assert zone.agent.status(survivor.container_id).state == ContainerState.RUNNING


def test_concurrent_requests_do_not_wait_for_a_slow_one(zone: Zone) -> None:
    spec = zone.run("sleep", "60")
    slow = threading.Thread(
        target=zone.agent.exec_sync, args=(spec.container_id, ["sleep", "2"], 10)
    )
    slow.start()
    time.sleep(0.2)
    started = time.monotonic()
    for _ in range(20):
        zone.agent.status(spec.container_id)
    assert time.monotonic() - started < 1.5
    slow.join()


# -- networks, GPU ----------------------------------------------------------------------------


def test_pod_network_has_only_loopback_and_node_network_is_the_hosts(
    backend: ProcessZoneBackend, layer: Path, tmp_path: Path
) -> None:
    seen = {}
    for mode in (NetworkMode.POD, NetworkMode.NODE):
        zone_id = new_zone_id()
        backend.boot(ZoneSpec(zone_id=zone_id, network=mode))
        zone = Zone(zone_id, backend.agent(zone_id), layer, tmp_path)
        spec = zone.run("cat", "/proc/net/dev", "/sys/class/net/lo/operstate")
        wait_exited(zone.agent, spec.container_id)
        assert spec.log_path is not None
        seen[mode] = output(spec.log_path)
        backend.stop(zone_id, grace_s=1)
    pod_interfaces = re.findall(r"^\s*(\S+):", seen[NetworkMode.POD], re.M)
    assert pod_interfaces == ["lo"] and seen[NetworkMode.POD].endswith("unknown")  # lo is up
    host_interfaces = set(re.findall(r"^\s*(\S+):", Path("/proc/net/dev").read_text(), re.M))
    assert set(re.findall(r"^\s*(\S+):", seen[NetworkMode.NODE], re.M)) == host_interfaces


def test_gpu_containers_get_the_proxy_socket_and_libvgpu(layer: Path, tmp_path: Path) -> None:
    proxy_path = tmp_path / "proxy.sock"
    proxy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    proxy.bind(str(proxy_path))
    proxy.listen()
    libvgpu = tmp_path / "libvgpu.so"
    libvgpu.write_bytes(b"\x7fELF not really")
    backend = ProcessZoneBackend(tmp_path / "zones", libvgpu=libvgpu)
    try:
        zone_id = new_zone_id()
        gpu = GpuAccess(proxy_socket=proxy_path, memory_limit=1 << 30)
        backend.boot(ZoneSpec(zone_id=zone_id, gpu=gpu))
        zone = Zone(zone_id, backend.agent(zone_id), layer, tmp_path)
        script = (
            "test -S $VGPU_PROXY_SOCKET && echo socket; cat /usr/lib/x86_64-linux-gnu/libcuda.so.1;"
            " echo; touch /usr/lib/x86_64-linux-gnu/libcuda.so 2>/dev/null || echo readonly"
        )
        spec = zone.run("sh", "-c", script, gpu=True)
        wait_exited(zone.agent, spec.container_id)
        assert spec.log_path is not None
        assert output(spec.log_path).split("\n") == ["socket", "\x7fELF not really", "readonly"]
        plain = zone.run("sh", "-c", "test -e /run/vgpu/proxy.sock || echo absent")
        wait_exited(zone.agent, plain.container_id)
        assert plain.log_path is not None and output(plain.log_path) == "absent"
        backend.stop(zone_id, grace_s=1)
    finally:
        backend.close()
        proxy.close()


def test_a_gpu_container_in_a_zone_without_gpu_is_invalid(zone: Zone) -> None:
    with pytest.raises(AgentError) as err:
        zone.agent.create(zone.spec("true", gpu=True))
    assert err.value.status == AgentStatus.INVALID and "gpu-proxy" in str(err.value)


# -- standby agents ---------------------------------------------------------------------------


def standby_processes(root: Path) -> list[int]:
    """unshare and agent of each standby of the backend on ``root`` (by their --standby token)."""
    found: list[int] = []
    if (root / ".standby").is_dir():
        for directory in (root / ".standby").iterdir():
            found += pids.with_argument(f"--standby={directory.name}")
    return found


def ready_standbys(root: Path) -> list[int]:
    """Host pids of the standby agents that wait for a zone."""
    marked = standby_processes(root)
    agents = [pid for pid in marked if (stat := pids.stat(pid)) and stat.ppid in marked]
    ready = []
    for pid in agents:
        with contextlib.suppress(OSError):  # it may be given a zone meanwhile
            if b"standby agent ready" in Path(f"/proc/{pid}/cwd/agent.log").read_bytes():
                ready.append(pid)
    return ready


def ready_standby(root: Path) -> int:
    wait_for("a ready standby agent", lambda: len(ready_standbys(root)) == 1, timeout_s=30)
    return ready_standbys(root)[0]


def test_boots_are_served_by_standby_agents_and_the_pool_refills(
    backend: ProcessZoneBackend, layer: Path, tmp_path: Path
) -> None:
    standby = ready_standby(backend.root)
    assert os.getpriority(os.PRIO_PROCESS, standby) == 19  # it waits on idle CPU
    first, second = new_zone_id(), new_zone_id()
    assert backend.boot(ZoneSpec(zone_id=first, hostname="first")).pid == standby
    backend.boot(ZoneSpec(zone_id=second, hostname="second"))  # while the pool refills
    agents = []
    for zone_id in (first, second):
        zone = Zone(zone_id, backend.agent(zone_id), layer, tmp_path)
        assert zone.agent.ready.zone_id == zone_id and zone.agent.ready.agent_pid == 1
        spec = zone.run("hostname")
        wait_exited(zone.agent, spec.container_id)
        assert spec.log_path is not None and output(spec.log_path) in ("first", "second")
        agent_pid = next(z.pid for z in backend.list() if z.zone_id == zone_id)
        assert agent_pid is not None
        agents.append(agent_pid)
        threads = [int(tid) for tid in os.listdir(f"/proc/{agent_pid}/task")]
        assert {os.getpriority(os.PRIO_PROCESS, tid) for tid in threads} == {os.nice(0)}
        # the standby's directory became the zone's: its working directory followed the rename
        assert Path(os.readlink(f"/proc/{agent_pid}/cwd")) == backend.zone_dir(zone_id)
        agent_log = (backend.zone_dir(zone_id) / "agent.log").read_text()
        assert f'"zone_id": "{zone_id}"' in agent_log
    assert sorted(z.zone_id for z in backend.list()) == sorted((first, second))
    refilled = pids.identify(ready_standby(backend.root))
    assert refilled is not None and refilled.pid not in agents
    backend.close()  # standbys stop, zones run on
    wait_for("the standby to exit", lambda: not pids.alive(refilled))
    assert standby_processes(backend.root) == []
    assert all(Path(f"/proc/{pid}").exists() for pid in agents)


RUNTIME_WITH_STANDBYS = """
import sys, time
from pathlib import Path
from cri_runtime.zones.process import ProcessZoneBackend
backend = ProcessZoneBackend(Path(sys.argv[1]), python=sys.argv[2], standby=2)
print("up", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("hung", [False, True], ids=["agents", "hung"])
def test_standbys_of_a_killed_runtime_are_gone_at_the_next_start(
    tmp_path: Path, hung: bool
) -> None:
    python = sys.executable
    if hung:  # a standby that never reads its stdin does not see its runtime die
        python = str(tmp_path / "hung-python")
        Path(python).write_text(f"#!{sys.executable}\nimport time\ntime.sleep(1000)\n")
        Path(python).chmod(0o755)
    root = tmp_path / "zones"
    runtime = subprocess.Popen(
        [sys.executable, "-c", RUNTIME_WITH_STANDBYS, str(root), python],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).parents[2],
    )
    standbys: list[pids.ProcessIdentity | None] = []
    try:
        assert runtime.stdout is not None
        assert b"up\n" in iter(runtime.stdout.readline, b"")
        # unshare and its agent, twice
        wait_for("the standbys' processes", lambda: len(standby_processes(root)) == 4)
        if not hung:
            wait_for("two ready standbys", lambda: len(ready_standbys(root)) == 2, timeout_s=30)
        standbys += [pids.identify(pid) for pid in standby_processes(root)]
        assert len(standbys) == 4
    finally:
        runtime.kill()
        runtime.wait()
    alive = [s for s in standbys if s is not None and pids.alive(s)]
    try:
        if hung:
            assert len(alive) == 4
        else:  # end of file on their stdin
            wait_for("standbys to exit", lambda: not any(pids.alive(s) for s in alive))
    finally:
        backend = ProcessZoneBackend(root, standby=0)
    try:
        assert not any(pids.alive(s) for s in alive)
        assert list((root / ".standby").iterdir()) == [] and backend.list() == []
    finally:
        backend.close()


@pytest.mark.parametrize("standby", [0, 1], ids=["cold", "standby"])
def test_network_and_hostname_of_cold_and_standby_zones(
    layer: Path, tmp_path: Path, standby: int
) -> None:
    backend = ProcessZoneBackend(tmp_path / "zones", standby=standby)
    host_interfaces = set(re.findall(r"^\s*(\S+):", Path("/proc/net/dev").read_text(), re.M))
    try:
        for mode in (NetworkMode.POD, NetworkMode.NODE):
            expected = ready_standby(backend.root) if standby else None
            zone_id = new_zone_id()
            info = backend.boot(ZoneSpec(zone_id=zone_id, network=mode, hostname=f"h-{mode}"))
            assert info.pid is not None and (expected is None or info.pid == expected)
            own_network = os.readlink(f"/proc/{info.pid}/ns/net") != os.readlink(
                "/proc/self/ns/net"
            )
            assert own_network == (mode == NetworkMode.POD)
            zone = Zone(zone_id, backend.agent(zone_id), layer, tmp_path)
            spec = zone.run("sh", "-c", "hostname; cat /proc/net/dev /sys/class/net/lo/operstate")
            wait_exited(zone.agent, spec.container_id)
            assert spec.log_path is not None
            seen = output(spec.log_path)
            assert seen.startswith(f"h-{mode}\n") and seen.endswith("unknown")  # lo is up
            interfaces = set(re.findall(r"^\s*(\S+):", seen, re.M))
            assert interfaces == ({"lo"} if mode == NetworkMode.POD else host_interfaces)
            backend.stop(zone_id, grace_s=0)
    finally:
        backend.close()
        cleanup = ProcessZoneBackend(tmp_path / "zones", standby=0)
        for leftover in cleanup.list():
            cleanup.stop(leftover.zone_id, grace_s=0)
        cleanup.close()


# -- restarts, deaths, cleanup ----------------------------------------------------------------


def test_containers_survive_a_runtime_restart(layer: Path, tmp_path: Path) -> None:
    root = tmp_path / "zones"
    first = ProcessZoneBackend(root)
    zone_id = new_zone_id()
    try:
        first.boot(ZoneSpec(zone_id=zone_id))
        zone = Zone(zone_id, first.agent(zone_id), layer, tmp_path)
        spec = zone.run("sleep", "60")
    finally:
        first.close()
    second = ProcessZoneBackend(root)
    try:
        assert [(z.zone_id, z.state) for z in second.list()] == [(zone_id, ZoneState.RUNNING)]
        agent = second.agent(zone_id)
        assert [(c.container_id, c.state) for c in agent.ready.containers] == [
            (spec.container_id, ContainerState.RUNNING)
        ]
        assert [c.container_id for c in agent.list()] == [spec.container_id]
        result = agent.exec_sync(spec.container_id, ["echo", "still here"], 10)
        assert result.stdout == b"still here\n"
        second.stop(zone_id, grace_s=1)
        assert second.list() == []
    finally:
        second.close()


RUNTIME_THEN_HANG = """
import sys, time
from pathlib import Path
from cri_runtime.agent import protocol as p
from cri_runtime.zones.base import ZoneSpec
from cri_runtime.zones.process import ProcessZoneBackend
root, zone_id, layer, cid = sys.argv[1:]
backend = ProcessZoneBackend(Path(root))
backend.boot(ZoneSpec(zone_id=zone_id))
agent = backend.agent(zone_id)
agent.create(
    p.ContainerSpec(container_id=cid, name="c", rootfs_layers=(Path(layer),), args=("sleep", "60"))
)
agent.start(cid)
print("up", flush=True)
time.sleep(600)
"""


def test_containers_survive_a_killed_runtime(layer: Path, tmp_path: Path) -> None:
    root, zone_id, cid = tmp_path / "zones", new_zone_id(), secrets.token_hex(32)
    runtime = subprocess.Popen(
        [sys.executable, "-c", RUNTIME_THEN_HANG, str(root), zone_id, str(layer), cid],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert runtime.stdout is not None
        assert b"up\n" in iter(runtime.stdout.readline, b"")  # after the backend's log lines
    finally:
        runtime.kill()  # no goodbye on the channel: the agent notices the socket hang up
        runtime.wait()
    backend = ProcessZoneBackend(root)
    try:
        agent = backend.agent(zone_id)
        assert [c.container_id for c in agent.list()] == [cid]
        assert agent.status(cid).state == ContainerState.RUNNING
        backend.stop(zone_id, grace_s=0)
        assert backend.list() == [] and not processes_in_cgroup(zone_id)
    finally:
        backend.close()


def test_sigterm_to_the_agent_stops_its_containers_and_the_zone(
    backend: ProcessZoneBackend, zone: Zone
) -> None:
    spec = zone.run(
        "sh", "-c", "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done"
    )
    wait_for_output(spec.log_path, b"ready")
    agent_pid = backend.list()[0].pid
    assert agent_pid is not None
    os.kill(agent_pid, signal.SIGTERM)  # as pid 1 of its namespace it gets only handled signals
    wait_for("the zone to exit", lambda: backend.list()[0].state == ZoneState.EXITED)
    assert spec.log_path is not None and "bye" in output(spec.log_path)
    backend.stop(zone.zone_id, grace_s=0)
    assert backend.list() == []


def test_one_backend_per_root(tmp_path: Path) -> None:
    backend = ProcessZoneBackend(tmp_path / "zones")
    try:
        with pytest.raises(ZoneError, match="another process zone backend"):
            ProcessZoneBackend(tmp_path / "zones")
    finally:
        backend.close()


def test_a_killed_agent_means_an_exited_zone_and_stop_leaves_nothing(
    backend: ProcessZoneBackend, zone: Zone, tmp_path: Path
) -> None:
    spec = zone.run("sleep", "60")
    agent_pid = next(z.pid for z in backend.list() if z.zone_id == zone.zone_id)
    assert agent_pid is not None and processes_in_cgroup(spec.container_id)
    os.kill(agent_pid, signal.SIGKILL)
    wait_for(
        "the zone to exit",
        lambda: [z.state for z in backend.list()] == [ZoneState.EXITED],
    )
    with pytest.raises(ZoneError, match="not running"):
        backend.agent(zone.zone_id)
    backend.stop(zone.zone_id, grace_s=1)
    assert not backend.zone_dir(zone.zone_id).exists() and backend.list() == []
    assert not processes_in_cgroup(zone.zone_id)
    assert not mounts_under(tmp_path)
    assert not any(Path("/sys/fs/cgroup").glob(f"*/vgpu-zones/{zone.zone_id}"))
    assert not Path(f"/proc/{agent_pid}").exists()
    backend.stop(zone.zone_id, grace_s=1)  # idempotent
    backend.stop("never-booted", grace_s=1)


def test_stop_shuts_containers_down_gracefully_and_cleans_up(
    backend: ProcessZoneBackend, zone: Zone, tmp_path: Path
) -> None:
    spec = zone.run(
        "sh", "-c", "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done"
    )
    wait_for_output(spec.log_path, b"ready")
    backend.stop(zone.zone_id, grace_s=5)
    assert spec.log_path is not None and "bye" in output(spec.log_path)
    assert not backend.zone_dir(zone.zone_id).exists() and backend.list() == []
    assert not processes_in_cgroup(zone.zone_id) and not mounts_under(tmp_path)
    assert not any(Path("/sys/fs/cgroup").glob(f"*/vgpu-zones/{zone.zone_id}"))
    with pytest.raises(ZoneError, match="not running"):
        backend.agent(zone.zone_id)


def test_two_zones_at_once(backend: ProcessZoneBackend, layer: Path, tmp_path: Path) -> None:
    zones = []
    for name in ("alpha", "beta"):
        zone_id = new_zone_id()
        backend.boot(ZoneSpec(zone_id=zone_id, hostname=name))
        zones.append(Zone(zone_id, backend.agent(zone_id), layer, tmp_path))
    specs = [z.run("sleep", "60") for z in zones]
    for zone, spec, name in zip(zones, specs, ("alpha", "beta"), strict=True):
        assert [c.container_id for c in zone.agent.list()] == [spec.container_id]
        result = zone.agent.exec_sync(spec.container_id, ["hostname"], 10)
        assert result.stdout == f"{name}\n".encode()
    backend.stop(zones[0].zone_id, grace_s=0)
    assert [z.zone_id for z in backend.list()] == [zones[1].zone_id]
    assert zones[1].agent.status(specs[1].container_id).state == ContainerState.RUNNING


def test_a_relayed_log_reaches_the_host_file_whole(zone: Zone, tmp_path: Path) -> None:
    """Xen zones' logs: the agent buffers (log_relay), the runtime's LogRelay pulls. More output
    than the agent's buffer holds, partial lines, both streams, and the tail after the exit."""
    size = LOG_BUFFER_BYTES + (1 << 20)
    script = f"echo first; echo oops >&2; head -c {size} /dev/zero | tr '\\0' a; echo; printf end"
    spec = zone.spec("sh", "-c", script, log_relay=True, log_path=None)
    host_log = tmp_path / "relayed.log"
    relay = LogRelay(tmp_path / "offsets", lambda _: zone.agent, lambda _: True, interval_s=0.05)
    relay.track(spec.container_id, zone.zone_id, host_log)
    try:
        zone.agent.create(spec)
        zone.agent.start(spec.container_id)
        info = wait_exited(zone.agent, spec.container_id)
        assert relay.drain(spec.container_id, timeout_s=30)
    finally:
        relay.close()
    assert info.exit_code == 0
    entries = log_entries(host_log)
    # the two streams are separate pipes: which of their first lines the agent reads first is
    # the scheduler's choice, as with any CRI runtime
    assert set(entries[:2]) == {("stdout", "F", b"first"), ("stderr", "F", b"oops")}
    assert entries[-1] == ("stdout", "F", b"end")
    big = [e for e in entries if e[2][:1] == b"a"]
    assert b"".join(e[2] for e in big) == b"a" * size
    assert {tag for _, tag, _ in big[:-1]} == {"P"} and big[-1][1] == "F"
    # the file the agent writes for unrelayed containers is not made
    assert list(zone.logs.iterdir()) == []
    other = zone.run("true")
    with pytest.raises(AgentError, match="not relayed"):
        zone.agent.read_log(other.container_id, None)
