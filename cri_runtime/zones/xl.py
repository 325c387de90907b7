"""The few ``xl`` commands the Xen zone backend runs, each with a timeout, each failure a
ZoneError carrying xl's own words (its stderr), so a CRI error tells the operator what libxl
said.

``xl list`` (not ``-l``) is what lists domains: its table has name, domid, memory, vcpus and the
state flags, costs one libxl call (``-l`` reads every domain's stored config) and is stable
across Xen releases. Names never contain whitespace (xl refuses them), so splitting on it is
exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import structlog

from cri_runtime.zones.base import ZoneError
from cri_runtime.zones.tools import run_tool

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT_S = 60.0
# `xl create` runs the bootloader-free PV build (kernel load, page tables) in Dom0: seconds
# under emulation, with libxl's lock possibly held by another create.
CREATE_TIMEOUT_S = 180.0
_HEADER = re.compile(r"Name\s+ID\s+Mem\s+VCPUs\s+State\s+Time\(s\)")
_STATE = re.compile(r"[r-][b-][p-][s-][c-][d-]")


@dataclass(frozen=True, slots=True)
class Domain:
    """One row of ``xl list``. ``flags`` is xl's six-letter state (running, blocked, paused,
    shutdown, crashed, dying; ``-`` where not)."""

    name: str
    domid: int
    memory_mib: int
    vcpus: int
    flags: str
    cpu_time_s: float

    @property
    def paused(self) -> bool:
        return self.flags[2] == "p"

    @property
    def ended(self) -> bool:
        """Shut down, crashed or dying: what is left is a shell for `xl destroy`."""
        return any(self.flags[i] != "-" for i in (3, 4, 5))


def parse_list(text: str) -> list[Domain]:
    """``xl list``'s table; ValueError naming the line if it is not the format xl prints."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not _HEADER.fullmatch(lines[0].strip()):
        raise ValueError(f"xl list: unexpected header {lines[0] if lines else ''!r}")
    domains = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) != 6 or not _STATE.fullmatch(fields[4]):
            raise ValueError(f"xl list: unexpected line {line!r}")
        name, domid, memory, vcpus, flags, cpu = fields
        try:
            domains.append(Domain(name, int(domid), int(memory), int(vcpus), flags, float(cpu)))
        except ValueError:
            raise ValueError(f"xl list: unexpected line {line!r}") from None
    return domains


class Xl:
    """Runs ``xl``; every method raises ZoneError with xl's stderr on failure."""

    def __init__(self, binary: str = "xl", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.binary = binary
        self.timeout_s = timeout_s

    def run(self, *args: str, timeout_s: float | None = None) -> str:
        """xl's stdout; ZoneError with its stderr (or the timeout) otherwise."""
        return run_tool([self.binary, *args], timeout_s or self.timeout_s)

    def create_paused(self, config: Path) -> None:
        """``xl create -p``: the domain is built but runs nothing until ``unpause``."""
        self.run("create", "-p", str(config), timeout_s=CREATE_TIMEOUT_S)

    def unpause(self, name: str) -> None:
        self.run("unpause", name)

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (it may ignore it: ``destroy`` after a grace period)."""
        self.run("shutdown", name)

    def destroy(self, name: str) -> None:
        self.run("destroy", name)

    def list(self) -> list[Domain]:
        text = self.run("list")
        try:
            return parse_list(text)
        except ValueError as exc:
            raise ZoneError(str(exc)) from None

    def domain(self, name: str) -> Domain | None:
        """The domain named ``name``, or None (one `xl list`, no error for a missing name)."""
        return next((d for d in self.list() if d.name == name), None)

    def block_attach(self, name: str, disk: str) -> None:
        self.run("block-attach", name, disk)

    def block_detach(self, name: str, vdev: str) -> None:
        self.run("block-detach", name, vdev)
