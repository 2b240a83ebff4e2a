"""``/api/v1/events``, ``/api/v1/readings``: time-range listings, keyset paged.

Pages are ordered by ``(time, device_id, seq)`` (readings: ``(time, device_id, metric)``) and a
cursor holds the last key of a page, so rows stored meanwhile never shift a page: a row is
neither repeated nor skipped, and one that arrives late with an earlier ``time`` than the cursor
is seen by the next query over its range, not by this walk.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Final, LiteralString

from fastapi import APIRouter, Query, Request, Response
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from ingest_server.web.api import access, auth, sqljson
from ingest_server.web.api.common import (
    NAME_PATTERN,
    Conn,
    CursorQ,
    DeviceQ,
    FromQ,
    LimitQ,
    SchoolQ,
    ToQ,
    decode_cursor,
    encode_cursor,
    encoded,
    next_link,
    time_range,
)

router = APIRouter(prefix="/api/v1", tags=["data"], dependencies=[access.GUARD])

TypeQ = Annotated[str | None, Query(pattern=NAME_PATTERN, description="event type, e.g. card.tap")]
ReplayQ = Annotated[
    bool | None,
    Query(
        description="true: only backlog (sent with the uplink's `replay: true` after an outage);"
        " false: only live data"
    ),
]
MetricQ = Annotated[
    str | None, Query(pattern=NAME_PATTERN, description="metric, e.g. temperature_c")
]


class Event(BaseModel):
    time: datetime
    school_id: str
    device_id: str
    device_kind: str
    seq: int
    type: str
    data: dict[str, Any]
    received_at: datetime
    synced: bool
    replay: bool = Field(description="backlog an agent sent after an outage, not live data")


class Reading(BaseModel):
    time: datetime
    school_id: str
    device_id: str
    metric: str
    value: float | None = Field(description="null if the stored value is not finite")


class EventPage(BaseModel):
    items: list[Event]
    next: str | None = Field(description="URL of the next page; null on the last")
    cursor: str | None = Field(description="the cursor in `next`")


class ReadingPage(BaseModel):
    items: list[Reading]
    next: str | None
    cursor: str | None


EVENT_COLUMNS: Final = (
    "time, school_id, device_id, device_kind, seq, type, data, received_at, synced, replay"
)
READING_COLUMNS: Final = "time, school_id, device_id, metric, value"


def where(
    start: datetime,
    end: datetime,
    filters: dict[str, str | bool | None],
    principal: auth.Principal,
) -> tuple[sql.Composed, list[Any]]:
    """``time`` in ``[start, end)``, ``school_id`` within the principal's schools and each given
    column equal to its value."""
    scoped, scope_params = principal.sql_school_filter("school_id")
    parts: list[sql.Composable] = [sql.SQL("time >= %s AND time < %s"), scoped]
    params: list[Any] = [start, end, *scope_params]
    for column, value in filters.items():
        if value is None:
            continue
        # A boolean (replay) as IS NOT DISTINCT FROM, the same rows for a NOT NULL column:
        # TimescaleDB (2.23) fails `bool_col = x` on a chunk compressed before the column was
        # added ("unexpected column type 'boolean'", its vectorised filter); this form it does
        # not vectorise. (tests/integration/test_storage.py, the replay migration test.)
        op = "{} IS NOT DISTINCT FROM %s" if isinstance(value, bool) else "{} = %s"
        parts.append(sql.SQL(op).format(sql.Identifier(column)))
        params.append(value)
    return sql.SQL(" AND ").join(parts), params


def _page(
    conn: Conn,
    *,
    table: LiteralString,
    columns: LiteralString,
    key: tuple[str, str, str],
    cond: sql.Composed,
    params: list[Any],
    after: tuple[Any, ...] | None,
    limit: int,
) -> tuple[list[dict[str, Any]], tuple[Any, ...] | None]:
    """One page ordered by ``key``, and the key of its last row if more follow."""
    k = sql.SQL(", ").join(map(sql.Identifier, key))
    if after is not None:
        # The leading `time >=` lets the time index bound the scan; the row comparison is exact.
        cond = sql.SQL("{} AND time >= %s AND ({}) > (%s, %s, %s)").format(cond, k)
        params = [*params, after[0], *after]
    query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT %s").format(
        sql.SQL(columns), sql.Identifier(table), cond, k
    )
    rows = conn.cursor(row_factory=dict_row).execute(query, [*params, limit + 1]).fetchall()
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last = rows[-1]
    return rows, tuple(last[c] for c in key)


_EVENT_LINE: Final = sqljson.object_sql(Event)


def _event_page(
    conn: Conn,
    cond: sql.Composed,
    params: list[Any],
    after: tuple[Any, ...] | None,
    limit: int,
) -> tuple[list[bytes], tuple[Any, ...] | None]:
    """One page of events, each row its JSON text rendered by PostgreSQL (:mod:`sqljson`;
    ``data`` spliced as stored, numbers as the device wrote them), and the key of its last
    row if more follow. Python neither parses nor encodes a
    row: only that one key comes back typed, for the cursor."""
    if after is not None:
        # The leading `time >=` lets the time index bound the scan; the row comparison is exact.
        cond = sql.SQL("{} AND time >= %s AND (time, device_id, seq) > (%s, %s, %s)").format(cond)
        params = [*params, after[0], *after]
    query = sql.SQL(
        "SELECT {line}, time, device_id, seq FROM"
        " (SELECT {columns} FROM events WHERE {cond} ORDER BY time, device_id, seq LIMIT %s) e"
        " ORDER BY time, device_id, seq"
    ).format(line=_EVENT_LINE, columns=sql.SQL(EVENT_COLUMNS), cond=cond)
    cur = conn.execute(query, [*params, limit + 1], binary=True)
    items, n = sqljson.lines(cur, limit)
    if n <= limit:
        return items, None
    cur.scroll(limit - 1, "absolute")  # only the last row's key is loaded, for the cursor
    row = cur.fetchone()
    assert row is not None
    return items, tuple(row[1:])


@router.get("/events", summary="Events in a time range, keyset paged", response_model=EventPage)
def list_events(
    request: Request,
    conn: Conn,
    principal: access.Caller,
    *,
    start: FromQ = None,
    end: ToQ = None,
    school: SchoolQ = None,
    device: DeviceQ = None,
    type: TypeQ = None,
    replay: ReplayQ = None,
    limit: LimitQ = 100,
    cursor: CursorQ = None,
) -> Response:
    r = time_range(start, end)
    after = None if cursor is None else decode_cursor(cursor, "events", (datetime, str, int))
    filters: dict[str, str | bool | None] = {
        "school_id": school,
        "device_id": device,
        "type": type,
        "replay": replay,
    }
    cond, params = where(r.start, r.end, filters, principal)
    items, last = _event_page(conn, cond, params, after, limit)
    token = None if last is None else encode_cursor("events", last)
    # the page's JSON value is EventPage's (tests/integration/test_api_data.py compares them)
    tail = json.dumps({"next": next_link(request, token), "cursor": token}, separators=(",", ":"))
    body = sqljson.wrapped(b'{"items":[', items, b"]," + tail[1:].encode())
    return Response(body, media_type="application/json")


@router.get(
    "/readings",
    summary="Numeric readings in a time range, keyset paged",
    response_model=ReadingPage,
)
def list_readings(
    request: Request,
    conn: Conn,
    principal: access.Caller,
    *,
    start: FromQ = None,
    end: ToQ = None,
    school: SchoolQ = None,
    device: DeviceQ = None,
    metric: MetricQ = None,
    limit: LimitQ = 100,
    cursor: CursorQ = None,
) -> Response:
    r = time_range(start, end)
    after = None if cursor is None else decode_cursor(cursor, "readings", (datetime, str, str))
    filters: dict[str, str | bool | None] = {
        "school_id": school,
        "device_id": device,
        "metric": metric,
    }
    cond, params = where(r.start, r.end, filters, principal)
    rows, last = _page(
        conn,
        table="readings",
        columns=READING_COLUMNS,
        key=("time", "device_id", "metric"),
        cond=cond,
        params=params,
        after=after,
        limit=limit,
    )
    token = None if last is None else encode_cursor("readings", last)
    return encoded({"items": rows, "next": next_link(request, token), "cursor": token})
