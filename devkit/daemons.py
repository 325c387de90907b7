"""Our two daemons as child processes, each with its sockets and log file under one directory:
gpu-proxy and vgpu-runtime (process zone backend). The demo, the integration and conformance
tests and the benchmarks start them through these classes.

Each runs in a session of its own, so a Ctrl-C meant for the caller does not reach it: the
caller stops it, after whatever must be torn down first (pods before the runtime, the runtime
before gpu-proxy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cri_runtime.client import CriClient
from gpu_proxy.proto.gen import control_pb2, control_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 20


class DaemonFailed(RuntimeError):
    """A daemon exited or never became ready; the message ends with its log's tail."""


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The log's last lines for a person: JSON entries as "time level event key=value ..."."""
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(readable(line) for line in tail)


def readable(line: str) -> str:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return line
    if not isinstance(entry, dict):
        return line
    time_of_day = str(entry.pop("timestamp", ""))[11:23]
    head = f"{time_of_day} {entry.pop('level', '')}: {entry.pop('event', '')}"
    entry.pop("logger", None)
    return " ".join([head, *(f"{key}={value}" for key, value in entry.items())])


def stop_process(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    """Signal the process and return its exit status; SIGKILL if it ignores `sig` for 30 s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@dataclass
class GpuProxyDaemon:
    """gpu-proxy with its control and event sockets, zone sockets and JSON log under `base`,
    /metrics on 127.0.0.1 (`metrics_port` 0: a free port)."""

    base: Path
    backend: str = "sim"
    metrics_port: int = 0
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[str] | None = None
    serving: dict[str, Any] = field(default_factory=dict)  # its "gpu-proxy serving" log entry

    @property
    def control_address(self) -> str:
        return f"unix://{self.base / 'control.sock'}"

    @property
    def events_address(self) -> str:
        return f"unix://{self.base / 'events.sock'}"

    @property
    def socket_dir(self) -> Path:
        return self.base / "zones"

    @property
    def log_path(self) -> Path:
        return self.base / "gpu-proxy.log"

    @property
    def metrics_url(self) -> str:
        return str(self.serving["metrics"])

    def start(self) -> None:
        """Start and wait until it logs that it is serving (fails with the log's tail)."""
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "gpu_proxy", "--backend", self.backend,
                    "--socket-dir", str(self.socket_dir),
                    "--metrics-port", str(self.metrics_port),
                    "--events-address", self.events_address,
                    "--control-address", self.control_address, *self.extra,
                ],
                cwd=ROOT, stdout=log, stderr=log, text=True, start_new_session=True,
                # JSON at info level: wait_for_log reads its entries
                env={
                    **os.environ, "VGPU_PROXY_LOG_JSON": "true", "VGPU_PROXY_LOG_LEVEL": "info",
                    "VGPU_PROXY_METRICS_HOST": "127.0.0.1",
                },
            )  # fmt: skip
        self.serving = self.wait_for_log("gpu-proxy serving", timeout_s=60)

    def zones(self) -> list[control_pb2.ZoneStatus]:
        """The zones gpu-proxy serves now (ZoneControl List)."""
        with grpc.insecure_channel(self.control_address) as channel:
            reply = control_pb2_grpc.ZoneControlStub(channel).List(
                control_pb2.ListZonesRequest(), timeout=10
            )
        return list(reply.zones)

    def logged(self, event: str) -> dict[str, Any] | None:
        """The first log entry with this event, if it has been written."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("event") == event:
                return entry
        return None

    def wait_for_log(self, event: str, timeout_s: float = 30) -> dict[str, Any]:
        """The first log entry with this event, once it is written."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None  # read the log after: nothing is missed
            entry = self.logged(event)
            if entry is not None:
                return entry
            if exited:
                break
            time.sleep(0.05)
        raise DaemonFailed(
            f"gpu-proxy never logged {event!r} (exit status {self.proc.poll()}); "
            f"{self.log_path} ends:\n{log_tail(self.log_path)}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return stop_process(self.proc, sig)


@dataclass
class RuntimeDaemon:
    """vgpu-runtime (process zone backend) with its CRI socket, state, zones and log under
    `base`; `restart` keeps its state and zones directories."""

    base: Path
    gpu_proxy_control: str = ""
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[str] | None = None
    client: CriClient = field(init=False)

    @property
    def socket(self) -> Path:
        return self.base / "cri.sock"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def zones_dir(self) -> Path:
        return self.base / "zones"

    @property
    def log_path(self) -> Path:
        return self.base / "runtime.log"

    def start(self) -> None:
        """Start and wait until the CRI socket answers Version (fails with the log's tail)."""
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "cri_runtime", "--listen", str(self.socket),
                    "--state-dir", str(self.state_dir), "--zones-dir", str(self.zones_dir),
                    "--zone-backend", "process", "--gpu-proxy-control", self.gpu_proxy_control,
                    "--registry-config-dir", str(self.base / "certs.d"), *self.extra,
                ],
                cwd=ROOT, stdout=log, stderr=log, text=True, start_new_session=True,
            )  # fmt: skip
        self.client = CriClient(self.socket, timeout_s=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                self.client.wait_ready(timeout_s=1)
                return
            except Exception:
                continue
        raise DaemonFailed(
            f"vgpu-runtime did not come up (exit status {self.proc.poll()}); "
            f"{self.log_path} ends:\n{log_tail(self.log_path)}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.client.close()
        return stop_process(self.proc, sig)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()
