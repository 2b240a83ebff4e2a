"""Smart-board panels polled on their RS-232 / TCP control port → ``board.power``, ``board.input``.

Driver type ``panel``. Options: ``port`` (device path, ``/dev/serial/by-id/…``,
``usb:VID:PID[:SERIAL]`` or ``tcp://host:port``), ``profile`` (a shipped device profile's name:
``smart``, ``maxhub`` (our own framing, the simulator's), ``maxhub-v6``; or the path of a
profile file — see docs/profiles.md), and overrides of the profile's ``baudrate``, ``poll_s``,
``timeout_s`` and ``machine_id`` (the profile's ``{id}`` variable). The profile's queries,
reply patterns and value maps are run by :mod:`device_drivers.codecs.profile`; its first
``[[poll]]`` is the power query. Events are emitted on change only, and for the first observation
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
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

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
from device_drivers.codecs.panel import (
    BoardTracker,
    InputReply,
    PanelItem,
    Power,
    PowerReply,
    ProfilePanelCodec,
    Refused,
)
from device_drivers.codecs.profile import Item as ProfileItem
from device_drivers.codecs.profile import (
    Observed,
    Poll,
    Profile,
    ProfileError,
    load_profile,
)
from device_drivers.codecs.profile import Refused as ProfileRefused
from device_drivers.codecs.profile import Rejected as ProfileRejected
from device_drivers.plumbing.link import Link, LinkedDriver, exchange
from device_drivers.plumbing.transport import open_transport
from schemas.reading import Reading

log = logging.getLogger(__name__)


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
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure as its verdict
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
