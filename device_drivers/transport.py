"""The byte-stream transport serial-style drivers talk through, and the reconnect loop around it.

:func:`open_transport` opens a port spec:

- a device path: ``/dev/ttyUSB0``, a udev ``/dev/serial/by-id/…`` name, a pty or a symlink to
  one (pyserial handles ptys; they ignore the baud rate);
- ``tcp://host:port``: a serial device server or the device's own control port, through
  pyserial's ``socket://`` handler (every write is flushed, or a frame may sit in the buffer);
- ``usb:VID:PID[:SERIAL]`` (hex ids): looked up in ``serial.tools.list_ports`` at every open, so
  an adapter re-enumerated as another ``ttyUSBn`` is found again;
- any other pyserial URL (``socket://``, ``rfc2217://``, ``loop://``), passed through.

Local ports are opened exclusively (a ``flock``): a second poller gets "in use", not a share of
the replies. A :class:`Link` reads a :class:`Transport` on a thread of its own and offers async
``write`` and ``read(within)``; :func:`exchange` is one request and its replies through a sans-I/O
decoder;
:class:`LinkedDriver` is the open → session → lost → back off → reopen loop drivers share.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Generic, Protocol, TypeVar

import serial
from serial.tools import list_ports

from device_drivers.base import DriverContext, DriverState, DriverStatus, Emit
from device_drivers.handoff import DropOldestQueue, pump

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a blocking read waits before returning ``b""``; also how fast a reader thread stops.
READ_TIMEOUT_S: Final = 0.1
WRITE_TIMEOUT_S: Final = 2.0


class Transport(Protocol):
    """A blocking byte stream: a pyserial port, a pty, a TCP socket or a test double."""

    def read(self, size: int = 1) -> bytes:
        """Up to ``size`` bytes; ``b""`` when nothing arrived within the read timeout."""
        ...

    def write(self, data: bytes) -> Any: ...

    def close(self) -> None: ...


class PortNotFound(OSError):
    """A port spec names no device that is present now."""


class LinkLost(Exception):
    """The device went away while the link was in use."""


@dataclass(frozen=True, slots=True)
class UsbId:
    vid: int
    pid: int
    serial_number: str | None = None

    @classmethod
    def parse(cls, spec: str) -> UsbId:
        """``usb:VID:PID[:SERIAL]`` with hex ids, e.g. ``usb:0403:6001:A10KZP3C``."""
        parts = spec.split(":", 3)
        if parts[0] != "usb" or len(parts) < 3 or (len(parts) == 4 and not parts[3]):
            raise ValueError(f"{spec!r} is not usb:VID:PID[:SERIAL]")
        try:
            vid, pid = int(parts[1], 16), int(parts[2], 16)
        except ValueError:
            raise ValueError(f"{spec!r}: VID and PID are hex numbers such as 0403:6001") from None
        if not (0 <= vid <= 0xFFFF and 0 <= pid <= 0xFFFF):
            raise ValueError(f"{spec!r}: VID and PID are 16-bit")
        return cls(vid, pid, parts[3] if len(parts) == 4 else None)

    def __str__(self) -> str:
        tail = f":{self.serial_number}" if self.serial_number else ""
        return f"usb:{self.vid:04x}:{self.pid:04x}{tail}"


def resolve_usb(usb: UsbId, ports: Iterable[Any] | None = None) -> str:
    """The device path of the one plugged-in USB serial adapter matching ``usb``."""
    found = sorted(
        (
            p
            for p in (list_ports.comports() if ports is None else ports)
            if p.vid == usb.vid
            and p.pid == usb.pid
            and usb.serial_number in (None, p.serial_number)
        ),
        key=lambda p: str(p.device),
    )
    if not found:
        raise PortNotFound(f"no USB serial adapter {usb} is plugged in")
    if len(found) > 1:
        serials = ", ".join(str(p.serial_number) for p in found)
        raise PortNotFound(f"{len(found)} adapters match {usb}: add :SERIAL (one of {serials})")
    return str(found[0].device)


def pyserial_url(spec: str) -> str:
    """The path or pyserial URL a port spec stands for right now."""
    if spec.startswith("tcp://"):
        return "socket://" + spec.removeprefix("tcp://")
    if spec.startswith("usb:"):
        return resolve_usb(UsbId.parse(spec))
    return spec


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


async def open_in_thread(opener: Callable[[], C]) -> C:
    """Run a blocking ``opener`` in a thread; if cancelled meanwhile, close what it opens."""
    task = asyncio.ensure_future(asyncio.to_thread(opener))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_close_result)
        raise


def _close_result(task: asyncio.Future[C]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


def describe(exc: BaseException) -> str:
    """An exception as plain words, without ``[Errno n]``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class SerialTransport:
    """A pyserial port (device, pty or URL) as a :class:`Transport` whose writes are flushed."""

    def __init__(self, port: serial.SerialBase) -> None:
        self.port = port

    def read(self, size: int = 1) -> bytes:
        # pyserial's read(n) waits for all n bytes or the whole timeout: wait for one byte only,
        # then take what is already there.
        data = bytearray(self.port.read(1))
        while data and len(data) < size and (waiting := self.port.in_waiting):
            data += self.port.read(min(waiting, size - len(data)))
        return bytes(data)

    def write(self, data: bytes) -> None:
        self.port.write(data)
        self.port.flush()

    def close(self) -> None:
        self.port.close()


