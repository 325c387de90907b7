#!/usr/bin/env bash
# Idempotent set-up on a Debian 12 machine, as root: apt packages, .venv, pip install, C build.
# Everything the demo and the tests need is installed here; nothing is assumed to be present.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(python3 python3-venv python3-dev gcc libc6-dev linux-libc-dev libffi-dev
    # the nested Xen testbed (tests/xen): emulator, Dom0 root builder, guest initramfs, ext4
    qemu-system-x86 mmdebstrap busybox-static e2fsprogs
    # promtool checks gpu-proxy's /metrics exposition
    prometheus
    # vgpu-runtime: OCI runtimes for the zone agent (crun; runc where crun cannot run, e.g.
    # hybrid cgroups), a real registry for image tests (htpasswd writes its basic-auth file),
    # containerd for the CRI benchmark baseline
    crun runc docker-registry apache2-utils containerd)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
.venv/bin/python -m idm.build && .venv/bin/python -m libvgpu.build
