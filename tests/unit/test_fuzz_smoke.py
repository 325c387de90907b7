"""A short atheris run of the ring fuzz target in every default test run (long runs: -m fuzz)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_fuzzer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_ring", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_ring_fuzzer_short_run() -> None:
    result = run_fuzzer("-atheris_runs=3000", "-max_len=6000", "-len_control=0")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done 3000 in" in result.stderr


@pytest.mark.fuzz
def test_ring_fuzzer_long_run() -> None:
    result = run_fuzzer("-max_total_time=600", "-max_len=6000")
    assert result.returncode == 0, result.stderr[-4000:]
