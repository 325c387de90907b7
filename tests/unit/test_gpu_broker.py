"""The zone agent's GPU channel broker, and the header it hands a CUDA process with its fds.

First the header (idm/links/grant_fd.py) against C's struct and its validation; then the zone
process's side (idm/csrc/grant_fd_link.c, the very code libvgpu links, through cffi) refusing bad
headers and fds from a scripted broker, and leaking none of them; then the broker itself over
the Xen stand-ins (xen_fakes.py): offer per connection, hand-over once the host has attached,
withdrawal when the process hangs up, hang-up when the host goes, a bounded wait with a reason.
"""

import errno
import mmap
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from cri_runtime.agent.config import parse_args
from cri_runtime.agent.gpu_broker import GrantChannelBroker
from idm._ring import ffi, lib
from idm.channel import PAGE_SIZE, RingLayout
from idm.links import grant
from idm.links.grant import GrantLink, host_path, zone_path
from idm.links.grant_fd import HEADER, WHY_LEN, GrantFdOffer, GrantFdRefusal
from idm.xen.xenstore import Xenstore
from tests.unit.conftest import XS_ZONE
from tests.unit.xen_fakes import FakeXen

LAYOUT = RingLayout(req_order=13, rsp_order=12)
OFFER = GrantFdOffer(
    layout=LAYOUT,
    peer_domid=3,
    mmap_offset=8 * PAGE_SIZE,
    mmap_length=LAYOUT.region_size,
    req_port=7,
    rsp_port=9,
)


def decode(raw: bytes) -> Any:
    """The header as C reads it."""
    assert len(raw) == ffi.sizeof("struct idm_grant_fd_offer")
    c = ffi.new("struct idm_grant_fd_offer *")
    ffi.memmove(c, raw, len(raw))
    return c


def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="broker-", dir="/tmp"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


# -- the header -------------------------------------------------------------------------------


