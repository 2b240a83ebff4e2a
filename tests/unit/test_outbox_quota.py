"""The outbox's quota: lowest priority dropped first, counted, and a real SQLITE_FULL survived."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from edge_agent.outbox import Outbox, OutboxFull, priority
from schemas.events import AgentHealth, BoardPower, CardTap, EnvReading
from schemas.reading import Reading

HASH = "ab" * 32


def env(i: int = 0) -> Reading:
    return Reading("env.reading", EnvReading(sensor="s", temperature_c=float(i % 50)))


def tap() -> Reading:
    return Reading("card.tap", CardTap(uid_hash=HASH, tech="iso14443a", reader="door"))


def power() -> Reading:
    return Reading("board.power", BoardPower(state="on"))


def health() -> Reading:
    return Reading(
        "agent.health", AgentHealth(cpu_pct=1, rss_mb=1, outbox_depth=0, oldest_unsent_s=0)
    )


def types(outbox: Outbox) -> Counter[str]:
    return Counter(r.type for r in outbox.peek(0, 100_000, 1 << 30))


def test_priority_tiers() -> None:
    order = [
        "agent.health",
        "env.reading",
        "camera.activity",
        "board.power",
        "signage.notice_shown",
    ]
    assert [priority(t) for t in order] == [0, 0, 0, 1, 1]
    assert priority("some.future_type") == 2
    assert {
        priority(t) for t in ("attendance.checkin", "access.pass", "card.tap", "library.loan")
    } == {3}


def test_max_events_drops_lowest_priority_oldest_first_and_counts(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_events=10) as outbox:
        seqs = outbox.append_many([tap(), env(1), power(), tap(), env(2), health()])
        assert seqs == [1, 2, 3, 4, 5, 6]
        outbox.append_many([tap() for _ in range(6)])  # 12 stored: two must go
        assert types(outbox) == Counter({"card.tap": 8, "board.power": 1, "agent.health": 1})
        kept = [r.seq for r in outbox.peek(0, 100, 1 << 30)]
        assert 2 not in kept
        assert 5 not in kept
        outbox.append_many([tap(), tap()])  # then the health event and the board event
        assert types(outbox) == Counter({"card.tap": 10})
        assert outbox.append_many([tap()]) == [15]  # finally the oldest taps
        assert types(outbox) == Counter({"card.tap": 10})
        assert 1 not in [r.seq for r in outbox.peek(0, 100, 1 << 30)]
        drops = outbox.take_drops()
        assert drops is not None
        assert drops.counts == {
            "env.reading": 2,
            "agent.health": 1,
            "board.power": 1,
            "card.tap": 1,
        }
        assert drops.reason == "max_events"
        assert outbox.take_drops() is None
        assert outbox.stats().dropped == drops.counts
        assert outbox.highest_seq() == 15
    with Outbox(tmp_path / "o.db", readonly=True) as again:  # lifetime counts survive
        assert again.stats().dropped == drops.counts


def test_max_bytes_and_a_quota_set_later(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        outbox.append_many([env(i) for i in range(100)] + [tap() for _ in range(20)])
        size = sum(r.wire_size for r in outbox.peek(0, 1000, 1 << 30))
        tap_size = sum(r.wire_size for r in outbox.peek(0, 1000, 1 << 30) if r.type == "card.tap")
        outbox.set_quota(None, tap_size + 4096)
        left = outbox.peek(0, 1000, 1 << 30)
        assert sum(r.wire_size for r in left) <= tap_size + 4096 < size
        assert Counter(r.type for r in left)["card.tap"] == 20
        drops = outbox.take_drops()
        assert drops is not None
        assert drops.reason == "max_bytes"
        assert set(drops.counts) == {"env.reading"}
        assert drops.counts["env.reading"] + len(left) == 120
        outbox.delete([r.seq for r in left])  # the tallies follow deletes after PUBACK too
        outbox.set_quota(None, 4096)
        assert outbox.take_drops() is None


def test_a_full_disk_drops_low_priority_and_keeps_what_was_stored(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        # A real SQLITE_FULL: SQLite refuses to grow the file beyond max_page_count.
        outbox._db.execute("PRAGMA max_page_count = 30")
        outbox._db.execute("PRAGMA synchronous = OFF")  # speed: durability is not under test
        stored: list[int] = []
        reports: list[dict[str, int]] = []
        for i in range(3000):  # until the file is full, and a few rounds more
            stored += outbox.append_many([env(i), env(i), tap()], make_room=True)
            if (drops := outbox.take_drops()) is not None:
                assert drops.reason == "disk_full"
                reports.append(drops.counts)
            if len(reports) > 5:
                break
        assert reports, "the file never filled up"
        assert set(reports[0]) == {"env.reading"}  # the lowest tier goes first
        dropped = sum((Counter(r) for r in reports), Counter())
        # Nothing lost silently: every reading is stored or counted as dropped.
        assert dropped.total() + types(outbox).total() == len(stored)
        assert len(stored) == 3 * (i + 1)

        outbox._db.execute("DELETE FROM events")
        outbox._by_type.clear()
        big = [tap() for _ in range(5000)]  # more than fits, and nothing to drop: no crash
        assert outbox.append_many(big, make_room=True) == []
        last = outbox.take_drops()
        assert last is not None
        assert (last.counts, last.reason) == ({"card.tap": 5000}, "disk_full")


def test_a_full_disk_keeps_everything_unless_asked_to_make_room(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        outbox._db.execute("PRAGMA synchronous = OFF")  # speed: durability is not under test
        outbox._db.execute("PRAGMA max_page_count = 30")  # a real SQLITE_FULL, as above
        stored: list[int] = []
        refused: OutboxFull | None = None
        for _ in range(1000):  # until the last free page is used
            try:
                stored += outbox.append_many([env(), tap()])
            except OutboxFull as exc:
                refused = exc
                break
        assert refused is not None, "the file never filled up"
        assert "disk is full" in str(refused)
        # The refused append stored and dropped nothing; everything accepted before is there.
        assert outbox.take_drops() is None
        assert types(outbox).total() == len(stored) == outbox.highest_seq()
        # Room again (the disk freed up): the same readings go in, seqs still contiguous.
        outbox._db.execute("PRAGMA max_page_count = 100000")
        assert outbox.append_many([env(), tap()]) == [len(stored) + 1, len(stored) + 2]
        assert outbox.take_drops() is None


def test_seq_floor(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        outbox.raise_seq_floor(1000)
        assert outbox.append_many([env()]) == [1001]
        outbox.raise_seq_floor(10)  # never goes back
        assert outbox.append_many([env()]) == [1002]
