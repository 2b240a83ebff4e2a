"""``/api/v1/quarantine``: what ingest refused, newest first; administrators only (raw payloads
may hold personal data). A school admin sees a row if its school is one of the token's: the
registry's school of the row's device, or, for a device the registry does not know, the school
in the row's topic (``campus/v1/<school>/<device>/...``); a row with neither is district-only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Request, Response
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from ingest_server.web.api import access, auth
from ingest_server.web.api.common import (
    Conn,
    CursorQ,
    DeviceQ,
    FromQ,
    LimitQ,
    ToQ,
    decode_cursor,
    encode_cursor,
    next_link,
    reply,
    time_range,
)

router = APIRouter(prefix="/api/v1/quarantine", tags=["quarantine"], dependencies=[access.GUARD])
#: A quarantined row's school: its device's in the registry, else the one in its topic.
ROW_SCHOOL: Final = (
    "coalesce((SELECT d.school_id FROM devices d WHERE d.device_id = quarantine.device_id),"
    " CASE WHEN topic LIKE 'campus/v1/%%' THEN split_part(topic, '/', 3) END)"
)

#: Payload text beyond this many characters is cut (the full bytes stay in the table).
MAX_PAYLOAD_CHARS: Final = 64 * 1024
ReasonQ = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00]+$",
        description="only reasons starting with this text",
    ),
]


class QuarantinedMessage(BaseModel):
    id: int
    received_at: datetime
    topic: str
    reason: str
    device_id: str | None
    seq: int | None
    payload_bytes: int
    payload_text: str = Field(description="UTF-8 as sent, other bytes escaped; cut at 64 KiB")


class QuarantinePage(BaseModel):
    items: list[QuarantinedMessage]
    next: str | None
    cursor: str | None


class ReasonCount(BaseModel):
    reason: str
    count: int
    last: datetime


def _filters(
    principal: auth.Principal,
    start: datetime | None,
    end: datetime | None,
    reason: str | None,
    device: str | None,
) -> tuple[sql.Composed, list[Any]]:
    r = time_range(start, end)
    parts = [sql.SQL("received_at >= %s AND received_at < %s")]
    params: list[Any] = [r.start, r.end]
    if principal.schools is not None:
        parts.append(sql.SQL(ROW_SCHOOL + " = ANY(%s)"))
        params.append(sorted(principal.schools))
    if reason is not None:
        # starts_with, not LIKE: a reason's own % or _ must not act as wildcards
        parts.append(sql.SQL("starts_with(reason, %s)"))
        params.append(reason)
    if device is not None:
        parts.append(sql.SQL("device_id = %s"))
        params.append(device)
    return sql.SQL(" AND ").join(parts), params


@router.get(
    "", summary="Quarantined messages, newest first, keyset paged", response_model=QuarantinePage
)
def list_quarantine(
    request: Request,
    conn: Conn,
    principal: access.Caller,
    *,
    start: FromQ = None,
    end: ToQ = None,
    reason: ReasonQ = None,
    device: DeviceQ = None,
    limit: LimitQ = 100,
    cursor: CursorQ = None,
) -> Response:
    cond, params = _filters(principal, start, end, reason, device)
    if cursor is not None:
        (before,) = decode_cursor(cursor, "quarantine", (int,))
        cond = sql.SQL("{} AND id < %s").format(cond)
        params.append(before)
    query = sql.SQL(
        "SELECT id, received_at, topic, reason, device_id, seq, octet_length(payload)"
        " AS payload_bytes, left(payload_text, {}) AS payload_text FROM quarantine"
        " WHERE {} ORDER BY id DESC LIMIT %s"
    ).format(sql.Literal(MAX_PAYLOAD_CHARS), cond)
    rows = conn.cursor(row_factory=dict_row).execute(query, [*params, limit + 1]).fetchall()
    token = encode_cursor("quarantine", (rows[limit - 1]["id"],)) if len(rows) > limit else None
    page = {"items": rows[:limit], "next": next_link(request, token), "cursor": token}
    return reply(QuarantinePage, page)


@router.get("/reasons", summary="Quarantined messages counted by reason")
def count_reasons(
    conn: Conn,
    principal: access.Caller,
    *,
    start: FromQ = None,
    end: ToQ = None,
    reason: ReasonQ = None,
    device: DeviceQ = None,
) -> list[ReasonCount]:
    cond, params = _filters(principal, start, end, reason, device)
    query = sql.SQL(
        "SELECT reason, count(*) AS count, max(received_at) AS last FROM quarantine WHERE {}"
        " GROUP BY reason ORDER BY count(*) DESC, reason LIMIT 1000"
    ).format(cond)
    rows = conn.cursor(row_factory=dict_row).execute(query, params).fetchall()
    return [ReasonCount.model_validate(r) for r in rows]
