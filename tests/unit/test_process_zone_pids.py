"""Host processes named by pid and start time."""

from __future__ import annotations

import os
import subprocess
import time

from cri_runtime.zones import pids
from cri_runtime.zones.pids import ProcessIdentity


def test_parse_stat_with_a_hostile_command_name() -> None:
    fields = " ".join(str(n) for n in range(4, 53))
    stat = pids.parse_stat(f"123 (a) b (c)) S {fields}\n")
    assert stat == pids.ProcStat("S", 4, 22)


def test_identity_of_a_live_process_and_of_a_reused_pid() -> None:
    me = pids.identify(os.getpid())
    assert me is not None and pids.alive(me)
    assert not pids.alive(ProcessIdentity(pid=os.getpid(), start_ticks=me.start_ticks + 1))


def test_zombies_and_gone_processes_are_not_alive() -> None:
    child = subprocess.Popen(["true"])
    identity = pids.identify(child.pid)
    assert identity is not None
    deadline = time.monotonic() + 5
    while (stat := pids.stat(child.pid)) is not None and stat.state != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert not pids.alive(identity)  # exited, not yet reaped
    child.wait()
    assert not pids.alive(identity) and pids.identify(child.pid) is None
