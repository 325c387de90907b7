"""The zone agent in a Xen domU: its settings from xenstore, its control channel over grant pages.

The runtime (Dom0) writes the zone's home, ``/local/domain/<domid>/vgpu/``, between ``xl create
-p`` and ``xl unpause``; libxl makes a domain's home Dom0-owned, and the runtime sets the
directory's permissions to "Dom0 owns, the domain reads", so nothing here can be changed by the
guest:

    zone-id       the CRI zone id (the sandbox id)
    memory-limit  decimal bytes of GPU memory (gpu-proxy's XenZoneWatcher reads it; GPU zones)
    agent         ZoneAgentSettings as JSON
    session       a token the runtime changes whenever it wants a fresh control channel

The agent offers the control channel as the zone side of a GrantLink "control" in service
directory ``vgpu-agent`` (``data/vgpu-agent/control/``, never ``data/vgpu/``, which gpu-proxy
serves) and first writes ``data/vgpu-agent/session`` with the session token it answers, so the
runtime never attaches an offer made for an earlier runtime. After offering it waits until the
runtime's host-owned ``/local/domain/0/backend/vgpu-agent/<domid>/control/state`` says
``connected``, then sends the hello. While serving it re-reads, on every idle tick, the session
and the host's state: a new token (a restarted runtime: its predecessor, killed, could not say
goodbye) or a missing state (the runtime closed the channel) make it withdraw the offer and offer
again. pyxs cannot watch over ``/dev/xen/xenbus``, so these are reads, not watches; each is one
small xenstore request.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from idm.channel import Channel, ChannelError, RingLayout
from idm.links.grant import GrantLink, host_path, zone_path
from idm.xen.xenstore import Xenstore, XenstoreError

log = structlog.get_logger(__name__)

ZONE_ID_KEY = "zone-id"
MEMORY_LIMIT_KEY = "memory-limit"
AGENT_KEY = "agent"
SESSION_KEY = "session"
CONTROL_SERVICE = "vgpu-agent"
CONTROL_CHANNEL = "control"
HOST_DOMID = 0
# Where the agent keeps bundles, overlay upper dirs and OCI state: the zone's tmpfs.
ZONE_DIR = Path("/run/vgpu/zone")
# gpu containers see the zone's GPU channel broker here (bind-mounted, VGPU_PROXY_SOCKET).
PROXY_SOCKET = Path("/run/vgpu/proxy.sock")
WAIT_POLL_S = 0.1  # how often a waiting offer looks for the runtime's connected state
CONSOLE = Path("/dev/console")
GNTALLOC_LIMIT = Path("/sys/module/xen_gntalloc/parameters/limit")
MEMINFO = Path("/proc/meminfo")
PAGE = 4096


class ZoneAgentSettings(BaseModel):
    """What the runtime tells a Xen zone's agent (xenstore key ``agent``, JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hostname: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9.-]*$")
    oci_runtime: Literal["auto", "crun", "runc"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    gpu: bool = False  # start the GPU channel broker; gpu containers get its socket
    libvgpu: Path | None = None  # inside the zone, mounted into gpu containers as libcuda.so.1


def home(domid: int) -> str:
    """The zone's toolstack-owned xenstore directory (Dom0 writes, the zone reads)."""
    return f"/local/domain/{domid}/vgpu"


def offer_session_path(domid: int) -> str:
    """Zone-written: the session token the zone's current control offer answers."""
    return f"/local/domain/{domid}/data/{CONTROL_SERVICE}/{SESSION_KEY}"


def control_offer_path(domid: int) -> str:
    return zone_path(domid, CONTROL_CHANNEL, CONTROL_SERVICE)


def control_host_path(domid: int) -> str:
    return host_path(HOST_DOMID, domid, CONTROL_CHANNEL, CONTROL_SERVICE)


@dataclass(frozen=True, slots=True)
class ZoneIdentity:
    domid: int
    zone_id: str
    settings: ZoneAgentSettings


def read_identity(xs: Xenstore) -> ZoneIdentity:
    """Our domid and what the runtime wrote for us; ValueError saying what is missing."""
    domid = xs.own_domid()
    base = home(domid)
    zone_id = xs.read(f"{base}/{ZONE_ID_KEY}")
    raw = xs.read(f"{base}/{AGENT_KEY}")
    if not zone_id or raw is None:
        raise ValueError(
            f"{base}: zone-id or agent is missing (was the zone booted by the runtime?)"
        )
    return ZoneIdentity(domid, zone_id, ZoneAgentSettings.model_validate_json(raw))


class GrantControl:
    """One offered control channel: alive while the runtime of its session keeps it."""

    def __init__(self, xs: Xenstore, domid: int, session: str, channel: Channel) -> None:
        self._xs = xs
        self._domid = domid
        self.session = session
        self.channel = channel

    def alive(self) -> bool:
        """False once the runtime asked for a new session or withdrew its side."""
        try:
            session = self._xs.read(f"{home(self._domid)}/{SESSION_KEY}")
            state = self._xs.read(f"{control_host_path(self._domid)}/state")
        except XenstoreError as exc:
            log.warning("xenstore unreadable; keeping the channel", error=str(exc))
            return True
        return session == self.session and state == "connected"


class GrantControlConnector:
    """Offers the control channel to Dom0 for the runtime's current session."""

    def __init__(self, xs: Xenstore, domid: int, *, layout: RingLayout | None = None) -> None:
        self._xs = xs
        self._domid = domid
        self._layout = layout or RingLayout()

    def connect(self, give_up: float) -> GrantControl:
        """Offer, then wait (until monotonic time ``give_up``) for the runtime to attach.
        ChannelError if it does not (the caller backs off and offers again)."""
        try:
            session = self._xs.read(f"{home(self._domid)}/{SESSION_KEY}")
            if not session:
                raise ChannelError(0, "no session from the runtime yet")
            self._xs.write(offer_session_path(self._domid), session)
            link = GrantLink.offer(
                CONTROL_CHANNEL, self._layout, self._xs, HOST_DOMID, service=CONTROL_SERVICE
            )
        except OSError as exc:  # xenstore, gntalloc or evtchn refused: try again later
            raise ChannelError(exc.errno or 0, f"offering the control channel: {exc}") from exc
        channel = link.open_channel()
        try:
            self._wait_connected(session, give_up)
        except XenstoreError as exc:
            channel.close()
            raise ChannelError(exc.errno or 0, f"waiting for the runtime: {exc}") from exc
        except BaseException:
            channel.close()
            raise
        return GrantControl(self._xs, self._domid, session, channel)

    def _wait_connected(self, session: str, give_up: float) -> None:
        state_key = f"{control_host_path(self._domid)}/state"
        session_key = f"{home(self._domid)}/{SESSION_KEY}"
        while True:
            if self._xs.read(session_key) != session:
                raise ChannelError(0, "the runtime started a new session")
            if self._xs.read(state_key) == "connected":
                return
            if time.monotonic() > give_up:
                raise ChannelError(0, "the runtime did not attach the control channel")
            time.sleep(WAIT_POLL_S)


def allow_granting_memory(limit: Path = GNTALLOC_LIMIT, meminfo: Path = MEMINFO) -> int | None:
    """Let the zone grant as many pages as it has memory: libvgpu's pinned buffers are pages
    granted to gpu-proxy (one gntalloc grant per page), and gntalloc's default limit, 1024
    pages for the whole domain, would leave them only 4 MiB. Never lowers the limit; returns
    the limit in force, None where there is no gntalloc (pinned buffers are then copied). The
    domain's grant table (xl's max_grant_frames, capped by Xen's gnttab_max_frames) bounds it
    too: 64 frames are 32768 grants, 128 MiB."""
    try:
        current = int(limit.read_text())
        total_kib = next(
            int(line.split()[1])
            for line in meminfo.read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        wanted = total_kib * 1024 // PAGE
        if wanted > current:
            limit.write_text(str(wanted))
            log.info("gntalloc limit raised for pinned memory", pages=wanted, was=current)
            return wanted
        return current
    except (OSError, ValueError, StopIteration) as exc:
        log.warning("gntalloc limit left as it is: pinned memory may be copied", error=str(exc))
        return None


def console(line: str) -> None:
    """A line on the zone's console (xenconsoled keeps it in Dom0 as guest-<name>.log)."""
    try:
        with CONSOLE.open("w") as out:
            out.write(line + "\n")
    except OSError:
        print(line, file=sys.stderr, flush=True)


def power_off() -> None:
    """The agent is the domU's init: when it ends, the domain ends (on_poweroff=destroy)."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
    os._exit(1)  # reboot(2) returned: not allowed to power off
