"""Smart-board control replies, sans-I/O: the SMART-style text protocol, the MAXHUB binary
frames, a profile's items as the panel's, and the change tracker; for ``device_drivers.panel``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from device_drivers.codecs.lines import LineSplitter, Overlong
from device_drivers.codecs.profile import Item as ProfileItem
from device_drivers.codecs.profile import (
    Observed,
    ProfileCodec,
)
from device_drivers.codecs.profile import Refused as ProfileRefused
from schemas.events import BoardInput, BoardPower

Power = Literal["on", "off", "standby"]


@dataclass(frozen=True, slots=True)
class PowerReply:
    state: Power


@dataclass(frozen=True, slots=True)
class InputReply:
    source: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The panel understood the frame but declined (unknown command, not in this power state)."""

    detail: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """Bytes the parser threw away, and why."""

    reason: str
    raw: bytes


PanelItem = PowerReply | InputReply | Refused | Rejected


class PanelCodec(Protocol):
    """Sans-I/O: the two queries as bytes, and the panel's bytes in, replies out."""

    profile: str
    default_baudrate: int
    power_query: bytes
    input_query: bytes

    def feed(self, data: bytes) -> list[PanelItem]: ...


SMART_POWER: Final[Mapping[str, Power]] = {
    "on": "on",
    "updateon": "on",
    "ready": "off",
    "updateready": "off",
    "standby": "standby",
    "powersave": "standby",
}
_KEY_VALUE = re.compile(r"([a-z][a-z0-9_]*)\s*=\s*(\S(?:.*\S)?)")
_SOURCE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
MAX_LINE: Final = 128


class SmartCodec:
    """SMART-style ``key=value`` lines with ``>`` prompts."""

    profile = "smart"
    default_baudrate = 19200
    power_query = b"get powerstate\r"
    input_query = b"get input\r"

    def __init__(self) -> None:
        self._lines = LineSplitter(MAX_LINE)

    def feed(self, data: bytes) -> list[PanelItem]:
        out: list[PanelItem] = []
        for line in self._lines.feed(data):
            if isinstance(line, Overlong):
                out.append(Rejected("overlong", line.raw))
            else:
                out += self._line(line)
        return out

    @staticmethod
    def _line(raw: bytes) -> list[PanelItem]:
        text = raw.strip(b"> \t")  # the prompt after a reply stays in front of the next line
        if not text:
            return []
        try:
            line = text.decode("ascii").lower()
        except UnicodeDecodeError:
            return [Rejected("garbage", raw)]
        if line.startswith("invalid"):
            return [Refused(line)]
        m = _KEY_VALUE.fullmatch(line)
        if m is None:
            return [Rejected("garbage", raw)]
        key, value = m[1], m[2]
        if key == "powerstate":
            state = SMART_POWER.get(value)
            return [PowerReply(state)] if state else [Rejected("bad_value", raw)]
        if key == "input":
            return [InputReply(value)] if _SOURCE.fullmatch(value) else [Rejected("bad_value", raw)]
        return []  # another setting's value: not ours, not wrong


START: Final = 0xA6
END: Final = 0x0D
OP_GET: Final = 0x47
OP_SET: Final = 0x53
OP_REPLY: Final = 0x72
OP_REFUSED: Final = 0x6E
CMD_POWER: Final = 0x50
CMD_INPUT: Final = 0x49
MAX_BODY: Final = 18
MAXHUB_POWER: Final[Mapping[int, Power]] = {0x00: "off", 0x01: "on", 0x02: "standby"}
MAXHUB_INPUTS: Final[Mapping[int, str]] = {
    0x00: "android",
    0x01: "hdmi1",
    0x02: "hdmi2",
    0x03: "hdmi3",
    0x04: "ops",
    0x05: "usbc",
    0x06: "vga",
    0x07: "dp",
}
REFUSALS: Final[Mapping[int, str]] = {
    0x01: "unknown command",
    0x02: "not available in this power state",
    0x03: "bad checksum",
}


