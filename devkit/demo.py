"""vgpu-isolated end to end on this machine, without a cluster.

    python -m devkit.demo [--keep] [--work-dir DIR] [--metrics-port PORT]

Builds devkit/cuda/hello_vgpu.cu with nvcc (cached in the work dir) and starts a loopback
registry holding it as an image (busybox, the program and the host libraries it loads),
gpu-proxy (``--backend auto``: the GPU when its driver works, else the sim backend) and
vgpu-runtime (process zone backend, mounting libvgpu into GPU containers as libcuda.so.1)
registering zones with it. Then, over the CRI socket, it does what kubelet does for a pod with
``runtimeClassName: vgpu-isolated``: pulls the image, runs the pod with 256Mi of GPU memory,
creates and starts a container, waits for it to exit and reads its log; it shows gpu-proxy's
view of the pod's zone (ZoneControl List, /metrics), removes the pod and checks that gpu-proxy
released the zone. The container's CUDA program (cudart, static) reaches gpu-proxy through
libvgpu: it prints the device it sees, a 64 MiB memory round trip, the same through pinned
memory (cudaMallocHost, shared with gpu-proxy: the copies carry offsets, not data) and one kernel
launch, which the sim backend validates and records without running.

Needs root: the process zone backend creates namespaces, mounts and cgroups.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from cri_runtime.client import container_config, pod_config
from cri_runtime.cri.gen import api_pb2
from cri_runtime.zones.process import CONTROL_SOCKET, MAX_SOCKET_PATH
from devkit.busybox import BUSYBOX
from devkit.cuda_image import LIBVGPU, NVCC, PROGRAM, SOURCE, build_program, push_cuda_image
from devkit.daemons import ROOT, DaemonFailed, GpuProxyDaemon, RuntimeDaemon, log_tail
from devkit.registry import REGISTRY_BINARY, LocalRegistry

DEFAULT_WORK_DIR = Path("/tmp/vgpu-demo")
LOCK_FILE = ".vgpu-demo.lock"  # marks a demo work dir, and is locked while a demo uses it
CACHE_DIR = "cache"  # the nvcc build, kept when the work dir is emptied
SAMPLE_ZONE_ID = "0" * 64  # zones are named by CRI sandbox ids: 64 hex characters
GPU_HANDLER = "vgpu-isolated"
GPU_MEMORY_ANNOTATION = "vgpu-isolated.io/gpu-memory"
GPU_MEMORY = "256Mi"
POD = "demo"
CONTAINER = "hello"
CONTAINER_LOG = f"{CONTAINER}/0.log"  # kubelet's <container>/<attempt>.log
CONTAINER_SCRIPT = f"""\
echo "hello from $(hostname), in a vgpu-isolated zone, as pid $$"
exec {PROGRAM}
"""

# The zone's series the demo shows: the program's own calls (the rest are cudart's and libvgpu's
# start-up and exit), and none of the per-call latency histograms.
PROGRAM_CALLS = ("cuMemAlloc", "cuMemcpy", "cuLaunchKernel", "cuCtxSynchronize", "cuMemFree")
HIDDEN_SERIES = ("vgpu_call_duration_seconds", "vgpu_last_kernel_launch_timestamp_seconds")
SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

T = TypeVar("T")
_title, _usage, *_rest = (__doc__ or "").split("\n\n")
DESCRIPTION = "\n\n".join([_title, *_rest])  # --help's usage line replaces the docstring's


class DemoFailed(Exception):
    """A step failed; `log` is the daemon log that says why. Its tail is read at once: the
    clean-up that follows adds the daemon's shutdown to it."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        if log is not None:
            message += f"\n\n{log} ends:\n{log_tail(log)}"
        super().__init__(message)


def say(text: str = "") -> None:
    print(text, flush=True)  # flushed: a pipe (a test, `| tee`) sees each line as it happens


def section(title: str) -> None:
    say(f"\n== {title} ==")


def short(zone_id: str) -> str:
    return f"{zone_id[:12]}…"


def mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


