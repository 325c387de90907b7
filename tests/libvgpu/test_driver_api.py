"""C programs using the CUDA driver API through libvgpu, served by a gpu-proxy daemon (sim
backend) over LocalLink: each program checks every result itself (tests/libvgpu/c); these tests
run them as a zone's processes and compare what they report with what gpu-proxy serves."""

import contextlib
import re
import subprocess
import threading
from pathlib import Path

from devkit.daemons import GpuProxyDaemon
from gpu_proxy.backends.sim import SimBackend
from gpu_proxy.dispatch import ATTRIBUTES_OFF_IN_ZONES
from idm.channel import ChannelError
from idm.links.local import LocalListener
from idm.wire import MAX_PAYLOAD, TABLE_DIGEST
from libvgpu.build import cuda_include
from tests.libvgpu.conftest import ZONES, Programs, passed, run, zone_socket


def values(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def test_device_query_is_answered_from_the_snapshot(
    programs: Programs, proxy: GpuProxyDaemon
) -> None:
    out = values(passed(run(programs["device_query"], socket=zone_socket(proxy, "device"))))
    info = SimBackend().device_info()
    # The driver API version libvgpu implements: that of the cuda.h it was built against.
    version = re.search(
        r"^#define CUDA_VERSION (\d+)", (cuda_include() / "cuda.h").read_text(), re.M
    )
    assert version is not None and out["version"] == version[1]
    assert out["count"] == "1"
    assert out["name"] == info.name
    assert out["uuid"] == info.uuid.hex()
    assert int(out["total"]) == ZONES["device"]  # the zone's quota, not the GPU's memory
    assert out["cc"] == "{}.{}".format(*info.compute_capability)
    reported = {int(k[4:]): int(v) for k, v in out.items() if k.startswith("attr")}
    # The GPU's, except features a zone cannot use through gpu-proxy, which read as absent.
    assert reported == {
        k: 0 if k in ATTRIBUTES_OFF_IN_ZONES else v for k, v in info.attributes.items()
    }
    assert any(info.attributes[k] for k in ATTRIBUTES_OFF_IN_ZONES)


def test_memory_round_trips_from_one_byte_to_64_mib(
    programs: Programs, proxy: GpuProxyDaemon
) -> None:
    out = passed(run(programs["memory"], socket=zone_socket(proxy, "memory")))
    sizes = [int(m) for m in re.findall(r"^round_trip (\d+) ", out, re.M)]
    assert sizes == [1, 3, 4096, 65537, 1 << 20, (4 << 20) + 5, 64 << 20, (64 << 20) + 1]
    assert values(out)["total"] == str(ZONES["memory"])


def test_streams_and_events_keep_their_order(programs: Programs, proxy: GpuProxyDaemon) -> None:
    out = passed(run(programs["streams"], socket=zone_socket(proxy, "streams")))
    assert float(values(out)["elapsed_ms"]) >= 0


def test_bad_handles_and_freed_pointers_are_refused(
    programs: Programs, proxy: GpuProxyDaemon
) -> None:
    passed(run(programs["errors"], "handles", socket=zone_socket(proxy, "handles")))


def test_allocations_beyond_the_zone_quota_fail(programs: Programs, proxy: GpuProxyDaemon) -> None:
    limit = str(ZONES["quota"])
    passed(run(programs["errors"], "quota", limit, socket=zone_socket(proxy, "quota")))


def test_async_error_surfaces_at_the_next_synchronising_call(
    programs: Programs, proxy: GpuProxyDaemon, modules: dict[str, Path]
) -> None:
    cubin = str(modules["kernels.cubin"])
    passed(run(programs["errors"], "sticky", cubin, socket=zone_socket(proxy, "sticky")))


def test_host_functions_pools_and_module_variables(
    programs: Programs, proxy: GpuProxyDaemon, modules: dict[str, Path]
) -> None:
    cubin = str(modules["kernels.cubin"])
    passed(run(programs["stream_order"], cubin, socket=zone_socket(proxy, "stream_order")))


def test_absent_features_have_entry_points_that_refuse(
    programs: Programs, proxy: GpuProxyDaemon
) -> None:
    proc = run(programs["absent_features"], socket=zone_socket(proxy, "device"))
    assert passed(proc).splitlines() == ["ok"]
    # Each refused feature is said once on stderr, naming the first call that asked.
    assert proc.stderr.splitlines() == [
        "libvgpu: cuMemAddressReserve: CUDA_ERROR_NOT_SUPPORTED: zones are not offered virtual "
        "memory management (cuMemCreate, cuMemMap, ...) (the device attribute says so)",
        "libvgpu: cuStreamWriteValue32_v2: CUDA_ERROR_NOT_SUPPORTED: zones are not offered "
        "stream memory operations (the device attribute says so)",
    ]


def test_inter_process_sharing_is_refused_by_gpu_proxy(
    programs: Programs, proxy: GpuProxyDaemon
) -> None:
    passed(run(programs["errors"], "ipc", socket=zone_socket(proxy, "ipc")))


def test_forked_children_get_channels_of_their_own(
    programs: Programs, proxy: GpuProxyDaemon
) -> None:
    passed(run(programs["fork"], socket=zone_socket(proxy, "fork")))


def test_eight_threads_share_the_channel(programs: Programs, proxy: GpuProxyDaemon) -> None:
    passed(run(programs["threads"], socket=zone_socket(proxy, "threads")))


def test_missing_proxy_is_a_clear_error(programs: Programs, tmp_path: Path) -> None:
    proc = run(programs["init_only"], socket=tmp_path / "no-proxy.sock")
    assert proc.returncode == 0, proc.stderr
    assert values(proc.stdout) == {
        "init": "CUDA_ERROR_NO_DEVICE",  # the first cuInit's outcome is kept (printed twice)
        "count": "CUDA_ERROR_NOT_INITIALIZED",
        "retain": "CUDA_ERROR_NOT_INITIALIZED",
        "version": "CUDA_SUCCESS",
    }
    assert proc.stdout.count("init=CUDA_ERROR_NO_DEVICE") == 2
    assert proc.stderr.splitlines() == [
        f"libvgpu: cannot reach gpu-proxy at {tmp_path / 'no-proxy.sock'} (connecting to "
        f"{tmp_path / 'no-proxy.sock'}: No such file or directory): no GPU for this process"
    ]


def test_a_proxy_built_from_another_call_table_is_refused(
    programs: Programs, tmp_path: Path
) -> None:
    socket = tmp_path / "other-table.sock"
    listener = LocalListener(socket)

    def serve_one_hello() -> None:
        channel = listener.accept().open_channel()
        with contextlib.suppress(ChannelError):  # the refusal raises here too
            channel.hello_server(MAX_PAYLOAD, table_digest=TABLE_DIGEST ^ 1)
        channel.close()

    host = threading.Thread(target=serve_one_hello)
    host.start()
    try:
        proc = run(programs["init_only"], socket=socket)
    finally:
        host.join(30)
        listener.close()
    assert proc.returncode == 0, proc.stderr
    assert values(proc.stdout)["init"] == "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH"
    assert values(proc.stdout)["count"] == "CUDA_ERROR_NOT_INITIALIZED"
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"libvgpu: gpu-proxy at {socket} refused this libvgpu: it was built")


