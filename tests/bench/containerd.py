"""Debian's containerd 1.6 + runc, the baseline of the CRI lifecycle benchmark: a subprocess with
its own root, state, sockets, runc root and generated config, so a run never touches (or
depends on) a system containerd, and leaves no containers, shims, mounts or files behind.

What it took on these machines (hybrid cgroups v1 + v2, no CNI plugins, no route to
registry.k8s.io):
- ``restrict_oom_score_adj = true``: containers may not get a lower oom_score_adj than ours;
- ``sandbox_image``: a pause image of our own (tests/bench/c/pause.c), pushed to the loopback
  registry by the benchmark, since the upstream one cannot be pulled;
- registry ``config_path``: a hosts directory that makes that registry plain HTTP;
- no CNI: host-network pods (NamespaceOption network=NODE) never call it; containerd only logs
  at start that no network config was found. Such pods must have no hostname (kubelet sends
  none), or runc refuses to set one without a private UTS namespace;
- cgroups as they are (``disable_cgroup`` stays false): runc puts each container under
  ``/k8s.io/<id>`` in every hierarchy and removes it on delete.
Shim sockets still go to /run/containerd/s (a fixed path in containerd 1.6), named by a hash of
our socket address, so they cannot collide with another containerd's.
"""

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from cri_runtime.client import CriClient
from cri_runtime.cri.gen import api_pb2
from tests.bench.harness import C_DIR

BINARIES = ("containerd", "containerd-shim-runc-v2", "runc")
SHIM = "containerd-shim-runc-v2"
SHIM_SOCKETS = Path("/run/containerd/s")
PAUSE_SRC = C_DIR / "pause.c"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class ContainerdError(RuntimeError):
    """containerd did not come up; the message carries its log's tail."""


def unavailable() -> str | None:
    """Why containerd cannot run on this machine, or None: what the benchmark reports instead of
    the baseline's figures."""
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (scripts/setup.sh installs containerd, runc)"
    if os.geteuid() != 0:
        return "containerd needs root (mounts, namespaces, cgroups)"
    return None


def build_pause(out_dir: Path) -> Path:
    """The sandbox image's only file: static, so the image needs no libc."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / "pause"
    cmd = ["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o", str(exe)]
    subprocess.run([*cmd, str(PAUSE_SRC)], check=True)
    return exe


def config_toml(base: Path, sandbox_image: str) -> str:
    cri = '[plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{base}/root"
state = "{base}/state"

[grpc]
  address = "{base}/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"

{cri}]
  restrict_oom_score_adj = true
  sandbox_image = "{sandbox_image}"

{cri}.cni]
  bin_dir = "{base}/cni/bin"
  conf_dir = "{base}/cni/conf"

{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

{cri}.containerd.runtimes.runc.options]
  Root = "{base}/runc"

{cri}.registry]
  config_path = "{base}/hosts"
"""


def hosts_toml(registry: str) -> str:
    """Plain HTTP for a loopback registry (host:port), as containerd's hosts directory says it."""
    return f"""server = "http://{registry}"

[host."http://{registry}"]
  capabilities = ["pull", "resolve"]
"""


class Containerd:
    """One containerd under `base`; `client` is the same CriClient class vgpu-runtime is driven
    with."""

    def __init__(self, base: Path, sandbox_image: str, registries: Sequence[str]) -> None:
        self.base = base
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: CriClient | None = None
        (base / "cni" / "conf").mkdir(parents=True, exist_ok=True)
        for registry in registries:
            hosts = base / "hosts" / registry
            hosts.mkdir(parents=True, exist_ok=True)
            (hosts / "hosts.toml").write_text(hosts_toml(registry))
        self.config.write_text(config_toml(base, sandbox_image))

    @property
    def config(self) -> Path:
        return self.base / "config.toml"

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def log_path(self) -> Path:
        return self.base / "containerd.log"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def log_errors(self, lines: int = 5) -> str:
        """The last error lines of its log: why a pod failed, without the info chatter."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        errors = [line for line in text.splitlines() if "level=error" in line]
        return "\n".join(errors[-lines:])

    def start(self) -> None:
        """Start and wait until its CRI plugin answers Version."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.config)], stdout=log, stderr=log
            )
        client = CriClient(self.socket, timeout_s=120)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                client.wait_ready(timeout_s=1)
            except (grpc.RpcError, grpc.FutureTimeoutError):
                continue
            self.client = client
            return
        client.close()
        raise ContainerdError(
            f"containerd did not serve CRI (exit {self.proc.poll()}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Remove whatever pods are left (a run that failed half-way), stop containerd, then
        kill the containers and shims it left and unmount everything under `base`."""
        if self.client is not None:
            with contextlib.suppress(grpc.RpcError):
                pods = self.client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
                for pod in pods:
                    self.client.stop_pod(pod.id)
                    self.client.remove_pod(pod.id)
            self.client.close()
            self.client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        runc = ["runc", "--root", str(self.base / "runc" / "k8s.io")]
        listed = subprocess.run([*runc, "list", "-q"], capture_output=True, text=True, check=False)
        for container in listed.stdout.split():
            subprocess.run([*runc, "delete", "--force", container], check=False)
        for pid, socket in self.shims().items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            socket.unlink(missing_ok=True)
        for mount in self.mounts():
            subprocess.run(["umount", "-R", mount], check=False)

    def shims(self) -> dict[int, Path]:
        """Shims started for this containerd (their command line names its socket), each with
        the socket file it serves on, which a killed shim leaves behind: containerd 1.6 names
        it by a hash of our socket, the namespace and the task id."""
        shims = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            except OSError:
                continue
            flags = dict(zip(argv[1::2], argv[2::2], strict=False))
            if argv[0].endswith(SHIM.encode()) and flags.get(b"-address") == bytes(self.socket):
                task = b"/".join([bytes(self.socket), flags[b"-namespace"], flags[b"-id"]])
                shims[int(entry.name)] = SHIM_SOCKETS / hashlib.sha256(task).hexdigest()
        return shims

    def mounts(self) -> list[str]:
        """The outermost mount points under `base` (umount -R takes the ones below them)."""
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point.startswith(f"{self.base}/"):
                points.append(point)
        return [p for p in points if not any(p.startswith(f"{q}/") for q in points)]


@contextlib.contextmanager
def running(sandbox_image: str, registries: Sequence[str]) -> Iterator[Containerd]:
    """A started containerd in a fresh short directory (socket paths must stay < 108 bytes),
    stopped and removed afterwards, whatever happens."""
    base = Path(tempfile.mkdtemp(prefix="vbc", dir="/tmp"))
    containerd = Containerd(base, sandbox_image, registries)
    try:
        containerd.start()
        yield containerd
    finally:
        containerd.stop()
        shutil.rmtree(base, ignore_errors=True)
