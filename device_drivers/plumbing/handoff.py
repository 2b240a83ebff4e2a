"""Handing items from a worker thread to the event loop through a bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    """A bounded queue that threads feed and the event loop reads.

    When the loop falls behind and the queue is full, the oldest item is dropped and ``on_drop``
    is called (on the loop): a reader thread never blocks, and what is kept is the newest.
    Create it on the loop that reads it.
    """

    def __init__(self, maxsize: int, on_drop: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize)
        self._on_drop = on_drop

    def put_threadsafe(self, item: T) -> None:
        """Offer ``item`` from any thread; a no-op once the loop is closed."""
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._offer, item)

    async def get(self) -> T:
        return await self._queue.get()

    def _offer(self, item: T) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._on_drop()
        self._queue.put_nowait(item)


def pump(
    read: Callable[[], bytes], stop: threading.Event, queue: DropOldestQueue[bytes | Exception]
) -> None:
    """A reader thread's body: every non-empty read into ``queue`` until ``stop`` is set; the
    first read error goes in last (any read failure means the device is gone)."""
    while not stop.is_set():
        try:
            data = read()
        except Exception as exc:  # noqa: BLE001 - handed to the loop, which decides what a lost device means
            queue.put_threadsafe(exc)
            return
        if data:
            queue.put_threadsafe(data)
