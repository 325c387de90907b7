"""CRI pod lifecycle latency: ``python -m tests.bench.cri_lifecycle [--quick]``.

vgpu-runtime (process backend) against Debian's containerd 1.6 + runc (tests/bench/containerd.py),
both driven through the same CriClient in the same run, one pod at a time: RunPodSandbox,
CreateContainer, StartContainer and the pod's teardown (StopPodSandbox + RemovePodSandbox), for
a host-network pod (so containerd needs no CNI) with one busybox ``sleep`` container. The image
comes from a loopback registry and is pulled into both before timing; one untimed pod each warms
up (containerd pulls its sandbox image then). Rounds alternate which runtime goes first, so
drift of this (noisy, 2-core) machine lands on both. Goal: each call's p50 within 1.5x of
containerd's; Create + Start together and the teardown are reported beside them. An A/A run
(containerd against a second containerd) gave ratios of 0.96-1.03 with 20 pods. If containerd
cannot run here, the output and the JSON say why and the vgpu-runtime figures are still
reported.
Results: results/bench/cri_lifecycle.json.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import grpc

from cri_runtime.client import CriClient, container_config, pod_config
from cri_runtime.cri.gen import api_pb2
from tests.bench import containerd
from tests.bench.harness import ROOT, goal_report, print_goals
from tests.daemons import RuntimeDaemon
from tests.registry import LocalRegistry, busybox_image, push_image

RESULTS = ROOT / "results" / "bench" / "cri_lifecycle.json"
GOAL_CALLS = ("run_pod_sandbox", "create_container", "start_container")
# create_and_start: the runtimes split the work differently (containerd creates the runc task in
# StartContainer), so their sum is the like-for-like figure; teardown: Stop + RemovePodSandbox.
CALLS = (*GOAL_CALLS, "create_and_start", "teardown")
RUNTIMES = ("vgpu_runtime", "containerd")
GOALS = {f"{call}_vs_containerd": ("<=", 1.5) for call in GOAL_CALLS}


def pod_lifecycle(client: CriClient, image: str, name: str, logs: Path) -> dict[str, float]:
    """One pod through the calls kubelet makes, each timed in ms. The pod's log directory is
    made first, as kubelet does."""
    log_dir = logs / name
    (log_dir / "sleeper").mkdir(parents=True)
    cfg = pod_config(name, host_network=True, log_directory=log_dir)
    ctr = container_config("sleeper", image, ["sleep", "3600"], log_path="sleeper/0.log")
    t0 = time.perf_counter()
    pod = client.run_pod(cfg)
    t1 = time.perf_counter()
    cid = client.create(pod, ctr, cfg)
    t2 = time.perf_counter()
    client.start(cid)
    t3 = time.perf_counter()
    state = client.status(cid).state
    t4 = time.perf_counter()
    client.stop_pod(pod)
    client.remove_pod(pod)
    t5 = time.perf_counter()
    if state != api_pb2.CONTAINER_RUNNING:
        raise RuntimeError(f"{name}: container not running after StartContainer (state {state})")
    return {
        "run_pod_sandbox": (t1 - t0) * 1e3,
        "create_container": (t2 - t1) * 1e3,
        "start_container": (t3 - t2) * 1e3,
        "create_and_start": (t3 - t1) * 1e3,
        "teardown": (t5 - t4) * 1e3,
    }


def pause_layer(exe: Path) -> bytes:
    """The sandbox image's one layer: /pause, executable (push_image's file dicts make 0644)."""
    buffer = BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("pause")
        info.size = exe.stat().st_size
        info.mode = 0o755
        archive.addfile(info, BytesIO(exe.read_bytes()))
    return buffer.getvalue()


@contextlib.contextmanager
def images(tmp: Path) -> Iterator[tuple[str, str, str]]:
    """A loopback registry with the busybox image and containerd's sandbox image; yields
    (registry host:port, busybox reference, pause reference)."""
    registry = LocalRegistry(tmp / "registry").start()
    try:
        layer = pause_layer(containerd.build_pause(tmp / "pause"))
        push_image(registry, "bench/pause", "1", [layer], {"Entrypoint": ["/pause"]})
        yield registry.host, busybox_image(registry), f"{registry.host}/bench/pause:1"
    finally:
        registry.stop()


def p90(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10, method="inclusive")[8]


@contextlib.contextmanager
def vgpu_runtime() -> Iterator[RuntimeDaemon]:
    """vgpu-runtime with the process backend and no gpu-proxy (the pods are plain), cleaned up
    like the conformance suite's daemon."""
    base = Path(tempfile.mkdtemp(prefix="vb", dir="/tmp"))
    daemon = RuntimeDaemon(base)
    try:
        daemon.start()
        yield daemon
    finally:
        if daemon.proc is not None:
            with contextlib.suppress(grpc.RpcError):
                pods = daemon.client.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
                for pod in pods:
                    daemon.client.remove_pod(pod.id)
            daemon.stop()
        subprocess.run(["umount", "-R", "-q", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def start_baseline(
    stack: contextlib.ExitStack, pause: str, registry: str, image: str, logs: Path
) -> tuple[CriClient | None, str | None]:
    """containerd with the image pulled and one pod run; else None and why it cannot run here
    (with its log's errors), which the report then carries instead of its figures."""
    why = containerd.unavailable()
    if why is not None:
        return None, why
    try:
        baseline = stack.enter_context(containerd.running(pause, [registry]))
    except containerd.ContainerdError as exc:
        return None, str(exc)
    assert baseline.client is not None
    try:
        baseline.client.pull(image)
        pod_lifecycle(baseline.client, image, "warm-containerd", logs)
    except grpc.RpcError as exc:
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        return None, f"containerd failed its first pod: {details}\n{baseline.log_errors()}"
    return baseline.client, None


def measure(quick: bool) -> dict[str, Any]:
    pods = 5 if quick else 20
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in RUNTIMES}
    with (
        tempfile.TemporaryDirectory(prefix="cri-bench-") as tmp,
        images(Path(tmp)) as (registry, image, pause),
        vgpu_runtime() as ours,
        contextlib.ExitStack() as stack,
    ):
        logs = Path(tmp) / "logs"
        ours.client.pull(image)
        pod_lifecycle(ours.client, image, "warm-vgpu_runtime", logs)
        clients = {"vgpu_runtime": ours.client}
        baseline, why_no_containerd = start_baseline(stack, pause, registry, image, logs)
        if baseline is not None:
            clients["containerd"] = baseline
        versions = {name: client.wait_ready().runtime_version for name, client in clients.items()}
        order = list(clients)
        for i in range(pods):
            for name in order if i % 2 == 0 else reversed(order):
                samples[name].append(pod_lifecycle(clients[name], image, f"{name}-{i}", logs))
    figures: dict[str, float] = {}
    for name in clients:
        for call in CALLS:
            values = [s[call] for s in samples[name]]
            figures[f"{name}_{call}_p50_ms"] = statistics.median(values)
            figures[f"{name}_{call}_p90_ms"] = p90(values)
    if why_no_containerd is None:
        for call in CALLS:
            figures[f"{call}_vs_containerd"] = (
                figures[f"vgpu_runtime_{call}_p50_ms"] / figures[f"containerd_{call}_p50_ms"]
            )
        goals = goal_report(figures, GOALS)
    else:
        goals = {
            name: {"value": None, "goal": f"{op} {target}", "met": None}
            for name, (op, target) in GOALS.items()
        }
    return {
        "quick": quick,
        "pods_per_runtime": pods,
        "machine_cpu_count": os.cpu_count(),
        "versions": versions,
        "containerd": {"available": why_no_containerd is None, "why_not": why_no_containerd},
        "figures": figures,
        "goals": goals,
        "raw": samples,
    }


def print_report(result: dict[str, Any], out: Path) -> None:
    figures = result["figures"]
    mode = "quick" if result["quick"] else "full"
    print(f"CRI lifecycle benchmark ({mode} run, {result['pods_per_runtime']} pods per runtime)")
    for name, version in result["versions"].items():
        print(f"  {name}: {version}")
    print(f"  {'call':<18} {'runtime':<13} {'p50 ms':>9} {'p90 ms':>9} {'p50 vs containerd':>18}")
    for call in CALLS:
        for name in RUNTIMES:
            if f"{name}_{call}_p50_ms" not in figures:
                continue
            ratio = figures.get(f"{call}_vs_containerd") if name == "vgpu_runtime" else None
            print(
                f"  {call:<18} {name:<13} {figures[f'{name}_{call}_p50_ms']:>9.1f}"
                f" {figures[f'{name}_{call}_p90_ms']:>9.1f}"
                f" {'' if ratio is None else f'{ratio:.2f}x':>18}"
            )
    if result["containerd"]["available"]:
        print_goals(result["goals"])
    else:
        print("goals: NOT MEASURED, containerd (the baseline) could not run here:")
        print("  " + result["containerd"]["why_not"].replace("\n", "\n  "))
    print(f"results: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pods (demo, smoke)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    result = measure(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result, args.out)
    return 0 if all(math.isfinite(v) for v in result["figures"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
