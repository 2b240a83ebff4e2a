"""PC/SC contactless readers through pcscd or Windows' Smart Card service (pyscard) → ``card.tap``.

Driver type ``pcsc``. Options: ``reader`` (a case-insensitive substring of the PC/SC reader
name; empty watches every reader), ``reader_name`` (the ``reader`` label on events; default
the driver's name), ``poll_ms`` (500: how long one wait for reader changes lasts, which bounds
how soon a new reader is noticed where pcscd has no hot-plug notification).

A thread waits in ``SCardGetStatusChange``. On each card insertion (pcsc-lite's per-reader
event counter tells a quick remove-and-insert apart from a card left lying there) it connects
and sends the PC/SC part 3 GET DATA UID command ``FF CA 00 00 00``: ``90 00`` is the UID;
``6C xx`` is re-issued once with ``Le = xx``; ``63 00`` and ``6A 81`` are read failures
(``pcsc.read_failed``), any other answer an error (``pcsc.read_error``). Neither emits. The
card's technology comes from its ATR (:func:`card_tech`). When pcscd goes away or restarts the
context is re-established with backoff (``pcsc.disconnected``); a card still on the reader
afterwards is not a new tap (``pcsc.still_present``). A card already on the reader when the
driver starts, or when its reader is plugged in, is a tap.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta
from smartcard import scard

from device_drivers.base import (
    DriverContext,
    DriverError,
    DriverState,
    DriverStatus,
    Emit,
    ProbeResult,
    convert_options,
    register_driver,
)
from device_drivers.codecs.pcsc import UidFailure, UidRead, card_tech, read_uid
from device_drivers.plumbing.handoff import DropOldestQueue
from schemas.events import CardTech
from schemas.reading import Reading

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReadersUp:
    readers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadersDown:
    reason: str


@dataclass(frozen=True, slots=True)
class CardSeen:
    reader: str
    uid: bytes
    tech: CardTech
    retried: bool


@dataclass(frozen=True, slots=True)
class CardUnread:
    reader: str
    counter: Literal["pcsc.read_failed", "pcsc.read_error"]
    reason: str


@dataclass(frozen=True, slots=True)
class CardStillPresent:
    reader: str


Observation = ReadersUp | ReadersDown | CardSeen | CardUnread | CardStillPresent
#: What serves PC/SC here, for messages (the PC/SC calls are the same on both: pyscard's scard
#: is WinSCard on Windows and pcsc-lite elsewhere).
SERVICE: Final = "the Smart Card service (SCardSvr)" if sys.platform == "win32" else "pcscd"
PNP_READER: Final = "\\\\?PnP?\\Notification"
_RETRY_LISTING: Final = frozenset(
    {
        scard.SCARD_E_UNKNOWN_READER,
        scard.SCARD_E_READER_UNAVAILABLE,
        scard.SCARD_E_NO_READERS_AVAILABLE,
    }
)
_SERVICE_GONE: Final = frozenset(
    {
        scard.SCARD_E_NO_SERVICE,
        scard.SCARD_E_SERVICE_STOPPED,
        scard.SCARD_F_COMM_ERROR,
        scard.SCARD_E_INVALID_HANDLE,
    }
)


class PcscOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    reader: str = ""
    reader_name: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    poll_ms: Annotated[int, Meta(ge=50, le=60_000)] = 500


class PcscError(Exception):
    """pcscd answered a call with an error code."""

    def __init__(self, what: str, code: int) -> None:
        self.code = code
        super().__init__(f"{what}: {describe(code)}")


def describe(code: int) -> str:
    return f"{scard.SCardGetErrorMessage(code).rstrip('.')} (0x{code & 0xFFFFFFFF:08X})"


def _check(what: str, code: int) -> None:
    if code != scard.SCARD_S_SUCCESS:
        raise PcscError(what, code)


def list_readers(context: int, wanted: str) -> tuple[str, ...]:
    code, readers = scard.SCardListReaders(context, [])
    if code == scard.SCARD_E_NO_READERS_AVAILABLE:
        return ()
    _check("listing readers", code)
    return tuple(r for r in readers if wanted.casefold() in r.casefold())


def no_reader(wanted: str) -> str:
    if wanted:
        return f"no PC/SC reader whose name contains {wanted!r}"
    return "no PC/SC reader connected"


def read_card(context: int, reader: str) -> UidRead | UidFailure:
    """Connect to the card on ``reader`` and read its UID; raise PcscError if pcscd is gone."""
    code, card, protocol = scard.SCardConnect(
        context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    )
    if code in _SERVICE_GONE:
        raise PcscError("connecting to the card", code)
    if code != scard.SCARD_S_SUCCESS:
        return UidFailure("error", f"could not connect to the card: {describe(code)}")

    def transmit(apdu: bytes) -> bytes:
        code, resp = scard.SCardTransmit(card, protocol, list(apdu))
        _check("sending GET UID", code)
        return bytes(resp)

    try:
        return read_uid(transmit)
    except PcscError as exc:
        if exc.code in _SERVICE_GONE:
            raise
        return UidFailure("error", f"the card stopped answering ({exc})")
    finally:
        scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)


class ReaderWatcher:
    """Watches the readers on a thread of its own and reports :data:`Observation` s.

    pyscard's own monitors die silently when pcscd restarts; this loop notices the error,
    drops the context and establishes a new one, with jittered exponential backoff.
    """

    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 10.0
    #: After pcscd comes back, the same card on the same reader within this time is the card
    #: that lay there all along (a fresh pcscd may first report the reader empty), not a tap.
    RESETTLE_S = 5.0

    def __init__(
        self, options: PcscOptions, name: str, report: Callable[[Observation], None]
    ) -> None:
        self._opts = options
        self._report = report
        self._stop = threading.Event()
        self._context: int | None = None
        #: The UID of the card on each reader, kept until the reader is seen empty.
        self._on_reader: dict[str, bytes] = {}
        #: The cards that lay on the readers when pcscd was lost, and until when they count.
        self._carried: dict[str, bytes] = {}
        self._carried_until = 0.0
        self._thread = threading.Thread(target=self._run, name=f"pcsc-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Wake the thread from its wait and join it (blocking: call from a thread)."""
        self._stop.set()
        if (context := self._context) is not None:
            scard.SCardCancel(context)
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = self.BACKOFF_MIN_S
        while not self._stop.is_set():
            code, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if code == scard.SCARD_S_SUCCESS:
                self._context = context
                self._carried_until = time.monotonic() + self.RESETTLE_S
                backoff = self.BACKOFF_MIN_S
                try:
                    self._watch(context)
                    return
                except PcscError as exc:
                    self._report(ReadersDown(f"lost {SERVICE} ({exc})"))
                    self._carry_over()
                finally:
                    self._context = None
                    scard.SCardReleaseContext(context)
            else:
                self._report(ReadersDown(f"cannot reach {SERVICE}: {describe(code)}"))
            self._stop.wait(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            backoff = min(backoff * 2, self.BACKOFF_MAX_S)

    def _carry_over(self) -> None:
        if time.monotonic() >= self._carried_until:
            self._carried = {}
        self._carried.update(self._on_reader)
        self._on_reader = {}

    def _watch(self, context: int) -> None:
        """Follow readers and cards until stopped; raise PcscError if pcscd fails."""
        states: dict[str, int] = {}
        pnp = scard.SCARD_STATE_UNAWARE
        shown: tuple[str, ...] | None = None
        timeout = self._opts.poll_ms
        while not self._stop.is_set():
            readers = list_readers(context, self._opts.reader)
            if readers != shown:
                shown = readers
                found = ReadersUp(readers) if readers else ReadersDown(no_reader(self._opts.reader))
                self._report(found)
            states = {r: s for r, s in states.items() if r in readers}
            query = [(r, states.get(r, scard.SCARD_STATE_UNAWARE)) for r in readers]
            code, result = scard.SCardGetStatusChange(context, timeout, [*query, (PNP_READER, pnp)])
            if code in (scard.SCARD_E_TIMEOUT, scard.SCARD_E_CANCELLED):
                continue
            if code in _RETRY_LISTING:
                self._stop.wait(timeout / 1000)
                continue
            _check("waiting for card events", code)
            for reader, raw_event, atr in result:
                event = raw_event & ~scard.SCARD_STATE_CHANGED
                if reader == PNP_READER:
                    pnp = event
                else:
                    self._changed(context, reader, states.get(reader), event, bytes(atr))
                    states[reader] = event

    def _changed(self, context: int, reader: str, old: int | None, new: int, atr: bytes) -> None:
        if new & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_UNAVAILABLE):
            return  # the reader is going away; the next listing drops it
        if not new & scard.SCARD_STATE_PRESENT:
            if new & scard.SCARD_STATE_EMPTY:
                self._on_reader.pop(reader, None)
            return
        if old is not None and old & scard.SCARD_STATE_PRESENT and old >> 16 == new >> 16:
            return  # the same card, only its use changed
        result = read_card(context, reader)
        if isinstance(result, UidFailure):
            counter: Literal["pcsc.read_failed", "pcsc.read_error"] = (
                "pcsc.read_failed" if result.kind == "failed" else "pcsc.read_error"
            )
            self._report(CardUnread(reader, counter, result.reason))
            return
        self._on_reader[reader] = result.uid
        if self._carried.pop(reader, None) == result.uid and time.monotonic() < self._carried_until:
            self._report(CardStillPresent(reader))
        else:
            self._report(CardSeen(reader, result.uid, card_tech(atr), result.retried))


