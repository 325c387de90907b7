"""IDM over Xen grant pages vs LocalLink, same Dom0: ``python -m tests.bench.xen_channel``.

Boots the nested Xen testbed and, inside Dom0, measures the same synchronous null-call round trip
(Python zone side -> ChannelServer in another process -> reply) over
- GrantLink: Dom0 offers to itself (real gntalloc, gntdev, event channels, xenstored), and
- LocalLink: memfd + eventfds over a unix socket,
plus a 256 KiB echo over each. Under software emulation the absolute figures mean little (a
syscall costs ~50 us); the ratio grant/local is the figure. Results: results/bench/xen_channel.json.
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

RESULTS = ROOT / "results" / "bench" / "xen_channel.json"
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


def measure_in_dom0(calls: int) -> dict[str, Any]:
    raw = {"local": _local(calls), "grant": _grant(calls)}
    figures = {
        "local_null_p50_us": raw["local"]["null"]["p50_us"],
        "grant_null_p50_us": raw["grant"]["null"]["p50_us"],
        "grant_vs_local_null_ratio": raw["grant"]["null"]["p50_us"]
        / raw["local"]["null"]["p50_us"],
        "local_echo_256k_p50_us": raw["local"]["echo_256k"]["p50_us"],
        "grant_echo_256k_p50_us": raw["grant"]["echo_256k"]["p50_us"],
        "grant_vs_local_echo_256k_ratio": raw["grant"]["echo_256k"]["p50_us"]
        / raw["local"]["echo_256k"]["p50_us"],
    }
    return {"calls": calls, "figures": figures, "goals": goal_report(figures, GOALS), "raw": raw}


def measure(quick: bool) -> dict[str, Any]:
    """Host side: boot the testbed once and run the measurement in its Dom0."""
    from tests.xen.testbed import build_image, run

    calls = 300 if quick else 2000
    image = build_image(log=False)
    command = f"python3 -m tests.bench.xen_channel --in-dom0 {calls} --out $TESTBED_SHARE/r.json"
    result = run(command, image=image, out_dir=ROOT / "results" / "xen" / "bench-channel")
    if result.rc != 0:
        raise RuntimeError(result.diagnosis())
    measured: dict[str, Any] = json.loads((result.share / "r.json").read_text())
    return {"quick": quick, "testbed_wall_s": result.wall_s, **measured}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--in-dom0"]:
        parser = argparse.ArgumentParser(prog="python3 -m tests.bench.xen_channel --in-dom0")
        parser.add_argument("calls", type=int)
        parser.add_argument("--out", type=Path, required=True)
        ns = parser.parse_args(args[1:])
        ns.out.write_text(json.dumps(measure_in_dom0(ns.calls), indent=2))
        return 0
    return figures_main(
        args,
        title="IDM over grant pages vs LocalLink (nested Xen, same Dom0)",
        description=__doc__ or "",
        default_out=RESULTS,
        measure=measure,
    )


if __name__ == "__main__":
    sys.exit(main())
