"""Alert notifications that lose nothing: ``alert_events`` → an outbox table → receivers.

One thread, on the server holding :data:`LEADER_LOCK_KEY` (servers sharing a database elect one):

1. **route**: read ``alert_events`` after the cursor in ``alert_notify_cursor``, a page at a
   time, and for each event write one ``alert_notifications`` row per receiver its route names,
   in the same transaction as the cursor moves. Event ids are taken when a transaction inserts
   but become visible when it commits, so a gap in the ids may be a transaction still running:
   then the table is locked in SHARE mode for a moment, which waits for every writer, and what
   is still missing after that was rolled back.
2. **send**: deliver the due rows, per receiver and alert in id order (a later notification of
   an alert waits for the earlier one). A failed attempt is tried again after an exponential
   backoff with jitter, and the receiver is left alone until then; rows still not delivered
   :attr:`NotifyConfig.window_s` after they became due are marked ``failed`` with the reason.
   A notification may arrive twice if the server dies between the receiver's answer and the
   commit: each carries ``notification_id`` to tell.

Quiet hours (per route): an ``info`` notification is dropped (recorded as ``dropped``), a
``warning`` one held until the hours end, a ``critical`` one sent at once unless the route says
``hold_critical = true``. Nothing here blocks ingest: its own thread and database session,
bounded pages and HTTP/SMTP timeouts.
"""

from __future__ import annotations

import logging
import random
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any, ClassVar, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg.types.json import Jsonb

from ingest_server.alerts.channels import DeliveryError, Receiver, ReceiverError, parse_receiver
from ingest_server.metrics import IngestMetrics
from ingest_server.storage.db import connect_session

log = logging.getLogger(__name__)

#: Advisory lock of the one server (per database) that notifies; "campus\0" + 0x51 (0051).
LEADER_LOCK_KEY: Final = 0x6361_6D70_7573_0051
SEVERITIES: Final = ("info", "warning", "critical")
_STATE_AFTER: Final = {
    "opened": "open",
    "reopened": "open",
    "acknowledged": "acknowledged",
    "resolved": "resolved",
}
#: The largest routes file read.
MAX_ROUTES_BYTES: Final = 256 * 1024


class NotifyConfigError(ValueError):
    """The notification settings are unusable; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily span in local time, e.g. 22:00-07:00 (it may run past midnight)."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> QuietHours:
        try:
            a, b = text.split("-")
            start, end = time.fromisoformat(a.strip()), time.fromisoformat(b.strip())
        except ValueError:
            raise NotifyConfigError(f"quiet_hours must be HH:MM-HH:MM, got {text!r}") from None
        if start == end:
            raise NotifyConfigError(f"quiet_hours {text!r} is empty")
        return cls(start, end)

    def ends_after(self, now: datetime) -> datetime | None:
        """The end of the quiet span ``now`` (aware, local) is in, or None outside it."""
        t = now.timetz().replace(tzinfo=None)
        if self.start < self.end:
            inside = self.start <= t < self.end
        else:
            inside = t >= self.start or t < self.end
        if not inside:
            return None
        end = now.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        return end if end > now else end + timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Route:
    """Alerts of these schools and severities (None: all) go to these receivers."""

    receivers: tuple[str, ...]
    schools: frozenset[str] | None = None
    severities: frozenset[str] | None = None
    quiet: QuietHours | None = None
    hold_critical: bool = False

    def matches(self, school_id: str, severity: str) -> bool:
        return (self.schools is None or school_id in self.schools) and (
            self.severities is None or severity in self.severities
        )


@dataclass(frozen=True, slots=True)
class Delivery:
    """What routing decided for one receiver: send from ``not_before``, or drop."""

    receiver: str
    not_before: datetime
    dropped: str | None = None


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """The receivers by name and the routes; without routes every receiver gets everything."""

    receivers: Mapping[str, Receiver]
    routes: tuple[Route, ...] | None = None
    #: Quiet hours are in this zone; None: the district's (``storage_config.district_tz``).
    timezone: str | None = None
    #: How long a notification is retried after it became due before it is ``failed``.
    window_s: float = 24 * 3600.0

    def plan(self, school_id: str, severity: str, now: datetime, tz: ZoneInfo) -> list[Delivery]:
        """Where one event's notification goes, and from when (quiet hours)."""
        if self.routes is None:
            return [Delivery(name, now) for name in self.receivers]
        best: dict[str, Delivery] = {}
        for route in self.routes:
            if not route.matches(school_id, severity):
                continue
            end = route.quiet.ends_after(now.astimezone(tz)) if route.quiet else None
            if end is None or (severity == "critical" and not route.hold_critical):
                d = Delivery("", now)
            elif severity == "info":
                d = Delivery("", now, dropped="info during quiet hours")
            else:
                d = Delivery("", end.astimezone(UTC))
            for name in route.receivers:
                old = best.get(name)
                # a receiver in several routes: the soonest delivery wins, sending over dropping
                if old is None or _sooner(d, old):
                    best[name] = Delivery(name, d.not_before, d.dropped)
        return list(best.values())

    @classmethod
    def build(
        cls,
        webhooks: Sequence[str] = (),
        smtp: str | None = None,
        routes_file: Path | None = None,
    ) -> NotifyConfig | None:
        """From ``--alert-webhook`` (named webhook-1, -2, …), ``--smtp`` (named smtp) and
        ``--alert-routes``; None when there is nowhere to send."""
        receivers: dict[str, Receiver] = {}
        try:
            for i, url in enumerate(webhooks, 1):
                receivers[f"webhook-{i}"] = parse_receiver(f"webhook-{i}", url)
            if smtp:
                receivers["smtp"] = parse_receiver("smtp", smtp)
        except ReceiverError as exc:
            raise NotifyConfigError(str(exc)) from None
        if routes_file is None:
            return cls(receivers) if receivers else None
        return _from_routes_file(routes_file, receivers)


