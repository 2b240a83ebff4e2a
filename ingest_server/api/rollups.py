"""``/api/v1/rollups/*``: one endpoint per rollup relation, filtered by school, range and key.

The relations (continuous aggregates on TimescaleDB, materialised views on plain PostgreSQL)
keep their names and columns on both; these queries only read them.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Final, Generic, LiteralString, TypeVar

from fastapi import APIRouter, Depends, Query, Response
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from ingest_server.api import auth
from ingest_server.api.common import (
    ID_PATTERN,
    NAME_PATTERN,
    Conn,
    DeviceQ,
    FromDayQ,
    FromQ,
    SchoolQ,
    ToDayQ,
    ToQ,
    day_range,
    reply,
    time_range,
)

router = APIRouter(
    prefix="/api/v1/rollups", tags=["rollups"], dependencies=[Depends(auth.require("read"))]
)

#: A rollup answer holds at most this many rows; ``truncated`` says when there were more.
MAX_ROWS: Final = 10_000
ClassQ = Annotated[str | None, Query(alias="class", pattern=ID_PATTERN, description="class id")]
GradeQ = Annotated[str | None, Query(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_ -]+$")]


class CardTaps(BaseModel):
    day: date
    school_id: str
    device_id: str
    taps: int


class Attendance(BaseModel):
    day: date
    school_id: str
    class_id: str | None
    checkins: int
    on_time: int
    late: int
    outside_period: int


class BoardPower(BaseModel):
    day: date
    school_id: str
    device_id: str
    on_minutes: float | None


class BoardInput(BaseModel):
    day: date
    school_id: str
    device_id: str
    source: str | None
    minutes: float | None


class Env5Min(BaseModel):
    bucket: datetime
    school_id: str
    device_id: str
    metric: str
    avg: float | None
    min: float | None
    max: float | None
    samples: int


class DeviceOnline(BaseModel):
    day: date
    school_id: str
    device_id: str
    online_minutes: float | None


class Library(BaseModel):
    day: date
    school_id: str
    grade: str | None
    loans: int
    returns: int


class LibraryItem(BaseModel):
    school_id: str
    item_id: str
    loans: int
    last_loan: datetime | None


T = TypeVar("T", bound=BaseModel)


class Rollup(BaseModel, Generic[T]):
    items: list[T]
    truncated: bool = Field(description=f"more than {MAX_ROWS} rows matched; narrow the query")


def _fetch(
    conn: Conn,
    relation: LiteralString,
    columns: LiteralString,
    order: LiteralString,
    conds: list[tuple[LiteralString, Any]],
) -> tuple[list[dict[str, Any]], bool]:
    where = [sql.SQL(c) for c, v in conds if v is not None] or [sql.SQL("true")]
    params = [v for _, v in conds if v is not None]
    query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT %s").format(
        sql.SQL(columns), sql.Identifier(relation), sql.SQL(" AND ").join(where), sql.SQL(order)
    )
    rows = conn.cursor(row_factory=dict_row).execute(query, [*params, MAX_ROWS + 1]).fetchall()
    return rows[:MAX_ROWS], len(rows) > MAX_ROWS


def _days(
    school: str | None, start: date | None, end: date | None
) -> list[tuple[LiteralString, Any]]:
    first, last = day_range(start, end)
    return [("school_id = %s", school), ("day >= %s", first), ("day <= %s", last)]


@router.get(
    "/card-taps",
    summary="Card taps per reader and day (card_taps_daily)",
    response_model=Rollup[CardTaps],
)
def card_taps(
    conn: Conn,
    *,
    school: SchoolQ = None,
    start: FromDayQ = None,
    end: ToDayQ = None,
    device: DeviceQ = None,
) -> Response:
    conds = [*_days(school, start, end), ("device_id = %s", device)]
    rows, more = _fetch(
        conn,
        "card_taps_daily",
        "day, school_id, device_id, taps",
        "day, school_id, device_id",
        conds,
    )
    return reply(Rollup[CardTaps], {"items": rows, "truncated": more})


@router.get(
    "/attendance",
    summary="Check-ins per class and day (attendance_daily)",
    response_model=Rollup[Attendance],
)
def attendance(
    conn: Conn,
    *,
    school: SchoolQ = None,
    start: FromDayQ = None,
    end: ToDayQ = None,
    class_id: ClassQ = None,
) -> Response:
    conds = [*_days(school, start, end), ("class_id = %s", class_id)]
    rows, more = _fetch(
        conn,
        "attendance_daily",
        "day, school_id, class_id, checkins, on_time, late, outside_period",
        "day, school_id, class_id",
        conds,
    )
    return reply(Rollup[Attendance], {"items": rows, "truncated": more})


@router.get(
    "/board-power",
    summary="Minutes each smart board was on, per day",
    response_model=Rollup[BoardPower],
)
def board_power(
    conn: Conn,
    *,
    school: SchoolQ = None,
    start: FromDayQ = None,
    end: ToDayQ = None,
    device: DeviceQ = None,
) -> Response:
    conds = [*_days(school, start, end), ("device_id = %s", device)]
    rows, more = _fetch(
        conn,
        "board_power_daily",
        "day, school_id, device_id, on_minutes",
        "day, school_id, device_id",
        conds,
    )
    return reply(Rollup[BoardPower], {"items": rows, "truncated": more})


@router.get(
    "/board-input",
    summary="Minutes per smart-board input source, per day",
    response_model=Rollup[BoardInput],
)
def board_input(
    conn: Conn,
    *,
    school: SchoolQ = None,
    start: FromDayQ = None,
    end: ToDayQ = None,
    device: DeviceQ = None,
) -> Response:
    conds = [*_days(school, start, end), ("device_id = %s", device)]
    rows, more = _fetch(
        conn,
        "board_input_daily",
        "day, school_id, device_id, source, minutes",
        "day, school_id, device_id, source",
        conds,
    )
    return reply(Rollup[BoardInput], {"items": rows, "truncated": more})


@router.get(
    "/env",
    summary="Environment readings in 5-minute buckets (env_5min)",
    response_model=Rollup[Env5Min],
)
def env(
    conn: Conn,
    *,
    school: SchoolQ = None,
    start: FromQ = None,
    end: ToQ = None,
    device: DeviceQ = None,
    metric: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
) -> Response:
    r = time_range(start, end)
    conds: list[tuple[LiteralString, Any]] = [
        ("school_id = %s", school),
        ("bucket >= %s", r.start),
        ("bucket < %s", r.end),
        ("device_id = %s", device),
        ("metric = %s", metric),
    ]
    rows, more = _fetch(
        conn,
        "env_5min",
        "bucket, school_id, device_id, metric, avg, min, max, samples",
        "bucket, school_id, device_id, metric",
        conds,
    )
    return reply(Rollup[Env5Min], {"items": rows, "truncated": more})


@router.get(
    "/device-online",
    summary="Minutes each device was online, per day",
    response_model=Rollup[DeviceOnline],
)
def device_online(
    conn: Conn,
    *,
    school: SchoolQ = None,
    start: FromDayQ = None,
    end: ToDayQ = None,
    device: DeviceQ = None,
) -> Response:
    conds = [*_days(school, start, end), ("device_id = %s", device)]
    rows, more = _fetch(
        conn,
        "device_online_daily",
        "day, school_id, device_id, online_minutes",
        "day, school_id, device_id",
        conds,
    )
    return reply(Rollup[DeviceOnline], {"items": rows, "truncated": more})


@router.get(
    "/library",
    summary="Library loans and returns per grade and day",
    response_model=Rollup[Library],
)
def library(
    conn: Conn,
    *,
    school: SchoolQ = None,
    start: FromDayQ = None,
    end: ToDayQ = None,
    grade: GradeQ = None,
) -> Response:
    conds = [*_days(school, start, end), ("grade::text = %s", grade)]
    rows, more = _fetch(
        conn,
        "library_daily",
        "day, school_id, grade::text AS grade, loans, returns",
        "day, school_id, grade",
        conds,
    )
    return reply(Rollup[Library], {"items": rows, "truncated": more})


@router.get(
    "/library-top-items",
    summary="The most borrowed library items",
    response_model=Rollup[LibraryItem],
)
def library_top_items(
    conn: Conn,
    *,
    school: SchoolQ = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> Response:
    query = sql.SQL(
        "SELECT school_id, item_id, loans, last_loan FROM library_top_items"
        " WHERE {} ORDER BY loans DESC, school_id, item_id LIMIT %s"
    ).format(sql.SQL("school_id = %s" if school is not None else "true"))
    params: list[Any] = [school] if school is not None else []
    rows = conn.cursor(row_factory=dict_row).execute(query, [*params, limit + 1]).fetchall()
    return reply(Rollup[LibraryItem], {"items": rows[:limit], "truncated": len(rows) > limit})
