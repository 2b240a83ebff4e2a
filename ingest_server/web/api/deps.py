"""What endpoints share: a pooled database connection, and errors that say what is down."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ingest_server.storage.db import SESSION_LIMITS, session_options

#: Seconds a request waits for a pooled connection before answering 503.
POOL_TIMEOUT_S = 5.0
#: Seconds the event loop may wait for a connection the pool had idle a moment before (another
#: thread may have taken it); past that the wait moves to a worker thread.
LOOP_WAIT_S = 0.0005

log = logging.getLogger(__name__)


def make_pool(db_url: str, max_size: int = 4) -> ConnectionPool[Any]:
    """A small pool for the API; opened without waiting, so a database that is down at start
    costs requests a clear 503, not the server its start."""
    pool: ConnectionPool[Any] = ConnectionPool(
        db_url,
        min_size=1,
        max_size=max_size,
        timeout=POOL_TIMEOUT_S,
        kwargs={
            "autocommit": True,
            "application_name": "campus-edge-api",
            # UTC, so every time an answer carries is written with `Z` whatever the server's
            # zone (times rendered by PostgreSQL, sqljson.iso_time, are UTC too)
            "options": session_options(db_url, {**SESSION_LIMITS, "TimeZone": "UTC"}),
        },
        open=False,
        name="api",
    )
    pool.open(wait=False)
    return pool


async def db(request: Request) -> AsyncIterator[psycopg.Connection[Any]]:
    """FastAPI dependency: a connection from the app's pool (autocommit).

    ``async``, so that taking an idle connection and giving it back cost no hop to a worker
    thread each (a plain generator costs two; on a loaded machine each hop waits for the OS
    to run the thread, the larger part of a small request's time). Only waiting for one, and
    giving back one left in a transaction (a rollback), run on a worker thread.
    """
    pool: ConnectionPool[Any] = request.app.state.pool
    idle = _idle_connection(pool)
    conn = idle if idle is not None else await run_in_threadpool(pool.getconn)
    try:
        yield conn
    finally:
        if conn.pgconn.transaction_status == TransactionStatus.IDLE:
            pool.putconn(conn)  # no I/O: back on the deque, or handed to a waiting request
        else:
            await run_in_threadpool(pool.putconn, conn)


def _idle_connection(pool: ConnectionPool[Any]) -> psycopg.Connection[Any] | None:
    """A connection the pool has idle, taken without I/O; None if there is none at once."""
    if pool.get_stats().get("pool_available", 0) == 0:
        return None
    try:
        conn: psycopg.Connection[Any] = pool.getconn(LOOP_WAIT_S)
    except PoolTimeout:  # another thread took it meanwhile
        return None
    return conn


def validation_detail(where: str, message: str) -> list[dict[str, Any]]:
    """A 422's ``detail`` in FastAPI's own shape, so clients and the published OpenAPI schema
    (``HTTPValidationError``) read every refused request the same way."""
    return [{"type": "value_error", "loc": [where], "msg": message, "input": None}]


def install_error_handlers(app: FastAPI) -> None:
    """The database being down or not yet migrated is a 503 with a reason, never a 500."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # a 422 raised with a sentence becomes FastAPI's own 422 shape (HTTPValidationError),
        # the one the published schema promises for every endpoint
        if exc.status_code == 422 and isinstance(exc.detail, str):
            body = {"detail": validation_detail("request", exc.detail)}
            return JSONResponse(body, 422, headers=exc.headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(PoolTimeout)
    async def pool_timeout(_request: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("API: no database connection: %s", exc)
        return JSONResponse({"detail": "the database is not reachable right now"}, 503)

    @app.exception_handler(psycopg.errors.UndefinedColumn)
    @app.exception_handler(psycopg.errors.UndefinedTable)
    async def not_migrated(_request: Request, exc: psycopg.Error) -> JSONResponse:
        log.warning("API: %s", exc)
        return JSONResponse(
            {"detail": "the database schema is not ready yet (migrations pending)"}, 503
        )

    @app.exception_handler(psycopg.errors.QueryCanceled)
    @app.exception_handler(psycopg.errors.LockNotAvailable)
    async def too_slow(_request: Request, exc: psycopg.Error) -> JSONResponse:
        log.warning("API: query stopped: %s", str(exc).splitlines()[0])
        return JSONResponse(
            {"detail": "the database is busy: this query ran into a time limit; try again"},
            503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(psycopg.DataError)
    async def refused_value(_request: Request, exc: psycopg.DataError) -> JSONResponse:
        # the last line of defence: a value the database cannot store is the client's fault
        why = exc.diag.message_primary or "a value the database cannot store"
        detail = f"the request holds a value the database refuses: {why}"
        return JSONResponse({"detail": validation_detail("body", detail)}, 422)

    @app.exception_handler(psycopg.OperationalError)
    async def db_down(_request: Request, exc: psycopg.Error) -> JSONResponse:
        log.warning("API: database error: %s", exc)
        return JSONResponse({"detail": "the database is not reachable right now"}, 503)
