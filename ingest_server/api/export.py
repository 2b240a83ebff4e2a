"""``/api/v1/export/{events,readings}.{csv,ndjson}``: a whole range, streamed.

A named (server-side) cursor inside a transaction hands out ``CHUNK_ROWS`` rows at a time, so
the server's memory stays flat whatever the range. ``data`` leaves PostgreSQL as text and goes
out as it is: as one JSON-string column in CSV, spliced verbatim into each NDJSON line.
At most ``EXPORT_SLOTS`` exports run at once (each holds a pooled connection); more get 429.
"""

from __future__ import annotations

import csv
import io
import json
import math
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
Render = Callable[[list[tuple[Any, ...]]], str]
_READING_HEADER: Final = ("time", "school_id", "device_id", "metric", "value")
_EVENT_SELECT: Final = (
    "SELECT time, school_id, device_id, device_kind, seq, type, data::text, received_at, synced"
    " FROM events WHERE {} ORDER BY time, device_id, seq"
)
_READING_SELECT: Final = (
    "SELECT time, school_id, device_id, metric, value FROM readings WHERE {}"
    " ORDER BY time, device_id, metric"
)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


def _float(v: float) -> str:
    return repr(v) if math.isfinite(v) else ""


def _csv_events(rows: list[tuple[Any, ...]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerows(
        (_iso(t), s, d, k, q, ty, data, _iso(rec), "true" if syn else "false")
        for t, s, d, k, q, ty, data, rec, syn in rows
    )
    return out.getvalue()


def _ndjson_events(rows: list[tuple[Any, ...]]) -> str:
    dumps = json.dumps
    return "".join(
        f'{{"time":"{_iso(t)}","school_id":{dumps(s)},"device_id":{dumps(d)},'
        f'"device_kind":{dumps(k)},"seq":{q},"type":{dumps(ty)},"data":{data},'
        f'"received_at":"{_iso(rec)}","synced":{"true" if syn else "false"}}}\n'
        for t, s, d, k, q, ty, data, rec, syn in rows
    )


def _csv_readings(rows: list[tuple[Any, ...]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerows((_iso(t), s, d, m, _float(v)) for t, s, d, m, v in rows)
    return out.getvalue()


def _ndjson_readings(rows: list[tuple[Any, ...]]) -> str:
    dumps = json.dumps
    return "".join(
        f'{{"time":"{_iso(t)}","school_id":{dumps(s)},"device_id":{dumps(d)},'
        f'"metric":{dumps(m)},"value":{_float(v) or "null"}}}\n'
        for t, s, d, m, v in rows
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
        with (
            pool.connection() as conn,
            conn.transaction(),
            conn.cursor(name="campus_export") as cur,
        ):
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
    renderers: tuple[Render, Render],
    span: tuple[datetime, datetime],
) -> StreamingResponse:
    if not _slots.acquire(blocking=False):
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"{EXPORT_SLOTS} exports are running already; try again when one has finished",
            headers={"Retry-After": "10"},
        )
    first = ",".join(header) + "\n" if fmt == "csv" else ""
    render = renderers[0] if fmt == "csv" else renderers[1]
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
    query = sql.SQL(_EVENT_SELECT).format(cond)
    span = (r.start.astimezone(UTC), r.end.astimezone(UTC))
    renderers = (_csv_events, _ndjson_events)
    return _respond(
        request,
        what="events",
        fmt=fmt,
        query=query,
        params=params,
        header=_EVENT_HEADER,
        renderers=renderers,
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
    query = sql.SQL(_READING_SELECT).format(cond)
    span = (r.start.astimezone(UTC), r.end.astimezone(UTC))
    renderers = (_csv_readings, _ndjson_readings)
    return _respond(
        request,
        what="readings",
        fmt=fmt,
        query=query,
        params=params,
        header=_READING_HEADER,
        renderers=renderers,
        span=span,
    )
