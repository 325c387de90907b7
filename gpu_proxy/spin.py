"""How long gpu-proxy's channels may busy-wait.

Spinning buys latency only while every spinning channel has a CPU to itself. Past that, idle
spinners take the CPU the channel with work needs, and one zone can starve the rest: with 64
zones on one host CPU, the fewest calls any zone got was 2% of the most (tests/bench/
gpu_proxy_zones.py). So channels spin while the open channels fit the CPUs the proxy may run
on, and all of them sleep on their doorbells as soon as they do not.
"""

import os
import threading

from idm.channel import Channel

DEFAULT_SPIN_NS = 50_000


class SpinBudget:
    def __init__(self, cpus: int | None = None, spin_ns: int = DEFAULT_SPIN_NS) -> None:
        self.cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
        self.spin_ns = spin_ns
        self._channels: set[Channel] = set()
        self._lock = threading.Lock()

    def join(self, channel: Channel) -> None:
        with self._lock:
            self._channels.add(channel)
            self._apply()

    def leave(self, channel: Channel) -> None:
        with self._lock:
            self._channels.discard(channel)
            self._apply()

    @property
    def current_spin_ns(self) -> int:
        return self.spin_ns if len(self._channels) <= self.cpus else 0

    def _apply(self) -> None:
        spin = self.current_spin_ns
        for channel in self._channels:
            channel.spin_ns = spin
