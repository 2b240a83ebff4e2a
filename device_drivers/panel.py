"""Smart-board panels polled on their RS-232 / TCP control port → ``board.power``, ``board.input``.

Driver type ``panel``. Options: ``port`` (device path, ``/dev/serial/by-id/…``,
``usb:VID:PID[:SERIAL]`` or ``tcp://host:port``), ``profile`` (a shipped device profile's name:
``smart``, ``maxhub`` (our own framing, the simulator's), ``maxhub-v6``; or the path of a
profile file — see docs/profiles.md), and overrides of the profile's ``baudrate``, ``poll_s``,
``timeout_s`` and ``machine_id`` (the profile's ``{id}`` variable). The profile's queries,
reply patterns and value maps are run by :mod:`device_drivers.profile`; its first ``[[poll]]``
is the power query. Events are emitted on change only, and for the first observation
(``previous`` is then ``"unknown"`` / absent).

The two codecs below (:class:`SmartCodec`, :class:`MaxhubCodec`) are the hand-written parsers
the ``smart`` and ``maxhub`` profiles replace; they stay as a reference the profiles are
tested against.

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
    convert_options,
    register_driver,
)
from device_drivers.codecs.lines import LineSplitter, Overlong
from device_drivers.codecs.profile import Item as ProfileItem
from device_drivers.codecs.profile import (
    Observed,
    Poll,
    Profile,
    ProfileCodec,
    ProfileError,
    load_profile,
)
from device_drivers.codecs.profile import Refused as ProfileRefused
from device_drivers.codecs.profile import Rejected as ProfileRejected
from device_drivers.plumbing.link import Link, LinkedDriver, exchange
from device_drivers.plumbing.transport import open_transport
from schemas.events import BoardInput, BoardPower
from schemas.reading import Reading

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
    #: A shipped profile's name (``smart``, ``maxhub``, ``maxhub-v6``) or a path to a .toml file.
    profile: Annotated[str, Meta(min_length=1, max_length=4096)] = "smart"
    baudrate: Annotated[int, Meta(gt=0)] | None = None
    poll_s: Annotated[float, Meta(gt=0, le=3600)] | None = None
    timeout_s: Annotated[float, Meta(gt=0, le=60)] | None = None
    machine_id: Annotated[int, Meta(ge=1, le=0xFE)] | None = None


@dataclass(frozen=True, slots=True)
class PanelSetup:
    """Options with their profile loaded: what the poller and the probe run on."""

    options: PanelOptions
    profile: Profile
    polls: tuple[Poll, ...]
    speed: int
    poll_s: float
    timeout_s: float

    @property
    def port(self) -> str:
        return self.options.port

    def codec(self) -> ProfilePanelCodec:
        return ProfilePanelCodec(self.profile.codec())


def setup(name: str, options: Mapping[str, Any]) -> PanelSetup:
    """Options and their profile, checked; :class:`DriverError` names the file, line and field."""
    opts = convert_options(name, options, PanelOptions)
    try:
        profile = load_profile(opts.profile)
        if opts.machine_id is not None:
            profile = profile.with_variables({"id": opts.machine_id})
    except ProfileError as exc:
        raise DriverError(f"driver {name!r}: profile {exc}") from None
    polls = tuple(profile.spec.poll)
    if polls[0].expect != "board.power":
        raise DriverError(
            f"driver {name!r}: profile {profile.name}: a panel profile's first [[poll]] must "
            "expect board.power (silence after it is how standby is told)"
        )
    timing = profile.spec.polling
    return PanelSetup(
        opts,
        profile,
        polls,
        opts.baudrate or profile.spec.transport.baudrate,
        opts.poll_s or timing.every_s,
        opts.timeout_s or timing.timeout_s,
    )


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


def _answers(expect: str, item: PanelItem) -> bool:
    if isinstance(item, Refused):
        return True
    return isinstance(item, PowerReply if expect == "board.power" else InputReply)


class PanelPoller(LinkedDriver):
    """A smart board's control port, polled for power state and input source."""

    counters = "panel"
    #: Silent polls of a panel that has answered before, after which it is in standby.
    STANDBY_AFTER = 2
    #: Polls without a valid reply from a panel that never answered, after which it is down.
    UNREACHABLE_AFTER = 3

    def __init__(self, name: str, setup: PanelSetup, ctx: DriverContext) -> None:
        opener = partial(open_transport, setup.port, baudrate=setup.speed)
        super().__init__(name, setup.port, opener, ctx)
        self.setup = setup
        self.options = setup.options
        self.tracker = BoardTracker()
        #: Whether the panel has ever given a valid reply: silence then means standby.
        self.reachable = False

    async def session(self, link: Link, emit: Emit) -> None:
        codec = self.setup.codec()
        first, *rest = self.setup.polls
        silent = missed = 0
        while True:
            power, heard = await self._ask_power(link, codec, first, emit)
            if power is not None:
                silent = missed = 0
                self.reachable = True
                self.up()
                for poll in rest:
                    if self._wanted(poll):
                        await self._ask(link, codec, poll, emit)
            else:
                missed += 1
                silent = 0 if heard else silent + 1
                if self.reachable and silent >= self.STANDBY_AFTER:
                    self.up()  # a silent panel is a panel in standby, not a fault
                    await self._emit_power("standby", emit)
                elif not self.reachable and missed >= self.UNREACHABLE_AFTER:
                    self.down(self._unreachable(heard))
            await asyncio.sleep(self.setup.poll_s)

    def _wanted(self, poll: Poll) -> bool:
        """Whether the poll's ``when`` conditions hold for what was last seen."""
        seen = {"board.power": self.tracker.power, "board.input": self.tracker.source}
        return all(seen.get(event) == value for event, value in poll.when.items())

    async def _ask_power(
        self, link: Link, codec: ProfilePanelCodec, poll: Poll, emit: Emit
    ) -> tuple[Power | None, bool]:
        answer = await exchange(
            link,
            self.setup.profile.query(poll.command),
            codec.feed,
            lambda i: isinstance(i, PowerReply),
            self.setup.timeout_s,
        )
        power: Power | None = None
        for item in answer.items:
            if isinstance(item, PowerReply):
                power = item.state
                await self._emit_power(item.state, emit)
            else:
                await self._handle(item, emit)
        return power, answer.heard

    async def _ask(self, link: Link, codec: ProfilePanelCodec, poll: Poll, emit: Emit) -> None:
        answer = await exchange(
            link,
            self.setup.profile.query(poll.command),
            codec.feed,
            partial(_answers, poll.expect),
            self.setup.timeout_s,
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
                f"({self.setup.profile.name}) and baud rate ({self.setup.speed})"
            )
        return (
            f"no reply from the panel on {self.port}: check the cable, that RS-232 control is "
            "enabled, and that power saving is off (a panel in low power never answers)"
        )


