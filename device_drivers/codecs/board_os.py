"""A smart board's OS activity feed, sans-I/O: JSON lines (app changes, touch counts) in,
typed records out; for ``device_drivers.board_os``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from schemas.events import Count, Name

MAX_LINE: Final = 4096
Action = Literal["foreground", "start", "stop"]


@dataclass(frozen=True, slots=True)
class AppChange:
    app: str
    action: Action
    ts: datetime | None = None


@dataclass(frozen=True, slots=True)
class TouchCount:
    touches: int
    window_s: float
    ts: datetime | None = None


@dataclass(frozen=True, slots=True)
class BadRecord:
    reason: Literal["bad_line", "overlong"]
    raw: bytes
    detail: str = ""


Activity = AppChange | TouchCount | BadRecord


class _AppLine(msgspec.Struct, tag="app", tag_field="type", frozen=True):
    app: Name
    action: Action = "foreground"
    ts: datetime | None = None


class _TouchLine(msgspec.Struct, tag="touch", tag_field="type", frozen=True):
    touches: Count
    window_s: Annotated[float, Meta(gt=0, le=86400)]
    ts: datetime | None = None


_DECODER: Final = msgspec.json.Decoder(_AppLine | _TouchLine)


def _aware(ts: datetime | None) -> datetime | None:
    return ts if ts is None or ts.tzinfo else ts.astimezone()


class FeedCodec:
    """Sans-I/O: feed bytes in, activity out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[Activity]:
        out: list[Activity] = []
        for line in bytes(data).splitlines(keepends=True):
            ended = line.endswith((b"\n", b"\r"))
            if not self._skipping:
                self._buf += line.rstrip(b"\r\n")
                if len(self._buf) > MAX_LINE:
                    out.append(BadRecord("overlong", bytes(self._buf[:64])))
                    self._buf.clear()
                    self._skipping = not ended
                    continue
            if ended:
                if not self._skipping and self._buf.strip():
                    out.append(self._decode(bytes(self._buf)))
                self._buf.clear()
                self._skipping = False
        return out

    @staticmethod
    def _decode(line: bytes) -> Activity:
        try:
            rec = _DECODER.decode(line)
        except msgspec.DecodeError as exc:
            return BadRecord("bad_line", line[:256], str(exc))
        if isinstance(rec, _AppLine):
            return AppChange(rec.app, rec.action, _aware(rec.ts))
        return TouchCount(rec.touches, rec.window_s, _aware(rec.ts))
