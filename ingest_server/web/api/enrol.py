"""Enrolment: admins issue codes (``/api/v1/enrolment-codes``; a school admin for its schools
only, and sees only their codes); a device spends one at
``POST /api/v1/enrol`` (no token: the code authenticates) for its MQTT credentials.

The enrolment settings live on ``app.state.enrolment`` (:class:`EnrolmentState`); without them
``/enrol`` answers 404 saying what the server lacks (not a server fault: it is not set up here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import msgspec
import psycopg
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ingest_server.control import enrolment
from ingest_server.web.api import access
from ingest_server.web.api.deps import db
from schemas.topics import ID_PATTERN

#: ``/enrol`` is public (the code authenticates); the guard lets it through by its rule.
router = APIRouter(tags=["enrolment"])
codes = APIRouter(tags=["enrolment"], dependencies=[access.GUARD])
Conn = Annotated[psycopg.Connection[Any], Depends(db)]
#: A request body larger than this is refused before it is parsed.
MAX_BODY = 16 * 1024


@dataclass(slots=True)
class EnrolmentState:
    offer: enrolment.Offer | None
    #: Why enrolment is off, when ``offer`` is None (e.g. no hash key configured).
    missing: str = ""
    limiter: enrolment.FailureLimiter = field(default_factory=enrolment.FailureLimiter)
    #: Called after each enrolment, e.g. to refresh the broker's credentials at once.
    on_enrolled: Callable[[], None] | None = None


class CodeRequest(BaseModel):
    school_id: str = Field(pattern=ID_PATTERN)
    room: str | None = Field(default=None, max_length=64)
    kind: str | None = Field(default=None, description="device kind the code is for")
    replaces: str | None = Field(
        default=None, pattern=ID_PATTERN, description="device_id a new device takes over"
    )
    ttl_s: int = Field(default=enrolment.DEFAULT_TTL_S, gt=0, le=enrolment.MAX_TTL_S)
    tags: list[str] = Field(
        default_factory=list, max_length=64, description="tags the enrolled device gets"
    )


class CreatedCode(BaseModel):
    code: str = Field(description="shown only now; only its SHA-256 is stored")
    expires_at: datetime


@codes.post("/api/v1/enrolment-codes", status_code=status.HTTP_201_CREATED)
def create_code(body: CodeRequest, conn: Conn, principal: access.Caller) -> CreatedCode:
    principal.check_school(body.school_id)
    if body.replaces is not None and not principal.district_wide:
        # a scoped token learns nothing of another school's device (enrolment's own 400s,
        # naming the device's school, are for district-wide tokens)
        principal.check_device(conn, body.replaces)
    try:
        code, expires = enrolment.create_code(
            conn,
            body.school_id,
            room=body.room,
            kind=body.kind,
            replaces=body.replaces,
            ttl_s=body.ttl_s,
            tags=body.tags,
        )
    except enrolment.EnrolmentError as exc:
        raise HTTPException(exc.status, exc.detail) from None
    return CreatedCode(code=code, expires_at=expires)


@codes.get("/api/v1/enrolment-codes")
def list_codes(conn: Conn, principal: access.Caller) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(c) for c in enrolment.list_codes(conn, principal.schools)]


@router.post("/api/v1/enrol", status_code=status.HTTP_201_CREATED)
async def enrol(request: Request) -> JSONResponse:
    """A device spends its enrolment code for its MQTT credentials. No token: the address's rate
    limit and the body (read whole, within its size and time caps) are checked before a database
    connection is taken, so a slow client never holds one."""
    state: EnrolmentState | None = getattr(request.app.state, "enrolment", None)
    if state is None or state.offer is None:
        why = state.missing if state else "enrolment is not set up"
        return JSONResponse({"detail": f"enrolment is not available on this server: {why}"}, 404)
    client = request.client.host if request.client else "unknown"
    if (wait := state.limiter.retry_after(client)) is not None:
        return JSONResponse(
            {"detail": f"too many wrong enrolment codes from {client}; try again later"},
            429,
            headers={"Retry-After": str(int(wait) + 1)},
        )
    body = await request.body()
    try:
        if len(body) > MAX_BODY:
            raise enrolment.EnrolmentError(400, f"the request body exceeds {MAX_BODY} bytes")
        req = enrolment.decode_request(body)
        result = await run_in_threadpool(_enrol, request.app.state.pool, req, state.offer)
    except enrolment.EnrolmentError as exc:
        if exc.status in (404, 410):
            state.limiter.failed(client)
        return JSONResponse({"detail": exc.detail}, exc.status)
    if state.on_enrolled is not None:
        state.on_enrolled()
    return JSONResponse(msgspec.to_builtins(result), 201)


def _enrol(
    pool: ConnectionPool[Any], req: enrolment.EnrolRequest, offer: enrolment.Offer
) -> enrolment.EnrolResult:
    """Spend the code; ``config`` is the desired configuration an admin set for the device id
    (a replacement takes over its predecessor's), null when there is none."""
    with pool.connection() as conn:
        result = enrolment.enrol(conn, req, offer)
        row = conn.execute(
            "SELECT document -> 'config' FROM device_config WHERE device_id = %s",
            (result.device_id,),
        ).fetchone()
    if row is not None and isinstance(row[0], dict):
        result.config = row[0]
    return result