def maxhub_frame(machine_id: int, op: int, cmd: int, data: bytes = b"") -> bytes:
    body = bytes([machine_id, len(data) + 2, op, cmd]) + data
    return bytes([START]) + body + bytes([sum(body) & 0xFF, END])


class MaxhubCodec:
    """MAXHUB-style frames: length-delimited, checksummed, resynced on the start byte."""

    profile = "maxhub"
    default_baudrate = 9600

    def __init__(self, machine_id: int = 1) -> None:
        self.machine_id = machine_id
        self.power_query = maxhub_frame(machine_id, OP_GET, CMD_POWER)
        self.input_query = maxhub_frame(machine_id, OP_GET, CMD_INPUT)
        self._buf = bytearray()
        self._resyncing = False  # junk right after a bad frame is that frame's tail

    def feed(self, data: bytes) -> list[PanelItem]:
        self._buf += data
        out: list[PanelItem] = []
        buf = self._buf
        while buf:
            start = buf.find(START)
            if start != 0:
                junk = bytes(buf if start < 0 else buf[:start])
                del buf[: len(junk)]
                if not self._resyncing:
                    out.append(Rejected("junk", junk))
                if start < 0:
                    break
            if len(buf) < 3:
                break
            length = buf[2]
            if not 2 <= length <= MAX_BODY:
                out.append(self._reject("bad_length", bytes(buf[:3])))
                continue
            size = length + 5
            if len(buf) < size:
                break
            frame = bytes(buf[:size])
            if frame[-1] != END:
                out.append(self._reject("bad_end", frame))
            elif sum(frame[1:-2]) & 0xFF != frame[-2]:
                out.append(self._reject("bad_checksum", frame))
            else:
                del buf[:size]
                self._resyncing = False
                out.append(self._decode(frame))
        return out

    def _reject(self, reason: str, raw: bytes) -> Rejected:
        del self._buf[:1]
        self._resyncing = True
        return Rejected(reason, raw)

    def _decode(self, frame: bytes) -> PanelItem:
        machine, op, cmd, data = frame[1], frame[3], frame[4], frame[5:-2]
        if machine != self.machine_id:
            return Rejected("wrong_id", frame)
        if op == OP_REFUSED and len(data) == 1:
            return Refused(REFUSALS.get(data[0], f"reason 0x{data[0]:02x}"))
        if op != OP_REPLY or len(data) != 1:
            return Rejected("bad_value", frame)
        if cmd == CMD_POWER and data[0] in MAXHUB_POWER:
            return PowerReply(MAXHUB_POWER[data[0]])
        if cmd == CMD_INPUT:
            return InputReply(MAXHUB_INPUTS.get(data[0], f"input-0x{data[0]:02x}"))
        return Rejected("bad_value", frame)


class BoardTracker:
    """Turns observations into events: only changes, and the first observation."""

    def __init__(self) -> None:
        self.power: Power | None = None
        self.source: str | None = None

    def see_power(self, state: Power) -> BoardPower | None:
        if state == self.power:
            return None
        event = BoardPower(state=state, previous=self.power or "unknown")
        self.power = state
        return event

    def see_input(self, source: str) -> BoardInput | None:
        if source == self.source:
            return None
        event = BoardInput(source=source, previous=self.source)
        self.source = source
        return event


class ProfilePanelCodec:
    """A profile's parser, its items as the panel's: power and input replies, refusals, rejects."""

    def __init__(self, codec: ProfileCodec) -> None:
        self.inner = codec
        #: Items of this feed as the profile saw them (for the probe's report).
        self.seen: list[ProfileItem] = []

    def feed(self, data: bytes) -> list[PanelItem]:
        out: list[PanelItem] = []
        for item in self.inner.feed(data):
            self.seen.append(item)
            if isinstance(item, Observed):
                if item.event == "board.power":
                    out.append(PowerReply(item.value))  # type: ignore[arg-type]  # schema-checked
                elif item.event == "board.input":
                    out.append(InputReply(item.value))
            elif isinstance(item, ProfileRefused):
                out.append(Refused(item.detail))
            else:
                out.append(Rejected(item.reason, item.raw))
        return out
