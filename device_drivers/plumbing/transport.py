"""The one byte-stream transport every serial-style driver talks through, and how ports are found.

:func:`open_transport` opens a port spec:

- a device path: ``/dev/ttyUSB0``, a udev ``/dev/serial/by-id/…`` name, a pty or a symlink to
  one (pyserial handles ptys; they ignore the baud rate);
- ``tcp://host:port``: a serial device server or the device's own control port, through
  pyserial's ``socket://`` handler (every write is flushed, or a frame may sit in the buffer);
- ``usb:VID:PID[:SERIAL]`` (hex ids): looked up in ``serial.tools.list_ports`` at every open, so
  an adapter re-enumerated as another ``ttyUSBn`` is found again;
- any other pyserial URL (``socket://``, ``rfc2217://``, ``loop://``), passed through.

Local ports are opened exclusively (a ``flock``): a second poller gets "in use", not a share of
the replies. :mod:`device_drivers.plumbing.link` reads a transport from the event loop and
reopens it when the device goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import serial
from serial.tools import list_ports

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


def usb_ports(usb: UsbId, ports: Iterable[Any] | None = None) -> list[Any]:
    """The plugged-in USB serial adapters matching ``usb`` (pyserial port infos), by path."""
    return sorted(
        (
            p
            for p in (list_ports.comports() if ports is None else ports)
            if p.vid == usb.vid
            and p.pid == usb.pid
            and usb.serial_number in (None, p.serial_number)
        ),
        key=lambda p: str(p.device),
    )


def resolve_usb(usb: UsbId, ports: Iterable[Any] | None = None) -> str:
    """The device path of the one plugged-in USB serial adapter matching ``usb``."""
    found = usb_ports(usb, ports)
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


async def listen(transport: Transport, within: float) -> bytes:
    """Everything ``transport`` sends in ``within`` seconds (a probe's brief listen); the
    transport is closed afterwards."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            chunks.append(await asyncio.to_thread(transport.read, 256))
    finally:
        with contextlib.suppress(Exception):
            transport.close()
    return b"".join(chunks)
