#!/usr/bin/env bash
# Set up, lint, check generated code, then run the tests in one pytest session: unit,
# integration, property tests, a short fuzz run of each target, the benchmarks (figures reported,
# never asserted) and the nested Xen suite (boots Xen + Dom0 under QEMU and runs the dom0 tests
# on real Xen; builds its cached image on first use, ~2 min). Long fuzzing: `pytest -m fuzz`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m idm.codegen --check
.venv/bin/python -m gpu_proxy.proto.protogen --check
.venv/bin/python -m cri_runtime.cri.protogen --check
exec .venv/bin/pytest -m "not dom0 and not kernel and not fuzz and not gpu" "$@"
