"""Sandbox and container records, persisted atomically so a restarted (or kill -9'd) runtime
answers every List/Status call as before and can reconcile with the zones that still run.

One JSON file per record (write to a temp file, fsync, rename, fsync the directory): a crash
leaves either the old record or the new one, never a torn file. The original CRI configs are
kept as serialized protobuf so status calls return exactly what kubelet sent.
"""

from __future__ import annotations

import contextlib
import os
import threading
from enum import StrEnum
from pathlib import Path
from typing import Generic, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from cri_runtime.zones.base import ZoneSpec

log = structlog.stdlib.get_logger(__name__)


class SandboxState(StrEnum):
    CREATING = "creating"  # record written, zone not yet confirmed ready (crash → clean up)
    READY = "ready"
    NOTREADY = "notready"


class ContainerState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


class _Record(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    id: str
    created_at_ns: int
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    config: bytes  # the CRI config message, serialized


class SandboxRecord(_Record):
    name: str
    uid: str
    namespace: str
    attempt: int
    runtime_handler: str
    state: SandboxState
    zone: ZoneSpec
    log_directory: str = ""
    gpu_socket: str = ""  # gpu-proxy's socket for this zone, when it has a GPU
    gpu_memory_limit: int = 0
    address: str = ""

    @property
    def reserved_name(self) -> str:
        return f"{self.name}_{self.namespace}_{self.uid}_{self.attempt}"


class ContainerRecord(_Record):
    sandbox_id: str
    name: str
    attempt: int
    image: str  # as the pod spec named it
    image_id: str  # "sha256:..." of the image it runs
    image_ref: str  # repo digest (or the id) for ContainerStatus.image_ref
    state: ContainerState = ContainerState.CREATED
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    log_path: str = ""  # absolute

    @property
    def reserved_name(self) -> str:
        return f"{self.name}_{self.sandbox_id}_{self.attempt}"


R = TypeVar("R", bound=_Record)


class RecordStore(Generic[R]):
    """Records of one kind under one directory, cached in memory; thread-safe."""

    def __init__(self, directory: Path, model: type[R]) -> None:
        self._dir = directory
        self._model = model
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, R] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix == ".tmp":
                path.unlink()  # a write a crash interrupted; the previous record still stands
                continue
            try:
                record = model.model_validate_json(path.read_bytes())
            except (ValidationError, OSError) as exc:
                bad = path.with_suffix(".corrupt")
                path.rename(bad)
                log.error("unreadable record set aside", path=str(bad), error=str(exc))
                continue
            self._records[record.id] = record

    def put(self, record: R) -> None:
        with self._lock:
            self._write(record)

    def replace(self, record: R) -> bool:
        """Write ``record`` only if a record with its id is still there (atomically with
        ``delete``): an update computed without the owner's lock must not bring back a record
        removed meanwhile. False if it was gone."""
        with self._lock:
            if record.id not in self._records:
                return False
            self._write(record)
            return True

    def _write(self, record: R) -> None:
        """Persist and cache ``record``; the caller holds ``self._lock``."""
        data = record.model_dump_json().encode()
        path = self._dir / f"{record.id}.json"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._records[record.id] = record

    def delete(self, record_id: str) -> None:
        with self._lock:
            self._records.pop(record_id, None)
            with contextlib.suppress(FileNotFoundError):
                (self._dir / f"{record_id}.json").unlink()

    def get(self, record_id: str) -> R | None:
        return self._records.get(record_id)

    def all(self) -> list[R]:
        with self._lock:
            return list(self._records.values())


class RuntimeState:
    """Both stores under the runtime's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.sandboxes = RecordStore(state_dir / "sandboxes", SandboxRecord)
        self.containers = RecordStore(state_dir / "containers", ContainerRecord)
