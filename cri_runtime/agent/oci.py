"""ContainerSpec → OCI runtime spec (config.json), as a pure function.

Defaults follow what kubelet users get from containerd + runc: runc's default mounts, containerd's
default capability set and masked/readonly paths, and CRI's capability add/drop rules. Kept free
of I/O (the image's /etc/passwd and /etc/group come in as text) so every rule is unit-tested.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cri_runtime.agent.protocol import ContainerSpec, Mount, Resources, User

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

GPU_PROXY_SOCKET = "/run/vgpu/proxy.sock"
LIBCUDA_PATHS = ("/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so")

# Capability numbers are the index (the bit in /proc/<pid>/status CapBnd).
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

# containerd's defaultUnixCaps
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# containerd's populateDefaultUnixSpec
DEFAULT_MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
)
DEFAULT_READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

_PROPAGATION = {"private": "rprivate", "rslave": "rslave", "rshared": "rshared"}


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class GpuMounts:
    """What a gpu=True container gets: the zone's gpu-proxy socket, and libvgpu if installed.
    ``link`` is what listens on the socket, for libvgpu (VGPU_LINK): gpu-proxy itself ("local")
    or a Xen zone's channel broker ("grant")."""

    proxy_socket: Path
    libvgpu: Path | None
    link: Literal["local", "grant"] = "local"


def parse_passwd(text: str) -> list[PasswdEntry]:
    """Entries of an /etc/passwd; malformed lines are skipped, as libc does."""
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit() and fields[3].isdigit():
            entries.append(PasswdEntry(fields[0], int(fields[2]), int(fields[3])))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            members = tuple(m for m in (fields[3].split(",") if len(fields) > 3 else []) if m)
            entries.append(GroupEntry(fields[0], int(fields[2]), members))
    return entries


def resolve_user(user: User, passwd: str, group: str) -> ResolvedUser:
    """The uid/gid/groups the process runs with, as containerd resolves CRI's user fields
    against the image: a username must exist; a numeric uid need not; the primary gid comes
    from the passwd entry unless given; groups listing the user are added, then the pod's
    supplemental groups. Raises ValueError for an unknown username."""
    users = parse_passwd(passwd)
    entry: PasswdEntry | None
    if user.username and not user.username.isdigit():
        entry = next((u for u in users if u.name == user.username), None)
        if entry is None:
            raise ValueError(f"user {user.username!r} not found in the image's /etc/passwd")
        uid = entry.uid
    else:
        uid = int(user.username) if user.username else (user.uid if user.uid is not None else 0)
        entry = next((u for u in users if u.uid == uid), None)
    gid = user.gid if user.gid is not None else (entry.gid if entry else 0)
    member_of = []
    if entry is not None:
        member_of = [g.gid for g in parse_group(group) if entry.name in g.members]
    return ResolvedUser(uid, gid, _unique([gid, *member_of, *user.supplemental_groups]))


def capabilities(
    *, privileged: bool, add: Sequence[str], drop: Sequence[str], bounding: int
) -> list[str]:
    """CRI's rules (containerd's WithCapabilities): start from the default set; "ALL" in add
    or drop applies first, then the named ones. Names may omit the CAP_ prefix. Privileged and
    "ALL" mean every capability in ``bounding`` (the agent's own bounding set, as containerd's
    WithAllCurrentCapabilities), and the defaults are limited to it. Raises ValueError for a
    name the kernel API does not define, or an added one the zone does not have."""
    available = {name for bit, name in enumerate(CAPABILITIES) if bounding >> bit & 1}
    if privileged:
        return sorted(available, key=CAPABILITIES.index)
    added, dropped = _cap_names(add), _cap_names(drop)
    missing = added - available - {"ALL"}
    if missing:
        raise ValueError(f"capabilities not available in this zone: {', '.join(sorted(missing))}")
    caps = set(DEFAULT_CAPABILITIES) & available
    if "ALL" in added:
        caps = set(available)
    if "ALL" in dropped:
        caps = set()
    caps |= added - {"ALL"}
    caps -= dropped
    return sorted(caps, key=CAPABILITIES.index)


