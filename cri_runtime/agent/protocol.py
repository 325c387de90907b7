"""The zone agent's control protocol: requests the runtime sends over the IDM control channel.

Each request is one IDM message whose opcode names the request and whose payload is the
request model as JSON; the reply carries the same opcode, status 0 and the response model, or a
non-zero status (an ``AgentStatus``) and an ``AgentFailure`` with the message. JSON keeps this
channel debuggable; it carries a few messages per container lifetime, never CUDA calls.
The hello on this channel uses PROTOCOL_DIGEST, so an agent from another build is refused.
"""

from __future__ import annotations

import hashlib
import re
import signal
from datetime import datetime
from enum import IntEnum, StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROTOCOL_VERSION = 2
PROTOCOL_DIGEST = int.from_bytes(
    hashlib.sha256(f"vgpu-zone-agent/{PROTOCOL_VERSION}".encode()).digest()[:8], "little"
)


class AgentOp(IntEnum):
    """Opcodes of the control channel (IDM reserves those below 16)."""

    READY = 0x100  # agent → runtime, once, after the hello: AgentReady
    CREATE = 0x101
    START = 0x102
    STOP = 0x103
    REMOVE = 0x104
    STATUS = 0x105
    LIST = 0x106
    EXEC_SYNC = 0x107
    REOPEN_LOG = 0x108
    STATS = 0x109
    UPDATE_RESOURCES = 0x10A
    SHUTDOWN = 0x10B
    READ_LOG = 0x10C


class AgentStatus(IntEnum):
    """Non-zero reply statuses; the runtime maps them to gRPC codes."""

    NOT_FOUND = 1
    INVALID = 2
    FAILED = 3
    ALREADY_EXISTS = 4
    TIMEOUT = 5


class AgentFailure(BaseModel):
    message: str


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Mount(_Model):
    host_path: Path  # as the zone sees it
    container_path: str
    readonly: bool = False
    propagation: str = "private"  # private | rslave | rshared


class Resources(_Model):
    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_bytes: int = 0
    oom_score_adj: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""


class User(_Model):
    uid: int | None = None
    username: str = ""  # resolved against the container's /etc/passwd by the agent
    gid: int | None = None
    supplemental_groups: tuple[int, ...] = ()


class Security(_Model):
    privileged: bool = False
    readonly_rootfs: bool = False
    no_new_privileges: bool = False
    capabilities_add: tuple[str, ...] = ()
    capabilities_drop: tuple[str, ...] = ()
    masked_paths: tuple[str, ...] | None = None  # None: the runtime's defaults
    readonly_paths: tuple[str, ...] | None = None


class ImageDisk(_Model):
    """A read-only disk with an image's unpacked layers (Xen zones): the agent mounts
    ``device`` read-only at ``mount_point`` (once per zone) before it mounts the overlay, whose
    lower dirs are then under ``mount_point``. The disk's ext4 label is the image id's first
    16 hex digits (the start of ``mount_point``'s name), which the agent checks."""

    device: Path
    mount_point: Path

    @field_validator("device")
    @classmethod
    def _a_xen_disk(cls, value: Path) -> Path:
        if not re.fullmatch(r"/dev/xvd[a-z]{1,2}", str(value)):
            raise ValueError(f"{value} is not a Xen virtual disk (/dev/xvd<letters>)")
        return value

    @field_validator("mount_point")
    @classmethod
    def _under_the_image_mounts(cls, value: Path) -> Path:
        if not re.fullmatch(r"/run/vgpu/images/[a-f0-9]{64}", str(value)):
            raise ValueError(f"{value} is not /run/vgpu/images/<image id hex>")
        return value


