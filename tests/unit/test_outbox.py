"""The outbox: seqs that never go back or get renumbered, exact bytes, bounded peeks, a crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest

from edge_agent.outbox import AsyncOutbox, Outbox, OutboxError, rfc3339
from schemas.events import BoardPower, EnvReading
from schemas.reading import Reading


def env(n: int) -> Reading:
    return Reading("env.reading", EnvReading(sensor=f"n{n}", temperature_c=20.5))


def test_seqs_start_at_one_and_follow_creation_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.highest_seq() == 0
        assert ob.append_many([env(1), env(2), env(3)]) == [1, 2, 3]
        assert ob.append_many([env(4)]) == [4]
        assert ob.append_many([]) == []
        assert [r.seq for r in ob.peek(0, 10, 1 << 20)] == [1, 2, 3, 4]
        assert [json.loads(r.data)["sensor"] for r in ob.peek(0, 10, 1 << 20)] == [
            "n1",
            "n2",
            "n3",
            "n4",
        ]


def test_seq_never_goes_back_when_the_table_empties(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.append_many([env(1), env(2)])
        assert ob.delete([1, 2]) == 2
        assert ob.depth() == 0
        assert ob.append_many([env(3)]) == [3]
        assert ob.highest_seq() == 3


def test_seq_never_goes_back_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        ob.append_many([env(i) for i in range(5)])
        ob.delete(range(1, 6))
    with Outbox(path) as ob:
        assert ob.depth() == 0
        assert ob.highest_seq() == 5
        assert ob.append_many([env(6)]) == [6]


def test_delete_removes_only_the_given_seqs(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.append_many([env(i) for i in range(10)])
        assert ob.delete([2, 5, 9, 42]) == 3
        assert [r.seq for r in ob.peek(0, 100, 1 << 20)] == [1, 3, 4, 6, 7, 8, 10]
        assert ob.depth() == 7


def test_rows_keep_the_exact_ts_and_data(tmp_path: Path) -> None:
    ts = datetime(2026, 11, 22, 7, 50, 1, 123000, tzinfo=timezone(timedelta(hours=8)))
    data = BoardPower(state="on", previous="standby")
    with Outbox(tmp_path / "o.db") as ob:
        ob.append_many([Reading("board.power", data, ts=ts, synced=False)])
        (row,) = ob.peek(0, 1, 1 << 20)
    assert row.ts == "2026-11-22T07:50:01.123000+08:00"
    assert row.data == msgspec.json.encode(data)
    assert (row.type, row.synced) == ("board.power", False)


def test_naive_timestamps_get_the_local_offset() -> None:
    text = rfc3339(datetime(2026, 1, 2, 3, 4, 5))  # naive on purpose
    assert datetime.fromisoformat(text).tzinfo is not None


def test_peek_respects_after_upto_and_both_limits(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.append_many([env(i) for i in range(100)])
        assert [r.seq for r in ob.peek(10, 5, 1 << 20)] == [11, 12, 13, 14, 15]
        assert [r.seq for r in ob.peek(10, 50, 1 << 20, upto=13)] == [11, 12, 13]
        one = ob.peek(0, 1, 1 << 20)[0].wire_size
        assert len(ob.peek(0, 100, one * 7 + one // 2)) == 7
        # The first row always comes, so an oversized event cannot block the outbox.
        assert [r.seq for r in ob.peek(0, 100, 1)] == [1]
        assert ob.peek(100, 10, 1 << 20) == []


def test_depth_oldest_age_and_boot_counter(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        assert (ob.depth(), ob.oldest_age(), ob.boot()) == (0, None, 0)
        assert ob.next_boot() == 1
        ob.append_many([env(1), env(2)])
        age = ob.oldest_age()
        assert age is not None
        assert 0 <= age < 60
    with Outbox(path) as ob:
        assert ob.next_boot() == 2
        stats = ob.stats()
    assert (stats.depth, stats.highest_seq, stats.boot) == (2, 2, 2)


def test_sqlite_settings_are_durable(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        db = ob._db
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_readonly_open_sees_the_data_and_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        ob.append_many([env(1)])
        with Outbox(path, readonly=True) as ro:
            assert ro.stats().depth == 1
            with pytest.raises(sqlite3.OperationalError):
                ro.append_many([env(2)])


def test_one_agent_per_outbox(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, lock=True), pytest.raises(OutboxError, match="another edge-agent"):
        Outbox(path, lock=True)
    with Outbox(path, lock=True):  # the lock went with the first one
        pass


async def test_async_outbox_wakes_a_waiting_consumer(tmp_path: Path) -> None:
    async with AsyncOutbox(tmp_path / "o.db") as ob:
        waiter = asyncio.create_task(ob.wait_beyond(0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        assert await ob.append_many([env(1), env(2)]) == [1, 2]
        await asyncio.wait_for(waiter, 5)
        assert ob.highest_seq == 2
        assert [r.seq for r in await ob.peek(0, 10, 1 << 20)] == [1, 2]
        assert await ob.delete([1]) == 1
        assert await ob.depth() == 1
    async with AsyncOutbox(tmp_path / "o.db") as ob:
        assert ob.highest_seq == 2


CHILD = """
import sys
from schemas.reading import Reading
from edge_agent.outbox import Outbox
from schemas.events import EnvReading

n = 0
with Outbox(sys.argv[1]) as ob:
    size = 1
    while True:
        group = [Reading("env.reading", EnvReading(sensor=f"n{n + i + 1}")) for i in range(size)]
        seqs = ob.append_many(group)
        n += size
        print(seqs[-1], flush=True)
        size = size % 97 + 1
"""


def test_sigkill_while_appending_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    reported = 0
    deadline = time.monotonic() + 30
    try:
        while reported < 3000:  # a few dozen commits, then kill it mid-stream
            line = proc.stdout.readline()
            assert line, "the appending child exited early"
            reported = int(line)
            assert time.monotonic() < deadline, "the child appends too slowly"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
    with Outbox(path) as ob:
        rows = ob.peek(0, 1_000_000, 1 << 40)
        seqs = [r.seq for r in rows]
        # Each committed reading is there once, under the seq it was given: n<seq>.
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) >= reported
        assert all(json.loads(r.data)["sensor"] == f"n{r.seq}" for r in rows)
        top = ob.highest_seq()
        assert top == len(seqs)
        assert ob.append_many([env(0)]) == [top + 1]
