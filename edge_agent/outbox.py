"""The durable outbox: every reading gets its ``seq`` here and stays until the broker's PUBACK.

SQLite in WAL mode with ``synchronous=FULL``: a reading whose :meth:`Outbox.append_many` has
returned survives a power cut. ``seq`` is an ``INTEGER PRIMARY KEY AUTOINCREMENT``, so it never
goes back, not even after the table empties. ``ts`` and ``data`` are stored as the exact text
and JSON bytes that go on the wire, so a resent event is byte-for-byte the same event.

:class:`Outbox` is the blocking core (one connection, used from one thread);
:class:`AsyncOutbox` runs it on a thread of its own so the event loop never waits on the disk.

Quota (``[outbox] max_events`` / ``max_bytes``, bytes as :attr:`OutboxRow.wire_size`): new
events are always stored, each with its seq; then, while a bound is exceeded, the oldest event
of the lowest :func:`priority` tier still stored is deleted unsent (telemetry first, then board
and signage activity, then anything else, and attendance, access, card and library events last).
A full disk (SQLite's "database or disk is full") first loses nothing: the insert is rolled
back and :class:`OutboxFull` raised, and the caller keeps the readings in a bounded memory buffer
and tries again (a full disk is usually transient). Only a caller whose buffer is full asks for
``make_room``: then lowest-priority events are deleted to make room and the insert tried again,
and only when there is nothing left to delete are the new readings themselves dropped. Every
drop is counted by type
(:meth:`Outbox.take_drops`), logged, and reported upstream by the agent as
``agent.outbox_dropped``; the server also sees the gap in seqs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self, TypeVar

import msgspec

from edge_agent.portable import try_lock
from schemas.reading import Reading

T = TypeVar("T")
log = logging.getLogger(__name__)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    type TEXT NOT NULL,
    data BLOB NOT NULL,
    synced INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dropped (type TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""
#: The outbox file's schema version (``PRAGMA user_version``; a file from before versioning
#: reads 0). The file outlives agent versions (``update_agent``), so each version migrates it
#: forward at open, one step at a time, and refuses a file from a newer agent.
SCHEMA_VERSION: Final = 1
#: Version → the script that takes the file from the version before to it.
_MIGRATIONS: Final[dict[int, str]] = {1: _SCHEMA}
#: Bytes an event adds to an ``up`` batch besides its ts, type and data (keys, a 19-digit seq,
#: ``"synced":false``, a comma).
EVENT_OVERHEAD: Final = 72
_encode = msgspec.json.Encoder().encode
_SIZE: Final = f"{EVENT_OVERHEAD} + length(ts) + length(type) + length(data)"
#: Priority tiers, lowest (dropped first) to highest; a type not listed is tier 2.
_TIERS: Final[tuple[tuple[str, ...], ...]] = (
    ("agent.health", "env.reading", "camera.", "recorder.status"),
    ("board.", "signage."),
    (),
    ("attendance.", "access.", "card.", "library.", "agent.outbox_dropped"),
)
DropReason = Literal["max_events", "max_bytes", "disk_full"]


def priority(event_type: str) -> int:
    """The quota tier of an event type: 0 is dropped first, 3 last."""
    for tier, prefixes in enumerate(_TIERS):
        if any(event_type.startswith(p) for p in prefixes):
            return tier
    return 2


def _is_full(exc: sqlite3.Error) -> bool:
    return "full" in str(exc) or getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class OutboxError(Exception):
    """The outbox cannot be opened or is in use by another agent."""


class OutboxFull(OutboxError):
    """The disk is full: nothing of this append was stored; keep the readings and retry."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A stored event, exactly as it will be sent."""

    seq: int
    ts: str
    type: str
    data: bytes
    synced: bool

    @property
    def wire_size(self) -> int:
        """An upper bound of the bytes this event takes in an ``up`` batch."""
        return EVENT_OVERHEAD + len(self.ts) + len(self.type) + len(self.data)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    depth: int
    oldest_age_s: float | None
    highest_seq: int
    boot: int
    #: Events dropped unsent over the outbox's life, by type (kept in ``meta``).
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Drops:
    """Events dropped unsent since ``since``, by type, and the reason of the latest drop."""

    counts: dict[str, int]
    since: datetime
    reason: DropReason


