"""``/api/v1/rollups/*``: one endpoint per rollup relation, filtered by school, range and key.

The relations (continuous aggregates on TimescaleDB, materialised views on plain PostgreSQL)
keep their names and columns on both; these queries only read them. Every range endpoint is the
same shape, so one table (:data:`ROLLUPS`) lists them and :func:`_route` makes each.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, Final, Generic, Literal, LiteralString, TypeVar

from fastapi import APIRouter, Query, Request, Response
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from ingest_server.web.api import access, answer_cache, auth, sqljson
from ingest_server.web.api.common import (
    NAME_PATTERN,
    Conn,
    DeviceQ,
    FromDayQ,
    FromQ,
    Now,
    SchoolQ,
    ToDayQ,
    ToQ,
    day_range,
    district_today,
    encoded,
    reply,
    time_range,
)
from schemas.topics import ID_PATTERN

JSON: Final = "application/json"
router = APIRouter(prefix="/api/v1/rollups", tags=["rollups"], dependencies=[access.GUARD])

#: A rollup answer holds at most this many rows; ``truncated`` says when there were more.
MAX_ROWS: Final = 10_000
ClassQ = Annotated[str | None, Query(alias="class", pattern=ID_PATTERN, description="class id")]
GradeQ = Annotated[str | None, Query(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_ -]+$")]
MetricQ = Annotated[str | None, Query(pattern=NAME_PATTERN)]


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


@dataclass(frozen=True, slots=True)
class Filter:
    """An optional query parameter that, when given, adds ``condition`` (one ``%s``)."""

    param: str
    annotation: Any
    condition: LiteralString


@dataclass(frozen=True, slots=True)
class RollupSpec:
    """One rollup endpoint: its relation, what it reads, and how a query narrows it."""

    name: str  # the route's name, hence its OpenAPI operationId
    path: str
    summary: str
    model: type[BaseModel]
    relation: LiteralString
    columns: LiteralString
    order: LiteralString
    #: ``day``: ``from``/``to`` are dates, both inclusive (district-local days); ``bucket``:
    #: times, ``to`` exclusive.
    range: Literal["day", "bucket"]
    filters: tuple[Filter, ...]


DEVICE: Final = Filter("device", DeviceQ, "device_id = %s")
ROLLUPS: Final = (
    RollupSpec(
        "card_taps", "/card-taps", "Card taps per reader and day (card_taps_daily)", CardTaps,
        "card_taps_daily", "day, school_id, device_id, taps", "day, school_id, device_id",
        "day", (DEVICE,),
    ),
    RollupSpec(
        "attendance", "/attendance", "Check-ins per class and day (attendance_daily)",
        Attendance, "attendance_daily",
        "day, school_id, class_id, checkins, on_time, late, outside_period",
        "day, school_id, class_id", "day", (Filter("class_id", ClassQ, "class_id = %s"),),
    ),
    RollupSpec(
        "board_power", "/board-power", "Minutes each smart board was on, per day", BoardPower,
        "board_power_daily", "day, school_id, device_id, on_minutes",
        "day, school_id, device_id", "day", (DEVICE,),
    ),
    RollupSpec(
        "board_input", "/board-input", "Minutes per smart-board input source, per day",
        BoardInput, "board_input_daily", "day, school_id, device_id, source, minutes",
        "day, school_id, device_id, source", "day", (DEVICE,),
    ),
    RollupSpec(
        "env", "/env", "Environment readings in 5-minute buckets (env_5min)", Env5Min,
        "env_5min", "bucket, school_id, device_id, metric, avg, min, max, samples",
        "bucket, school_id, device_id, metric", "bucket",
        (DEVICE, Filter("metric", MetricQ, "metric = %s")),
    ),
    RollupSpec(
        "device_online", "/device-online", "Minutes each device was online, per day",
        DeviceOnline, "device_online_daily", "day, school_id, device_id, online_minutes",
        "day, school_id, device_id", "day", (DEVICE,),
    ),
    RollupSpec(
        "library", "/library", "Library loans and returns per grade and day", Library,
        "library_daily", "day, school_id, grade::text AS grade, loans, returns",
        "day, school_id, grade", "day", (Filter("grade", GradeQ, "grade::text = %s"),),
    ),
)  # fmt: skip


def _fetch_json(
    conn: Conn,
    spec: RollupSpec,
    conds: list[tuple[LiteralString, Any]],
    principal: auth.Principal,
) -> bytes:
    """The answer's bytes, each row rendered by PostgreSQL (:mod:`sqljson`: the model's JSON
    value, fields in its order), so Python neither parses nor encodes a value. One row per
    item, the outer ``ORDER BY`` keeping the order guaranteed (the subquery is already sorted
    by it, so it costs no second sort)."""
    scoped, params = principal.sql_school_filter("school_id")
    where = [scoped, *(sql.SQL(c) for c, v in conds if v is not None)]
    params += [v for _, v in conds if v is not None]
    query = sql.SQL(
        "SELECT {line} FROM"
        " (SELECT {cols} FROM {rel} WHERE {where} ORDER BY {order} LIMIT %s) r ORDER BY {order}"
    ).format(
        line=_LINES[spec.name],
        cols=sql.SQL(spec.columns),
        rel=sql.Identifier(spec.relation),
        where=sql.SQL(" AND ").join(where),
        order=sql.SQL(spec.order),
    )
    items, n = sqljson.lines(conn.execute(query, [*params, MAX_ROWS + 1], binary=True), MAX_ROWS)
    more = b"true" if n > MAX_ROWS else b"false"
    return sqljson.wrapped(b'{"items":[', items, b'],"truncated":' + more + b"}")


def _cached(
    request: Request,
    conn: Conn,
    spec: RollupSpec,
    conds: list[tuple[LiteralString, Any]],
    principal: auth.Principal,
) -> Response:
    """The answer from :func:`_fetch_json`, or the one rendered for the same request while
    ``spec``'s table has not changed since (``If-None-Match`` on it: a 304)."""
    cache: answer_cache.AnswerCache = request.app.state.answer_cache
    counted = request.app.state.metrics.api_answer_cache
    valid = answer_cache.validator(conn, spec.relation)  # before rendering: see answer_cache
    if valid is None:
        counted.inc(result="uncacheable")
        return Response(_fetch_json(conn, spec, conds, principal), media_type=JSON)
    schools = None if principal.schools is None else tuple(sorted(principal.schools))
    # the rendering's own text too: a server that renders otherwise (an upgrade) never
    # answers 304 to a copy rendered the old way
    key = (spec.name, _LINE_TEXT[spec.name], MAX_ROWS, schools, tuple(conds))
    tag = answer_cache.etag(key, valid)
    headers = {"ETag": tag, "Cache-Control": "private, no-cache"}
    if answer_cache.matches(request.headers.get("if-none-match"), tag):
        counted.inc(result="not_modified")
        return Response(status_code=304, headers=headers)
    fresh = "no-cache" in request.headers.get("cache-control", "").lower()
    body = None if fresh else cache.get(key, valid)
    if body is None:
        counted.inc(result="bypass" if fresh else "miss")
        body = _fetch_json(conn, spec, conds, principal)
        cache.put(key, valid, body)  # the only change to what is held: the gauge follows it
        request.app.state.metrics.api_answer_cache_bytes.set(cache.size)
    else:
        counted.inc(result="hit")
    return Response(body, media_type=JSON, headers=headers)


