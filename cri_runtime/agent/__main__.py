"""The zone agent program: `python -m cri_runtime.agent --help`."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from cri_runtime.agent import cgroups
from cri_runtime.agent.cgroups import CgroupLayout
from cri_runtime.agent.config import AgentConfig, parse_args
from cri_runtime.agent.containers import ContainerManager
from cri_runtime.agent.oci_runtime import OciRuntime, RuntimeChoice, choose_runtime, probe_crun
from cri_runtime.agent.reaper import Reaper
from cri_runtime.agent.service import AgentService, ControlConnector, LocalControlConnector
from cri_runtime.agent.standby import Standby, parse_standby, read_zone_flags
from cri_runtime.agent.zone_init import (
    bring_up_loopback,
    enter_new_network_namespace,
    set_hostname,
)

log = structlog.get_logger("cri_runtime.agent")

XEN_FLAG = "--xen"  # the agent is a domU's init; everything else comes from xenstore
# Grace for the containers when the agent itself is told to stop (SIGTERM) without a SHUTDOWN.
STOP_GRACE_S = 10.0


class _ZoneTag:
    """Adds the zone id to every log line (threads do not inherit contextvars); a standby agent
    learns it only when it is given its zone."""

    def __init__(self) -> None:
        self.zone_id = ""

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self.zone_id:
            event.setdefault("zone_id", self.zone_id)
        return event


ZONE_TAG = _ZoneTag()


def configure_logging(level: str) -> None:
    """JSON lines on stderr (the backend keeps them in the zone's agent.log)."""
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            ZONE_TAG,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def enter_zone(config: AgentConfig) -> None:
    """The zone's network, name and loopback; on the main thread, before it starts request
    threads (see enter_new_network_namespace)."""
    if config.new_netns:
        enter_new_network_namespace()
    if config.hostname:
        set_hostname(config.hostname)
    if config.loopback:
        bring_up_loopback()


def prepare(oci_runtime: str, scratch: Path) -> tuple[Reaper, CgroupLayout, RuntimeChoice] | None:
    """What does not depend on the zone: the reaper and the OCI runtime (None if none works)."""
    reaper = Reaper()
    reaper.start()
    layout = cgroups.read_layout()
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        choice = choose_runtime(
            oci_runtime,
            which=shutil.which,
            layout=layout,
            probe_crun=lambda binary: probe_crun(binary, scratch, reaper),
        )
    except ValueError as exc:
        log.error("no usable OCI runtime", reason=str(exc))
        return None
    log.info(
        "OCI runtime chosen",
        runtime=choice.name,
        binary=choice.binary,
        reason=choice.reason,
        cgroups=layout.mode.value,
    )
    return reaper, layout, choice


def serve(
    config: AgentConfig,
    reaper: Reaper,
    layout: CgroupLayout,
    choice: RuntimeChoice,
    connector: ControlConnector | None = None,
) -> int:
    """Serve the runtime until it shuts the zone down; ``connector`` defaults to the config's
    control socket (process backend)."""
    if connector is None:
        assert config.control_socket is not None, "a local agent needs --control-socket"
        connector = LocalControlConnector(config.control_socket)
    runtime = OciRuntime(choice, config.zone_dir / "oci", config.zone_dir / "tmp", reaper)
    manager = ContainerManager(config, runtime, reaper, layout)
    service = AgentService(config, manager, choice.name, connector)
    # As pid 1 of its namespace the agent gets only the signals it handles.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    service.run()
    if not service.containers_removed:
        manager.shutdown(STOP_GRACE_S)
    log.info("zone agent stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if list(argv) == [XEN_FLAG]:
        return run_in_domu()
    standby = parse_standby(argv)
    if standby is not None:
        return stand_by(standby)
    config = parse_args(argv)
    configure_logging(config.log_level)
    ZONE_TAG.zone_id = config.zone_id
    log.info("zone agent starting", pid=os.getpid(), zone_dir=str(config.zone_dir))
    enter_zone(config)
    prepared = prepare(config.oci_runtime, config.zone_dir / "tmp")
    return 1 if prepared is None else serve(config, *prepared)


def stand_by(standby: Standby) -> int:
    """Prepare, then wait for a zone on stdin (agent/standby.py) and serve it."""
    configure_logging(standby.log_level)
    prepared = prepare(standby.oci_runtime, Path.cwd() / "tmp")
    if prepared is None:
        return 1
    log.info("standby agent ready", pid=os.getpid(), token=standby.token)
    flags = read_zone_flags(sys.stdin.buffer)
    if flags is None:
        log.info("standby agent released")
        return 0
    config = parse_args(flags)
    ZONE_TAG.zone_id = config.zone_id
    log.info("standby agent given its zone", zone_dir=str(config.zone_dir))
    enter_zone(config)
    return serve(config, *prepared)


def run_in_domu() -> int:
    """Xen mode: the agent is the domU's init (exec'd by the zone image's stage-2 script). Its
    settings come from xenstore (agent/xen.py); the control channel is a GrantLink to Dom0; GPU
    containers reach gpu-proxy through the zone's channel broker. When it ends, the domain
    powers off: pid 1 must not exit."""
    from cri_runtime.agent import xen

    configure_logging("info")
    status = 1
    try:
        status = _serve_domu(xen)
    except Exception as exc:
        log.exception("zone agent failed")
        xen.console(f"VGPU-ZONE-FAIL agent: {type(exc).__name__}: {exc}")
    if os.getpid() == 1:
        xen.power_off()
    return status


def _serve_domu(xen: Any) -> int:
    from idm.xen.xenstore import Xenstore

    xs = Xenstore.connect()
    zone = xen.read_identity(xs)
    settings = zone.settings
    configure_logging(settings.log_level)
    ZONE_TAG.zone_id = zone.zone_id
    config = AgentConfig(
        zone_id=zone.zone_id,
        control_socket=None,
        zone_dir=xen.ZONE_DIR,
        hostname=settings.hostname,
        loopback=True,  # the domU's own network stack: lo is all it has until CNI
        oci_runtime=settings.oci_runtime,
        gpu_proxy_socket=xen.PROXY_SOCKET if settings.gpu else None,
        libvgpu=settings.libvgpu,
        log_level=settings.log_level,
        gpu_link="grant",
    )
    log.info("zone agent starting (Xen)", domid=zone.domid, pid=os.getpid())
    enter_zone(config)
    prepared = prepare(config.oci_runtime, config.zone_dir / "tmp")
    if prepared is None:
        xen.console("VGPU-ZONE-FAIL agent: no usable OCI runtime")
        return 1
    broker = None
    if settings.gpu:
        from cri_runtime.agent.gpu_broker import GrantChannelBroker

        xen.PROXY_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        xen.allow_granting_memory()
        broker = GrantChannelBroker(xen.PROXY_SOCKET, xs)
        broker.start()
    xen.console(f"VGPU-ZONE-STAGE agent-serving {_uptime()}")
    try:
        return serve(config, *prepared, connector=xen.GrantControlConnector(xs, zone.domid))
    finally:
        if broker is not None:
            broker.close()


def _uptime() -> str:
    try:
        return Path("/proc/uptime").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
