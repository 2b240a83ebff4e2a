"""Events as they are committed, fanned out to live subscribers without ever slowing ingest.

The writer thread calls :meth:`LiveHub.publish` after each commit; that only hands the batch
to the API's event loop (``call_soon_threadsafe``) and returns. On the loop each event is
encoded once and offered to every subscriber whose filter matches. Every subscriber has a
bounded queue of ``max_queue`` events: a commit that does not fit drops the client with a
reason; it is never waited for. One commit may hold up to ``batch_events`` x ``writers`` (the
lanes share a batch's rows: 10,000 by default), and a client can miss its turn on the loop
between two commits, so ``max_queue`` is twice that. A client takes ``SEND_CHUNK`` events at a
time, so one stuck in a send still shows its backlog.
If the loop itself falls ``MAX_PENDING_BATCHES`` behind, batches are dropped for everyone
(each subscriber learns so), so the hub's memory is bounded too. An event is encoded once and
its bytes shared by every queue holding it, so queues cost a pointer per event each.

With several ingest processes sharing the uplinks (``$share``), each process's hub streams
the events that process stored: a live client sees its API instance's share only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from ingest_server.ingest.batch import EventRow

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE: Final = 20_000
MAX_PENDING_BATCHES: Final = 256
MAX_SUBSCRIBERS: Final = 100
SEND_CHUNK: Final = 64


@dataclass(frozen=True, slots=True)
class LiveFilter:
    """Which events a subscriber wants; ``None`` matches all."""

    schools: frozenset[str] | None = None
    devices: frozenset[str] | None = None
    types: frozenset[str] | None = None

    def matches(self, row: EventRow) -> bool:
        return (
            (self.schools is None or row.school_id in self.schools)
            and (self.devices is None or row.device_id in self.devices)
            and (self.types is None or row.event.type in self.types)
        )

    def wants_alert(self, school_id: str, device_id: str) -> bool:
        """Alerts go to subscribers of their school and device whose types (if any) name
        ``alert``."""
        return (
            (self.schools is None or school_id in self.schools)
            and (self.devices is None or device_id in self.devices)
            and (self.types is None or "alert" in self.types)
        )


def encode_alert(transition: str, alert: dict[str, Any]) -> bytes:
    """An alert transition as an SSE message of type ``alert``."""
    body = {"transition": transition, **alert}
    text = json.dumps(body, separators=(",", ":"), default=_json_default, ensure_ascii=False)
    return b"event: alert\ndata: " + text.encode() + b"\n\n"


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")


def encode(row: EventRow) -> bytes:
    """One event as an SSE message; ``data`` is the device's JSON as stored."""
    ev = row.event
    head = json.dumps(
        {
            "time": ev.ts.astimezone(UTC).isoformat(),
            "school_id": row.school_id,
            "device_id": row.device_id,
            "device_kind": row.kind,
            "seq": ev.seq,
            "type": ev.type,
            "replay": ev.replay,
        },
        separators=(",", ":"),
    )
    body = head[:-1].encode() + b',"data":' + ev.data_json + b"}"
    return b"id: %s:%d\ndata: %s\n\n" % (row.device_id.encode(), ev.seq, body)


class Subscription:
    """One client's bounded queue; read with :meth:`next`, which returns None once dropped."""

    def __init__(self, hub: LiveHub, flt: LiveFilter, max_queue: int) -> None:
        self.filter = flt
        self.max_queue = max_queue
        self.dropped: str | None = None
        self.delivered = 0
        self._hub = hub
        self._items: deque[bytes] = deque()
        self._wakeup = asyncio.Event()

    def offer(self, messages: list[bytes]) -> None:
        """Queue one commit's matching events, or drop the client if they do not fit."""
        if self.dropped is not None or not messages:
            return
        if len(self._items) + len(messages) > self.max_queue:
            self.drop(f"client too slow: {len(self._items)} events queued and not yet sent")
            return
        self._items.extend(messages)
        self._wakeup.set()

    def drop(self, reason: str) -> None:
        if self.dropped is None:
            self.dropped = reason
            self._items.clear()
            self._wakeup.set()
            self._hub.unsubscribe(self)

    async def next(self, wait_s: float) -> list[bytes] | None:
        """What is queued (``[]`` if nothing came within ``wait_s``); None once dropped."""
        if not self._items and self.dropped is None:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait_s)
            except TimeoutError:
                return []
        if self.dropped is not None:
            return None
        items = self._items
        out = [items.popleft() for _ in range(min(SEND_CHUNK, len(items)))]
        self.delivered += len(out)
        return out


class LiveHub:
    """Fan-out from the writer thread to subscribers on one event loop."""

    def __init__(self, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        self.max_queue = max_queue
        self.batches_lost = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: set[Subscription] = set()
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self, flt: LiveFilter) -> Subscription:
        """Called on the event loop: a new subscription (raises OverflowError when full)."""
        if len(self._subs) >= MAX_SUBSCRIBERS:
            raise OverflowError(f"{MAX_SUBSCRIBERS} live clients are connected already")
        self._loop = asyncio.get_running_loop()
        sub = Subscription(self, flt, self.max_queue)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, rows: Sequence[EventRow]) -> None:
        """Called on the writer thread after a commit; never blocks."""
        loop = self._loop
        if loop is None or not self._subs or loop.is_closed():
            return
        with self._lock:
            if self._pending >= MAX_PENDING_BATCHES:
                self.batches_lost += 1
                lost = True
            else:
                self._pending += 1
                lost = False
        try:
            if lost:
                loop.call_soon_threadsafe(self._lose)
            else:
                loop.call_soon_threadsafe(self._dispatch, list(rows))
        except RuntimeError:  # the loop closed meanwhile: nobody is listening
            pass

    def publish_alert(self, transition: str, alert: dict[str, Any]) -> None:
        """From any thread (the alert engine, the API): one alert transition, never blocks."""
        loop = self._loop
        if loop is None or not self._subs or loop.is_closed():
            return
        message = encode_alert(transition, alert)
        with self._lock:
            if self._pending >= MAX_PENDING_BATCHES:
                self.batches_lost += 1
                return  # the loop is far behind; the alert stays in the API for clients to read
            self._pending += 1
        school, device = str(alert["school_id"]), str(alert["device_id"])
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._dispatch_alert, school, device, message)

    def _dispatch_alert(self, school: str, device: str, message: bytes) -> None:
        with self._lock:
            self._pending -= 1
        for sub in list(self._subs):
            if sub.filter.wants_alert(school, device):
                sub.offer([message])

    def close(self) -> None:
        """From any thread: end every stream (``event: dropped``), so the HTTP server can stop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._drop_all, "the server is shutting down")

    def _drop_all(self, reason: str) -> None:
        for sub in list(self._subs):
            sub.drop(reason)

    def _lose(self) -> None:
        for sub in list(self._subs):
            sub.drop("the server fell behind the event stream")

    def _dispatch(self, rows: list[EventRow]) -> None:
        with self._lock:
            self._pending -= 1
        subs = list(self._subs)
        if not subs:
            return
        out: dict[Subscription, list[bytes]] = {s: [] for s in subs}
        for row in rows:
            message: bytes | None = None
            for sub in subs:
                if sub.filter.matches(row):
                    message = message or encode(row)
                    out[sub].append(message)
        for sub, messages in out.items():
            sub.offer(messages)
