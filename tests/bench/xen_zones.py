"""Xen zones in the nested testbed: ``python -m tests.bench.xen_zones [--quick]``.

Boots the testbed once and, inside Dom0, measures
- the channel: the same synchronous null-call round trip (Python zone side -> ChannelServer in
  another process -> reply) over GrantLink (Dom0 offers to itself: real gntalloc, gntdev, event
  channels, xenstored) and over LocalLink (memfd + eventfds), plus a 256 KiB echo over each;
- a zone's start, stage by stage, through the real CRI path (tests/xen/dom0/xen_stack.py):
  ``xl create -p``, unpause to the agent's control channel (kernel boot, then the agent's Python
  start, split by the zone console's stage lines), CreateContainer (image disk built and
  attached), StartContainer, StartContainer's return to gpu-proxy attaching the program's GPU
  channel (its first CUDA call), the program's run, and the pod's removal.
Under software emulation absolute figures mean little (a syscall costs ~50 us, Python runs ~11x
slower); the ratios and the split of a start are the figures. Results: results/bench/xen_zones.json.
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from idm.channel import Channel, RingLayout
from idm.wire import MAX_PAYLOAD, Op
from tests.bench.harness import ROOT, figures_main, goal_report

RESULTS = ROOT / "results" / "bench" / "xen_zones.json"
LAYOUT = RingLayout(req_order=16, rsp_order=16)
ECHO_BYTES = 256 << 10
TIMEOUT_MS = 30_000
# Issue 7 asks for the ratio, with no target: under emulation it measures Xen's doorbell
# (event channel hypercalls) against eventfd more than it predicts real hardware.
GOALS: dict[str, tuple[str, float]] = {}


def _serve(open_host: Callable[[], Channel], ready: Connection) -> None:
    """Child process: the host side, serving until the zone side closes the channel. Says it is
    up first: a local host's accept blocks until the zone side connects."""
    from idm.server import ChannelServer

    ready.send("up")
    ChannelServer(open_host(), {}, max_payload=MAX_PAYLOAD).serve()


def _round_trips(channel: Channel, calls: int, payload: bytes) -> list[int]:
    times = []
    for seq in range(calls):
        t0 = time.perf_counter_ns()
        channel.send(Op.NULL, payload, seq=seq, timeout_ms=TIMEOUT_MS)
        reply = channel.recv(TIMEOUT_MS)
        times.append(time.perf_counter_ns() - t0)
        if reply is None or len(reply.payload) != len(payload):
            raise RuntimeError(f"bad echo at call {seq}")
    return times


def _summary(times: list[int]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "calls": len(times),
        "p50_us": statistics.median(ordered) / 1000,
        "p90_us": ordered[int(len(ordered) * 0.9)] / 1000,
    }