def _sooner(new: Delivery, old: Delivery) -> bool:
    if (new.dropped is None) != (old.dropped is None):
        return new.dropped is None
    return new.not_before < old.not_before


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise NotifyConfigError(f"{where} must be a list of strings")
    return list(value)


def _from_routes_file(path: Path, receivers: dict[str, Receiver]) -> NotifyConfig:
    try:
        raw = path.read_bytes()
        if len(raw) > MAX_ROUTES_BYTES:
            raise NotifyConfigError(f"--alert-routes {path}: larger than {MAX_ROUTES_BYTES} bytes")
        doc = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise NotifyConfigError(f"--alert-routes {path}: {exc}") from None
    where = f"--alert-routes {path}"
    unknown = set(doc) - {"timezone", "window_hours", "receivers", "routes"}
    if unknown:
        raise NotifyConfigError(f"{where}: unknown keys {sorted(unknown)}")
    tz = doc.get("timezone")
    if tz is not None:
        try:
            ZoneInfo(str(tz))
        except (ZoneInfoNotFoundError, ValueError):
            raise NotifyConfigError(f"{where}: unknown timezone {tz!r}") from None
    window_h = doc.get("window_hours", 24)
    if not isinstance(window_h, int | float) or not 0 < window_h <= 24 * 14:
        raise NotifyConfigError(f"{where}: window_hours must be between 0 and 336")
    table = doc.get("receivers", {})
    if not isinstance(table, dict):
        raise NotifyConfigError(f"{where}: [receivers.NAME] tables expected")
    for name, spec in table.items():
        if name in receivers:
            raise NotifyConfigError(f"{where}: receiver {name!r} is also given on the command line")
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise NotifyConfigError(f'{where}: receivers.{name} needs url = "…"')
        try:
            receivers[name] = parse_receiver(name, spec["url"])
        except ReceiverError as exc:
            raise NotifyConfigError(f"{where}: receivers.{name}: {exc}") from None
    routes = []
    raw_routes = doc.get("routes", [])
    if not isinstance(raw_routes, list) or not raw_routes:
        raise NotifyConfigError(f"{where}: needs at least one [[routes]]")
    for i, r in enumerate(raw_routes):
        at = f"{where}: routes[{i}]"
        if not isinstance(r, dict):
            raise NotifyConfigError(f"{at} must be a table")
        extra = set(r) - {"schools", "severities", "receivers", "quiet_hours", "hold_critical"}
        if extra:
            raise NotifyConfigError(f"{at}: unknown keys {sorted(extra)}")
        names = _strings(r.get("receivers"), f"{at}.receivers")
        missing = [n for n in names if n not in receivers]
        if missing or not names:
            raise NotifyConfigError(
                f"{at}.receivers: unknown {missing} (known: {sorted(receivers)})"
            )
        sev = r.get("severities")
        if sev is not None and not set(_strings(sev, f"{at}.severities")) <= set(SEVERITIES):
            raise NotifyConfigError(f"{at}.severities: only {list(SEVERITIES)}")
        schools = r.get("schools")
        quiet = r.get("quiet_hours")
        if quiet is not None and not isinstance(quiet, str):
            raise NotifyConfigError(f'{at}.quiet_hours must be "HH:MM-HH:MM"')
        hold = r.get("hold_critical", False)
        if not isinstance(hold, bool):
            raise NotifyConfigError(f"{at}.hold_critical must be true or false")
        routes.append(
            Route(
                receivers=tuple(names),
                schools=frozenset(_strings(schools, f"{at}.schools"))
                if schools is not None
                else None,
                severities=frozenset(sev) if sev is not None else None,
                quiet=QuietHours.parse(quiet) if quiet is not None else None,
                hold_critical=hold,
            )
        )
    return NotifyConfig(
        receivers, tuple(routes), str(tz) if tz is not None else None, float(window_h) * 3600
    )