_OPEN_ERRORS: Final = {
    errno.ENOENT: "no such device (unplugged, or a wrong name?)",
    errno.EACCES: "permission denied (add the agent's user to the dialout group)",
    errno.EBUSY: "the port is in use by another program",
    errno.EAGAIN: "the port is in use by another program",
    errno.ECONNREFUSED: "connection refused (is the device on and its control port enabled?)",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ETIMEDOUT: "connection timed out",
}


def open_transport(spec: str, *, baudrate: int = 9600) -> SerialTransport:
    """Open a port spec (blocking); :class:`OSError` or :class:`ValueError` says why not."""
    try:
        port = serial.serial_for_url(
            pyserial_url(spec),
            baudrate=baudrate,
            timeout=READ_TIMEOUT_S,
            write_timeout=WRITE_TIMEOUT_S,
            exclusive=True,  # a flock on local ports: two pollers on one device confuse both
        )
    except serial.SerialException as exc:
        # pyserial wraps the OS error in its own text; the socket handler keeps it only as context
        code = exc.errno or getattr(exc.__context__, "errno", None)
        if code in _OPEN_ERRORS:
            raise OSError(code, _OPEN_ERRORS[code]) from exc
        raise
    return SerialTransport(port)


class Link:
    """A transport read on its own thread; async, deadline-bounded reads and writes.

    Chunks wait in a bounded queue: when the event loop falls behind, the oldest is dropped and
    ``on_drop`` is called. Any read or write failure becomes :class:`LinkLost`.
    """

    QUEUE_CHUNKS = 64
    READ_SIZE = 512

    def __init__(
        self, transport: Transport, name: str, on_drop: Callable[[], None] = lambda: None
    ) -> None:
        self._transport = transport
        self._queue: DropOldestQueue[bytes | Exception] = DropOldestQueue(
            self.QUEUE_CHUNKS, on_drop
        )
        self._lost: LinkLost | None = None
        self._stop = threading.Event()
        # Held around every write and the close, so a write still running in a worker thread
        # after a cancellation never meets a closed port.
        self._io = threading.Lock()
        self._thread = threading.Thread(
            target=pump,
            args=(partial(transport.read, self.READ_SIZE), self._stop, self._queue),
            name=f"link-{name}",
            daemon=True,
        )
        self._thread.start()

    @classmethod
    async def open(
        cls, opener: Callable[[], Transport], name: str, on_drop: Callable[[], None] = lambda: None
    ) -> Link:
        return cls(await open_in_thread(opener), name, on_drop)

    async def write(self, data: bytes) -> None:
        if self._lost:
            raise self._lost
        try:
            await asyncio.to_thread(self._write, data)
        except Exception as exc:  # any write failure means the device is gone
            self._lost = LinkLost(str(exc) or type(exc).__name__)
            raise self._lost from exc

    async def read(self, within: float) -> bytes:
        """The next chunk, or ``b""`` if none arrived within ``within`` seconds."""
        if self._lost:
            raise self._lost
        # Not wait_for: on 3.11 it loses a cancellation that lands as the item arrives.
        try:
            async with asyncio.timeout(max(within, 0.0)):
                item = await self._queue.get()
        except TimeoutError:
            return b""
        if isinstance(item, Exception):
            self._lost = LinkLost(str(item) or type(item).__name__)
            raise self._lost from item
        return item

    async def aclose(self) -> None:
        """Stop the reader (it wakes within its read timeout) and close the transport."""
        self._stop.set()
        await asyncio.shield(asyncio.to_thread(self._shutdown))

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _write(self, data: bytes) -> None:
        with self._io:
            self._transport.write(data)

    def _shutdown(self) -> None:
        self._thread.join(5)
        with self._io, contextlib.suppress(Exception):
            self._transport.close()


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """What came back for one request."""

    items: list[T]
    #: Whether any byte at all arrived, decodable or not: silence is a different fact.
    heard: bool


