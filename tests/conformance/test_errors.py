"""CRI conformance: bad requests get InvalidArgument/NotFound/AlreadyExists/FailedPrecondition
with messages that say what is wrong, and the runtime keeps serving."""

from __future__ import annotations

import grpc
import pytest

from cri_runtime.client import CriClient, container_config, pod_config
from cri_runtime.cri.gen import api_pb2


def code_and_message(call: object, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request)  # type: ignore[operator]
    return info.value.code(), info.value.details() or ""


def test_bad_sandbox_configs(cri: CriClient) -> None:
    no_meta = api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig())
    code, msg = code_and_message(cri.runtime.RunPodSandbox, no_meta)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in msg
    unknown = api_pb2.RunPodSandboxRequest(config=pod_config("h"), runtime_handler="kata")
    code, msg = code_and_message(cri.runtime.RunPodSandbox, unknown)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "kata" in msg
    bad_timeout = pod_config("t", annotations={"vgpu-isolated.io/zone-boot-timeout": "soon"})
    code, msg = code_and_message(
        cri.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=bad_timeout)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "zone-boot-timeout" in msg


def test_duplicate_names(cri: CriClient, image: str) -> None:
    cfg = pod_config("dup")
    pod = cri.run_pod(cfg)
    code, msg = code_and_message(
        cri.runtime.RunPodSandbox, api_pb2.RunPodSandboxRequest(config=cfg)
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and pod in msg
    cri.create(pod, container_config("same", image, ["true"]), cfg)
    request = api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod, config=container_config("same", image, ["true"]), sandbox_config=cfg
    )
    code, msg = code_and_message(cri.runtime.CreateContainer, request)
    assert code == grpc.StatusCode.ALREADY_EXISTS and "same" in msg
    cri.remove_pod(pod)


def test_missing_objects(cri: CriClient, image: str) -> None:
    missing = "f" * 64
    request = api_pb2.CreateContainerRequest(
        pod_sandbox_id=missing, config=container_config("c", image, ["true"])
    )
    code, msg = code_and_message(cri.runtime.CreateContainer, request)
    assert code == grpc.StatusCode.NOT_FOUND and missing in msg
    for call, req in [
        (cri.runtime.StartContainer, api_pb2.StartContainerRequest(container_id=missing)),
        (cri.runtime.ContainerStatus, api_pb2.ContainerStatusRequest(container_id=missing)),
        (cri.runtime.PodSandboxStatus, api_pb2.PodSandboxStatusRequest(pod_sandbox_id=missing)),
        (cri.runtime.ContainerStats, api_pb2.ContainerStatsRequest(container_id=missing)),
        (cri.runtime.ExecSync, api_pb2.ExecSyncRequest(container_id=missing, cmd=["true"])),
    ]:
        assert code_and_message(call, req)[0] == grpc.StatusCode.NOT_FOUND
    # idempotent stop/remove of unknown ids
    cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=missing))
    cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=missing))
    cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=missing))
    cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=missing))


def test_bad_container_configs(cri: CriClient, image: str) -> None:
    cfg = pod_config("badc")
    pod = cri.run_pod(cfg)

    def create(config: api_pb2.ContainerConfig) -> tuple[grpc.StatusCode, str]:
        req = api_pb2.CreateContainerRequest(pod_sandbox_id=pod, config=config, sandbox_config=cfg)
        return code_and_message(cri.runtime.CreateContainer, req)

    code, msg = create(container_config("", image, ["true"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "name" in msg
    code, msg = create(container_config("noimage", "", ["true"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image" in msg
    code, msg = create(container_config("absent", "127.0.0.1:1/none/such:1", ["true"]))
    assert code == grpc.StatusCode.NOT_FOUND and "pull it first" in msg
    rel = container_config("mnt", image, ["true"])
    rel.mounts.append(api_pb2.Mount(container_path="data", host_path="/tmp"))
    code, msg = create(rel)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "data" in msg
    gone = container_config("mnt2", image, ["true"])
    gone.mounts.append(api_pb2.Mount(container_path="/data", host_path="/no/such/dir"))
    code, msg = create(gone)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "/no/such/dir" in msg
    env = container_config("env", image, ["true"], env={"A=B": "x"})
    assert create(env)[0] == grpc.StatusCode.INVALID_ARGUMENT
    started = cri.create(pod, container_config("twice", image, ["sleep", "60"]), cfg)
    cri.start(started)
    code, msg = code_and_message(
        cri.runtime.StartContainer, api_pb2.StartContainerRequest(container_id=started)
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "running" in msg
    cri.remove_pod(pod)


def test_a_container_the_oci_runtime_cannot_run(cri: CriClient, image: str) -> None:
    cfg = pod_config("cannotrun")
    pod = cri.run_pod(cfg)
    cid = cri.create(pod, container_config("absent", image, ["/bin/absent"]), cfg)
    assert cri.status(cid).state == api_pb2.CONTAINER_CREATED  # runc is run by StartContainer
    code, msg = code_and_message(
        cri.runtime.StartContainer, api_pb2.StartContainerRequest(container_id=cid)
    )
    assert code == grpc.StatusCode.UNKNOWN and "/bin/absent" in msg
    status = cri.status(cid)
    assert status.state == api_pb2.CONTAINER_EXITED and status.exit_code == 128
    assert status.reason == "ContainerCannotRun" and "/bin/absent" in status.message
    never = cri.create(pod, container_config("never", image, ["sleep", "60"]), cfg)
    for container in (cid, never):
        cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container))
        code, _ = code_and_message(
            cri.runtime.ContainerStatus, api_pb2.ContainerStatusRequest(container_id=container)
        )
        assert code == grpc.StatusCode.NOT_FOUND
    cri.remove_pod(pod)


def test_container_in_stopped_sandbox(cri: CriClient, image: str) -> None:
    cfg = pod_config("stopped")
    pod = cri.run_pod(cfg)
    cri.stop_pod(pod)
    req = api_pb2.CreateContainerRequest(
        pod_sandbox_id=pod, config=container_config("late", image, ["true"]), sandbox_config=cfg
    )
    code, msg = code_and_message(cri.runtime.CreateContainer, req)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not ready" in msg
    cri.remove_pod(pod)


def test_streaming_calls_say_unimplemented(cri: CriClient) -> None:
    code, msg = code_and_message(
        cri.runtime.Exec, api_pb2.ExecRequest(container_id="x", cmd=["sh"])
    )
    assert code == grpc.StatusCode.UNIMPLEMENTED and "ExecSync" in msg