# ---- the notifier ----

_EVENTS: Final = """
SELECT e.id, e.alert_id, e.transition, e.at, e.by_whom, a.rule, a.severity, a.school_id,
       a.device_id, a.room, a.opened_at, a.acknowledged_at, a.acknowledged_by, a.resolved_at,
       a.resolved_by, a.message, a.detail
FROM alert_events e JOIN alerts a ON a.id = e.alert_id
WHERE e.id > %s ORDER BY e.id LIMIT %s
"""
#: Due rows of configured receivers whose alert has no earlier pending row for that receiver.
_DUE: Final = """
SELECT n.id, n.receiver, n.alert_id, n.payload, n.attempts FROM alert_notifications n
WHERE n.status = 'pending' AND n.not_before <= %(now)s AND n.receiver = ANY(%(receivers)s)
  AND NOT EXISTS (
    SELECT 1 FROM alert_notifications p
    WHERE p.status = 'pending' AND p.receiver = n.receiver AND p.alert_id = n.alert_id
      AND p.id < n.id)
ORDER BY n.id LIMIT %(limit)s
"""


def _iso(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def payload_of(row: Sequence[Any]) -> dict[str, Any]:
    """The notification of one ``_EVENTS`` row: the alert as it was at this transition."""
    (event_id, alert_id, transition, at, by_whom, rule, severity, school_id, device_id, room,
     opened_at, ack_at, ack_by, res_at, res_by, msg, detail) = row  # fmt: skip
    return {
        "event_id": event_id,
        "alert_id": alert_id,
        "transition": transition,
        "at": _iso(at),
        "by_whom": by_whom,
        "rule": rule,
        "severity": severity,
        "state": _STATE_AFTER.get(transition, transition),
        "school_id": school_id,
        "device_id": device_id,
        "room": room,
        "opened_at": _iso(opened_at),
        "acknowledged_at": _iso(ack_at),
        "acknowledged_by": ack_by,
        "resolved_at": _iso(res_at),
        "resolved_by": res_by,
        "message": msg,
        "detail": detail,
    }


@dataclass
class _Backoff:
    attempts: int = 0
    until: datetime = field(default_factory=lambda: datetime.min.replace(tzinfo=UTC))


class Notifier:
    """Routes ``alert_events`` into the outbox and delivers it; :meth:`start` / :meth:`stop`."""

    #: Events routed per transaction, rows sent per pass.
    PAGE: ClassVar[int] = 200
    SEND_BATCH: ClassVar[int] = 50
    #: Backoff of a failing receiver: BASE·2^(n-1) seconds, at most MAX, jittered to 50-100 %.
    BACKOFF_BASE_S: ClassVar[float] = 2.0
    BACKOFF_MAX_S: ClassVar[float] = 600.0
    #: Seconds between passes when there is nothing to do.
    POLL_S: ClassVar[float] = 1.0
    #: How long routing waits for running writers of alert_events at a gap in the ids.
    GAP_LOCK_TIMEOUT: ClassVar[str] = "2s"

    def __init__(
        self,
        config: NotifyConfig,
        db_url: str,
        metrics: IngestMetrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self._db_url = db_url
        self._metrics = metrics
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff: dict[str, _Backoff] = {}
        self.leader = False

    def start(self) -> Notifier:
        for r in self.config.receivers.values():
            log.info("alert notifications: receiver %s: %s", r.name, r.label)
        self._thread = threading.Thread(target=self._run, name="alert-notifier", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Run a pass now (tests, or a caller that just wrote alert_events)."""
        self._wake.set()

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        failures = 0
        while not self._stop.is_set():
            busy = False
            try:
                if conn is None:
                    conn = connect_session(
                        self._db_url,
                        application_name="campus-alert-notifier",
                        connect_timeout=5,
                        migrate_first=True,
                    )
                busy = self.run_once(conn)
                failures = 0
            except psycopg.Error as exc:
                failures += 1
                log.warning("alert notifier: database error, retrying: %s", exc)
                if conn is not None:
                    conn.close()
                conn = None
                self.leader = False
                self._metrics.alert_notify_leader.set(0)
                self._stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.5, 1))  # noqa: S311
                continue
            if not busy:
                self._wake.wait(self.POLL_S)
                self._wake.clear()
        if conn is not None:
            conn.close()

    def run_once(self, conn: psycopg.Connection[Any]) -> bool:
        """One pass: route, expire, send; True when there may be more to do at once."""
        if not self.leader:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone()
            self.leader = bool(row and row[0])
            self._metrics.alert_notify_leader.set(1 if self.leader else 0)
            if not self.leader:
                return False
            log.info("alert notifier: this server sends the notifications")
        routed = self._route(conn)
        self._expire(conn)
        sent = self._send(conn)
        row = conn.execute(
            "SELECT count(*) FROM alert_notifications WHERE status = 'pending'"
        ).fetchone()
        self._metrics.alert_notify_pending.set(row[0] if row else 0)
        return routed >= self.PAGE or sent >= self.SEND_BATCH

    # -- routing --

    def _zone(self, conn: psycopg.Connection[Any]) -> ZoneInfo:
        name = self.config.timezone
        if name is None:
            row = conn.execute("SELECT district_tz FROM storage_config").fetchone()
            name = row[0] if row else "UTC"
        try:
            return ZoneInfo(str(name))
        except (ZoneInfoNotFoundError, ValueError):
            return ZoneInfo("UTC")

    def _route(self, conn: psycopg.Connection[Any]) -> int:
        now = self._clock()
        tz = self._zone(conn)
        try:
            with conn.transaction():
                row = conn.execute(
                    "SELECT last_event_id FROM alert_notify_cursor WHERE id = 1 FOR UPDATE"
                ).fetchone()
                cursor = row[0] if row else 0
                events = conn.execute(_EVENTS, (cursor, self.PAGE)).fetchall()
                if _has_gap(cursor, [e[0] for e in events]):
                    # an id below one we see may belong to a transaction not yet committed:
                    # SHARE mode waits for every writer; what is missing after is rolled back
                    conn.execute(f"SET LOCAL lock_timeout = '{self.GAP_LOCK_TIMEOUT}'")
                    conn.execute("LOCK TABLE alert_events IN SHARE MODE")
                    events = conn.execute(_EVENTS, (cursor, self.PAGE)).fetchall()
                if not events:
                    return 0
                self._write_deliveries(conn, events, now, tz)
                conn.execute(
                    "UPDATE alert_notify_cursor SET last_event_id = %s WHERE id = 1",
                    (events[-1][0],),
                )
        except psycopg.errors.LockNotAvailable:
            log.debug("alert notifier: a writer of alert_events is still running; later")
            return 0
        return len(events)

    def _write_deliveries(
        self,
        conn: psycopg.Connection[Any],
        events: Iterable[Sequence[Any]],
        now: datetime,
        tz: ZoneInfo,
    ) -> None:
        stale_before = now - timedelta(seconds=self.config.window_s)
        rows = []
        counts: list[tuple[str, str]] = []
        for event in events:
            payload = payload_of(event)
            at: datetime = event[3]
            if at < stale_before:
                # older than the retry window: notifying it now would tell nothing useful
                counts.append(("-", "stale"))
                continue
            for d in self.config.plan(payload["school_id"], payload["severity"], now, tz):
                status = "dropped" if d.dropped else "pending"
                row = (event[0], event[1], d.receiver, status, Jsonb(payload))
                rows.append((*row, d.not_before, d.not_before, d.dropped))
                if d.dropped:
                    counts.append((d.receiver, "dropped"))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO alert_notifications (event_id, alert_id, receiver, status, payload,"
                " due_at, not_before, last_error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (event_id, receiver) DO NOTHING",
                rows,
            )
        for receiver, outcome in counts:
            self._metrics.alert_notifications.inc(receiver=receiver, outcome=outcome)

    # -- expiry and sending --

    def _expire(self, conn: psycopg.Connection[Any]) -> None:
        now = self._clock()
        hours = self.config.window_s / 3600
        gone = conn.execute(
            "UPDATE alert_notifications SET status = 'failed', last_error = %s"
            " || coalesce(': ' || last_error, CASE WHEN receiver = ANY(%s) THEN ''"
            " ELSE ': receiver not configured' END)"
            " WHERE status = 'pending' AND due_at < %s RETURNING receiver, last_error",
            (
                f"not delivered within {hours:g} h",
                list(self.config.receivers),
                now - timedelta(seconds=self.config.window_s),
            ),
        ).fetchall()
        for receiver, reason in gone:
            log.warning("alert notification to %s failed: %s", receiver, reason)
            self._metrics.alert_notifications.inc(receiver=receiver, outcome="failed")

    def _send(self, conn: psycopg.Connection[Any]) -> int:
        now = self._clock()
        waiting = [n for n, b in self._backoff.items() if b.until > now]
        ready = [n for n in self.config.receivers if n not in waiting]
        if not ready:
            return 0
        due = conn.execute(
            _DUE, {"now": now, "receivers": ready, "limit": self.SEND_BATCH}
        ).fetchall()
        done = 0
        for row_id, receiver_name, _alert_id, payload, attempts in due:
            backoff = self._backoff.get(receiver_name)
            if self._stop.is_set():
                break
            if backoff is not None and backoff.until > self._clock():
                continue  # failed earlier in this pass: leave it alone until its backoff ends
            receiver = self.config.receivers[receiver_name]
            try:
                receiver.send({**payload, "notification_id": row_id})
            except DeliveryError as exc:
                self._failed(conn, row_id, receiver, attempts + 1, exc)
                continue
            conn.execute(
                "UPDATE alert_notifications SET status = 'sent', sent_at = %s,"
                " attempts = attempts + 1, last_error = NULL WHERE id = %s",
                (self._clock(), row_id),
            )
            self._backoff.pop(receiver_name, None)
            self._metrics.alert_notifications.inc(receiver=receiver_name, outcome="sent")
            done += 1
        return done

    def _failed(
        self,
        conn: psycopg.Connection[Any],
        row_id: int,
        receiver: Receiver,
        attempts: int,
        exc: DeliveryError,
    ) -> None:
        now = self._clock()
        if not exc.retry:
            log.warning(
                "alert notification %d to %s failed: %s", row_id, receiver.label, exc.reason
            )
            conn.execute(
                "UPDATE alert_notifications SET status = 'failed', attempts = %s, last_error = %s"
                " WHERE id = %s",
                (attempts, exc.reason, row_id),
            )
            self._metrics.alert_notifications.inc(receiver=receiver.name, outcome="failed")
            return
        b = self._backoff.setdefault(receiver.name, _Backoff())
        b.attempts += 1
        delay = min(self.BACKOFF_MAX_S, self.BACKOFF_BASE_S * 2 ** (b.attempts - 1))
        delay *= random.uniform(0.5, 1.0)  # noqa: S311  # jitter, not a secret
        b.until = now + timedelta(seconds=delay)
        log.info(
            "alert notification %d to %s: %s; next try in %.1f s",
            row_id,
            receiver.label,
            exc.reason,
            delay,
        )
        conn.execute(
            "UPDATE alert_notifications SET attempts = %s, last_error = %s, not_before = %s"
            " WHERE id = %s",
            (attempts, exc.reason, b.until, row_id),
        )
        self._metrics.alert_notify_retries.inc(receiver=receiver.name)


def _has_gap(cursor: int, ids: Sequence[int]) -> bool:
    """Whether ``ids`` (ascending, all above ``cursor``) skip a number."""
    return bool(ids) and ids[-1] - cursor != len(ids)
