"""cgroup layouts from mountinfo, and a container's usage from its cgroup files."""

from __future__ import annotations

from pathlib import Path

from cri_runtime.agent import cgroups
from cri_runtime.agent.cgroups import CgroupLayout, CgroupMode

HYBRID = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
27 26 0:25 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
28 26 0:26 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
29 26 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
30 26 0:28 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
31 26 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
UNIFIED = "35 25 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
COMOUNTED = (
    "40 26 0:31 / /sys/fs/cgroup/cpu,cpuacct rw shared:12 - cgroup cgroup rw,cpu,cpuacct\n"
    "41 26 0:32 / /mnt/with\\040space rw - cgroup cgroup rw,memory\n"
)


def test_layouts() -> None:
    hybrid = cgroups.parse_layout(HYBRID)
    assert hybrid.mode == CgroupMode.HYBRID and hybrid.unified == Path("/sys/fs/cgroup/unified")
    assert hybrid.v1["memory"] == Path("/sys/fs/cgroup/memory")
    assert hybrid.v1["name=systemd"] == Path("/sys/fs/cgroup/systemd")
    assert cgroups.parse_layout(UNIFIED).mode == CgroupMode.UNIFIED
    legacy = cgroups.parse_layout(COMOUNTED)
    assert legacy.mode == CgroupMode.LEGACY
    assert legacy.v1["cpu"] == legacy.v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert legacy.v1["memory"] == Path("/mnt/with space")
    assert cgroups.parse_layout("").mode == CgroupMode.NONE


def test_directories_cover_every_hierarchy_once() -> None:
    legacy = cgroups.parse_layout(COMOUNTED)
    assert legacy.directories("/vgpu-zones/z") == [
        Path("/sys/fs/cgroup/cpu,cpuacct/vgpu-zones/z"),
        Path("/mnt/with space/vgpu-zones/z"),
    ]


def test_v1_usage_and_oom(tmp_path: Path) -> None:
    layout = CgroupLayout(v1={"cpuacct": tmp_path / "cpuacct", "memory": tmp_path / "memory"})
    cpu = tmp_path / "cpuacct" / "z" / "c"
    memory = tmp_path / "memory" / "z" / "c"
    cpu.mkdir(parents=True)
    memory.mkdir(parents=True)
    (cpu / "cpuacct.usage").write_text("123456\n")
    (memory / "memory.usage_in_bytes").write_text("1000000\n")
    (memory / "memory.stat").write_text("cache 5\ntotal_inactive_file 400000\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert cgroups.usage(layout, "/z/c") == cgroups.CgroupUsage(123456, 600000)
    assert not cgroups.oom_killed(layout, "/z/c")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert cgroups.oom_killed(layout, "/z/c")


def test_v2_usage_and_oom(tmp_path: Path) -> None:
    layout = CgroupLayout(unified=tmp_path)
    group = tmp_path / "z" / "c"
    group.mkdir(parents=True)
    (group / "cpu.stat").write_text("usage_usec 42\nuser_usec 40\n")
    (group / "memory.current").write_text("5000\n")
    (group / "memory.stat").write_text("anon 1\ninactive_file 7000\n")  # more than usage: 0
    (group / "memory.events").write_text("low 0\noom 1\noom_kill 2\n")
    assert cgroups.usage(layout, "z/c") == cgroups.CgroupUsage(42_000, 0)
    assert cgroups.oom_killed(layout, "z/c")


def test_a_missing_cgroup_reads_as_zero(tmp_path: Path) -> None:
    layout = CgroupLayout(v1={"cpuacct": tmp_path, "memory": tmp_path})
    assert cgroups.usage(layout, "/gone") == cgroups.CgroupUsage(0, 0)
    assert not cgroups.oom_killed(layout, "/gone")
    assert not cgroups.oom_killed(CgroupLayout(), "/gone")
