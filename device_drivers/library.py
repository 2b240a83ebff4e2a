"""Self-service library terminals (借阅终端) → ``library.loan`` / ``library.return``.

Driver type ``library_terminal`` (device kind ``library_terminal``). Options:

- ``cards``: the student-card readers, inner card-driver tables as for ``signage``
  (``em4100``, ``wiegand``, ``pcsc`` …). A tap opens a session for that student (the UID is
  hashed by the inner driver with the district key, like every card tap).
- ``scanner``: a serial barcode scanner: ``port``, ``baudrate`` (9600), ``suffix``
  (``cr`` | ``lf`` | ``crlf``), ``item_pattern`` (the library's own item barcodes, a regular
  expression); see :mod:`device_drivers.barcode`.
- ``pad``: the HF RFID pad, through pcscd: ``reader`` (a substring of the PC/SC reader names
  of its slots; each slot holds one book), ``poll_ms`` (250), ``block_size`` (4), ``blocks``
  (8), ``blocks_per_read`` (8). Tags are read with GET DATA UID then READ BINARY, and decoded
  as ISO 28560-3 (:mod:`device_drivers.codecs.iso28560`).
- ``terminal``: the terminal's label in events (default the driver's name); ``session_s``
  (60): a session ends this long after its last tap or book, or when the same card taps
  again (a "finish" tap); ``max_items`` (64) per session.

A book read while a session is open is a loan to that student; with none open, a return
(``student_hash`` null). The same book twice in one session (or returned twice within
``session_s``) counts once. Every bad read — a wrong check digit, a damaged or foreign tag, a
book lifted mid-read — is counted (``library.<why>``), logged, and shown on the terminal
(:attr:`LibraryTerminal.messages`, and the ``terminal_message`` hook); it never becomes a loan.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta
from smartcard import scard

from device_drivers.barcode import BarcodeScanner, ScannerOptions, compile_pattern
from device_drivers.base import (
    DriverContext,
    DriverError,
    DriverState,
    Emit,
    ProbeResult,
    convert_options,
    register_driver,
)
from device_drivers.codecs.barcode import BadCode, ItemCode, ScanError
from device_drivers.codecs.iso28560 import LibraryItemTag, TagProblem, decode_basic_block
from device_drivers.codecs.pcsc import UidFailure, read_uid
from device_drivers.pcsc import (
    _SERVICE_GONE,
    Observation,
    PcscError,
    PcscOptions,
    ReadersDown,
    ReadersUp,
    ReaderWatcher,
    describe,
)
from device_drivers.plumbing.composite import CardSources, CompositeDriver, DriverPart
from device_drivers.plumbing.handoff import DropOldestQueue
from schemas.events import CardTap, LibraryLoan, LibraryReturn
from schemas.reading import Reading

log = logging.getLogger(__name__)

Source = Literal["barcode", "rfid"]

# -- sessions (sans-I/O) -------------------------------------------------------------------------


@dataclass(slots=True)
class Session:
    session_id: str
    student_hash: str
    last: float
    items: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Refused:
    """A book that cannot join the session; the reason is for the terminal's screen."""

    counter: str
    reason: str


class LoanSessions:
    """Who is borrowing now, and which books already counted: taps and books in, events out."""

    MAX_RECENT_RETURNS = 1024

    def __init__(self, terminal: str, session_s: float, max_items: int = 64) -> None:
        self.terminal = terminal
        self.session_s = session_s
        self.max_items = max_items
        self.session: Session | None = None
        self._returned: OrderedDict[str, float] = OrderedDict()

    def current(self, now: float) -> Session | None:
        if self.session is not None and now - self.session.last > self.session_s:
            self.session = None
        return self.session

    def tap(self, student_hash: str, now: float) -> Session | None:
        """Open a session for the student; the same student tapping again finishes theirs."""
        session = self.current(now)
        if session is not None and session.student_hash == student_hash:
            self.session = None
            return None
        self.session = Session(f"{self.terminal}-{uuid.uuid4().hex[:16]}", student_hash, now)
        return self.session

    def book(
        self, item_id: str, source: Source, now: float
    ) -> LibraryLoan | LibraryReturn | Refused | None:
        """The event a book read makes, None if it already counted, or why it is refused."""
        session = self.current(now)
        if session is None:
            return self._return(item_id, source, now)
        session.last = now
        if item_id in session.items:
            return None
        if len(session.items) >= self.max_items:
            return Refused(
                "too_many_items", f"at most {self.max_items} books at a time: finish this loan"
            )
        session.items.add(item_id)
        self._returned.pop(item_id, None)  # once lent again, its next return is a new one
        return LibraryLoan(
            student_hash=session.student_hash,
            item_id=item_id,
            source=source,
            terminal=self.terminal,
            session_id=session.session_id,
        )

    def _return(self, item_id: str, source: Source, now: float) -> LibraryReturn | None:
        while self._returned and now - next(iter(self._returned.values())) > self.session_s:
            self._returned.popitem(last=False)
        if item_id in self._returned:
            return None
        self._returned[item_id] = now
        if len(self._returned) > self.MAX_RECENT_RETURNS:
            self._returned.popitem(last=False)
        return LibraryReturn(
            student_hash=None, item_id=item_id, source=source, terminal=self.terminal
        )


