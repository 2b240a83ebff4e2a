"""The alert engine: a thread of its own, fed by the ingest's commits through a bounded queue.

:meth:`AlertEngine.submit` runs on the ingest's acknowledging thread and only appends the
commit's result to a queue of ``QUEUE_COMMITS``; when that is full the oldest commit is
dropped and counted (``campus_alerts_dropped_total``), so ingest never waits for alerts. The
engine thread evaluates each commit (:mod:`.rules`), and every ``TICK_S`` re-evaluates its
tracks for durations and clear holds, looks for silent devices on the ``devices (last_seen)``
index every ``OFFLINE_POLL_S``, learns of alerts resolved by hand, and refreshes the gauges.
Each transition is one transaction (:mod:`.store`) and then goes to the live stream. A database
fault is logged (at most ``LOG_PER_MINUTE`` lines a minute), counted, and retried on the next
tick: the conditions are in memory, so nothing is lost but time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import psycopg

from ingest_server.alerts import store
from ingest_server.alerts.config import RULES, RulesConfig
from ingest_server.alerts.rules import Action, Evaluator
from ingest_server.ingest.writer import WriteResult
from ingest_server.metrics import IngestMetrics
from ingest_server.storage.db import session_options

log = logging.getLogger(__name__)

#: Called with each transition written (``opened`` … ``reopened``) and the alert as it now is.
Publish = Callable[[str, dict[str, Any]], None]

#: How many silent devices one offline poll reads at most (newest silence first).
MAX_SILENT: Final = 10_000
#: How far back the offline poll looks: a device silent for longer was reported long ago.
SILENT_LOOKBACK_S: Final = 7 * 86400.0
#: Server-side limits of the engine's session: it never holds a lock ingest waits on for long.
_LIMITS: Final = {"statement_timeout": "30s", "lock_timeout": "5s"}
#: Alerts not resolved that the engine takes over at start, at most.
MAX_ADOPT: Final = 100_000


class AlertEngine:
    """Rules on the committed stream; start, submit from the ingest, stop."""

    QUEUE_COMMITS = 256
    TICK_S = 1.0
    OFFLINE_POLL_S = 30.0
    LOG_PER_MINUTE = 10
    DB_CONNECT_TIMEOUT_S = 5

    def __init__(
        self,
        config: RulesConfig,
        db_url: str,
        metrics: IngestMetrics,
        publish: Publish | None = None,
    ) -> None:
        self.config = config
        self.db_url = db_url
        self.metrics = metrics
        self.publish = publish
        self.evaluator = Evaluator(config)
        self._queue: deque[tuple[WriteResult, float]] = deque()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._adopted = False
        self._touched: dict[int, float] = {}
        self._next_poll = 0.0
        self._log_window = (0.0, 0)
        #: CPU seconds the engine thread spent evaluating commits, and events evaluated (bench).
        self.cpu_s = 0.0
        self.events_seen = 0
        self._thread = threading.Thread(target=self._run, name="alert-engine", daemon=True)

    # -- the ingest's side ------------------------------------------------------------------

    def submit(self, result: WriteResult, at: float) -> None:
        """A commit (called on the ingest's thread): queued, never waited for."""
        if not (result.stored or result.state_rows or result.quarantine or result.gap_devices):
            return
        with self._cond:
            if len(self._queue) >= self.QUEUE_COMMITS:
                self._queue.popleft()
                self.metrics.alerts_dropped.inc()
            self._queue.append((result, at))
            self._cond.notify()
        self.metrics.alerts_queue.set(len(self._queue))

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> AlertEngine:
        log.info("alert engine: rules from %s", self.config.source)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._disconnect()

    def stuck(self) -> list[str]:
        """Why alerts are not being evaluated (for /healthz); empty when they are."""
        t = self._thread
        if t.ident is not None and not t.is_alive() and not self._stopping.is_set():
            return ["alerts: thread alert-engine has died"]
        return []

    # -- the engine thread -------------------------------------------------------------------

    def _take(self, timeout: float) -> list[tuple[WriteResult, float]]:
        with self._cond:
            if not self._queue and timeout > 0 and not self._stopping.is_set():
                self._cond.wait(timeout)
            items = list(self._queue)
            self._queue.clear()
        self.metrics.alerts_queue.set(0)
        return items

    def _run(self) -> None:
        next_tick = 0.0
        try:
            while not self._stopping.is_set():
                items = self._take(max(0.0, next_tick - time.monotonic()))
                if items:
                    self._evaluate(items)
                tick = time.monotonic() >= next_tick
                if tick:
                    next_tick = time.monotonic() + self.TICK_S
                self._step(tick)
        except BaseException:
            log.exception("the alert engine thread failed")
            raise

    def _evaluate(self, items: list[tuple[WriteResult, float]]) -> None:
        started = time.thread_time()
        ev = self.evaluator
        for result, at in items:
            try:
                if result.stored:
                    ev.events(result.stored, at)
                    self.events_seen += len(result.stored)
                if result.state_rows:
                    ev.states(result.state_rows, at)
                if result.quarantine:
                    ev.quarantined(result.quarantine, at)
                if result.gap_devices:
                    ev.gaps(result.gap_devices, at)
            except Exception:  # noqa: BLE001 - a rule's bug must not stop the others; counted
                self._fault("evaluating a commit")
        self.cpu_s += time.thread_time() - started

    def _step(self, tick: bool) -> None:
        """Transitions due, and on a tick the time-based work; a database fault waits a tick."""
        now = time.time()
        try:
            conn = self._connect()
            if tick:
                self._tick(conn, now)
            for action in self.evaluator.decide(now, everything=tick):
                self._apply(conn, action)
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
            log.debug("alert engine: the schema is not migrated yet")  # the consumer migrates
        except psycopg.Error:
            self._fault("database")
            self._disconnect()
        except Exception:  # noqa: BLE001 - logged and counted; the next tick tries again
            self._fault("a transition")

    def _tick(self, conn: psycopg.Connection[Any], now: float) -> None:
        ev = self.evaluator
        if not self._adopted:
            for alert_id, rule, school, device, seen in store.not_resolved(conn, MAX_ADOPT):
                ev.adopt(rule, school, device, alert_id, seen.timestamp())
            self._adopted = True
        active = ev.active()
        if active:
            for alert_id, state in store.states_of(conn, list(active)).items():
                if state == "resolved":
                    ev.resolved_elsewhere(alert_id, now)
            fresh = {
                i: t.last_true
                for i, t in active.items()
                if t.cond and t.last_true > self._touched.get(i, 0.0) + 30.0
            }
            store.touch(conn, fresh)
            self._touched = {i: self._touched.get(i, 0.0) for i in active} | fresh
        if time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.OFFLINE_POLL_S
            self._poll_silent(conn, now)
        counts = store.open_counts(conn)
        for rule in RULES:
            self.metrics.alerts_open.set(counts.get(rule, 0), rule=rule)

    def _poll_silent(self, conn: psycopg.Connection[Any], now: float) -> None:
        silent_s = self.config.smallest("device_offline", "silent_s")
        rows = store.silent_devices(conn, silent_s, SILENT_LOOKBACK_S, MAX_SILENT)
        for device, school, last_seen, state_at, state in rows:
            # a presence message after the last event is a sign of life too (offline: the will
            # has its own path)
            last = max(last_seen.timestamp(), state_at.timestamp() if state_at else 0.0)
            if state == "offline":
                continue
            self.evaluator.silent(school, device, last, now)

    def _apply(self, conn: psycopg.Connection[Any], action: Action) -> None:
        t = action.track
        p = self.config.params(t.rule, t.school_id)
        done: store.Transition | None = None
        if action.kind == "reopen" and t.resolved_id is not None:
            done = store.reopen(
                conn, t.resolved_id, message=t.message, detail=t.detail, at=action.at
            )
        if action.kind in ("open", "reopen") and done is None:
            done = store.open_alert(
                conn,
                rule=t.rule,
                severity=p.severity,
                school_id=t.school_id,
                device_id=t.device_id,
                message=t.message,
                detail=t.detail,
                at=action.at,
            )
        if action.kind == "resolve" and t.alert_id is not None:
            done = store.resolve(conn, t.alert_id, "auto", action.at)
            self.evaluator.applied(action, t.alert_id)
        elif done is not None:
            self.evaluator.applied(action, int(done.alert["id"]))
        if done is not None and done.transition != "touched":
            self._emit(done)

    def _emit(self, done: store.Transition) -> None:
        self.metrics.alert_transitions.inc(rule=done.alert["rule"], transition=done.transition)
        log.info(
            "alert %s %s: %s (%s)",
            done.alert["id"],
            done.transition,
            done.alert["rule"],
            done.alert["device_id"],
        )
        if self.publish is not None:
            try:
                self.publish(done.transition, done.alert)
            except Exception:  # noqa: BLE001 - the live stream's fault must not undo a transition
                self._fault("publishing to the live stream")

    # -- plumbing ---------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self.db_url,
                autocommit=True,
                application_name="campus-alerts",
                connect_timeout=self.DB_CONNECT_TIMEOUT_S,
                options=session_options(self.db_url, _LIMITS),
            )
        return self._conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _fault(self, what: str) -> None:
        """Count a fault; log it with its traceback, at most ``LOG_PER_MINUTE`` a minute."""
        self.metrics.alerts_errors.inc()
        start, n = self._log_window
        now = time.monotonic()
        if now - start > 60:
            start, n = now, 0
        if n < self.LOG_PER_MINUTE:
            log.warning("alert engine: %s failed", what, exc_info=True)
        self._log_window = (start, n + 1)
