#!/usr/bin/env bash
# Set up, then run the benchmarks; JSON results land in results/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest -m bench -p no:randomly -s tests/bench "$@"
