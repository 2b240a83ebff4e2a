"""EM4100 driver options: validation, and finding a USB adapter by its ids."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from serial.tools import list_ports

from device_drivers import em4100
from device_drivers.base import DriverContext, DriverError, UidHasher, build_driver

CTX = DriverContext("cr-0101", UidHasher(b"k" * 32))


def ports(*specs: tuple[str, int, int, str | None]) -> list[SimpleNamespace]:
    return [SimpleNamespace(device=d, vid=v, pid=p, serial_number=s) for d, v, p, s in specs]


@pytest.fixture
def adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    found = ports(
        ("/dev/ttyUSB0", 0x1A86, 0x7523, None),
        ("/dev/ttyUSB1", 0x0403, 0x6001, "A1"),
        ("/dev/ttyUSB2", 0x0403, 0x6001, "B2"),
    )
    monkeypatch.setattr(list_ports, "comports", lambda: found)


def test_registered_with_defaults() -> None:
    driver = build_driver("em4100", "door-1", {"type": "em4100", "port": "/dev/ttyUSB0"}, CTX)
    assert isinstance(driver, em4100.Em4100Reader)
    assert (driver.reader, driver.options.baudrate, driver.options.hold_ms) == (
        "door-1",
        9600,
        1000,
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"port": "/dev/x", "speed": 1},
        {"port": "/dev/x", "hold_ms": -1},
        {"port": "usb:zz:1"},
        {"port": "usb:0403"},
    ],
)
def test_bad_options_say_what(options: dict[str, object]) -> None:
    with pytest.raises(DriverError, match="driver 'r'"):
        em4100.build("r", options, CTX)


@pytest.mark.usefixtures("adapters")
@pytest.mark.parametrize(
    ("port", "device"),
    [
        ("/dev/serial/by-id/usb-x", "/dev/serial/by-id/usb-x"),
        ("usb:1a86:7523", "/dev/ttyUSB0"),
        ("usb:0403:6001:B2", "/dev/ttyUSB2"),
    ],
)
def test_usb_ids_resolve_to_the_tty(port: str, device: str) -> None:
    assert em4100.resolve_port(port) == device


@pytest.mark.usefixtures("adapters")
@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("usb:0403:6001", "2 devices match usb:0403:6001 .*add the serial"),
        ("usb:0403:6001:C3", "no USB serial device usb:0403:6001:C3 is plugged in"),
    ],
)
def test_usb_ids_missing_or_ambiguous(port: str, message: str) -> None:
    with pytest.raises(OSError, match=message):
        em4100.resolve_port(port)
