"""IDM channel benchmarks: ``python -m tests.bench.idm_channel [--quick]``.

Measures, in one run on one machine (ratios matter; this machine is noisy):
- sync null-call round trip, C client -> Python host over LocalLink, against (a) the same
  request/response over a plain unix socket to a Python host and (b) C <-> C over the same ring;
- fire-and-forget throughput into the Python dispatcher (batch decoding), and C <-> C;
- a 64 MiB transfer through the channel against a plain memcpy of the same size.
The C side is tests/bench/c/idm_bench.c, linked with the same idm/csrc files libvgpu uses.
Results: results/bench/idm_channel.json.
"""

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from idm.links.local import LocalListener
from idm.server import ChannelServer
from idm.wire import HEADER, MAX_PAYLOAD
from tests.bench.harness import (
    C_DIR,
    ROOT,
    build_c,
    cpus_env,
    figures_main,
    goal_report,
    pick_cpus,
    pinned_host,
)

DRIVER_SRC = C_DIR / "idm_bench.c"
RESULTS = ROOT / "results" / "bench" / "idm_channel.json"
BULK_BYTES = 64 << 20

GOALS = {
    "c_to_python_null_p50_us": ("<=", 5.0),
    "c_to_python_vs_unix_socket_speedup": (">=", 3.0),
    "c_to_c_null_p50_us": ("<=", 1.0),
    "python_async_msgs_per_s": (">=", 300_000),
    "c_to_c_async_msgs_per_s": (">=", 2_000_000),
    "python_bulk_vs_memcpy": (">=", 0.5),
    "c_to_c_bulk_vs_memcpy": (">=", 0.5),
}


def run_driver(exe: Path, *args: object, cpus: tuple[int, int] | None = None) -> dict[str, Any]:
    out = subprocess.run(
        [str(exe), *map(str, args)], check=True, capture_output=True, text=True, env=cpus_env(cpus)
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@contextlib.contextmanager
def python_host(path: Path) -> Iterator[None]:
    """The Python side of the channel: one ChannelServer thread per connecting zone."""
    listener = LocalListener(path)
    servers: list[ChannelServer] = []
    threads: list[threading.Thread] = []

    def accept_loop() -> None:
        while True:
            try:
                link = listener.accept()
            except OSError:
                return
            server = ChannelServer(
                link.open_channel(), {}, max_payload=MAX_PAYLOAD, peer_alive=link.peer_alive
            )
            servers.append(server)
            t = threading.Thread(target=server.serve, daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield
    finally:
        for server in servers:
            server.stop()
        for t in threads:
            t.join(5)
        listener.close()


@contextlib.contextmanager
def unix_echo_host(path: Path) -> Iterator[None]:
    """Baseline: the same request/response over a plain unix socket, served by Python."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)

    def serve() -> None:
        conn, _ = lsock.accept()
        with conn:
            hdr = bytearray(HEADER.size)
            while conn.recv_into(hdr, HEADER.size, socket.MSG_WAITALL) == HEADER.size:
                length = HEADER.unpack_from(hdr)[4]
                payload = conn.recv(length, socket.MSG_WAITALL) if length else b""
                conn.sendall(bytes(hdr) + payload)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        lsock.close()
        t.join(5)


def measure(quick: bool) -> dict[str, Any]:
    calls = 20_000 if quick else 200_000
    messages = 300_000 if quick else 2_000_000
    reps = 3 if quick else 8
    raw: dict[str, Any] = {}
    cpus = pick_cpus()
    with tempfile.TemporaryDirectory(prefix="idm-bench-") as tmp, pinned_host(cpus):
        exe = build_c(DRIVER_SRC, Path(tmp))
        sock = Path(tmp) / "host.sock"
        with python_host(sock):
            raw["c_to_python_null"] = run_driver(exe, "local-null", sock, calls, 0, cpus=cpus)
            raw["python_async"] = run_driver(exe, "local-async", sock, messages, 0, cpus=cpus)
            raw["python_bulk"] = run_driver(exe, "local-bulk", sock, BULK_BYTES, reps, cpus=cpus)
        usock = Path(tmp) / "unix.sock"
        with unix_echo_host(usock):
            raw["unix_socket_null"] = run_driver(exe, "unix-null", usock, calls, 0, cpus=cpus)
        raw["c_to_c_null"] = run_driver(exe, "c2c-null", calls, 0, cpus=cpus)
        raw["c_to_c_async"] = run_driver(exe, "c2c-async", messages * 5, 0, cpus=cpus)
        raw["c_to_c_bulk"] = run_driver(exe, "c2c-bulk", BULK_BYTES, reps, cpus=cpus)
        raw["memcpy"] = run_driver(exe, "memcpy", BULK_BYTES, reps * 2, cpus=cpus)
    memcpy_s = raw["memcpy"]["best_s"]
    figures = {
        "c_to_python_null_p50_us": raw["c_to_python_null"]["p50_ns"] / 1000,
        "c_to_python_null_p99_us": raw["c_to_python_null"]["p99_ns"] / 1000,
        "unix_socket_null_p50_us": raw["unix_socket_null"]["p50_ns"] / 1000,
        "c_to_python_vs_unix_socket_speedup": raw["unix_socket_null"]["p50_ns"]
        / raw["c_to_python_null"]["p50_ns"],
        "c_to_c_null_p50_us": raw["c_to_c_null"]["p50_ns"] / 1000,
        "c_to_c_null_p99_us": raw["c_to_c_null"]["p99_ns"] / 1000,
        "python_async_msgs_per_s": raw["python_async"]["msgs_per_s"],
        "c_to_c_async_msgs_per_s": raw["c_to_c_async"]["msgs_per_s"],
        "memcpy_gib_per_s": raw["memcpy"]["gib_per_s"],
        "python_bulk_gib_per_s": raw["python_bulk"]["gib_per_s"],
        "python_bulk_vs_memcpy": memcpy_s / raw["python_bulk"]["best_s"],
        "c_to_c_bulk_vs_memcpy": memcpy_s / raw["c_to_c_bulk"]["best_s"],
    }
    return {
        "quick": quick,
        "cpus": {"host": cpus[0], "client": cpus[1]} if cpus else None,
        "figures": figures,
        "goals": goal_report(figures, GOALS),
        "raw": raw,
    }


def main(argv: list[str] | None = None) -> int:
    return figures_main(
        argv,
        title="IDM channel benchmark",
        description=__doc__.splitlines()[0],
        default_out=RESULTS,
        measure=measure,
    )


if __name__ == "__main__":
    sys.exit(main())
