"""gpu-proxy: the Dom0 daemon that runs forwarded CUDA calls for zones.

    gpu-proxy [--config FILE] [--backend auto|cuda|sim] [--zone NAME=BYTES ...]

Serves one unix socket per zone (guest processes connect there over the IDM channel), in Dom0
the grant channels Xen zones offer (found through a xenstore watch), zone registration for
vgpu-runtime (gRPC ZoneControl) on control_address, Prometheus metrics and /healthz on
--metrics-port (default 9400), and the zone event stream (gRPC) on events_address.
SIGTERM/SIGINT: stop accepting, close every channel, release every zone's GPU
objects, exit 0.
"""

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from gpu_proxy.backends.base import GpuBackend
from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.config import DEFAULT_CONFIG, ProxyConfig, load_config
from gpu_proxy.control import ZoneControlService, serve_control
from gpu_proxy.registry import ZoneRegistry
from gpu_proxy.telemetry.events import EventBus, serve_events
from gpu_proxy.telemetry.http import TelemetryServer
from gpu_proxy.telemetry.metrics import ProxyCollector
from gpu_proxy.telemetry.zone_stats import ZoneIdentity
from vgpu_common.logs import configure_logging

if TYPE_CHECKING:
    from gpu_proxy.xen_zones import XenZoneWatcher

log = structlog.stdlib.get_logger("gpu_proxy")

CAPABILITIES = Path("/proc/xen/capabilities")

EPILOG = f"""\
configuration: defaults, then the TOML file (--config, else {DEFAULT_CONFIG} if present), then
environment variables VGPU_PROXY_<SETTING> (e.g. VGPU_PROXY_BACKEND=sim), then these options.
Settings: {", ".join(ProxyConfig.model_fields)}.
"""


def make_backend(config: ProxyConfig) -> GpuBackend:
    """The configured backend; ``auto`` uses the GPU when the driver works, else the sim."""
    if config.backend == "sim":
        return SimBackend(config.sim_model)
    from gpu_proxy.backends.cuda import BackendUnavailable, CudaBackend

    try:
        return CudaBackend(config.gpu)
    except BackendUnavailable as exc:
        if config.backend == "cuda":
            raise
        log.warning("no usable GPU, using the sim backend", reason=str(exc))
        return SimBackend(config.sim_model)


def in_dom0() -> bool:
    """Xen's control domain: the one place Xen zones' grant channels can be served from."""
    try:
        return "control_d" in CAPABILITIES.read_text()
    except OSError:
        return False


def start_xen_zones(config: ProxyConfig, registry: ZoneRegistry) -> "XenZoneWatcher | None":
    """The xenstore watch that attaches Xen zones' offers, if configured (or auto and in Dom0)."""
    if config.xen_zones == "off" or (config.xen_zones == "auto" and not in_dom0()):
        return None
    from gpu_proxy.xen_zones import XenZoneWatcher
    from idm.xen.xenstore import Xenstore

    xs = Xenstore.connect()
    return XenZoneWatcher(
        registry,
        xs,
        host_domid=xs.own_domid(),
        default_limit=config.default_memory_limit,
        gpu_index=config.gpu,
    )


def parse_zone(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not name or not size.isdigit() or int(size) <= 0:
        raise argparse.ArgumentTypeError(f"expected NAME=BYTES with BYTES > 0, got {text!r}")
    return name, int(size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu-proxy",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--backend", choices=["auto", "cuda", "sim"], help="GPU backend")
    parser.add_argument("--socket-dir", type=Path, help="where zone sockets are created")
    parser.add_argument("--metrics-port", type=int, help="/metrics and /healthz port (0: any)")
    parser.add_argument("--events-address", help="gRPC address of the event stream")
    parser.add_argument("--control-address", help="gRPC address of zone registration")
    parser.add_argument(
        "--xen-zones",
        choices=["auto", "on", "off"],
        help="serve Xen zones' grant channels (auto: when running in Dom0)",
    )
    parser.add_argument("--log-console", action="store_true", help="human-readable logs")
    parser.add_argument(
        "--zone",
        type=parse_zone,
        action="append",
        default=[],
        metavar="NAME=BYTES",
        help="register a zone at start with this memory quota (repeatable; dev and demos)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        key: value
        for key, value in {
            "backend": args.backend,
            "socket_dir": args.socket_dir,
            "metrics_port": args.metrics_port,
            "events_address": args.events_address,
            "control_address": args.control_address,
            "xen_zones": args.xen_zones,
            "log_json": False if args.log_console else None,
        }.items()
        if value is not None
    }
    try:
        config = load_config(args.config, **overrides)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"gpu-proxy: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_json, config.log_level)
    backend = make_backend(config)
    config.socket_dir.mkdir(parents=True, exist_ok=True)
    bus = EventBus()
    registry = ZoneRegistry(backend, config.socket_dir, bus, config.module_cache_bytes)
    try:
        xen_zones = start_xen_zones(config, registry)
    except OSError as exc:
        log.error("cannot serve Xen zones: xenstore is unreachable", reason=str(exc))
        registry.close()
        return 1
    metrics = CollectorRegistry()
    metrics.register(ProxyCollector(lambda: list(registry.zones()), registry.proxy_stats))
    stop = threading.Event()
    telemetry = TelemetryServer(
        metrics,
        health=lambda: (not stop.is_set(), "shutting down"),
        host=config.metrics_host,
        port=config.metrics_port,
    )
    events = serve_events(bus, config.events_address)
    control = serve_control(
        ZoneControlService(registry, config.default_memory_limit, config.gpu),
        config.control_address,
    )
    info = backend.device_info()
    log.info(
        "gpu-proxy serving",
        backend=backend.name,
        device=info.name,
        metrics=f"http://{config.metrics_host}:{telemetry.port}/metrics",
        events=config.events_address,
        control=config.control_address,
        socket_dir=str(config.socket_dir),
        xen_zones=xen_zones is not None,
    )
    for name, limit in args.zone:
        path = registry.register(ZoneIdentity(zone=name, domid=0, gpu_index=config.gpu), limit)
        log.info("static zone", zone=name, socket=str(path))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("gpu-proxy stopping")
    control.stop(5).wait()
    if xen_zones is not None:
        xen_zones.stop()
    registry.close()
    bus.close()
    events.stop(5).wait()
    telemetry.close()
    log.info("gpu-proxy stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
