"""``/api/v1/meta``: what a client needs before it asks anything else.

The district's time zone and today's date in it (rollup days are district-local, so "today"
is that day, not the UTC one), the server's version, and what the caller's token may do (its
role, schools and permissions: the dashboard shows and offers only what they allow).
"""

from __future__ import annotations

import functools
from datetime import date, datetime
from importlib import metadata

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ingest_server.web.api import access, auth
from ingest_server.web.api.common import Conn

router = APIRouter(prefix="/api/v1", tags=["meta"], dependencies=[access.GUARD])


class Meta(BaseModel):
    timezone: str = Field(description="the district's IANA time zone (storage_config)")
    today: date = Field(description="today in the district's time zone")
    today_start: datetime = Field(description="local midnight that began today")
    server_version: str
    token_name: str
    role: auth.Role = Field(description="the caller's token's role")
    schools: list[str] | None = Field(description="the schools it is limited to; null: all")
    permissions: list[auth.Permission] = Field(description="what its role may do")
    scopes: list[str] = Field(
        description="deprecated: 'admin' for district_admin, 'read' for any other role"
    )


@functools.cache  # the installed version does not change while the server runs; the lookup
def _version() -> str:  # scans the installed distributions (~0.5 ms of every /meta call)
    try:
        return metadata.version("campus-edge")
    except metadata.PackageNotFoundError:
        return "unknown"


@router.get("/meta", summary="District time zone and today, server version, caller's scopes")
def meta(conn: Conn, token: access.Caller) -> Meta:
    row = conn.execute(
        "SELECT district_tz, (now() AT TIME ZONE district_tz)::date,"
        " date_trunc('day', now() AT TIME ZONE district_tz) AT TIME ZONE district_tz"
        " FROM storage_config"
    ).fetchone()
    assert row is not None, "storage_config has its one row from migration 0002"
    return Meta(
        timezone=row[0],
        today=row[1],
        today_start=row[2],
        server_version=_version(),
        token_name=token.name,
        role=token.role,
        schools=None if token.schools is None else sorted(token.schools),
        permissions=[p for p in auth.PERMISSIONS if token.may(p)],
        scopes=sorted(token.scopes),
    )
