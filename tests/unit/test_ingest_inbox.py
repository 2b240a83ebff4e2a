"""Inbox: the bounded hand-over from the MQTT session's thread to the decoder."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from ingest_server.ingest.batch import Inbound
from ingest_server.ingest.consumer import Inbox, collect

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def msg(i: int, size: int = 10) -> Inbound:
    return Inbound("campus/v1/s1/d1/up", b"x" * size, i, 1, NOW)


def test_put_many_takes_a_prefix_up_to_the_message_bound() -> None:
    inbox = Inbox(max_messages=3, max_bytes=1000)
    assert inbox.put_many([msg(i) for i in range(5)], timeout=0.01) == 3
    assert [m.mid for m in inbox.get_many(10, 0)] == [0, 1, 2]
    assert inbox.get_many(10, 0) == []


def test_put_many_respects_the_byte_bound_but_always_takes_one() -> None:
    inbox = Inbox(max_messages=100, max_bytes=25)
    assert inbox.put_many([msg(0, 30), msg(1, 5)], timeout=0.01) == 1  # alone it may exceed
    assert inbox.get_many(1, 0)[0].mid == 0
    assert inbox.put_many([msg(2, 10), msg(3, 10), msg(4, 10)], timeout=0.01) == 2


def test_put_many_of_what_fits_whole_counts_its_bytes() -> None:
    """Messages that all fit go in at once; their bytes still bound what comes after."""
    inbox = Inbox(max_messages=100, max_bytes=35)
    assert inbox.put_many([msg(0), msg(1), msg(2)], timeout=0.01) == 3
    assert inbox.put_many([msg(3), msg(4)], timeout=0.01) == 0  # 30 + 10 > 35
    assert [m.mid for m in inbox.get_many(1, 0)] == [0]
    assert inbox.put_many([msg(3), msg(4)], timeout=0.01) == 1
    assert [m.mid for m in inbox.get_many(10, 0)] == [1, 2, 3]


def test_put_many_waits_for_room_made_by_the_reader() -> None:
    inbox = Inbox(max_messages=2, max_bytes=1000)
    taken: list[int] = []
    writer = threading.Thread(
        target=lambda: taken.append(inbox.put_many([msg(i) for i in range(4)], timeout=10))
    )
    writer.start()
    got: list[int] = []
    deadline = time.monotonic() + 10
    while len(got) < 4 and time.monotonic() < deadline:
        got += [m.mid for m in inbox.get_many(10, 0.5)]
    writer.join(10)
    assert got == [0, 1, 2, 3]
    assert taken == [4]


def test_a_closed_inbox_takes_nothing_and_does_not_spin() -> None:
    inbox = Inbox(max_messages=10, max_bytes=1000)
    inbox.close()
    started = time.monotonic()
    assert inbox.put_many([msg(0)], timeout=0.2) == 0
    assert time.monotonic() - started >= 0.15


def test_collect_stops_at_the_batch_size() -> None:
    inbox = Inbox(max_messages=100, max_bytes=10_000)
    inbox.put_many([msg(i) for i in range(50)], timeout=0.01)
    batch = collect(inbox, max_size=20, max_wait_s=0.01, idle_s=0.01, max_bytes=1000)
    assert batch is not None
    assert len(batch) == 20
    assert len(inbox) == 30