def rfc3339(ts: datetime) -> str:
    """``ts`` as RFC 3339 with its offset; a naive time is taken as local time."""
    aware = ts if ts.tzinfo is not None else ts.astimezone()
    return _encode(aware)[1:-1].decode()


class Outbox:
    """The blocking outbox: use it from one thread only."""

    #: Lowest-priority events deleted per round when the disk is full.
    DISK_FULL_DROP = 256

    def __init__(
        self,
        path: Path | str,
        *,
        readonly: bool = False,
        lock: bool = False,
        max_events: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._lock_fd: int | None = None
        #: Stored events by type: (count, wire bytes); kept in step with every insert and delete.
        self._by_type: dict[str, list[int]] = {}
        self._drops: dict[str, int] = {}
        self._drops_since: datetime | None = None
        self._drop_reason: DropReason = "max_events"
        try:
            if readonly:
                uri = f"file:{self.path}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                if lock:
                    self._take_lock()
                self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 5000")
            if not readonly:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                self._migrate()
            else:
                self._check_version(self._version())
                for etype, n, size in self._db.execute(
                    f"SELECT type, count(*), sum({_SIZE}) FROM events GROUP BY type"  # noqa: S608 - constant
                ):
                    self._by_type[etype] = [int(n), int(size)]
        except (sqlite3.Error, OutboxError) as exc:
            if (db := getattr(self, "_db", None)) is not None:
                db.close()
            self._release_lock()
            if isinstance(exc, OutboxError):
                raise
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from exc
        self._last_created = self._newest_created()

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"the outbox {self.path} has schema version {version}, newer than this agent's "
                f"({SCHEMA_VERSION}): a newer edge-agent wrote it; run that version (or move the "
                "file aside to start a new outbox, losing its unsent events)"
            )

    def _migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`, each step in one transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self._version()
            self._check_version(version)
            for step in range(version + 1, SCHEMA_VERSION + 1):
                # executescript would COMMIT first: run the statements one by one instead
                for statement in _MIGRATIONS[step].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {step}")
                log.info("outbox %s: schema migrated to version %d", self.path.name, step)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _newest_created(self) -> float:
        try:
            row = self._db.execute(
                "SELECT created_at FROM events ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        except sqlite3.OperationalError:  # a read-only open of a file with no events table yet
            return 0.0
        return 0.0 if row is None else float(row[0])

    def _take_lock(self) -> None:
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        if not try_lock(fd):
            os.close(fd)
            raise OutboxError(f"another edge-agent is using the outbox {self.path}")
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        self._db.close()
        self._release_lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append_many(self, readings: Sequence[Reading], *, make_room: bool = False) -> list[int]:
        """Store readings in one transaction; return their seqs, in order.

        Over the quota, lower-priority events (possibly some of these) are then dropped. On a
        full disk :class:`OutboxFull` is raised with nothing stored or dropped, unless
        ``make_room``: then stored lower-priority events are dropped to make room, and only
        when nothing else is left to drop are these readings dropped unstored (the result is
        then shorter, or empty).
        """
        if not readings:
            return []
        now = max(time.time(), self._last_created)
        rows = [(rfc3339(r.ts), r.type, _encode(r.data), int(r.synced), now) for r in readings]
        while True:
            try:
                seqs = self._insert(rows)
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                if not make_room:
                    raise OutboxFull(f"the outbox's disk is full ({exc}): nothing stored") from exc
                log.error("the outbox's disk is full (%s): dropping low-priority events", exc)
                try:
                    gone = self._drop_lowest(self.DISK_FULL_DROP, None, "disk_full")
                except sqlite3.OperationalError as again:
                    if not _is_full(again):
                        raise
                    gone = 0  # even a delete needs room for its journal
                if gone:
                    continue
                for r in readings:
                    self._count_drop(r.type, 1, "disk_full")
                log.error(
                    "the outbox's disk is full and nothing is left to drop: %d new event(s) "
                    "dropped unstored",
                    len(readings),
                )
                return []
            self._last_created = now
            return seqs

    def _insert(self, rows: list[tuple[str, str, bytes, int, float]]) -> list[int]:
        with self._transaction():
            base = self._highest_seq()
            self._db.executemany(
                "INSERT INTO events (ts, type, data, synced, created_at) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            top = self._highest_seq()
            # One writer holds the lock for the whole transaction, so the seqs are contiguous.
            if top != base + len(rows):
                raise OutboxError(f"seqs {base + 1}..{top} for {len(rows)} events: not contiguous")
            added: dict[str, list[int]] = {}
            for ts, etype, data, _, _ in rows:
                entry = added.setdefault(etype, [0, 0])
                entry[0] += 1
                entry[1] += EVENT_OVERHEAD + len(ts) + len(etype) + len(data)
            self._track(added, +1)
            try:
                self._enforce_quota()
            except BaseException:
                self._track(added, -1)
                raise
        return list(range(base + 1, top + 1))

    def _track(self, changes: dict[str, list[int]], sign: int) -> None:
        for etype, (n, size) in changes.items():
            entry = self._by_type.setdefault(etype, [0, 0])
            entry[0] += sign * n
            entry[1] += sign * size
            if entry[0] <= 0:
                del self._by_type[etype]

    def _totals(self) -> tuple[int, int]:
        return (
            sum(n for n, _ in self._by_type.values()),
            sum(b for _, b in self._by_type.values()),
        )

    def _enforce_quota(self) -> None:
        """Inside a transaction: drop lowest-priority events until both bounds hold."""
        while True:
            count, size = self._totals()
            if self.max_events is not None and count > self.max_events:
                gone = self._drop_lowest(count - self.max_events, None, "max_events")
            elif self.max_bytes is not None and size > self.max_bytes:
                gone = self._drop_lowest(None, size - self.max_bytes, "max_bytes")
            else:
                return
            if not gone:  # the tallies disagree with the table: never loop on that
                log.error("outbox %s: over its quota with nothing to drop", self.path.name)
                return

    def _drop_lowest(self, events: int | None, size: int | None, reason: DropReason) -> int:
        """Delete the oldest events of the lowest tier present: ``events`` of them, or enough
        to free ``size`` bytes (at least one). Returns how many went."""
        tiers = sorted({priority(t) for t in self._by_type})
        if not tiers:
            return 0
        types = [t for t in self._by_type if priority(t) == tiers[0]]
        marks = ",".join("?" * len(types))
        limit = events if events is not None else 256
        found = self._db.execute(
            f"SELECT seq, type, {_SIZE} FROM events WHERE type IN ({marks}) "  # noqa: S608 - marks
            "ORDER BY seq LIMIT ?",
            (*types, limit),
        ).fetchall()
        if size is not None:
            freed, keep = 0, 0
            for _, _, n in found:
                keep += 1
                freed += n
                if freed >= size:
                    break
            found = found[:keep]
        removed: dict[str, list[int]] = {}
        for _, etype, n in found:
            entry = removed.setdefault(etype, [0, 0])
            entry[0] += 1
            entry[1] += n
        own = not self._db.in_transaction
        if own:
            self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("DELETE FROM events WHERE seq = ?", ((r[0],) for r in found))
            self._db.executemany(
                "INSERT INTO dropped (type, count) VALUES (?, ?) "
                "ON CONFLICT (type) DO UPDATE SET count = count + excluded.count",
                ((t, n) for t, (n, _) in removed.items()),
            )
        except BaseException:
            if own and self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        if own:
            self._db.execute("COMMIT")
        self._track(removed, -1)
        first = self._drops_since is None
        for etype, (n, _) in removed.items():
            self._count_drop(etype, n, reason)
        if found:
            # The first drop of a streak is logged loudly; the rest are summed up for
            # take_drops (the agent's periodic report), so a full outbox does not flood the log.
            (log.error if first else log.debug)(
                "outbox %s (%s): dropped %d unsent event(s): %s",
                self.path.name,
                reason,
                len(found),
                ", ".join(f"{t} x{n}" for t, (n, _) in sorted(removed.items())),
            )
        return len(found)

    def _count_drop(self, etype: str, n: int, reason: DropReason) -> None:
        if self._drops_since is None:
            self._drops_since = datetime.now(UTC)
        self._drops[etype] = self._drops.get(etype, 0) + n
        self._drop_reason = reason

    def take_drops(self) -> Drops | None:
        """The drops since the last call (None if there were none), and start counting anew."""
        if self._drops_since is None:
            return None
        drops = Drops(dict(self._drops), self._drops_since, self._drop_reason)
        self._drops.clear()
        self._drops_since = None
        return drops

    def raise_seq_floor(self, floor: int) -> None:
        """Make the next seq at least ``floor + 1`` (a replaced device continues its seqs)."""
        with self._transaction():
            if self._highest_seq() >= floor:
                return
            updated = self._db.execute(
                "UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'", (floor,)
            ).rowcount
            if not updated:
                self._db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (floor,)
                )

    def set_quota(self, max_events: int | None, max_bytes: int | None) -> None:
        """Change the bounds; applied at once (dropping events if the outbox is over them)."""
        self.max_events, self.max_bytes = max_events, max_bytes
        with self._transaction():
            self._enforce_quota()

    def dropped_total(self) -> dict[str, int]:
        """Events dropped unsent over the outbox's life, by type."""
        try:
            return {t: int(n) for t, n in self._db.execute("SELECT type, count FROM dropped")}
        except sqlite3.OperationalError:  # a read-only open of an older outbox
            return {}

    def peek(
        self,
        after_seq: int = 0,
        max_events: int = 500,
        max_bytes: int = 65536,
        *,
        upto: int | None = None,
    ) -> list[OutboxRow]:
        """The oldest unsent events after ``after_seq`` (and at most ``upto``), within both limits.

        The byte limit counts :attr:`OutboxRow.wire_size`; the first row always comes, even when
        it alone is larger.
        """
        sql = "SELECT seq, ts, type, data, synced FROM events WHERE seq > ?"
        args: tuple[int, ...] = (after_seq,)
        if upto is not None:
            sql += " AND seq <= ?"
            args += (upto,)
        cur = self._db.execute(sql + " ORDER BY seq LIMIT ?", (*args, max_events))
        out: list[OutboxRow] = []
        size = 0
        for seq, ts, etype, data, synced in cur:
            row = OutboxRow(seq, ts, etype, bytes(data), bool(synced))
            size += row.wire_size
            if out and size > max_bytes:
                break
            out.append(row)
        cur.close()
        return out

    def delete(self, seqs: Iterable[int]) -> int:
        """Delete exactly these seqs (after their PUBACK); return how many were there."""
        with self._transaction():
            cur = self._db.execute(
                f"DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?)) "  # noqa: S608 - constant
                f"RETURNING type, {_SIZE}",
                (_encode(list(seqs)),),
            )
            removed: dict[str, list[int]] = {}
            for etype, size in cur:
                entry = removed.setdefault(etype, [0, 0])
                entry[0] += 1
                entry[1] += size
        self._track(removed, -1)
        return sum(n for n, _ in removed.values())

    def depth(self) -> int:
        row = self._db.execute("SELECT count(*) FROM events").fetchone()
        return int(row[0])

    def oldest_age(self) -> float | None:
        """Seconds since the oldest unsent event was stored, or None when there is none."""
        row = self._db.execute("SELECT created_at FROM events ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else max(0.0, time.time() - float(row[0]))

    def highest_seq(self) -> int:
        """The last seq ever assigned (0 before the first), whether or not it is still stored."""
        return self._highest_seq()

    def _highest_seq(self) -> int:
        try:
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
            ).fetchone()
        except sqlite3.OperationalError:  # a read-only open of a file with no events table yet
            return 0
        return 0 if row is None else int(row[0])

    def boot(self) -> int:
        """How many times an agent has started on this outbox."""
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'boot'").fetchone()
        except sqlite3.OperationalError:
            return 0
        return 0 if row is None else int(row[0])

    def next_boot(self) -> int:
        """Count one more agent start and return the new count."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('boot', 1) "
                "ON CONFLICT (key) DO UPDATE SET value = value + 1"
            )
            return self.boot()

    def stats(self) -> OutboxStats:
        return OutboxStats(
            self.depth(), self.oldest_age(), self.highest_seq(), self.boot(), self.dropped_total()
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:  # SQLITE_FULL may already have rolled it back
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


class AsyncOutbox:
    """An :class:`Outbox` on a thread of its own, as an async context manager.

    Keeps :attr:`highest_seq` in memory and lets a consumer wait for new events.
    """

    def __init__(
        self, path: Path | str, *, max_events: int | None = None, max_bytes: int | None = None
    ) -> None:
        self.path = Path(path)
        self._quota = (max_events, max_bytes)
        self.highest_seq = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")
        self._outbox: Outbox | None = None
        self._grown = asyncio.Event()

    async def __aenter__(self) -> Self:
        try:
            max_events, max_bytes = self._quota
            self._outbox = await self._call(
                lambda: Outbox(self.path, lock=True, max_events=max_events, max_bytes=max_bytes)
            )
            self.highest_seq = await self._call(self._core.highest_seq)
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._outbox is not None:
            outbox, self._outbox = self._outbox, None
            # Shielded: the connection must be closed on its own thread even if we are cancelled.
            await asyncio.shield(self._call(outbox.close))
        self._pool.shutdown(wait=False)

    @property
    def _core(self) -> Outbox:
        if self._outbox is None:
            raise OutboxError("the outbox is not open")
        return self._outbox

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def append_many(
        self, readings: Sequence[Reading], *, make_room: bool = False
    ) -> list[int]:
        seqs = await self._call(lambda: self._core.append_many(readings, make_room=make_room))
        if seqs:
            self.highest_seq = seqs[-1]
            self._grown.set()
            self._grown = asyncio.Event()
        return seqs

    async def peek(
        self, after_seq: int, max_events: int, max_bytes: int, *, upto: int | None = None
    ) -> list[OutboxRow]:
        return await self._call(
            lambda: self._core.peek(after_seq, max_events, max_bytes, upto=upto)
        )

    async def delete(self, seqs: Sequence[int]) -> int:
        return await self._call(lambda: self._core.delete(seqs))

    async def depth(self) -> int:
        return await self._call(self._core.depth)

    async def oldest_age(self) -> float | None:
        return await self._call(self._core.oldest_age)

    async def next_boot(self) -> int:
        return await self._call(self._core.next_boot)

    async def stats(self) -> OutboxStats:
        return await self._call(self._core.stats)

    async def take_drops(self) -> Drops | None:
        return await self._call(self._core.take_drops)

    async def set_quota(self, max_events: int | None, max_bytes: int | None) -> None:
        await self._call(lambda: self._core.set_quota(max_events, max_bytes))

    async def wait_beyond(self, seq: int) -> None:
        """Return once an event with a seq above ``seq`` has been stored."""
        while self.highest_seq <= seq:
            await self._grown.wait()
