"""Smart-board panels polled on their RS-232 / TCP control port → ``board.power``, ``board.input``.

Driver type ``panel``. Options: ``port`` (device path, ``/dev/serial/by-id/…``,
``usb:VID:PID[:SERIAL]`` or ``tcp://host:port``), ``profile`` (``smart`` or ``maxhub``),
``baudrate`` (19200 for smart, 9600 for maxhub), ``poll_s`` (2), ``timeout_s`` (1: how long to
wait for a reply), ``machine_id`` (1, maxhub only). Events are emitted on change only, and for the
first observation (``previous`` is then ``"unknown"`` / absent).

Profile ``smart``: the ASCII control protocol of SMART Board 6000/7000/MX displays (19200 8N1).
Commands are ``get powerstate`` and ``get input``, ended by CR; replies are ``key=value`` lines
(``powerstate=on``, ``input=HDMI1``; case and spaces around ``=`` vary), each followed by a ``>``
prompt; an unknown command gets ``invalid cmd…``. Power values map as ``on``/``updateon`` → on,
``ready``/``updateready`` (screen off, still answering) → off, ``standby``/``powersave`` →
standby. Only ``powerstate`` is answered when the screen is not on, so the input is asked only
while it is on. In its low-power states the panel is **silent**: polls without a single byte in
reply, from a panel that has answered before, become ``board.power`` standby (after
``STANDBY_AFTER`` of them, so one lost reply is not a state change) and are not an error; a
panel that never answered is DISCONNECTED after ``UNREACHABLE_AFTER`` such polls.

Profile ``maxhub``: a framed binary protocol modelled on MAXHUB's RS-232 style (fixed start
byte, machine id, ASCII get/set opcode, command type, CR end), with our own byte values and an
added length byte and checksum::

    A6 | ID | LEN | OP | CMD | DATA (LEN-2 bytes) | SUM | 0D

    ID   machine id, 0x01..0xFE (default 0x01); replies carry the panel's own id
    LEN  bytes in OP + CMD + DATA, 2..18
    OP   'G' 0x47 get, 'S' 0x53 set, 'r' 0x72 reply, 'n' 0x6E refused (DATA = reason byte)
    CMD  'P' 0x50 power: 00 off, 01 on, 02 standby
         'I' 0x49 input: 00 android, 01 hdmi1, 02 hdmi2, 03 hdmi3, 04 ops, 05 usbc, 06 vga, 07 dp
    SUM  (ID + LEN + OP + CMD + sum(DATA)) & 0xFF

Queries are ``G P`` and ``G I`` with no data; replies ``r P <state>`` / ``r I <code>``. A frame
with a bad length, end byte or checksum, another machine's id, or an unknown opcode, command or
value is counted (``panel.malformed`` and ``panel.malformed.<reason>``) and the parser resyncs
on the next start byte; junk between frames is counted once per run. Standby silence is handled
as for ``smart``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Final, Literal, Protocol

import msgspec
from msgspec import Meta

from device_drivers.base import (
    DriverContext,
    DriverError,
    Emit,
    ProbeResult,
    Reading,
    convert_options,
    register_driver,
)
from device_drivers.lines import LineSplitter, Overlong
from device_drivers.transport import Link, LinkedDriver, exchange, open_transport
from schemas.events import BoardInput, BoardPower

log = logging.getLogger(__name__)

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


# --- SMART-style ASCII -------------------------------------------------------------------------

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


# --- MAXHUB-style binary -----------------------------------------------------------------------

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


# --- change tracking ---------------------------------------------------------------------------


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


# --- the driver --------------------------------------------------------------------------------


class PanelOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    port: Annotated[str, Meta(min_length=1)]
    profile: Literal["smart", "maxhub"] = "smart"
    baudrate: Annotated[int, Meta(gt=0)] | None = None
    poll_s: Annotated[float, Meta(gt=0, le=3600)] = 2.0
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    machine_id: Annotated[int, Meta(ge=1, le=0xFE)] = 1

    def codec(self) -> PanelCodec:
        return SmartCodec() if self.profile == "smart" else MaxhubCodec(self.machine_id)

    @property
    def speed(self) -> int:
        return self.baudrate or self.codec().default_baudrate


class PanelPoller(LinkedDriver):
    """A smart board's control port, polled for power state and input source."""

    counters = "panel"
    #: Silent polls of a panel that has answered before, after which it is in standby.
    STANDBY_AFTER = 2
    #: Polls without a valid reply from a panel that never answered, after which it is down.
    UNREACHABLE_AFTER = 3

    def __init__(self, name: str, options: PanelOptions, ctx: DriverContext) -> None:
        opener = partial(open_transport, options.port, baudrate=options.speed)
        super().__init__(name, options.port, opener, ctx)
        self.options = options
        self.tracker = BoardTracker()
        #: Whether the panel has ever given a valid reply: silence then means standby.
        self.reachable = False

    async def session(self, link: Link, emit: Emit) -> None:
        codec = self.options.codec()
        silent = missed = 0
        while True:
            power, heard = await self._ask_power(link, codec, emit)
            if power is not None:
                silent = missed = 0
                self.reachable = True
                self.up()
                if power == "on":
                    await self._ask_input(link, codec, emit)
            else:
                missed += 1
                silent = 0 if heard else silent + 1
                if self.reachable and silent >= self.STANDBY_AFTER:
                    self.up()  # a silent panel is a panel in standby, not a fault
                    await self._emit_power("standby", emit)
                elif not self.reachable and missed >= self.UNREACHABLE_AFTER:
                    self.down(self._unreachable(heard))
            await asyncio.sleep(self.options.poll_s)

    async def _ask_power(
        self, link: Link, codec: PanelCodec, emit: Emit
    ) -> tuple[Power | None, bool]:
        answer = await exchange(
            link,
            codec.power_query,
            codec.feed,
            lambda i: isinstance(i, PowerReply),
            self.options.timeout_s,
        )
        power: Power | None = None
        for item in answer.items:
            if isinstance(item, PowerReply):
                power = item.state
                await self._emit_power(item.state, emit)
            else:
                await self._handle(item, emit)
        return power, answer.heard

    async def _ask_input(self, link: Link, codec: PanelCodec, emit: Emit) -> None:
        answer = await exchange(
            link,
            codec.input_query,
            codec.feed,
            lambda i: isinstance(i, InputReply | Refused),
            self.options.timeout_s,
        )
        for item in answer.items:
            await self._handle(item, emit)

    async def _handle(self, item: PanelItem, emit: Emit) -> None:
        if isinstance(item, PowerReply):
            await self._emit_power(item.state, emit)
        elif isinstance(item, InputReply):
            if event := self.tracker.see_input(item.source):
                await emit(Reading("board.input", event))
        elif isinstance(item, Refused):
            self.count("refused")
            log.info("%s: the panel refused a query: %s", self.name, item.detail)
        else:
            self.malformed(item.reason, item.raw)

    async def _emit_power(self, state: Power, emit: Emit) -> None:
        if event := self.tracker.see_power(state):
            await emit(Reading("board.power", event))

    def _unreachable(self, heard: bool) -> str:
        if heard:
            return (
                f"the panel on {self.port} sends nothing readable: check the profile "
                f"({self.options.profile}) and baud rate ({self.options.speed})"
            )
        return (
            f"no reply from the panel on {self.port}: check the cable, that RS-232 control is "
            "enabled, and that power saving is off (a panel in low power never answers)"
        )


