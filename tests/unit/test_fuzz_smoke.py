"""A short atheris run of each fuzz target in every default test run (long runs: -m fuzz)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


TARGETS = ["tests.fuzz.fuzz_ring", "tests.fuzz.fuzz_codec"]


def run_fuzzer(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", target, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize("target", TARGETS)
def test_fuzzer_short_run(target: str) -> None:
    result = run_fuzzer(target, "-atheris_runs=3000", "-max_len=6000", "-len_control=0")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 3000 in" in result.stderr


@pytest.mark.fuzz
@pytest.mark.parametrize("target", TARGETS)
def test_fuzzer_long_run(target: str) -> None:
    result = run_fuzzer(target, "-max_total_time=600", "-max_len=6000")
    assert result.returncode == 0, result.stderr[-4000:]