def test_the_header_is_cs_struct_byte_for_byte() -> None:
    c = decode(OFFER.encode())
    assert (c.magic, c.layout_version, c.status, c.peer_domid) == (
        lib.IDM_GRANT_FD_MAGIC,
        lib.IDM_LAYOUT_VERSION,
        0,
        3,
    )
    assert (c.layout.req_order, c.layout.rsp_order) == (13, 12)
    assert (c.mmap_offset, c.mmap_length) == (8 * PAGE_SIZE, 4 * PAGE_SIZE)
    assert (c.req_port, c.rsp_port, ffi.string(c.why)) == (7, 9, b"")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mmap_offset": 100}, "not page aligned"),
        ({"mmap_length": PAGE_SIZE}, "not the layout's region size"),
        ({"rsp_port": 7}, "both 7"),
        ({"req_port": 0}, "greater than or equal to 1"),
        ({"rsp_port": 1 << 17}, "less than or equal to 131071"),
        ({"mmap_offset": (1 << 63) - PAGE_SIZE}, "leaves no room"),
        ({"peer_domid": 0x7FF0}, "less than 32752"),
    ],
)
def test_offers_that_c_would_refuse_cannot_be_built(change: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GrantFdOffer.model_validate({**OFFER.model_dump(), **change})


def test_a_refusal_carries_errno_and_a_cut_nul_terminated_reason() -> None:
    why = "é" * WHY_LEN  # two bytes each: the cut must not split one
    c = decode(GrantFdRefusal(code=errno.ETIMEDOUT, why=why).encode())
    assert c.status == -errno.ETIMEDOUT
    text = ffi.string(c.why)
    assert len(text) == WHY_LEN - 2 and text.decode() == "é" * ((WHY_LEN - 2) // 2)
    with pytest.raises(ValidationError):
        GrantFdRefusal(code=0, why="no errno")


# -- the process's side refuses what it cannot use -----------------------------------------------


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def c_connect(path: Path, timeout_ms: int = 5000) -> tuple[int, str]:
    """idm_grant_fd_connect, as libvgpu calls it; the link is released again on success."""
    link = ffi.new("struct idm_grant_fd_link *")
    why = ffi.new("char[]", 256)
    rc = lib.idm_grant_fd_connect(link, os.fsencode(path), timeout_ms, why, 256)
    if rc == 0:
        lib.idm_grant_fd_release(link)
    return rc, ffi.string(why).decode()


class ScriptedBroker:
    """Answers one connection with ``data`` and ``fds`` (neither: hangs up), then waits for the
    process to leave."""

    def __init__(self, path: Path, data: bytes, fds: list[int]) -> None:
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._run, args=(data, fds))
        self._thread.start()

    def _run(self, data: bytes, fds: list[int]) -> None:
        conn, _ = self._listener.accept()
        with conn:
            if fds:
                socket.send_fds(conn, [data], fds)
            elif data:
                conn.sendall(data)
            else:
                return  # hang up at once
            conn.settimeout(10)
            conn.recv(1)

    def close(self) -> None:
        self._thread.join(10)
        self._listener.close()


def header(**fields: int) -> bytes:
    values = {
        "magic": lib.IDM_GRANT_FD_MAGIC,
        "version": lib.IDM_LAYOUT_VERSION,
        "status": 0,
        "peer_domid": 0,
        "req_order": 13,
        "rsp_order": 12,
        "offset": 0,
        "length": LAYOUT.region_size,
        "req_port": 7,
        "rsp_port": 9,
    }
    values.update(fields)
    return HEADER.pack(*values.values(), b"")


def devices(*paths: str) -> list[int]:
    """Open device nodes for the scripted broker to pass; skips where the node is missing."""
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        pytest.skip(f"{missing} not present on this machine")
    return [os.open(path, os.O_RDWR | os.O_CLOEXEC) for path in paths]


MEMFDS = "memfds"
BAD_HEADERS = [
    (b"", None, errno.ECONNRESET, "the zone agent hung up before sending a channel"),
    (header()[:10], None, errno.EPROTO, "the zone agent's header is 10 bytes, not 176"),
    (header(magic=0x314D4449), MEMFDS, errno.EPROTO, "bad header magic 0x314d4449"),
    (header(version=2), MEMFDS, errno.EPROTO, "layout version 2, this side speaks 1"),
    (header(peer_domid=0x7FF0), MEMFDS, errno.EPROTO, "peer domain 32752 is not a domain id"),
    (header(), None, errno.EPROTO, "the channel came with 0 fds, not 3"),
    (header(req_order=40), MEMFDS, errno.EINVAL, "ring orders 40/12 are out of range 12..24"),
    (header(length=PAGE_SIZE), MEMFDS, errno.EINVAL, "region length 4096 does not match"),
    (header(offset=100), MEMFDS, errno.EINVAL, "region offset 100 is not a page offset"),
    (header(rsp_port=7), MEMFDS, errno.EINVAL, "ports 7/7 must be distinct and in 1..131071"),
    (header(req_port=1 << 17), MEMFDS, errno.EINVAL, "ports 131072/9 must be distinct"),
    (header(), MEMFDS, errno.EBADF, "the gntalloc fd is not a Xen device"),
    (header(), ("/dev/null",) * 3, errno.EBADF, "the gntalloc fd is not a Xen device"),
    (
        header(),
        ("/dev/net/tun", "/dev/net/tun", "/dev/loop-control"),
        errno.EBADF,
        "the two evtchn fds must be one device and the gntalloc fd another",
    ),
    (
        header(),
        ("/dev/loop-control", "/dev/net/tun", "/dev/net/tun"),
        errno.ENODEV,
        "mapping the granted region: No such device",
    ),
]


@pytest.mark.parametrize(("data", "fds", "code", "message"), BAD_HEADERS)
def test_the_process_refuses_a_bad_header_or_bad_fds_and_keeps_none(
    short_dir: Path, data: bytes, fds: str | tuple[str, ...] | None, code: int, message: str
) -> None:
    before = open_fds()
    if fds == MEMFDS:
        passed = [os.memfd_create("not-gntalloc") for _ in range(3)]
        for fd in passed:
            os.ftruncate(fd, LAYOUT.region_size)
    else:
        passed = devices(*fds) if fds else []
    path = short_dir / "broker.sock"
    broker = ScriptedBroker(path, data, passed)
    try:
        rc, why = c_connect(path)
    finally:
        broker.close()
        for fd in passed:
            os.close(fd)
    assert (rc, why[: len(message)]) == (-code, message), why
    assert open_fds() == before  # the process closed every fd it received


def test_the_brokers_own_refusal_is_reported_with_its_reason(short_dir: Path) -> None:
    why = "waiting for gpu-proxy: gpu-proxy did not attach gpu-0"
    refusal = GrantFdRefusal(code=errno.ETIMEDOUT, why=why).encode()
    broker = ScriptedBroker(short_dir / "broker.sock", refusal, [])
    try:
        rc, text = c_connect(short_dir / "broker.sock")
    finally:
        broker.close()
    assert (rc, text) == (-errno.ETIMEDOUT, f"the zone agent could not set up the channel: {why}")


def test_a_silent_broker_costs_the_process_a_bounded_wait(short_dir: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_dir / "silent.sock"))
    listener.listen(1)
    try:
        started = time.monotonic()
        rc, why = c_connect(short_dir / "silent.sock", timeout_ms=300)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert (rc, why) == (-errno.ETIMEDOUT, "the zone agent sent no channel within 300 ms")
    assert 0.25 < elapsed < 5


