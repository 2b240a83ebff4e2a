"""A device's desired configuration (admins set it, readers see what the device reported) and
its presence; a school-scoped token only for its schools' devices (another's is a 404).

``PUT /api/v1/devices/{device_id}/config`` stores version = previous + 1 as the document
``{"version", "issued_at", "config"}``; the control plane publishes it retained on the device's
``config`` topic and records the device's ``config/ack``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
import psycopg
from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ingest_server.control.plane import desire_config
from ingest_server.web.api import access
from ingest_server.web.api.deps import db
from schemas.topics import ID_PATTERN

router = APIRouter(
    prefix="/api/v1/devices/{device_id}", tags=["devices"], dependencies=[access.GUARD]
)
Conn = Annotated[psycopg.Connection[Any], Depends(db)]
DeviceId = Annotated[str, PathParam(pattern=ID_PATTERN, description="the device's id")]

#: A presence answer lists at most this many transitions (the newest); ``truncated`` says more.
MAX_TRANSITIONS: Final = 1000
#: Changes of state in ``device_presence`` (a repeated state is no transition), newest first.
_TRANSITIONS: Final = """
SELECT time, state FROM (
    SELECT time, state, lag(state) OVER (ORDER BY time) AS previous
    FROM device_presence
    WHERE device_id = %(device)s AND state IN ('online', 'offline')
      AND time <= coalesce(%(to)s::timestamptz, 'infinity')
) AS p
WHERE previous IS DISTINCT FROM state AND time >= coalesce(%(from)s::timestamptz, '-infinity')
ORDER BY time DESC LIMIT %(limit)s
"""

#: Largest ``config`` accepted, encoded as JSON (it is a retained message on the broker).
MAX_CONFIG_BYTES: Final = 256 * 1024


class ConfigRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(description="the device's whole desired configuration")

    @field_validator("config")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(msgspec.json.encode(value))
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES} allowed")
        return value


class ConfigAccepted(BaseModel):
    device_id: str
    version: int
    status: Literal["pending"] = "pending"


class ConfigInfo(BaseModel):
    device_id: str
    school_id: str
    version: int = Field(description="the desired version")
    document: dict[str, Any]
    status: Literal["pending", "applied", "rejected", "rolled_back"] = Field(
        description="what the device last reported about the desired version"
    )
    detail: str | None
    updated_at: datetime
    acked_at: datetime | None
    published_version: int | None
    published_at: datetime | None


class Transition(BaseModel):
    time: datetime
    state: Literal["online", "offline"]


class Presence(BaseModel):
    device_id: str
    school_id: str
    state: Literal["online", "offline"] | None
    since: datetime | None
    boot: int | None
    agent_version: str | None
    transitions: list[Transition] = Field(
        description=f"online/offline changes in [from, to], oldest first; the newest "
        f"{MAX_TRANSITIONS} if there were more"
    )
    truncated: bool = Field(description="more transitions matched than were returned")
    history: Literal["current_only", "full"] = Field(
        description="full: transitions come from the stored presence history (device_presence);"
        " current_only (older servers): only the latest change was known"
    )


@router.put("/config", status_code=status.HTTP_202_ACCEPTED)
def put_config(
    device_id: DeviceId,
    body: ConfigRequest,
    conn: Conn,
    principal: access.Caller,
    request: Request,
) -> ConfigAccepted:
    school_id = principal.check_device(conn, device_id)
    version = desire_config(conn, device_id, school_id, body.config)
    control = getattr(request.app.state, "control", None)
    if control is not None:
        control.wake()
    return ConfigAccepted(device_id=device_id, version=version)


@router.get("/config")
def get_config(device_id: DeviceId, conn: Conn, principal: access.Caller) -> ConfigInfo:
    principal.check_device(conn, device_id)
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(
        "SELECT device_id, school_id, version, document, status, detail, updated_at, acked_at,"
        " published_version, published_at FROM device_config WHERE device_id = %s",
        (device_id,),
    ).fetchone()
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no configuration was ever set for {device_id!r}"
        )
    return ConfigInfo(**row)


@router.get("/presence")
def get_presence(
    device_id: DeviceId,
    conn: Conn,
    principal: access.Caller,
    from_: Annotated[datetime | None, Query(alias="from")] = None,
    to: Annotated[datetime | None, Query()] = None,
) -> Presence:
    """Current presence from the registry and the online/offline changes in [from, to] from
    the presence history (every ``state`` message the writer stored)."""
    for name, value in (("from", from_), ("to", to)):
        if value is not None and value.tzinfo is None:
            raise HTTPException(422, f"{name} must be RFC 3339 with an offset, e.g. ...Z")
    if from_ is not None and to is not None and from_ > to:
        raise HTTPException(422, "from must not be after to")
    principal.check_device(conn, device_id)
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(
        "SELECT device_id, school_id, state, state_at AS since, boot, agent_version"
        " FROM devices WHERE device_id = %s",
        (device_id,),
    ).fetchone()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r} is known")
    found = cur.execute(
        _TRANSITIONS,
        {"device": device_id, "from": from_, "to": to, "limit": MAX_TRANSITIONS + 1},
    ).fetchall()
    transitions = [Transition(**t) for t in reversed(found[:MAX_TRANSITIONS])]
    return Presence(
        **row,
        transitions=transitions,
        truncated=len(found) > MAX_TRANSITIONS,
        history="full",
    )
