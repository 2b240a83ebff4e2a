"""``/api/v1/schools/summary``: every school of the caller in one call, for a district's front
page: devices, online, offline, today's attendance and open alerts."""

from __future__ import annotations

from typing import Final

from fastapi import APIRouter
from psycopg import sql
from pydantic import BaseModel, Field

from ingest_server.web.api import access
from ingest_server.web.api.common import Conn, Now

router = APIRouter(prefix="/api/v1/schools", tags=["schools"], dependencies=[access.GUARD])

#: Event types that count a student as present: a campus-card tap, a class check-in, a gate pass.
ATTENDANCE_TYPES: Final = ("card.tap", "attendance.checkin", "access.pass")


class SchoolSummary(BaseModel):
    school_id: str
    devices: int
    online: int
    offline: int = Field(description="devices not online (never seen online counts as offline)")
    attendance_today: int = Field(
        description="card taps, class check-ins and gate passes since the district's midnight"
    )
    open_alerts: int = Field(description="alerts open or acknowledged, not yet resolved")


_QUERY: Final = """
WITH d AS (
    SELECT school_id, count(*) AS devices,
           count(*) FILTER (WHERE state = 'online') AS online
    FROM devices WHERE {scope_d} GROUP BY school_id
), a AS (
    SELECT school_id, count(*) AS attendance FROM events
    WHERE time >= %(since)s AND type = ANY(%(types)s) AND {scope_e}
    GROUP BY school_id
), al AS (
    SELECT school_id, count(*) AS open_alerts FROM alerts
    WHERE state <> 'resolved' AND {scope_a} GROUP BY school_id
)
SELECT d.school_id, d.devices, d.online, d.devices - d.online AS offline,
       coalesce(a.attendance, 0) AS attendance_today, coalesce(al.open_alerts, 0) AS open_alerts
FROM d LEFT JOIN a USING (school_id) LEFT JOIN al USING (school_id)
ORDER BY d.school_id
"""


@router.get("/summary", summary="Per school: devices online and offline, attendance, alerts")
def schools_summary(conn: Conn, principal: access.Caller, now: Now) -> list[SchoolSummary]:
    schools = None if principal.schools is None else sorted(principal.schools)

    def scope(col: str) -> sql.Composable:
        if schools is None:
            return sql.SQL("true")
        return sql.SQL("{} = ANY(%(schools)s)").format(sql.Identifier(col))

    query = sql.SQL(_QUERY).format(
        scope_d=scope("school_id"), scope_e=scope("school_id"), scope_a=scope("school_id")
    )
    # the district's midnight (its time zone, not UTC's) as a timestamptz
    row = conn.execute(
        "SELECT date_trunc('day', %s::timestamptz AT TIME ZONE district_tz)"
        " AT TIME ZONE district_tz FROM storage_config",
        (now,),
    ).fetchone()
    assert row is not None, "storage_config has its one row from migration 0002"
    since = row[0]
    params = {"since": since, "types": list(ATTENDANCE_TYPES), "schools": schools}
    rows = conn.execute(query, params).fetchall()
    return [
        SchoolSummary(
            school_id=r[0],
            devices=r[1],
            online=r[2],
            offline=r[3],
            attendance_today=r[4],
            open_alerts=r[5],
        )
        for r in rows
    ]
