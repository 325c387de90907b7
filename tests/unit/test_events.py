"""gpu-proxy's event stream (gpu_proxy/telemetry/events.py), over a real gRPC server and client
on a unix socket:

* events published after Watch arrive in order with their fields; zone and kind filters hold;
  replay sends the buffered recent events first, then live ones;
* a watcher that stops reading never slows publishers or grows memory, and is told how many
  events it missed; concurrent publishers still give every watcher seq order;
* client cancel, server stop and bus close all unsubscribe;
* the checked-in generated code matches events.proto (protogen --check).
"""

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpu_proxy.proto import protogen
from gpu_proxy.proto.gen import events_pb2, events_pb2_grpc
from gpu_proxy.telemetry.events import EventBus, EventKind, serve_events

QUEUE = 64


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@dataclass
class Served:
    bus: EventBus
    server: grpc.Server
    stub: Any

    def watch(self, **request: Any) -> Any:
        """Start a Watch and return its call once the server has subscribed it."""
        before = self.bus.subscriber_count
        call = self.stub.Watch(events_pb2.WatchRequest(**request), timeout=20)
        wait_until(lambda: self.bus.subscriber_count == before + 1)
        return call


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    bus = EventBus(history=8, queue_size=QUEUE)
    address = f"unix://{tmp_path / 'events.sock'}"
    server = serve_events(bus, address)
    channel = grpc.insecure_channel(address)
    yield Served(bus, server, events_pb2_grpc.ZoneEventsStub(channel))
    channel.close()
    server.stop(None).wait()
    bus.close()


def take(call: Any, n: int) -> list[events_pb2.Event]:
    return [next(call) for _ in range(n)]


def summary(events: list[events_pb2.Event]) -> list[tuple[str, int, str]]:
    return [(e.zone, e.kind, e.message) for e in events]


def test_event_kind_mirrors_proto() -> None:
    assert [(k.name, k.value) for k in EventKind] == list(events_pb2.EventKind.items())


def test_watch_streams_events_in_order(served: Served) -> None:
    call = served.watch()
    before = time.time()
    served.bus.publish("z1", EventKind.ZONE_REGISTERED, "zone up", pod="p", handles=3)
    served.bus.publish("z1", EventKind.CALL_ERROR, "cuMemAlloc failed", code=2)
    served.bus.publish("z2", EventKind.ZONE_REMOVED, "zone down")
    got = take(call, 3)
    call.cancel()
    assert [e.seq for e in got] == [1, 2, 3]
    assert summary(got) == [
        ("z1", events_pb2.ZONE_REGISTERED, "zone up"),
        ("z1", events_pb2.CALL_ERROR, "cuMemAlloc failed"),
        ("z2", events_pb2.ZONE_REMOVED, "zone down"),
    ]
    assert [dict(e.attributes) for e in got] == [{"pod": "p", "handles": "3"}, {"code": "2"}, {}]
    for e in got:
        assert before - 1 <= e.time.ToNanoseconds() / 1e9 <= time.time() + 1


def test_watch_filters_by_zone_and_kind(served: Served) -> None:
    by_zone = served.watch(zones=["a", "c"])
    by_kind = served.watch(kinds=[events_pb2.QUOTA_EXCEEDED, events_pb2.CALL_ERROR])
    both = served.watch(zones=["a"], kinds=[events_pb2.CALL_ERROR])
    for zone, kind, msg in [
        ("a", EventKind.CHANNEL_OPENED, "1"),
        ("b", EventKind.QUOTA_EXCEEDED, "2"),
        ("c", EventKind.CALL_ERROR, "3"),
        ("b", EventKind.CHANNEL_CLOSED, "4"),
        ("a", EventKind.CALL_ERROR, "5"),  # matches every filter: the last one each sees
    ]:
        served.bus.publish(zone, kind, msg)
    assert [e.message for e in take(by_zone, 3)] == ["1", "3", "5"]
    assert [e.message for e in take(by_kind, 3)] == ["2", "3", "5"]
    assert [e.message for e in take(both, 1)] == ["5"]
    assert served.bus.backlogs() == [0, 0, 0]  # nothing else was queued for them
    for call in (by_zone, by_kind, both):
        call.cancel()


def test_replay_sends_recent_events_first(served: Served) -> None:
    for i in range(12):  # the ring holds the last 8: seq 5..12
        served.bus.publish("a" if i % 2 else "b", EventKind.HANDLES_RECLAIMED, str(i))
    assert [e.seq for e in served.bus.recent()] == list(range(5, 13))
    replayed = served.watch(zones=["a"], replay=True)
    live_only = served.watch(zones=["a"])
    served.bus.publish("a", EventKind.ZONE_REMOVED, "live")
    assert [(e.seq, e.message) for e in take(replayed, 5)] == [
        (6, "5"),
        (8, "7"),
        (10, "9"),
        (12, "11"),
        (13, "live"),
    ]
    assert [(e.seq, e.message) for e in take(live_only, 1)] == [(13, "live")]
    replayed.cancel()
    live_only.cancel()


