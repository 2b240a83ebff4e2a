"""A smart board's OS-side activity → ``board.app`` (foreground app changes), ``board.touch``.

The driver reads a :class:`BoardActivitySource`; the one shipped, :class:`JsonFeedSource`, follows
the line-delimited JSON feed an on-board helper writes to a file or a FIFO.

Driver type ``board_os``. Options: ``path`` (the feed file or FIFO), ``from_start`` (false: a
file is first read from its end, so an agent restart does not resend old lines).

Feed format, UTF-8 JSON, one object per line (``ts`` optional, RFC 3339, when it happened)::

    {"type": "app", "app": "com.smart.notebook", "action": "foreground", "ts": "…+08:00"}
    {"type": "touch", "touches": 37, "window_s": 60, "ts": "…+08:00"}

``action`` is ``foreground`` (default), ``start`` or ``stop``. A foreground line naming the app
already in the foreground is one event, not two (``board_os.repeated``). Lines that are not such
objects, and lines over 4 KiB, are counted (``board_os.bad_line``, ``board_os.overlong``) and
skipped.

A FIFO is opened read-write, so the helper restarting is not an end of file. A file is followed
like ``tail -F``: a replacement (new inode) is read from its start, a truncated file from its new
start, and reopening the same file resumes where reading stopped, so no line is read twice. A
feed that disappears makes the driver DISCONNECTED until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import select
import stat
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from device_drivers.base import (
    DeviceLost,
    DriverContext,
    DriverError,
    DriverState,
    DriverStatus,
    Emit,
    ProbeResult,
    convert_options,
    register_driver,
)
from device_drivers.codecs.board_os import Activity, BadRecord, FeedCodec, TouchCount
from device_drivers.plumbing.link import Link
from device_drivers.plumbing.transport import READ_TIMEOUT_S, describe, open_in_thread
from schemas.events import BoardApp, BoardTouch
from schemas.reading import Reading

log = logging.getLogger(__name__)


class BoardActivitySource(ABC):
    """Where a board's OS-side activity comes from: app changes and touch counts per window."""

    #: What the source reads, for messages ("feed /run/board/activity").
    description: str

    @abstractmethod
    async def open(self) -> None:
        """Start reading; raise :class:`OSError` saying why the source is unavailable."""

    @abstractmethod
    async def next(self, within: float) -> list[Activity]:
        """What arrived within ``within`` s (maybe nothing); :class:`DeviceLost` if it went away."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop reading; safe to call when not open."""


