"""How a CRI ContainerConfig plus its image becomes the agent's ContainerSpec.

Kubernetes semantics: `command` replaces the image's ENTRYPOINT (and then the image's CMD is
dropped), `args` replaces CMD; env from the config overrides the image's by name; the security
context's user wins over the image's USER. Pure functions, so the rules are unit-tested without
a zone.
"""

from __future__ import annotations

import signal
from pathlib import Path

from cri_runtime.agent import protocol as p
from cri_runtime.cri.gen import api_pb2
from cri_runtime.errors import InvalidArgument
from cri_runtime.images.store import ImageConfig

_PROPAGATION = {
    api_pb2.PROPAGATION_PRIVATE: "private",
    api_pb2.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    api_pb2.PROPAGATION_BIDIRECTIONAL: "rshared",
}


def resolve_args(config: api_pb2.ContainerConfig, image: ImageConfig) -> tuple[str, ...]:
    if config.command:
        args = [*config.command, *config.args]
    else:
        args = [*image.entrypoint, *(config.args or image.cmd)]
    if not args:
        raise InvalidArgument(
            f"container {config.metadata.name!r}: no command to run "
            "(the image has no ENTRYPOINT/CMD and the config gives none)"
        )
    return tuple(args)


def resolve_env(config: api_pb2.ContainerConfig, image: ImageConfig) -> tuple[str, ...]:
    env: dict[str, str] = {}
    for item in image.env:
        key, _, value = item.partition("=")
        env[key] = value
    for kv in config.envs:
        if not kv.key or "=" in kv.key:
            raise InvalidArgument(f"environment variable name {kv.key!r} is invalid")
        env[kv.key] = kv.value
    return tuple(f"{k}={v}" for k, v in env.items())


def resolve_user(sc: api_pb2.LinuxContainerSecurityContext, image: ImageConfig) -> p.User:
    groups = tuple(sc.supplemental_groups)
    gid = sc.run_as_group.value if sc.HasField("run_as_group") else None
    if sc.HasField("run_as_user"):
        return p.User(uid=sc.run_as_user.value, gid=gid, supplemental_groups=groups)
    if sc.run_as_username:
        return p.User(username=sc.run_as_username, gid=gid, supplemental_groups=groups)
    name, _, group = image.user.partition(":")
    if group.isdigit() and gid is None:
        gid = int(group)
    if name.isdigit():
        return p.User(uid=int(name), gid=gid, supplemental_groups=groups)
    return p.User(username=name, gid=gid, supplemental_groups=groups)


def parse_signal(name: str) -> int:
    """A signal given as "SIGQUIT", "QUIT", "3" or CRI's "SIGRTMINPLUS2"/"SIGRTMAXMINUS1"."""
    text = name.strip().upper()
    if text.isdigit() and 1 <= int(text) <= signal.SIGRTMAX:
        return int(text)
    text = text if text.startswith("SIG") else f"SIG{text}"
    for base, sign, rt in (
        ("SIGRTMINPLUS", 1, signal.SIGRTMIN),
        ("SIGRTMAXMINUS", -1, signal.SIGRTMAX),
    ):
        if text.startswith(base) and text[len(base) :].isdigit():
            return int(rt) + sign * int(text[len(base) :])
    try:
        return int(signal.Signals[text])
    except KeyError:
        raise InvalidArgument(f"unknown stop signal {name!r}") from None


def resolve_stop_signal(config: api_pb2.ContainerConfig, image: ImageConfig) -> int:
    """The pod's stopSignal, else the image's STOPSIGNAL, else SIGTERM."""
    if config.stop_signal != api_pb2.RUNTIME_DEFAULT:
        return parse_signal(api_pb2.Signal.Name(config.stop_signal))
    return parse_signal(image.stop_signal) if image.stop_signal else int(signal.SIGTERM)


def resolve_mounts(config: api_pb2.ContainerConfig) -> tuple[p.Mount, ...]:
    mounts = []
    for m in config.mounts:
        if not m.container_path.startswith("/"):
            raise InvalidArgument(f"mount container_path {m.container_path!r} is not absolute")
        if not m.host_path.startswith("/"):
            raise InvalidArgument(f"mount host_path {m.host_path!r} is not absolute")
        if not Path(m.host_path).exists():
            raise InvalidArgument(f"mount host_path {m.host_path!r} does not exist")
        mounts.append(
            p.Mount(
                host_path=Path(m.host_path),
                container_path=m.container_path,
                readonly=m.readonly,
                propagation=_PROPAGATION.get(m.propagation, "private"),
            )
        )
    return tuple(mounts)


def container_spec(
    container_id: str,
    config: api_pb2.ContainerConfig,
    image: ImageConfig,
    layers: list[Path],
    *,
    hostname: str,
    log_path: Path | None,
    gpu: bool,
) -> p.ContainerSpec:
    linux = config.linux
    sc = linux.security_context
    return p.ContainerSpec(
        container_id=container_id,
        name=config.metadata.name,
        rootfs_layers=tuple(layers),
        args=resolve_args(config, image),
        env=resolve_env(config, image),
        working_dir=config.working_dir or image.working_dir or "/",
        user=resolve_user(sc, image),
        hostname=hostname,
        mounts=resolve_mounts(config),
        log_path=log_path,
        resources=resources_from_cri(linux.resources),
        security=p.Security(
            privileged=sc.privileged,
            readonly_rootfs=sc.readonly_rootfs,
            no_new_privileges=sc.no_new_privs,
            capabilities_add=tuple(sc.capabilities.add_capabilities),
            capabilities_drop=tuple(sc.capabilities.drop_capabilities),
            masked_paths=tuple(sc.masked_paths) if sc.masked_paths else None,
            readonly_paths=tuple(sc.readonly_paths) if sc.readonly_paths else None,
        ),
        annotations=dict(config.annotations),
        stop_signal=resolve_stop_signal(config, image),
        gpu=gpu,
    )


def resources_from_cri(res: api_pb2.LinuxContainerResources) -> p.Resources:
    return p.Resources(
        cpu_period=res.cpu_period,
        cpu_quota=res.cpu_quota,
        cpu_shares=res.cpu_shares,
        memory_limit_bytes=res.memory_limit_in_bytes,
        oom_score_adj=res.oom_score_adj,
        cpuset_cpus=res.cpuset_cpus,
        cpuset_mems=res.cpuset_mems,
    )
