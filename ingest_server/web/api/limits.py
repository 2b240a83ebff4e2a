"""Limits no HTTP client can get round: request bodies, and the slots of long-lived responses.

:class:`RequestLimits` is pure ASGI middleware in front of the whole app. A request with a body
is refused before anything else sees it when its ``Content-Length`` exceeds the route's cap
(413); a token-guarded route's token is checked before its body is read (401/429); then the
body is read here, counting bytes as they arrive, refused at the cap without reading more (413)
and given ``BODY_TIMEOUT_S`` in all (408). Only then does the app run, with the body in memory,
so no endpoint ever waits on a slow client while it holds a database connection.

:class:`SlotLimiter` shares a fixed number of slots (live streams, exports) between tokens: one
token holds at most ``per_token``, and the last ``reserved`` are for admin tokens only, so an
administrator always gets in.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from collections.abc import AsyncIterable, Callable
from typing import Any, ClassVar, Final

import anyio
import psycopg
from fastapi import HTTPException, status
from fastapi.responses import StreamingResponse
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest_server.web.api import auth
from ingest_server.web.api.deps import validation_detail
from schemas.limits import JsonLimits, check_json
from schemas.uplink import DEFAULT_MAX_BYTES

log = logging.getLogger(__name__)

#: Seconds a client has to send a whole request body (a slowloris body gets 408 after this).
BODY_TIMEOUT_S: Final = 10.0
#: Largest body of a route not named in ``BODY_CAPS``.
DEFAULT_BODY_CAP: Final = 64 * 1024
#: Largest body per route (path prefix, longest match wins); sized to each endpoint's own bound.
BODY_CAPS: Final[dict[str, int]] = {
    "/api/v1/enrol": 16 * 1024,
    "/api/v1/enrolment-codes": 4 * 1024,
    "/api/v1/tokens": 4 * 1024,
    "/api/v1/devices": 1024 * 1024,  # config documents (256 KiB as compact JSON), commands
    "/api/v1/rollouts": 1024 * 1024,  # a config document and a target's explicit device ids
    "/api/v1/targets": 1024 * 1024,  # a target's explicit device ids
    "/api/v1/alerts": 1024,  # acknowledge / resolve take no body
    "/api/v1/releases": 1024,  # read-only: releases are added offline-signed with the CLI
    "/api/v1/ingest/webhooks": 1024 * 1024,  # a vendor platform's JSON, mapped to events
    "/api/v1/rollups": 1024,  # read-only
    "/api/v1/schools": 1024,  # read-only summaries
}
#: A device's HTTP uplink (``POST /api/v1/devices/{device_id}/up``): a path no prefix of
#: ``BODY_CAPS`` can tell from the config routes beside it.
DEVICE_UPLINK: Final = re.compile(r"/api/v1/devices/[^/]+/up")
#: Its cap: the uplink batch's own limit, as on MQTT (a larger body gets 413, not quarantine).
DEVICE_UPLINK_CAP: Final = DEFAULT_MAX_BYTES
#: Routes under ``/api/`` that take a body without a token (the body authenticates).
OPEN_ROUTES: Final = frozenset({"/api/v1/enrol"})
#: Open routes by pattern: the device's uplink (its MQTT credentials authenticate) and the
#: webhooks (the source's secret or signature authenticates), checked in the endpoint.
OPEN_PATTERNS: Final = (DEVICE_UPLINK, re.compile(r"/api/v1/ingest/webhooks/[^/]+"))


def is_open(path: str) -> bool:
    """Whether ``path`` takes no API token (its endpoint authenticates the caller)."""
    return path in OPEN_ROUTES or any(p.fullmatch(path) for p in OPEN_PATTERNS)


#: Nesting and string bounds of a JSON request body (its size is the route's cap); a body
#: that breaks one, or holds a ``\u0000`` the database cannot store, gets 422 before the route.
BODY_DEPTH: Final = 32
BODY_STRING: Final = 64 * 1024
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


def body_cap(path: str, caps: dict[str, int] = BODY_CAPS) -> int:
    if caps is BODY_CAPS and DEVICE_UPLINK.fullmatch(path):
        return DEVICE_UPLINK_CAP
    best = ""
    for prefix in caps:
        if (path == prefix or path.startswith(prefix + "/")) and len(prefix) > len(best):
            best = prefix
    return caps[best] if best else DEFAULT_BODY_CAP


class _Refused(Exception):
    def __init__(self, code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = headers or {}


async def _reply(send: Send, refusal: _Refused, *, close: bool) -> None:
    detail: Any = refusal.detail
    if refusal.code == 422:
        detail = validation_detail("body", refusal.detail)
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in refusal.headers.items()),
    ]
    if close:  # the rest of the body is not read, so the connection cannot be reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": refusal.code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestLimits:
    """Pure ASGI middleware: body size and time caps, and the token checked before the body."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        caps: dict[str, int] | None = None,
        body_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.caps = BODY_CAPS if caps is None else caps
        self.body_timeout_s = BODY_TIMEOUT_S if body_timeout_s is None else body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if b"%00" in scope.get("query_string", b"") or "\x00" in scope["path"]:
            nul = _Refused(400, "the URL holds a NUL character (%00), which nothing here takes")
            await _reply(send, nul, close=False)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if scope["method"] not in _BODY_METHODS and not chunked and declared in (None, b"0"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        cap = body_cap(path, self.caps)
        try:
            if declared is not None:
                if not declared.isdigit():
                    raise _Refused(400, "the Content-Length header must be a whole number")
                if int(declared) > cap:
                    raise _Refused(413, _too_large(path, cap, f"declares {int(declared)} bytes"))
            if path.startswith("/api/") and not is_open(path):
                await _check_token(scope)
            body = await self._read(receive, path, cap)
        except _Refused as refusal:
            await _reply(send, refusal, close=refusal.code in (400, 408, 413))
            return
        if body is None:  # the client went away
            return
        # an uplink batch is judged by the uplink decoder, as on MQTT: what it refuses is
        # quarantined with its reason rather than answered 422 here
        uplink = DEVICE_UPLINK.fullmatch(path) is not None
        limits = JsonLimits(cap, BODY_DEPTH, BODY_STRING)
        if body and not uplink and (problem := check_json(body, limits)):
            bad = _Refused(422, f"the request body is refused: {problem.reason}")
            await _reply(send, bad, close=False)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, path: str, cap: int) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.body_timeout_s) as timer:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > cap:
                    raise _Refused(413, _too_large(path, cap, "sent more"))
                parts.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(parts)
        assert timer.cancel_called
        raise _Refused(
            status.HTTP_408_REQUEST_TIMEOUT,
            f"the request body did not arrive within {self.body_timeout_s:g} s ({size} bytes came)",
        )


