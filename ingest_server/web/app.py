"""HTTP: ``/healthz`` for orchestration, ``/metrics`` for Prometheus and the ``/api/v1`` API
(OpenAPI at ``/openapi.json``, browsable at ``/docs``), served by uvicorn."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ingest_server.ingest.consumer import Health
from ingest_server.metrics import CONTENT_TYPE, IngestMetrics
from ingest_server.web import api_docs
from ingest_server.web.api import (
    access,
    answer_cache,
    auth,
    data,
    devices,
    enrol,
    export,
    ingest,
    live,
    meta,
    quarantine,
    rollups,
    tokens,
)
from ingest_server.web.api import alerts as alerts_api
from ingest_server.web.api import commands as commands_api
from ingest_server.web.api import config as config_api
from ingest_server.web.api import releases as releases_api
from ingest_server.web.api import rollouts as rollouts_api
from ingest_server.web.api import schools as schools_api
from ingest_server.web.api.deps import install_error_handlers, make_pool
from ingest_server.web.api.limits import RequestLimits
from ingest_server.web.dashboard import mount as mount_dashboard
from ingest_server.web.headers import SecurityHeaders
from ingest_server.web.http_protocol import BoundedHttpToolsProtocol
from ingest_server.web.live import LiveHub
from ingest_server.web.tls import TlsFiles

log = logging.getLogger(__name__)


class HealthSource(Protocol):
    def health(self) -> Health: ...


def create_app(
    source: HealthSource,
    metrics: IngestMetrics,
    db_url: str | None = None,
    token_file: Path | None = None,
) -> FastAPI:
    """The app; with ``db_url`` also the token-guarded API (its pool is ``app.state.pool``)."""
    app = FastAPI(
        title="campus-edge ingest server",
        description="Device data of the district's classrooms. Every endpoint but /healthz "
        "needs an API token (Authorization: Bearer <token>) whose role allows it; a token "
        "limited to schools sees only their rows and devices (docs/api.md, Roles).",
        version="1",
        docs_url=None,  # api_docs serves /docs from a package, not a CDN
        redoc_url=None,
    )
    app.add_middleware(SecurityHeaders)
    app.state.metrics = metrics
    api_docs.mount(app)
    if db_url is not None:
        app.add_middleware(RequestLimits)
        app.state.pool = make_pool(db_url)
        app.state.tokens = auth.TokenChecker(app.state.pool.connection, token_file)
        install_error_handlers(app)
        app.include_router(tokens.router)
        app.include_router(meta.router)
        app.state.live = LiveHub()
        app.state.live_slots = live.new_slots()
        app.state.export_slots = export.new_slots()
        app.state.answer_cache = answer_cache.AnswerCache()
        app.include_router(devices.router)
        app.include_router(schools_api.router)
        app.include_router(data.router)
        app.include_router(export.router)
        app.include_router(rollups.router)
        app.include_router(quarantine.router)
        app.include_router(alerts_api.router)
        app.include_router(live.router)
        app.include_router(commands_api.router)
        app.include_router(config_api.router)
        app.include_router(enrol.codes)
        app.include_router(enrol.router)
        app.include_router(rollouts_api.router)
        app.include_router(releases_api.router)
        app.include_router(ingest.router)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        h = source.health()
        stuck = list(h.stuck)
        body: dict[str, Any] = {
            "status": "ok" if h.mqtt_connected and h.db_ok else "down",
            "mqtt": "connected" if h.mqtt_connected else "disconnected",
            "db": "ok" if h.db_ok else "down",
            "queued_messages": h.queued,
            "last_commit_age_s": (
                None if h.last_commit_age_s is None else round(h.last_commit_age_s, 3)
            ),
            # The agents' clock reference (edge_agent.clock): UTC, to the millisecond.
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        control = getattr(app.state, "control", None)  # set by IngestServer once it runs
        if control is not None:
            c = control.health()
            stuck += c.stuck
            body["control"] = {
                "mqtt": "connected" if c.mqtt_connected else "disconnected",
                "db": "ok" if c.db_ok else "down",
                "leader": c.leader,
                "inbox_messages": c.inbox,
                "inflight": c.inflight,
                "pending_commands": c.pending_commands,
                "pending_configs": c.pending_configs,
            }
        alerts = getattr(app.state, "alerts", None)  # the alert engine, set by IngestServer
        if alerts is not None:
            stuck += alerts.stuck()
        body["stuck"] = stuck
        metrics.stuck.set(1 if stuck else 0)
        if stuck:  # connected, but work is not moving: as down as a lost connection
            body["status"] = "down"
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    # /metrics counts the whole district: district_admin and service only (access.ROUTES)
    guard = [access.GUARD] if db_url is not None else []
    mount_dashboard(app)

    @app.get("/metrics", dependencies=guard, response_class=PlainTextResponse)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def connection_limits() -> dict[str, Any]:
    """uvicorn's own bounds on clients (bodies are bounded by the API's RequestLimits).

    The HTTP parser (httptools, bounded: :mod:`http_protocol`) refuses a request head over
    64 KiB with 431 but gives it no time limit; an idle kept-alive connection is closed after
    ``timeout_keep_alive``; past ``limit_concurrency`` connections and requests, new requests
    get 503 at once instead of queueing, so a flood of connections costs file descriptors, not
    memory and threads. The event loop is uvloop where it is installed (not on Windows).
    """
    return {
        "http": BoundedHttpToolsProtocol,
        "loop": "auto",
        "timeout_keep_alive": 5,
        "limit_concurrency": 1000,
    }


class HttpServer:
    """uvicorn on a thread of its own, on a socket bound before it starts (so port 0 works);
    over TLS when given a certificate and key."""

    STOP_TIMEOUT_S = 10.0

    def __init__(self, app: FastAPI, host: str, port: int, tls: TlsFiles | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP, so asyncio sets TCP_NODELAY on accepted connections (it checks
        # the proto; create_server leaves it 0): without it each response waited ~40 ms for a
        # delayed ACK, its headers and body being separate writes.
        self._sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(socket.SOMAXCONN)
        except OSError:
            self._sock.close()
            raise
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self.tls = tls
        self.app = app
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=None if tls is None else tls.cert,
            ssl_keyfile=None if tls is None else tls.key,
            **connection_limits(),
        )
        if tls is not None:
            try:
                config.load()  # builds uvicorn's SSLContext now, so it can be tightened
            except BaseException:
                self._sock.close()
                raise
            assert config.ssl is not None
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="ingest-http",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        log.info("HTTP on %s (/healthz, /metrics)", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self.STOP_TIMEOUT_S)
        self._sock.close()
