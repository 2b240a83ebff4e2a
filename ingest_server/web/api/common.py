"""What the data endpoints share: time ranges, id filters, opaque keyset cursors, pages.

A bad parameter is a 422 in FastAPI's own shape (``detail[].loc`` names the parameter), so a
client handles one error format whether pydantic or this module found the fault.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Final

import psycopg
import pydantic_core
from fastapi import Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from ingest_server.web.api.deps import db
from schemas.topics import ID_PATTERN

Conn = Annotated[psycopg.Connection[Any], Depends(db)]

#: Event type and metric names: dotted lower-case words.
NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_.]{0,63}$"
#: Without ``from``, a range reaches this far back from ``to``.
DEFAULT_SPAN: Final = timedelta(hours=24)
#: The widest range one listing may ask for (exports may span more, see ``MAX_EXPORT_SPAN``).
MAX_SPAN: Final = timedelta(days=366)
MAX_EXPORT_SPAN: Final = timedelta(days=3660)
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
_EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST: Final = datetime(9000, 1, 1, tzinfo=UTC)

SchoolQ = Annotated[str | None, Query(pattern=ID_PATTERN, description="school id")]
DeviceQ = Annotated[str | None, Query(pattern=ID_PATTERN, description="device id")]
LimitQ = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"page size (at most {MAX_LIMIT})")]
CursorQ = Annotated[
    str | None,
    Query(max_length=512, description="opaque cursor from a previous page's `next`"),
]
FromQ = Annotated[
    datetime | None,
    Query(alias="from", description="start of the range, RFC 3339 with offset (inclusive)"),
]
ToQ = Annotated[
    datetime | None,
    Query(alias="to", description="end of the range, RFC 3339 with offset (exclusive)"),
]
FromDayQ = Annotated[date | None, Query(alias="from", description="first day (inclusive)")]
ToDayQ = Annotated[date | None, Query(alias="to", description="last day (inclusive)")]


def bad_param(name: str, message: str, value: object = None) -> RequestValidationError:
    """A 422 naming the query parameter ``name``, shaped like FastAPI's own."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", name), "msg": message, "input": value}]
    )


@dataclass(frozen=True, slots=True)
class TimeRange:
    start: datetime
    end: datetime


def time_range(
    start: datetime | None, end: datetime | None, max_span: timedelta = MAX_SPAN
) -> TimeRange:
    """``[from, to)``: ``to`` defaults to now, ``from`` to ``DEFAULT_SPAN`` before ``to``."""
    for name, value in (("from", start), ("to", end)):
        if value is not None and value.tzinfo is None:
            raise bad_param(name, "must be RFC 3339 with a UTC offset", str(value))
        if value is not None and not _EARLIEST <= value <= _LATEST:
            raise bad_param(name, "must lie between 1970 and 9000", str(value))
    end = end or datetime.now(UTC)
    start = start or max(_EARLIEST, end - DEFAULT_SPAN)
    if start >= end:
        raise bad_param("from", "must be before 'to'", start.isoformat())
    if end - start > max_span:
        raise bad_param("from", f"the range may span at most {max_span.days} days", None)
    return TimeRange(start, end)


async def utc_now() -> datetime:
    """The API's clock, as a dependency: tests pin it with ``app.dependency_overrides``.
    (``async``: a plain function would cost each request a hop to a worker thread.)"""
    return datetime.now(UTC)


Now = Annotated[datetime, Depends(utc_now)]


def district_today(conn: psycopg.Connection[Any], now: datetime) -> date:
    """The date ``now`` falls on in the district's time zone: the day rollups call today."""
    row = conn.execute(
        "SELECT (%s::timestamptz AT TIME ZONE district_tz)::date FROM storage_config", (now,)
    ).fetchone()
    assert row is not None, "storage_config has its one row from migration 0002"
    day: date = row[0]
    return day


def day_range(
    start: date | None, end: date | None, today: Callable[[], date], max_days: int = 366
) -> tuple[date, date]:
    """``[from, to]`` in whole days: ``to`` defaults to ``today()`` (the district's, not UTC's:
    before 08:00 in Beijing the UTC date is still yesterday), ``from`` to 30 days before."""
    end = end or today()
    start = start or end - timedelta(days=30)
    if start > end:
        raise bad_param("from", "must not be after 'to'", start.isoformat())
    if (end - start).days >= max_days:
        raise bad_param("from", f"the range may span at most {max_days} days", None)
    return start, end


def encode_cursor(kind: str, key: tuple[Any, ...]) -> str:
    """An opaque, URL-safe cursor for the row ``key`` of a ``kind`` listing."""
    parts = [v.isoformat() if isinstance(v, datetime) else v for v in key]
    raw = json.dumps([kind, *parts], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, kind: str, types: tuple[type, ...]) -> tuple[Any, ...]:
    """The key ``encode_cursor`` packed; a 422 naming ``cursor`` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        parts = json.loads(raw)
        if not isinstance(parts, list) or parts[0] != kind or len(parts) != len(types) + 1:
            raise ValueError
        out: list[Any] = []
        for t, v in zip(types, parts[1:], strict=True):
            if t is datetime:
                when = datetime.fromisoformat(v)
                if when.tzinfo is None:
                    raise ValueError
                out.append(when)
            elif (t is int and isinstance(v, int) and not isinstance(v, bool)) or (
                t is str and isinstance(v, str) and "\x00" not in v
            ):
                out.append(v)
            else:
                raise ValueError
    except (ValueError, TypeError, IndexError, UnicodeDecodeError):
        raise bad_param("cursor", f"is not a cursor of this {kind} listing", token) from None
    return tuple(out)


def next_link(request: Request, cursor: str | None) -> str | None:
    """This request's URL with ``cursor`` replaced: the next page, or None at the end."""
    if cursor is None:
        return None
    return str(request.url.include_query_params(cursor=cursor))


def reply(model: type[BaseModel], data: dict[str, Any]) -> Response:
    """``data`` checked against ``model`` and encoded in one pass of pydantic-core.

    FastAPI's own path validates a returned model again and encodes it in Python: ~5x slower
    on a page of 1000 rows. Endpoints returning this declare ``response_model`` for the schema.
    """
    return Response(model.model_validate(data).model_dump_json(), media_type="application/json")


def encoded(data: Any, headers: dict[str, str] | None = None) -> Response:
    """``data`` encoded by pydantic-core as it stands, without a validation pass.

    For hot listings whose rows come straight from typed SQL columns, already of their
    ``response_model``'s types: the bytes are those :func:`reply` gives (the same serialiser;
    ``tests/integration/test_api_data.py`` compares them), at ~1/7 of its cost on a page of
    1000 events. Non-finite floats become null, as the models' default. Each call site keeps
    ``response_model`` for the schema.
    """
    body = pydantic_core.to_json(data, inf_nan_mode="null")
    return Response(body, media_type="application/json", headers=headers)
