"""The technicians' and district staff's dashboard: static pages served at ``/dashboard/``.

The pages carry no data and need no token; every call they make to ``/api/v1`` does. The chart
library comes from npm (``npm ci`` at the repository root) and is served at
``/dashboard/vendor/`` when it is there; without it the pages work and say charts are missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR: Final = Path(__file__).parent / "static"
#: Where ``npm ci`` puts the chart library in a source checkout.
_REPO_VENDOR: Final = Path(__file__).resolve().parents[3] / "node_modules" / "echarts" / "dist"


def vendor_dir() -> Path | None:
    """The chart library's directory (``CAMPUS_DASHBOARD_VENDOR`` overrides), if present."""
    configured = os.environ.get("CAMPUS_DASHBOARD_VENDOR")
    path = Path(configured) if configured else _REPO_VENDOR
    return path if (path / "echarts.esm.min.mjs").is_file() else None


def mount(app: FastAPI) -> None:
    """Serve the dashboard at ``/dashboard/`` (and its chart library, if installed)."""
    vendor = vendor_dir()
    if vendor is not None:
        # before /dashboard: Starlette takes the first mount whose prefix matches
        app.mount("/dashboard/vendor", StaticFiles(directory=vendor), name="dashboard-vendor")
    app.mount("/dashboard", StaticFiles(directory=STATIC_DIR, html=True), name="dashboard")

    @app.get("/dashboard", include_in_schema=False)
    def dashboard_slash() -> RedirectResponse:
        return RedirectResponse("/dashboard/", status_code=308)