def runtime_spec(
    spec: ContainerSpec,
    *,
    user: ResolvedUser,
    zone_hostname: str,
    cgroups_path: str,
    bounding_caps: int,
    gpu: GpuMounts | None,
) -> dict[str, Any]:
    """The config.json for ``spec``; the bundle's rootfs is the directory ``rootfs``.
    Raises ValueError for a spec that cannot be run (bad capability, propagation, GPU ask
    without a gpu-proxy channel)."""
    security = spec.security
    hostname = spec.hostname or zone_hostname
    caps = capabilities(
        privileged=security.privileged,
        add=security.capabilities_add,
        drop=security.capabilities_drop,
        bounding=bounding_caps,
    )
    env = _environment(spec, hostname, gpu)
    mounts = _mounts(spec, gpu)
    process: dict[str, Any] = {
        "terminal": False,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": list(user.additional_gids)},
        "args": list(spec.args),
        "env": env,
        "cwd": spec.working_dir or "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": security.no_new_privileges,
        "oomScoreAdj": spec.resources.oom_score_adj,
    }
    if security.privileged:
        masked: Sequence[str] = ()
        readonly: Sequence[str] = ()
    else:
        masked = DEFAULT_MASKED_PATHS if security.masked_paths is None else security.masked_paths
        readonly = (
            DEFAULT_READONLY_PATHS if security.readonly_paths is None else security.readonly_paths
        )
    linux: dict[str, Any] = {
        # A new pid/ipc/uts/mount namespace per container; the network is the zone's.
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
        "cgroupsPath": cgroups_path,
        "resources": {
            "devices": [{"allow": security.privileged, "access": "rwm"}],
            **resources_json(spec.resources),
        },
        "maskedPaths": list(masked),
        "readonlyPaths": list(readonly),
    }
    propagations = {m.propagation for m in spec.mounts}
    if "rshared" in propagations:
        linux["rootfsPropagation"] = "rshared"
    elif "rslave" in propagations:
        linux["rootfsPropagation"] = "rslave"
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": "rootfs", "readonly": security.readonly_rootfs},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
        "annotations": dict(spec.annotations),
    }


def resources_json(resources: Resources) -> dict[str, Any]:
    """linux.resources for the set (non-zero) fields; also the `<oci> update --resources`
    input, where an absent field is left as it is."""
    cpu: dict[str, Any] = {}
    if resources.cpu_shares:
        cpu["shares"] = resources.cpu_shares
    if resources.cpu_quota:
        cpu["quota"] = resources.cpu_quota
    if resources.cpu_period:
        cpu["period"] = resources.cpu_period
    if resources.cpuset_cpus:
        cpu["cpus"] = resources.cpuset_cpus
    if resources.cpuset_mems:
        cpu["mems"] = resources.cpuset_mems
    out: dict[str, Any] = {}
    if cpu:
        out["cpu"] = cpu
    if resources.memory_limit_bytes:
        out["memory"] = {"limit": resources.memory_limit_bytes}
    return out


def _environment(spec: ContainerSpec, hostname: str, gpu: GpuMounts | None) -> list[str]:
    env = list(spec.env)
    keys = {e.split("=", 1)[0] for e in env}
    if "PATH" not in keys:
        env.insert(0, DEFAULT_PATH)
    if "HOSTNAME" not in keys and hostname:
        env.append(f"HOSTNAME={hostname}")
    if spec.gpu and gpu is not None:
        env = [e for e in env if not e.startswith(("VGPU_PROXY_SOCKET=", "VGPU_LINK="))]
        env.append(f"VGPU_PROXY_SOCKET={GPU_PROXY_SOCKET}")
        if gpu.link != "local":
            env.append(f"VGPU_LINK={gpu.link}")
    return env


def _default_mounts(*, privileged: bool) -> list[dict[str, Any]]:
    """runc's `runc spec` mounts; /sys is writable only for privileged containers."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "rw" if privileged else "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "rw" if privileged else "ro"],
        },
    ]


def _mounts(spec: ContainerSpec, gpu: GpuMounts | None) -> list[dict[str, Any]]:
    wanted = list(spec.mounts)
    if spec.gpu:
        if gpu is None:
            raise ValueError("the container asks for the GPU but this zone has no gpu-proxy")
        wanted.append(Mount(host_path=gpu.proxy_socket, container_path=GPU_PROXY_SOCKET))
        if gpu.libvgpu is not None:
            wanted += [
                Mount(host_path=gpu.libvgpu, container_path=path, readonly=True)
                for path in LIBCUDA_PATHS
            ]
    for mount in wanted:
        if not posixpath.isabs(mount.container_path):
            raise ValueError(f"mount destination {mount.container_path!r} is not absolute")
        if mount.propagation not in _PROPAGATION:
            raise ValueError(
                f"mount propagation {mount.propagation!r} is not one of {sorted(_PROPAGATION)}"
            )
    # A mount of the user's replaces a default at the same place; parents go before children.
    taken = {posixpath.normpath(m.container_path) for m in wanted}
    defaults = [
        m
        for m in _default_mounts(privileged=spec.security.privileged)
        if m["destination"] not in taken
    ]
    ordered = sorted(wanted, key=lambda m: len(Path(m.container_path).parts))
    return defaults + [_bind(m) for m in ordered]


def _bind(mount: Mount) -> dict[str, Any]:
    return {
        "destination": posixpath.normpath(mount.container_path),
        "type": "bind",
        "source": str(mount.host_path),
        "options": ["rbind", _PROPAGATION[mount.propagation], "ro" if mount.readonly else "rw"],
    }


def _cap_names(names: Iterable[str]) -> set[str]:
    out = set()
    for name in names:
        upper = name.upper()
        full = upper if upper == "ALL" or upper.startswith("CAP_") else f"CAP_{upper}"
        if full != "ALL" and full not in CAPABILITIES:
            raise ValueError(f"unknown capability {name!r}")
        out.add(full)
    return out


def _unique(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(values))
