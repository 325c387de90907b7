"""The test programs once more, with libvgpu and the programs built with AddressSanitizer and
UBSan: any out-of-bounds access, use after free, leak or undefined behaviour in libvgpu (its
handle tables, image parsers, parameter packing, fork and thread handling) fails the run."""

from pathlib import Path

import pytest

from devkit.daemons import GpuProxyDaemon
from tests.libvgpu.conftest import (
    MODULE_BUILDS,
    SANITIZED_RUNS,
    Programs,
    passed,
    run,
    zone_socket,
)

SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "print_stacktrace=1",
}


@pytest.mark.parametrize("name", SANITIZED_RUNS)
def test_program_runs_clean_under_sanitizers(
    name: str, sanitized_programs: Programs, proxy: GpuProxyDaemon, modules: dict[str, Path]
) -> None:
    args: list[str] = []
    for arg in SANITIZED_RUNS[name]:
        if arg == "{modules}":
            args += [str(modules[n]) for n in MODULE_BUILDS]
        else:
            args.append(arg.replace("{cubin}", str(modules["kernels.cubin"])))
    program = sanitized_programs[name.split("-")[0]]
    proc = run(program, *args, socket=zone_socket(proxy, f"sanitized-{name}"), env=SANITIZER_ENV)
    passed(proc)
    assert "Sanitizer" not in proc.stderr, proc.stderr
