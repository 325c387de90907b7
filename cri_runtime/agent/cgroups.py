"""Where the cgroup hierarchies are mounted, and what a container's cgroup says.

The agent needs the layout twice: to choose the OCI runtime (crun refuses hybrid v1+v2 hosts)
and to read STATS/OOM from the cgroup the runtime made for a container. The process backend
uses it to remove a dead zone's leftover cgroups. Parsing is pure and unit-tested.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


class CgroupMode(StrEnum):
    UNIFIED = "unified"  # cgroup v2 only
    LEGACY = "legacy"  # cgroup v1 only
    HYBRID = "hybrid"  # v1 controllers plus a cgroup2 mount (e.g. /sys/fs/cgroup/unified)
    NONE = "none"


@dataclass(frozen=True)
class CgroupLayout:
    unified: Path | None = None  # the cgroup2 mount
    v1: dict[str, Path] = field(default_factory=dict)  # controller (or name=…) → mount point

    @property
    def mode(self) -> CgroupMode:
        if self.v1 and self.unified is not None:
            return CgroupMode.HYBRID
        if self.v1:
            return CgroupMode.LEGACY
        return CgroupMode.UNIFIED if self.unified is not None else CgroupMode.NONE

    def mount_points(self) -> list[Path]:
        """Every hierarchy's mount point, each once."""
        points = list(dict.fromkeys(self.v1.values()))
        return [*points, self.unified] if self.unified is not None else points

    def directories(self, cgroups_path: str) -> list[Path]:
        """The directory of ``cgroups_path`` (absolute, as in config.json) in every hierarchy."""
        relative = cgroups_path.lstrip("/")
        return [point / relative for point in self.mount_points()]


@dataclass(frozen=True, slots=True)
class CgroupUsage:
    cpu_usage_ns: int
    memory_working_set_bytes: int


def unescape_mountinfo(value: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as \\ooo (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)


def parse_layout(mountinfo: str) -> CgroupLayout:
    """The cgroup mounts of a /proc/<pid>/mountinfo; the first mount of a hierarchy wins."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, point = tail[0], Path(unescape_mountinfo(fields[4]))
        if fstype == "cgroup2" and unified is None:
            unified = point
        elif fstype == "cgroup":
            for option in tail[2].split(","):
                if option not in ("rw", "ro") and not option.startswith("release_agent"):
                    v1.setdefault(option, point)
    return CgroupLayout(unified=unified, v1=v1)


def read_layout() -> CgroupLayout:
    return parse_layout(MOUNTINFO.read_text())


def parse_flat_keyed(text: str) -> dict[str, int]:
    """memory.stat / cpu.stat / memory.events / memory.oom_control: "key value" lines."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _read(path: Path) -> str:
    """A cgroup file's text; empty if the cgroup (or the controller's file) is not there."""
    try:
        return path.read_text()
    except OSError:
        return ""


def _read_int(path: Path) -> int:
    try:
        return int(_read(path) or 0)
    except ValueError:
        return 0


def usage(layout: CgroupLayout, cgroups_path: str) -> CgroupUsage:
    """CPU time and memory working set (usage minus inactive file cache, as kubelet counts
    it); zero where the controller or cgroup is absent."""
    relative = cgroups_path.lstrip("/")
    cpu_ns = memory = inactive = 0
    if "cpuacct" in layout.v1:
        cpu_ns = _read_int(layout.v1["cpuacct"] / relative / "cpuacct.usage")
    elif layout.unified is not None:
        stat = parse_flat_keyed(_read(layout.unified / relative / "cpu.stat"))
        cpu_ns = stat.get("usage_usec", 0) * 1000
    if "memory" in layout.v1:
        base = layout.v1["memory"] / relative
        memory = _read_int(base / "memory.usage_in_bytes")
        inactive = parse_flat_keyed(_read(base / "memory.stat")).get("total_inactive_file", 0)
    elif layout.unified is not None:
        base = layout.unified / relative
        memory = _read_int(base / "memory.current")
        inactive = parse_flat_keyed(_read(base / "memory.stat")).get("inactive_file", 0)
    return CgroupUsage(cpu_ns, max(0, memory - inactive))


def oom_killed(layout: CgroupLayout, cgroups_path: str) -> bool:
    """Whether the kernel's OOM killer killed anything in the cgroup (read before it goes)."""
    relative = cgroups_path.lstrip("/")
    if "memory" in layout.v1:
        text = _read(layout.v1["memory"] / relative / "memory.oom_control")
    elif layout.unified is not None:
        text = _read(layout.unified / relative / "memory.events")
    else:
        return False
    return parse_flat_keyed(text).get("oom_kill", 0) > 0
