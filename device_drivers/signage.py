"""Class signage: card check-ins bound to the timetable → ``attendance.checkin``; notices shown on
the screen → ``signage.notice_shown``.

Driver type ``signage``. Options:

- ``cards``: a list of inner card-reader tables (``type`` = any card driver: ``em4100``,
  ``wiegand``, ``pcsc`` …, optional ``name``, plus that driver's own options), built with the
  same context. Their ``card.tap`` events become check-ins and are not forwarded themselves.
- ``class_id``: the class this screen belongs to; ``timezone`` (``Asia/Shanghai``);
  ``grace_min`` (5): a tap up to this long after a period starts is ``on_time``, later
  ``late``; ``early_min`` (10): a tap this long before a period starts counts for it, on time.
- ``periods``: ``[{name, start = "08:00", end = "08:45", days = ["mon", …], class_id}]``
  (``days`` defaults to mon to fri, ``class_id`` to the driver's).
- ``screen``: ``"host:port"`` of the display app; ``ack_timeout_s`` (5).

Screen protocol (our simulator speaks it too): newline-delimited UTF-8 JSON over TCP, one
object per line. The agent sends ``{"op": "show", "id", "title", "body", "duration_s"}``; the
screen answers ``{"op": "shown", "id"}`` once the notice is on screen, or ``{"op":
"rejected", "id", "reason"}``. :meth:`ClassSignage.show_notice` emits ``signage.notice_shown``
only after ``shown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, TypeVar

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
from device_drivers.codecs.signage import (
    PeriodOptions,
    ScreenCodec,
    ScreenReply,
    parse_timetable,
    place_tap,
)
from device_drivers.plumbing.composite import CardSources, CompositeDriver, DriverPart
from schemas.events import AttendanceCheckin, CardTap, SignageNoticeShown
from schemas.reading import Reading

log = logging.getLogger(__name__)
S = TypeVar("S", bound=msgspec.Struct)


def parse_options(name: str, options: Mapping[str, Any], kind: type[S]) -> S:
    """Config table → typed options, or a :class:`DriverError` naming the bad field."""
    return convert_options(name, options, kind)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"screen must be host:port, not {address!r}")
    return host or "127.0.0.1", int(port)


class ScreenLink:
    """A persistent connection to the display app, reconnected with backoff."""

    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 10.0
    MAX_PENDING = 16

    def __init__(self, address: str, owner: str, ctx: DriverContext) -> None:
        self.host, self.port = split_address(address)
        self.state = DriverState.STARTING
        self.last_error: str | None = None
        self._owner = owner
        self._ctx = ctx
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[str, asyncio.Future[ScreenReply]] = {}

    async def run(self) -> None:
        backoff = self.BACKOFF_MIN_S
        try:
            while True:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), timeout=5
                    )
                except (OSError, TimeoutError) as exc:
                    self._down(f"cannot reach the screen at {self.host}:{self.port}: {exc}")
                    await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                    backoff = min(backoff * 2, self.BACKOFF_MAX_S)
                    continue
                self.state, self._writer = DriverState.OK, writer
                backoff = self.BACKOFF_MIN_S
                try:
                    await self._read(reader)
                    self._down("the screen closed the connection")
                except OSError as exc:
                    self._down(f"lost the screen: {exc}")
                finally:
                    self._writer = None
                    self._fail_pending()
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        finally:
            self.state = DriverState.STOPPED

    async def _read(self, reader: asyncio.StreamReader) -> None:
        codec = ScreenCodec()
        while data := await reader.read(4096):
            bad = codec.bad_lines
            for reply in codec.feed(data):
                fut = self._pending.get(reply.notice_id)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
            if codec.bad_lines > bad:
                self._ctx.count("signage.bad_screen_reply", codec.bad_lines - bad)

    async def show(
        self,
        notice_id: str,
        title: str | None,
        body: str | None,
        duration_s: float | None,
        timeout_s: float,
    ) -> None:
        """Put a notice on screen; return once the screen confirms, raise DriverError if not."""
        writer = self._writer
        if writer is None:
            raise DriverError(f"screen not connected ({self.last_error or 'starting'})")
        if notice_id in self._pending or len(self._pending) >= self.MAX_PENDING:
            raise DriverError(f"notice {notice_id!r} is already waiting, or too many are")
        fut: asyncio.Future[ScreenReply] = asyncio.get_running_loop().create_future()
        self._pending[notice_id] = fut
        try:
            writer.write(ScreenCodec.show(notice_id, title, body, duration_s))
            await writer.drain()
            async with asyncio.timeout(timeout_s):  # not wait_for: see em4100's read loop
                reply = await fut
        except TimeoutError:
            raise DriverError(
                f"the screen did not confirm notice {notice_id!r} in {timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise DriverError(f"could not send notice {notice_id!r} to the screen: {exc}") from exc
        finally:
            self._pending.pop(notice_id, None)
        if not reply.shown:
            raise DriverError(
                f"the screen refused notice {notice_id!r}: {reply.reason or 'no reason'}"
            )

    def _fail_pending(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(OSError("the screen went away"))

    def _down(self, message: str) -> None:
        if self.state != DriverState.DISCONNECTED or message != self.last_error:
            log.warning("%s: %s", self._owner, message)
        self.state = DriverState.DISCONNECTED
        self.last_error = message


class SignageOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    cards: list[dict[str, Any]] = msgspec.field(default_factory=list)
    class_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    timezone: str = "Asia/Shanghai"
    grace_min: Annotated[float, Meta(ge=0)] = 5.0
    early_min: Annotated[float, Meta(ge=0)] = 10.0
    periods: list[PeriodOptions] = msgspec.field(default_factory=list)
    screen: str | None = None
    ack_timeout_s: Annotated[float, Meta(gt=0)] = 5.0


class ClassSignage(CompositeDriver):
    """A class signage unit: its card readers, its timetable and its screen."""

    def __init__(self, name: str, options: SignageOptions, ctx: DriverContext) -> None:
        self.name = name
        self.options = options
        self._ctx = ctx
        super().__init__()
        try:
            self.timetable = parse_timetable(
                options.periods,
                timezone=options.timezone,
                grace_min=options.grace_min,
                early_min=options.early_min,
                class_id=options.class_id,
            )
            self.screen = ScreenLink(options.screen, name, ctx) if options.screen else None
        except ValueError as exc:
            raise DriverError(f"driver {name!r}: {exc}") from exc
        if not options.cards and self.screen is None:
            raise DriverError(f"driver {name!r}: configure `cards`, a `screen`, or both")
        self.cards = CardSources(name, options.cards, ctx)
        self._emit: Emit | None = None

    def _other_parts(self) -> list[DriverPart]:
        return [self.screen] if self.screen is not None else []

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        self.state = DriverState.OK
        try:
            async with asyncio.TaskGroup() as tg:
                if self.cards.parts:
                    tg.create_task(self.cards.run(self._on_tap, emit), name=f"{self.name}:cards")
                if self.screen is not None:
                    tg.create_task(self.screen.run(), name=f"{self.name}:screen")
        except ExceptionGroup as group:
            first = group.exceptions[0]
            self.state, self.last_error = DriverState.FAILED, str(first)
            raise first from group
        finally:
            self._emit = None
            if self.state != DriverState.FAILED:
                self.state = DriverState.STOPPED

    async def _on_tap(self, reading: Reading, tap: CardTap, extra: Mapping[str, Any]) -> None:
        where = place_tap(reading.ts, self.timetable)
        checkin = AttendanceCheckin(
            uid_hash=tap.uid_hash,
            reader=tap.reader,
            class_id=where.class_id,
            period=where.period,
            status=where.status,
        )
        await self._emit_reading(Reading("attendance.checkin", checkin, reading.ts, reading.synced))

    async def show_notice(
        self,
        notice_id: str,
        title: str | None,
        body: str | None,
        duration_s: float | None,
        cmd_id: str | None = None,
    ) -> None:
        """Show a notice (the agent's command handler calls this); emit once it is on screen.

        Raises :class:`DriverError` with a technician-readable reason when it could not be shown.
        """
        if self.screen is None:
            raise DriverError(f"{self.name} has no screen configured")
        if self._emit is None:
            raise DriverError(f"{self.name} is not running")
        if not 1 <= len(notice_id) <= 128:
            raise DriverError("notice_id must be 1 to 128 characters")
        await self.screen.show(notice_id, title, body, duration_s, self.options.ack_timeout_s)
        shown = SignageNoticeShown(
            notice_id=notice_id,
            title=title[:512] if title is not None else None,
            cmd_id=cmd_id,
            duration_s=duration_s,
        )
        await self._emit_reading(Reading("signage.notice_shown", shown))

    async def _emit_reading(self, reading: Reading) -> None:
        if self._emit is None:
            raise DriverError(f"{self.name} is not running")
        await self._emit(reading)


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> ClassSignage:
    return ClassSignage(name, parse_options(name, options, SignageOptions), ctx)


register_driver("signage")(build)


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Check the timetable and that the screen answers a connection; name the current period."""
    try:
        opts = parse_options("probe", options, SignageOptions)
        timetable = parse_timetable(
            opts.periods,
            timezone=opts.timezone,
            grace_min=opts.grace_min,
            early_min=opts.early_min,
            class_id=opts.class_id,
        )
    except (DriverError, ValueError) as exc:
        return ProbeResult.fail(f"configuration problem: {exc}")
    now = place_tap(datetime.now(timetable.tz), timetable)
    verdict = f"{len(timetable.periods)} period(s); now: {now.period or 'no period'}"
    if opts.screen:
        try:
            host, port = split_address(opts.screen)
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
            writer.close()
            verdict += f"; screen at {opts.screen} accepts connections"
        except (OSError, TimeoutError, ValueError) as exc:
            return ProbeResult.fail(f"{verdict}; screen at {opts.screen} unreachable: {exc}")
    return ProbeResult.ok(verdict)
