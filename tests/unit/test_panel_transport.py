"""The shared transport: port specs, the threaded Link, exchange() and the reconnect loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from device_drivers.base import DeviceLost, DriverContext, DriverState, UidHasher
from device_drivers.plumbing.link import Link, LinkedDriver, exchange
from device_drivers.plumbing.transport import (
    PortNotFound,
    UsbId,
    open_in_thread,
    open_transport,
    pyserial_url,
    resolve_usb,
)
from schemas.reading import Reading


@dataclass
class FakePort:
    device: str
    vid: int | None
    pid: int | None
    serial_number: str | None


PORTS = [
    FakePort("/dev/ttyUSB1", 0x0403, 0x6001, "B2"),
    FakePort("/dev/ttyUSB0", 0x0403, 0x6001, "A1"),
    FakePort("/dev/ttyACM0", 0x2341, 0x0043, None),
    FakePort("/dev/ttyS0", None, None, None),
]


def test_usb_spec_parsing() -> None:
    assert UsbId.parse("usb:0403:6001") == UsbId(0x0403, 0x6001)
    assert UsbId.parse("usb:0403:6001:A1:x") == UsbId(0x0403, 0x6001, "A1:x")
    assert str(UsbId.parse("usb:403:6001:A1")) == "usb:0403:6001:A1"
    for bad in ("usb:0403", "usb:zz:6001", "usb:0403:6001:", "usb:10000:1", "ttl:1:2"):
        with pytest.raises(ValueError, match=r"usb|VID"):
            UsbId.parse(bad)


def test_usb_resolution() -> None:
    assert resolve_usb(UsbId(0x2341, 0x0043), PORTS) == "/dev/ttyACM0"
    assert resolve_usb(UsbId(0x0403, 0x6001, "B2"), PORTS) == "/dev/ttyUSB1"
    with pytest.raises(PortNotFound, match=r"add :SERIAL \(one of A1, B2"):
        resolve_usb(UsbId(0x0403, 0x6001), PORTS)
    with pytest.raises(PortNotFound, match="no USB serial adapter usb:0403:6001:C3"):
        resolve_usb(UsbId(0x0403, 0x6001, "C3"), PORTS)


def test_port_specs_map_to_pyserial() -> None:
    assert pyserial_url("tcp://10.0.0.5:4001") == "socket://10.0.0.5:4001"
    assert pyserial_url("/dev/serial/by-id/usb-FTDI-if00") == "/dev/serial/by-id/usb-FTDI-if00"
    assert pyserial_url("rfc2217://h:1") == "rfc2217://h:1"


def test_open_errors_are_plain_words() -> None:
    with pytest.raises(OSError, match="no such device") as exc:
        open_transport("/nonexistent/ttyX")
    assert exc.value.strerror == "no such device (unplugged, or a wrong name?)"


def test_a_port_is_opened_exclusively() -> None:
    master, slave = os.openpty()
    try:
        first = open_transport(os.ttyname(slave))
        with pytest.raises(OSError, match="in use by another program"):
            open_transport(os.ttyname(slave))
        first.close()
        open_transport(os.ttyname(slave)).close()
    finally:
        os.close(master)
        os.close(slave)


async def test_loop_url_round_trip() -> None:
    async with await Link.open(lambda: open_transport("loop://"), "loop") as link:
        answer = await exchange(link, b"ping\n", lambda b: [b], lambda b: b"\n" in b, 2.0)
        assert b"".join(answer.items) == b"ping\n"
        assert answer.heard


class FakeTransport:
    """Replies from a script; raises once ``fail`` is set."""

    def __init__(self, replies: dict[bytes, bytes] | None = None) -> None:
        self.replies = replies or {}
        self.pending = bytearray()
        self.fail: Exception | None = None
        self.closed = False
        self.lock = threading.Lock()

    def read(self, size: int = 1) -> bytes:
        with self.lock:
            if self.fail:
                raise self.fail
            data = bytes(self.pending[:size])
            del self.pending[:size]
        if not data:
            time.sleep(0.01)
        return data

    def write(self, data: bytes) -> None:
        if self.fail:
            raise self.fail
        with self.lock:
            self.pending += self.replies.get(data, b"")

    def close(self) -> None:
        self.closed = True


async def test_link_read_timeout_then_data_then_loss() -> None:
    fake = FakeTransport({b"q": b"answer"})
    link = Link(fake, "fake")
    assert await link.read(0.05) == b""
    await link.write(b"q")
    assert await link.read(1.0) == b"answer"
    fake.fail = OSError("gone")
    with pytest.raises(DeviceLost, match="gone"):
        await link.read(1.0)
    with pytest.raises(DeviceLost):
        await link.write(b"q")
    await link.aclose()
    assert fake.closed
    assert not [t for t in threading.enumerate() if t.name == "link-fake"]


async def test_link_drops_oldest_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Link, "QUEUE_CHUNKS", 2)
    dropped: list[int] = []
    fake = FakeTransport()
    link = Link(fake, "full", lambda: dropped.append(1))
    for chunk in (b"a", b"b", b"c"):
        link._queue.put_threadsafe(chunk)  # as the reader thread does
    assert [await link.read(0.1), await link.read(0.1)] == [b"b", b"c"]
    assert dropped == [1]
    await link.aclose()


async def test_exchange_stops_at_the_wanted_reply_and_keeps_the_rest() -> None:
    fake = FakeTransport({b"q": b"x,late,want,after"})
    async with Link(fake, "ex") as link:
        answer = await exchange(
            link, b"q", lambda b: b.decode().split(","), lambda s: s == "want", 1.0
        )
        assert answer.items[:3] == ["x", "late", "want"]
        silent = await exchange(link, b"nothing", lambda b: [b], lambda _: True, 0.05)
        assert silent.items == []
        assert not silent.heard


async def test_open_in_thread_closes_what_a_cancelled_open_opened() -> None:
    fake = FakeTransport()
    started = threading.Event()

    def slow_open() -> FakeTransport:
        started.set()
        time.sleep(0.2)
        return fake

    task = asyncio.create_task(open_in_thread(slow_open))
    await asyncio.to_thread(started.wait, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # the open finishes ~0.2 s later, then its result is closed
        if fake.closed:
            break
        await asyncio.sleep(0.02)
    assert fake.closed


class EchoDriver(LinkedDriver):
    """Asks "q" forever; any reply is OK, a silent link is reopened."""

    counters = "echo"
    BACKOFF_MIN_S = 0.01
    BACKOFF_MAX_S = 0.02

    async def session(self, link: Link, emit: Any) -> None:
        while True:
            answer = await exchange(link, b"q", lambda b: [b], lambda _: True, 0.2)
            if not answer.heard:
                self.down("silent")
                return
            self.up()


async def test_linked_driver_reconnects_after_loss_and_open_failure() -> None:
    fakes = [FakeTransport({b"q": b"a"}), FakeTransport({b"q": b"b"})]
    opens: list[int] = []

    def opener() -> FakeTransport:
        opens.append(1)
        if len(opens) == 2:
            raise FileNotFoundError(2, "no such device")
        return fakes[0] if len(opens) == 1 else fakes[1]

    ctx = DriverContext("d", UidHasher(b"k" * 16))
    driver = EchoDriver("e", "/dev/fake", opener, ctx)

    async def emit(_: Reading) -> None:
        return None

    task = asyncio.create_task(driver.run(emit))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5

    async def until(pred: Any) -> None:
        while not pred():
            assert loop.time() < deadline
            await asyncio.sleep(0.01)

    await until(lambda: driver.state == DriverState.OK)
    fakes[0].fail = OSError("unplugged")
    await until(lambda: len(opens) >= 3 and driver.state == DriverState.OK)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert driver.state == DriverState.STOPPED
    assert ctx.counters["echo.disconnected"] == 1
    assert fakes[0].closed
    assert fakes[1].closed
    assert driver.last_error is not None
    assert "no such device" in driver.last_error
