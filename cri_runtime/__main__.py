"""vgpu-runtime: the CRI v1 server kubelet talks to for vgpu-isolated pods.

    vgpu-runtime [--config FILE] [--listen SOCKET] [--zone-backend process|xen] ...

Serves RuntimeService and ImageService on a unix socket (kubelet:
--container-runtime-endpoint=unix:///run/vgpu-isolated/vgpu-runtime.sock). Each pod sandbox is
a zone with its own agent; pods whose runtime handler is a GPU handler (vgpu-isolated) are
registered with gpu-proxy first. SIGTERM/SIGINT: stop serving and exit 0; zones keep running
and are reconciled on the next start.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from cri_runtime.config import DEFAULT_CONFIG, RuntimeConfig, load_config
from vgpu_common.logs import configure_logging

log = structlog.stdlib.get_logger("vgpu_runtime")

EPILOG = f"""\
configuration: defaults, then the TOML file (--config, else {DEFAULT_CONFIG} if present), then
environment variables VGPU_RUNTIME_<SETTING> (e.g. VGPU_RUNTIME_ZONE_BACKEND=process), then these
options. Settings: {", ".join(RuntimeConfig.model_fields)}.
The process zone backend runs zones as host processes in fresh namespaces: it is for
development and CI and is NOT an isolation boundary.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="vgpu-runtime",
        description=(__doc__ or "").split("\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", type=Path, help="TOML configuration file")
    ap.add_argument("--listen", type=Path, help="unix socket to serve CRI on")
    ap.add_argument("--state-dir", type=Path, help="records and images")
    ap.add_argument("--zones-dir", type=Path, help="per-zone working files")
    ap.add_argument("--zone-backend", choices=["process", "xen"])
    ap.add_argument("--gpu-proxy-control", help="gpu-proxy ZoneControl address ('' for none)")
    ap.add_argument("--registry-config-dir", type=Path, help="<host>/hosts.toml mirror configs")
    ap.add_argument("--libvgpu", type=Path, help="libvgpu.so to mount as libcuda.so.1")
    ap.add_argument("--oci-runtime", choices=["auto", "crun", "runc"])
    ap.add_argument("--log-console", action="store_true", help="human-readable logs, not JSON")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict[str, Any] = {
        key: value
        for key, value in vars(args).items()
        if key not in ("config", "log_console") and value is not None
    }
    if args.log_console:
        overrides["log_json"] = False
    try:
        config = load_config(args.config, **overrides)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"vgpu-runtime: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_json, config.log_level)
    from cri_runtime.server import RuntimeServer

    try:
        server = RuntimeServer(config)
        server.start()
    except Exception as exc:
        log.exception("vgpu-runtime failed to start", error=str(exc))
        return 1
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal received; stopping", signal=signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
