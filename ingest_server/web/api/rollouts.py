"""Device groups and staged fleet rollouts (:mod:`ingest_server.control.rollouts`).

``PUT /api/v1/devices/{id}/tags`` sets a device's tags; ``POST /api/v1/targets/resolve`` shows
which devices a target names; ``/api/v1/rollouts`` creates, lists, shows, pauses, resumes and
aborts rollouts. Access by :mod:`~ingest_server.web.api.access` (writes need the ``config``
permission, and ``command`` too for a command rollout; reads ``read``). Every target goes through
:func:`~ingest_server.control.targets.resolve_target` with the caller's schools, and a
school-scoped token sees (and steers) only rollouts whose devices are all within its schools.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ingest_server.control import rollouts as ro
from ingest_server.control.targets import Target, TargetError, check_tags, resolve_target
from ingest_server.web.api import auth
from ingest_server.web.api.access import GUARD, Caller
from ingest_server.web.api.commands import MAX_TTL_S, bounded_args, check_args
from ingest_server.web.api.common import Conn
from ingest_server.web.api.config import MAX_CONFIG_BYTES
from schemas.topics import ID_PATTERN

router = APIRouter(prefix="/api/v1", tags=["rollouts"], dependencies=[GUARD])
DeviceId = Annotated[str, PathParam(pattern=ID_PATTERN, description="the device's id")]
RolloutId = Annotated[int, PathParam(ge=1, le=2**62)]

#: Devices one page of a rollout lists, at most.
MAX_PAGE: Final = 1000


class TargetBody(BaseModel):
    """Every field given must match; within a field any value does. At least one field."""

    model_config = ConfigDict(extra="forbid")

    schools: list[str] | None = Field(default=None, max_length=1000)
    rooms: list[str] | None = Field(default=None, max_length=1000)
    kinds: list[str] | None = Field(default=None, max_length=1000)
    tags: list[str] | None = Field(default=None, max_length=1000)
    devices: list[str] | None = Field(default=None, max_length=50_000)

    def target(self) -> Target:
        try:
            return Target.from_dict(self.model_dump(exclude_none=True))
        except TargetError as exc:
            raise HTTPException(422, str(exc)) from None


class StrategyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    canary: int | None = Field(default=None, ge=0, le=ro.MAX_BATCH, description="devices first")
    canary_share: float | None = Field(
        default=None, gt=0, le=1, description="or the canary as a share of the target"
    )
    batch_size: int = Field(default=10, ge=1, le=ro.MAX_BATCH)
    pause_s: float = Field(default=0, ge=0, le=7 * 24 * 3600, description="between batches")
    max_failure_share: float = Field(
        default=0.2, ge=0, le=1, description="halt when failed / settled exceeds this"
    )
    device_timeout_s: int = Field(
        default=600, ge=1, le=7 * 24 * 3600, description="an online device's time to answer"
    )

    @model_validator(mode="after")
    def _one_canary(self) -> StrategyBody:
        if self.canary is not None and self.canary_share is not None:
            raise ValueError("give canary or canary_share, not both")
        return self


class CommandBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    args: dict[str, Any] = Field(default_factory=dict)
    ttl_s: int = Field(
        default=MAX_TTL_S,
        ge=60,
        le=MAX_TTL_S,
        description="how long each device's command waits for an offline device; "
        "one that expires unanswered is issued again (3 tries)",
    )

    _bounded = field_validator("args")(bounded_args)


class RolloutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: TargetBody
    config: dict[str, Any] | None = Field(
        default=None, description="the desired config, as PUT /devices/{id}/config takes it"
    )
    command: CommandBody | None = None
    strategy: StrategyBody = Field(default_factory=StrategyBody)

    @field_validator("config")
    @classmethod
    def _bounded(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and (size := len(msgspec.json.encode(value))) > MAX_CONFIG_BYTES:
            raise ValueError(f"config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES} allowed")
        return value

    @model_validator(mode="after")
    def _one_payload(self) -> RolloutRequest:
        if (self.config is None) == (self.command is None):
            raise ValueError("give exactly one of config and command")
        return self


Outcome = Literal["pending", "sent", "ok", "failed", "skipped"]
StateName = Literal["running", "paused", "halted", "done", "aborted"]


class Rollout(BaseModel):
    id: int
    what: Literal["config", "command"]
    target: dict[str, Any]
    config: dict[str, Any] | None
    command_name: str | None
    command_args: dict[str, Any] | None
    command_ttl_s: int | None
    canary: int
    batch_size: int
    pause_s: float
    max_failure_share: float
    device_timeout_s: int
    state: StateName
    reason: str | None = Field(description="why it halted, or who paused/resumed/aborted it")
    batches: int = Field(description="batches issued so far; the canary is batch 1")
    total: int
    counts: dict[Outcome, int]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    created_by: str | None


class RolloutDevice(BaseModel):
    device_id: str
    school_id: str
    position: int
    batch: int | None
    outcome: Outcome
    detail: str | None
    command_id: str | None
    config_version: int | None
    attempts: int
    issued_at: datetime | None
    settled_at: datetime | None


class RolloutDetail(Rollout):
    devices: list[RolloutDevice]
    next_after: int | None = Field(description="pass as after= for the next page; null at the end")


class TagsBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[str] = Field(max_length=64)


class Tags(BaseModel):
    device_id: str
    tags: list[str]


class Resolved(BaseModel):
    count: int
    devices: list[str] = Field(description="the first 1000, in issue order")


_COLUMNS: Final = """
r.id, r.what, r.target, r.config, r.command_name, r.command_args, r.command_ttl_s, r.canary,
r.batch_size, r.pause_s, r.max_failure_share, r.device_timeout_s, r.state, r.reason, r.batches,
r.total, r.created_at, r.updated_at, r.finished_at, r.created_by,
(SELECT jsonb_object_agg(o.outcome, o.n) FROM (
    SELECT outcome, count(*) AS n FROM rollout_devices WHERE rollout_id = r.id GROUP BY outcome
 ) AS o) AS counts
