"""The dom0 suite imports only what the testbed's Dom0 Python has (DOM0_PYTHON): a module the
root conftest or the dom0 tests import at load time must be installed there, or the whole
nested Xen suite fails to start. Checked here in seconds, without booting Xen."""

import subprocess
import sys

from tests.xen.testbed import DOM0_PYTHON, ROOT

# our pinned dependencies Dom0 does not have, as import names
ABSENT_IN_DOM0 = ("grpc", "google.protobuf", "prometheus_client", "pydantic_settings",
                  "zstandard", "cuda", "devkit")  # fmt: skip


def test_dom0_suite_collects_without_the_packages_dom0_lacks() -> None:
    assert "zstandard" not in DOM0_PYTHON and "grpcio" not in DOM0_PYTHON
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in ABSENT_IN_DOM0)
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; {blocked}; import pytest; "
         "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', "
         "'-m', 'dom0', 'tests/xen/dom0']))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "test_smoke.py" in done.stdout
