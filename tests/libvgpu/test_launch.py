"""Modules and kernel launches through libvgpu. gpu-proxy's ZoneRegistry runs in this process
(the same code as the daemon, serving the program over LocalLink) so that the launches the sim
recorded can be read back: their parameter bytes show what libvgpu packed from kernelParams and
`extra`, and the sim checked each size against the kernel's layout without running anything."""

import struct
from pathlib import Path

from gpu_proxy.registry import ZoneRegistry
from tests.libvgpu.conftest import (
    MODULE_BUILDS,
    Programs,
    call_counts,
    passed,
    run,
    sim_launches,
    sim_zone,
)

MiB = 1 << 20


def mixed_params(p: int) -> bytes:
    """mixed(int i, float *p, float f, pair s, char c, double d) as the driver lays it out:
    each at the next multiple of its alignment; struct pair {int a; double b; char c;} is 24
    bytes aligned to 8, its padding zero (the program clears it)."""
    return b"".join(
        [
            struct.pack("<i4xQf4x", 7, p, 1.5),
            struct.pack("<i4xdB7x", 3, 2.25, ord("x")),
            struct.pack("<B7xd", ord("q"), -0.125),
        ]
    )


def test_launch_marshalling_validated_by_sim_without_execution(
    registry: ZoneRegistry, programs: Programs, modules: dict[str, Path]
) -> None:
    socket = sim_zone(registry, "launch", 64 * MiB)
    out = passed(run(programs["launch"], *(str(modules[n]) for n in MODULE_BUILDS), socket=socket))
    layout = [line.split()[2:] for line in out.splitlines() if line.startswith("param ")]
    assert layout == [
        ["offset=0", "size=4"], ["offset=8", "size=8"], ["offset=16", "size=4"],
        ["offset=24", "size=24"], ["offset=48", "size=1"], ["offset=56", "size=8"],
    ]  # fmt: skip

    records = sim_launches(registry, "launch")
    # The one allocation the program made is where every pointer parameter points.
    [p] = {struct.unpack_from("<Q", r.params, 8)[0] for r in records if r.function == "mixed"}
    scale = struct.pack("<Qfi", p, 2.0, 64)
    big = struct.pack("<1200i", *(k * 3 + 1 for k in range(1200))) + struct.pack("<Q", p)
    assert [(r.function, r.grid, r.block, r.shared_mem, r.params) for r in records] == [
        ("mixed", (2, 3, 4), (32, 2, 1), 0, mixed_params(p)),
        ("mixed", (1, 1, 1), (1, 1, 1), 0, mixed_params(p)),  # `extra`: the same bytes
        ("noargs", (1, 1, 1), (1, 1, 1), 0, b""),
        ("scale", (2, 1, 1), (32, 1, 1), 0, scale),  # from the fatbin
        ("scale", (2, 1, 1), (32, 1, 1), 0, scale),  # from PTX
        ("scale", (2, 1, 1), (32, 1, 1), 0, scale),  # from the LZ4-compressed PTX
        ("big", (1, 1, 1), (1, 1, 1), 0, big),
        ("scale", (2, 1, 1), (32, 1, 1), 0, scale),  # from the zstd-compressed cubin
    ]
    assert [r.stream is None for r in records] == [True, False, True, True, True, True, True, True]


def module_loads(registry: ZoneRegistry, zone_id: str) -> dict[tuple[str, str], int]:
    counts = call_counts(registry, zone_id)
    return {k: n for k, n in counts.items() if k[0] in ("vgpuModuleLoadCached", "cuModuleLoadData")}


def test_a_zone_sends_a_module_image_once(
    registry: ZoneRegistry, programs: Programs, modules: dict[str, Path]
) -> None:
    """Two loads in one process and two more in the next process of the zone: the image
    travels once, every load is asked by digest first (the digest libvgpu computes matches
    gpu-proxy's), and each module gets the kernel table of the zstd-compressed cubin gpu-proxy
    decoded. Another zone sends its own copy."""
    image = str(modules["kernels_zstd.fatbin"])
    for zone in ("cache", "other"):
        socket = sim_zone(registry, zone, 64 * MiB)
        passed(run(programs["module_cache"], image, socket=socket))
    passed(run(programs["module_cache"], image, socket=registry.socket_path("cache")))
    assert module_loads(registry, "cache") == {
        ("vgpuModuleLoadCached", "CUDA_ERROR_NOT_FOUND"): 1,
        ("vgpuModuleLoadCached", "CUDA_SUCCESS"): 3,
        ("cuModuleLoadData", "CUDA_SUCCESS"): 1,
    }
    assert module_loads(registry, "other") == {
        ("vgpuModuleLoadCached", "CUDA_ERROR_NOT_FOUND"): 1,
        ("vgpuModuleLoadCached", "CUDA_SUCCESS"): 1,
        ("cuModuleLoadData", "CUDA_SUCCESS"): 1,
    }
    assert [r.function for r in sim_launches(registry, "cache")] == ["scale"] * 4