"""


def _rollout(row: dict[str, Any]) -> dict[str, Any]:
    found = row.pop("counts") or {}
    row["counts"] = {o: int(found.get(o, 0)) for o in ro.OUTCOMES}
    return row


def _wake(request: Request) -> None:
    runner = getattr(request.app.state, "rollouts", None)
    if runner is not None:
        runner.wake()


@router.put("/devices/{device_id}/tags")
def put_tags(device_id: DeviceId, body: TagsBody, conn: Conn, principal: Caller) -> Tags:
    """Replace the device's tags (the groups a rollout's target can name)."""
    try:
        tags = check_tags(body.tags)
    except TargetError as exc:
        raise HTTPException(422, str(exc)) from None
    principal.check_device(conn, device_id)
    conn.execute("UPDATE devices SET tags = %s WHERE device_id = %s", (tags, device_id))
    return Tags(device_id=device_id, tags=tags)


@router.get("/devices/{device_id}/tags")
def get_tags(device_id: DeviceId, conn: Conn, principal: Caller) -> Tags:
    principal.check_device(conn, device_id)
    row = conn.execute("SELECT tags FROM devices WHERE device_id = %s", (device_id,)).fetchone()
    return Tags(device_id=device_id, tags=list(row[0]) if row else [])


@router.post("/targets/resolve")
def resolve(body: TargetBody, conn: Conn, principal: Caller) -> Resolved:
    """The devices a target names now (what a rollout created now would reach)."""
    try:
        found = resolve_target(conn, body.target(), principal.schools)
    except TargetError as exc:
        raise HTTPException(422, str(exc)) from None
    return Resolved(count=len(found), devices=[d for d, _ in found[:1000]])


@router.post("/rollouts", status_code=status.HTTP_201_CREATED)
def create(body: RolloutRequest, conn: Conn, principal: Caller, request: Request) -> Rollout:
    if body.command is not None and not principal.may("command"):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"a {principal.role} token may not send commands"
        )
    if body.command is not None:
        check_args(conn, body.command.name, body.command.args, ("command",))
    target = body.target.target()
    try:
        devices = resolve_target(conn, target, principal.schools)
    except TargetError as exc:
        raise HTTPException(422, str(exc)) from None
    if not devices:
        raise HTTPException(422, f"target {target.to_dict()} matches no registered device")
    s = body.strategy
    strategy = ro.Strategy(
        canary=ro.canary_count(len(devices), s.canary, s.canary_share),
        batch_size=s.batch_size,
        pause_s=s.pause_s,
        max_failure_share=s.max_failure_share,
        device_timeout_s=s.device_timeout_s,
    )
    cmd = body.command
    rollout_id = ro.create_rollout(
        conn,
        target=target.to_dict(),
        devices=devices,
        strategy=strategy,
        config=body.config,
        command=None if cmd is None else (cmd.name, cmd.args, cmd.ttl_s),
        created_by=principal.name,
    )
    _wake(request)
    return _get(conn, rollout_id, principal)


def _within(principal: auth.Principal) -> tuple[str, list[Any]]:
    """SQL: rollout ``r`` has no device outside the caller's schools (true when district-wide)."""
    if principal.schools is None:
        return "true", []
    return (
        "NOT EXISTS (SELECT 1 FROM rollout_devices x WHERE x.rollout_id = r.id"
        " AND NOT x.school_id = ANY(%s))",
        [sorted(principal.schools)],
    )