# -- the RFID pad (pcscd I/O) --------------------------------------------------------------------

#: pcscd's answers when the card left the field between connect and the last APDU.
_TAG_GONE: Final = frozenset(
    {
        scard.SCARD_W_REMOVED_CARD,
        scard.SCARD_E_NO_SMARTCARD,
        scard.SCARD_W_RESET_CARD,
        scard.SCARD_W_UNPOWERED_CARD,
        scard.SCARD_W_UNRESPONSIVE_CARD,
        scard.SCARD_E_NOT_TRANSACTED,
    }
)
TAG_LIFTED: Final = "a book was lifted off the pad while it was being read: lay it down again"


class PadOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    reader: str = ""
    poll_ms: Annotated[int, Meta(ge=50, le=60_000)] = 250
    block_size: Annotated[int, Meta(ge=1, le=32)] = 4
    blocks: Annotated[int, Meta(ge=1, le=256)] = 8
    blocks_per_read: Annotated[int, Meta(ge=1, le=64)] = 8


def read_binary_command(block: int, length: int) -> bytes:
    """PC/SC part 3 READ BINARY: P1 = 00, P2 = first block, Le = bytes (256 as 00)."""
    return bytes([0xFF, 0xB0, 0x00, block, length & 0xFF])


@dataclass(frozen=True, slots=True)
class TagRead:
    reader: str
    uid: bytes
    memory: bytes


@dataclass(frozen=True, slots=True)
class TagUnread:
    reader: str
    counter: str
    reason: str


PadObservation = ReadersUp | ReadersDown | TagRead | TagUnread


def read_memory(transmit: Callable[[bytes], bytes], opts: PadOptions) -> bytes | TagUnread:
    """Read the tag's user memory block group by block group (raises PcscError from transmit)."""
    memory = bytearray()
    for first in range(0, opts.blocks, opts.blocks_per_read):
        count = min(opts.blocks_per_read, opts.blocks - first)
        want = count * opts.block_size
        resp = transmit(read_binary_command(first, want))
        data, sw = resp[:-2], resp[-2:]
        if sw != b"\x90\x00" or len(data) != want:
            return TagUnread(
                "", "tag_unreadable", f"the pad could not read the tag's memory (status {sw.hex()})"
            )
        memory += data
    return bytes(memory)


def read_tag(context: int, reader: str, opts: PadOptions) -> TagRead | TagUnread:
    """Connect to the tag on one pad slot, read its UID and memory; PcscError if pcscd is gone."""
    code, card, protocol = scard.SCardConnect(
        context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
    )
    if code in _SERVICE_GONE:
        raise PcscError("connecting to the tag", code)
    if code in _TAG_GONE:
        return TagUnread(reader, "tag_removed", TAG_LIFTED)
    if code != scard.SCARD_S_SUCCESS:
        reason = f"could not connect to the tag: {describe(code)}"
        return TagUnread(reader, "tag_unreadable", reason)

    def transmit(apdu: bytes) -> bytes:
        code, resp = scard.SCardTransmit(card, protocol, list(apdu))
        if code != scard.SCARD_S_SUCCESS:
            raise PcscError("reading the tag", code)
        if len(resp) < 2:  # no status word at all: the tag left mid-command (vpcd says so)
            raise PcscError("reading the tag", scard.SCARD_W_REMOVED_CARD)
        return bytes(resp)

    try:
        uid = read_uid(transmit)
        if isinstance(uid, UidFailure):
            return TagUnread(reader, "tag_unreadable", uid.reason)
        memory = read_memory(transmit, opts)
    except PcscError as exc:
        if exc.code in _TAG_GONE or not _still_there(card):
            return TagUnread(reader, "tag_removed", TAG_LIFTED)
        if exc.code in _SERVICE_GONE:
            raise
        return TagUnread(reader, "tag_unreadable", f"the tag stopped answering ({exc})")
    finally:
        scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
    if isinstance(memory, TagUnread):
        return TagUnread(reader, memory.counter, memory.reason)
    return TagRead(reader, uid.uid, memory)