class FeedFile:
    """A feed file or FIFO as a read-only transport; reads wait up to ``READ_TIMEOUT_S``."""

    def __init__(self, path: Path, *, resume: FeedFile | None = None, from_end: bool) -> None:
        self.path = path
        self.fd = -1
        self.ino = 0
        self.offset = 0
        self.fifo = False
        self._open(resume, from_end=from_end)

    def _open(self, resume: FeedFile | None, *, from_end: bool) -> None:
        st = os.stat(self.path)
        self.fifo = stat.S_ISFIFO(st.st_mode)
        if not (self.fifo or stat.S_ISREG(st.st_mode)):
            raise OSError(f"{self.path} is neither a file nor a FIFO")
        if sys.platform == "win32":
            # No FIFOs there; O_BINARY, or the C runtime translates CRLF and stops at Ctrl+Z.
            flags = os.O_RDONLY | os.O_BINARY
        else:
            # Read-write on a FIFO: we are a writer too, so the helper closing it is not EOF.
            flags = (os.O_RDWR | os.O_NONBLOCK if self.fifo else os.O_RDONLY) | os.O_CLOEXEC
        self.fd = os.open(self.path, flags)
        fst = os.fstat(self.fd)
        self.ino = fst.st_ino
        if self.fifo:
            return
        if resume is not None and resume.ino == self.ino:
            self.offset = resume.offset if resume.offset <= fst.st_size else 0
        else:
            self.offset = fst.st_size if from_end else 0
        os.lseek(self.fd, self.offset, os.SEEK_SET)

    def read(self, size: int = 1) -> bytes:
        if self.fifo:
            ready, _, _ = select.select([self.fd], [], [], READ_TIMEOUT_S)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    return os.read(self.fd, size)
        else:
            data = os.read(self.fd, size)
            if data:
                self.offset += len(data)
                return data
        self._check_path()
        if not self.fifo:
            time.sleep(READ_TIMEOUT_S)
        return b""

    def _check_path(self) -> None:
        """Follow a replaced or truncated feed; raise :class:`DeviceLost` if it was removed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DeviceLost(f"{self.path} was removed") from None
        if st.st_ino != self.ino:
            log.info("feed %s was replaced: reading the new one from its start", self.path)
            os.close(self.fd)
            self._open(None, from_end=False)
        elif not self.fifo and st.st_size < self.offset:
            log.info("feed %s was truncated: reading from its start", self.path)
            self.offset = 0
            os.lseek(self.fd, 0, os.SEEK_SET)

    def write(self, data: bytes) -> None:
        raise OSError("the activity feed is read-only")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class JsonFeedSource(BoardActivitySource):
    """Line-delimited JSON from a file or FIFO that an on-board helper writes."""

    def __init__(
        self, path: str | Path, *, from_start: bool = False, name: str = "board-os"
    ) -> None:
        self.path = Path(path)
        self.description = f"feed {self.path}"
        self.from_start = from_start
        self._name = name
        self._link: Link | None = None
        self._file: FeedFile | None = None
        self._codec = FeedCodec()
        self._looked = False

    async def open(self) -> None:
        # Only a feed that was already there when we first looked is read from its end: one
        # that appears later was started after us, and all of it is new.
        from_end = not (self.from_start or self._looked)
        self._looked = True
        last = self._file
        feed = await open_in_thread(partial(FeedFile, self.path, resume=last, from_end=from_end))
        if last is None or feed.ino != last.ino:
            self._codec = FeedCodec()
        self._file = feed
        self._link = Link(feed, self._name)

    async def next(self, within: float) -> list[Activity]:
        if self._link is None:
            raise DeviceLost("the feed is not open")
        chunk = await self._link.read(within)
        return self._codec.feed(chunk) if chunk else []

    async def aclose(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await link.aclose()


class BoardOsOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    path: Annotated[str, Meta(min_length=1)]
    from_start: bool = False


class BoardOsDriver(DriverStatus):
    """Board activity from any :class:`BoardActivitySource`, as events."""

    counters = "board_os"
    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 10.0
    WAIT_S = 1.0

    def __init__(self, name: str, source: BoardActivitySource, ctx: DriverContext) -> None:
        super().__init__(name, ctx)
        self.source = source
        self._foreground: str | None = None

    async def run(self, emit: Emit) -> None:
        backoff = self.BACKOFF_MIN_S
        try:
            while True:
                try:
                    await self.source.open()
                except OSError as exc:
                    self.down(f"cannot read the {self.source.description}: {describe(exc)}")
                else:
                    self.state = DriverState.OK
                    backoff = self.BACKOFF_MIN_S
                    try:
                        while True:
                            for item in await self.source.next(self.WAIT_S):
                                await self._handle(item, emit)
                    except DeviceLost as exc:
                        self.down(f"lost the {self.source.description} ({exc})")
                    finally:
                        await self.source.aclose()
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                backoff = min(backoff * 2, self.BACKOFF_MAX_S)
        finally:
            self.state = DriverState.STOPPED

    async def _handle(self, item: Activity, emit: Emit) -> None:
        if isinstance(item, BadRecord):
            self._ctx.count(f"board_os.{item.reason}")
            self.last_error = f"skipped a bad feed line ({item.detail or item.reason})"
            log.warning("%s: %s: %r", self.name, self.last_error, item.raw[:64])
        elif isinstance(item, TouchCount):
            data = BoardTouch(touches=item.touches, window_s=item.window_s)
            await emit(_reading("board.touch", data, item.ts))
        elif item.action == "foreground" and item.app == self._foreground:
            self._ctx.count("board_os.repeated")
        else:
            if item.action == "foreground":
                self._foreground = item.app
            elif item.action == "stop" and item.app == self._foreground:
                self._foreground = None
            await emit(_reading("board.app", BoardApp(app=item.app, action=item.action), item.ts))


def _reading(kind: str, data: msgspec.Struct, ts: datetime | None) -> Reading:
    return Reading(kind, data) if ts is None else Reading(kind, data, ts)


def parse_options(name: str, options: Mapping[str, Any]) -> BoardOsOptions:
    return convert_options(name, options, BoardOsOptions)


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> BoardOsDriver:
    opts = parse_options(name, options)
    return BoardOsDriver(
        name, JsonFeedSource(opts.path, from_start=opts.from_start, name=name), ctx
    )


register_driver("board_os")(build)


async def probe(options: Mapping[str, Any], listen_s: float = 2.0) -> ProbeResult:
    """Check the feed exists and what its recent lines (file) or next lines (FIFO) look like."""
    try:
        opts = parse_options("probe", options)
        st = await asyncio.to_thread(os.stat, opts.path)
    except DriverError as exc:
        return ProbeResult.fail(str(exc))
    except OSError as exc:
        return ProbeResult.fail(
            f"feed {options.get('path')} is not there ({exc}): is the board helper running?"
        )
    codec = FeedCodec()
    if stat.S_ISREG(st.st_mode):
        kind = f"a file of {st.st_size} bytes"
        tail = await asyncio.to_thread(_tail, Path(opts.path), 64 * 1024)
        items = codec.feed(tail.split(b"\n", 1)[-1] if len(tail) == 64 * 1024 else tail)
    elif stat.S_ISFIFO(st.st_mode):
        kind = "a FIFO"
        source = JsonFeedSource(opts.path, name="probe")
        items = []
        try:
            await source.open()
            deadline = time.monotonic() + listen_s
            while (left := deadline - time.monotonic()) > 0:
                items += await source.next(left)
        except (OSError, DeviceLost) as exc:
            return ProbeResult.fail(f"feed {opts.path} is a FIFO but reading it failed: {exc}")
        finally:
            await source.aclose()
    else:
        return ProbeResult.fail(f"feed {opts.path} is neither a file nor a FIFO")
    good = sum(not isinstance(i, BadRecord) for i in items)
    bad = len(items) - good
    verdict = f"feed {opts.path} is {kind}: {good} good and {bad} bad line(s) seen"
    # Bad lines mean the helper and this driver disagree on the format: worth a look.
    return ProbeResult.warn(verdict) if bad else ProbeResult.ok(verdict)


def _tail(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read()
