"""The thread → event loop handoff: bounded, newest kept, reader errors delivered last."""

from __future__ import annotations

import asyncio
import threading

from device_drivers.plumbing.handoff import DropOldestQueue, pump


async def test_a_full_queue_drops_the_oldest_and_says_so() -> None:
    dropped: list[int] = []
    queue: DropOldestQueue[int] = DropOldestQueue(2, lambda: dropped.append(1))
    feeder = threading.Thread(target=lambda: [queue.put_threadsafe(i) for i in range(5)])
    feeder.start()
    await asyncio.to_thread(feeder.join, 5)
    assert [await queue.get(), await queue.get()] == [3, 4]
    assert len(dropped) == 3


async def test_pump_hands_over_reads_then_the_error_that_ended_them() -> None:
    reads = iter([b"a", b"", b"b"])

    def read() -> bytes:
        try:
            return next(reads)
        except StopIteration:
            raise OSError("unplugged") from None

    queue: DropOldestQueue[bytes | Exception] = DropOldestQueue(8, lambda: None)
    thread = threading.Thread(target=pump, args=(read, threading.Event(), queue))
    thread.start()
    got = [await asyncio.wait_for(queue.get(), 5) for _ in range(3)]
    await asyncio.to_thread(thread.join, 5)
    assert got[:2] == [b"a", b"b"]
    assert isinstance(got[2], OSError)
    assert not thread.is_alive()


async def test_pump_stops_when_asked() -> None:
    stop = threading.Event()
    queue: DropOldestQueue[bytes | Exception] = DropOldestQueue(8, lambda: None)

    def read() -> bytes:
        stop.set()
        return b"last"

    thread = threading.Thread(target=pump, args=(read, stop, queue))
    thread.start()
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()
    assert await asyncio.wait_for(queue.get(), 5) == b"last"
