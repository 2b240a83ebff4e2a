"""Lecture-capture recording units (Extron SMP-style SIS control) polled → ``recorder.status``.

Driver type ``recorder``. Options: ``port`` (device path, ``usb:VID:PID[:SERIAL]`` or
``tcp://host:port``: SIS over Telnet is port 23), ``baudrate`` (9600, 8N1), ``poll_s`` (5),
``timeout_s`` (1), ``report_s`` (60). An event is emitted at once when the record state changes
(and for the first poll), otherwise every ``report_s`` seconds so free space is tracked
(``report_s = 0``: every poll).

SIS commands sent (ESC is 0x1B; replies end with CR LF):

- on every (re)connect ``ESC 0CV CR`` → ``Vrb0``: terse replies, so they carry no prefix;
- ``ESC YRCDR CR`` → ``0`` stop, ``1`` record, ``2`` pause;
- ``I`` → ``ChA<n>*ChB<n>*<state>*<destination>*<free KB>*<elapsed hh:mm:ss>*<left hh:mm:ss>``,
  of which the free space (KBytes, reported as ``free_space_mb`` = KB / 1024) is used;
- on request (:meth:`RecorderPoller.set_recording`, the agent's ``start_recording`` /
  ``stop_recording`` commands) ``ESC Y1RCDR CR`` / ``ESC Y0RCDR CR`` → ``RcdrY1`` / ``RcdrY0``,
  between polls; the new state is reported at once.

``E<nn>`` replies (E10 invalid command, E13 invalid parameter, E14 not valid in this
configuration …) are counted as ``recorder.refused``. The copyright banner and date lines a unit
sends after power-up or on a new Telnet connection are skipped. Other lines are counted
(``recorder.malformed``, ``recorder.malformed.<reason>``) and skipped. A unit that leaves
``UNREACHABLE_AFTER`` polls in a row without a status reply is DISCONNECTED and the port is
reopened with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from device_drivers.base import (
    DriverContext,
    DriverError,
    DriverState,
    Emit,
    ProbeResult,
    convert_options,
    register_driver,
)
from device_drivers.codecs.recorder import (
    INFO_QUERY,
    START_RECORDING,
    STATUS_QUERY,
    STOP_RECORDING,
    TERSE,
    DeviceError,
    InfoReply,
    RecorderItem,
    RecordState,
    Rejected,
    SisCodec,
    StatusReply,
    VerboseAck,
)
from device_drivers.plumbing.link import Link, LinkedDriver, exchange
from device_drivers.plumbing.transport import open_transport
from schemas.events import RecorderStatus
from schemas.reading import Reading

log = logging.getLogger(__name__)


class RecorderOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    port: Annotated[str, Meta(min_length=1)]
    baudrate: Annotated[int, Meta(gt=0)] = 9600
    poll_s: Annotated[float, Meta(gt=0, le=3600)] = 5.0
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    report_s: Annotated[float, Meta(ge=0)] = 60.0


class RecorderPoller(LinkedDriver):
    """A recording unit's SIS control port, polled for record state and free space."""

    counters = "recorder"
    UNREACHABLE_AFTER = 3

    def __init__(self, name: str, options: RecorderOptions, ctx: DriverContext) -> None:
        opener = partial(open_transport, options.port, baudrate=options.baudrate)
        super().__init__(name, options.port, opener, ctx)
        self.options = options
        self.recorder_state: RecordState | None = None
        self.free_kb: int | None = None
        self._last_report = 0.0
        self._last_refusal: DeviceError | None = None
        self._requests: asyncio.Queue[tuple[bool, asyncio.Future[RecordState]]] = asyncio.Queue(4)

    async def set_recording(self, on: bool) -> str:
        """Start (or stop) recording between two polls; the unit's state once it confirms."""
        if self.state != DriverState.OK:
            why = f": {self.last_error}" if self.last_error else ""
            raise DriverError(f"the recorder on {self.port} is not answering{why}")
        done: asyncio.Future[RecordState] = asyncio.get_running_loop().create_future()
        try:
            self._requests.put_nowait((on, done))
        except asyncio.QueueFull:
            raise DriverError("busy: other record commands are waiting") from None
        return await done

    async def session(self, link: Link, emit: Emit) -> None:
        try:
            await self._poll(link, emit)
        finally:
            while not self._requests.empty():
                _, done = self._requests.get_nowait()
                if not done.done():
                    done.set_exception(DriverError(f"the link to {self.port} was lost"))

    async def _poll(self, link: Link, emit: Emit) -> None:
        codec = SisCodec()
        missed = 0
        await self._ask(link, codec, TERSE, VerboseAck)
        while True:
            state, heard = await self._ask(link, codec, STATUS_QUERY, StatusReply)
            if state is None:
                missed += 1
                if missed >= self.UNREACHABLE_AFTER:
                    self.down(self._unreachable(heard))
                    return
            else:
                missed = 0
                self.up()
                await self._ask(link, codec, INFO_QUERY, InfoReply)
                await self._report(state, emit)
            await self._serve_requests(link, codec, emit)

    def _refusal(self) -> DeviceError | None:
        """The error code the unit answered since the last command was sent, if any."""
        return self._last_refusal

    async def _serve_requests(self, link: Link, codec: SisCodec, emit: Emit) -> None:
        """Until the next poll is due, carry out record commands as they come."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.options.poll_s
        while (left := due - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    on, done = await self._requests.get()
            except TimeoutError:
                return
            self._last_refusal = None
            request = START_RECORDING if on else STOP_RECORDING
            state, _ = await self._ask(link, codec, request, StatusReply)
            if state is not None:
                await self._report(state, emit)
            if done.done():  # the command gave up waiting
                continue
            if state is not None:
                done.set_result(state)
            elif (refusal := self._refusal()) is not None:
                done.set_exception(
                    DriverError(f"the recorder refused: {refusal.code} ({refusal.meaning})")
                )
            else:
                done.set_exception(
                    DriverError(f"no reply to the record command in {self.options.timeout_s:g} s")
                )

    async def _ask(
        self, link: Link, codec: SisCodec, query: bytes, kind: type[RecorderItem]
    ) -> tuple[RecordState | None, bool]:
        """Send one query and absorb the replies; the record state they gave, and if any came."""
        answer = await exchange(link, query, codec.feed, partial(_is, kind), self.options.timeout_s)
        state: RecordState | None = None
        for item in answer.items:
            if isinstance(item, StatusReply):
                state = item.state
            elif isinstance(item, InfoReply):
                self.free_kb = item.free_kb
            elif isinstance(item, DeviceError):
                self._last_refusal = item
                self.count("refused")
                log.info("%s: the recorder answered %s (%s)", self.name, item.code, item.meaning)
            elif isinstance(item, Rejected):
                self.malformed(item.reason, item.raw)
        return state, answer.heard

    async def _report(self, state: RecordState, emit: Emit) -> None:
        now = time.monotonic()
        changed = state != self.recorder_state
        if not changed and now - self._last_report < self.options.report_s:
            return
        self.recorder_state = state
        self._last_report = now
        free = None if self.free_kb is None else round(self.free_kb / 1024, 3)
        await emit(
            Reading(
                "recorder.status",
                RecorderStatus(state=state, free_space_mb=free, recorder=self.name),
            )
        )

    def _unreachable(self, heard: bool) -> str:
        if heard:
            return (
                f"the recorder on {self.port} answers nothing readable: check the baud rate "
                f"({self.options.baudrate}) and that it is an SIS device"
            )
        return f"no reply from the recorder on {self.port}: check the cable and that it is on"


def _is(kind: type[RecorderItem], item: RecorderItem) -> bool:
    return isinstance(item, kind)


def parse_options(name: str, options: Mapping[str, Any]) -> RecorderOptions:
    return convert_options(name, options, RecorderOptions)


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> RecorderPoller:
    return RecorderPoller(name, parse_options(name, options), ctx)


register_driver("recorder")(build)


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Ask the recorder once for its record state and free space; say what came back."""
    try:
        opts = parse_options("probe", options)
        opener = partial(open_transport, opts.port, baudrate=opts.baudrate)
        link = await Link.open(opener, "probe")
    except (DriverError, OSError, ValueError) as exc:
        return ProbeResult.fail(f"cannot open the recorder port: {exc}")
    codec = SisCodec()
    items: list[RecorderItem] = []
    try:
        async with link:
            for query, kind in ((STATUS_QUERY, StatusReply), (INFO_QUERY, InfoReply)):
                answer = await exchange(link, query, codec.feed, partial(_is, kind), opts.timeout_s)
                items += answer.items
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure as its verdict
        return ProbeResult.fail(f"{opts.port} opened but talking to it failed: {exc}")
    states = [i.state for i in items if isinstance(i, StatusReply)]
    infos = [i for i in items if isinstance(i, InfoReply)]
    if not states:
        bad = sum(isinstance(i, Rejected | DeviceError) for i in items)
        why = f"{bad} unreadable or refused repl(ies)" if bad else "no reply"
        verdict = f"recorder on {opts.port}: {why} in {opts.timeout_s:g} s"
        return ProbeResult.warn(verdict) if bad else ProbeResult.fail(verdict)
    free = f", {infos[-1].free_kb / 1024:.0f} MB free on {infos[-1].destination}" if infos else ""
    return ProbeResult.ok(f"recorder on {opts.port}: {states[-1]}{free}")