def problems_before_start(work_dir: Path) -> list[str]:
    """What would make the demo fail before it starts anything."""
    problems = []
    if os.geteuid() != 0:
        problems.append("needs root: the process zone backend creates namespaces and mounts")
    for path, package in [(BUSYBOX, "busybox-static"), (REGISTRY_BINARY, "docker-registry")]:
        if not path.is_file():
            problems.append(f"{path} not found: install Debian's {package}")
    if not (shutil.which("crun") or shutil.which("runc")):
        problems.append("no OCI runtime: install Debian's crun or runc")
    if not os.access(NVCC, os.X_OK):
        problems.append(f"{NVCC} not found: the CUDA 13 toolkit's nvcc builds the pod's program")
    if not LIBVGPU.is_file():
        problems.append(
            f"{LIBVGPU} not found: build it with python -m libvgpu.build (setup.sh does)"
        )
    longest = max(
        work_dir / "zones" / SAMPLE_ZONE_ID / CONTROL_SOCKET,
        GpuProxyDaemon(work_dir / "gpu-proxy").socket_dir / f"{SAMPLE_ZONE_ID}.sock",
        key=lambda path: len(os.fsencode(path)),
    )
    room = MAX_SOCKET_PATH - len(os.fsencode(longest)) + len(os.fsencode(work_dir))
    if len(os.fsencode(work_dir)) > room:
        problems.append(
            f"work dir {work_dir} is too long: zone sockets under it would not fit the "
            f"{MAX_SOCKET_PATH} bytes of a unix socket path; pick one of at most {room} bytes"
        )
    return problems