def _get(conn: Conn, rollout_id: int, principal: auth.Principal) -> Rollout:
    """The rollout; 404 as unknown when it reaches a school the caller does not cover."""
    cond, params = _within(principal)
    row = (
        conn.cursor(row_factory=dict_row)
        .execute(
            f"SELECT {_COLUMNS} FROM rollouts r WHERE r.id = %s AND {cond}",  # noqa: S608
            (rollout_id, *params),
        )
        .fetchone()
    )
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no rollout {rollout_id}")
    return Rollout(**_rollout(row))


@router.get("/rollouts")
def list_rollouts(
    conn: Conn,
    principal: Caller,
    state: Annotated[StateName | None, Query()] = None,
    before: Annotated[int | None, Query(ge=1, description="ids below this (paging)")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[Rollout]:
    """Rollouts, newest first, with their counts per outcome."""
    cond, params = _within(principal)
    rows = (
        conn.cursor(row_factory=dict_row)
        .execute(
            f"SELECT {_COLUMNS} FROM rollouts r"  # noqa: S608 - constant columns
            " WHERE (%s::text IS NULL OR r.state = %s) AND (%s::bigint IS NULL OR r.id < %s)"
            f" AND {cond} ORDER BY r.id DESC LIMIT %s",
            (state, state, before, before, *params, limit),
        )
        .fetchall()
    )
    return [Rollout(**_rollout(r)) for r in rows]


@router.get("/rollouts/{rollout_id}")
def get_rollout(
    rollout_id: RolloutId,
    conn: Conn,
    principal: Caller,
    *,
    outcome: Annotated[Outcome | None, Query()] = None,
    after: Annotated[int, Query(ge=-1, description="positions after this (paging)")] = -1,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> RolloutDetail:
    """The rollout, its counts per outcome, and one page of its devices in issue order."""
    head = _get(conn, rollout_id, principal)
    rows = (
        conn.cursor(row_factory=dict_row)
        .execute(
            "SELECT device_id, school_id, position, batch, outcome, detail, command_id,"
            " config_version, attempts, issued_at, settled_at FROM rollout_devices"
            " WHERE rollout_id = %s AND position > %s AND (%s::text IS NULL OR outcome = %s)"
            " ORDER BY position LIMIT %s",
            (rollout_id, after, outcome, outcome, limit + 1),
        )
        .fetchall()
    )
    page = [RolloutDevice(**r) for r in rows[:limit]]
    more = len(rows) > limit
    return RolloutDetail(
        **head.model_dump(), devices=page, next_after=page[-1].position if more else None
    )


def _transition(
    action: str, rollout_id: int, conn: Conn, principal: auth.Principal, request: Request
) -> Rollout:
    _get(conn, rollout_id, principal)  # 404 for a rollout beyond the caller's schools
    try:
        ro.transition(conn, rollout_id, action, principal.name)
    except ro.TransitionError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    _wake(request)
    return _get(conn, rollout_id, principal)


@router.post("/rollouts/{rollout_id}/pause")
def pause(rollout_id: RolloutId, conn: Conn, principal: Caller, request: Request) -> Rollout:
    """Issue no further batch (what is issued still settles)."""
    return _transition("pause", rollout_id, conn, principal, request)


@router.post("/rollouts/{rollout_id}/resume")
def resume(rollout_id: RolloutId, conn: Conn, principal: Caller, request: Request) -> Rollout:
    """Go on from paused, or from halted (an operator's decision to accept the failures)."""
    return _transition("resume", rollout_id, conn, principal, request)


@router.post("/rollouts/{rollout_id}/abort")
def abort(rollout_id: RolloutId, conn: Conn, principal: Caller, request: Request) -> Rollout:
    """Stop for good: devices not yet issued are skipped, unpublished commands withdrawn."""
    return _transition("abort", rollout_id, conn, principal, request)
