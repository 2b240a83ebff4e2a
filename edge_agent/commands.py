"""Commands from the server (``cmd``) → handled one at a time → acks (``cmd/ack``).

The publisher hands every ``cmd`` payload to :meth:`CommandHandler.receive`, which only queues
it (bounded; when full the command is rejected as busy). :meth:`CommandHandler.run` decodes and
executes queued commands in order; each outcome is a :class:`~schemas.state.CommandAck`,
remembered by command id in :class:`AckLog` (a table of its own in the outbox's SQLite file) so a
command delivered again, even after a restart, gets the same ack without running twice. Acks
wait in a bounded in-memory queue until the publisher's link sends them
(:meth:`CommandHandler.send_acks`), so an ack due while the link is down goes after reconnect.

Commands: ``ping``; ``flush_outbox`` (acks with the depth); ``show_notice`` {notice_id, title?,
body?, duration_s?} on every driver that can show one; ``restart_driver`` {name};
``start_recording`` / ``stop_recording`` {driver?} on one recorder or all of them;
``set_sample_rate`` {driver, interval_s} on a polling driver (:data:`SAMPLE_RATE_OPTIONS`),
which restarts it with the changed option until the agent restarts or a config sets the drivers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Final, Protocol, Self, TypeVar, runtime_checkable

import msgspec
from msgspec import Meta

from device_drivers.base import Driver, DriverError
from edge_agent.outbox import AsyncOutbox
from schemas.state import Command, CommandAck, ack_decoder, command_decoder

log = logging.getLogger(__name__)
T = TypeVar("T")
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS command_acks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    ack BLOB NOT NULL
);
"""

Handler = Callable[[Command], Awaitable[CommandAck]]
Publish = Callable[[bytes], Awaitable[object]]


@runtime_checkable
class NoticeScreen(Protocol):
    """A driver that can put a notice on a screen (e.g. ``signage``'s ClassSignage)."""

    name: str

    async def show_notice(
        self,
        notice_id: str,
        title: str | None,
        body: str | None,
        duration_s: float | None,
        cmd_id: str | None = None,
    ) -> None: ...


@runtime_checkable
class RecordingControl(Protocol):
    """A driver that can start and stop a recording (e.g. ``recorder``'s RecorderPoller)."""

    name: str

    async def set_recording(self, on: bool) -> str:
        """Start or stop recording; return the unit's record state afterwards."""
        ...


class DriverHost(Protocol):
    """What the commands need of the agent: its drivers and the means to restart them."""

    def drivers(self) -> Sequence[Driver]: ...

    def driver_type(self, name: str) -> str | None: ...

    async def restart_driver(self, name: str) -> None:
        """Raise KeyError (its message says what is there) for an unknown name."""
        ...

    async def set_driver_options(self, name: str, changes: Mapping[str, Any]) -> None:
        """Raise KeyError for an unknown name, ValueError for options the driver refuses."""
        ...


#: Driver type → the option changes that make it sample every ``interval_s`` seconds.
SAMPLE_RATE_OPTIONS: Final[dict[str, Callable[[float], dict[str, float]]]] = {
    "synthetic": lambda s: {"rate": 1.0 / s},
    "modbus_env": lambda s: {"poll_s": s},
    "recorder": lambda s: {"poll_s": s},
    "camera": lambda s: {"sample_fps": 1.0 / s},
}