def processes_using(work_dir: Path) -> list[int]:
    """Processes whose command line names a path under the work dir (daemons and zones of an
    earlier demo that was killed before it could stop them)."""
    needle = f"{work_dir}/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def claim_work_dir(work_dir: Path) -> int:
    """Lock the work dir for this demo and empty it of an earlier run's files but the nvcc
    build's cache; returns the lock's file descriptor (the lock lasts while it is open)."""
    if work_dir.exists() and any(work_dir.iterdir()) and not (work_dir / LOCK_FILE).exists():
        raise DemoFailed(f"{work_dir} is not empty and not a demo work dir; pick another one")
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = os.open(work_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise DemoFailed(
            f"another demo is running in {work_dir}; pick another --work-dir"
        ) from None
    leftovers = processes_using(work_dir)
    if leftovers:
        os.close(lock)
        pids = " ".join(map(str, leftovers))
        raise DemoFailed(f"processes of an earlier demo still use {work_dir}: kill {pids}")
    for entry in work_dir.iterdir():
        if entry.name not in {LOCK_FILE, CACHE_DIR}:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return lock


class Demo:
    """The demo's steps; `stack` tears down what they started, last started first."""

    def __init__(self, work_dir: Path, metrics_port: int, stack: contextlib.ExitStack) -> None:
        self.work_dir = work_dir
        self.stack = stack
        self.registry = LocalRegistry(work_dir / "registry")
        self.proxy = GpuProxyDaemon(work_dir / "gpu-proxy", "auto", metrics_port)
        self.runtime = RuntimeDaemon(
            work_dir, self.proxy.control_address, extra=("--libvgpu", str(LIBVGPU))
        )
        self.pod_logs = work_dir / "pod-logs"
        self.pod_id = ""  # while the pod exists

    def start(self) -> None:
        section("Starting")
        self.stack.callback(self.stop_registry)
        self.registry.start()
        say(f"  registry      {self.registry.url}    log {self.registry.log_file}")
        self.stack.callback(self.stop_daemon, "gpu-proxy", self.proxy)
        self.proxy.start()
        backend = f"{self.proxy.serving['backend']} backend, {self.proxy.serving['device']}"
        if self.proxy.logged("no usable GPU, using the sim backend"):
            backend += " (no usable GPU: its log says why)"
        say(f"  gpu-proxy     {backend}")
        say(f"                metrics {self.proxy.metrics_url}    log {self.proxy.log_path}")
        self.stack.callback(self.stop_daemon, "vgpu-runtime", self.runtime)
        self.runtime.start()
        say(f"  vgpu-runtime  CRI unix://{self.runtime.socket}, process zone backend")
        say(f"                libcuda.so.1 in GPU containers: {LIBVGPU}")
        say(f"                log {self.runtime.log_path}")

    def stop_daemon(self, name: str, daemon: GpuProxyDaemon | RuntimeDaemon) -> None:
        if daemon.proc is not None:
            say(f"  stopped {name} (exit status {daemon.stop()})")

    def stop_registry(self) -> None:
        self.registry.stop()
        say("  stopped the registry")

    def cri(self, call: str, run: Callable[[], T]) -> tuple[T, float]:
        """Run one CRI call; returns its result and how long it took (seconds)."""
        started = time.perf_counter()
        try:
            result = run()
        except grpc.RpcError as exc:
            raise DemoFailed(
                f"{call} failed: {exc.code().name}: {exc.details()}", self.runtime.log_path
            ) from exc
        return result, time.perf_counter() - started

    def pull(self) -> str:
        section("Image")
        program = build_program(self.work_dir / CACHE_DIR)
        how = "cached" if program.build_s is None else f"{program.build_s:.1f} s"
        say(f"  nvcc {program.nvcc_version}     {SOURCE.relative_to(ROOT)} ({how})")
        image, libraries = push_cuda_image(self.registry, "demo/hello-vgpu", "latest", program.path)
        say(f"  pushed {image}: busybox, /usr/local/bin/{PROGRAM} and from the host")
        say(f"    {' '.join(Path(path).name for path in libraries)}")
        image_id, took = self.cri("PullImage", lambda: self.runtime.client.pull(image))
        say(f"  PullImage         {took * 1000:6.0f} ms   image {image_id[:19]}…")
        return image

    def run_container(self, image: str) -> None:
        section("Pod")
        client = self.runtime.client
        config = pod_config(
            POD,
            log_directory=self.pod_logs,
            annotations={GPU_MEMORY_ANNOTATION: GPU_MEMORY},
        )
        self.pod_id, took = self.cri("RunPodSandbox", lambda: client.run_pod(config, GPU_HANDLER))
        self.stack.callback(self.remove_pod_on_exit)
        say(
            f"  RunPodSandbox     {took * 1000:6.0f} ms   pod {short(self.pod_id)} "
            f"(handler {GPU_HANDLER}, {GPU_MEMORY} of GPU memory)"
        )
        container = container_config(
            CONTAINER, image, ["sh", "-c", CONTAINER_SCRIPT], log_path=CONTAINER_LOG
        )
        container_id, took = self.cri(
            "CreateContainer", lambda: client.create(self.pod_id, container, config)
        )
        say(f"  CreateContainer   {took * 1000:6.0f} ms   container {short(container_id)}")
        _, took = self.cri("StartContainer", lambda: client.start(container_id))
        say(f"  StartContainer    {took * 1000:6.0f} ms")
        status, _ = self.cri("ContainerStatus", lambda: client.wait_exit(container_id, 60))
        if status.state != api_pb2.CONTAINER_EXITED:
            raise DemoFailed("the container was still running after 60 s", self.runtime.log_path)
        say(f"  exited: exit code {status.exit_code} ({status.reason})")

        section(f"Container output ({self.pod_logs / CONTAINER_LOG})")
        for stream, line in read_cri_log(self.pod_logs / CONTAINER_LOG):
            say(f"  {line}" if stream == "stdout" else f"  [{stream}] {line}")
        if status.exit_code != 0:
            raise DemoFailed(f"the container failed with exit code {status.exit_code}")

    def show_zone(self) -> None:
        section("gpu-proxy: zones (ZoneControl List)")
        zones = self.proxy.zones()
        for zone in zones:
            identity = zone.identity
            say(f"  zone    {identity.zone}")
            say(f"  pod     {identity.namespace}/{identity.pod}")
            say(f"  quota   {mib(zone.memory_limit_bytes)}, {mib(zone.memory_used_bytes)} used")
            say(f"  socket  {zone.socket_path}")
        if self.pod_id not in {zone.identity.zone for zone in zones}:
            raise DemoFailed("gpu-proxy lists no zone for the pod", self.runtime.log_path)
        self.show_metrics()

    def show_metrics(self) -> None:
        """The zone's series that show the program's work; the rest are counted, not shown."""
        section(f"gpu-proxy: the zone's series in {self.proxy.metrics_url}")
        series = [parse_series(line) for line in self.zone_metrics(self.pod_id)]
        if not series:
            raise DemoFailed("gpu-proxy's /metrics has no series for the zone", self.proxy.log_path)
        calls = [one for one in series if one.name == "vgpu_calls_total"]
        results: Counter[str] = Counter()
        for call in calls:
            results[call.labels["result"]] += int(call.value)
        apis = {call.labels["api"] for call in calls}
        tally = ", ".join(f"{count} {result}" for result, count in results.items())
        hidden: Counter[str] = Counter()
        for one in series:
            if one is calls[0]:
                say(f"  vgpu_calls_total: {results.total()} calls to {len(apis)} APIs ({tally}),")
                say("  the program's own:")
            if one.name == "vgpu_calls_total":
                shown = one.labels["result"] != "CUDA_SUCCESS" or (
                    one.labels["api"].startswith(PROGRAM_CALLS)
                )
            elif one.name == "vgpu_handles":
                shown = one.value != 0
            else:
                shown = not one.name.startswith(HIDDEN_SERIES)
            if shown:
                say(f"  {one.without_zone()}")
            else:
                hidden[one.name] += 1
        say(
            f"  (zone label left out; not shown: {hidden['vgpu_calls_total']} vgpu_calls_total "
            "series of cudart's and libvgpu's"
        )
        say("   start-up and exit, vgpu_call_duration_seconds per API, the last launch's time,")
        say(f"   {hidden['vgpu_handles']} vgpu_handles kinds at 0)")

    def keep_running(self) -> None:
        """Wait for Ctrl-C (or SIGTERM), failing if a daemon dies meanwhile."""
        section("Running (--keep): Ctrl-C removes the pod and stops everything")
        say(f"  curl -s {self.proxy.metrics_url} | grep ^vgpu_")
        say(f"  crictl --runtime-endpoint unix://{self.runtime.socket} pods    (cri-tools' crictl)")
        say(f"  ZoneControl (gRPC): {self.proxy.control_address}")
        daemons: list[tuple[str, GpuProxyDaemon | RuntimeDaemon]] = [
            ("gpu-proxy", self.proxy),
            ("vgpu-runtime", self.runtime),
        ]
        try:
            while True:
                for name, daemon in daemons:
                    assert daemon.proc is not None
                    if daemon.proc.poll() is not None:
                        raise DemoFailed(
                            f"{name} exited (status {daemon.proc.returncode})", daemon.log_path
                        )
                time.sleep(0.5)
        except KeyboardInterrupt:
            say()

    def remove_pod(self) -> str:
        """Stop and remove the pod, as kubelet does when it is deleted; returns its id."""
        pod_id, self.pod_id = self.pod_id, ""
        client = self.runtime.client
        section("Removing the pod")
        _, took = self.cri("StopPodSandbox", lambda: client.stop_pod(pod_id))
        say(f"  StopPodSandbox    {took * 1000:6.0f} ms")
        _, took = self.cri("RemovePodSandbox", lambda: client.remove_pod(pod_id))
        say(f"  RemovePodSandbox  {took * 1000:6.0f} ms")
        return pod_id

    def remove_pod_on_exit(self) -> None:
        """After a failure or Ctrl-C: remove the pod if it still exists, reporting (not
        raising) a failure so that the first error stays the one shown."""
        if self.pod_id:
            try:
                self.remove_pod()
            except DemoFailed as exc:
                say(f"  could not remove the pod: {exc}")

    def check_released(self, zone_id: str) -> None:
        still_held = [
            what
            for what, held in [
                ("ZoneControl lists it", zone_id in {z.identity.zone for z in self.proxy.zones()}),
                ("/metrics has its series", bool(self.zone_metrics(zone_id))),
                ("its socket exists", (self.proxy.socket_dir / f"{zone_id}.sock").exists()),
            ]
            if held
        ]
        if still_held:
            raise DemoFailed(
                f"gpu-proxy did not release the zone: {', '.join(still_held)}",
                self.proxy.log_path,
            )
        say("  gpu-proxy released the zone: not in ZoneControl List or /metrics, socket removed")
        say(f"  vgpu_proxy_zone_teardowns_total {self.metric('vgpu_proxy_zone_teardowns_total')}")

    def scrape(self) -> list[str]:
        with urllib.request.urlopen(self.proxy.metrics_url, timeout=10) as response:
            text: str = response.read().decode()
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    def zone_metrics(self, zone_id: str) -> list[str]:
        return [line for line in self.scrape() if f'zone="{zone_id}"' in line]

    def metric(self, name: str) -> str:
        """The value of an unlabelled series."""
        for line in self.scrape():
            if line.startswith(f"{name} "):
                return line.split()[1]
        return "absent"

    def done(self, kept: bool) -> None:
        section("Done")
        say(f"  logs and state stay in {self.work_dir} until the next run empties it")
        if not kept:
            say("  python -m devkit.demo --keep leaves the pod and daemons running until Ctrl-C,")
            say("  to curl /metrics and use the CRI socket")


@dataclass(frozen=True)
class Series:
    """One sample of a /metrics exposition."""

    name: str
    labels: dict[str, str]
    value: float

    def without_zone(self) -> str:
        """The sample without its zone label, whole numbers as such, bytes also in MiB."""
        labels = ",".join(f'{k}="{v}"' for k, v in self.labels.items() if k != "zone")
        value = f"{self.value:.0f}" if self.value.is_integer() else f"{self.value:g}"
        if self.name.endswith(("_bytes", "_bytes_total")):
            value += f" ({mib(int(self.value))})"
        return f"{self.name}{{{labels}}} {value}" if labels else f"{self.name} {value}"


def parse_series(line: str) -> Series:
    match = SAMPLE.match(line)
    if match is None:
        raise DemoFailed(f"gpu-proxy's /metrics has a line that is not a sample: {line!r}")
    name, labels, value = match.groups()
    return Series(name, dict(LABEL.findall(labels or "")), float(value))


def read_cri_log(path: Path) -> Iterator[tuple[str, str]]:
    """(stream, line) of a CRI log (``<time> <stream> <F|P> <text>``), partial lines joined."""
    partial = {"stdout": "", "stderr": ""}
    for entry in path.read_text(errors="replace").splitlines():
        _, stream, tag, text = entry.split(" ", 3)
        if tag == "P":
            partial[stream] += text
        else:
            yield stream, partial[stream] + text
            partial[stream] = ""


def run(args: argparse.Namespace) -> None:
    work_dir: Path = args.work_dir.absolute()
    say(f"vgpu-isolated demo in {work_dir}")
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, claim_work_dir(work_dir))
        demo = Demo(work_dir, args.metrics_port, stack)
        demo.start()
        image = demo.pull()
        demo.run_container(image)
        demo.show_zone()
        if args.keep:
            demo.keep_running()
        demo.check_released(demo.remove_pod())
        section("Stopping")
    demo.done(args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devkit.demo",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="after the container ran, leave the pod and daemons running until Ctrl-C "
        "(to curl /metrics or use the CRI socket)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help=f"sockets, state, logs and the nvcc build (default {DEFAULT_WORK_DIR}; emptied at "
        "start but for the build; short: zone sockets under it must fit a unix socket path)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="gpu-proxy's /metrics port (default: a free one)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = problems_before_start(args.work_dir.absolute())
    if problems:
        print("demo cannot start:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 2
    # Ctrl-C, kill and a closed terminal (unless nohup ignores it) all tear down what the demo
    # started: the daemons run in sessions of their own, so only the demo can stop them.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.default_int_handler)
    try:
        run(args)
    except (DemoFailed, DaemonFailed, RuntimeError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
