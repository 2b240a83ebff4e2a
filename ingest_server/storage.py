"""Storage upkeep the database does not do by itself.

Plain PostgreSQL: daily partitions made ahead of now and dropped after retention. Both backends:
the rollup tables refreshed for the days touched since the last pass (TimescaleDB runs its own
compression, retention and continuous-aggregate jobs). The SQL lives in the migrations
(``campus_ensure_partitions``, ``campus_drop_partitions``, ``campus_refresh_touched``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from ingest_server.migrate import LOCK_KEY

log = logging.getLogger(__name__)

PARTITIONED: Final = ("events", "readings")
#: Held while maintaining, so servers sharing a database take turns (migrations' key + 1).
MAINTENANCE_LOCK: Final = LOCK_KEY + 1


@dataclass(frozen=True, slots=True)
class MaintenanceResult:
    created: int = 0
    dropped: int = 0
    days_refreshed: int = 0
    #: False when another server held the maintenance lock and this pass did nothing.
    ran: bool = True


def is_timescale(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb')"
    ).fetchone()
    return bool(row and row[0])


def maintain(conn: psycopg.Connection[Any]) -> MaintenanceResult:
    """One pass over a migrated database (autocommit connection)."""
    got = conn.execute("SELECT pg_try_advisory_lock(%s)", (MAINTENANCE_LOCK,)).fetchone()
    if not (got and got[0]):
        return MaintenanceResult(ran=False)
    try:
        created = dropped = 0
        if not is_timescale(conn):
            for table in PARTITIONED:
                with conn.transaction():
                    row = conn.execute(
                        "SELECT campus_ensure_partitions(%s, now(), now() + partitions_ahead"
                        " * interval '1 day'), campus_drop_partitions(%s, now() - retain_for)"
                        " FROM storage_config, storage_policy WHERE table_name = %s",
                        (table, table, table),
                    ).fetchone()
                if row:
                    created += int(row[0] or 0)
                    dropped += int(row[1] or 0)
        with conn.transaction():
            row = conn.execute("SELECT campus_refresh_touched()").fetchone()
        return MaintenanceResult(created, dropped, int(row[0]) if row else 0)
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
    """Runs :func:`maintain` at start and every ``interval_s`` on its own connection."""

    def __init__(self, db_url: str, interval_s: float = 300.0) -> None:
        self.db_url = db_url
        self.interval_s = interval_s
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

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.interval_s
            try:
                with psycopg.connect(self.db_url, autocommit=True, connect_timeout=10) as conn:
                    if conn.execute("SELECT to_regclass('rollup_state')").fetchone() == (None,):
                        wait = min(wait, 2.0)  # not migrated yet: the consumer does that
                    else:
                        self.last = maintain(conn)
                        self.passes += 1
            except psycopg.Error as exc:
                log.warning("storage maintenance failed: %s", str(exc).splitlines()[0])
                wait = min(wait, 10.0)
            self._stop.wait(wait)
