#!/usr/bin/env bash
# Set up, then run the demo. Until gpu-proxy and vgpu-runtime land, the demo is the IDM channel:
# a C client (the code libvgpu will link) talking to the Python host over LocalLink.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tests.bench.idm_channel --quick "$@"