# -- the broker over the Xen stand-ins ----------------------------------------------------------


@pytest.fixture
def xen(monkeypatch: pytest.MonkeyPatch) -> FakeXen:
    """The zone (the broker) grants and allocates ports; the host (this test) maps and binds."""
    xen = FakeXen()
    zone_pages, _mapped, zone_evtchn = xen.devices(XS_ZONE)
    _pages, host_mapped, host_evtchn = xen.devices(0)
    monkeypatch.setattr(grant, "GrantedPages", zone_pages)
    monkeypatch.setattr(grant, "MappedGrants", host_mapped)
    evtchn = SimpleNamespace(
        bind_unbound_port=zone_evtchn.bind_unbound_port,
        bind_interdomain=host_evtchn.bind_interdomain,
    )
    monkeypatch.setattr(grant, "EventChannel", evtchn)
    return xen


@pytest.fixture
def broker(short_dir: Path, zone_xs: Xenstore, xen: FakeXen) -> Iterator[GrantChannelBroker]:
    broker = GrantChannelBroker(
        short_dir / "proxy.sock", zone_xs, layout=LAYOUT, connect_timeout_s=5, liveness_poll_s=0.05
    )
    broker.start()
    yield broker
    broker.close()
    assert not broker.is_alive()


def state(xs: Xenstore, name: str) -> str | None:
    return xs.read(f"{zone_path(XS_ZONE, name)}/state")


def attach_when_offered(host_xs: Xenstore, name: str) -> GrantLink:
    """What gpu-proxy's watcher does for the zone's offer."""
    eventually(lambda: state(host_xs, name) == "offered", f"the offer of {name}")
    return GrantLink.attach(XS_ZONE, name, host_xs)


def connect(broker: GrantChannelBroker) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(broker.socket_path))
    client.settimeout(10)
    return client


def zone_grants(xen: FakeXen) -> list[int]:
    return [ref for domid, ref in xen.grants if domid == XS_ZONE]


def test_a_process_gets_the_attached_channel_and_its_exit_withdraws_it(
    broker: GrantChannelBroker, xen: FakeXen, host_xs: Xenstore
) -> None:
    assert stat.S_IMODE(broker.socket_path.stat().st_mode) == 0o666  # any container uid
    client = connect(broker)
    host = attach_when_offered(host_xs, "gpu-0")
    data, fds, _flags, _addr = socket.recv_fds(client, HEADER.size, 4)
    c = decode(data)
    offered = {key: host_xs.read(f"{zone_path(XS_ZONE, 'gpu-0')}/{key}") for key in grant.ZONE_KEYS}
    assert (c.status, str(c.req_port), str(c.rsp_port)) == (
        0,
        offered["req-port"],
        offered["rsp-port"],
    )
    assert (c.layout.req_order, c.layout.rsp_order, c.mmap_length) == (13, 12, LAYOUT.region_size)
    assert len(fds) == 3
    granted = xen.grants[(XS_ZONE, int(str(offered["ring-ref"])))]
    assert os.fstat(fds[0]).st_ino == os.fstat(granted.memfd).st_ino
    region = mmap.mmap(fds[0], c.mmap_length, offset=c.mmap_offset)
    ctrl = ffi.cast("struct idm_ctrl *", ffi.from_buffer(region))
    assert (ctrl.magic, ctrl.zone_closed) == (lib.IDM_CTRL_MAGIC, 0)
    assert broker.channels() == ["gpu-0"]

    # The process exits: the broker closes the zone side of the ring, ends the grants, withdraws.
    del ctrl
    region.close()
    for fd in fds:
        os.close(fd)
    client.close()
    eventually(lambda: state(host_xs, "gpu-0") is None, "the offer to be withdrawn")
    eventually(lambda: broker.channels() == [], "the session to end")
    assert zone_grants(xen) == []
    host_view = ffi.cast("struct idm_ctrl *", ffi.from_buffer(host.memory))
    assert host_view.zone_closed == 1  # gpu-proxy's serving thread wakes without a poll
    del host_view
    host.close()


