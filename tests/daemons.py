"""Our daemons as real processes for integration and conformance tests: gpu-proxy (sim
backend) and vgpu-runtime (process zone backend), each on sockets under a test directory."""

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

from cri_runtime.client import CriClient

ROOT = Path(__file__).resolve().parents[1]


def wait_for_log(proc: subprocess.Popen[str], event: str, timeout: float = 30) -> dict[str, Any]:
    """Read the daemon's JSON log lines until `event`; fail with the daemon's exit status."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        try:
            record: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == event:
            return record
    raise AssertionError(f"daemon never logged {event!r} (exit {proc.poll()})")


def start_proxy(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "gpu_proxy", "--backend", "sim",
            "--socket-dir", str(tmp_path / "zones"), "--metrics-port", "0",
            "--events-address", f"unix://{tmp_path / 'events.sock'}",
            "--control-address", f"unix://{tmp_path / 'control.sock'}", *extra,
        ],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "VGPU_PROXY_LOG_LEVEL": "info"},
    )  # fmt: skip


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@dataclass
class RuntimeDaemon:
    """vgpu-runtime started from a test; `restart` keeps its state and zones directories."""

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
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "cri_runtime", "--listen", str(self.socket),
                    "--state-dir", str(self.state_dir), "--zones-dir", str(self.zones_dir),
                    "--gpu-proxy-control", self.gpu_proxy_control,
                    "--registry-config-dir", str(self.base / "certs.d"), *self.extra,
                ],
                cwd=ROOT, stdout=log, stderr=log, text=True,
            )  # fmt: skip
        self.client = CriClient(self.socket, timeout_s=120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                self.client.wait_ready(timeout_s=1)
                return
            except Exception:
                continue
        tail = self.log_path.read_text()[-3000:]
        raise AssertionError(f"vgpu-runtime did not come up (exit {self.proc.poll()}):\n{tail}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.client.close()
        return stop(self.proc, sig)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()