def _still_there(card: int) -> bool:
    result = scard.SCardStatus(card)
    return bool(result[0] == scard.SCARD_S_SUCCESS and result[2] & scard.SCARD_PRESENT)


class PadWatcher(ReaderWatcher):
    """:class:`ReaderWatcher`'s pcscd loop (restarts, backoff, hot-plug), reading book tags."""

    def __init__(
        self, options: PadOptions, name: str, report: Callable[[PadObservation], None]
    ) -> None:
        def readers(obs: Observation) -> None:
            # With _changed overridden the base class only reports the readers coming and going.
            if isinstance(obs, ReadersUp | ReadersDown):
                report(obs)

        super().__init__(PcscOptions(reader=options.reader, poll_ms=options.poll_ms), name, readers)
        self._pad = options
        self._report_tag = report

    def _changed(self, context: int, reader: str, old: int | None, new: int, atr: bytes) -> None:
        if new & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_UNAVAILABLE):
            return
        if not new & scard.SCARD_STATE_PRESENT:
            if new & scard.SCARD_STATE_EMPTY:
                self._on_reader.pop(reader, None)
            return
        if old is not None and old & scard.SCARD_STATE_PRESENT and old >> 16 == new >> 16:
            return
        result = read_tag(context, reader, self._pad)
        if isinstance(result, TagRead):
            self._on_reader[reader] = result.uid
            carried = self._carried.pop(reader, None) == result.uid
            if carried and time.monotonic() < self._carried_until:
                return  # the book lay there while pcscd restarted: not laid down again
        self._report_tag(result)


class BookPad:
    """The pad's slots as a driver part: decoded books (or problems) go to ``on_tag``."""

    QUEUE_MAX = 64

    def __init__(
        self,
        name: str,
        options: PadOptions,
        ctx: DriverContext,
        on_tag: Callable[[str, LibraryItemTag | TagProblem | TagUnread], Any],
    ) -> None:
        self.name = name
        self.options = options
        self.state = DriverState.STARTING
        self.last_error: str | None = None
        self._ctx = ctx
        self._on_tag = on_tag

    async def run(self) -> None:
        queue: DropOldestQueue[PadObservation] = DropOldestQueue(
            self.QUEUE_MAX, lambda: self._ctx.count("library.pad_dropped")
        )
        watcher = PadWatcher(self.options, self.name, queue.put_threadsafe)
        watcher.start()
        try:
            while True:
                match await queue.get():
                    case ReadersUp(readers):
                        if self.state != DriverState.OK:
                            log.info("%s: pad slots %s", self.name, ", ".join(readers))
                        self.state = DriverState.OK
                    case ReadersDown(reason):
                        if self.state != DriverState.DISCONNECTED:
                            self._ctx.count("library.pad_disconnected")
                            log.warning("%s: %s", self.name, reason)
                        self.state, self.last_error = DriverState.DISCONNECTED, reason
                    case TagRead(reader, _, memory):
                        await self._on_tag(reader, decode_basic_block(memory))
                    case TagUnread() as unread:
                        await self._on_tag(unread.reader, unread)
        finally:
            await asyncio.to_thread(watcher.stop)
            self.state = DriverState.STOPPED


# -- the terminal --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TerminalMessage:
    """A line for the terminal's screen: what happened, in words a student understands."""

    level: Literal["info", "error"]
    text: str


class LibraryOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    cards: list[dict[str, Any]] = msgspec.field(default_factory=list)
    scanner: ScannerOptions | None = None
    pad: PadOptions | None = None
    terminal: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    session_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    max_items: Annotated[int, Meta(ge=1, le=1000)] = 64


