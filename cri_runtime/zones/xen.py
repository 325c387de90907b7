"""The Xen zone backend: a zone is a domU named ``vgpu-<zone id>`` whose init is the zone agent.

Boot: render the xl config (zones/xl_config.py; the pod's CPU and memory become vcpus and
memory), ``xl create -p`` (built, paused), write the zone's xenstore home
``/local/domain/<domid>/vgpu/`` (zone-id, memory-limit for GPU zones, the agent's settings as
JSON, a session token; Dom0 owns it, the domain may only read it), ``xl unpause``, then wait
(ZoneSpec.boot_timeout_s) for the agent to offer its control channel for that session
(``data/vgpu-agent/``), attach it as the host side of a GrantLink and take the agent's hello and
READY. Any failure destroys the domain and removes the zone's directory: nothing is left.

Stop: ask the agent to SHUTDOWN (it stops the containers and powers the domain off), drop the
channel (Dom0's grant mappings would keep a destroyed domain as a zombie), wait the grace for
the domain to go, ``xl shutdown``, then ``xl destroy``. Idempotent.

What runs is what ``xl list`` shows (never what a guest says): every domain named ``vgpu-*`` is
this runtime's, and list() reports them (the runtime's recovery stops those no sandbox owns).
A restarted runtime reattaches a running zone by writing a new session token: the agent, which
re-reads the token while it serves, withdraws its stale offer and offers again
(agent/xen.py, docs/zone-agent.md).

Container images reach a zone as read-only disks, one per image, block-attached when the first
container of the image is created and detached when the last is removed (zones/xen_images.py);
the agent's CRI logs are pulled by the runtime (``relays_logs``, cri_runtime/logs.py).

``<root>/<zone id>/`` holds the rendered ``xl.cfg``, ``zone.json`` (spec, domid, start time) and
``image-disks.json``; ``<root>/.image-disks/`` the images' ext4 disks.
gpu-proxy finds GPU zones itself (its XenZoneWatcher serves the channels they offer under
``data/vgpu/`` and reads their memory-limit), so the runtime registers nothing with it.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog
from pydantic import BaseModel

from cri_runtime.agent import xen as zone_keys
from cri_runtime.agent.client import AgentClient, AgentError, AgentGone
from cri_runtime.agent.protocol import ImageDisk
from cri_runtime.config import XenSettings
from cri_runtime.zones import records, xen_disks, xen_images
from cri_runtime.zones.base import ZoneError, ZoneInfo, ZoneSpec, ZoneState
from cri_runtime.zones.xen_images import XenImageDisks
from cri_runtime.zones.xl import Domain, Xl
from cri_runtime.zones.xl_config import DOMAIN_PREFIX, XlConfig, XlDisk
from idm.channel import ChannelError
from idm.links.grant import GrantLink, InvalidOffer
from idm.xen.xenstore import Xenstore, XenstoreError

log = structlog.get_logger(__name__)

ZONE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
IMAGE_DISKS = ".image-disks"  # under the root: no zone id starts with a dot
XL_CONFIG = "xl.cfg"
ROOT_VDEV = "xvda"
SYSTEM_VDEV = "xvdb"
WATCH_TICK_S = 1.0  # how often a wait re-checks that the domain is still there
GONE_POLL_S = 0.5
DESTROY_RACE_S = 10.0
CONSOLE_TAIL_BYTES = 3000


class XenZoneRecord(BaseModel):
    """What the runtime must know about a zone after it restarted (written atomically)."""

    spec: ZoneSpec
    domid: int
    started_at: datetime
    # loop devices made for this zone's disks, until the running zone holds them (then the
    # kernel frees them with the zone: xen_disks.release_loop)
    loops: tuple[Path, ...] = ()


def domain_name(zone_id: str) -> str:
    return f"{DOMAIN_PREFIX}{zone_id}"


def zone_of(domain: str) -> str | None:
    """The zone id a domain name stands for, or None if the domain is not one of ours."""
    zone_id = domain.removeprefix(DOMAIN_PREFIX)
    return zone_id if zone_id != domain and ZONE_ID.match(zone_id) else None


def xl_config(spec: ZoneSpec, settings: XenSettings, system_disk: Path | None = None) -> XlConfig:
    """The domain for ``spec``: the pod's CPU and memory limits (never below the floor the
    zone's own kernel, agent and tmpfs need), the shared root disk, the payload disk (the
    block device ``system_disk``, default the configured one)."""
    script = xen_disks.read_only_script()
    disks = [XlDisk(target=settings.root_disk, vdev=ROOT_VDEV, script=script)]
    system_disk = system_disk or settings.system_disk
    if system_disk is not None:
        disks.append(XlDisk(target=system_disk, vdev=SYSTEM_VDEV, script=script))
    memory = max(spec.memory_mib, settings.min_memory_mib)
    return XlConfig(
        name=domain_name(spec.zone_id),
        type=settings.type,
        kernel=settings.kernel,
        ramdisk=settings.ramdisk,
        extra=settings.extra,
        memory=memory,
        maxmem=memory,
        vcpus=spec.vcpus,
        disks=tuple(disks),
        on_crash=settings.on_crash,
    )


def agent_settings(
    spec: ZoneSpec, settings: XenSettings, oci_runtime: str, log_level: str
) -> zone_keys.ZoneAgentSettings:
    """The agent's settings for ``spec`` (xenstore key ``agent``)."""
    return zone_keys.ZoneAgentSettings(
        hostname=spec.hostname,
        oci_runtime=oci_runtime,
        log_level=log_level,
        gpu=spec.gpu is not None,
        libvgpu=settings.libvgpu if spec.gpu is not None else None,
    )


