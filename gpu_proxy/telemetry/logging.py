"""Zone-bound loggers: every line a zone causes carries its pod's identity."""

from __future__ import annotations

from typing import TypeVar

from structlog.typing import BindableLogger

from gpu_proxy.telemetry.zone_stats import ZoneIdentity

L = TypeVar("L", bound=BindableLogger)


def bind_zone(log: L, identity: ZoneIdentity) -> L:
    """Return `log` with the zone's identity bound, so every line can be traced to its pod."""
    return log.bind(
        zone=identity.zone,
        domid=identity.domid,
        namespace=identity.namespace,
        pod=identity.pod,
        container=identity.container,
    )
