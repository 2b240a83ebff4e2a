"""Class signage without the network: the timetable a tap is placed in, and the screen
protocol's newline-delimited JSON replies; for ``device_drivers.signage``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Annotated, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta

WEEKDAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
Status = Literal["on_time", "late", "outside_period"]


class PeriodOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    # \Z, not $ (which also matches before a final newline); [0-9], not \d (any script's digits)
    start: Annotated[str, Meta(pattern=r"^[0-9]{1,2}:[0-9]{2}\Z")]
    end: Annotated[str, Meta(pattern=r"^[0-9]{1,2}:[0-9]{2}\Z")]
    days: list[Weekday] = msgspec.field(default_factory=lambda: list(WEEKDAYS[:5]))
    class_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None


@dataclass(frozen=True, slots=True)
class Period:
    name: str
    days: frozenset[int]
    start: time
    end: time
    class_id: str | None


@dataclass(frozen=True, slots=True)
class Timetable:
    periods: tuple[Period, ...]
    tz: ZoneInfo
    grace: timedelta = timedelta(minutes=5)
    early: timedelta = timedelta(minutes=10)
    class_id: str | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a tap falls in the timetable."""

    period: str | None
    class_id: str | None
    status: Status


def place_tap(when: datetime, timetable: Timetable) -> Placement:
    """Bind a tap (an aware datetime) to a period of the timetable, in the timetable's zone.

    Inside a period: ``on_time`` up to and including ``start + grace``, then ``late``. In the
    ``early`` window before a period starts (and not inside another): that period, ``on_time``.
    Otherwise ``outside_period`` with no period and the timetable's own class.
    """
    local = when.astimezone(timetable.tz)
    wall = local.replace(tzinfo=None)
    today = [p for p in timetable.periods if local.weekday() in p.days]

    def at(t: time) -> datetime:
        return datetime.combine(local.date(), t)

    for p in today:
        if at(p.start) <= wall < at(p.end):
            status: Status = "on_time" if wall <= at(p.start) + timetable.grace else "late"
            return Placement(p.name, p.class_id or timetable.class_id, status)
    for p in today:
        if at(p.start) - timetable.early <= wall < at(p.start):
            return Placement(p.name, p.class_id or timetable.class_id, "on_time")
    return Placement(None, timetable.class_id, "outside_period")


def _clock(text: str) -> time:
    hour, minute = (int(x) for x in text.split(":"))
    if hour > 23 or minute > 59:
        raise ValueError(f"{text!r} is not a time of day")
    return time(hour, minute)


def parse_timetable(
    periods: Sequence[PeriodOptions],
    *,
    timezone: str = "Asia/Shanghai",
    grace_min: float = 5,
    early_min: float = 10,
    class_id: str | None = None,
) -> Timetable:
    """Validate the configured periods (times, no overlaps on a day) into a :class:`Timetable`."""
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {timezone!r}") from exc
    parsed = []
    for p in periods:
        start, end = _clock(p.start), _clock(p.end)
        if start >= end:
            raise ValueError(f"period {p.name!r} ends before it starts")
        days = frozenset(WEEKDAYS.index(d) for d in p.days)
        parsed.append(Period(p.name, days, start, end, p.class_id))
    for i, a in enumerate(parsed):
        for b in parsed[i + 1 :]:
            if a.days & b.days and a.start < b.end and b.start < a.end:
                raise ValueError(f"periods {a.name!r} and {b.name!r} overlap")
    return Timetable(
        tuple(parsed),
        tz,
        timedelta(minutes=grace_min),
        timedelta(minutes=early_min),
        class_id,
    )


class _ScreenReply(msgspec.Struct, frozen=True):
    op: str
    id: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ScreenReply:
    notice_id: str
    shown: bool
    reason: str | None = None


class ScreenCodec:
    """Sans-I/O: the screen's reply lines in, :class:`ScreenReply` out; bad lines counted."""

    MAX_LINE = 64 * 1024

    def __init__(self) -> None:
        self._buf = bytearray()
        self.bad_lines = 0
        self._decoder = msgspec.json.Decoder(_ScreenReply)

    def feed(self, data: bytes) -> list[ScreenReply]:
        self._buf += data
        out: list[ScreenReply] = []
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:nl]).strip()
            del self._buf[: nl + 1]
            if line:
                out.extend(self._decode(line))
        if len(self._buf) > self.MAX_LINE:
            self._buf.clear()
            self.bad_lines += 1
        return out

    def _decode(self, line: bytes) -> list[ScreenReply]:
        try:
            msg = self._decoder.decode(line)
        except msgspec.DecodeError:
            self.bad_lines += 1
            return []
        if msg.op not in ("shown", "rejected"):
            self.bad_lines += 1
            return []
        return [ScreenReply(msg.id, msg.op == "shown", msg.reason)]

    @staticmethod
    def show(
        notice_id: str, title: str | None, body: str | None, duration_s: float | None
    ) -> bytes:
        msg = {
            "op": "show",
            "id": notice_id,
            "title": title,
            "body": body,
            "duration_s": duration_s,
        }
        return msgspec.json.encode(msg) + b"\n"
