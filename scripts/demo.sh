#!/usr/bin/env bash
# Set up, then run the demo (python -m devkit.demo; --help explains it): gpu-proxy and
# vgpu-runtime on this machine, and a GPU pod through the CRI socket. Options go to the demo,
# e.g. `bash scripts/demo.sh --keep` leaves everything running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m devkit.demo "$@"
