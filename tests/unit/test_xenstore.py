"""idm.xen.xenstore over pyxs 0.4.1, talking xenstore's wire protocol to an in-memory xenstored
(tests/unit/xen_fakes.py) on a real unix socket: this is also the check that pyxs works on the
project's Python."""

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from idm.xen import xenstore
from idm.xen.xenstore import Xenstore, XenstoreError
from tests.unit.xen_fakes import FakeXenstored

ZONE = 5


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[FakeXenstored]:
    server = FakeXenstored(tmp_path)
    server.add_domain(0)
    server.add_domain(ZONE)
    yield server
    server.close()


@pytest.fixture
def host(xenstored: FakeXenstored) -> Iterator[Xenstore]:
    with Xenstore.connect(socket_path=xenstored.listen(0)) as xs:
        yield xs


@pytest.fixture
def zone(xenstored: FakeXenstored) -> Iterator[Xenstore]:
    with Xenstore.connect(socket_path=xenstored.listen(ZONE)) as xs:
        yield xs


def test_write_read_mkdir_remove(host: Xenstore) -> None:
    host.write("/local/domain/0/a/b", "hello")
    assert host.read("/local/domain/0/a/b") == "hello"
    host.mkdir("/local/domain/0/a/c")
    assert host.read("/local/domain/0/a/c") == ""
    host.remove("/local/domain/0/a")
    assert host.read("/local/domain/0/a/b") is None
    host.remove("/local/domain/0/a")  # already gone: not an error
    host.remove("/local/domain/0/no/such/parent")


def test_own_domid_comes_from_the_domains_home(host: Xenstore, zone: Xenstore) -> None:
    assert host.own_domid() == 0
    assert zone.own_domid() == ZONE


def test_own_domid_refuses_a_missing_key(zone: Xenstore, host: Xenstore) -> None:
    host.remove(f"/local/domain/{ZONE}/domid")
    with pytest.raises(XenstoreError, match="xenstore key 'domid' is None, not a domain id"):
        zone.own_domid()


def test_permissions_keep_the_zone_out_of_host_keys(host: Xenstore, zone: Xenstore) -> None:
    host.write("/local/domain/0/backend/x", "host")
    host.set_perms("/local/domain/0/backend/x", 0, [ZONE])
    assert host.get_perms("/local/domain/0/backend/x") == ["n0", f"r{ZONE}"]
    assert zone.read("/local/domain/0/backend/x") == "host"
    with pytest.raises(XenstoreError) as info:
        zone.write("/local/domain/0/backend/x", "zone")
    assert info.value.errno == errno.EACCES
    assert str(info.value) == "xenstore write /local/domain/0/backend/x: EACCES: Permission denied"
    assert host.read("/local/domain/0/backend/x") == "host"


def test_zone_owns_what_it_creates_in_its_subtree(zone: Xenstore, host: Xenstore) -> None:
    path = f"/local/domain/{ZONE}/data/vgpu/c0/state"
    zone.write(path, "offered")
    assert zone.get_perms(path)[0] == f"n{ZONE}"
    zone.set_perms(path, ZONE, [0])
    assert host.get_perms(path) == [f"n{ZONE}", "r0"]


def test_unreadable_node_is_an_error_not_none(host: Xenstore, zone: Xenstore) -> None:
    host.write("/local/domain/0/secret", "s")
    with pytest.raises(XenstoreError) as info:
        zone.read("/local/domain/0/secret")
    assert info.value.errno == errno.EACCES
    assert info.value.path == "/local/domain/0/secret"


def test_watch_fires_at_once_then_on_changes_below(host: Xenstore) -> None:
    host.mkdir("/local/domain/0/w")
    with host.watch("/local/domain/0/w") as watch:
        assert watch.wait(timeout=5) == "/local/domain/0/w"
        host.write("/local/domain/0/w/state", "connected")
        assert watch.wait(timeout=5) == "/local/domain/0/w/state"
        host.write("/local/domain/0/elsewhere", "x")
        assert watch.wait(timeout=0.2) is None


def test_values_and_paths_pyxs_cannot_send_are_value_errors(host: Xenstore) -> None:
    with pytest.raises(ValueError, match="empty values"):
        host.write("/local/domain/0/x", "")
    with pytest.raises(ValueError):
        host.read("/local/domain/0/bad path")


def test_connect_without_xenstore_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "socket"))
    monkeypatch.setattr(xenstore, "XENBUS", str(tmp_path / "xenbus"))
    with pytest.raises(XenstoreError) as info:
        Xenstore.connect()
    assert info.value.errno == errno.ENOENT
    assert str(info.value) == (
        f"no xenstore here: neither {tmp_path}/socket nor {tmp_path}/xenbus exists "
        "(not a Xen domain, or xenstored is not running)"
    )


def test_connect_to_a_dead_socket_names_it(tmp_path: Path) -> None:
    with pytest.raises(XenstoreError, match=f"xenstore at {tmp_path}/gone"):
        Xenstore.connect(socket_path=str(tmp_path / "gone"))


def test_default_connect_prefers_the_xenstored_socket(
    xenstored: FakeXenstored, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XENSTORED_PATH", xenstored.listen(ZONE))
    with Xenstore.connect() as xs:
        assert xs.own_domid() == ZONE
