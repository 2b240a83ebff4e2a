"""Modbus RTU: CRC, request and response frames, exception responses, on a real pty.

Sources:
- [SER] Modbus Organization, "MODBUS over serial line specification and implementation guide
  V1.02" (2006): 2.5.1.2 the RTU frame (address, PDU, CRC low byte first), 6.2.2 and Appendix B
  CRC generation (polynomial 0xA001 reflected, init 0xFFFF) with its example: the frame
  ``02 07`` carries CRC bytes ``41 12``.
- [APP] Modbus Organization, "MODBUS Application Protocol Specification V1.1b3" (2012): 6.3
  Read Holding Registers (request ``03 start count``, response ``03 bytecount words``; its
  example reads registers 108-110: ``03 00 6B 00 03``), 7 MODBUS Exception Responses (function
  code + 0x80, exception code 02 ILLEGAL DATA ADDRESS).
- The RTU frames ``01 03 00 00 00 0A C5 CD`` (unit 1, 10 registers from 0),
  ``11 03 00 6B 00 03 76 87`` (unit 17, [APP] 6.3's request) and ``01 83 02 C0 F1`` (unit 1,
  exception 02) as printed in the Modbus RTU guides that accompany [SER].
"""

from __future__ import annotations

import asyncio
import os
import select
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from device_drivers.modbus_env import DeviceRefused, Endpoint, ModbusLink
from simulators.modbus_sensor import ModbusSensorSim

pytestmark = pytest.mark.integration

READ_10 = bytes.fromhex("01030000000AC5CD")
EXCEPTION_02 = bytes.fromhex("018302C0F1")


def crc16_modbus(frame: bytes) -> bytes:
    """[SER] Appendix B, bit by bit: init FFFF, shift right, XOR A001 on a carry; low byte first."""
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            carry = crc & 1
            crc >>= 1
            if carry:
                crc ^= 0xA001
    return crc.to_bytes(2, "little")


@pytest.mark.parametrize(
    ("body", "crc"),
    [("0207", "4112"), ("01030000000A", "C5CD"), ("1103006B0003", "7687"), ("018302", "C0F1")],
)
def test_crc_of_the_documents_frames(body: str, crc: str) -> None:
    """[SER] 6.2.2 / Appendix B and the published frames above."""
    assert crc16_modbus(bytes.fromhex(body)) == bytes.fromhex(crc)


def read_frame(fd: int, n: int, timeout_s: float = 5.0) -> bytes:
    """``n`` bytes from ``fd``, polled until a deadline."""
    out = b""
    deadline = time.monotonic() + timeout_s
    while len(out) < n and (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            out += os.read(fd, n - len(out))
    return out


@pytest.fixture
def line() -> Iterator[tuple[int, str]]:
    """A raw pty: the test holds the device end (master), the driver opens the slave's name."""
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


async def test_driver_sends_the_documents_request_and_reads_its_response(
    line: tuple[int, str],
) -> None:
    """[APP] 6.3 / [SER] 2.5.1.2: the driver's request is byte for byte the document's, and the
    reply built here (unit 1, 03, 20 bytes, CRC) gives the registers back."""
    master, path = line
    link = ModbusLink(Endpoint(port=path, unit=1, timeout_s=2.0, retries=0))
    try:
        task = asyncio.create_task(link.read("holding", 0, 10))
        request = await asyncio.to_thread(read_frame, master, len(READ_10))
        assert request == READ_10
        words = list(range(100, 110))
        body = b"\x01\x03\x14" + b"".join(w.to_bytes(2, "big") for w in words)
        os.write(master, body + crc16_modbus(body))
        assert await asyncio.wait_for(task, 5) == words
    finally:
        link.close()


async def test_driver_reads_the_documents_exception_response(line: tuple[int, str]) -> None:
    """[APP] 7: ``01 83 02 C0 F1`` is exception 02, illegal data address."""
    master, path = line
    link = ModbusLink(Endpoint(port=path, unit=1, timeout_s=2.0, retries=0))
    try:
        task = asyncio.create_task(link.read("holding", 0, 10))
        assert await asyncio.to_thread(read_frame, master, len(READ_10)) == READ_10
        os.write(master, EXCEPTION_02)
        with pytest.raises(DeviceRefused, match="illegal data address") as refused:
            await asyncio.wait_for(task, 5)
        assert refused.value.code == 2
    finally:
        link.close()


@pytest.fixture
def sensor(tmp_path: Path) -> Iterator[tuple[ModbusSensorSim, serial.Serial]]:
    with ModbusSensorSim() as sim:
        sim.start_rtu(tmp_path / "ttyMODBUS")
        port = serial.Serial(str(tmp_path / "ttyMODBUS"), 9600, timeout=0.2)
        try:
            yield sim, port
        finally:
            port.close()


def ask(port: serial.Serial, request: bytes, n: int) -> bytes:
    port.write(request)
    out = b""
    deadline = time.monotonic() + 5
    while len(out) < n and time.monotonic() < deadline:
        out += port.read(n - len(out))
    return out


def test_simulator_answers_the_documents_request(
    sensor: tuple[ModbusSensorSim, serial.Serial],
) -> None:
    """[APP] 6.3 / [SER]: the simulator's response frame, with a CRC computed here."""
    sim, port = sensor
    sim.set_raw("holding", 0, list(range(1, 11)))
    reply = ask(port, READ_10, 3 + 20 + 2)
    body = b"\x01\x03\x14" + b"".join(w.to_bytes(2, "big") for w in range(1, 11))
    assert reply == body + crc16_modbus(body)


def test_simulator_answers_the_documents_exception(
    sensor: tuple[ModbusSensorSim, serial.Serial],
) -> None:
    """[APP] 7: an illegal address is answered ``01 83 02 C0 F1``."""
    sim, port = sensor
    sim.illegal.add(5)
    assert ask(port, READ_10, len(EXCEPTION_02)) == EXCEPTION_02
