"""Extron-style SIS status replies of a recording unit, sans-I/O: lines in, status / info /
acknowledgement / error items out; for ``device_drivers.recorder``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from device_drivers.codecs.lines import LineSplitter, Overlong

RecordState = Literal["stop", "record", "pause"]
STATES: Final[Mapping[str, RecordState]] = {"0": "stop", "1": "record", "2": "pause"}
ESC: Final = b"\x1b"
TERSE = ESC + b"0CV\r"
STATUS_QUERY = ESC + b"YRCDR\r"
INFO_QUERY = b"I"
START_RECORDING = ESC + b"Y1RCDR\r"
STOP_RECORDING = ESC + b"Y0RCDR\r"
MAX_LINE: Final = 160
ERRORS: Final[Mapping[str, str]] = {
    "E10": "invalid command",
    "E13": "invalid parameter",
    "E14": "not valid for this configuration",
    "E22": "busy",
    "E24": "privilege violation",
    "E25": "device not present",
}
_INFO = re.compile(
    rb"ChA(\d{1,2})\*ChB(\d{1,2})\*([012])\*([^*]{0,64})\*(\d{1,12})"
    rb"\*(\d{2,3}:\d\d:\d\d)\*(\d{2,3}:\d\d:\d\d)"
)
_BANNER = re.compile(rb"\(c\) ?Copyright.*|[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} [\d:]{8}.*")


@dataclass(frozen=True, slots=True)
class StatusReply:
    state: RecordState


@dataclass(frozen=True, slots=True)
class InfoReply:
    state: RecordState
    destination: str
    free_kb: int


@dataclass(frozen=True, slots=True)
class VerboseAck:
    mode: int


@dataclass(frozen=True, slots=True)
class DeviceError:
    code: str

    @property
    def meaning(self) -> str:
        return ERRORS.get(self.code, "error")


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Literal["garbage", "overlong"]
    raw: bytes


RecorderItem = StatusReply | InfoReply | VerboseAck | DeviceError | Rejected


class SisCodec:
    """Sans-I/O: SIS reply lines in, typed replies out (banner lines dropped)."""

    def __init__(self) -> None:
        self._lines = LineSplitter(MAX_LINE)

    def feed(self, data: bytes) -> list[RecorderItem]:
        out: list[RecorderItem] = []
        for line in self._lines.feed(data):
            if isinstance(line, Overlong):
                out.append(Rejected("overlong", line.raw))
            elif (item := self._line(line)) is not None:
                out.append(item)
        return out

    @staticmethod
    def _line(raw: bytes) -> RecorderItem | None:
        line = raw.strip(b" \t")
        if not line or _BANNER.fullmatch(line):
            return None
        if len(line) == 1 and line in b"012":
            return StatusReply(STATES[line.decode()])
        if re.fullmatch(rb"RcdrY[012]", line):  # a record command's echo: the new state
            return StatusReply(STATES[line[-1:].decode()])
        if m := re.fullmatch(rb"Vrb([0-3])", line):
            return VerboseAck(int(m[1]))
        if re.fullmatch(rb"E\d\d", line):
            return DeviceError(line.decode())
        if m := _INFO.fullmatch(line):
            try:
                destination = m[4].decode("ascii")
            except UnicodeDecodeError:
                return Rejected("garbage", raw)
            return InfoReply(STATES[m[3].decode()], destination, int(m[5]))
        return Rejected("garbage", raw)