async def exchange(
    link: Link,
    request: bytes,
    decode: Callable[[bytes], list[T]],
    done: Callable[[T], bool],
    within: float,
) -> Answer[T]:
    """Send ``request``, then decode replies until one is ``done`` or ``within`` seconds pass.

    Everything decoded in the meantime is returned, so unsolicited or late replies are not lost.
    """
    if request:
        await link.write(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    items: list[T] = []
    heard = False
    while (left := deadline - loop.time()) > 0:
        chunk = await link.read(left)
        if not chunk:
            continue
        heard = True
        new = decode(chunk)
        items += new
        if any(done(i) for i in new):
            break
    return Answer(items, heard)


class LinkedDriver(DriverStatus):
    """Base of request/response drivers: open a link, run a session, reopen after a loss.

    Subclasses implement :meth:`session`, call :meth:`up` once the device has answered and
    :meth:`down` with a plain-language reason when it stops doing so.
    """

    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 10.0
    counters = "link"

    def __init__(
        self, name: str, port: str, opener: Callable[[], Transport], ctx: DriverContext
    ) -> None:
        super().__init__(name, ctx)
        self.port = port
        self._opener = opener
        self._backoff = self.BACKOFF_MIN_S

    async def session(self, link: Link, emit: Emit) -> None:
        """Talk to the device until the link is lost (raise) or it should be reopened (return)."""
        raise NotImplementedError

    async def run(self, emit: Emit) -> None:
        self._backoff = self.BACKOFF_MIN_S
        try:
            while True:
                try:
                    link = await Link.open(self._opener, self.name, self._dropped)
                except (OSError, ValueError) as exc:
                    self.down(f"cannot open {self.port}: {describe(exc)}")
                else:
                    async with link:
                        try:
                            await self.session(link, emit)
                        except LinkLost as exc:
                            self.down(f"{self.port} went away ({exc})")
                await asyncio.sleep(self._backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                self._backoff = min(self._backoff * 2, self.BACKOFF_MAX_S)
        finally:
            self.state = DriverState.STOPPED

    def up(self) -> None:
        if self.state != DriverState.OK:
            log.info("%s: %s answering", self.name, self.port)
        self.state = DriverState.OK
        self._backoff = self.BACKOFF_MIN_S

    def malformed(self, reason: str, raw: bytes) -> None:
        """Count and log a reply that was skipped; ``reason`` is a snake_case word."""
        self.count("malformed")
        self.count(f"malformed.{reason}")
        self.last_error = f"skipped a malformed reply ({reason.replace('_', ' ')})"
        log.warning("%s: %s: %r", self.name, self.last_error, raw[:64])

    def _dropped(self) -> None:
        self.count("dropped")
