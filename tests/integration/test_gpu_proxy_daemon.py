"""The gpu-proxy daemon as a real process: start-up, a guest's calls, /healthz, a /metrics scrape
that promtool accepts, and a clean SIGTERM shutdown that leaves no zone socket behind."""

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from devkit.daemons import ROOT, GpuProxyDaemon
from idm.gen.codec import CALLS_BY_NAME
from idm.links.local import LocalLink
from idm.wire import MAX_PAYLOAD


def test_daemon_serves_a_zone_and_shuts_down_cleanly(tmp_path: Path) -> None:
    proxy = GpuProxyDaemon(tmp_path, extra=("--zone", "demo=67108864"))
    try:
        proxy.start()
        assert "vgpu sim" in proxy.serving["device"]
        metrics_url = proxy.metrics_url
        proxy.wait_for_log("static zone")
        with urllib.request.urlopen(metrics_url.replace("/metrics", "/healthz")) as health:
            assert health.status == 200
        channel = LocalLink.connect(proxy.socket_dir / "demo.sock").open_channel()
        channel.hello_client(MAX_PAYLOAD)
        alloc = CALLS_BY_NAME["cuMemAlloc_v2"]
        channel.send(alloc.opcode, alloc.encode_request(1 << 20), seq=1)
        reply = channel.recv(timeout_ms=10_000)
        assert reply is not None and reply.header.status == 0
        with urllib.request.urlopen(metrics_url) as response:
            exposition = response.read().decode()
        assert 'vgpu_device_memory_used_bytes{zone="demo"} 1.048576e+06' in exposition
        promtool = shutil.which("promtool")
        assert promtool, "promtool not found: install Debian's prometheus package (setup.sh)"
        check = subprocess.run(
            [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True
        )
        assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
        channel.close()
        assert proxy.stop() == 0
        assert not (proxy.socket_dir / "demo.sock").exists()
    finally:
        if proxy.proc is not None and proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait()


def test_invalid_configuration_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('backend = "quantum"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_proxy", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "invalid configuration" in proc.stderr and "backend" in proc.stderr


def test_help_explains_configuration() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_proxy", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0
    assert "VGPU_PROXY_" in proc.stdout and "--zone NAME=BYTES" in proc.stdout