#: Each rollup's row as JSON text (built once, at import: a field type sqljson cannot render
#: fails here, not on a request).
_LINES: Final = {spec.name: sqljson.object_sql(spec.model) for spec in ROLLUPS}
_LINE_TEXT: Final = {name: line.as_string(None) for name, line in _LINES.items()}


def _range(spec: RollupSpec, conn: Conn, now: datetime, start: Any, end: Any) -> list[Any]:
    """The range's conditions: district-local days, or [from, to) times for buckets."""
    if spec.range == "bucket":
        r = time_range(start, end)
        return [("bucket >= %s", r.start), ("bucket < %s", r.end)]
    first, last = day_range(start, end, lambda: district_today(conn, now))
    return [("day >= %s", first), ("day <= %s", last)]


def _route(spec: RollupSpec) -> Callable[..., Response]:
    """The endpoint for ``spec``: query parameters school, from, to, then the spec's filters."""

    def endpoint(
        request: Request,
        conn: Conn,
        *,
        principal: auth.Principal,
        now: Now,
        school: str | None,
        start: Any,
        end: Any,
        **keys: Any,
    ) -> Response:
        conds = [("school_id = %s", school), *_range(spec, conn, now, start, end)]
        conds += [(f.condition, keys[f.param]) for f in spec.filters]
        # the JSON value the model gives (test_rollups checks it), kept for the next identical
        # request while the table is unchanged (answer_cache)
        return _cached(request, conn, spec, conds, principal)

    day = spec.range == "day"
    query = [
        ("school", SchoolQ),
        ("start", FromDayQ if day else FromQ),
        ("end", ToDayQ if day else ToQ),
        *((f.param, f.annotation) for f in spec.filters),
    ]
    kw = inspect.Parameter.KEYWORD_ONLY
    # FastAPI reads the parameters from the signature: the same ones a hand-written def had
    endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request
            ),
            inspect.Parameter("conn", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Conn),
            inspect.Parameter("principal", kw, annotation=access.Caller),
            inspect.Parameter("now", kw, annotation=Now),
            *(inspect.Parameter(n, kw, annotation=a, default=None) for n, a in query),
        ],
        return_annotation=Response,
    )
    return endpoint


