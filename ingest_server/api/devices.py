"""``/api/v1/devices``: the registry, and one device's health as its agent last reported it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel, Field

from ingest_server.api import auth
from ingest_server.api.common import ID_PATTERN, Conn, SchoolQ

router = APIRouter(
    prefix="/api/v1/devices", tags=["devices"], dependencies=[Depends(auth.require("read"))]
)

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


class Device(BaseModel):
    device_id: str
    school_id: str
    kind: str | None = Field(description="null until the device's first uplink")
    name: str | None
    room: str | None
    class_id: str | None
    grade: str | None
    state: str | None = Field(description="online or offline, from the device's state topic")
    state_since: datetime | None
    first_seen: datetime
    last_seen: datetime
    agent_version: str | None
    event_count: int
    missing: int = Field(description="seqs between the lowest and highest stored that never came")


class AgentHealth(BaseModel):
    time: datetime = Field(description="when the agent reported it")
    outbox_depth: int | None = Field(description="events in the outbox not yet acknowledged")
    oldest_unsent_s: float | None
    drivers: dict[str, str] = Field(description="driver name to state")


class DeviceDetail(Device):
    boot: int | None
    min_seq: int | None
    max_seq: int | None
    health: AgentHealth | None = Field(description="the latest agent.health event, if any")


_COLUMNS: Final = (
    "device_id, school_id, kind, name, room, class_id, grade::text AS grade, state,"
    " state_at AS state_since, first_seen, last_seen, agent_version, event_count, missing"
)


@router.get("", summary="Devices, filtered")
def list_devices(
    conn: Conn,
    *,
    school: SchoolQ = None,
    room: Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[^\x00]+$")] = None,
    kind: Kind | None = None,
    state: Literal["online", "offline"] | None = None,
) -> list[Device]:
    parts: list[sql.Composable] = [sql.SQL("true")]
    params: list[Any] = []
    for column, value in (("school_id", school), ("room", room), ("kind", kind)):
        if value is not None:
            parts.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if state == "online":
        parts.append(sql.SQL("state = 'online'"))
    elif state == "offline":  # never seen online counts as offline
        parts.append(sql.SQL("state IS DISTINCT FROM 'online'"))
    query = sql.SQL(
        "SELECT {} FROM devices WHERE {} ORDER BY school_id, device_id LIMIT {}"
    ).format(sql.SQL(_COLUMNS), sql.SQL(" AND ").join(parts), sql.Literal(MAX_DEVICES))
    rows = conn.cursor(row_factory=dict_row).execute(query, params).fetchall()
    return [Device.model_validate(r) for r in rows]


@router.get(
    "/{device_id}",
    summary="One device: registry, state, seq gaps and its agent's latest health",
    responses={404: {"description": "no such device"}},
)
def device_detail(conn: Conn, device_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> DeviceDetail:
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(
        sql.SQL("SELECT {}, boot, min_seq, max_seq FROM devices WHERE device_id = %s").format(
            sql.SQL(_COLUMNS)
        ),
        (device_id,),
    ).fetchone()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {device_id!r}")
    # Newest first along the (device_id, seq) index: health reports are frequent.
    health = cur.execute(
        "SELECT time, data FROM events WHERE device_id = %s AND type = 'agent.health'"
        " ORDER BY seq DESC LIMIT 1",
        (device_id,),
    ).fetchone()
    detail = DeviceDetail.model_validate({**row, "health": None})
    if health is not None:
        data = health["data"] if isinstance(health["data"], dict) else {}
        drivers = data.get("drivers")
        detail.health = AgentHealth(
            time=health["time"],
            outbox_depth=_int(data.get("outbox_depth")),
            oldest_unsent_s=_float(data.get("oldest_unsent_s")),
            drivers=(
                {str(k): str(v) for k, v in drivers.items()} if isinstance(drivers, dict) else {}
            ),
        )
    return detail


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
