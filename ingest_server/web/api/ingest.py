"""HTTP ingest: a device's uplink batch over HTTP (``POST /api/v1/devices/{device_id}/up``)
and vendor platforms' webhooks mapped to contract events (``POST
/api/v1/ingest/webhooks/{source}``).

No API token on either (access.py, scoping ``device_credentials`` / ``webhook``): a device
authenticates with its own MQTT credentials (HTTP Basic, username = device_id), checked against
``device_credentials`` as the broker checks them; a webhook with its source's shared secret or
HMAC signature (:mod:`ingest_server.ingest.webhook`). Failed credentials are limited per client
address before any database work; each device has a request rate; the write goes to the HTTP
writer (:mod:`ingest_server.ingest.http`), never through an API pool connection, and the answer
comes only after commit: 200 ``{"stored", "duplicates", "quarantined"}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.concurrency import run_in_threadpool

from ingest_server.control.broker_auth import verify_password
from ingest_server.control.enrolment import FailureLimiter
from ingest_server.ingest import webhook
from ingest_server.ingest.batch import Inbound
from ingest_server.ingest.http import Busy, HttpIngest, Job, Refused
from ingest_server.ingest.writer import WriteResult
from schemas.errors import ContractError
from schemas.topics import Channel, build, check_id

router = APIRouter(tags=["ingest"])

#: How long a request waits for its commit before answering 503 (the device retries; the
#: write, if it still lands, makes the retry a duplicate, never a second copy).
COMMIT_WAIT_S: Final = 15.0
#: Seconds a client is told to wait when the writer is busy or the database down.
RETRY_AFTER_S: Final = 2
_BASIC_REALM: Final = {"WWW-Authenticate": 'Basic realm="campus-edge device"'}


class RateLimiter:
    """A token bucket per key (a device, a webhook source): ``rate`` requests a second, up to
    ``burst`` at once. Memory is bounded: the least recently seen keys are forgotten."""

    def __init__(self, rate: float = 5.0, burst: float = 20.0, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float | None:
        """None if ``key`` may go now (a token is spent), else seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens - 1.0, now)
            self._buckets.move_to_end(key)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return None


@dataclass(slots=True)
class IngestState:
    """``app.state.http_ingest``: the writer, the limiters and the webhook sources."""

    writer: HttpIngest
    sources: dict[str, webhook.Mapping] = field(default_factory=dict)
    failures: FailureLimiter = field(default_factory=FailureLimiter)
    rates: RateLimiter = field(default_factory=RateLimiter)


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status, headers=headers)