#: What the table rollups may also answer (docs/api.md, "Rollup answers kept, ETag and 304").
_NOT_MODIFIED: Final[dict[int | str, dict[str, Any]]] = {
    304: {
        "description": "Not Modified: `If-None-Match` named the answer's current `ETag` "
        "(its table unchanged since); no body"
    }
}

for _spec in ROLLUPS:
    router.add_api_route(
        _spec.path,
        _route(_spec),
        methods=["GET"],
        name=_spec.name,
        summary=_spec.summary,
        response_model=Rollup[_spec.model],  # type: ignore[name-defined]
        responses=_NOT_MODIFIED,
    )


@router.get(
    "/library-top-items",
    summary="The most borrowed library items",
    response_model=Rollup[LibraryItem],
)
def library_top_items(
    conn: Conn,
    principal: access.Caller,
    *,
    school: SchoolQ = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> Response:
    scoped, params = principal.sql_school_filter("school_id")
    query = sql.SQL(
        "SELECT school_id, item_id, loans, last_loan FROM library_top_items"
        " WHERE {} AND {} ORDER BY loans DESC, school_id, item_id LIMIT %s"
    ).format(scoped, sql.SQL("school_id = %s" if school is not None else "true"))
    params += [school] if school is not None else []
    rows = conn.cursor(row_factory=dict_row).execute(query, [*params, limit + 1]).fetchall()
    return encoded({"items": rows[:limit], "truncated": len(rows) > limit})


class CardPurchases(BaseModel):
    day: date
    school_id: str
    merchant: str | None
    purchases: int
    amount_fen: int = Field(description="the payments' sum in fen (0.01 yuan)")


@router.get(
    "/card-purchases",
    summary="Campus-card payments per school, merchant and day (count and sum in fen)",
    response_model=Rollup[CardPurchases],
)
def card_purchases(
    conn: Conn,
    principal: access.Caller,
    now: Now,
    *,
    school: SchoolQ = None,
    start: FromDayQ = None,
    end: ToDayQ = None,
    merchant: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> Response:
    first, last = day_range(start, end, lambda: district_today(conn, now))
    scoped, params = principal.sql_school_filter("school_id")
    query = sql.SQL(
        "SELECT day, school_id, merchant, purchases, amount_fen"
        " FROM campus_card_purchases_daily(%s, %s) WHERE {} AND {} AND {}"
        " ORDER BY day, school_id, merchant LIMIT %s"
    ).format(
        scoped,
        sql.SQL("school_id = %s" if school is not None else "true"),
        sql.SQL("merchant = %s" if merchant is not None else "true"),
    )
    args = [first, last, *params, *(v for v in (school, merchant) if v is not None)]
    rows = conn.cursor(row_factory=dict_row).execute(query, [*args, MAX_ROWS + 1]).fetchall()
    return reply(
        Rollup[CardPurchases], {"items": rows[:MAX_ROWS], "truncated": len(rows) > MAX_ROWS}
    )


#: A class-day with fewer distinct students than this is withheld from the health rollup, for
#: every caller: a count over two or three students would all but name them.
MIN_HEALTH_GROUP: Final = 5
#: A morning check at or above this temperature counts as a fever (the usual school threshold).
FEVER_C: Final = 37.3


class HealthChecks(BaseModel):
    day: date
    school_id: str
    class_id: str | None
    students: int = Field(description=f"distinct students checked (at least {MIN_HEALTH_GROUP})")
    checks: int
    fevers: int = Field(description=f"checks at or above {FEVER_C} °C or naming fever")
    symptoms: dict[str, int] = Field(description="symptom → checks that named it")


class HealthRollup(Rollup[HealthChecks]):
    suppressed: int = Field(
        description=f"class-days withheld: fewer than {MIN_HEALTH_GROUP} students checked"
    )


@router.get(
    "/health-checks",
    summary="Morning health checks per class and day (classes under the minimum size withheld)",
    response_model=HealthRollup,
)
def health_checks(
    conn: Conn,
    principal: access.Caller,
    now: Now,
    *,
    school: SchoolQ = None,
    start: FromDayQ = None,
    end: ToDayQ = None,
    class_id: ClassQ = None,
) -> Response:
    return _per_class(
        HealthRollup,
        "students, checks, fevers, symptoms",
        "campus_health_checks_daily(%s, %s, %s)",
        [FEVER_C],
        conn=conn,
        principal=principal,
        days=day_range(start, end, lambda: district_today(conn, now)),
        school=school,
        class_id=class_id,
    )


class VisionScreenings(BaseModel):
    day: date
    school_id: str
    class_id: str | None
    students: int = Field(description=f"distinct students screened (at least {MIN_HEALTH_GROUP})")
    screenings: int
    reduced: int = Field(description="screenings with either eye below 5.0 (five-grade notation)")
    mean_left: float = Field(description="the left eyes' mean acuity")
    mean_right: float = Field(description="the right eyes' mean acuity")


class VisionRollup(Rollup[VisionScreenings]):
    suppressed: int = Field(
        description=f"class-days withheld: fewer than {MIN_HEALTH_GROUP} students screened"
    )


@router.get(
    "/health-vision",
    summary="Vision screenings per class and day (classes under the minimum size withheld)",
    response_model=VisionRollup,
)
def health_vision(
    conn: Conn,
    principal: access.Caller,
    now: Now,
    *,
    school: SchoolQ = None,
    start: FromDayQ = None,
    end: ToDayQ = None,
    class_id: ClassQ = None,
) -> Response:
    return _per_class(
        VisionRollup,
        "students, screenings, reduced, mean_left, mean_right",
        "campus_health_vision_daily(%s, %s)",
        [],
        conn=conn,
        principal=principal,
        days=day_range(start, end, lambda: district_today(conn, now)),
        school=school,
        class_id=class_id,
    )


def _per_class(
    model: type[BaseModel],
    columns: LiteralString,
    function: LiteralString,
    extra: list[Any],
    *,
    conn: Conn,
    principal: auth.Principal,
    days: tuple[date, date],
    school: str | None,
    class_id: str | None,
) -> Response:
    """A per-class health rollup (``function`` over ``days`` and ``extra``), cut to the caller's
    schools; a class-day under :data:`MIN_HEALTH_GROUP` students is withheld and counted."""
    scoped, params = principal.sql_school_filter("school_id")
    where = sql.SQL(" AND ").join(
        [
            scoped,
            sql.SQL("school_id = %s" if school is not None else "true"),
            sql.SQL("class_id = %s" if class_id is not None else "true"),
        ]
    )
    query = sql.SQL(
        "SELECT day, school_id, class_id, {}, students >= %s AS shown"
        " FROM {} WHERE {} ORDER BY day, school_id, class_id"
    ).format(sql.SQL(columns), sql.SQL(function), where)
    args = [MIN_HEALTH_GROUP, *days, *extra, *params]
    args += [v for v in (school, class_id) if v is not None]
    rows = conn.cursor(row_factory=dict_row).execute(query, args).fetchmany(4 * MAX_ROWS)
    shown = [{k: v for k, v in r.items() if k != "shown"} for r in rows if r["shown"]]
    return reply(
        model,
        {
            "items": shown[:MAX_ROWS],
            "truncated": len(shown) > MAX_ROWS,
            "suppressed": sum(not r["shown"] for r in rows),
        },
    )
