"""Versioned schema migrations (``migrations/NNNN_name.sql``), applied under an advisory lock.

Each file runs once, in its own transaction, and is recorded in ``schema_migrations``; servers
starting together wait for each other on the lock, so running this any number of times is safe.
A version may instead ship one file per backend, ``NNNN_name.timescaledb.sql`` and
``NNNN_name.postgres.sql``: the first runs where the ``timescaledb`` extension is available.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import psycopg

log = logging.getLogger(__name__)

#: Key of the session advisory lock held while migrating (any fixed bigint; "campus\0\1").
LOCK_KEY: Final = 0x63616D7075730001
#: Longest a migration waits for a table lock. A server may migrate while others serve (a rolling
#: upgrade): DDL queued behind a long reader would hold up every writer behind it. Giving up
#: fails this connection attempt, which the consumer retries with its backoff.
MIGRATION_LOCK_TIMEOUT: Final = "5s"
_FILE_RE: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)(?:\.(timescaledb|postgres))?\.sql$")
#: Backends a migration file may be specific to.
BACKENDS: Final = ("timescaledb", "postgres")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available(backend: str = "postgres") -> list[Migration]:
    """The migrations shipped with this package for ``backend``, in version order."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    found = []
    for entry in (resources.files(__package__) / "migrations").iterdir():
        if (m := _FILE_RE.match(entry.name)) and m[3] in (None, backend):
            found.append(Migration(int(m[1]), m[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a version: {versions}")
    return found


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply every pending migration; return the versions applied now (empty when up to date)."""
    if not conn.autocommit:
        conn.commit()
        conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
        applied = []
        for mig in available(backend(conn)):
            if mig.version in done:
                if done[mig.version] != mig.checksum:
                    log.warning(
                        "migration %04d_%s changed after it was applied; not re-running it",
                        mig.version,
                        mig.name,
                    )
                continue
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('lock_timeout', %s, true)", (MIGRATION_LOCK_TIMEOUT,)
                )
                conn.execute(mig.sql.encode())
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (mig.version, mig.name, mig.checksum),
                )
            log.info("applied migration %04d_%s", mig.version, mig.name)
            applied.append(mig.version)
        return applied
    finally:
        if not conn.closed and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def backend(conn: psycopg.Connection[Any]) -> str:
    """``timescaledb`` where that extension is installed or can be, else ``postgres``."""
    row = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'timescaledb')"
    ).fetchone()
    return "timescaledb" if row and row[0] else "postgres"


def migrate_url(conninfo: str) -> list[int]:
    """Connect, migrate, disconnect."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return migrate(conn)
