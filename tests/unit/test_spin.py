"""The spin budget: channels busy-wait only while they fit the proxy's CPUs."""

from collections.abc import Callable

from gpu_proxy.spin import SpinBudget
from tests.conftest import Pair

MakePair = Callable[..., Pair]


def test_channels_spin_only_while_they_fit_the_cpus(make_pair: MakePair) -> None:
    budget = SpinBudget(cpus=2, spin_ns=40_000)
    channels = [make_pair()[2] for _ in range(3)]
    budget.join(channels[0])
    budget.join(channels[1])
    assert [c.spin_ns for c in channels[:2]] == [40_000, 40_000]
    budget.join(channels[2])
    assert [c.spin_ns for c in channels] == [0, 0, 0]
    budget.leave(channels[0])
    assert [c.spin_ns for c in channels[1:]] == [40_000, 40_000]
    assert budget.current_spin_ns == 40_000


def test_defaults_follow_the_cpus_this_process_may_use() -> None:
    import os

    assert SpinBudget().cpus == len(os.sched_getaffinity(0))
