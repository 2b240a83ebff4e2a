"""Writer lanes: a device's messages always reach the same lane; groups keep arrival order."""

from __future__ import annotations

import zlib

import pytest

from ingest_server.ingest.batch import Inbound
from ingest_server.ingest.consumer import Inbox
from ingest_server.ingest.lanes import LaneOf, collect_group
from ingest_server.settings import Settings, SettingsError
from tests.ingest_rows import message, tap


def msg(device: str, seq: int, channel: str = "up") -> Inbound:
    m = message(device, [tap(seq)])
    if channel == "up":
        return m
    return Inbound(f"campus/v1/sch-1/{device}/{channel}", b"{}", seq, 1, m.received_at)


def test_a_device_has_one_lane_whatever_its_channel_or_school() -> None:
    lane_of = LaneOf(3)
    for d in range(50):
        device = f"cr-{d}"
        want = zlib.crc32(device.encode()) % 3
        assert lane_of(f"campus/v1/sch-1/{device}/up") == want
        assert lane_of(f"campus/v1/sch-9/{device}/state") == want
    assert {lane_of(f"campus/v1/s/cr-{d}/up") for d in range(50)} == {0, 1, 2}


@pytest.mark.parametrize("topic", ["", "campus", "a/b/c/d/e/f", "campus/v1/s//up", "\udcff/x"])
def test_a_topic_without_a_device_goes_to_lane_0(topic: str) -> None:
    assert LaneOf(4)(topic) == 0


def test_one_lane_takes_everything() -> None:
    assert {LaneOf(1)(f"campus/v1/s/d{i}/up") for i in range(20)} == {0}
    with pytest.raises(ValueError, match="at least one lane"):
        LaneOf(0)


def test_the_group_keeps_arrival_order_and_splits_by_device() -> None:
    inbox = Inbox(1000, 1 << 24)
    sent = [msg(f"cr-{i % 7}", i) for i in range(70)] + [msg("cr-1", 99, "state")]
    assert inbox.put_many(sent, timeout=1) == len(sent)
    lane_of = LaneOf(2)
    group = collect_group(
        inbox, lane_of, 2, max_size=10_000, max_wait_s=0.05, idle_s=1, max_bytes=1 << 20
    )
    assert group is not None
    assert group.messages == sent  # acknowledged in this order
    assert group.busy() == [0, 1]
    for k, part in enumerate(group.parts):
        assert part.messages == [m for m in sent if lane_of(m.topic) == k]
        devices = {r.device_id for r in part.rows.events}
        assert devices
        assert all(lane_of(f"campus/v1/x/{d}/up") == k for d in devices)
    assert sum(len(p.rows.events) for p in group.parts) == 70
    assert len(inbox) == 0


def test_a_backlog_in_one_lane_takes_the_whole_group_budget() -> None:
    inbox = Inbox(1000, 1 << 24)
    # every message of one device: one lane gets them all, in one part of up to 10 rows a lane
    assert inbox.put_many([msg("cr-1", i) for i in range(50)], timeout=1) == 50
    group = collect_group(
        inbox, LaneOf(2), 2, max_size=10, max_wait_s=5, idle_s=1, max_bytes=1 << 20
    )
    assert group is not None
    assert [p.size for p in group.parts if p.size] == [20]  # one transaction, not two of 10
    assert len(group) == 20  # the rest waits for the next group
    assert len(group) + len(inbox) == 50


def test_rows_spread_over_the_lanes_make_parts_of_max_size() -> None:
    lane_of = LaneOf(2)
    devices = [f"cr-{i}" for i in range(10)]
    a = next(d for d in devices if lane_of(f"campus/v1/x/{d}/up") == 0)
    b = next(d for d in devices if lane_of(f"campus/v1/x/{d}/up") == 1)
    inbox = Inbox(1000, 1 << 24)
    sent = [msg(a if i % 2 else b, i) for i in range(60)]
    assert inbox.put_many(sent, timeout=1) == 60
    group = collect_group(inbox, lane_of, 2, max_size=10, max_wait_s=5, idle_s=1, max_bytes=1 << 20)
    assert group is not None
    assert [p.size for p in group.parts] == [10, 10]
    assert group.messages == sent[:20]


def test_nothing_queued_is_no_group() -> None:
    inbox = Inbox(10, 1000)
    got = collect_group(inbox, LaneOf(2), 2, max_size=10, max_wait_s=0, idle_s=0, max_bytes=10)
    assert got is None


@pytest.mark.parametrize("n", [0, 17, -1])
def test_writers_out_of_range_is_a_clear_error(n: int) -> None:
    with pytest.raises(SettingsError, match=f"--writers must be between 1 and 16, got {n}"):
        Settings(writers=n)


@pytest.mark.parametrize("warm", [False, True])
def test_any_lane_function_splits_the_group_as_it_says(warm: bool) -> None:
    """A plain function works as ``lane_of`` (called for each message); a :class:`LaneOf`
    whose topics are known gives the same split from its look-up as from a call."""
    sent = [msg(f"cr-{i % 5}", i) for i in range(40)]
    lane_of = LaneOf(3)
    if warm:
        for m in sent:
            lane_of(m.topic)

    def plain(topic: str) -> int:
        return LaneOf(3)(topic)

    for chosen in (plain, lane_of):
        inbox = Inbox(1000, 1 << 24)
        assert inbox.put_many(sent, timeout=1) == len(sent)
        group = collect_group(
            inbox, chosen, 3, max_size=10_000, max_wait_s=0.05, idle_s=1, max_bytes=1 << 20
        )
        assert group is not None
        for k, part in enumerate(group.parts):
            assert part.messages == [m for m in sent if plain(m.topic) == k]
