"""``/docs``: Swagger UI served from this server (the ``swagger-ui-bundle-v2`` package), not a CDN.

The page's one inline script (Swagger UI's start-up call, written by FastAPI) is allowed by its
SHA-256 in the page's Content-Security-Policy; nothing else inline runs, and nothing is loaded
from another host.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Final

from fastapi import FastAPI, HTTPException, status
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

ASSETS_PATH: Final = "/docs/assets"
#: The files the page uses, and their types; nothing else of the package is served.
ASSETS: Final = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
_INLINE_SCRIPT: Final = re.compile(rb"<script>(.*?)</script>", re.S)


def page_policy(html: bytes) -> str:
    """A CSP for ``html`` allowing same-origin files and, by hash, its inline scripts."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(m).digest()).decode()}'"
        for m in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )


def mount(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` for ``app.openapi_url`` (create the app with
    ``docs_url=None``, so FastAPI's CDN-loading page is not there too)."""
    assets = Path(str(swagger_ui_path))
    html = bytes(
        get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
            # Swagger UI would otherwise show a badge image from its public validator.
            swagger_ui_parameters={"validatorUrl": None},
        ).body
    )
    policy = page_policy(html)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": policy})

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    def asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no such docs asset: {name!r}")
        return FileResponse(assets / name, media_type=media_type)
