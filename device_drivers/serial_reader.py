"""Listen-only serial card readers: a port read on a thread of its own, and the reopen loop.

Drivers for devices that only talk (EM4100 and Wiegand readers) subclass
:class:`SerialStreamDriver`: it opens the port, hands a :class:`SerialReader` to the driver's
``read`` until the port is lost, then reopens it with jittered backoff. :func:`listen` is the
probe's brief listen on a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from device_drivers.base import DriverContext, DriverState, DriverStatus, Emit
from device_drivers.handoff import DropOldestQueue, pump


class ByteStream(Protocol):
    """What the driver reads: a pyserial port, a pty or a ``socket://`` URL all fit."""

    def read(self, size: int = 1) -> bytes: ...

    def close(self) -> None: ...


class PortLost(Exception):
    """The serial device went away while being read."""


class SerialReader:
    """Reads a :class:`ByteStream` on its own thread and hands chunks to the event loop.

    The queue is bounded: when the loop falls behind, the oldest chunk is dropped and counted.
    A read error ends the thread and surfaces as :class:`PortLost` from :meth:`next_chunk`.
    """

    QUEUE_CHUNKS = 64

    def __init__(self, stream: ByteStream, name: str, on_drop: Callable[[], None]) -> None:
        self._stream = stream
        self._queue: DropOldestQueue[bytes | Exception] = DropOldestQueue(
            self.QUEUE_CHUNKS, on_drop
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=pump,
            args=(partial(stream.read, 256), self._stop, self._queue),
            name=f"serial-{name}",
            daemon=True,
        )
        self._thread.start()

    async def next_chunk(self) -> bytes:
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise PortLost(str(item)) from item
        return item

    async def aclose(self) -> None:
        """Stop the thread (it wakes within its read timeout) and close the port."""
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 5)
        with contextlib.suppress(Exception):
            self._stream.close()


class SerialStreamDriver(DriverStatus):
    """Base of listen-only serial drivers: open, read until the port is lost, back off, reopen.

    Subclasses implement :meth:`open_port` and :meth:`read`.
    """

    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 10.0

    def __init__(self, name: str, port: str, ctx: DriverContext) -> None:
        super().__init__(name, ctx)
        self.port = port

    async def open_port(self) -> tuple[ByteStream, str]:
        """Open the port (blocking work in a thread); the stream and the path it was found at."""
        raise NotImplementedError

    async def read(self, reader: SerialReader, path: str, emit: Emit) -> None:
        """Read until the port is lost (:class:`PortLost`)."""
        raise NotImplementedError

    def lost(self, exc: PortLost) -> str:
        """The plain-language reason shown when the port goes away."""
        return f"{self.port} went away ({exc})"

    async def run(self, emit: Emit) -> None:
        backoff = self.BACKOFF_MIN_S
        try:
            while True:
                try:
                    stream, path = await self.open_port()
                except (OSError, ValueError) as exc:
                    self.down(f"cannot open {self.port}: {exc}")
                    await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                    backoff = min(backoff * 2, self.BACKOFF_MAX_S)
                    continue
                self.state = DriverState.OK
                backoff = self.BACKOFF_MIN_S
                reader = SerialReader(stream, self.name, lambda: self.count("dropped"))
                try:
                    await self.read(reader, path, emit)
                except PortLost as exc:
                    self.down(self.lost(exc))
                finally:
                    await reader.aclose()
        finally:
            self.state = DriverState.STOPPED


async def listen(stream: ByteStream, within: float) -> bytes:
    """Everything ``stream`` sends in ``within`` seconds; the stream is closed afterwards."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            chunks.append(await asyncio.to_thread(stream.read, 256))
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    return b"".join(chunks)
