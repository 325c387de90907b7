"""The zone agent's settings, from its command line (the zone backend writes that line)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DESCRIPTION = """\
The vgpu zone agent: the init of one zone (a Xen domU, or fresh namespaces under the process
backend). It connects to the runtime's control socket as the zone side of an IDM channel,
announces itself (READY, with the containers it already runs), and serves the runtime's
requests: create/start/stop/remove containers with an OCI runtime (crun, or runc where crun
cannot work), exec, logs, stats. If the runtime goes away, containers keep running and the agent
reconnects to the same socket until it is back."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    zone_id: str
    control_socket: Path | None  # the runtime's socket; None in Xen mode (a GrantLink)
    zone_dir: Path  # containers' bundles, overlay upper dirs and the OCI state live here
    hostname: str = ""  # set as the zone's hostname when given
    new_netns: bool = False  # enter a network namespace of its own (a pod network)
    loopback: bool = False  # bring up `lo` (the zone has a network namespace of its own)
    oci_runtime: str = "auto"
    cgroup_parent: str = ""  # containers' cgroups go under it; default /vgpu-zones/<zone_id>
    gpu_proxy_socket: Path | None = None
    libvgpu: Path | None = None
    # How gpu containers' libvgpu reaches gpu-proxy: "local" offers gpu-proxy a LocalLink on
    # gpu_proxy_socket; "grant" (Xen zones) gets a GrantLink from the zone's channel broker there.
    gpu_link: Literal["local", "grant"] = "local"
    log_level: str = "info"

    @property
    def containers_cgroup(self) -> str:
        return self.cgroup_parent or f"/vgpu-zones/{self.zone_id}"


def parse_args(argv: Sequence[str] | None = None) -> AgentConfig:
    parser = argparse.ArgumentParser(prog="python -m cri_runtime.agent", description=DESCRIPTION)
    parser.add_argument("--zone-id", required=True)
    parser.add_argument("--control-socket", type=Path, required=True, help="runtime's socket")
    parser.add_argument("--zone-dir", type=Path, required=True, help="the agent's working dir")
    parser.add_argument("--hostname", default="", help="the zone's hostname")
    parser.add_argument(
        "--new-netns",
        action="store_true",
        help="unshare a network namespace of its own before starting anything",
    )
    parser.add_argument(
        "--loopback", action="store_true", help="bring up lo (own network namespace)"
    )
    parser.add_argument(
        "--oci-runtime",
        choices=("auto", "crun", "runc"),
        default="auto",
        help="auto: crun, or runc where crun cannot run containers (probed once at start)",
    )
    parser.add_argument("--cgroup-parent", default="", help="default /vgpu-zones/<zone-id>")
    parser.add_argument(
        "--gpu-proxy-socket",
        type=Path,
        help="the zone's gpu-proxy socket, bind-mounted into gpu containers",
    )
    parser.add_argument(
        "--libvgpu", type=Path, help="libvgpu.so, bind-mounted read-only as libcuda.so.1"
    )
    parser.add_argument(
        "--gpu-link",
        choices=("local", "grant"),
        default="local",
        help="grant: gpu containers get VGPU_LINK=grant (the socket is a Xen zone's broker)",
    )
    parser.add_argument("--log-level", default="info")
    ns = parser.parse_args(argv)
    return AgentConfig(
        zone_id=ns.zone_id,
        control_socket=ns.control_socket,
        zone_dir=ns.zone_dir,
        hostname=ns.hostname,
        new_netns=ns.new_netns,
        loopback=ns.loopback,
        oci_runtime=ns.oci_runtime,
        cgroup_parent=ns.cgroup_parent,
        gpu_proxy_socket=ns.gpu_proxy_socket,
        libvgpu=ns.libvgpu,
        gpu_link=ns.gpu_link,
        log_level=ns.log_level,
    )
