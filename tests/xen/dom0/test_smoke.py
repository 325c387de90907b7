"""Smoke suite run inside the testbed's Dom0, on real Xen: the toolstack, xenstore through pyxs,
and a PV guest that grants Dom0 a page and signals it over an event channel.

Collected only there (marker dom0): tests/xen/test_testbed.py boots the testbed and runs it.
"""

import itertools
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from idm.xen.evtchn import EventChannel
from idm.xen.gntdev import MappedGrants
from idm.xen.xenstore import Xenstore

pytestmark = pytest.mark.dom0

GUEST = Path("/opt/testbed/guest")
CONSOLE_LOGS = Path("/var/log/xen/console")
# Under emulation a PV guest's init runs ~10 s after `xl create`; leave ample room.
GUEST_TIMEOUT_S = 240
_names = itertools.count()


def xl(*args: str, timeout: float = 180) -> str:
    proc = subprocess.run(["xl", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"xl {' '.join(args)} failed: {proc.stderr.strip()}"
    return proc.stdout


def running_domains() -> set[str]:
    lines = xl("list").splitlines()[1:]
    return {line.split()[0] for line in lines if line.strip()}


def wait_for(what: str, probe: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture
def xs() -> Iterator[Xenstore]:
    with Xenstore.connect() as client:
        yield client


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A PV guest booted from the testbed's guest kernel and initramfs; destroyed afterwards."""
    name = f"testbed-guest-{next(_names)}"
    config = tmp_path / f"{name}.cfg"
    config.write_text(
        f'name = "{name}"\n'
        'type = "pv"\n'
        f'kernel = "{GUEST / "vmlinux"}"\n'
        f'ramdisk = "{GUEST / "guest.cpio.gz"}"\n'
        'extra = "console=hvc0 quiet"\n'
        "memory = 128\n"
        "vcpus = 1\n"
        'on_crash = "preserve"\n'
    )
    xl("create", str(config))
    domid = int(xl("domid", name))
    yield domid, name
    if name in running_domains():
        xl("destroy", name)


def console(name: str) -> str:
    log = CONSOLE_LOGS / f"guest-{name}.log"
    return log.read_text(errors="replace") if log.exists() else ""


def test_xl_info_reports_xen_4_17_with_pv() -> None:
    info = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in xl("info").splitlines())
    )
    assert (info["xen_major"], info["xen_minor"]) == ("4", "17")
    assert "pv" in info["virt_caps"].split()
    assert "Domain-0" in running_domains()


def test_xenstore_read_write_watch_with_pyxs(xs: Xenstore) -> None:
    base = "/local/domain/0/data/testbed-smoke"
    xs.write(f"{base}/a", "1")
    assert xs.read(f"{base}/a") == "1"
    assert xs.read(f"{base}/missing") is None
    with xs.watch(base) as watch:
        assert watch.wait(10) == base  # a new watch fires once at once
        xs.write(f"{base}/b", "2")
        assert watch.wait(10) == f"{base}/b"
    xs.remove(base)
    assert xs.read(f"{base}/a") is None


def test_pv_guest_boots_and_is_destroyed(guest: tuple[int, str]) -> None:
    domid, name = guest
    assert domid > 0 and name in running_domains()
    wait_for("the guest's init", lambda: "TESTBED-GUEST-UP" in console(name), GUEST_TIMEOUT_S)
    xl("destroy", name)
    assert name not in running_domains()


def test_guest_grants_dom0_a_page_and_signals_it(guest: tuple[int, str], xs: Xenstore) -> None:
    domid, name = guest
    base = f"/local/domain/{domid}/data/testbed"
    wait_for(
        f"{base}/state = offered (console: {console(name)[-500:]!r})",
        lambda: xs.read(f"{base}/state") == "offered",
        GUEST_TIMEOUT_S,
    )
    gref, port = int(xs.read(f"{base}/gref") or "0"), int(xs.read(f"{base}/port") or "0")
    with MappedGrants.map(domid, [gref]) as page:
        data = bytes(page.memory[:4096])
        assert data[:16] == b"vgpu-testbed-v1\0"
        assert all(data[i] == (i * 7 + 3) & 0xFF for i in range(16, 4096))
        page.memory[4088:4096] = b"dom0-ack"
    with EventChannel.bind_interdomain(domid, port) as channel:
        channel.notify()
        # The guest powers off once it has checked the page, taking its xenstore nodes with it:
        # its console line is the verdict.
        wait_for("the guest's result line", lambda: "TESTBED-GUEST-RESULT" in console(name), 120)
    assert "TESTBED-GUEST-RESULT acked" in console(name), console(name)[-800:]