def test_slow_watcher_never_blocks_publishers(served: Served) -> None:
    call = served.watch()  # never read until all is published
    start = time.monotonic()
    for i in range(10_000):
        served.bus.publish("z", EventKind.CALL_ERROR, "err", n=i)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"10k publishes took {elapsed:.2f}s"
    assert served.bus.backlogs()[0] <= QUEUE
    assert len(served.bus.recent()) == 8

    # Everything is accounted for: each event arrives or is counted by a "missed" event.
    expected, missed_events = 1, 0
    while expected <= 10_000:
        e = next(call)
        if e.seq == 0:
            assert e.kind == events_pb2.EVENT_KIND_UNSPECIFIED
            assert e.zone == ""
            missed = int(e.attributes["missed"])
            assert missed > 0
            assert e.message == f"missed {missed} events: this watcher fell behind"
            expected += missed
            missed_events += 1
        else:
            assert e.seq == expected
            assert e.attributes["n"] == str(expected - 1)
            expected += 1
    assert expected == 10_001
    assert missed_events >= 1
    call.cancel()


def test_bounded_queue_in_process() -> None:
    bus = EventBus(history=16, queue_size=QUEUE)
    sub = bus.subscribe()
    for i in range(10_000):
        bus.publish("z", EventKind.CALL_ERROR, str(i))
    assert sub.pending == QUEUE
    assert bus.backlogs() == [QUEUE]
    missed = sub.get(timeout=0)
    assert missed is not None and missed.seq == 0
    assert missed.attributes == {"missed": str(10_000 - QUEUE)}
    rest = [sub.get(timeout=0) for _ in range(QUEUE)]
    assert [e.seq for e in rest if e] == list(range(10_001 - QUEUE, 10_001))
    assert sub.get(timeout=0.01) is None and not sub.ended
    sub.close()
    assert sub.ended and bus.subscriber_count == 0


def test_concurrent_publishers_keep_seq_order() -> None:
    bus = EventBus(queue_size=10_000)
    sub = bus.subscribe()

    def publish() -> None:
        for _ in range(1000):
            bus.publish("z", EventKind.CALL_ERROR, "x")

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [sub.get(timeout=0) for _ in range(4000)]
    assert [e.seq for e in got if e] == list(range(1, 4001))


def test_client_cancel_unsubscribes(served: Served) -> None:
    first = served.watch()
    second = served.watch()
    assert served.bus.subscriber_count == 2
    first.cancel()
    wait_until(lambda: served.bus.subscriber_count == 1)
    served.bus.publish("z", EventKind.ZONE_REGISTERED, "still served")
    assert take(second, 1)[0].message == "still served"
    second.cancel()
    wait_until(lambda: served.bus.subscriber_count == 0)
    with pytest.raises(grpc.RpcError) as err:
        next(first)
    assert err.value.code() == grpc.StatusCode.CANCELLED


def test_bus_close_ends_streams_after_queued_events(served: Served) -> None:
    call = served.watch()
    served.bus.publish("z", EventKind.ZONE_REMOVED, "a")
    served.bus.publish("z", EventKind.ZONE_REMOVED, "b")
    served.bus.close()
    assert [e.message for e in call] == ["a", "b"]  # then the stream ends
    assert call.code() == grpc.StatusCode.OK
    assert served.bus.subscriber_count == 0
    late = served.stub.Watch(events_pb2.WatchRequest(replay=True), timeout=20)
    assert list(late) == [] and late.code() == grpc.StatusCode.OK


def test_server_stop_unsubscribes(served: Served) -> None:
    call = served.watch()
    served.server.stop(None).wait()
    wait_until(lambda: served.bus.subscriber_count == 0)
    with pytest.raises(grpc.RpcError):
        next(call)


def test_unbindable_address_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="Failed to bind"):
        serve_events(EventBus(), f"unix://{tmp_path / 'missing' / 'events.sock'}")


def test_generated_code_is_up_to_date(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert protogen.main(["--check"]) == 0
    protos = (protogen.PROTO_DIR / name for name in protogen.PROTOS)
    for rel in (*protos, *(protogen.GEN / name for name in protogen.OUTPUTS)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(protogen.ROOT / rel, tmp_path / rel)
    assert protogen.main(["--check", "--root", str(tmp_path)]) == 0

    grpc_module = tmp_path / protogen.GEN / "events_pb2_grpc.py"
    grpc_module.write_text(grpc_module.read_text() + "\n# edited by hand\n")
    capsys.readouterr()
    assert protogen.main(["--check", "--root", str(tmp_path)]) == 1
    assert "stale: gpu_proxy/proto/gen/events_pb2_grpc.py" in capsys.readouterr().err

    shutil.copy(protogen.ROOT / protogen.GEN / "events_pb2_grpc.py", grpc_module)
    proto = tmp_path / protogen.PROTO_DIR / "events.proto"
    proto.write_text(proto.read_text().replace("string message = 5;", "string text = 5;"))
    assert protogen.main(["--check", "--root", str(tmp_path)]) == 1  # proto edited, not regenerated
    assert protogen.main(["--root", str(tmp_path)]) == 0  # regenerates the copy only
    assert protogen.main(["--check", "--root", str(tmp_path)]) == 0
    assert "text: str" in (tmp_path / protogen.GEN / "events_pb2.pyi").read_text()
    assert protogen.main(["--check"]) == 0