class PcscCardReader(DriverStatus):
    """Contactless readers served by pcscd."""

    counters = "pcsc"
    QUEUE_MAX = 64

    def __init__(self, name: str, options: PcscOptions, ctx: DriverContext) -> None:
        super().__init__(name, ctx)
        self.options = options
        self.label = options.reader_name or name

    async def run(self, emit: Emit) -> None:
        queue: DropOldestQueue[Observation] = DropOldestQueue(
            self.QUEUE_MAX, lambda: self.count("dropped")
        )
        watcher = ReaderWatcher(self.options, self.name, queue.put_threadsafe)
        watcher.start()
        try:
            while True:
                await self._handle(await queue.get(), emit)
        finally:
            await asyncio.to_thread(watcher.stop)
            self.state = DriverState.STOPPED

    async def _handle(self, obs: Observation, emit: Emit) -> None:
        match obs:
            case ReadersUp(readers):
                if self.state != DriverState.OK:
                    log.info("%s: watching %s", self.name, ", ".join(readers))
                self.state = DriverState.OK
            case ReadersDown(reason):
                self.down(reason)
            case CardSeen(_, uid, tech, retried):
                if retried:
                    self._ctx.count("pcsc.uid_retry")
                tap = self._ctx.hasher.card_tap(uid, tech=tech, reader=self.label)
                await emit(Reading("card.tap", tap))
            case CardUnread(reader, counter, reason):
                self._ctx.count(counter)
                self.last_error = f"{reader}: {reason}"
                log.warning("%s: %s", self.name, self.last_error)
            case CardStillPresent(reader):
                self._ctx.count("pcsc.still_present")


