"""idm.xen.xenstore over pyxs 0.4.1, talking xenstore's wire protocol to an in-memory xenstored
(tests/unit/xen_fakes.py) on a real unix socket: this is also the check that pyxs works on the
project's Python."""

import errno
from pathlib import Path

import pytest

from idm.xen import xenstore
from idm.xen.xenstore import Xenstore, XenstoreError
from tests.unit.conftest import XS_ZONE
from tests.unit.xen_fakes import FakeXenstored

ZONE = XS_ZONE


def test_write_read_mkdir_remove(host_xs: Xenstore) -> None:
    host_xs.write("/local/domain/0/a/b", "hello")
    assert host_xs.read("/local/domain/0/a/b") == "hello"
    host_xs.mkdir("/local/domain/0/a/c")
    assert host_xs.read("/local/domain/0/a/c") == ""
    host_xs.remove("/local/domain/0/a")
    assert host_xs.read("/local/domain/0/a/b") is None
    host_xs.remove("/local/domain/0/a")  # already gone: not an error
    host_xs.remove("/local/domain/0/no/such/parent")


def test_own_domid_comes_from_the_domains_home(host_xs: Xenstore, zone_xs: Xenstore) -> None:
    assert host_xs.own_domid() == 0
    assert zone_xs.own_domid() == ZONE


def test_own_domid_refuses_a_missing_key(zone_xs: Xenstore, host_xs: Xenstore) -> None:
    host_xs.remove(f"/local/domain/{ZONE}/domid")
    with pytest.raises(XenstoreError, match="xenstore key 'domid' is None, not a domain id"):
        zone_xs.own_domid()


def test_permissions_keep_the_zone_out_of_host_keys(host_xs: Xenstore, zone_xs: Xenstore) -> None:
    host_xs.write("/local/domain/0/backend/x", "host")
    host_xs.set_perms("/local/domain/0/backend/x", 0, [ZONE])
    assert host_xs.get_perms("/local/domain/0/backend/x") == ["n0", f"r{ZONE}"]
    assert zone_xs.read("/local/domain/0/backend/x") == "host"
    with pytest.raises(XenstoreError) as info:
        zone_xs.write("/local/domain/0/backend/x", "zone")
    assert info.value.errno == errno.EACCES
    assert str(info.value) == "xenstore write /local/domain/0/backend/x: EACCES: Permission denied"
    assert host_xs.read("/local/domain/0/backend/x") == "host"


def test_zone_owns_what_it_creates_in_its_subtree(zone_xs: Xenstore, host_xs: Xenstore) -> None:
    path = f"/local/domain/{ZONE}/data/vgpu/c0/state"
    zone_xs.write(path, "offered")
    assert zone_xs.get_perms(path)[0] == f"n{ZONE}"
    zone_xs.set_perms(path, ZONE, [0])
    assert host_xs.get_perms(path) == [f"n{ZONE}", "r0"]


def test_unreadable_node_is_an_error_not_none(host_xs: Xenstore, zone_xs: Xenstore) -> None:
    host_xs.write("/local/domain/0/secret", "s")
    with pytest.raises(XenstoreError) as info:
        zone_xs.read("/local/domain/0/secret")
    assert info.value.errno == errno.EACCES
    assert info.value.path == "/local/domain/0/secret"


def test_watch_fires_at_once_then_on_changes_below(host_xs: Xenstore) -> None:
    host_xs.mkdir("/local/domain/0/w")
    with host_xs.watch("/local/domain/0/w") as watch:
        assert watch.wait(timeout=5) == "/local/domain/0/w"
        host_xs.write("/local/domain/0/w/state", "connected")
        assert watch.wait(timeout=5) == "/local/domain/0/w/state"
        host_xs.write("/local/domain/0/elsewhere", "x")
        assert watch.wait(timeout=0.2) is None


def test_values_and_paths_pyxs_cannot_send_are_value_errors(host_xs: Xenstore) -> None:
    with pytest.raises(ValueError, match="empty values"):
        host_xs.write("/local/domain/0/x", "")
    with pytest.raises(ValueError):
        host_xs.read("/local/domain/0/bad path")


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
