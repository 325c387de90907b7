"""The dom0 suite imports only what the testbed's Dom0 Python has (DOM0_PYTHON): a module the
root conftest or the dom0 tests import at load time must be installed there, or the whole
nested Xen suite fails to start. Checked here in seconds, without booting Xen."""

import subprocess
import sys
import tomllib

from tests.xen.testbed import DOM0_PYTHON, ROOT

# import names of the pinned distributions whose names differ from them
IMPORT_NAMES = {"grpcio": "grpc", "grpcio-tools": "grpc_tools", "protobuf": "google.protobuf",
                "cuda-bindings": "cuda"}  # fmt: skip
DOM0_TOOLS = {"ruff", "mypy", "atheris", "setuptools"}  # never imported by tests at load time


def absent_in_dom0() -> list[str]:
    """Import names of our pinned dependencies that Dom0's Python lacks, and devkit's helpers
    that need host tools (nvcc)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = [p.split("==")[0].lower() for p in project["dependencies"]]
    pinned += [p.split("==")[0].lower() for p in project["optional-dependencies"]["dev"]]
    missing = [name for name in pinned if name not in DOM0_PYTHON and name not in DOM0_TOOLS]
    return [IMPORT_NAMES.get(name, name.replace("-", "_")) for name in missing]


def test_dom0_suite_collects_without_the_packages_dom0_lacks() -> None:
    absent = absent_in_dom0()
    assert "grpc_tools" in absent  # the check sees pyproject's pins
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in absent)
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; {blocked}; import pytest; "
         "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', "
         "'-m', 'dom0', 'tests/xen/dom0']))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "test_smoke.py" in done.stdout
