"""The zone agent program: `python -m cri_runtime.agent --help`."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from collections.abc import MutableMapping, Sequence
from typing import Any

import structlog

from cri_runtime.agent import cgroups
from cri_runtime.agent.config import AgentConfig, parse_args
from cri_runtime.agent.containers import ContainerManager
from cri_runtime.agent.oci_runtime import OciRuntime, choose_runtime, probe_crun
from cri_runtime.agent.reaper import Reaper
from cri_runtime.agent.service import AgentService
from cri_runtime.agent.zone_init import bring_up_loopback, set_hostname

log = structlog.get_logger("cri_runtime.agent")

# Grace for the containers when the agent itself is told to stop (SIGTERM) without a SHUTDOWN.
STOP_GRACE_S = 10.0


def configure_logging(zone_id: str, level: str) -> None:
    """JSON lines on stderr (the backend keeps them in the zone's agent.log), each with the
    zone id; threads do not inherit contextvars, so it is added by a processor."""

    def add_zone_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("zone_id", zone_id)
        return event

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_zone_id,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def serve(config: AgentConfig) -> int:
    log.info("zone agent starting", pid=os.getpid(), zone_dir=str(config.zone_dir))
    if config.hostname:
        set_hostname(config.hostname)
    if config.loopback:
        bring_up_loopback()
    reaper = Reaper()
    reaper.start()
    layout = cgroups.read_layout()
    scratch = config.zone_dir / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        choice = choose_runtime(
            config.oci_runtime,
            which=shutil.which,
            layout=layout,
            probe_crun=lambda binary: probe_crun(binary, scratch, reaper),
        )
    except ValueError as exc:
        log.error("no usable OCI runtime", reason=str(exc))
        return 1
    log.info(
        "OCI runtime chosen",
        runtime=choice.name,
        binary=choice.binary,
        reason=choice.reason,
        cgroups=layout.mode.value,
    )
    runtime = OciRuntime(choice, config.zone_dir / "oci", scratch, reaper)
    manager = ContainerManager(config, runtime, reaper, layout)
    service = AgentService(config, manager, choice.name)
    # As pid 1 of its namespace the agent gets only the signals it handles.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    service.run()
    if not service.containers_removed:
        manager.shutdown(STOP_GRACE_S)
    log.info("zone agent stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging(config.zone_id, config.log_level)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
