"""``/api/v1/alerts``: alerts newest first, one with its transitions, and acknowledging or
resolving one by hand (district and school admins, within their schools). Each change writes
its ``alert_events`` row in the same transaction and goes to the live stream as an ``alert``
event."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from pydantic import BaseModel

from ingest_server.alerts import store
from ingest_server.alerts.config import RULES
from ingest_server.web.api import auth
from ingest_server.web.api.access import GUARD, Caller
from ingest_server.web.api.common import (
    NAME_PATTERN,
    Conn,
    CursorQ,
    DeviceQ,
    LimitQ,
    SchoolQ,
    bad_param,
    decode_cursor,
    encode_cursor,
    next_link,
    reply,
)

router = APIRouter(
    prefix="/api/v1/alerts",
    tags=["alerts"],
    dependencies=[GUARD],
)

StateQ = Annotated[
    Literal["open", "acknowledged", "resolved"] | None, Query(description="only this state")
]
RuleQ = Annotated[
    str | None,
    Query(pattern=NAME_PATTERN, description=f"only this rule ({', '.join(RULES)})"),
]
AlertId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class Alert(BaseModel):
    id: int
    rule: str
    severity: str
    state: str
    school_id: str
    device_id: str
    room: str | None
    opened_at: datetime
    last_seen_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    resolved_at: datetime | None
    resolved_by: str | None
    message: str
    detail: dict[str, Any]


class AlertEvent(BaseModel):
    id: int
    transition: str
    at: datetime
    by_whom: str | None


class AlertWithEvents(Alert):
    events: list[AlertEvent]


class AlertPage(BaseModel):
    items: list[Alert]
    next: str | None
    cursor: str | None


def visible_schools(principal: auth.Principal) -> Collection[str] | None:
    """The schools a token may see alerts of (None: all); every query takes it through
    ``store.scope``, so another school's alert is not found."""
    return principal.schools


@router.get("", summary="Alerts, newest first, keyset paged", response_model=AlertPage)
def list_alerts(
    request: Request,
    conn: Conn,
    principal: Caller,
    *,
    state: StateQ = None,
    school: SchoolQ = None,
    rule: RuleQ = None,
    device: DeviceQ = None,
    limit: LimitQ = 100,
    cursor: CursorQ = None,
) -> Response:
    if rule is not None and rule not in RULES:
        raise bad_param("rule", f"must be one of {', '.join(RULES)}", rule)
    before = None
    if cursor is not None:
        (before,) = decode_cursor(cursor, "alerts", (int,))
    rows = store.listing(
        conn,
        schools=visible_schools(principal),
        state=state,
        school=school,
        rule=rule,
        device=device,
        before=before,
        limit=limit + 1,
    )
    token = encode_cursor("alerts", (rows[limit - 1]["id"],)) if len(rows) > limit else None
    page = {"items": rows[:limit], "next": next_link(request, token), "cursor": token}
    return reply(AlertPage, page)


@router.get("/{alert_id}", summary="One alert with its transitions")
def get_alert(conn: Conn, principal: Caller, alert_id: AlertId) -> AlertWithEvents:
    row = store.get(conn, alert_id, visible_schools(principal))
    if row is None:
        raise HTTPException(404, f"no alert {alert_id}")
    return AlertWithEvents.model_validate(row)


def _change(
    request: Request, conn: Any, token: auth.Principal, alert_id: int, what: str
) -> AlertWithEvents:
    schools = visible_schools(token)
    if what == "acknowledged":
        done = store.acknowledge(conn, alert_id, token.name, schools)
    else:
        done = store.resolve(conn, alert_id, token.name, None, schools)
    if done is None:
        row = store.get(conn, alert_id, schools)
        if row is None:
            raise HTTPException(404, f"no alert {alert_id}")
        raise HTTPException(409, f"alert {alert_id} is {row['state']}: it cannot be {what}")
    request.app.state.metrics.alert_transitions.inc(rule=done.alert["rule"], transition=what)
    request.app.state.live.publish_alert(what, done.alert)
    row = store.get(conn, alert_id, schools)
    assert row is not None
    return AlertWithEvents.model_validate(row)


@router.post(
    "/{alert_id}/acknowledge",
    summary="Acknowledge an open alert (by this token's name)",
    responses={404: {"description": "no such alert"}, 409: {"description": "not open"}},
)
def acknowledge(
    request: Request, conn: Conn, principal: Caller, alert_id: AlertId
) -> AlertWithEvents:
    return _change(request, conn, principal, alert_id, "acknowledged")


@router.post(
    "/{alert_id}/resolve",
    summary="Resolve an alert by hand (by this token's name)",
    responses={404: {"description": "no such alert"}, 409: {"description": "resolved already"}},
)
def resolve(request: Request, conn: Conn, principal: Caller, alert_id: AlertId) -> AlertWithEvents:
    return _change(request, conn, principal, alert_id, "resolved")
