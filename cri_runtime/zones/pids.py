"""Host processes named by pid *and* start time, so a pid recorded before a runtime restart is
never mistaken for an unrelated process that reused the number."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict


class ProcStat(NamedTuple):
    state: str
    ppid: int
    start_ticks: int  # clock ticks after boot


class ProcessIdentity(BaseModel):
    model_config = ConfigDict(frozen=True)

    pid: int
    start_ticks: int


def parse_stat(text: str) -> ProcStat:
    """/proc/<pid>/stat; the command name (2nd field) may hold spaces and parentheses."""
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state) of proc(5); starttime is field 22
    return ProcStat(fields[0], int(fields[1]), int(fields[19]))


def stat(pid: int) -> ProcStat | None:
    try:
        return parse_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def identify(pid: int) -> ProcessIdentity | None:
    current = stat(pid)
    return None if current is None else ProcessIdentity(pid=pid, start_ticks=current.start_ticks)


def alive(identity: ProcessIdentity) -> bool:
    """Running (not a zombie) and still the process we recorded."""
    current = stat(identity.pid)
    return (
        current is not None
        and current.state not in ("Z", "X")
        and current.start_ticks == identity.start_ticks
    )


def with_argument(argument: str) -> list[int]:
    """Pids whose command line has exactly this argument: how a zone's processes are found when
    a crash left no record of their pids (the runtime died between spawning and recording)."""
    wanted = argument.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in args:
            found.append(int(entry.name))
    return found
