"""Commands to a device: administrators send them, readers follow their status (a school-scoped
token only for its schools' devices: another school's device or command is a 404).

``POST /api/v1/devices/{device_id}/commands`` stores a ``pending`` command; the control plane
(:mod:`ingest_server.control.plane`) publishes it and records the device's ack. A client-chosen
``id`` makes the POST idempotent: the same id again answers 200 with the first command.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
import psycopg
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ingest_server.control.releases import UPDATE_COMMAND, UpdateArgsError, check_update_args
from ingest_server.web.api import access
from ingest_server.web.api.deps import db
from schemas.topics import ID_PATTERN

router = APIRouter(prefix="/api/v1", tags=["commands"], dependencies=[access.GUARD])
Conn = Annotated[psycopg.Connection[Any], Depends(db)]
DeviceId = Annotated[str, PathParam(pattern=ID_PATTERN, description="the device's id")]
CommandStatus = Literal["pending", "sent", "ok", "error", "rejected", "expired"]

#: Largest ``args`` document accepted, encoded as JSON.
MAX_ARGS_BYTES: Final = 16 * 1024
MAX_TTL_S: Final = 7 * 24 * 3600
_INSERT: Final = """
INSERT INTO commands (id, device_id, school_id, name, args, expires_at, created_by)
VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s), %s)
ON CONFLICT (id) DO NOTHING
RETURNING id, device_id, school_id, name, args, status, detail, created_at, expires_at, sent_at,
          acked_at, created_by
"""
_BY_ID: Final = """
SELECT id, device_id, school_id, name, args, status, detail, created_at, expires_at, sent_at,
       acked_at, created_by
FROM commands WHERE id = %s
"""
_BY_DEVICE: Final = """
SELECT id, device_id, school_id, name, args, status, detail, created_at, expires_at, sent_at,
       acked_at, created_by
FROM commands WHERE device_id = %s AND (%s::text IS NULL OR status = %s)
ORDER BY created_at DESC, id LIMIT %s
"""


def bounded_args(value: dict[str, Any]) -> dict[str, Any]:
    """A command's ``args`` as given, if their JSON fits :data:`MAX_ARGS_BYTES` (a validator)."""
    size = len(msgspec.json.encode(value))
    if size > MAX_ARGS_BYTES:
        raise ValueError(f"args are {size} bytes as JSON; at most {MAX_ARGS_BYTES} allowed")
    return value


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[a-z][a-z0-9_]{0,63}$",
        description="e.g. ping, flush_outbox, show_notice, restart_driver, set_sample_rate",
    )
    args: dict[str, Any] = Field(default_factory=dict)
    ttl_s: int = Field(default=300, ge=1, le=MAX_TTL_S, description="seconds until it expires")
    id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="idempotency key: sending the same id again returns the first command",
    )

    _bounded = field_validator("args")(bounded_args)


class CommandInfo(BaseModel):
    id: str
    device_id: str
    school_id: str
    name: str
    args: dict[str, Any]
    status: CommandStatus
    detail: Any = None
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    acked_at: datetime | None
    created_by: str | None


def check_args(
    conn: psycopg.Connection[Any], name: str, args: dict[str, Any], at: tuple[str, ...] = ()
) -> None:
    """422 naming the arg (``loc`` ``body, *at, args, FIELD``) when an ``update_agent`` would
    fail on every device it reaches: args not :class:`~schemas.release.UpdateArgs`, or not a
    release stored on this server."""
    if name != UPDATE_COMMAND:
        return
    try:
        check_update_args(conn, args)
    except UpdateArgsError as exc:
        loc = ("body", *at, "args", *([exc.field] if exc.field else []))
        value = args.get(exc.field) if exc.field else None
        raise RequestValidationError(
            [{"type": "value_error", "loc": loc, "msg": f"{name} {exc}", "input": value}]
        ) from None


def _wake_control(request: Request) -> None:
    control = getattr(request.app.state, "control", None)
    if control is not None:
        control.wake()


@router.post(
    "/devices/{device_id}/commands",
    status_code=status.HTTP_201_CREATED,
    responses={200: {"description": "a command with this id exists: it is returned"}},
)
def send_command(
    device_id: DeviceId,
    body: CommandRequest,
    *,
    conn: Conn,
    token: access.Caller,
    request: Request,
    response: Response,
) -> CommandInfo:
    school_id = token.check_device(conn, device_id)
    check_args(conn, body.name, body.args)
    cmd_id = body.id or uuid.uuid4().hex
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(
        _INSERT,
        (cmd_id, device_id, school_id, body.name, Jsonb(body.args), body.ttl_s, token.name),
    ).fetchone()
    if row is not None:
        _wake_control(request)
        return CommandInfo(**row)
    first = cur.execute(_BY_ID, (cmd_id,)).fetchone()
    assert first is not None  # ids are never deleted
    if (first["device_id"], first["name"], first["args"]) != (device_id, body.name, body.args):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"command id {cmd_id!r} is already used by a different command "
            f"({first['name']} to {first['device_id']})",
        )
    response.status_code = status.HTTP_200_OK
    return CommandInfo(**first)


@router.get("/devices/{device_id}/commands")
def list_commands(
    device_id: DeviceId,
    conn: Conn,
    principal: access.Caller,
    status_: Annotated[CommandStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[CommandInfo]:
    """A device's commands, most recent first."""
    principal.check_device(conn, device_id)
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute(
        _BY_DEVICE,
        (device_id, status_, status_, limit),
    ).fetchall()
    return [CommandInfo(**r) for r in rows]


@router.get("/commands/{command_id}")
def get_command(
    command_id: Annotated[str, PathParam(max_length=128)], conn: Conn, principal: access.Caller
) -> CommandInfo:
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(_BY_ID, (command_id,)).fetchone()
    # another school's command answers as an unknown one
    if row is None or not principal.sees(row["school_id"]):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no command with id {command_id!r}")
    return CommandInfo(**row)
