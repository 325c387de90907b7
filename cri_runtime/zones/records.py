"""What the zone backends keep on the host between calls and across runtime restarts: JSON
files written so that a crash leaves the old or the new one, never half of it, and a lock per
zone (or image) so that concurrent CRI calls on it run one at a time."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import structlog
from pydantic import BaseModel, ValidationError

log = structlog.get_logger(__name__)

RECORD = "zone.json"  # a zone's record, in its zone dir

Record = TypeVar("Record", bound=BaseModel)


def read_record(zone_dir: Path, model: type[Record]) -> Record | None:
    """The zone's record; None when there is none, or when it cannot be read (logged: the
    zone is then treated as gone and torn down rather than failing every call on it)."""
    try:
        return model.model_validate_json((zone_dir / RECORD).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as exc:
        log.warning("unreadable zone record", zone_id=zone_dir.name, error=str(exc))
        return None


def write_record(zone_dir: Path, record: BaseModel) -> None:
    write_json(zone_dir / RECORD, record)


def write_json(path: Path, model: BaseModel) -> None:
    """Replace ``path`` with ``model``'s JSON: written beside it, fsynced, renamed over it."""
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w") as f:
        f.write(model.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


class KeyedLocks:
    """One lock per key, made on first use (keys are few: zones, images)."""

    def __init__(self, make_lock: Callable[[], contextlib.AbstractContextManager[object]]) -> None:
        self._make_lock = make_lock
        self._guard = threading.Lock()
        self._locks: dict[str, contextlib.AbstractContextManager[object]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, self._make_lock())
        with lock:
            yield