def _measure(
    open_zone: Callable[[], Channel], open_host: Callable[[], Channel], calls: int
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    host = ctx.Process(target=_serve, args=(open_host, theirs), daemon=True)
    host.start()
    try:
        if not ours.poll(60):
            raise RuntimeError("the host side did not come up in 60 s")
        ours.recv()
        zone = open_zone()
        zone.hello_client(MAX_PAYLOAD)
        _round_trips(zone, calls // 10, b"")  # warm-up: page faults, first sleeps
        null = _summary(_round_trips(zone, calls, b""))
        echo = _summary(_round_trips(zone, max(calls // 20, 5), b"\xa5" * ECHO_BYTES))
        zone.close()
        return {"null": null, "echo_256k": echo}
    finally:
        host.terminate()
        host.join(10)


def _grant(calls: int) -> dict[str, Any]:
    from idm.links.grant import GrantLink
    from idm.xen.xenstore import Xenstore

    xs = Xenstore.connect()
    own = xs.own_domid()
    # The zone side offers first; the host (the child, forked after) attaches that offer.
    link = GrantLink.offer("bench", LAYOUT, xs, own)

    def open_host() -> Channel:
        with Xenstore.connect() as host_xs:
            return GrantLink.attach(own, "bench", host_xs, host_domid=own).open_channel()

    try:
        return _measure(link.open_channel, open_host, calls)
    finally:
        link.close()
        xs.close()


def _local(calls: int) -> dict[str, Any]:
    from idm.links.local import LocalLink, LocalListener

    with tempfile.TemporaryDirectory(prefix="xb-", dir="/tmp") as tmp:
        path = Path(tmp) / "s"
        listener = LocalListener(path)

        def open_host() -> Channel:
            return listener.accept().open_channel()

        def open_zone() -> Channel:
            return LocalLink.connect(path, LAYOUT).open_channel()

        try:
            return _measure(open_zone, open_host, calls)
        finally:
            listener.close()


def _log_entries(path: Path, event: str) -> list[dict[str, Any]]:
    """A daemon's JSON log entries with this event (other lines are skipped)."""
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            entries.append(entry)
    return entries


def _console_stages(domain: str) -> dict[str, float]:
    """Guest uptime at each VGPU-ZONE-STAGE line of the zone's console (xenconsoled's log)."""
    console = Path("/var/log/xen/console") / f"guest-{domain}.log"
    stages = {}
    for line in console.read_text(errors="replace").splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "VGPU-ZONE-STAGE":
            stages[fields[1]] = float(fields[2])
    return stages


def _zone_start(stack: Any, index: int) -> dict[str, float]:
    from datetime import datetime

    from cri_runtime.client import container_config
    from tests.xen.dom0 import xen_stack as xs

    t0 = time.monotonic()
    pod = xs.run_pod(stack, f"bench-{index}", "64Mi")
    run_pod_s = time.monotonic() - t0
    domain = f"vgpu-{pod.id}"
    domid = xs.vgpu_domains()[domain]
    booted = [e for e in _log_entries(stack.runtime.log_path, "zone booted")
              if e.get("zone_id") == pod.id]  # fmt: skip
    stages = _console_stages(domain)
    config = container_config("cuda", stack.image, ["hello-vgpu", "1"], log_path="cuda.log")
    t1 = time.monotonic()
    container = stack.cri.create(pod.id, config, pod.config)
    t2, started_wall = time.monotonic(), time.time()
    stack.cri.start(container)
    t3 = time.monotonic()
    xs.wait_until(
        lambda: any(e.get("zone") == f"dom{domid}"
                    for e in _log_entries(stack.proxy.log_path, "xen channel attached")),
        300, "the program's GPU channel",
    )  # fmt: skip
    attached = next(e for e in _log_entries(stack.proxy.log_path, "xen channel attached")
                    if e.get("zone") == f"dom{domid}")  # fmt: skip
    attached_wall = datetime.fromisoformat(attached["timestamp"]).timestamp()
    code = xs.wait_exit(stack, container)
    t4 = time.monotonic()
    if code != 0:
        raise RuntimeError(f"hello-vgpu exited {code}: {xs.log_lines(pod, 'cuda')}")
    xs.remove_pod(stack, pod)
    return {
        "run_pod_s": run_pod_s,
        "xl_create_s": float(booted[0]["create_s"]) if booted else float("nan"),
        "unpause_to_agent_ready_s": float(booted[0]["agent_ready_s"]) if booted else float("nan"),
        "guest_uptime_at_agent_exec_s": stages.get("agent-exec", float("nan")),
        "guest_uptime_at_agent_serving_s": stages.get("agent-serving", float("nan")),
        "create_container_s": t2 - t1,
        "start_container_s": t3 - t2,
        "start_to_first_cuda_call_s": attached_wall - started_wall,
        "start_to_exit_s": t4 - t2,
        "remove_pod_s": time.monotonic() - t4,
    }


def zone_starts(runs: int) -> list[dict[str, float]]:
    """Zones started one after another through the CRI socket (the first builds the image
    disk; later ones reuse it)."""
    from tests.xen.dom0.xen_stack import xen_stack
    from tests.xen.dom0.zone_image import build_payload_disk

    payload, _ = build_payload_disk(Path(tempfile.mkdtemp(prefix="xzb-", dir="/tmp")))
    with xen_stack(payload) as stack:
        return [_zone_start(stack, index) for index in range(runs)]


def measure_in_dom0(calls: int, zones: int) -> dict[str, Any]:
    raw: dict[str, Any] = {"local": _local(calls), "grant": _grant(calls)}
    raw["zone_starts"] = zone_starts(zones)
    last = raw["zone_starts"][-1]
    figures = {
        "local_null_p50_us": raw["local"]["null"]["p50_us"],
        "grant_null_p50_us": raw["grant"]["null"]["p50_us"],
        "grant_vs_local_null_ratio": raw["grant"]["null"]["p50_us"]
        / raw["local"]["null"]["p50_us"],
        "local_echo_256k_p50_us": raw["local"]["echo_256k"]["p50_us"],
        "grant_echo_256k_p50_us": raw["grant"]["echo_256k"]["p50_us"],
        "grant_vs_local_echo_256k_ratio": raw["grant"]["echo_256k"]["p50_us"]
        / raw["local"]["echo_256k"]["p50_us"],
        **{f"zone_{name}": value for name, value in last.items()},
    }
    return {
        "calls": calls,
        "zones": zones,
        "figures": figures,
        "goals": goal_report(figures, GOALS),
        "raw": raw,
    }


def measure(quick: bool) -> dict[str, Any]:
    """Host side: boot the testbed once and run the measurement in its Dom0."""
    from tests.xen.dom0_programs import build_dom0_programs
    from tests.xen.pod_image import build_pod_image
    from tests.xen.testbed import build_image, run

    calls, zones = (300, 1) if quick else (2000, 3)
    image = build_image(log=False)
    build_dom0_programs()
    build_pod_image()
    command = (
        f"python3 -m tests.bench.xen_zones --in-dom0 {calls} {zones} --out $TESTBED_SHARE/r.json"
    )
    result = run(command, image=image, out_dir=ROOT / "results" / "xen" / "bench-zones")
    if result.rc != 0:
        raise RuntimeError(result.diagnosis())
    measured: dict[str, Any] = json.loads((result.share / "r.json").read_text())
    return {"quick": quick, "testbed_wall_s": result.wall_s, **measured}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--in-dom0"]:
        parser = argparse.ArgumentParser(prog="python3 -m tests.bench.xen_zones --in-dom0")
        parser.add_argument("calls", type=int)
        parser.add_argument("zones", type=int)
        parser.add_argument("--out", type=Path, required=True)
        ns = parser.parse_args(args[1:])
        ns.out.write_text(json.dumps(measure_in_dom0(ns.calls, ns.zones), indent=2))
        return 0
    return figures_main(
        args,
        title="Xen zones: grant vs local channel, a zone's start by stage (nested Xen)",
        description=__doc__ or "",
        default_out=RESULTS,
        measure=measure,
    )


if __name__ == "__main__":
    sys.exit(main())
