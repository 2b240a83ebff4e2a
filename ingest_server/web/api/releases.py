"""``/api/v1/releases``: signed agent releases (added with ``ingest-server release add``).

The listing needs a ``read`` token and gives, per release, the ``update_agent`` args to send,
ready to paste into a command or a rollout: the ``url`` is absolute, under ``--public-url``
when the server has one, else under the address the request came to (behind a reverse proxy
that rewrites the address, set ``--public-url``). The
wheel download is open to anyone: agents hold MQTT credentials, not API tokens, and a wheel is
not secret; agents install only what verifies against the release public key in their local
config, so a public download cannot make them run anything.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi import Path as PathParam
from pydantic import BaseModel

from ingest_server.control import releases
from ingest_server.web.api.access import Caller
from ingest_server.web.api.deps import db
from schemas.release import VERSION_PATTERN

router = APIRouter(prefix="/api/v1/releases", tags=["releases"])
Conn = Annotated[psycopg.Connection[Any], Depends(db)]
Version = Annotated[str, PathParam(pattern=VERSION_PATTERN, description="the release version")]


class UpdateArgsOut(BaseModel):
    version: str
    url: str
    sha256: str
    signature: str


class ReleaseInfo(BaseModel):
    version: str
    sha256: str
    signature: str
    size: int
    created_at: datetime
    update_args: UpdateArgsOut


def public_base(request: Request) -> str:
    """Where agents reach this server: ``--public-url``, else the request's own base URL."""
    configured: str | None = getattr(request.app.state, "public_url", None)
    return (configured or str(request.base_url)).rstrip("/")


@router.get("")
def list_releases(conn: Conn, _principal: Caller, request: Request) -> list[ReleaseInfo]:
    base = public_base(request)
    return [
        ReleaseInfo(
            version=r.version,
            sha256=r.sha256,
            signature=r.signature,
            size=r.size,
            created_at=r.created_at,
            update_args=UpdateArgsOut(
                version=r.version,
                url=base + releases.WHEEL_PATH.format(version=r.version),
                sha256=r.sha256,
                signature=r.signature,
            ),
        )
        for r in releases.list_releases(conn)
    ]


@router.get(
    "/{version}/wheel",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_wheel(version: Version, conn: Conn) -> Response:
    found = releases.wheel(conn, version)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no release {version}")
    digest, data = found
    return Response(
        data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="campus_edge-{version}-py3-none-any.whl"',
            "X-Content-SHA256": digest,
            "Cache-Control": "public, max-age=86400, immutable",
        },
    )