class LibraryTerminal(CompositeDriver):
    """Student-card readers, a barcode scanner and an RFID pad lending books as one terminal."""

    MESSAGES_KEPT = 32

    def __init__(self, name: str, options: LibraryOptions, ctx: DriverContext) -> None:
        self.name = name
        self.options = options
        self._ctx = ctx
        super().__init__()
        if not options.cards:
            raise DriverError(f"driver {name!r}: configure the student-card readers in `cards`")
        if options.scanner is None and options.pad is None:
            raise DriverError(f"driver {name!r}: configure a `scanner`, a `pad`, or both")
        try:
            compile_pattern(options.scanner.item_pattern if options.scanner else None)
        except ValueError as exc:
            raise DriverError(f"driver {name!r}: {exc}") from exc
        self.cards = CardSources(name, options.cards, ctx)
        self.sessions = LoanSessions(options.terminal or name, options.session_s, options.max_items)
        self.scanner = (
            BarcodeScanner(f"{name}-scanner", options.scanner, ctx, self._on_scan)
            if options.scanner
            else None
        )
        self.pad = BookPad(f"{name}-pad", options.pad, ctx, self._on_tag) if options.pad else None
        #: The latest lines shown on the terminal's screen, newest last.
        self.messages: deque[TerminalMessage] = deque(maxlen=self.MESSAGES_KEPT)
        #: Called with every line for the screen (a terminal UI hooks in here).
        self.terminal_message: Callable[[TerminalMessage], None] | None = None
        #: Inputs handled so far (taps, scans, tags; good or bad): a desk waits on this.
        self.handled = 0
        self._emit: Emit | None = None

    def _other_parts(self) -> list[DriverPart]:
        return [p for p in (self.scanner, self.pad) if p is not None]

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        self.state = DriverState.OK
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.cards.run(self._on_tap, emit), name=f"{self.name}:cards")
                if self.scanner is not None:
                    tg.create_task(self.scanner.run(emit), name=f"{self.name}:scanner")
                if self.pad is not None:
                    tg.create_task(self.pad.run(), name=f"{self.name}:pad")
        except ExceptionGroup as group:
            first = group.exceptions[0]
            self.state, self.last_error = DriverState.FAILED, str(first)
            raise first from group
        finally:
            self._emit = None
            if self.state != DriverState.FAILED:
                self.state = DriverState.STOPPED

    def _say(self, level: Literal["info", "error"], text: str, counter: str | None = None) -> None:
        message = TerminalMessage(level, text)
        self.messages.append(message)
        if counter is not None:
            self._ctx.count(f"library.{counter}")
        if level == "error":
            log.warning("%s: %s", self.name, text)
        if (hook := self.terminal_message) is not None:
            try:
                hook(message)
            except Exception:  # a broken screen must not stop lending
                log.exception("%s: terminal_message hook failed", self.name)

    async def _on_tap(self, reading: Reading, tap: CardTap, extra: Mapping[str, Any]) -> None:
        try:
            session = self.sessions.tap(tap.uid_hash, time.monotonic())
            self._ctx.count("library.taps")
            if session is None:
                self._say("info", "finished: goodbye")
            else:
                self._say("info", "welcome: lay or scan your books, tap again to finish")
        finally:
            self.handled += 1

    async def _on_scan(self, result: ItemCode | BadCode | ScanError) -> None:
        try:
            if isinstance(result, ItemCode):
                await self._book(result.item_id, "barcode")
            else:
                self._say("error", f"barcode not accepted: {result.reason}", f"scan_{result.kind}")
        finally:
            self.handled += 1

    async def _on_tag(self, slot: str, result: LibraryItemTag | TagProblem | TagUnread) -> None:
        try:
            if isinstance(result, LibraryItemTag):
                if result.usage != "circulating":
                    usage = result.usage.replace("_", " ")
                    text = f"{result.item_id} is {usage}: take it to the desk"
                    self._say("error", text, "tag_not_circulating")
                    return
                await self._book(result.item_id, "rfid")
            elif isinstance(result, TagProblem):
                self._say("error", f"book tag not accepted: {result.reason}", result.counter)
            else:
                self._say("error", result.reason, result.counter)
        finally:
            self.handled += 1

    async def _book(self, item_id: str, source: Source) -> None:
        outcome = self.sessions.book(item_id, source, time.monotonic())
        if outcome is None:
            self._ctx.count("library.repeat")
            return
        if isinstance(outcome, Refused):
            self._say("error", outcome.reason, outcome.counter)
            return
        if self._emit is None:
            raise DriverError(f"{self.name} is not running")
        if isinstance(outcome, LibraryLoan):
            await self._emit(Reading("library.loan", outcome))
            self._ctx.count("library.loans")
            self._say("info", f"borrowed {item_id}")
        else:
            await self._emit(Reading("library.return", outcome))
            self._ctx.count("library.returns")
            self._say("info", f"returned {item_id}")


def parse_options(name: str, options: Mapping[str, Any]) -> LibraryOptions:
    return convert_options(name, options, LibraryOptions)


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> LibraryTerminal:
    return LibraryTerminal(name, parse_options(name, options), ctx)


register_driver("library_terminal")(build)


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Check the configuration: readers, scanner pattern and pad layout."""
    try:
        opts = parse_options("probe", options)
        compile_pattern(opts.scanner.item_pattern if opts.scanner else None)
    except (DriverError, ValueError) as exc:
        return ProbeResult.fail(f"configuration problem: {exc}")
    parts = [f"{len(opts.cards)} card reader(s)"]
    if opts.scanner:
        parts.append(f"scanner on {opts.scanner.port} ({opts.scanner.suffix})")
    if opts.pad:
        parts.append(f"pad on readers matching {opts.pad.reader!r}")
    return ProbeResult.ok(", ".join(parts) + f"; sessions last {opts.session_s:g} s")
