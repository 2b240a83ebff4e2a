"""The long-lived database sessions the server's worker threads hold."""

from __future__ import annotations

from typing import Any

import psycopg

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
