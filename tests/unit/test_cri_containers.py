"""How CRI container configs and image configs combine into the agent's ContainerSpec."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from cri_runtime.containers import (
    container_spec,
    parse_signal,
    resolve_args,
    resolve_env,
    resolve_stop_signal,
    resolve_user,
)
from cri_runtime.cri.gen import api_pb2
from cri_runtime.errors import InvalidArgument
from cri_runtime.images.store import ImageConfig

IMAGE = ImageConfig(
    entrypoint=("/entry",), cmd=("default",), env=("PATH=/bin", "A=image"), user="1000:1000"
)


def config(**kw: object) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="c"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ([], [], ("/entry", "default")),  # image ENTRYPOINT + CMD
        ([], ["x"], ("/entry", "x")),  # args replace CMD only
        (["/bin/sh"], [], ("/bin/sh",)),  # command replaces ENTRYPOINT and drops CMD
        (["/bin/sh"], ["-c", "true"], ("/bin/sh", "-c", "true")),
    ],
)
def test_args_follow_kubernetes_rules(
    command: list[str], args: list[str], expected: tuple[str, ...]
) -> None:
    assert resolve_args(config(command=command, args=args), IMAGE) == expected


def test_no_command_at_all_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="no command"):
        resolve_args(config(), ImageConfig())


def test_env_overrides_image_by_name_and_rejects_bad_names() -> None:
    env = resolve_env(config(envs=[api_pb2.KeyValue(key="A", value="pod")]), IMAGE)
    assert env == ("PATH=/bin", "A=pod")
    with pytest.raises(InvalidArgument):
        resolve_env(config(envs=[api_pb2.KeyValue(key="", value="x")]), IMAGE)


def test_user_from_security_context_wins_over_image() -> None:
    sc = api_pb2.LinuxContainerSecurityContext
    assert resolve_user(sc(), IMAGE).uid == 1000 and resolve_user(sc(), IMAGE).gid == 1000
    explicit = resolve_user(
        sc(run_as_user=api_pb2.Int64Value(value=0), supplemental_groups=[5]), IMAGE
    )
    assert (explicit.uid, explicit.gid, explicit.supplemental_groups) == (0, None, (5,))
    named = resolve_user(sc(run_as_username="nobody"), IMAGE)
    assert (named.uid, named.username) == (None, "nobody")
    assert resolve_user(sc(), ImageConfig(user="daemon")).username == "daemon"


def test_full_spec(tmp_path: Path) -> None:
    cfg = config(
        image=api_pb2.ImageSpec(image="busybox"),
        command=["sleep", "1"],
        working_dir="/w",
        mounts=[api_pb2.Mount(container_path="/data", host_path=str(tmp_path), readonly=True,
                              propagation=api_pb2.PROPAGATION_HOST_TO_CONTAINER)],
        linux=api_pb2.LinuxContainerConfig(
            resources=api_pb2.LinuxContainerResources(cpu_quota=50000, cpu_period=100000,
                                                      memory_limit_in_bytes=1 << 28),
            security_context=api_pb2.LinuxContainerSecurityContext(
                readonly_rootfs=True, capabilities=api_pb2.Capability(drop_capabilities=["ALL"])
            ),
        ),
        annotations={"k": "v"},
    )  # fmt: skip
    spec = container_spec(
        "a" * 64, cfg, IMAGE, [tmp_path], hostname="h", log_path=tmp_path / "l", gpu=True
    )
    assert spec.args == ("sleep", "1") and spec.working_dir == "/w" and spec.hostname == "h"
    assert spec.mounts[0].readonly and spec.mounts[0].propagation == "rslave"
    assert spec.resources.cpu_quota == 50000 and spec.resources.memory_limit_bytes == 1 << 28
    assert spec.security.readonly_rootfs and spec.security.capabilities_drop == ("ALL",)
    assert spec.security.masked_paths is None  # the agent's defaults apply
    assert spec.gpu and spec.annotations == {"k": "v"} and spec.rootfs_layers == (tmp_path,)


def test_stop_signal_from_pod_then_image_then_default() -> None:
    assert resolve_stop_signal(config(), ImageConfig()) == signal.SIGTERM
    assert resolve_stop_signal(config(), ImageConfig(stop_signal="SIGQUIT")) == signal.SIGQUIT
    assert resolve_stop_signal(config(stop_signal=api_pb2.SIGUSR1), IMAGE) == signal.SIGUSR1
    assert parse_signal("quit") == parse_signal("3") == signal.SIGQUIT
    assert parse_signal("SIGRTMINPLUS2") == signal.SIGRTMIN + 2
    assert parse_signal("SIGRTMAXMINUS1") == signal.SIGRTMAX - 1
    with pytest.raises(InvalidArgument, match="NOPE"):
        parse_signal("NOPE")
