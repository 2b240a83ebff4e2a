"""``/api/v1/devices``: the registry, and one device's health as its agent last reported it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from ingest_server.web.api import access, auth
from ingest_server.web.api.common import (
    Conn,
    CursorQ,
    SchoolQ,
    decode_cursor,
    encode_cursor,
    encoded,
    next_link,
)
from schemas.topics import ID_PATTERN

router = APIRouter(prefix="/api/v1/devices", tags=["devices"], dependencies=[access.GUARD])

KINDS: Final = (
    "smart_board",
    "class_signage",
    "card_reader",
    "recording_unit",
    "env_sensor",
    "access_gate",
    "library_terminal",
    "gateway",
)
Kind = Literal[
    "smart_board",
    "class_signage",
    "card_reader",
    "recording_unit",
    "env_sensor",
    "access_gate",
    "library_terminal",
    "gateway",
]
MAX_DEVICES: Final = 10_000


class AgentHealth(BaseModel):
    time: datetime = Field(description="when the agent reported it")
    outbox_depth: int | None = Field(description="events in the outbox not yet acknowledged")
    oldest_unsent_s: float | None
    drivers: dict[str, str] = Field(description="driver name to state")


class Device(BaseModel):
    device_id: str
    school_id: str
    kind: str | None = Field(description="null until the device's first uplink")
    name: str | None
    room: str | None
    class_id: str | None
    grade: str | None
    tags: list[str] = Field(default_factory=list, description="groups a rollout can target")
    state: str | None = Field(description="online or offline, from the device's state topic")
    state_since: datetime | None
    first_seen: datetime
    last_seen: datetime
    agent_version: str | None
    event_count: int
    missing: int = Field(description="seqs between the lowest and highest stored that never came")
    health: AgentHealth | None = Field(
        description="the latest agent.health event, if one came in the day before last_seen"
    )


class DeviceDetail(Device):
    boot: int | None
    min_seq: int | None
    max_seq: int | None


#: A health report older than this before the device's ``last_seen`` counts as none: the bound
#: keeps the search for devices that never report health to a day of their events.
HEALTH_WINDOW: Final = "1 day"

# Each listed device's latest agent.health: newest seq first along the (device_id, seq, time)
# index, only the partitions (chunks) of the day before last_seen. One query for the page.
# The page of devices is cut first (in the subquery, along devices_school_device_idx, migration
# 0075), so health is looked up for its rows only: with the LIMIT outside, PostgreSQL joined
# every matching device before sorting (28,000 lookups for a page of 1,000 at district size).
_SELECT: Final = """
SELECT d.device_id, d.school_id, d.kind, d.name, d.room, d.class_id, d.grade::text AS grade,
       d.tags, d.state, d.state_at AS state_since, d.first_seen, d.last_seen, d.agent_version,
       d.event_count, d.missing, d.boot, d.min_seq, d.max_seq,
       h.time AS health_time, h.data AS health_data
FROM (
    SELECT * FROM devices d WHERE {where} ORDER BY d.school_id, d.device_id LIMIT {limit}
) d
LEFT JOIN LATERAL (
    SELECT e.time, e.data FROM events e
    WHERE e.device_id = d.device_id AND e.type = 'agent.health'
      AND e.time >= d.last_seen - interval '{window}'
    ORDER BY e.seq DESC LIMIT 1
) h ON true
ORDER BY d.school_id, d.device_id
"""


def _query(where: sql.Composable, limit: int) -> sql.Composed:
    return sql.SQL(_SELECT).format(
        window=sql.SQL(HEALTH_WINDOW), where=where, limit=sql.Literal(limit)
    )


@router.get(
    "",
    response_model=list[Device],
    summary="Devices, filtered, each with its agent's latest health; paged by keyset",
    description=(
        "Ordered by school, then device. A full page (``limit``, or 10,000 without it) carries "
        'the next page\'s URL in ``Link: <…>; rel="next"`` and its cursor in ``X-Next-Cursor``: '
        "follow it to walk a district of any size."
    ),
)
def list_devices(
    conn: Conn,
    principal: access.Caller,
    request: Request,
    *,
    school: SchoolQ = None,
    room: Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[^\x00]+$")] = None,
    kind: Kind | None = None,
    state: Literal["online", "offline"] | None = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_DEVICES, description=f"page size (at most {MAX_DEVICES})")
    ] = MAX_DEVICES,
    cursor: CursorQ = None,
) -> Response:
    scoped, params = principal.sql_school_filter("d.school_id")
    parts: list[sql.Composable] = [scoped]
    if cursor is not None:
        after = decode_cursor(cursor, "devices", (str, str))
        parts.append(sql.SQL("(d.school_id, d.device_id) > (%s, %s)"))
        params += list(after)
    for column, value in (("school_id", school), ("room", room), ("kind", kind)):
        if value is not None:
            parts.append(sql.SQL("d.{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if state == "online":
        parts.append(sql.SQL("d.state = 'online'"))
    elif state == "offline":  # never seen online counts as offline
        parts.append(sql.SQL("d.state IS DISTINCT FROM 'online'"))
    query = _query(sql.SQL(" AND ").join(parts), limit)
    rows = conn.cursor(row_factory=dict_row).execute(query, params).fetchall()
    headers = {}
    if len(rows) == limit:
        nxt = encode_cursor("devices", (rows[-1]["school_id"], rows[-1]["device_id"]))
        headers["X-Next-Cursor"] = nxt
        headers["Link"] = f'<{next_link(request, nxt)}>; rel="next"'
    # rows of the model's types, encoded without a validation pass (the same bytes:
    # test_devices_list_bytes_are_the_models)
    return encoded([_listed(r) for r in rows], headers)


@router.get(
    "/{device_id}",
    summary="One device: registry, state, seq gaps and its agent's latest health",
    responses={404: {"description": "no such device"}},
)
def device_detail(
    conn: Conn, principal: access.Caller, device_id: Annotated[str, Path(pattern=ID_PATTERN)]
) -> DeviceDetail:
    principal.check_device(conn, device_id)
    query = _query(sql.SQL("d.device_id = %s"), 1)
    row = conn.cursor(row_factory=dict_row).execute(query, (device_id,)).fetchone()
    if row is None:  # deleted meanwhile
        raise HTTPException(status.HTTP_404_NOT_FOUND, auth.NO_DEVICE.format(device_id))
    return DeviceDetail.model_validate(_with_health(row))


def _listed(row: dict[str, Any]) -> dict[str, Any]:
    """A listing row as :class:`Device` has it: its fields in its order, ``health`` folded."""
    for detail_only in ("boot", "min_seq", "max_seq"):
        del row[detail_only]
    return _with_health(row)


def _with_health(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its health columns folded into ``health`` (an :class:`AgentHealth` as a
    dict, its fields in order; fields of the wrong type: null)."""
    when, data = row.pop("health_time"), row.pop("health_data")
    if when is None:
        return {**row, "health": None}
    data = data if isinstance(data, dict) else {}
    drivers = data.get("drivers")
    health = {
        "time": when,
        "outbox_depth": _int(data.get("outbox_depth")),
        "oldest_unsent_s": _float(data.get("oldest_unsent_s")),
        "drivers": (
            {str(k): str(v) for k, v in drivers.items()} if isinstance(drivers, dict) else {}
        ),
    }
    return {**row, "health": health}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
