"""The Wiegand converter parser, from bytes alone."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.base import DriverContext, DriverError, UidHasher, build_driver
from device_drivers.codecs.wiegand import Rejected, WiegandFrame, WiegandParser, check_parity
from simulators.wiegand import card_bytes, frame_line

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"


def frames(items: list[WiegandFrame | Rejected]) -> list[WiegandFrame]:
    return [i for i in items if isinstance(i, WiegandFrame)]


def reasons(items: list[WiegandFrame | Rejected]) -> list[str]:
    return [i.reason for i in items if isinstance(i, Rejected)]


@pytest.mark.parametrize(
    ("line", "bits", "payload"),
    [
        # worked by hand: parity bits around the payload, first half even, second half odd
        (b"W26:0000002", 26, 0x000001),  # halves 0x000 / 0x001: even bit 0, odd bit 0
        (b"W26:1FFFFFF", 26, 0xFFFFFF),  # 12 ones each: even bit 0, odd bit 1
        (b"W26:1FFFFFC", 26, 0xFFFFFE),  # low half 11 ones: odd bit 0
        (b"W26:2002001", 26, 0x001000),  # high half one 1: even bit 1; low half 0: odd bit 1
        (b" W26:2002001 ", 26, 0x001000),  # converters may pad with spaces
        (b"W34:1FFFFFFFF", 34, 0xFFFFFFFF),
        (b"W34:000000002", 34, 0x00000001),
        (b"W34:1ffffffff", 34, 0xFFFFFFFF),  # lower-case hex
    ],
)
def test_known_frames(line: bytes, bits: int, payload: int) -> None:
    (frame,) = frames(WiegandParser().feed(line + b"\r\n"))
    assert (frame.bits, frame.payload) == (bits, payload)


def test_w26_fields_and_uid() -> None:
    (frame,) = frames(WiegandParser().feed(frame_line(0x12ABCD)))
    assert frame.facility == 0x12
    assert frame.card == 0xABCD
    assert frame.uid == b"\x12\xab\xcd"
    assert frame.tech == "wiegand26"


def test_w34_fields_and_uid() -> None:
    (frame,) = frames(WiegandParser().feed(frame_line(0xDEADBEEF, 34)))
    assert frame.facility is None
    assert frame.card == 0xDEADBEEF
    assert frame.uid == b"\xde\xad\xbe\xef"
    assert frame.tech == "wiegand34"


@pytest.mark.parametrize("bits", [26, 34])
@pytest.mark.parametrize("flip", ["leading", "trailing", "payload"])
def test_bad_parity_rejected(bits: int, flip: str) -> None:
    line = frame_line(0x123456 if bits == 26 else 0x89ABCDEF, bits).strip()
    raw = int(line[4:], 16)
    raw ^= {"leading": 1 << (bits - 1), "trailing": 1, "payload": 1 << 5}[flip]
    digits = 7 if bits == 26 else 9
    bad = f"W{bits}:{raw:0{digits}X}\r\n".encode()
    assert reasons(WiegandParser().feed(bad)) == ["bad_parity"]
    assert check_parity(bits, raw) is None


@pytest.mark.parametrize(
    "line",
    [
        b"hello",
        b"W26:",
        b"W26:123",
        b"W26:4000000",
        b"W34:12345678",
        b"W27:0000002",
        b"W26:00000G2",
    ],
)
def test_garbage_rejected(line: bytes) -> None:
    assert reasons(WiegandParser().feed(line + b"\n")) == ["garbage"]


def test_valid_frames_around_bad_ones_still_read() -> None:
    stream = (
        frame_line(0x010203)
        + frame_line(0x010204, bad_parity=True)
        + b"\x00\xff noise\r\n"
        + frame_line(0xCAFEF00D, 34)
    )
    items = WiegandParser().feed(stream)
    assert [f.payload for f in frames(items)] == [0x010203, 0xCAFEF00D]
    assert reasons(items) == ["bad_parity", "garbage"]


def test_overlong_line_is_cut_and_the_next_frame_survives() -> None:
    items = WiegandParser().feed(b"A" * 200 + b"\r\n" + frame_line(0x000001))
    assert reasons(items) == ["overlong"]
    assert [f.payload for f in frames(items)] == [1]


@pytest.mark.parametrize("ending", [b"\r\n", b"\n", b"\r"])
def test_line_endings_and_byte_by_byte_feeding(ending: bytes) -> None:
    data = frame_line(0x0A0B0C).strip() + ending + frame_line(0x0D0E0F0A, 34).strip() + ending
    parser = WiegandParser()
    out: list[WiegandFrame | Rejected] = []
    for b in data:
        out += parser.feed(bytes([b]))
    assert [f.payload for f in frames(out)] == [0x0A0B0C, 0x0D0E0F0A]
    assert reasons(out) == []


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    for item in WiegandParser().feed(data):
        assert isinstance(item, WiegandFrame | Rejected)


@given(st.integers(0, (1 << 24) - 1))
def test_every_w26_payload_round_trips(payload: int) -> None:
    (frame,) = frames(WiegandParser().feed(frame_line(payload)))
    assert frame.uid == card_bytes(payload)


@given(st.integers(0, (1 << 32) - 1), st.binary(max_size=40))
def test_every_w34_payload_round_trips_after_noise(payload: int, noise: bytes) -> None:
    data = noise.replace(b"\n", b"").replace(b"\r", b"") + b"\n" + frame_line(payload, 34)
    got = frames(WiegandParser().feed(data))
    assert got[-1].uid == card_bytes(payload, 34)


def test_bad_options_are_a_driver_error() -> None:
    import device_drivers.wiegand  # noqa: F401 - registers the driver type

    ctx = DriverContext("cr-1", UidHasher(b"k" * 32))
    with pytest.raises(DriverError, match="port"):
        build_driver("wiegand", "door", {"baudrate": 9600}, ctx)
    with pytest.raises(DriverError, match="unknown field"):
        build_driver("wiegand", "door", {"port": "/dev/null", "debounce": 1}, ctx)


def test_example_config_builds() -> None:
    import device_drivers.wiegand  # noqa: F401 - registers the driver type

    config = tomllib.loads((EXAMPLES / "card_reader_wiegand.toml").read_text())
    ctx = DriverContext(config["device"]["id"], UidHasher(b"k" * 32))
    (table,) = config["drivers"]
    assert build_driver(table["type"], table["name"], table, ctx).name == "door-2"
