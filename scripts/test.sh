#!/usr/bin/env bash
# Set up, lint, check generated code, then run the tests: unit, integration, property tests, a
# short fuzz run of each target and the benchmarks (figures reported, never asserted), in one
# pytest session. Slow suites have their own commands: `-m fuzz` (long fuzzing), later `-m xen`
# and `-m kernel`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m idm.codegen --check
exec .venv/bin/pytest -m "not xen and not kernel and not fuzz" "$@"