def _basic(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _school_of(pool: ConnectionPool[Any], device_id: str, password: str) -> str | None:
    """The device's school if ``password`` is its live credential's, else None (one indexed
    read on a pooled connection, returned before the hash is checked)."""
    with pool.connection(timeout=5) as conn:
        row = conn.execute(
            "SELECT school_id, password_hash FROM device_credentials"
            " WHERE device_id = %s AND revoked_at IS NULL",
            (device_id,),
        ).fetchone()
    if row is None or not verify_password(password, row[1]):
        return None
    return str(row[0])


def _counts(result: WriteResult) -> dict[str, int]:
    return {
        "stored": result.inserted,
        "duplicates": result.duplicates,
        "quarantined": result.quarantined,
    }


async def _commit(state: IngestState, job: Job) -> JSONResponse:
    """Queue ``job`` and answer after its commit (200 with counts), or why not."""
    busy = {"Retry-After": str(RETRY_AFTER_S)}
    try:
        future = state.writer.submit(job)
    except Busy as exc:
        return _error(503, f"HTTP ingest is busy: {exc}; try again shortly", busy)
    try:
        result = await asyncio.wait_for(asyncio.wrap_future(future), COMMIT_WAIT_S)
    except TimeoutError:
        return _error(503, f"not committed within {COMMIT_WAIT_S:g} s; send it again", busy)
    except Refused as exc:
        return _error(exc.status, exc.detail)
    except psycopg.Error as exc:
        why = " ".join(str(exc).split())[:200]
        return _error(503, f"the database is unavailable ({why}); send it again", busy)
    return JSONResponse(_counts(result), 200)


def _unavailable(state: IngestState | None) -> JSONResponse | None:
    if state is None:
        return _error(404, "HTTP ingest is not available on this server")
    return None


def _admit(request: Request, what: str) -> tuple[IngestState, str] | JSONResponse:
    """The ingest state and the client's address, or the answer when HTTP ingest is off or the
    address has failed too many ``what`` logins lately (checked before any database work)."""
    state: IngestState | None = getattr(request.app.state, "http_ingest", None)
    if (off := _unavailable(state)) is not None:
        return off
    assert state is not None
    client = request.client.host if request.client else "unknown"
    if (wait := state.failures.retry_after(client)) is not None:
        return _error(
            429,
            f"too many failed {what} logins from {client}; try again later",
            {"Retry-After": str(int(wait) + 1)},
        )
    return state, client


@router.post("/api/v1/devices/{device_id}/up")
async def device_uplink(device_id: str, request: Request) -> JSONResponse:
    """A device's uplink batch (the MQTT ``up`` payload) over HTTP, authenticated with the
    device's MQTT credentials (HTTP Basic). Answered after commit with what was stored, what
    was stored already (a retry), and what went to quarantine (with its reason there)."""
    admitted = _admit(request, "device")
    if isinstance(admitted, JSONResponse):
        return admitted
    state, client = admitted
    creds = _basic(request)
    if creds is None:
        return _error(401, "device credentials required (HTTP Basic: device_id, password)",
                      _BASIC_REALM)  # fmt: skip
    user, password = creds
    try:
        check_id(device_id, "device_id")
    except ContractError:
        user = ""  # as wrong credentials: no hint of which ids exist
    school = None
    if user == device_id:
        try:
            school = await run_in_threadpool(_school_of, request.app.state.pool, user, password)
        except (psycopg.Error, PoolTimeout) as exc:
            why = " ".join(str(exc).split())[:200]
            return _error(503, f"cannot check credentials now ({why})",
                          {"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    if school is None:
        state.failures.failed(client)
        return _error(401, "wrong device credentials", _BASIC_REALM)
    if (wait := state.rates.take(device_id)) is not None:
        return _error(
            429,
            f"device {device_id} sends too often; wait {wait:.1f} s",
            {"Retry-After": str(int(wait) + 1)},
        )
    inbound = Inbound(
        topic=build(school, device_id, Channel.UP),
        payload=await request.body(),
        mid=0,
        qos=1,
        received_at=datetime.now(UTC),
    )
    return await _commit(state, Job(messages=[inbound]))


@router.post("/api/v1/ingest/webhooks/{source}")
async def vendor_webhook(source: str, request: Request) -> JSONResponse:
    """A vendor platform's own JSON, turned into contract events by the source's mapping file
    (docs/webhooks.md); 422 naming the JSON path when it does not fit the mapping."""
    admitted = _admit(request, "webhook")
    if isinstance(admitted, JSONResponse):
        return admitted
    state, client = admitted
    mapping = state.sources.get(source)
    body = await request.body()
    if mapping is None or not mapping.authenticate(request.headers, body):
        # an unknown source and a wrong secret alike: no hint of which sources exist
        state.failures.failed(client)
        return _error(401, f"webhook {source!r}: unknown source or wrong secret/signature")
    if (wait := state.rates.take(f"webhook:{source}")) is not None:
        return _error(
            429,
            f"webhook {source!r} sends too often; wait {wait:.1f} s",
            {"Retry-After": str(int(wait) + 1)},
        )
    try:
        mapped = mapping.map(body)
    except webhook.MappingError as exc:
        return _error(422, exc.detail())
    now = datetime.now(UTC)
    return await _commit(state, Job(build=lambda conn: mapped.messages(conn, now)))


__all__ = ["IngestState", "RateLimiter", "router"]