def parse_options(name: str, options: Mapping[str, Any]) -> PanelSetup:
    return setup(name, options)


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> PanelPoller:
    return PanelPoller(name, setup(name, options), ctx)


register_driver("panel")(build)


def _shown(raw: bytes, text: bool) -> str:
    if text:
        return repr(raw.decode("latin-1"))[:80]
    return raw[:32].hex(" ").upper()


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Send the profile's queries once; show each reply and the event it maps to."""
    try:
        s = setup("probe", options)
        link = await Link.open(partial(open_transport, s.port, baudrate=s.speed), "probe")
    except (DriverError, OSError, ValueError) as exc:
        return ProbeResult.fail(f"cannot open the panel port: {exc}")
    codec = s.codec()
    text = s.profile.mode == "text"
    lines: list[str] = []
    seen: list[ProfileItem] = []
    short = {"board.power": "power", "board.input": "input"}
    heard = False
    try:
        async with link:
            for poll in s.polls:
                codec.seen.clear()
                query = s.profile.query(poll.command)
                answer = await exchange(
                    link, query, codec.feed, partial(_answers, poll.expect), s.timeout_s
                )
                heard = heard or answer.heard
                seen += codec.seen
                replies = [_described(i, text) for i in codec.seen] or ["no reply"]
                lines.append(f"{poll.command} {_shown(query, text)} -> " + "; ".join(replies))
    except Exception as exc:  # report whatever the port says
        return ProbeResult.fail(f"{s.port} opened but talking to it failed: {exc}")
    where = f"profile {s.profile.name} on {s.port} at {s.speed} baud"
    everything = " | ".join(lines)
    if not heard:
        return ProbeResult.fail(
            f"{where}: no reply in {s.timeout_s:g} s (a panel in standby is silent; "
            f"otherwise check the cable and that RS-232 control is enabled): {everything}"
        )
    found = [f"{short.get(i.event, i.event)} {i.value}" for i in seen if isinstance(i, Observed)]
    bad = sum(isinstance(i, ProfileRejected) for i in seen)
    if not found:
        return ProbeResult.warn(f"{where}: answered, but nothing the profile reads: {everything}")
    verdict = f"{where}: {everything}: " + ", ".join(found)
    return ProbeResult.warn(verdict) if bad else ProbeResult.ok(verdict)


def _described(item: ProfileItem, text: bool) -> str:
    if isinstance(item, Observed):
        return f"{_shown(item.raw, text)} = {item.event} {{{item.field}: {item.value!r}}}"
    if isinstance(item, ProfileRefused):
        return f"{_shown(item.raw, text)} = refused ({item.detail})"
    return f"{_shown(item.raw, text)} = rejected ({item.reason})"
