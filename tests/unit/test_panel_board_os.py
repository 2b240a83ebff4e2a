"""The board-OS activity feed codec and the driver's event rules, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.base import DeviceLost, DriverContext, DriverState, UidHasher
from device_drivers.board_os import BoardActivitySource, BoardOsDriver
from device_drivers.codecs.board_os import Activity, AppChange, BadRecord, FeedCodec, TouchCount
from schemas.events import BoardApp, BoardTouch
from schemas.reading import Reading

CST = timezone(timedelta(hours=8))


def test_lines() -> None:
    items = FeedCodec().feed(
        b'{"type": "app", "app": "com.smart.notebook", "ts": "2026-11-22T07:50:01+08:00"}\n'
        b'{"type":"app","app":"chrome","action":"stop","extra":1}\r\n'
        b"\n"
        b'{"type":"touch","touches":37,"window_s":60}\n'
    )
    assert items == [
        AppChange("com.smart.notebook", "foreground", datetime(2026, 11, 22, 7, 50, 1, tzinfo=CST)),
        AppChange("chrome", "stop"),
        TouchCount(37, 60.0),
    ]


def test_naive_timestamps_are_taken_as_local_time() -> None:
    (item,) = FeedCodec().feed(
        b'{"type":"touch","touches":1,"window_s":5,"ts":"2026-01-01T08:00:00"}\n'
    )
    assert isinstance(item, TouchCount)
    assert item.ts is not None
    assert item.ts.tzinfo is not None


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[]",
        b'{"type":"app"}',
        b'{"type":"app","app":""}',
        b'{"type":"app","app":"x","action":"minimise"}',
        b'{"type":"touch","touches":-1,"window_s":60}',
        b'{"type":"touch","touches":1,"window_s":0}',
        b'{"type":"swipe"}',
        b'{"type":"app","app":"' + b"x" * 200 + b'"}',
    ],
)
def test_bad_lines(line: bytes) -> None:
    (item,) = FeedCodec().feed(line + b"\n")
    assert isinstance(item, BadRecord)
    assert item.reason == "bad_line"


def test_split_and_overlong_lines() -> None:
    codec = FeedCodec()
    line = b'{"type":"touch","touches":3,"window_s":10}\n'
    out = codec.feed(line[:7]) + codec.feed(line[7:] + b"x" * 5000) + codec.feed(b"y\n" + line)
    assert out == [TouchCount(3, 10.0), BadRecord("overlong", b"x" * 64), TouchCount(3, 10.0)]


@given(st.binary(max_size=600))
def test_never_raises(data: bytes) -> None:
    codec = FeedCodec()
    codec.feed(data)
    assert codec.feed(b'\n{"type":"app","app":"a"}\n')[-1] == AppChange("a", "foreground")


class ListSource(BoardActivitySource):
    """Hands out scripted batches, then reports itself lost."""

    description = "test source"

    def __init__(self, batches: list[list[Activity]]) -> None:
        self.batches = batches
        self.opened = self.closed = 0

    async def open(self) -> None:
        self.opened += 1

    async def next(self, within: float) -> list[Activity]:
        if not self.batches:
            raise DeviceLost("script finished")
        return self.batches.pop(0)

    async def aclose(self) -> None:
        self.closed += 1


async def test_driver_rules_dedupe_foreground_and_count_bad_lines() -> None:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    source = ListSource(
        [
            [AppChange("notebook", "foreground", ts), AppChange("notebook", "foreground")],
            [BadRecord("bad_line", b"x", "oops"), TouchCount(4, 30.0)],
            [AppChange("notebook", "stop"), AppChange("notebook", "foreground")],
        ]
    )
    ctx = DriverContext("sb-1", UidHasher(b"k" * 16))
    driver = BoardOsDriver("os", source, ctx)
    out: list[Reading] = []

    async def emit(reading: Reading) -> None:
        out.append(reading)
        if len(out) == 4:
            raise SystemExit  # stop the driver once everything is in

    with pytest.raises(SystemExit):
        await driver.run(emit)
    assert [r.data for r in out] == [
        BoardApp(app="notebook"),
        BoardTouch(touches=4, window_s=30.0),
        BoardApp(app="notebook", action="stop"),
        BoardApp(app="notebook"),
    ]
    assert out[0].ts == ts
    assert ctx.counters == {"board_os.repeated": 1, "board_os.bad_line": 1}
    assert driver.last_error == "skipped a bad feed line (oops)"
    assert driver.state == DriverState.STOPPED
    assert source.closed == source.opened == 1
