"""The board_os driver following a real FIFO and a real file that a board helper writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from device_drivers.base import DriverContext, DriverState, ProbeResult
from device_drivers.board_os import BoardOsDriver, build, probe
from schemas.events import BoardApp, BoardTouch
from tests.driver_harness import RunningDriver, ctx_fixture, fast_backoff, until

pytestmark = pytest.mark.integration


def running(driver: BoardOsDriver) -> RunningDriver:
    return RunningDriver(driver, threads=f"link-{driver.name}".__eq__)


fast = fast_backoff(BoardOsDriver)
ctx = ctx_fixture("sb-0101")


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
        await out.until_state(DriverState.OK, "the FIFO to open")
        write_fifo(fifo, app("com.smart.notebook") + b"{broken\n" + touch(12))
        await out.until_count(2, what="two events")
        # the helper restarts: a new writer, no end of file for the driver
        write_fifo(fifo, app("com.smart.notebook") + app("chrome") + b'{"type":"touch"}\n')
        await out.until_count(3, what="the third event")
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
        await out.until_state(DriverState.OK, "the file to open")
        append(feed, app("notebook") + touch(3, 30))
        await out.until_count(2, what="appended lines")
        feed.write_bytes(touch(1))  # truncated and rewritten (copytruncate)
        await out.until_count(3, what="a line after truncation")
        fresh = tmp_path / "activity.jsonl.new"
        fresh.write_bytes(app("whiteboard"))
        fresh.replace(feed)  # rotated: a new file under the same name
        await out.until_count(4, what="a line from the new file")
        feed.unlink()
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        assert "was removed" in (driver.last_error or "")
        feed.write_bytes(app("browser", "start"))
        await out.until_count(5, what="a line once it is back")
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
        await out1.until_count(2, what="the whole existing file")
        await out2.until_state(DriverState.DISCONNECTED, "missing feed")
        late.write_bytes(touch(5))  # created after the agent started: all of it is new
        await out2.until_count(1, what="the late feed's line")
    assert out1.data == [BoardApp(app="a"), BoardApp(app="b")]
    assert out2.data == [BoardTouch(touches=5, window_s=60.0)]


async def test_probe(tmp_path: Path) -> None:
    feed = tmp_path / "f.jsonl"
    feed.write_bytes(app("x") + b"junk\n" + touch(2))
    assert await probe({"path": str(feed)}) == ProbeResult.warn(
        f"feed {feed} is a file of {feed.stat().st_size} bytes: 2 good and 1 bad line(s) seen"
    )
    fifo = tmp_path / "f.fifo"
    os.mkfifo(fifo)
    result = await probe({"path": str(fifo)}, listen_s=0.3)
    assert result == ProbeResult.ok(f"feed {fifo} is a FIFO: 0 good and 0 bad line(s) seen")
    result = await probe({"path": str(tmp_path / "nope")})
    assert result.status == "fail"
    assert "is not there" in result.message
