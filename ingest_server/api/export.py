"""``/api/v1/export/{events,readings}.{csv,ndjson}``: a whole range, streamed.

A named (server-side) cursor inside a transaction hands out ``CHUNK_ROWS`` rows at a time, so
the server's memory stays flat whatever the range. PostgreSQL renders each row as text (an
NDJSON line, or CSV fields with ``data`` as one JSON-string column); Python only quotes CSV.
At most ``EXPORT_SLOTS`` exports run at once (each holds a pooled connection); more get 429.
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Final, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import StreamingResponse
from psycopg import sql
from psycopg_pool import ConnectionPool

from ingest_server.api import auth
from ingest_server.api.common import (
    MAX_EXPORT_SPAN,
    DeviceQ,
    FromQ,
    SchoolQ,
    ToQ,
    time_range,
)
from ingest_server.api.data import MetricQ, TypeQ, where

router = APIRouter(
    prefix="/api/v1/export", tags=["export"], dependencies=[Depends(auth.require("read"))]
)

CHUNK_ROWS: Final = 5000
EXPORT_SLOTS: Final = 2
_slots = threading.BoundedSemaphore(EXPORT_SLOTS)

Format = Literal["csv", "ndjson"]
_MEDIA: Final = {"csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}
_EVENT_HEADER: Final = (
    "time",
    "school_id",
    "device_id",
    "device_kind",
    "seq",
    "type",
    "data",
    "received_at",
    "synced",
)
_READING_HEADER: Final = ("time", "school_id", "device_id", "metric", "value")
_ORDER: Final = {"events": "time, device_id, seq", "readings": "time, device_id, metric"}
# PostgreSQL renders each row (its JSON and ISO 8601 output are C, and several times faster
# than formatting datetimes and JSON here); with TimeZone UTC every time ends in +00:00.
_FINITE: Final = "CASE WHEN value IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE value END"
_SELECT: Final[dict[tuple[str, str], str]] = {
    ("events", "csv"): "to_json(time) #>> '{}', school_id, device_id, device_kind, seq, type,"
    " data::text, to_json(received_at) #>> '{}', synced::text",
    ("events", "ndjson"): "json_build_object('time', time, 'school_id', school_id,"
    " 'device_id', device_id, 'device_kind', device_kind, 'seq', seq, 'type', type,"
    " 'data', data, 'received_at', received_at, 'synced', synced)::text",
    ("readings", "csv"): f"to_json(time) #>> '{{}}', school_id, device_id, metric, {_FINITE}",
    ("readings", "ndjson"): "json_build_object('time', time, 'school_id', school_id,"
    f" 'device_id', device_id, 'metric', metric, 'value', {_FINITE})::text",
}


def _csv(rows: list[tuple[Any, ...]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def _ndjson(rows: list[tuple[Any, ...]]) -> str:
    return "".join([r[0] + "\n" for r in rows])


Render = Callable[[list[tuple[Any, ...]]], str]


def export_query(what: str, fmt: str, cond: sql.Composable) -> sql.Composed:
    """The SELECT that renders ``what`` rows matching ``cond`` in ``fmt``, in export order."""
    return sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}").format(
        sql.SQL(_SELECT[what, fmt]),
        sql.Identifier(what),
        cond,
        sql.SQL(_ORDER[what]),
    )


def stream_rows(
    pool: ConnectionPool[Any],
    query: sql.Composable,
    params: list[Any],
    header: str,
    render: Render,
) -> Iterator[bytes]:
    """Header, then the rendered rows chunk by chunk; releases the export slot at the end."""
    try:
        if header:
            yield header.encode()
        with pool.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL TimeZone = 'UTC'")
            with conn.cursor(name="campus_export") as cur:
                cur.itersize = CHUNK_ROWS
                cur.execute(query, params)
                while rows := cur.fetchmany(CHUNK_ROWS):
                    yield render(rows).encode()
    finally:
        _slots.release()


def _respond(
    request: Request,
    *,
    what: str,
    fmt: Format,
    query: sql.Composable,
    params: list[Any],
    header: tuple[str, ...],
    span: tuple[datetime, datetime],
) -> StreamingResponse:
    if not _slots.acquire(blocking=False):
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"{EXPORT_SLOTS} exports are running already; try again when one has finished",
            headers={"Retry-After": "10"},
        )
    first = ",".join(header) + "\n" if fmt == "csv" else ""
    render = _csv if fmt == "csv" else _ndjson
    stamp = f"{span[0]:%Y%m%dT%H%M%SZ}-{span[1]:%Y%m%dT%H%M%SZ}"
    body = stream_rows(request.app.state.pool, query, params, first, render)
    return StreamingResponse(
        body,
        media_type=_MEDIA[fmt],
        headers={"Content-Disposition": f'attachment; filename="{what}-{stamp}.{fmt}"'},
    )


_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {"content": {_MEDIA["csv"]: {}, _MEDIA["ndjson"]: {}}, "description": "the rows"},
    429: {"description": "too many exports at once"},
}


@router.get(
    "/events.{fmt}",
    summary="All events of a range as CSV or NDJSON, streamed",
    response_class=StreamingResponse,
    responses=_RESPONSES,
)
def export_events(
    request: Request,
    fmt: Format,
    *,
    start: FromQ = None,
    end: ToQ = None,
    school: SchoolQ = None,
    device: DeviceQ = None,
    type: TypeQ = None,
) -> StreamingResponse:
    r = time_range(start, end, MAX_EXPORT_SPAN)
    cond, params = where(r.start, r.end, {"school_id": school, "device_id": device, "type": type})
    query = export_query("events", fmt, cond)
    span = (r.start.astimezone(UTC), r.end.astimezone(UTC))
    return _respond(
        request,
        what="events",
        fmt=fmt,
        query=query,
        params=params,
        header=_EVENT_HEADER,
        span=span,
    )


@router.get(
    "/readings.{fmt}",
    summary="All readings of a range as CSV or NDJSON, streamed",
    response_class=StreamingResponse,
    responses=_RESPONSES,
)
def export_readings(
    request: Request,
    fmt: Format,
    *,
    start: FromQ = None,
    end: ToQ = None,
    school: SchoolQ = None,
    device: DeviceQ = None,
    metric: MetricQ = None,
) -> StreamingResponse:
    r = time_range(start, end, MAX_EXPORT_SPAN)
    cond, params = where(
        r.start, r.end, {"school_id": school, "device_id": device, "metric": metric}
    )
    query = export_query("readings", fmt, cond)
    span = (r.start.astimezone(UTC), r.end.astimezone(UTC))
    return _respond(
        request,
        what="readings",
        fmt=fmt,
        query=query,
        params=params,
        header=_READING_HEADER,
        span=span,
    )
