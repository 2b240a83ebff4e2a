"""Timetable placement (a pure function), the screen codec, and signage config checks."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.base import (
    DRIVERS,
    DriverContext,
    DriverError,
    DriverState,
    UidHasher,
    build_driver,
    load_builtin_drivers,
)
from device_drivers.codecs.signage import (
    PeriodOptions,
    ScreenCodec,
    ScreenReply,
    parse_timetable,
    place_tap,
)
from device_drivers.plumbing.composite import worst_state

SHANGHAI = ZoneInfo("Asia/Shanghai")
# 2026-11-23 is a Monday.
MONDAY = datetime(2026, 11, 23, tzinfo=SHANGHAI)

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"


def period(name: str, start: str, end: str, **kw: object) -> PeriodOptions:
    return msgspec.convert({"name": name, "start": start, "end": end, **kw}, PeriodOptions)


TIMETABLE = parse_timetable(
    [
        period("p1", "08:00", "08:45"),
        period("p2", "08:55", "09:40", class_id="c0102-lab"),
        period("sat", "09:00", "10:00", days=["sat"]),
    ],
    grace_min=5,
    early_min=10,
    class_id="c0101",
)


def at(hh: int, mm: int, ss: int = 0, day: datetime = MONDAY) -> datetime:
    return day.replace(hour=hh, minute=mm, second=ss)


@pytest.mark.parametrize(
    ("when", "period_name", "class_id", "status"),
    [
        (at(8, 0), "p1", "c0101", "on_time"),
        (at(8, 5), "p1", "c0101", "on_time"),  # grace is inclusive
        (at(8, 5, 1), "p1", "c0101", "late"),
        (at(8, 44, 59), "p1", "c0101", "late"),
        (at(7, 50), "p1", "c0101", "on_time"),  # early window
        (at(7, 49, 59), None, "c0101", "outside_period"),
        (at(8, 45), "p2", "c0102-lab", "on_time"),  # break: early for the next period
        (at(9, 1), "p2", "c0102-lab", "late"),
        (at(9, 40), None, "c0101", "outside_period"),
        (at(12, 0), None, "c0101", "outside_period"),
        (at(9, 30, day=MONDAY + timedelta(days=5)), "sat", "c0101", "late"),
        (at(8, 0, day=MONDAY + timedelta(days=6)), None, "c0101", "outside_period"),
    ],
)
def test_place_tap(when: datetime, period_name: str | None, class_id: str, status: str) -> None:
    got = place_tap(when, TIMETABLE)
    assert (got.period, got.class_id, got.status) == (period_name, class_id, status)


def test_utc_taps_are_placed_in_the_timetable_zone() -> None:
    # 00:03 UTC on Monday is 08:03 in Shanghai
    got = place_tap(datetime(2026, 11, 23, 0, 3, tzinfo=UTC), TIMETABLE)
    assert (got.period, got.status) == ("p1", "on_time")
    # and Sunday 23:59 UTC is already Monday 07:59 there
    got = place_tap(datetime(2026, 11, 22, 23, 59, tzinfo=UTC), TIMETABLE)
    assert (got.period, got.status) == ("p1", "on_time")


def test_other_time_zone_and_zero_grace() -> None:
    tt = parse_timetable([period("p", "10:00", "11:00")], timezone="Europe/Berlin", grace_min=0)
    berlin = ZoneInfo("Europe/Berlin")
    assert place_tap(datetime(2026, 11, 23, 10, 0, tzinfo=berlin), tt).status == "on_time"
    assert place_tap(datetime(2026, 11, 23, 10, 0, 1, tzinfo=berlin), tt).status == "late"


@given(st.datetimes(timezones=st.just(UTC)))
def test_placement_is_always_consistent(when: datetime) -> None:
    got = place_tap(when, TIMETABLE)
    assert (got.period is None) == (got.status == "outside_period")


@pytest.mark.parametrize(
    ("periods", "kw", "message"),
    [
        ([period("a", "08:00", "09:00"), period("b", "08:30", "09:30")], {}, "overlap"),
        ([period("a", "09:00", "08:00")], {}, "ends before"),
        ([period("a", "25:00", "26:00")], {}, "not a time"),
        ([], {"timezone": "Mars/Olympus"}, "time zone"),
    ],
)
def test_bad_timetables(periods: list[PeriodOptions], kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_timetable(periods, **kw)


def test_same_hours_on_different_days_do_not_overlap() -> None:
    parse_timetable(
        [period("a", "08:00", "09:00", days=["mon"]), period("b", "08:00", "09:00", days=["tue"])]
    )


def test_screen_codec_lines_split_anyhow() -> None:
    codec = ScreenCodec()
    data = b'{"op": "shown", "id": "n1"}\n{"op": "rejected", "id": "n2", "reason": "busy"}\n'
    out = []
    for i in range(0, len(data), 7):
        out += codec.feed(data[i : i + 7])
    assert out == [ScreenReply("n1", True), ScreenReply("n2", False, "busy")]
    assert codec.bad_lines == 0


def test_screen_codec_counts_bad_lines_and_keeps_going() -> None:
    codec = ScreenCodec()
    out = codec.feed(b'not json\n{"op": "dance", "id": "x"}\n{"id": 3}\n{"op":"shown","id":"ok"}\n')
    assert out == [ScreenReply("ok", True)]
    assert codec.bad_lines == 3
    codec.feed(b"x" * (ScreenCodec.MAX_LINE + 1))
    assert codec.bad_lines == 4
    assert codec.feed(b'\n{"op":"shown","id":"after"}\n') == [ScreenReply("after", True)]


def test_show_message_is_one_json_line() -> None:
    line = ScreenCodec.show("n1", "停水通知", "明天 8:00-12:00", 30.0)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == {
        "op": "show",
        "id": "n1",
        "title": "停水通知",
        "body": "明天 8:00-12:00",
        "duration_s": 30.0,
    }


@given(st.binary(max_size=300))
def test_screen_codec_never_raises(data: bytes) -> None:
    ScreenCodec().feed(data)


def test_worst_state() -> None:
    assert worst_state([DriverState.OK, DriverState.DISCONNECTED]) == DriverState.DISCONNECTED
    assert worst_state([DriverState.OK, DriverState.STARTING]) == DriverState.STARTING
    assert worst_state([DriverState.OK]) == DriverState.OK
    assert worst_state([]) == DriverState.STOPPED


@pytest.fixture
def ctx() -> DriverContext:
    import device_drivers.signage  # noqa: F401 - registers the driver type

    return DriverContext("cs-0101", UidHasher(b"k" * 32))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "cards"),
        ({"screen": "nohost"}, "host:port"),
        ({"screen": "127.0.0.1:1", "grace": 5}, "unknown field"),
        ({"screen": "127.0.0.1:1", "cards": [{"port": "/dev/x"}]}, "type"),
        ({"screen": "127.0.0.1:1", "cards": [{"type": "no-such-driver"}]}, "unknown driver"),
        ({"screen": "127.0.0.1:1", "periods": [{"name": "p", "start": "8", "end": "9"}]}, "start"),
    ],
)
def test_bad_options_are_driver_errors(
    ctx: DriverContext, options: dict[str, object], message: str
) -> None:
    with pytest.raises(DriverError, match=message):
        build_driver("signage", "cs", options, ctx)


async def test_show_notice_needs_a_running_driver(ctx: DriverContext) -> None:
    signage = build_driver("signage", "cs", {"screen": "127.0.0.1:1"}, ctx)
    with pytest.raises(DriverError, match="not running"):
        await signage.show_notice("n1", "t", "b", 5.0)  # type: ignore[attr-defined]


def test_example_config_builds(ctx: DriverContext) -> None:
    config = tomllib.loads((EXAMPLES / "class_signage.toml").read_text())
    (table,) = config["drivers"]
    load_builtin_drivers()
    missing = {c["type"] for c in table["cards"]} - set(DRIVERS)
    if missing:
        pytest.skip(f"inner card driver(s) not available here: {sorted(missing)}")
    signage = build_driver(table["type"], table["name"], table, ctx)
    assert signage.name == "cs-0101"
