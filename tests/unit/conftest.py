"""Fixtures shared by the Xen unit tests: a xenstored stand-in with Dom0 and one zone, and a
xenstore client connected as each (see xen_fakes.py for why stand-ins outside the testbed)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from idm.xen.xenstore import Xenstore
from tests.unit.xen_fakes import FakeXenstored

XS_ZONE = 5


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[FakeXenstored]:
    server = FakeXenstored(tmp_path)
    server.add_domain(0)
    server.add_domain(XS_ZONE)
    yield server
    server.close()


@pytest.fixture
def host_xs(xenstored: FakeXenstored) -> Iterator[Xenstore]:
    with Xenstore.connect(socket_path=xenstored.listen(0)) as xs:
        yield xs


@pytest.fixture
def zone_xs(xenstored: FakeXenstored) -> Iterator[Xenstore]:
    with Xenstore.connect(socket_path=xenstored.listen(XS_ZONE)) as xs:
        yield xs
