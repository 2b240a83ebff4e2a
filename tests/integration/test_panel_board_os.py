"""The board_os driver following a real FIFO and a real file that a board helper writes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverState, Reading, UidHasher
from device_drivers.board_os import BoardOsDriver, build, probe
from schemas.events import BoardApp, BoardTouch

pytestmark = pytest.mark.integration


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    async def __call__(self, reading: Reading) -> None:
        self.readings.append(reading)

    @property
    def data(self) -> list[Any]:
        return [r.data for r in self.readings]


async def until(pred: Callable[[], object], what: str, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(driver: BoardOsDriver) -> AsyncIterator[Collector]:
    out = Collector()
    task = asyncio.create_task(driver.run(out), name="board-os-driver")
    try:
        yield out
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert driver.state == DriverState.STOPPED
    assert not [t for t in threading.enumerate() if t.name == f"link-{driver.name}"]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BoardOsDriver, "BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(BoardOsDriver, "BACKOFF_MAX_S", 0.2)


@pytest.fixture
def ctx() -> DriverContext:
    return DriverContext("sb-0101", UidHasher(b"district-test-key-0123456789"))


def app(name: str, action: str = "foreground") -> bytes:
    return json.dumps({"type": "app", "app": name, "action": action}).encode() + b"\n"


def touch(n: int, window_s: float = 60) -> bytes:
    return json.dumps({"type": "touch", "touches": n, "window_s": window_s}).encode() + b"\n"


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def write_fifo(path: Path, data: bytes) -> None:
    """Like a helper: open, write, close (the driver holds the read end open)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


async def test_fifo_lines_become_events_and_bad_lines_are_counted(
    tmp_path: Path, ctx: DriverContext
) -> None:
    fifo = tmp_path / "activity.fifo"
    os.mkfifo(fifo)
    driver = build("board-os", {"path": str(fifo)}, ctx)
    async with running(driver) as out:
        await until(lambda: driver.state == DriverState.OK, "the FIFO to open")
        write_fifo(fifo, app("com.smart.notebook") + b"{broken\n" + touch(12))
        await until(lambda: len(out.data) == 2, "two events")
        # the helper restarts: a new writer, no end of file for the driver
        write_fifo(fifo, app("com.smart.notebook") + app("chrome") + b'{"type":"touch"}\n')
        await until(lambda: len(out.data) == 3, "the third event")
        await until(lambda: ctx.counters.get("board_os.bad_line") == 2, "two bad lines")
        assert driver.state == DriverState.OK
    assert out.data == [
        BoardApp(app="com.smart.notebook"),
        BoardTouch(touches=12, window_s=60.0),
        BoardApp(app="chrome"),
    ]
    assert ctx.counters["board_os.repeated"] == 1


async def test_file_is_followed_through_truncation_replacement_and_removal(
    tmp_path: Path, ctx: DriverContext
) -> None:
    feed = tmp_path / "activity.jsonl"
    feed.write_bytes(app("old-app") + touch(99))  # history from before the agent started
    driver = build("board-os", {"path": str(feed)}, ctx)
    async with running(driver) as out:
        await until(lambda: driver.state == DriverState.OK, "the file to open")
        append(feed, app("notebook") + touch(3, 30))
        await until(lambda: len(out.data) == 2, "appended lines")
        feed.write_bytes(touch(1))  # truncated and rewritten (copytruncate)
        await until(lambda: len(out.data) == 3, "a line after truncation")
        fresh = tmp_path / "activity.jsonl.new"
        fresh.write_bytes(app("whiteboard"))
        fresh.replace(feed)  # rotated: a new file under the same name
        await until(lambda: len(out.data) == 4, "a line from the new file")
        feed.unlink()
        await until(lambda: driver.state == DriverState.DISCONNECTED, "DISCONNECTED")
        assert "was removed" in (driver.last_error or "")
        feed.write_bytes(app("browser", "start"))
        await until(lambda: len(out.data) == 5, "a line once it is back")
        assert driver.state == DriverState.OK
    assert out.data == [
        BoardApp(app="notebook"),
        BoardTouch(touches=3, window_s=30.0),
        BoardTouch(touches=1, window_s=60.0),
        BoardApp(app="whiteboard"),
        BoardApp(app="browser", action="start"),
    ]


async def test_from_start_and_a_feed_that_appears_later(tmp_path: Path, ctx: DriverContext) -> None:
    old = tmp_path / "old.jsonl"
    old.write_bytes(app("a") + app("b"))
    late = tmp_path / "late.jsonl"
    first = build("os-1", {"path": str(old), "from_start": True}, ctx)
    second = build("os-2", {"path": str(late)}, ctx)
    async with running(first) as out1, running(second) as out2:
        await until(lambda: len(out1.data) == 2, "the whole existing file")
        await until(lambda: second.state == DriverState.DISCONNECTED, "missing feed")
        late.write_bytes(touch(5))  # created after the agent started: all of it is new
        await until(lambda: len(out2.data) == 1, "the late feed's line")
    assert out1.data == [BoardApp(app="a"), BoardApp(app="b")]
    assert out2.data == [BoardTouch(touches=5, window_s=60.0)]


async def test_probe(tmp_path: Path) -> None:
    feed = tmp_path / "f.jsonl"
    feed.write_bytes(app("x") + b"junk\n" + touch(2))
    assert await probe({"path": str(feed)}) == (
        f"feed {feed} is a file of {feed.stat().st_size} bytes: 2 good and 1 bad line(s) seen"
    )
    fifo = tmp_path / "f.fifo"
    os.mkfifo(fifo)
    verdict = await probe({"path": str(fifo)}, listen_s=0.3)
    assert verdict == f"feed {fifo} is a FIFO: 0 good and 0 bad line(s) seen"
    assert "is not there" in await probe({"path": str(tmp_path / "nope")})