def test_a_dead_proxy_fails_every_later_call(programs: Programs, tmp_path: Path) -> None:
    daemon = GpuProxyDaemon(tmp_path / "proxy", extra=("--zone", "doomed=16777216"))
    daemon.start()
    assert daemon.proc is not None
    proc = subprocess.Popen(
        [str(programs["init_only"]), "wait"],
        env={"VGPU_PROXY_SOCKET": str(zone_socket(daemon, "doomed"))},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        daemon.proc.kill()  # no goodbye: only its socket hanging up says it is gone
        daemon.proc.wait()
        stdout, stderr = proc.communicate("go\n", timeout=30)
    finally:
        proc.kill()
        daemon.stop()
    assert proc.returncode == 0, stderr
    assert stdout.splitlines() == [
        "alloc=CUDA_ERROR_DEVICE_UNAVAILABLE",
        "alloc=CUDA_ERROR_DEVICE_UNAVAILABLE",
        "sync=CUDA_ERROR_DEVICE_UNAVAILABLE",
    ]
    # Said once; whether the watchdog noticed before or during the call is a race.
    [line] = stderr.splitlines()
    assert re.fullmatch(
        r"libvgpu: lost the channel to gpu-proxy while (sending a request|waiting for a reply): "
        r"gpu-proxy went away \(its socket hung up\)",
        line,
    ), line