class _Args(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class NoticeArgs(_Args, frozen=True):
    notice_id: str
    title: str | None = None
    body: str | None = None
    duration_s: float | None = None


class DriverArgs(_Args, frozen=True):
    name: Annotated[str, Meta(min_length=1)]


class RecordingArgs(_Args, frozen=True):
    driver: Annotated[str, Meta(min_length=1)] | None = None


class SampleRateArgs(_Args, frozen=True):
    driver: Annotated[str, Meta(min_length=1)]
    interval_s: Annotated[float, Meta(gt=0, le=86400)]


A = TypeVar("A", bound=_Args)


class _Rejected(Exception):
    """A command that cannot run as given; the message is the ack's detail."""


#: For handlers in other modules (e.g. :mod:`edge_agent.update`).
Rejected = _Rejected


class Deferred(Exception):
    """Raised by a handler whose ack comes later (after a restart): nothing is acked or logged."""


def _args(cmd: Command, kind: type[A]) -> A:
    try:
        return msgspec.convert(cmd.args, kind)
    except msgspec.ValidationError as exc:
        raise _Rejected(f"bad args: {exc}") from None


class AckLog:
    """The last :attr:`KEEP` acks by command id, in SQLite, on a thread of its own."""

    KEEP = 1000

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ack-log")
        self._db: sqlite3.Connection | None = None

    async def __aenter__(self) -> Self:
        try:
            self._db = await self._call(self._open)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.shield(self._call(db.close))
        self._pool.shutdown(wait=False)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA synchronous = FULL")
        db.executescript(_SCHEMA)
        return db

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the ack log is not open")
        return self._db

    async def get(self, cmd_id: str) -> CommandAck | None:
        def get() -> bytes | None:
            row = self._conn.execute("SELECT ack FROM command_acks WHERE id = ?", (cmd_id,))
            found = row.fetchone()
            return None if found is None else bytes(found[0])

        raw = await self._call(get)
        return None if raw is None else ack_decoder.decode(raw)

    async def put(self, ack: CommandAck) -> None:
        raw = msgspec.json.encode(ack)

        def put() -> None:
            db = self._conn
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO command_acks (id, ack) VALUES (?, ?)", (ack.id, raw)
                )
                db.execute(
                    "DELETE FROM command_acks WHERE seq <= (SELECT max(seq) FROM command_acks) - ?",
                    (self.KEEP,),
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        await self._call(put)


def _recover_id(payload: bytes) -> str | None:
    """The command id of a payload that did not decode as a command, if it has a usable one."""
    try:
        doc = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None
    cmd_id = doc.get("id") if isinstance(doc, dict) else None
    return cmd_id if isinstance(cmd_id, str) and 1 <= len(cmd_id) <= 128 else None


class CommandHandler:
    """Queue, execute and acknowledge commands; see the module docstring."""

    #: Commands received but not yet handled; beyond this they are rejected as busy.
    QUEUE_SIZE = 64
    #: Acks waiting for the link; beyond this the oldest is dropped (it stays in the ack log).
    PENDING_ACKS = 256
    #: The longest one command may run before it is acked as an error.
    COMMAND_TIMEOUT_S = 30.0

    def __init__(self, host: DriverHost, outbox: AsyncOutbox, acks: AckLog) -> None:
        self._host = host
        self._outbox = outbox
        self._log = acks
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue(self.QUEUE_SIZE)
        self._acks: deque[CommandAck] = deque()
        self._acks_ready = asyncio.Event()
        self.handlers: dict[str, Handler] = {
            "flush_outbox": self._flush_outbox,
            "ping": self._ping,
            "show_notice": self._show_notice,
            "restart_driver": self._restart_driver,
            "start_recording": self._start_recording,
            "stop_recording": self._stop_recording,
            "set_sample_rate": self._set_sample_rate,
        }
        #: Per-command limits instead of :attr:`COMMAND_TIMEOUT_S` (e.g. ``update_agent``).
        self.timeouts: dict[str, float] = {}

    @property
    def pending_acks(self) -> int:
        return len(self._acks)

    def receive(self, payload: bytes) -> None:
        """Queue a ``cmd`` payload; never blocks the receive path."""
        try:
            self._inbox.put_nowait(payload)
        except asyncio.QueueFull:
            cmd_id = _recover_id(payload)
            log.warning("command %s rejected: %d commands already waiting", cmd_id, self.QUEUE_SIZE)
            if cmd_id is not None:
                self._ack(CommandAck(id=cmd_id, status="rejected", detail="the agent is busy"))

    async def run(self) -> None:
        """Handle queued commands one at a time, until cancelled."""
        while True:
            payload = await self._inbox.get()
            try:
                ack = await self.handle(payload)
            except Exception:  # e.g. the ack log's disk failing: keep taking commands
                log.exception("handling a command failed")
                continue
            if ack is not None:
                self._ack(ack)

    async def handle(self, payload: bytes) -> CommandAck | None:
        """The ack for one ``cmd`` payload (None when it has no usable id)."""
        try:
            cmd = command_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            cmd_id = _recover_id(payload)
            log.warning("malformed command (id %s): %s", cmd_id, exc)
            if cmd_id is None:
                return None
            return CommandAck(id=cmd_id, status="rejected", detail=f"malformed command: {exc}")
        if (done := await self._log.get(cmd.id)) is not None:
            log.info(
                "command %s (%s) was already handled: acking %s again",
                cmd.id,
                cmd.name,
                done.status,
            )
            return done
        try:
            ack = await self._execute(cmd)
        except Deferred:
            log.info("command %s (%s): the ack follows later", cmd.id, cmd.name)
            return None
        await self._log.put(ack)
        log.info("command %s (%s): %s %s", cmd.id, cmd.name, ack.status, ack.detail or "")
        return ack

    async def _execute(self, cmd: Command) -> CommandAck:
        if cmd.expires_at is not None and cmd.expires_at <= datetime.now(UTC):
            return CommandAck(
                id=cmd.id, status="rejected", detail=f"expired at {cmd.expires_at.isoformat()}"
            )
        handler = self.handlers.get(cmd.name)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            detail = f"unknown command {cmd.name!r}; known: {known}"
            return CommandAck(id=cmd.id, status="rejected", detail=detail)
        limit = self.timeouts.get(cmd.name, self.COMMAND_TIMEOUT_S)
        try:
            async with asyncio.timeout(limit):
                return await handler(cmd)
        except _Rejected as exc:
            return CommandAck(id=cmd.id, status="rejected", detail=str(exc))
        except TimeoutError:
            detail = f"did not finish in {limit:g} s"
        except Deferred:
            raise
        except Exception as exc:  # a driver's bug must not stop the command loop
            log.exception("command %s (%s) failed", cmd.id, cmd.name)
            detail = f"{type(exc).__name__}: {exc}"
        return CommandAck(id=cmd.id, status="error", detail=detail)

    async def report(self, ack: CommandAck) -> None:
        """Record and send an ack that was deferred (see :class:`Deferred`)."""
        await self._log.put(ack)
        log.info("command %s: %s %s", ack.id, ack.status, ack.detail or "")
        self._ack(ack)

    def _ack(self, ack: CommandAck) -> None:
        if len(self._acks) >= self.PENDING_ACKS:
            dropped = self._acks.popleft()
            log.warning("too many acks waiting for the link: dropping the ack of %s", dropped.id)
        self._acks.append(ack)
        self._acks_ready.set()

    async def send_acks(self, publish: Publish) -> None:
        """Publish waiting acks in order while the link is up; an ack leaves only once sent."""
        while True:
            while self._acks:
                ack = self._acks[0]
                await publish(msgspec.json.encode(ack))
                if self._acks and self._acks[0] is ack:
                    self._acks.popleft()
            self._acks_ready.clear()
            await self._acks_ready.wait()

    # -- the commands ----------------------------------------------------------------------------

    async def _ping(self, cmd: Command) -> CommandAck:
        return CommandAck(id=cmd.id, status="ok")

    async def _flush_outbox(self, cmd: Command) -> CommandAck:
        return CommandAck(id=cmd.id, status="ok", detail={"depth": await self._outbox.depth()})

    async def _show_notice(self, cmd: Command) -> CommandAck:
        args = _args(cmd, NoticeArgs)
        screens = [
            d
            for d in self._host.drivers()
            if isinstance(d, NoticeScreen) and inspect.iscoroutinefunction(d.show_notice)
        ]
        if not screens:
            return CommandAck(
                id=cmd.id, status="rejected", detail="no driver on this device can show notices"
            )
        results = await asyncio.gather(
            *(
                s.show_notice(args.notice_id, args.title, args.body, args.duration_s, cmd.id)
                for s in screens
            ),
            return_exceptions=True,
        )
        errors: list[str] = []
        for screen, result in zip(screens, results, strict=True):
            if isinstance(result, BaseException):
                text = str(result) if isinstance(result, DriverError) else repr(result)
                errors.append(f"{screen.name}: {text}" if len(screens) > 1 else text)
        if errors:
            return CommandAck(id=cmd.id, status="error", detail="; ".join(errors))
        return CommandAck(id=cmd.id, status="ok", detail={"shown_by": [s.name for s in screens]})

    async def _restart_driver(self, cmd: Command) -> CommandAck:
        args = _args(cmd, DriverArgs)
        try:
            await self._host.restart_driver(args.name)
        except KeyError as exc:
            raise _Rejected(exc.args[0]) from None
        return CommandAck(id=cmd.id, status="ok", detail={"restarted": args.name})

    async def _start_recording(self, cmd: Command) -> CommandAck:
        return await self._recording(cmd, on=True)

    async def _stop_recording(self, cmd: Command) -> CommandAck:
        return await self._recording(cmd, on=False)

    async def _recording(self, cmd: Command, *, on: bool) -> CommandAck:
        args = _args(cmd, RecordingArgs)
        units = [
            d
            for d in self._host.drivers()
            if isinstance(d, RecordingControl) and inspect.iscoroutinefunction(d.set_recording)
        ]
        if args.driver is not None:
            names = ", ".join(u.name for u in units) or "none"
            units = [u for u in units if u.name == args.driver]
            if not units:
                raise _Rejected(f"no recorder named {args.driver!r} (recorders here: {names})")
        if not units:
            raise _Rejected("no driver on this device can record")
        results = await asyncio.gather(
            *(u.set_recording(on) for u in units), return_exceptions=True
        )
        states: dict[str, str] = {}
        errors: list[str] = []
        for unit, result in zip(units, results, strict=True):
            if isinstance(result, BaseException):
                text = str(result) if isinstance(result, DriverError) else repr(result)
                errors.append(f"{unit.name}: {text}")
            else:
                states[unit.name] = result
        if errors:
            return CommandAck(id=cmd.id, status="error", detail="; ".join(errors))
        return CommandAck(id=cmd.id, status="ok", detail={"state": states})

    async def _set_sample_rate(self, cmd: Command) -> CommandAck:
        args = _args(cmd, SampleRateArgs)
        kind = self._host.driver_type(args.driver)
        if kind is None:
            known = ", ".join(d.name for d in self._host.drivers()) or "none"
            raise _Rejected(f"no driver named {args.driver!r} (drivers here: {known})")
        change = SAMPLE_RATE_OPTIONS.get(kind)
        if change is None:
            polling = ", ".join(sorted(SAMPLE_RATE_OPTIONS))
            raise _Rejected(
                f"driver {args.driver!r} is a {kind} driver, which has no sample rate "
                f"(drivers that poll: {polling})"
            )
        options = change(args.interval_s)
        try:
            await self._host.set_driver_options(args.driver, options)
        except (KeyError, ValueError) as exc:
            raise _Rejected(str(exc.args[0])) from None
        return CommandAck(id=cmd.id, status="ok", detail={"driver": args.driver, **options})