def _too_large(path: str, cap: int, what: str) -> str:
    return f"the request body is too large: {path} takes at most {cap} bytes; this one {what}"


def _replay(body: bytes, receive: Receive) -> Receive:
    """The whole body as one message, then the client's own messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _check_token(scope: Scope) -> None:
    """401/403/429 as the route's own guard would answer, before the body is read."""
    request = Request(scope)
    if getattr(request.app.state, "tokens", None) is None:
        return
    try:
        # any valid token passes here (every scope includes read); the route checks its scope
        await anyio.to_thread.run_sync(auth.authenticate, request, "read")
    except HTTPException as exc:
        raise _Refused(exc.status_code, str(exc.detail), dict(exc.headers or {})) from None
    except (psycopg.Error, PoolTimeout):
        pass  # the database cannot say: the route's own guard answers 503 with the reason


class SlotsFull(Exception):
    """No slot for this token now; ``detail`` says which limit, ``retry_after_s`` when to try."""

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s

    def http(self) -> HTTPException:
        return HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            self.detail,
            headers={"Retry-After": str(self.retry_after_s)},
        )


class SlotLimiter:
    """``total`` slots; at most ``per_token`` per token; the last ``reserved`` for admins."""

    def __init__(
        self, what: str, total: int, per_token: int, reserved: int = 1, retry_after_s: int = 10
    ) -> None:
        if not 0 <= reserved < total or per_token < 1:
            raise ValueError(f"{what}: need 0 <= reserved < total and per_token >= 1")
        self.what = what
        self.total = total
        self.per_token = per_token
        self.reserved = reserved
        self.retry_after_s = retry_after_s
        self._held: Counter[int] = Counter()
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._held.total()

    def acquire(self, token: auth.Token) -> None:
        """Take a slot for ``token`` or raise :class:`SlotsFull` saying which limit stops it."""
        admin = token.role == "district_admin"
        with self._lock:
            used = self._held.total()
            if self._held[token.id] >= self.per_token:
                raise SlotsFull(
                    f"token {token.name!r} has {self.per_token} {self.what} open already "
                    f"(at most {self.per_token} per token); close one or wait",
                    self.retry_after_s,
                )
            room = self.total if admin else self.total - self.reserved
            if used >= room:
                raise SlotsFull(
                    f"{used} {self.what} are open, the most this server allows "
                    f"(the last {self.reserved} are kept for administrators); try again later",
                    self.retry_after_s,
                )
            self._held[token.id] += 1

    def release(self, token: auth.Token) -> None:
        with self._lock:
            self._held[token.id] -= 1
            if self._held[token.id] <= 0:
                del self._held[token.id]


class HeldResponse(StreamingResponse):
    """A streamed response holding a slot, released the moment the response ends however it
    ends (finished, client gone, or ``STALL_S`` without the client taking a chunk)."""

    #: Seconds one chunk may wait for a client that stopped reading before the stream ends.
    STALL_S: ClassVar[float] = 60.0

    def __init__(
        self, content: AsyncIterable[bytes], release: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded_send(message: Message) -> None:
            with anyio.fail_after(self.STALL_S):
                await send(message)

        try:
            await super().__call__(scope, receive, bounded_send)
        except TimeoutError:
            log.warning(
                "%s %s: the client took nothing for %.0f s; stream ended",
                scope["method"],
                scope["path"],
                self.STALL_S,
            )
        finally:
            self._release()
