"""gpu-proxy's dispatch driven directly, as one zone process's calls, on the sim backend."""

import contextlib
from collections.abc import Iterator

from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.module_cache import ModuleImageCache
from gpu_proxy.quota import MemoryLedger
from gpu_proxy.telemetry.events import EventBus
from gpu_proxy.telemetry.zone_stats import ZoneIdentity
from gpu_proxy.zone import Caller, Zone


@contextlib.contextmanager
def sim_caller(
    quota: int, zone_id: str = "z", images: ModuleImageCache | None = None
) -> Iterator[Caller]:
    """A caller in a fresh zone with ``quota`` bytes of the sim's memory (and a module cache of
    its own unless given one); the zone is torn down afterwards."""
    zone = Zone(
        ZoneIdentity(zone=zone_id, domid=0, pod="p", namespace="n", gpu_index=0),
        SimBackend(),
        MemoryLedger(1 << 30),
        quota,
        EventBus(),
        images if images is not None else ModuleImageCache(64 << 20),
    )
    try:
        yield Caller(zone)
    finally:
        zone.teardown()