def test_the_broker_hangs_up_when_the_host_side_goes(
    broker: GrantChannelBroker, xen: FakeXen, host_xs: Xenstore
) -> None:
    client = connect(broker)
    host = attach_when_offered(host_xs, "gpu-0")
    _data, fds, _flags, _addr = socket.recv_fds(client, HEADER.size, 4)
    host.close()  # gpu-proxy closed the channel: its state key goes
    assert client.recv(1) == b""  # the process's watchdog sees this
    eventually(lambda: state(host_xs, "gpu-0") is None, "the offer to be withdrawn")
    eventually(lambda: zone_grants(xen) == [], "the grants to end")
    for fd in fds:
        os.close(fd)
    client.close()


def test_every_process_gets_a_channel_of_its_own(
    broker: GrantChannelBroker, xen: FakeXen, host_xs: Xenstore
) -> None:
    leaving = connect(broker)
    eventually(lambda: state(host_xs, "gpu-0") == "offered", "the first offer")
    leaving.close()  # gone before gpu-proxy attached: withdrawn, nothing handed over
    eventually(lambda: state(host_xs, "gpu-0") is None, "the first offer to be withdrawn")
    staying = connect(broker)
    host = attach_when_offered(host_xs, "gpu-1")
    data, fds, _flags, _addr = socket.recv_fds(staying, HEADER.size, 4)
    assert decode(data).status == 0 and len(fds) == 3
    assert broker.channels() == ["gpu-1"]
    broker.close()  # hangs up on the process and withdraws
    assert staying.recv(1) == b""
    assert state(host_xs, "gpu-1") is None and zone_grants(xen) == []
    for fd in fds:
        os.close(fd)
    staying.close()
    host.close()


def test_without_gpu_proxy_the_process_is_told_why_after_a_bounded_wait(
    short_dir: Path, zone_xs: Xenstore, xen: FakeXen
) -> None:
    broker = GrantChannelBroker(short_dir / "b.sock", zone_xs, layout=LAYOUT, connect_timeout_s=0.3)
    broker.start()
    try:
        rc, why = c_connect(broker.socket_path)
    finally:
        broker.close()
    assert rc == -errno.ETIMEDOUT
    assert why == (
        "the zone agent could not set up the channel: waiting for gpu-proxy: gpu-proxy did not "
        f"attach {zone_path(XS_ZONE, 'gpu-0')} within 0.3 s (is gpu-proxy running in Dom0?)"
    )
    assert state(zone_xs, "gpu-0") is None and zone_grants(xen) == []


def test_offers_a_previous_agent_left_behind_are_withdrawn_at_start(
    short_dir: Path, zone_xs: Xenstore, host_xs: Xenstore, xen: FakeXen
) -> None:
    for name in ("gpu-3", "cuda0"):
        zone_xs.write(f"{zone_path(XS_ZONE, name)}/state", "offered")
    broker = GrantChannelBroker(short_dir / "b.sock", zone_xs, layout=LAYOUT)
    broker.start()
    broker.close()
    assert state(zone_xs, "gpu-3") is None
    assert state(zone_xs, "cuda0") == "offered"  # not the broker's
    assert host_xs.read(host_path(0, XS_ZONE, "gpu-3")) is None


def test_the_agent_flag_selects_the_link_gpu_containers_are_told_about() -> None:
    base = ["--zone-id", "z", "--control-socket", "/c.sock", "--zone-dir", "/z"]
    assert parse_args(base).gpu_link == "local"
    assert parse_args([*base, "--gpu-link", "grant"]).gpu_link == "grant"
    with pytest.raises(SystemExit):
        parse_args([*base, "--gpu-link", "vchan"])
