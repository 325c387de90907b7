"""cuGetProcAddress and cuGetExportTable, the two ways cudart finds the driver: entry points by
base name, CUDA version and stream mode, clean refusals, and the private tables cudart 13 asks
for (tests/libvgpu/c/procaddress.c checks each answer)."""

from devkit.daemons import GpuProxyDaemon
from tests.libvgpu.conftest import Programs, passed, run, zone_socket


def test_entry_points_and_private_tables_as_cudart_asks(
    programs: Programs, proxy: GpuProxyDaemon
) -> None:
    proc = run(
        programs["procaddress"],
        socket=zone_socket(proxy, "device"),
        env={"VGPU_LOG_UNIMPLEMENTED": "1"},
    )
    passed(proc)
    # A refused name is said once, on one line; an unknown table too.
    assert proc.stderr.splitlines() == [
        "libvgpu: cuGetProcAddress: cuNoSuchFunction is not implemented",
        "libvgpu: cuGetProcAddress: cuCtxCreate is not implemented",
        "libvgpu: cuGetExportTable: unknown table 01020304-0506-0708-090a-0b0c0d0e0f10",
    ]


def test_unimplemented_names_are_silent_unless_asked(
    programs: Programs, proxy: GpuProxyDaemon
) -> None:
    proc = run(programs["procaddress"], socket=zone_socket(proxy, "device"))
    passed(proc)
    assert "cuGetProcAddress" not in proc.stderr
