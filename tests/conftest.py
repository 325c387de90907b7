"""Fixtures for every suite. This file is also loaded inside the nested Xen testbed's Dom0,
whose Python has only what the dom0 tests need: the image and registry fixtures import their
modules (zstandard, devkit) when used, not here."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

import pytest
import structlog
from structlog.testing import capture_logs

from idm.channel import Channel, RingLayout, Side
from tests.inprocess_link import InProcessRegion

if TYPE_CHECKING:
    from devkit.registry import LocalRegistry

Pair = tuple[InProcessRegion, Channel, Channel]


@pytest.fixture
def make_pair() -> Iterator[Callable[..., Pair]]:
    """Factory for (region, zone channel, host channel) over one in-process region."""
    made: list[Pair] = []

    def make(req_order: int = 16, rsp_order: int = 16, **kwargs: object) -> Pair:
        region = InProcessRegion(RingLayout(req_order=req_order, rsp_order=rsp_order))
        pair = (region, region.channel(Side.ZONE, **kwargs), region.channel(Side.HOST, **kwargs))
        made.append(pair)
        return pair

    yield make
    for region, zone, host in made:
        zone.close()
        host.close()
        region.close()


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A docker-registry on 127.0.0.1 without auth, shared by the whole session."""
    from devkit.registry import LocalRegistry

    local = LocalRegistry(tmp_path_factory.mktemp("registry")).start()
    yield local
    local.stop()


@pytest.fixture(scope="session")
def busybox_ref(oci_registry: LocalRegistry) -> str:
    """A pushed, runnable busybox image: "127.0.0.1:PORT/test/busybox:1"."""
    from devkit.busybox import push_busybox_image

    return push_busybox_image(oci_registry, "test/busybox", "1")


@pytest.fixture
def image_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """Log entries of the image store and registry client during the test. The modules get
    fresh loggers, so one cached by an earlier test's logging setup cannot hide entries."""
    from cri_runtime.images import registry as images_registry
    from cri_runtime.images import store as images_store

    with capture_logs() as logs:
        for module in (images_registry, images_store):
            monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
        yield logs
