"""CRI conformance: the pod and container lifecycle kubelet drives, over the real socket."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime
from pathlib import Path

import grpc
import pytest

from cri_runtime.client import CriClient, container_config, pod_config
from cri_runtime.cri.gen import api_pb2

LOG_LINE = re.compile(r"^(\S+) (stdout|stderr) (F|P) (.*)$")


def rpc_error(call: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


def test_version_and_status(cri: CriClient) -> None:
    version = cri.runtime.Version(api_pb2.VersionRequest(version="v1"))
    assert version.runtime_name == "vgpu-runtime" and version.runtime_api_version == "v1"
    status = cri.runtime.Status(api_pb2.StatusRequest(verbose=True))
    conditions = {c.type: c.status for c in status.status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}
    assert {h.name for h in status.runtime_handlers} >= {"", "vgpu-isolated"}
    assert "process" in status.info["config"]
    cfg = cri.runtime.RuntimeConfig(api_pb2.RuntimeConfigRequest())
    assert cfg.linux.cgroup_driver == api_pb2.CGROUPFS


def test_pod_and_container_lifecycle(cri: CriClient, image: str, tmp_path: Path) -> None:
    logs = tmp_path / "pods" / "life"
    pod_cfg = pod_config(
        "life", log_directory=logs, labels={"app": "life"}, annotations={"note": "kept"}
    )
    pod = cri.run_pod(pod_cfg)
    status = cri.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod))
    assert status.status.state == api_pb2.SANDBOX_READY
    assert status.status.metadata.name == "life" and status.status.labels["app"] == "life"
    assert status.status.annotations["note"] == "kept"
    assert status.status.linux.namespaces.options.network == api_pb2.POD

    config = container_config(
        "echo",
        image,
        ["sh", "-c", "echo out-line; echo err-line >&2; printf partial; exit 3"],
        log_path="echo/0.log",
        labels={"tier": "x"},
    )
    before = time.time_ns()
    cid = cri.create(pod, config, pod_cfg)
    created = cri.status(cid)
    assert created.state == api_pb2.CONTAINER_CREATED and created.created_at >= before
    cri.start(cid)
    done = cri.wait_exit(cid)
    assert done.state == api_pb2.CONTAINER_EXITED
    assert done.exit_code == 3 and done.reason == "Error"
    assert done.created_at <= done.started_at <= done.finished_at
    assert done.labels["tier"] == "x" and done.image.image == image
    assert done.log_path == str(logs / "echo/0.log")

    lines = [LOG_LINE.match(line) for line in (logs / "echo/0.log").read_text().splitlines()]
    assert all(lines), lines
    parsed = [(m.group(2), m.group(3), m.group(4)) for m in lines if m]
    assert ("stdout", "F", "out-line") in parsed and ("stderr", "F", "err-line") in parsed
    assert ("stdout", "F", "partial") in parsed  # an unterminated last line, as containerd

    listed = cri.runtime.ListContainers(
        api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(
                pod_sandbox_id=pod,
                state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_EXITED),
                label_selector={"tier": "x"},
            )
        )
    ).containers
    assert [c.id for c in listed] == [cid]
    none = cri.runtime.ListContainers(
        api_pb2.ListContainersRequest(
            filter=api_pb2.ContainerFilter(label_selector={"tier": "other"})
        )
    ).containers
    assert cid not in [c.id for c in none]

    cri.stop_pod(pod)
    stopped = cri.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod))
    assert stopped.status.state == api_pb2.SANDBOX_NOTREADY
    cri.stop_pod(pod)  # idempotent
    cri.remove_pod(pod)
    err = rpc_error(
        cri.runtime.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(cri.status, cid)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    cri.remove_pod(pod)  # idempotent


def test_environment_workdir_and_args(cri: CriClient, image: str, tmp_path: Path) -> None:
    pod_cfg = pod_config("envpod", log_directory=tmp_path)
    pod = cri.run_pod(pod_cfg)
    config = container_config(
        "env",
        image,
        ["sh", "-c"],
        args=['echo "$GREETING $0 $(pwd) $(hostname)"', "arg0"],
        env={"GREETING": "hello"},
        log_path="env.log",
    )
    config.working_dir = "/tmp"
    cid = cri.create(pod, config, pod_cfg)
    cri.start(cid)
    assert cri.wait_exit(cid).exit_code == 0
    assert "stdout F hello arg0 /tmp envpod" in (tmp_path / "env.log").read_text()
    cri.remove_pod(pod)


def test_stop_container_escalates_to_kill(cri: CriClient, image: str, tmp_path: Path) -> None:
    pod_cfg = pod_config("stubborn", log_directory=tmp_path)
    pod = cri.run_pod(pod_cfg)
    config = container_config(
        "trap", image, ["sh", "-c", "trap 'echo got-term' TERM; while true; do sleep 0.1; done"]
    )
    cid = cri.create(pod, config, pod_cfg)
    cri.start(cid)
    assert cri.status(cid).state == api_pb2.CONTAINER_RUNNING
    started = time.monotonic()
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1))
    took = time.monotonic() - started
    status = cri.status(cid)
    assert status.state == api_pb2.CONTAINER_EXITED and status.exit_code == 137
    assert took >= 0.9  # waited for the grace period before SIGKILL
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=1))
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id="0" * 64, timeout=1))
    cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid))
    cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid))
    assert rpc_error(cri.status, cid).code() == grpc.StatusCode.NOT_FOUND
    cri.remove_pod(pod)


def test_exec_sync(cri: CriClient, image: str) -> None:
    pod_cfg = pod_config("execpod")
    pod = cri.run_pod(pod_cfg)
    cid = cri.create(pod, container_config("sleeper", image, ["sleep", "300"]), pod_cfg)
    err = rpc_error(
        cri.runtime.ExecSync, api_pb2.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=5)
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # not started yet
    cri.start(cid)
    reply = cri.runtime.ExecSync(
        api_pb2.ExecSyncRequest(
            container_id=cid, cmd=["sh", "-c", "echo to-out; echo to-err >&2; exit 7"], timeout=10
        )
    )
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"to-out\n", b"to-err\n", 7)
    err = rpc_error(
        cri.runtime.ExecSync,
        api_pb2.ExecSyncRequest(container_id=cid, cmd=["sleep", "30"], timeout=1),
    )
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cri.status(cid).state == api_pb2.CONTAINER_RUNNING
    cri.remove_pod(pod)


def test_stats_and_resources(cri: CriClient, image: str) -> None:
    pod_cfg = pod_config("statpod")
    pod = cri.run_pod(pod_cfg)
    busy = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo x > /data; sleep 300"
    cid = cri.create(pod, container_config("busy", image, ["sh", "-c", busy]), pod_cfg)
    cri.start(cid)
    time.sleep(1.0)
    stats = cri.runtime.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid)).stats
    assert stats.attributes.id == cid
    assert stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory.working_set_bytes.value > 0
    assert stats.writable_layer.used_bytes.value > 0
    listed = cri.runtime.ListContainerStats(
        api_pb2.ListContainerStatsRequest(filter=api_pb2.ContainerStatsFilter(pod_sandbox_id=pod))
    ).stats
    assert [s.attributes.id for s in listed] == [cid]
    pod_stats = cri.runtime.PodSandboxStats(
        api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod)
    ).stats
    assert pod_stats.attributes.id == pod
    assert [c.attributes.id for c in pod_stats.linux.containers] == [cid]
    assert pod_stats.linux.cpu.usage_core_nano_seconds.value > 0
    all_pods = cri.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest()).stats
    assert pod in [s.attributes.id for s in all_pods]
    cri.runtime.UpdateContainerResources(
        api_pb2.UpdateContainerResourcesRequest(
            container_id=cid,
            linux=api_pb2.LinuxContainerResources(memory_limit_in_bytes=256 << 20),
        )
    )
    cri.remove_pod(pod)


def test_reopen_container_log(cri: CriClient, image: str, tmp_path: Path) -> None:
    pod_cfg = pod_config("logpod", log_directory=tmp_path)
    pod = cri.run_pod(pod_cfg)
    ticker = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.05; done"
    cid = cri.create(
        pod, container_config("ticker", image, ["sh", "-c", ticker], log_path="t.log"), pod_cfg
    )
    cri.start(cid)
    log = tmp_path / "t.log"
    deadline = time.monotonic() + 10
    while "tick-2" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    log.rename(tmp_path / "t.log.1")
    cri.runtime.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid))
    deadline = time.monotonic() + 10
    while not (log.exists() and "tick-" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "stdout F tick-" in log.read_text()
    first = {line.split()[-1] for line in (tmp_path / "t.log.1").read_text().splitlines()}
    second = {line.split()[-1] for line in log.read_text().splitlines()}
    assert first and second and not first & second  # nothing written twice
    cri.remove_pod(pod)


def test_labels_and_annotations_round_trip(cri: CriClient, image: str) -> None:
    labels = {"app.kubernetes.io/name": "rt", "empty": ""}
    annotations = {"a/b": "c=d", "json": '{"k": [1, 2]}'}
    pod_cfg = pod_config("labels", labels=labels, annotations=annotations)
    pod = cri.run_pod(pod_cfg)
    items = cri.runtime.ListPodSandbox(
        api_pb2.ListPodSandboxRequest(
            filter=api_pb2.PodSandboxFilter(label_selector={"app.kubernetes.io/name": "rt"})
        )
    ).items
    assert [i.id for i in items] == [pod]
    assert dict(items[0].labels) == labels and dict(items[0].annotations) == annotations
    config = container_config("c", image, ["true"], labels=labels)
    config.annotations.update(annotations)
    cid = cri.create(pod, config, pod_cfg)
    status = cri.status(cid)
    assert dict(status.labels) == labels and dict(status.annotations) == annotations
    ready = cri.runtime.ListPodSandbox(
        api_pb2.ListPodSandboxRequest(
            filter=api_pb2.PodSandboxFilter(
                id=pod[:12], state=api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_READY)
            )
        )
    ).items
    assert [i.id for i in ready] == [pod]
    cri.remove_pod(pod)


def test_stops_of_one_pods_containers_overlap(cri: CriClient, image: str, tmp_path: Path) -> None:
    """kubelet stops a pod's containers in parallel: each gets its SIGTERM at once, not after
    the previous one's grace period ran out (the pod lock is not held across the grace)."""
    pod_cfg = pod_config("parallel", log_directory=tmp_path)
    pod = cri.run_pod(pod_cfg)
    trap = "trap 'echo got-term' TERM; while true; do sleep 0.1; done"
    ids = []
    for name in ("a", "b"):
        cid = cri.create(
            pod, container_config(name, image, ["sh", "-c", trap], log_path=f"{name}.log"), pod_cfg
        )
        cri.start(cid)
        ids.append(cid)
    stoppers = [
        threading.Thread(
            target=cri.runtime.StopContainer,
            args=(api_pb2.StopContainerRequest(container_id=cid, timeout=2),),
        )
        for cid in ids
    ]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join(30)
    first_kill = min(cri.status(cid).finished_at for cid in ids)
    for name in ("a", "b"):
        stamp = next(
            line.split()[0]
            for line in (tmp_path / f"{name}.log").read_text().splitlines()
            if line.endswith("got-term")
        )
        got_term = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        # both were told before either was killed
        assert got_term.timestamp() * 1e9 < first_kill, name
    cri.remove_pod(pod)
