"""A class-signage screen: the display app's side of the notice protocol, on 127.0.0.1 TCP.

Protocol (written here independently of the driver): newline-delimited UTF-8 JSON objects. The
agent sends ``{"op": "show", "id", "title", "body", "duration_s"}``; the screen puts the
notice up, records exactly what it shows, and answers ``{"op": "shown", "id"}``, or
``{"op": "rejected", "id", "reason"}`` when it refuses. A notice stays up for ``duration_s``
seconds (none or 0: until the next one).

    async with SignageScreen() as screen:          # screen.port is chosen at run time
        ...
        screen.showing                             # the notice on screen now, or None
        screen.history                             # every notice shown, in order
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Notice:
    """What the screen displays."""

    id: str
    title: str | None
    body: str | None
    duration_s: float | None


class SignageScreen:
    """The display app, listening on 127.0.0.1; an async context manager."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.showing: Notice | None = None
        self.history: list[Notice] = []
        #: Every line received, decoded or not, for asserting on the exact wire bytes.
        self.received: list[bytes] = []
        #: False: take notices but never confirm them (a hung display app).
        self.confirm = True
        #: When set, refuse the next notice with this reason.
        self.reject_next: str | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._clear: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection (the app quit); ``start()`` brings it back."""
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()
            self._server = None
        if self._clear is not None:
            self._clear.cancel()

    @property
    def connections(self) -> int:
        return len(self._writers)

    async def __aenter__(self) -> SignageScreen:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                self.received.append(line)
                reply = self._handle(line)
                if reply is not None:
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _handle(self, line: bytes) -> dict[str, Any] | None:
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        if (
            not isinstance(msg, dict)
            or msg.get("op") != "show"
            or not isinstance(msg.get("id"), str)
        ):
            return None
        if self.reject_next is not None:
            reason, self.reject_next = self.reject_next, None
            return {"op": "rejected", "id": msg["id"], "reason": reason}
        notice = Notice(msg["id"], msg.get("title"), msg.get("body"), msg.get("duration_s"))
        self._display(notice)
        return {"op": "shown", "id": notice.id} if self.confirm else None

    def _display(self, notice: Notice) -> None:
        self.showing = notice
        self.history.append(notice)
        if self._clear is not None:
            self._clear.cancel()
            self._clear = None
        if notice.duration_s:
            self._clear = asyncio.get_running_loop().call_later(
                notice.duration_s, self._take_down, notice
            )

    def _take_down(self, notice: Notice) -> None:
        if self.showing is notice:
            self.showing = None
