"""The live hub without a server: filtering, bounded queues, drop policy, thread hand-off."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, datetime

import msgspec
import pytest

from ingest_server.ingest.batch import EventRow
from ingest_server.web.live import SEND_CHUNK, LiveFilter, LiveHub, encode
from schemas.uplink import ValidEvent


def row(
    seq: int,
    school: str = "s001",
    device: str = "cr-0101",
    type_: str = "card.tap",
    *,
    replay: bool = False,
) -> EventRow:
    data = {"uid_hash": "ab" * 32, "tech": "em4100", "reader": "gate"}
    event = ValidEvent(
        seq=seq,
        ts=datetime(2026, 11, 20, 8, 0, tzinfo=UTC),
        type=type_,
        data_json=msgspec.json.encode(data),
        data=None,  # type: ignore[arg-type]  # not read by the hub
        synced=True,
        replay=replay,
    )
    return EventRow(school, device, "card_reader", datetime.now(UTC), event)


def test_encode_is_one_sse_message_with_the_stored_json() -> None:
    msg = encode(row(7))
    assert msg.startswith(b"id: cr-0101:7\ndata: ")
    assert msg.endswith(b"\n\n")
    body = json.loads(msg.split(b"data: ", 1)[1])
    assert body["seq"] == 7
    assert body["time"] == "2026-11-20T08:00:00+00:00"
    assert body["data"]["reader"] == "gate"
    assert body["replay"] is False


def test_encode_carries_the_replay_flag_of_backlog() -> None:
    body = json.loads(encode(row(8, replay=True)).split(b"data: ", 1)[1])
    assert (body["seq"], body["replay"]) == (8, True)


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (LiveFilter(), {1, 2, 3}),
        (LiveFilter(schools=frozenset({"s002"})), {2}),
        (LiveFilter(devices=frozenset({"sb-1"})), {3}),
        (LiveFilter(types=frozenset({"card.tap"}), schools=frozenset({"s001"})), {1}),
    ],
)
def test_filters(flt: LiveFilter, expected: set[int]) -> None:
    rows = [row(1), row(2, school="s002"), row(3, device="sb-1", type_="board.power")]
    assert {r.event.seq for r in rows if flt.matches(r)} == expected


async def test_publish_from_a_thread_reaches_matching_subscribers() -> None:
    hub = LiveHub()
    hub.publish([row(0)])  # nobody subscribed: a no-op
    mine = hub.subscribe(LiveFilter(schools=frozenset({"s001"})))
    other = hub.subscribe(LiveFilter(schools=frozenset({"s002"})))
    t = threading.Thread(target=hub.publish, args=([row(1), row(2, school="s002")],))
    t.start()
    t.join()
    got = await mine.next(5)
    assert got is not None
    assert [m.split(b"\n")[0] for m in got] == [b"id: cr-0101:1"]
    assert await other.next(5) == [encode(row(2, school="s002"))]
    assert await mine.next(0.01) == []  # nothing more: a heartbeat turn


async def test_a_commit_that_does_not_fit_drops_the_client_and_frees_its_queue() -> None:
    hub = LiveHub(max_queue=150)
    slow = hub.subscribe(LiveFilter())
    fast = hub.subscribe(LiveFilter())
    hub.publish([row(i) for i in range(100)])
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    drained = []
    while len(drained) < 100:  # the fast one drains; sends go SEND_CHUNK at a time
        batch = await fast.next(1)
        assert batch
        assert len(batch) <= SEND_CHUNK
        drained += batch
    hub.publish([row(i) for i in range(100, 200)])
    for _ in range(3):
        await asyncio.sleep(0)
    assert slow.dropped is not None
    assert "too slow" in slow.dropped
    assert await slow.next(1) is None
    assert hub.subscribers == 1
    assert len(await fast.next(1) or []) == SEND_CHUNK


async def test_subscriber_limit() -> None:
    hub = LiveHub()
    subs = [hub.subscribe(LiveFilter()) for _ in range(100)]
    with pytest.raises(OverflowError, match="live clients"):
        hub.subscribe(LiveFilter())
    subs[0].drop("bye")
    hub.subscribe(LiveFilter())


async def test_close_ends_every_stream_with_a_reason() -> None:
    hub = LiveHub()
    subs = [hub.subscribe(LiveFilter()) for _ in range(3)]
    await asyncio.to_thread(hub.close)  # from another thread, as the server's stop does
    for sub in subs:
        assert await sub.next(5) is None
        assert sub.dropped == "the server is shutting down"
    assert hub.subscribers == 0
