"""A transport read from the event loop, and the one open → session → lost → reopen loop.

A :class:`Link` reads a :class:`~device_drivers.plumbing.transport.Transport` on a thread of its
own and offers async ``write`` and ``read(within)``; :func:`exchange` is one request and its
replies through a sans-I/O decoder. :class:`LinkedDriver` is the reopen loop every serial-style
driver shares, whether it polls (panels, recorders) or only listens (EM4100, Wiegand, scanners).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

from device_drivers.base import DeviceLost, DriverContext, DriverState, DriverStatus, Emit
from device_drivers.plumbing.handoff import DropOldestQueue, pump
from device_drivers.plumbing.transport import Transport, describe, open_in_thread

log = logging.getLogger(__name__)

T = TypeVar("T")


class Link:
    """A transport read on its own thread; async, deadline-bounded reads and writes.

    Chunks wait in a bounded queue: when the event loop falls behind, the oldest is dropped and
    ``on_drop`` is called. Any read or write failure becomes :class:`DeviceLost`.
    """

    QUEUE_CHUNKS = 64
    READ_SIZE = 512

    def __init__(
        self, transport: Transport, name: str, on_drop: Callable[[], None] = lambda: None
    ) -> None:
        self._transport = transport
        self._queue: DropOldestQueue[bytes | Exception] = DropOldestQueue(
            self.QUEUE_CHUNKS, on_drop
        )
        self._lost: DeviceLost | None = None
        self._stop = threading.Event()
        # Held around every write and the close, so a write still running in a worker thread
        # after a cancellation never meets a closed port.
        self._io = threading.Lock()
        self._thread = threading.Thread(
            target=pump,
            args=(partial(transport.read, self.READ_SIZE), self._stop, self._queue),
            name=f"link-{name}",
            daemon=True,
        )
        self._thread.start()

    @classmethod
    async def open(
        cls, opener: Callable[[], Transport], name: str, on_drop: Callable[[], None] = lambda: None
    ) -> Link:
        return cls(await open_in_thread(opener), name, on_drop)

    async def write(self, data: bytes) -> None:
        if self._lost:
            raise self._lost
        try:
            await asyncio.to_thread(self._write, data)
        except Exception as exc:  # any write failure means the device is gone
            self._lost = DeviceLost(str(exc) or type(exc).__name__)
            raise self._lost from exc

    async def read(self, within: float | None = None) -> bytes:
        """The next chunk, or ``b""`` if none arrived within ``within`` seconds (``None``: wait
        for one however long it takes)."""
        if self._lost:
            raise self._lost
        # Not wait_for: on 3.11 it loses a cancellation that lands as the item arrives.
        try:
            async with asyncio.timeout(None if within is None else max(within, 0.0)):
                item = await self._queue.get()
        except TimeoutError:
            return b""
        if isinstance(item, Exception):
            self._lost = DeviceLost(str(item) or type(item).__name__)
            raise self._lost from item
        return item

    async def aclose(self) -> None:
        """Stop the reader (it wakes within its read timeout) and close the transport."""
        self._stop.set()
        await asyncio.shield(asyncio.to_thread(self._shutdown))

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _write(self, data: bytes) -> None:
        with self._io:
            self._transport.write(data)

    def _shutdown(self) -> None:
        self._thread.join(5)
        with self._io, contextlib.suppress(Exception):
            self._transport.close()


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """What came back for one request."""

    items: list[T]
    #: Whether any byte at all arrived, decodable or not: silence is a different fact.
    heard: bool


async def exchange(
    link: Link,
    request: bytes,
    decode: Callable[[bytes], list[T]],
    done: Callable[[T], bool],
    within: float,
) -> Answer[T]:
    """Send ``request``, then decode replies until one is ``done`` or ``within`` seconds pass.

    Everything decoded in the meantime is returned, so unsolicited or late replies are not lost.
    """
    if request:
        await link.write(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    items: list[T] = []
    heard = False
    while (left := deadline - loop.time()) > 0:
        chunk = await link.read(left)
        if not chunk:
            continue
        heard = True
        new = decode(chunk)
        items += new
        if any(done(i) for i in new):
            break
    return Answer(items, heard)


class LinkedDriver(DriverStatus):
    """Base of serial-style drivers: open a link, run a session, back off and reopen after a loss.

    Subclasses implement :meth:`session`, call :meth:`up` once the device has answered (a
    listen-only device: once its port is open) and :meth:`down` with a plain-language reason
    when it stops doing so; :meth:`lost` words the reason shown when the device goes away.
    """

    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 10.0
    counters = "link"

    def __init__(
        self, name: str, port: str, opener: Callable[[], Transport], ctx: DriverContext
    ) -> None:
        super().__init__(name, ctx)
        self.port = port
        self._opener = opener
        self._backoff = self.BACKOFF_MIN_S

    async def session(self, link: Link, emit: Emit) -> None:
        """Talk to the device until the link is lost (raise) or it should be reopened (return)."""
        raise NotImplementedError

    async def run(self, emit: Emit) -> None:
        self._backoff = self.BACKOFF_MIN_S
        try:
            while True:
                try:
                    link = await Link.open(self._opener, self.name, self._dropped)
                except (OSError, ValueError) as exc:
                    self.down(f"cannot open {self.port}: {describe(exc)}")
                else:
                    async with link:
                        try:
                            await self.session(link, emit)
                        except DeviceLost as exc:
                            self.down(self.lost(exc))
                await asyncio.sleep(self._backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                self._backoff = min(self._backoff * 2, self.BACKOFF_MAX_S)
        finally:
            self.state = DriverState.STOPPED

    def lost(self, exc: DeviceLost) -> str:
        """The plain-language reason shown when the device goes away mid-session."""
        return f"{self.port} went away ({exc})"

    def up(self) -> None:
        if self.state != DriverState.OK:
            log.info("%s: %s answering", self.name, self.port)
        self.state = DriverState.OK
        self._backoff = self.BACKOFF_MIN_S

    def malformed(self, reason: str, raw: bytes) -> None:
        """Count and log a reply that was skipped; ``reason`` is a snake_case word."""
        self.count("malformed")
        self.count(f"malformed.{reason}")
        self.last_error = f"skipped a malformed reply ({reason.replace('_', ' ')})"
        log.warning("%s: %s: %r", self.name, self.last_error, raw[:64])

    def _dropped(self) -> None:
        self.count("dropped")
