from collections.abc import Callable, Iterator

import pytest

from idm.channel import Channel, RingLayout, Side
from tests.inprocess_link import InProcessRegion

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
