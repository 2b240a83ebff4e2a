"""The PGlite/TimescaleDB wire server: handshake, large messages, one session at a time."""

from __future__ import annotations

import os
import socket
import threading

import psycopg

from tests.timescale import TimescaleServer


def test_timescaledb_is_available(tsdb_url: str) -> None:
    with psycopg.connect(tsdb_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone()
        assert row is not None
        assert row[0].startswith("2.")
        conn.execute("CREATE EXTENSION timescaledb")
        conn.execute("CREATE TABLE m (time timestamptz NOT NULL, v int)")
        conn.execute("SELECT create_hypertable('m', by_range('time'))")
        conn.execute(
            "INSERT INTO m SELECT now() - i * interval '1 day', i FROM generate_series(1, 3) i"
        )
        chunks = conn.execute("SELECT count(*) FROM show_chunks('m')").fetchone()
        assert chunks is not None
        assert chunks[0] >= 1
        assert conn.execute("SELECT sum(v) FROM m").fetchone() == (6,)


def test_messages_over_64k_are_framed_whole(tsdb_url: str) -> None:
    big = "é" * 200_000  # 400 kB of UTF-8 in one Bind message, and again in one Query message
    with psycopg.connect(tsdb_url, autocommit=True) as conn:
        assert conn.execute("SELECT length(%s::text)", (big,)).fetchone() == (200_000,)
        assert conn.execute(f"SELECT length('{big}')").fetchone() == (200_000,)


def test_clients_are_served_one_at_a_time_with_a_clean_session(
    timescale_server: TimescaleServer, tsdb_url: str
) -> None:
    seen: list[object] = []

    def second_client() -> None:
        with psycopg.connect(tsdb_url, connect_timeout=30) as conn:
            seen.append(conn.execute("SELECT to_regclass('pg_temp.scratch')").fetchone())
            seen.append(
                conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()
            )
            seen.append(conn.execute("SELECT count(*) FROM kept").fetchone())

    first = psycopg.connect(tsdb_url, autocommit=True)
    first.execute("CREATE TABLE kept (a int)")
    first.execute("CREATE TEMP TABLE scratch (a int)")
    first.execute("SELECT pg_advisory_lock(42)")
    first.execute("BEGIN")
    first.execute("INSERT INTO kept VALUES (1)")  # never committed
    thread = threading.Thread(target=second_client)
    thread.start()
    first.execute("SELECT 1")
    # The second connection is queued: it cannot have run anything yet.
    assert not seen
    first.close()  # closes without committing
    thread.join(30)
    assert not thread.is_alive()
    assert seen == [(None,), (0,), (0,)]


def test_a_vanished_client_does_not_block_the_next(timescale_server: TimescaleServer) -> None:
    conn = psycopg.connect(timescale_server.url(), autocommit=True)
    conn.execute("BEGIN")
    conn.execute("SELECT pg_sleep(0.2)")
    try:
        # Gone without Terminate, mid-transaction: only the socket closes.
        socket.socket(fileno=os.dup(conn.pgconn.socket)).shutdown(socket.SHUT_RDWR)
        with psycopg.connect(timescale_server.url(), autocommit=True, connect_timeout=30) as other:
            # A transaction left open would have started before this statement.
            assert other.execute("SELECT now() = statement_timestamp()").fetchone() == (True,)
    finally:
        conn.close()
