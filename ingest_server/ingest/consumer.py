"""MQTT in, PostgreSQL out, PUBACK last.

The MQTT session's I/O thread (:mod:`.mqtt_session`) hands each chunk of messages to
:class:`Inbox` (bounded: when it is full the I/O thread waits, so the broker's TCP stream backs
up instead of our memory growing). A decoder thread turns up to ``batch_events`` rows per lane or
``batch_ms`` of messages into a batch, split into one part per writer lane by device
(:mod:`.lanes`: a device's rows always go to the same lane; a lane alone with a backlog takes the
whole batch's rows), and encodes their COPY payloads;
each lane's thread writes its part in one transaction on its own connection, the lanes side
by side (``--writers``, two by default: PostgreSQL then works on both cores). Once every part of
a batch has committed, the acknowledging thread records its metrics, feeds the live stream and
only then acknowledges its messages, batch after batch in arrival order (so the lanes are back
at PostgreSQL at once). If the database is down the
batch is kept and retried; nothing is acknowledged meanwhile. A message delivered on an earlier
broker connection is not acknowledged on a later one: the broker resends it and the writer
counts it as a duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from typing import Final

import psycopg

from ingest_server.ingest.batch import Batch, EventRow, Inbound, refused
from ingest_server.ingest.lanes import Group, LaneOf, collect_group
from ingest_server.ingest.mqtt_codec import MQTT5, Publish
from ingest_server.ingest.mqtt_session import MqttSubscriber, SessionConfig
from ingest_server.ingest.pgcopy import PG_EPOCH
from ingest_server.ingest.writer import BatchWriter, WriteResult, missing_total
from ingest_server.metrics import IngestMetrics
from ingest_server.settings import BrokerUrl, Settings, mask
from ingest_server.storage.db import connect_session
from schemas.topics import Channel, subscription

log = logging.getLogger(__name__)


#: What PostgreSQL raises for a value a device sent, rather than for a fault of its own: a
#: refused value (DataError), a value past a limit such as a jsonb too deep or too big (class 54,
#: e.g. StatementTooComplex). A batch meeting one is written a message at a time and the message at
#: fault quarantined; retrying it would stall ingest for every device. Anything else (connection
#: lost, our own SQL, a unique violation racing another server) is retried whole.
def tell_listeners(
    result: WriteResult,
    now: float,
    on_commit: Callable[[Sequence[EventRow]], None] | None,
    listeners: Iterable[Callable[[WriteResult, float], None]],
) -> None:
    """Hand a committed write to the live stream's hook and the commit listeners (the alert
    engine); a listener's fault is logged and never stops ingest."""
    if on_commit is not None and result.stored:
        try:
            on_commit(result.stored)
        except Exception:  # a listener's fault must never stop ingest
            log.exception("the on_commit hook failed")
    for listener in listeners:
        try:
            listener(result, now)
        except Exception:  # a listener's fault must never stop ingest
            log.exception("a commit listener failed")


def refused_by_data(exc: psycopg.Error) -> bool:
    """Whether ``exc`` blames the data written (see above), not the connection or our SQL."""
    return isinstance(exc, psycopg.DataError) or (exc.sqlstate or "").startswith("54")


#: MQTT 5 retain handling 1: retained messages only when the subscription is new.
_RETAIN_IF_NEW_SUB: Final = 1
_BAD_TOPIC: Final = "<topic is not UTF-8>"
_PG_EPOCH_UNIX: Final = PG_EPOCH.timestamp()
_PAYLOAD: Final = attrgetter("payload")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def write_batch(writer: BatchWriter, batch: Batch) -> WriteResult:
    """Write a sealed ``batch`` in one transaction; when the database refuses a value, each
    message on its own, the refused one to quarantine. Any other database error propagates
    (the caller reconnects and writes the same batch again). MQTT and HTTP ingest share it."""
    try:
        return writer.write(batch.rows, batch.encoded)
    except psycopg.Error as exc:
        if not refused_by_data(exc):
            raise
        log.warning("the database refused a batch (%s); trying each message", _one_line(exc))
    total: WriteResult | None = None
    for msg, rows in batch.parts():
        try:
            result = writer.write(rows)
        except psycopg.Error as exc:
            if not refused_by_data(exc):
                raise
            why = exc.diag.message_primary or _one_line(exc)
            reason = f"the database refused this message: {why}"
            result = writer.write(refused(msg, reason))
        total = result if total is None else total + result
    assert total is not None
    return total