class ContainerSpec(_Model):
    """A container, resolved by the runtime from the CRI config and the image config."""

    container_id: str = Field(pattern=r"^[a-f0-9]{64}$")
    name: str
    rootfs_layers: tuple[Path, ...]  # unpacked image layers, lowest first (as the zone sees them)
    image_disk: ImageDisk | None = None  # mounted before the layers are used (Xen)
    args: tuple[str, ...] = Field(min_length=1)  # entrypoint + cmd, resolved
    env: tuple[str, ...] = ()  # KEY=VALUE, image env overridden by the CRI config
    working_dir: str = "/"
    user: User = User()
    hostname: str = ""
    mounts: tuple[Mount, ...] = ()
    log_path: Path | None = None  # CRI log file (absolute, as the zone sees it)
    # The agent keeps the CRI log for the runtime to fetch (READ_LOG) instead of writing
    # log_path: the file is on a host the zone cannot write (Xen).
    log_relay: bool = False
    resources: Resources = Resources()
    security: Security = Security()
    annotations: dict[str, str] = {}
    gpu: bool = False  # expose libvgpu as libcuda.so.1 and the zone's gpu-proxy channel
    stop_signal: int = Field(default=signal.SIGTERM, ge=1, le=64)  # the image's StopSignal


class ContainerState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


class ContainerInfo(_Model):
    container_id: str
    state: ContainerState
    pid: int = 0
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str = ""  # Completed | Error | OOMKilled | ContainerCannotRun
    message: str = ""


class AgentReady(_Model):
    zone_id: str
    agent_pid: int
    oci_runtime: str  # "crun" or "runc", with the reason the agent chose it in the log
    containers: tuple[ContainerInfo, ...] = ()  # what already runs (after a runtime restart)


class ContainerRef(_Model):
    container_id: str


class Create(_Model):
    spec: ContainerSpec


class Stop(_Model):
    container_id: str
    timeout_s: float = Field(default=10.0, ge=0)


class ContainerList(_Model):
    containers: tuple[ContainerInfo, ...]


class ExecSync(_Model):
    container_id: str
    cmd: tuple[str, ...] = Field(min_length=1)
    timeout_s: float = Field(default=0, ge=0)  # 0: no timeout


class ExecResult(_Model):
    # Output is arbitrary bytes: base64 in JSON (the default, UTF-8, refuses binary output).
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    stdout: bytes
    stderr: bytes
    exit_code: int
    timed_out: bool = False


class Stats(_Model):
    container_id: str
    timestamp: datetime
    cpu_usage_ns: int
    memory_working_set_bytes: int
    writable_layer_bytes: int
    writable_layer_inodes: int


class UpdateResources(_Model):
    container_id: str
    resources: Resources


class Empty(_Model):
    pass


LOG_CHUNK_MAX = 1 << 20


class ReadLog(_Model):
    """Fetch a relayed container's log from ``offset`` (the bytes the runtime has, which the
    agent may now drop; None: the runtime lost count, e.g. after a restart)."""

    container_id: str
    offset: int | None = Field(default=None, ge=0)
    max_bytes: int = Field(default=256 << 10, ge=1, le=LOG_CHUNK_MAX)


class LogChunk(_Model):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    offset: int  # where ``data`` starts in the container's log
    data: bytes  # CRI log entries, as the file holds them
    complete: bool  # the container exited and nothing follows ``data``


# request model and response model per opcode: one table, used by both ends
REQUESTS: dict[AgentOp, tuple[type[BaseModel], type[BaseModel]]] = {
    AgentOp.CREATE: (Create, ContainerInfo),
    AgentOp.START: (ContainerRef, ContainerInfo),
    AgentOp.STOP: (Stop, ContainerInfo),
    AgentOp.REMOVE: (ContainerRef, Empty),
    AgentOp.STATUS: (ContainerRef, ContainerInfo),
    AgentOp.LIST: (Empty, ContainerList),
    AgentOp.EXEC_SYNC: (ExecSync, ExecResult),
    AgentOp.REOPEN_LOG: (ContainerRef, Empty),
    AgentOp.STATS: (ContainerRef, Stats),
    AgentOp.UPDATE_RESOURCES: (UpdateResources, ContainerInfo),
    AgentOp.SHUTDOWN: (Stop, Empty),  # container_id ignored; timeout_s is the grace period
    AgentOp.READ_LOG: (ReadLog, LogChunk),
}
