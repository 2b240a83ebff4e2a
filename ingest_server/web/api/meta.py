"""``/api/v1/meta``: what a client needs before it asks anything else.

The district's time zone and today's date in it (rollup days are district-local, so "today"
is that day, not the UTC one), the server's version, and what the caller's token may do.
"""

from __future__ import annotations

from datetime import date, datetime
from importlib import metadata
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from ingest_server.web.api import auth
from ingest_server.web.api.common import Conn

router = APIRouter(prefix="/api/v1", tags=["meta"])


class Meta(BaseModel):
    timezone: str = Field(description="the district's IANA time zone (storage_config)")
    today: date = Field(description="today in the district's time zone")
    today_start: datetime = Field(description="local midnight that began today")
    server_version: str
    token_name: str
    scopes: list[str] = Field(description="the caller's token scopes ('admin' implies 'read')")


def _version() -> str:
    try:
        return metadata.version("campus-edge")
    except metadata.PackageNotFoundError:
        return "unknown"


@router.get("/meta", summary="District time zone and today, server version, caller's scopes")
def meta(conn: Conn, token: Annotated[auth.Token, Depends(auth.require("read"))]) -> Meta:
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
        scopes=sorted(token.scopes),
    )