def parse_options(name: str, options: Mapping[str, Any]) -> PanelOptions:
    return convert_options(name, options, PanelOptions)


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> PanelPoller:
    return PanelPoller(name, parse_options(name, options), ctx)


register_driver("panel")(build)


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Ask the panel once for its power state and input; say what came back."""
    try:
        opts = parse_options("probe", options)
        link = await Link.open(partial(open_transport, opts.port, baudrate=opts.speed), "probe")
    except (DriverError, OSError, ValueError) as exc:
        return ProbeResult.fail(f"cannot open the panel port: {exc}")
    codec = opts.codec()
    items: list[PanelItem] = []
    heard = False
    try:
        async with link:
            for query in (codec.power_query, codec.input_query):
                answer = await exchange(
                    link,
                    query,
                    codec.feed,
                    lambda i: not isinstance(i, Rejected),
                    opts.timeout_s,
                )
                items += answer.items
                heard = heard or answer.heard
    except Exception as exc:  # report whatever the port says
        return ProbeResult.fail(f"{opts.port} opened but talking to it failed: {exc}")
    where = f"{opts.profile} panel on {opts.port} at {opts.speed} baud"
    if not heard:
        return ProbeResult.fail(
            f"{where}: no reply in {opts.timeout_s:g} s (a panel in standby is silent; "
            "otherwise check the cable and that RS-232 control is enabled)"
        )
    found = [f"power {i.state}" for i in items if isinstance(i, PowerReply)]
    found += [f"input {i.source}" for i in items if isinstance(i, InputReply)]
    bad = sum(isinstance(i, Rejected) for i in items)
    if not found:
        return ProbeResult.warn(
            f"{where}: answered, but with {bad} unreadable repl(ies): check profile and baud"
        )
    verdict = f"{where}: " + ", ".join(found) + (f" ({bad} unreadable)" if bad else "")
    return ProbeResult.warn(verdict) if bad else ProbeResult.ok(verdict)
