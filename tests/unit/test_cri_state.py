"""Runtime records: atomic persistence, crash leftovers, corrupt files set aside."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri_runtime.errors import InvalidArgument
from cri_runtime.gpu import parse_quantity
from cri_runtime.state import RuntimeState, SandboxRecord, SandboxState
from cri_runtime.zones.base import ZoneSpec


def sandbox(sid: str) -> SandboxRecord:
    return SandboxRecord(
        id=sid, created_at_ns=1, config=b"\x00\xffbinary", name="p", uid="u", namespace="n",
        attempt=0, runtime_handler="", state=SandboxState.READY, zone=ZoneSpec(zone_id=sid),
    )  # fmt: skip


def test_records_survive_a_restart_byte_for_byte(tmp_path: Path) -> None:
    state = RuntimeState(tmp_path)
    state.sandboxes.put(sandbox("a" * 64))
    again = RuntimeState(tmp_path)
    assert again.sandboxes.get("a" * 64) == sandbox("a" * 64)
    again.sandboxes.delete("a" * 64)
    again.sandboxes.delete("a" * 64)  # idempotent
    assert RuntimeState(tmp_path).sandboxes.all() == []


def test_interrupted_write_and_corrupt_record(tmp_path: Path) -> None:
    state = RuntimeState(tmp_path)
    state.sandboxes.put(sandbox("b" * 64))
    directory = tmp_path / "sandboxes"
    (directory / ("c" * 64 + ".tmp")).write_text('{"id": "torn')
    (directory / ("d" * 64 + ".json")).write_text("not json")
    again = RuntimeState(tmp_path)
    assert [r.id for r in again.sandboxes.all()] == ["b" * 64]
    assert not (directory / ("c" * 64 + ".tmp")).exists()
    assert (directory / ("d" * 64 + ".corrupt")).exists()


@pytest.mark.parametrize(
    ("text", "value"), [("4Gi", 4 << 30), ("512Mi", 512 << 20), ("1000", 1000), ("2G", 2 * 10**9)]
)
def test_quantities(text: str, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1Gi", "0", "1.5Gi", "Gi"])
def test_bad_quantities(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_quantity(text)
