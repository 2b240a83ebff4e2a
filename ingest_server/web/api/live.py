"""``/api/v1/live``: committed events as server-sent events, filtered per client.

Each message is ``id: <device_id>:<seq>`` and ``data: <event JSON>``; a comment line every
``HEARTBEAT_S`` keeps proxies from closing an idle stream. A client that falls behind gets
``event: dropped`` with the reason, and the stream ends (see :mod:`ingest_server.web.live`).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Final

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ingest_server.web.api import access, auth
from ingest_server.web.api.common import NAME_PATTERN, bad_param
from ingest_server.web.api.limits import HeldResponse, SlotLimiter, SlotsFull
from ingest_server.web.live import MAX_SUBSCRIBERS, LiveFilter, LiveHub, Subscription
from schemas.topics import ID_PATTERN

# EventSource cannot send headers: the one endpoint that takes ?access_token= (access.ROUTES).
router = APIRouter(prefix="/api/v1", tags=["live"], dependencies=[access.GUARD])

HEARTBEAT_S: Final = 15.0
_MAX_VALUES: Final = 100
#: One token holds at most this many of the hub's ``MAX_SUBSCRIBERS`` streams.
STREAMS_PER_TOKEN: Final = 10
#: Streams only admin tokens may open, so an administrator always gets in.
RESERVED_FOR_ADMIN: Final = 2


def new_slots() -> SlotLimiter:
    """The live-stream slots of one app (``app.state.live_slots``)."""
    return SlotLimiter("live streams", MAX_SUBSCRIBERS, STREAMS_PER_TOKEN, RESERVED_FOR_ADMIN)


def _set(values: list[str] | None) -> frozenset[str] | None:
    return frozenset(values) if values else None


async def _stream(sub: Subscription) -> AsyncIterator[bytes]:
    yield b": connected\nretry: 3000\n\n"
    while True:
        batch = await sub.next(HEARTBEAT_S)
        if batch is None:
            reason = json.dumps({"reason": sub.dropped})
            yield f"event: dropped\ndata: {reason}\n\n".encode()
            return
        yield b"".join(batch) if batch else b": keep-alive\n\n"


def _ender(
    hub: LiveHub, sub: Subscription, slots: SlotLimiter, token: auth.Token
) -> Callable[[], None]:
    def end() -> None:
        hub.unsubscribe(sub)
        slots.release(token)

    return end


@router.get(
    "/live",
    summary="Committed events as they arrive (server-sent events)",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
        429: {"description": "too many live streams (for this token, or in all)"},
    },
)
async def live(
    request: Request,
    principal: access.Caller,
    school: Annotated[
        list[str] | None, Query(max_length=_MAX_VALUES, description="school ids (repeatable)")
    ] = None,
    device: Annotated[list[str] | None, Query(max_length=_MAX_VALUES)] = None,
    type: Annotated[list[str] | None, Query(max_length=_MAX_VALUES)] = None,
) -> StreamingResponse:
    for name, values, pattern in (
        ("school", school, ID_PATTERN),
        ("device", device, ID_PATTERN),
        ("type", type, NAME_PATTERN),
    ):
        for v in values or ():
            if not re.fullmatch(pattern, v):
                raise bad_param(name, f"must match {pattern}", v)
    hub: LiveHub = request.app.state.live
    slots: SlotLimiter = request.app.state.live_slots
    token: auth.Token = request.state.token
    try:
        slots.acquire(token)
    except SlotsFull as exc:
        raise exc.http() from None
    try:
        # a school-scoped token's events are cut server-side: other schools' never reach it
        schools = principal.visible_schools(_set(school))
        sub = hub.subscribe(LiveFilter(schools, _set(device), _set(type)))
    except OverflowError as exc:
        slots.release(token)
        raise SlotsFull(str(exc), slots.retry_after_s).http() from None
    return HeldResponse(
        _stream(sub),
        _ender(hub, sub, slots, token),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