class Inbox:
    """A FIFO bounded by message count and total payload bytes; ``put`` waits while full."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: deque[Inbound] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def oldest(self) -> datetime | None:
        """When the oldest queued message was received; None when none is queued."""
        with self._cond:
            return self._items[0].received_at if self._items else None

    def put(self, item: Inbound) -> bool:
        """Queue ``item``; False (and dropped, so never acknowledged) once closed."""
        with self._cond:
            while not self._closed and (
                len(self._items) >= self.max_messages
                or (self._items and self._bytes + len(item.payload) > self.max_bytes)
            ):
                self._cond.wait()
            if self._closed:
                return False
            self._items.append(item)
            self._bytes += len(item.payload)
            self._cond.notify_all()
            return True

    def put_many(self, items: Sequence[Inbound], timeout: float) -> int:
        """Queue a prefix of ``items``, waiting up to ``timeout`` s for room; how many went in
        (all of them, or fewer when full or closed)."""
        deadline = time.monotonic() + timeout
        taken = 0
        with self._cond:
            # all of them at once when all fit (the usual case): one check, not one per message
            if not self._closed and len(self._items) + len(items) <= self.max_messages:
                size = sum([len(item.payload) for item in items])
                if self._bytes + size <= self.max_bytes:
                    self._items.extend(items)
                    self._bytes += size
                    self._cond.notify_all()
                    return len(items)
            for item in items:
                while not self._closed and (
                    len(self._items) >= self.max_messages
                    or (self._items and self._bytes + len(item.payload) > self.max_bytes)
                ):
                    if taken:  # let the reader start on what is there
                        self._cond.notify_all()
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cond.wait(left):
                        return taken
                if self._closed:
                    # nothing more will go in: wait out the timeout rather than let the
                    # network thread spin while the server shuts down
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
                    return taken
                self._items.append(item)
                self._bytes += len(item.payload)
                taken += 1
            self._cond.notify_all()
        return taken

    def get(self, timeout: float) -> Inbound | None:
        """The oldest item, waiting up to ``timeout`` seconds; None if there is none by then."""
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if not self._items:
                return None
            item = self._items.popleft()
            self._bytes -= len(item.payload)
            self._cond.notify_all()
            return item

    def get_many(self, max_items: int, timeout: float) -> list[Inbound]:
        """Up to ``max_items`` of the oldest items, waiting up to ``timeout`` s for the first."""
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait_for(lambda: self._items or self._closed, timeout)
            items = self._items
            n = min(max_items, len(items))
            if not n:
                return []
            if n == len(items):  # all that is queued: one copy, no pop per message
                out = list(items)
                items.clear()
            else:
                popleft = items.popleft
                out = [popleft() for _ in range(n)]
            self._bytes -= sum(map(len, map(_PAYLOAD, out)))
            self._cond.notify_all()
            return out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def collect(
    inbox: Inbox, *, max_size: int, max_wait_s: float, idle_s: float, max_bytes: int
) -> Batch | None:
    """One batch as :func:`~.lanes.collect_group` gathers it with a single lane: wait up to
    ``idle_s`` for a first message, then gather until the batch is full or ``max_wait_s`` has
    passed since that first message. None when nothing came."""
    group = collect_group(
        inbox, lambda _topic: 0, 1, max_size=max_size, max_wait_s=max_wait_s, idle_s=idle_s,
        max_bytes=max_bytes,
    )  # fmt: skip
    return None if group is None else group.parts[0]


@dataclass(frozen=True, slots=True)
class _Committed:
    batch: Batch
    result: WriteResult
    #: Seconds the write took, and when it committed (Unix time).
    elapsed: float
    at: float


class _Pending:
    """A group handed to the lanes, until every part of it has committed."""

    __slots__ = ("committed", "group", "left")

    def __init__(self, group: Group, lanes: list[int]) -> None:
        self.group = group
        self.committed: list[_Committed] = []
        #: How many of its parts have not committed yet.
        self.left = len(lanes)


class _Lane:
    """One writer connection and its thread; its parts come in group order."""

    def __init__(self, index: int) -> None:
        self.index = index
        #: Parts handed to it and not yet taken (at most :attr:`Consumer.LANE_DEPTH`).
        self.parts: deque[tuple[_Pending, Batch]] = deque()
        self.writer: BatchWriter | None = None
        #: Since when it has been at the part in hand (monotonic); None between.
        self.batch_since: float | None = None
        self.next_refresh = 0.0
        self.idle_backoff = 0.0
        self.thread: threading.Thread | None = None


@dataclass(frozen=True, slots=True)
class Health:
    mqtt_connected: bool
    db_ok: bool
    queued: int
    last_commit_age_s: float | None
    #: Why ingest is not making progress; empty when it is.
    stuck: tuple[str, ...] = ()


class Consumer:
    """Subscribes, batches, writes, acknowledges; reconnects to broker and database by itself."""

    #: Database retry backoff (seconds), doubled per failure up to the maximum, with jitter.
    BACKOFF_MIN_S = 0.1
    BACKOFF_MAX_S = 5.0
    #: How long the writer waits for a message before doing housekeeping.
    IDLE_S = 0.5
    #: How often the seq-missing gauge is refreshed (and an idle database is pinged).
    REFRESH_S = 5.0
    MQTT_KEEPALIVE_S = 30
    MQTT_RECONNECT_S = (1, 30)
    SESSION_EXPIRY_S = 7 * 24 * 3600
    RECEIVE_MAXIMUM = 65535
    DB_CONNECT_TIMEOUT_S = 5

    def __init__(
        self, settings: Settings, broker: BrokerUrl, db_url: str, metrics: IngestMetrics
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.db_url = db_url
        self.metrics = metrics
        self.inbox = Inbox(settings.queue_messages, settings.queue_bytes)
        self._stopping = threading.Event()
        self._lanes = [_Lane(k) for k in range(settings.writers)]
        self._lane_of = LaneOf(settings.writers)
        self._migrated = False
        self._migrate_lock = threading.Lock()
        self._last_commit: float | None = None
        #: Set by the acknowledging thread: lane 0 refreshes the seq-missing gauge soon.
        self._refresh_soon = False
        #: Called with the rows of each commit, in commit order, on the thread that acknowledges
        #: them; must not block (live.py).
        self.on_commit: Callable[[Sequence[EventRow]], None] | None = None
        #: Called after ``on_commit`` with every commit's whole result (events, states,
        #: quarantine, new gaps) and its Unix time, in commit order, each on its own (one
        #: failing does not keep the next from running); must not block (the alert engine).
        self.listeners: list[Callable[[WriteResult, float], None]] = []
        self._topics: dict[bytes, str] = {}
        self._session = MqttSubscriber(self._session_config(), self._deliver, self._on_ready)
        # One decoded part waits in each lane while the lane commits the previous one:
        # decoding (CPU, holds the GIL) overlaps the database's share of the work (the GIL is
        # released). Groups handed to the lanes, in arrival order, until acknowledged: the
        # lanes go straight back to PostgreSQL instead of leaving it idle while the PUBACKs,
        # metrics and live stream of the last batch are done; bounded, so a lane that cannot
        # commit holds up the decoder rather than memory growing.
        self._pending: deque[_Pending] = deque()
        self._done = threading.Condition()
        self._decoder = threading.Thread(target=self._decode, name="ingest-decoder", daemon=True)
        for lane in self._lanes:
            lane.thread = threading.Thread(
                target=self._run, args=(lane,), name=f"ingest-writer-{lane.index}", daemon=True
            )
        self._acker = threading.Thread(target=self._acknowledge, name="ingest-acker", daemon=True)

    #: Groups handed to the lanes and not yet acknowledged, at most.
    MAX_PENDING: Final = 4
    #: Parts waiting in a lane besides the one it is writing.
    LANE_DEPTH: Final = 1

    def _writer_threads(self) -> list[threading.Thread]:
        return [lane.thread for lane in self._lanes if lane.thread is not None]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        log.info("connecting to MQTT broker %s as %r", self.broker, self.settings.client_id)
        self._session.start()
        self._decoder.start()
        for thread in self._writer_threads():
            thread.start()
        self._acker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish (or abandon, unacknowledged) the current batch, then leave the broker."""
        self._stopping.set()
        self.inbox.close()
        deadline = time.monotonic() + timeout
        # the acknowledging thread last: it acknowledges every batch the lanes committed
        for thread in (self._decoder, *self._writer_threads(), self._acker):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        self._session.stop()
        self.metrics.mqtt_connected.set(0)

    def health(self) -> Health:
        last = self._last_commit
        now, limit = time.monotonic(), self.settings.stuck_after_s
        stuck = []
        threads = (self._decoder, *self._writer_threads(), self._acker)
        if not self._stopping.is_set():
            dead = [t.name for t in threads if t.ident is not None and not t.is_alive()]
            if dead:
                stuck.append(f"ingest: thread {', '.join(dead)} has died")
        started = [s for lane in self._lanes if (s := lane.batch_since) is not None]
        if started and now - min(started) > limit:
            waited = now - min(started)
            stuck.append(f"ingest: the batch in hand has not committed for {waited:.0f} s")
        oldest = self.inbox.oldest()
        if oldest is not None:
            waited = (datetime.now(UTC) - oldest).total_seconds()
            idle = now - last if last is not None else waited
            if waited > limit and idle > limit:
                stuck.append(
                    f"ingest: {len(self.inbox)} messages queued, the oldest for {waited:.0f} s,"
                    f" and no commit for {idle:.0f} s"
                )
        return Health(
            mqtt_connected=bool(self.metrics.mqtt_connected.value()),
            db_ok=bool(self.metrics.db_connected.value()) and all(t.is_alive() for t in threads),
            queued=len(self.inbox),
            last_commit_age_s=None if last is None else now - last,
            stuck=tuple(stuck),
        )

    # -- MQTT (the session's I/O thread) -------------------------------------------------

    def _session_config(self) -> SessionConfig:
        b = self.broker
        context = None
        if b.tls:
            context = ssl.create_default_context(cafile=b.ca)
        group = self.settings.share_group
        retain = _RETAIN_IF_NEW_SUB if b.protocol == MQTT5 else 0
        return SessionConfig(
            host=b.host,
            port=b.port,
            client_id=self.settings.client_id,
            subscriptions=(
                (subscription(Channel.UP, share_group=group), 1, 0),
                (subscription(Channel.STATE), 1, retain),
            ),
            protocol=b.protocol,
            username=b.username,
            password=b.password,
            ssl_context=context,
            keepalive_s=self.MQTT_KEEPALIVE_S,
            session_expiry_s=self.SESSION_EXPIRY_S,
            receive_maximum=self.RECEIVE_MAXIMUM,
            reconnect_min_s=self.MQTT_RECONNECT_S[0],
            reconnect_max_s=self.MQTT_RECONNECT_S[1],
        )

    def _on_ready(self, ready: bool) -> None:
        self.metrics.mqtt_connected.set(1 if ready else 0)

    def _topic(self, raw: bytes) -> str:
        topic = self._topics.get(raw)
        if topic is None:
            try:
                topic = raw.decode()
            except UnicodeDecodeError:
                topic = _BAD_TOPIC
            if len(self._topics) >= 100_000:  # bounded: one entry per device channel
                self._topics.clear()
            self._topics[raw] = topic
        return topic

    def _deliver(self, publishes: Sequence[Publish], generation: int, timeout: float) -> int:
        now = datetime.now(UTC)
        known, topic = self._topics.get, self._topic
        items = [
            Inbound(
                known(p.topic) or topic(p.topic),
                p.payload,
                p.packet_id,
                p.qos,
                now,
                p.retain,
                generation,
            )
            for p in publishes
        ]
        taken = self.inbox.put_many(items, timeout)
        self.metrics.messages_received.inc(taken)
        self.metrics.queue_depth.set(len(self.inbox))
        return taken

    # -- decoder thread --------------------------------------------------------------------

    def _decode(self) -> None:
        """Collect and decode batches ahead of the lanes; never acknowledges anything."""
        s = self.settings
        lanes = len(self._lanes)
        try:
            while not self._stopping.is_set():
                group = collect_group(
                    self.inbox,
                    self._lane_of,
                    lanes,
                    max_size=s.batch_events,
                    max_wait_s=s.batch_ms / 1000,
                    idle_s=self.IDLE_S,
                    max_bytes=s.max_bytes,
                )
                self.metrics.queue_depth.set(len(self.inbox))
                if group is not None:
                    self._hand_off(group)
        except Exception:
            log.exception("the decoder thread failed")
            raise

    def _hand_off(self, group: Group) -> None:
        """Seal each part (the COPY payloads, built here rather than on a lane's thread) and
        give it to its lane, the group to the acknowledging thread first; gives up (the group
        then stays unacknowledged) when the server stops."""
        busy = group.busy()
        for k in busy:
            group.parts[k].seal()
        pending = _Pending(group, busy)
        with self._done:
            while len(self._pending) >= self.MAX_PENDING:
                if self._stopping.is_set():
                    return
                self._done.wait(self.IDLE_S)
            self._pending.append(pending)
            # each part as soon as its lane has room: a lane busy retrying must not keep the
            # others waiting for their parts
            left = list(busy)
            while left:
                for k in list(left):
                    lane = self._lanes[k]
                    if len(lane.parts) < self.LANE_DEPTH:
                        lane.parts.append((pending, group.parts[k]))
                        left.remove(k)
                self._done.notify_all()
                if left:
                    if self._stopping.is_set():
                        return
                    self._done.wait(self.IDLE_S)

    # -- writer lanes ----------------------------------------------------------------------

    def _run(self, lane: _Lane) -> None:
        try:
            self._housekeeping(lane)  # connect (lane 0: migrate) before the first message
            while not self._stopping.is_set():
                taken = self._take(lane)
                if taken is not None:
                    pending, part = taken
                    committed = self._commit(lane, part)
                    if committed is None:
                        log.info("stopping: %d messages left unacknowledged", len(pending.group))
                        break
                    with self._done:
                        pending.committed.append(committed)
                        pending.left -= 1
                        self._done.notify_all()
                self._housekeeping(lane)
        except Exception:
            log.exception("the writer thread of lane %d failed", lane.index)
            raise
        finally:
            self._disconnect_db(lane)
            with self._done:
                self._done.notify_all()

    def _take(self, lane: _Lane) -> tuple[_Pending, Batch] | None:
        """The lane's next part, waiting up to :attr:`IDLE_S`; None if none came by then."""
        with self._done:
            if not lane.parts:
                self._done.wait_for(lambda: lane.parts or self._stopping.is_set(), self.IDLE_S)
            if not lane.parts or self._stopping.is_set():
                return None
            taken = lane.parts.popleft()
            self._done.notify_all()  # room for the decoder
            return taken

    # -- acknowledging thread ------------------------------------------------------------

    def _acknowledge(self) -> None:
        """Metrics, live stream and PUBACKs of each group once all its parts committed, in
        arrival order, until the lanes have finished and everything they committed whole is
        acknowledged."""
        while (pending := self._next_done()) is not None:
            try:
                self._record(pending)
            except Exception:  # a metrics bug must not keep committed messages unacknowledged
                log.exception("recording a committed batch failed")
            try:
                self._ack(pending.group.messages)
            except Exception:  # unacknowledged, the broker resends them: duplicates, no loss
                log.exception("acknowledging a committed batch failed")

    def _next_done(self) -> _Pending | None:
        """The oldest group once every part of it committed; None once none can (the lanes
        have finished)."""
        with self._done:
            while True:
                if self._pending and self._pending[0].left == 0:
                    pending = self._pending.popleft()
                    self._done.notify_all()  # room for the decoder
                    return pending
                if not any(t.is_alive() for t in self._writer_threads()):
                    return None
                self._done.wait(self.IDLE_S)

    def _connect_db(self, lane: _Lane) -> BatchWriter:
        if lane.writer is None:
            with self._migrate_lock:  # one lane migrates; the others connect after it
                conn = connect_session(
                    self.db_url,
                    application_name="campus-ingest",
                    connect_timeout=self.DB_CONNECT_TIMEOUT_S,
                    migrate_first=not self._migrated,
                )
                self._migrated = True
            try:
                lane.writer = BatchWriter(conn)
            except BaseException:
                conn.close()
                raise
            log.info("lane %d connected to database %s", lane.index, mask(self.db_url))
            self._db_gauge()
        return lane.writer

    def _disconnect_db(self, lane: _Lane) -> None:
        writer, lane.writer = lane.writer, None
        self._db_gauge()
        if writer is not None:
            with contextlib.suppress(psycopg.Error):
                writer.conn.close()

    def _db_gauge(self) -> None:
        """Connected: every lane has its connection."""
        self.metrics.db_connected.set(int(all(lane.writer is not None for lane in self._lanes)))

    def _housekeeping(self, lane: _Lane) -> None:
        """Every few seconds: reconnect if idle and down; lane 0 refreshes the seq-missing
        gauge."""
        if self._refresh_soon and lane.index == 0:
            self._refresh_soon = False
            lane.next_refresh = 0.0
        if time.monotonic() < lane.next_refresh:
            return
        was_up = lane.writer is not None
        try:
            writer = self._connect_db(lane)
            if lane.index == 0:
                self.metrics.seq_missing.set(missing_total(writer.conn))
            else:
                writer.conn.execute("SELECT 1")  # an idle connection's health
        except psycopg.Error as exc:
            if was_up or not lane.idle_backoff:
                log.warning("database unavailable: %s", _one_line(exc))
            self._disconnect_db(lane)
            # A dropped connection is retried at once: the server may be back already.
            backoff = 0.0 if was_up else max(lane.idle_backoff * 2, self.BACKOFF_MIN_S)
            lane.idle_backoff = min(backoff, self.BACKOFF_MAX_S)
            lane.next_refresh = time.monotonic() + lane.idle_backoff
            return
        lane.idle_backoff = 0.0
        lane.next_refresh = time.monotonic() + self.REFRESH_S

    def _commit(self, lane: _Lane, batch: Batch) -> _Committed | None:
        """Write ``batch`` until it is committed, or the server stops first (None)."""
        delay = self.BACKOFF_MIN_S
        lane.batch_since = time.monotonic()
        try:
            return self._commit_retrying(lane, batch, delay)
        finally:
            lane.batch_since = None

    def _commit_retrying(self, lane: _Lane, batch: Batch, delay: float) -> _Committed | None:
        while True:
            try:
                writer = self._connect_db(lane)
                started = time.perf_counter()
                result = self._write(writer, batch)
                elapsed = time.perf_counter() - started
            except psycopg.Error as exc:
                log.warning(
                    "database write of %d messages failed (%s: %s); retrying in %.1f s",
                    len(batch),
                    type(exc).__name__,
                    _one_line(exc),
                    delay,
                )
                self._disconnect_db(lane)
                if self._stopping.wait(delay * random.uniform(0.5, 1.0)):  # noqa: S311
                    return None
                delay = min(delay * 2, self.BACKOFF_MAX_S)
                continue
            self._last_commit = time.monotonic()
            return _Committed(batch, result, elapsed, time.time())

    def _write(self, writer: BatchWriter, batch: Batch) -> WriteResult:
        return write_batch(writer, batch)

    def _record(self, pending: _Pending) -> None:
        """Metrics of each part's transaction, then the whole batch's counts and listeners."""
        m = self.metrics
        total: WriteResult | None = None
        now = 0.0
        for committed in pending.committed:
            batch, result = committed.batch, committed.result
            m.batch_latency.observe(committed.elapsed)
            encoded = batch.encoded
            if encoded is not None and result.stored is encoded.events:  # the whole part
                # in the stamps' own unit: µs since 2000-01-01 UTC
                ages_at = (committed.at - _PG_EPOCH_UNIX) * 1e6
                m.event_latency.observe_ages(ages_at, encoded.stamps, 1e-6)
            else:
                at = committed.at
                m.event_latency.observe_many(at - r.event.ts.timestamp() for r in result.stored)
            m.events_received.inc(batch.events_received)
            total = result if total is None else total + result
            now = max(now, committed.at)
        if total is None:
            return
        m.events_stored.inc(total.inserted)
        m.events_duplicate.inc(total.duplicates)
        m.seq_gaps.inc(total.new_missing)
        for q in total.quarantine:
            m.quarantined.inc(reason=q.kind)
        if total.new_missing:
            self._refresh_soon = True
        tell_listeners(total, now, self.on_commit, self.listeners)

    def _ack(self, messages: list[Inbound]) -> None:
        stale = self._session.ack(messages)
        if stale:
            log.info(
                "%d messages came on an earlier connection: the broker will resend them", stale
            )


__all__ = ["Consumer", "Health", "Inbox", "collect", "write_batch"]
