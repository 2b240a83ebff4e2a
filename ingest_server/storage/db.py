"""The long-lived database sessions the server's worker threads hold."""

from __future__ import annotations

from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ingest_server.storage.migrate import migrate


def connect_session(
    db_url: str, *, application_name: str, connect_timeout: int, migrate_first: bool
) -> psycopg.Connection[Any]:
    """An autocommit session that notices a vanished database host; migrated first if asked.

    Raises :class:`psycopg.Error` when the database cannot be reached or migrated; nothing is
    left open then.
    """
    conn = psycopg.connect(
        db_url,
        autocommit=True,
        connect_timeout=connect_timeout,
        application_name=application_name,
        # notice a database host that vanished from the network within ~25 s
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )
    if migrate_first:
        try:
            migrate(conn)
        except BaseException:
            conn.close()
            raise
    return conn


#: Server-side limits of every API session (and the alert engine's), so no request (or client
#: gone quiet) can hold a database resource that ingest or maintenance waits on. An export page
#: (``CHUNK_ROWS`` rows on the time index) takes milliseconds; the slowest rollup under a second.
SESSION_LIMITS: Final[dict[str, str]] = {
    "statement_timeout": "30s",
    "lock_timeout": "5s",
    "idle_in_transaction_session_timeout": "15s",
}


def session_options(db_url: str, limits: dict[str, str] = SESSION_LIMITS) -> str:
    """The libpq ``options`` for ``db_url`` with ``limits`` appended (the URL's own kept)."""
    own = conninfo_to_dict(db_url).get("options") or ""
    ours = " ".join(f"-c {name}={value}" for name, value in limits.items())
    return f"{own} {ours}".strip()
