"""Storage upkeep the database does not do by itself.

Plain PostgreSQL: daily partitions made ahead of now and dropped after retention. Both backends:
the rollup tables refreshed for the days touched since the last pass (TimescaleDB runs its own
compression, retention and continuous-aggregate jobs). The SQL lives in the migrations
(``campus_ensure_partitions``, ``campus_drop_partitions``, ``campus_refresh_touched``).

Each step waits at most ``LOCK_TIMEOUT`` for its locks. Creating or dropping a partition needs
an exclusive lock on the table, and a DDL statement waiting in the lock queue holds up every
lock asked for after it, the ingest writer's included: behind a long reader, ingest would stop.
So a step that cannot take its locks in time gives up (logged, counted in
``campus_ingest_maintenance_lock_retries_total``) and the pass tries again ``RETRY_S`` later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from ingest_server.metrics import IngestMetrics
from ingest_server.storage.migrate import LOCK_KEY

log = logging.getLogger(__name__)

PARTITIONED: Final = ("events", "readings")
#: Longest a maintenance step waits for a lock (ingest may wait this long behind it, once).
LOCK_TIMEOUT: Final = "1s"
#: Seconds until a pass that gave up on a lock is tried again.
RETRY_S: Final = 30.0
#: Held while maintaining, so servers sharing a database take turns (migrations' key + 1).
MAINTENANCE_LOCK: Final = LOCK_KEY + 1


@dataclass(frozen=True, slots=True)
class MaintenanceResult:
    created: int = 0
    dropped: int = 0
    days_refreshed: int = 0
    #: False when another server held the maintenance lock and this pass did nothing.
    ran: bool = True
    #: Steps that gave up waiting for a lock (``partitions:events``, ``rollups``): next pass.
    busy: tuple[str, ...] = ()


def is_timescale(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb')"
    ).fetchone()
    return bool(row and row[0])


def maintain(
    conn: psycopg.Connection[Any],
    lock_timeout: str = LOCK_TIMEOUT,
    on_busy: Callable[[str], None] | None = None,
) -> MaintenanceResult:
    """One pass over a migrated database (autocommit connection).

    A step whose locks are not granted within ``lock_timeout`` is rolled back, named in the
    result's ``busy`` and reported to ``on_busy``; the other steps still run.
    """
    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (MAINTENANCE_LOCK,)).fetchone()
    if not (got and got[0]):
        return MaintenanceResult(ran=False)
    busy: list[str] = []

    def step(name: str, query: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
                return conn.execute(query, params).fetchone()
        except psycopg.errors.LockNotAvailable:
            log.warning(
                "storage maintenance: %s waited %s for a lock and gave up (a long reader?); "
                "trying again in %.0f s",
                name,
                lock_timeout,
                RETRY_S,
            )
            busy.append(name)
            if on_busy is not None:
                on_busy(name)
            return None

    try:
        created = dropped = 0
        if not is_timescale(conn):
            for table in PARTITIONED:
                row = step(
                    f"partitions:{table}",
                    "SELECT campus_ensure_partitions(%s, now(), now() + partitions_ahead"
                    " * interval '1 day'), campus_drop_partitions(%s, now() - retain_for)"
                    " FROM storage_config, storage_policy WHERE table_name = %s",
                    (table, table, table),
                )
                if row:
                    created += int(row[0] or 0)
                    dropped += int(row[1] or 0)
        row = step("rollups", "SELECT campus_refresh_touched()")
        return MaintenanceResult(created, dropped, int(row[0]) if row else 0, busy=tuple(busy))
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MAINTENANCE_LOCK,))


def set_policy(
    conn: psycopg.Connection[Any],
    table: str,
    *,
    compress_after: str | None,
    retain_for: str | None,
) -> None:
    """Change a table's compression and retention (intervals as text, None for never)."""
    if table not in PARTITIONED:
        raise ValueError(f"table must be one of {PARTITIONED}, got {table!r}")
    with conn.transaction():
        conn.execute(
            "UPDATE storage_policy SET compress_after = %s::interval, retain_for = %s::interval"
            " WHERE table_name = %s",
            (compress_after, retain_for, table),
        )
        if is_timescale(conn):
            conn.execute("SELECT remove_compression_policy(%s, if_exists => true)", (table,))
            conn.execute("SELECT remove_retention_policy(%s, if_exists => true)", (table,))
            if compress_after is not None:
                conn.execute(
                    "SELECT add_compression_policy(%s, %s::interval)", (table, compress_after)
                )
            if retain_for is not None:
                conn.execute("SELECT add_retention_policy(%s, %s::interval)", (table, retain_for))


class StorageMaintenance:
    """Runs :func:`maintain` at start and every ``interval_s`` on its own connection (sooner,
    ``RETRY_S``, after a pass that gave up on a lock)."""

    def __init__(
        self, db_url: str, interval_s: float = 300.0, metrics: IngestMetrics | None = None
    ) -> None:
        self.db_url = db_url
        self.interval_s = interval_s
        self.metrics = metrics
        #: Steps given up on a lock so far (also the metric, when there are metrics).
        self.lock_retries = 0
        self.last: MaintenanceResult | None = None
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="storage-maintenance", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _busy(self, step: str) -> None:
        self.lock_retries += 1
        if self.metrics is not None:
            self.metrics.maintenance_lock_retries.inc(step=step)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.interval_s
            try:
                with psycopg.connect(self.db_url, autocommit=True, connect_timeout=10) as conn:
                    if conn.execute("SELECT to_regclass('rollup_state')").fetchone() == (None,):
                        wait = min(wait, 2.0)  # not migrated yet: the consumer does that
                    else:
                        self.last = maintain(conn, on_busy=self._busy)
                        self.passes += 1
                        if self.last.busy:
                            wait = min(wait, RETRY_S)
            except psycopg.Error as exc:
                log.warning("storage maintenance failed: %s", str(exc).splitlines()[0])
                wait = min(wait, 10.0)
            self._stop.wait(wait)
