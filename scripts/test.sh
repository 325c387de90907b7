#!/usr/bin/env bash
# Set up, then run the default test suite (unit + integration + a short fuzz run), then lint.
# Slow suites have their own commands: scripts/bench.sh (benchmarks); `-m xen`, `-m kernel`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m idm.codegen --check
exec .venv/bin/pytest "$@"