class XenZoneBackend:
    """Zones as Xen domUs, driven with ``xl`` and xenstore from Dom0."""

    name = "xen"
    gpu_proxy_finds_zones = True
    relays_logs = True  # the agent's log files are in the domU: the runtime pulls them
    shares_host_paths = False  # CRI mounts would need the files carried into the domU

    def __init__(
        self,
        root: Path,
        settings: XenSettings,
        *,
        oci_runtime: str = "auto",
        agent_log_level: str = "info",
        xl: Xl | None = None,
        xs: Xenstore | None = None,
    ) -> None:
        self.root = root
        self.settings = settings
        self._oci_runtime = oci_runtime
        self._agent_log_level = agent_log_level
        self._xl = xl or Xl()
        root.mkdir(parents=True, exist_ok=True)
        try:
            self._xs = xs or Xenstore.connect()
        except XenstoreError as exc:
            raise ZoneError(f"the Xen zone backend needs xenstore (run it in Dom0): {exc}") from exc
        xen_disks.load_block_backend()  # every zone has disks
        self._lock = threading.Lock()
        self._zone_locks = records.KeyedLocks(threading.RLock)
        self._clients: dict[str, AgentClient] = {}
        self._images = XenImageDisks(root / IMAGE_DISKS, self._xl, self._xs)

    # -- ZoneBackend --------------------------------------------------------------------------

    def boot(self, spec: ZoneSpec) -> ZoneInfo:
        with self._zone_locks.hold(spec.zone_id):
            record = self._read_record(spec.zone_id)
            domain = self._xl.domain(domain_name(spec.zone_id))
            if (
                record is not None
                and domain is not None
                and domain.domid == record.domid
                and not domain.ended
            ):
                try:  # booted by a runtime that died before it answered
                    self._client(spec.zone_id, record, spec.boot_timeout_s)
                    return self._info(spec.zone_id, record, domain)
                except ZoneError as exc:
                    log.warning("zone exists but its agent does not answer; booting it again",
                                zone_id=spec.zone_id, reason=str(exc))  # fmt: skip
            if domain is not None or self.zone_dir(spec.zone_id).exists():
                self._teardown(spec.zone_id, domain, grace_s=0)
            return self._boot(spec)

    def stop(self, zone_id: str, *, grace_s: float) -> None:
        if not ZONE_ID.match(zone_id):
            return
        with self._zone_locks.hold(zone_id):
            domain = self._xl.domain(domain_name(zone_id))
            if domain is None and not self.zone_dir(zone_id).exists():
                self._drop_client(zone_id)
                return
            self._teardown(zone_id, domain, grace_s=grace_s)
            log.info("zone stopped", zone_id=zone_id)

    def list(self) -> builtins.list[ZoneInfo]:
        zones: dict[str, ZoneInfo] = {}
        for domain in self._xl.list():
            zone_id = zone_of(domain.name)
            if zone_id is None:
                continue
            record = self._read_record(zone_id)
            if record is not None and record.domid == domain.domid:
                zones[zone_id] = self._info(zone_id, record, domain)
            else:  # a domain a killed runtime created but never recorded: stop() destroys it
                zones[zone_id] = ZoneInfo(
                    zone_id=zone_id,
                    state=ZoneState.EXITED if domain.ended else ZoneState.RUNNING,
                    started_at=datetime.now(UTC),
                    domid=domain.domid,
                )
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if ZONE_ID.match(directory.name) and directory.name not in zones:
                record = self._read_record(directory.name)
                started = (
                    record.started_at
                    if record is not None
                    else datetime.fromtimestamp(directory.stat().st_mtime, UTC)
                )
                zones[directory.name] = ZoneInfo(
                    zone_id=directory.name, state=ZoneState.EXITED, started_at=started
                )
        return [zones[z] for z in sorted(zones)]

    def agent(self, zone_id: str) -> AgentClient:
        with self._zone_locks.hold(zone_id):
            record = self._read_record(zone_id)
            if record is None or not self._domain_alive(record.domid, zone_id):
                raise ZoneError(f"zone {zone_id} is not running")
            return self._client(zone_id, record, self.settings.reconnect_timeout_s)

    def container_rootfs(
        self, zone_id: str, container_id: str, image_id: str, layers: Sequence[Path]
    ) -> tuple[tuple[Path, ...], ImageDisk | None]:
        """The image as a read-only disk of the zone (zones/xen_images.py): built before the
        zone is locked (a big image takes a while, and the zone's other calls go on), then
        attached once per zone and image."""
        with self._images.locked(image_id):
            self._images.disk(image_id, layers)
        with self._zone_locks.hold(zone_id):
            record = self._read_record(zone_id)
            if record is None or not self._domain_alive(record.domid, zone_id):
                raise ZoneError(f"zone {zone_id} is not running")
            domid = record.domid
            reserved = {ROOT_VDEV, SYSTEM_VDEV} if self.settings.system_disk else {ROOT_VDEV}
            disk = self._images.attach(
                self.zone_dir(zone_id),
                domain_name(zone_id),
                domid,
                container_id,
                image_id,
                layers,
                reserved=reserved,
                alive=lambda: self._domain_alive(domid, zone_id),
            )
        return xen_images.zone_layers(image_id, layers), disk

    def release_rootfs(self, zone_id: str, container_id: str) -> None:
        """Detach the container's image disk when no other container of the zone uses it; a
        zone that is gone took its disks along."""
        if not ZONE_ID.match(zone_id):
            return
        with self._zone_locks.hold(zone_id):
            record = self._read_record(zone_id)
            if record is None or not self._domain_alive(record.domid, zone_id):
                return
            self._images.detach(self.zone_dir(zone_id), domain_name(zone_id), container_id)

    def prune_images(self, live: Collection[str]) -> None:
        """Delete the disks of images neither the store nor a container holds any more."""
        self._images.prune(live)

    def zone_dir(self, zone_id: str) -> Path:
        if not ZONE_ID.match(zone_id):
            raise ZoneError(f"invalid zone id {zone_id!r}")
        return self.root / zone_id

    def close(self) -> None:
        """Drop the control channels; zones keep running and their agents wait for the next
        runtime's session."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
        self._xs.close()

    # -- booting ------------------------------------------------------------------------------

    def _boot(self, spec: ZoneSpec) -> ZoneInfo:
        zone_id = spec.zone_id
        name = domain_name(zone_id)
        started = time.monotonic()
        try:
            record, session = self._create_paused(spec)
            created = time.monotonic()
            self._xl.unpause(name)
            client = self._attach(zone_id, record, session, spec.boot_timeout_s)
            self._release_loops(record)  # the zone holds its disks now
        except BaseException as exc:
            tail = self._console_tail(zone_id)
            self._discard(zone_id)
            if isinstance(exc, ZoneError):
                raise ZoneError(f"{exc}{tail}") from exc
            raise
        with self._lock:
            self._clients[zone_id] = client
        log.info(
            "zone booted",
            zone_id=zone_id,
            domid=record.domid,
            create_s=round(created - started, 2),
            agent_ready_s=round(time.monotonic() - created, 2),
            oci_runtime=client.ready.oci_runtime,
        )
        return ZoneInfo(
            zone_id=zone_id, state=ZoneState.RUNNING, started_at=record.started_at,
            domid=record.domid,
        )  # fmt: skip

    def _create_paused(self, spec: ZoneSpec) -> tuple[XenZoneRecord, str]:
        """Boot's first half: the domain built and paused, its record and xenstore home
        written; returns the record and the control session. Undo with ``_discard``."""
        name = domain_name(spec.zone_id)
        directory = self.zone_dir(spec.zone_id)
        directory.mkdir(mode=0o700, parents=True)
        record = XenZoneRecord(spec=spec, domid=-1, started_at=datetime.now(UTC))
        system_disk = self.settings.system_disk
        if system_disk is not None and system_disk.is_file():  # an ext4 image: a loop device
            system_disk = xen_disks.attach_loop(system_disk)
            record = record.model_copy(update={"loops": (system_disk,)})
            self._write_record(record)
        config = xl_config(spec, self.settings, system_disk)
        (directory / XL_CONFIG).write_text(config.render())
        self._xl.create_paused(directory / XL_CONFIG)
        domain = self._xl.domain(name)
        if domain is None:
            raise ZoneError(f"xl create -p {name} succeeded but xl list does not show it")
        record = record.model_copy(update={"domid": domain.domid})
        self._write_record(record)
        return record, self._write_home(record)

    def _discard(self, zone_id: str) -> None:
        """Undo a boot that failed: the domain destroyed (no agent to ask), files removed."""
        try:
            self._teardown(
                zone_id, self._xl.domain(domain_name(zone_id)), grace_s=0, ask_agent=False
            )
        except ZoneError as exc:
            log.error("a failed zone boot left something behind", zone_id=zone_id, error=str(exc))

    def _write_home(self, record: XenZoneRecord) -> str:
        """The zone's toolstack-owned keys (Dom0 writes, the domain reads); returns the session."""
        spec = record.spec
        base = zone_keys.home(record.domid)
        settings = agent_settings(spec, self.settings, self._oci_runtime, self._agent_log_level)
        session = secrets.token_hex(16)
        try:
            self._xs.remove(base)
            self._xs.mkdir(base)
            self._xs.set_perms(base, 0, [record.domid])
            self._xs.write(f"{base}/{zone_keys.ZONE_ID_KEY}", spec.zone_id)
            if spec.gpu is not None and spec.gpu.memory_limit > 0:
                limit = str(spec.gpu.memory_limit)
                self._xs.write(f"{base}/{zone_keys.MEMORY_LIMIT_KEY}", limit)
            self._xs.write(f"{base}/{zone_keys.AGENT_KEY}", settings.model_dump_json())
            self._xs.write(f"{base}/{zone_keys.SESSION_KEY}", session)
        except XenstoreError as exc:
            raise ZoneError(f"zone {spec.zone_id}: writing its xenstore home: {exc}") from exc
        return session

    def _new_session(self, record: XenZoneRecord) -> str:
        """Ask the zone's agent for a fresh control channel: forget the host side a dead
        runtime left, then change the token the agent re-reads."""
        session = secrets.token_hex(16)
        try:
            self._xs.remove(zone_keys.control_host_path(record.domid))
            self._xs.write(f"{zone_keys.home(record.domid)}/{zone_keys.SESSION_KEY}", session)
        except XenstoreError as exc:
            raise ZoneError(f"zone {record.spec.zone_id}: new control session: {exc}") from exc
        return session

    def _attach(
        self, zone_id: str, record: XenZoneRecord, session: str, timeout_s: float
    ) -> AgentClient:
        """Wait for the agent's offer for ``session``, attach it, take hello and READY."""
        domid = record.domid
        offer = zone_keys.control_offer_path(domid)
        marker = zone_keys.offer_session_path(domid)
        deadline = time.monotonic() + timeout_s
        last_error = "no offer"
        with self._xs.watch(f"/local/domain/{domid}/data") as watch:
            while True:
                if not self._domain_alive(domid, zone_id):
                    raise ZoneError(
                        f"zone {zone_id}: domain {domid} ended before its agent was ready"
                    )
                ready = (
                    self._xs.read(marker) == session
                    and self._xs.read(f"{offer}/state") == "offered"
                )
                if ready:
                    try:
                        link = GrantLink.attach(
                            domid,
                            zone_keys.CONTROL_CHANNEL,
                            self._xs,
                            service=zone_keys.CONTROL_SERVICE,
                        )
                        client = AgentClient.handshake(
                            link.open_channel(),
                            peer_alive=lambda: self._offer_alive(domid, session),
                        )
                    except (InvalidOffer, OSError, ChannelError, AgentGone) as exc:
                        last_error = str(exc)
                        log.warning("control channel attach failed", zone_id=zone_id,
                                    domid=domid, error=last_error)  # fmt: skip
                    else:
                        if client.ready.zone_id != zone_id:
                            client.close()
                            raise ZoneError(
                                f"zone {zone_id}: domain {domid}'s agent says it serves zone "
                                f"{client.ready.zone_id!r}"
                            )
                        return client
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ZoneError(
                        f"zone {zone_id}: its agent did not offer a control channel within "
                        f"{timeout_s:.0f} s ({last_error})"
                    )
                watch.wait(min(left, WATCH_TICK_S))

    def _offer_alive(self, domid: int, session: str) -> bool:
        """The agent still offers the channel of this session (the domain's keys vanish with
        it, and an agent that withdrew its offer is reconnecting)."""
        try:
            return (
                self._xs.read(f"{zone_keys.control_offer_path(domid)}/state") == "offered"
                and self._xs.read(zone_keys.offer_session_path(domid)) == session
            )
        except XenstoreError:
            return True  # xenstore hiccup: the channel itself says when it breaks

    def _client(self, zone_id: str, record: XenZoneRecord, timeout_s: float) -> AgentClient:
        with self._lock:
            client = self._clients.get(zone_id)
        if client is not None and not client.closed:
            return client
        if client is not None:
            client.close()
        session = self._new_session(record)
        client = self._attach(zone_id, record, session, timeout_s)
        with self._lock:
            old, self._clients[zone_id] = self._clients.get(zone_id), client
        if old is not None and old is not client:
            old.close()
        log.info("zone agent reattached", zone_id=zone_id, domid=record.domid,
                 containers=len(client.ready.containers))  # fmt: skip
        return client

    # -- stopping -----------------------------------------------------------------------------

    def _teardown(
        self, zone_id: str, domain: Domain | None, *, grace_s: float, ask_agent: bool = True
    ) -> None:
        """Agent SHUTDOWN (``ask_agent``), channel dropped, the domain gone (powered off, else
        destroyed), the host's keys and the zone's directory removed."""
        name = domain_name(zone_id)
        record = self._read_record(zone_id)
        running = domain is not None and not domain.ended
        ours = domain is not None and record is not None and record.domid == domain.domid
        agent_stopped = False
        if ask_agent and running and ours and record is not None:
            try:
                client = self._client(zone_id, record, min(self.settings.reconnect_timeout_s, 5.0))
                client.shutdown(grace_s)
                agent_stopped = True
            except (ZoneError, AgentError, AgentGone) as exc:
                log.warning("zone: no clean shutdown", zone_id=zone_id, reason=str(exc))
        self._drop_client(zone_id)  # grant mappings would keep a destroyed domain a zombie
        if domain is not None:
            grace = self.settings.shutdown_grace_s
            gone = agent_stopped and self._wait_gone(name, grace)  # the agent powers it off
            if running and ask_agent and not gone:
                with contextlib.suppress(ZoneError):  # no PV shutdown support is a failure
                    self._xl.shutdown(name)
                    gone = self._wait_gone(name, grace)
            if not gone and self._xl.domain(name) is not None:
                self._destroy(name)
            with contextlib.suppress(XenstoreError):
                self._xs.remove(zone_keys.control_host_path(domain.domid))
        if record is not None:
            self._release_loops(record)
        with contextlib.suppress(ZoneError):
            self._images.zone_gone(self.zone_dir(zone_id))
        shutil.rmtree(self.zone_dir(zone_id), ignore_errors=True)
        if self.zone_dir(zone_id).exists():
            raise ZoneError(f"zone {zone_id}: could not remove {self.zone_dir(zone_id)}")

    def _destroy(self, name: str) -> None:
        """``xl destroy``. The daemon ``xl create`` left to watch the domain destroys it too
        once it dies (on_poweroff/on_crash), and the two race over removing its devices: a
        failure is one only if the domain is still there afterwards."""
        try:
            self._xl.destroy(name)
        except ZoneError as exc:
            if not self._wait_gone(name, DESTROY_RACE_S):
                raise
            log.info("xl destroy raced the domain's own teardown", domain=name, error=str(exc))

    def _release_loops(self, record: XenZoneRecord) -> None:
        """Hand the zone's loop devices to the kernel (freed now, or when the zone that holds
        them ends) and forget them, so a reused loop number is never released twice."""
        for device in record.loops:
            with contextlib.suppress(ZoneError):
                xen_disks.release_loop(device)
        if record.loops and self.zone_dir(record.spec.zone_id).is_dir():
            self._write_record(record.model_copy(update={"loops": ()}))

    def _wait_gone(self, name: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            domain = self._xl.domain(name)
            if domain is None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(GONE_POLL_S)

    def _drop_client(self, zone_id: str) -> None:
        with self._lock:
            client = self._clients.pop(zone_id, None)
        if client is not None:
            client.close()

    # -- records and state --------------------------------------------------------------------

    def _domain_alive(self, domid: int, zone_id: str) -> bool:
        """From xenstore (no fork of xl): the domain's home still names it."""
        try:
            return self._xs.read(f"/local/domain/{domid}/name") == domain_name(zone_id)
        except XenstoreError:
            return False

    def _info(self, zone_id: str, record: XenZoneRecord, domain: Domain) -> ZoneInfo:
        return ZoneInfo(
            zone_id=zone_id,
            state=ZoneState.EXITED if domain.ended else ZoneState.RUNNING,
            started_at=record.started_at,
            domid=domain.domid,
        )

    def _read_record(self, zone_id: str) -> XenZoneRecord | None:
        return records.read_record(self.zone_dir(zone_id), XenZoneRecord)

    def _write_record(self, record: XenZoneRecord) -> None:
        records.write_record(self.zone_dir(record.spec.zone_id), record)

    def _console_tail(self, zone_id: str) -> str:
        """The zone's console (xenconsoled's guest log), for a boot error's message."""
        path = self.settings.console_log_dir / f"guest-{domain_name(zone_id)}.log"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - CONSOLE_TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return f"; console ({path}):\n{text}"