def parse_options(name: str, options: Mapping[str, Any]) -> PcscOptions:
    return convert_options(name, options, PcscOptions)


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> PcscCardReader:
    return PcscCardReader(name, parse_options(name, options), ctx)


register_driver("pcsc")(build)


def _probe(opts: PcscOptions) -> ProbeResult:
    code, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if code != scard.SCARD_S_SUCCESS:
        return ProbeResult.fail(f"cannot reach {SERVICE}: {describe(code)} (is {SERVICE} running?)")
    try:
        readers = list_readers(context, opts.reader)
        if not readers:
            return ProbeResult.fail(f"{SERVICE} is running but there is {no_reader(opts.reader)}")
        query = [(r, scard.SCARD_STATE_UNAWARE) for r in readers]
        code, result = scard.SCardGetStatusChange(context, 0, query)
        _check("reading reader states", code)
        verdicts = []
        unread = False
        for reader, event, atr in result:
            if not event & scard.SCARD_STATE_PRESENT:
                verdicts.append(f"{reader}: no card (present one to test a read)")
                continue
            read = read_card(context, reader)
            tech = card_tech(bytes(atr))
            if isinstance(read, UidFailure):
                unread = True
                verdicts.append(f"{reader}: {tech} card, UID not read: {read.reason}")
            else:
                verdicts.append(f"{reader}: {tech} card, UID read ({len(read.uid)} bytes)")
        # No card on a reader is its normal state; a card whose UID will not read is odd.
        verdict = "; ".join(verdicts)
        return ProbeResult.warn(verdict) if unread else ProbeResult.ok(verdict)
    except PcscError as exc:
        return ProbeResult.fail(f"{SERVICE} failed while probing: {exc}")
    finally:
        scard.SCardReleaseContext(context)


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Connect to pcscd once, list the readers and read the UID of any card lying on them."""
    try:
        opts = parse_options("probe", options)
    except DriverError as exc:
        return ProbeResult.fail(str(exc))
    return await asyncio.to_thread(_probe, opts)
