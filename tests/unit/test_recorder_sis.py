"""The recorder's SIS reply codec, with bytes alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.base import DriverError
from device_drivers.codecs.recorder import (
    INFO_QUERY,
    STATUS_QUERY,
    TERSE,
    DeviceError,
    InfoReply,
    Rejected,
    SisCodec,
    StatusReply,
    VerboseAck,
)
from device_drivers.recorder import parse_options

BANNER = (
    b"(c) Copyright 2024, Extron Electronics SMP 351, V3.02, 60-1324-01\r\n"
    b"Tue, 05 Nov 2024 09:00:00\r\n"
)


def test_commands_on_the_wire() -> None:
    assert STATUS_QUERY == b"\x1bYRCDR\r"
    assert INFO_QUERY == b"I"
    assert TERSE == b"\x1b0CV\r"


def test_replies() -> None:
    stream = (
        BANNER
        + b"Vrb0\r\n0\r\n1\r\n2\r\nRcdrY1\r\nE10\r\n"
        + b"ChA1*ChB3*1*internal*41943040*00:12:34*99:59:59\r\n"
        + b"ChA4*ChB2*0*usbrear/VOLUME1*0*00:00:00*00:00:00\r\n"
    )
    expected = [
        VerboseAck(0),
        StatusReply("stop"),
        StatusReply("record"),
        StatusReply("pause"),
        StatusReply("record"),
        DeviceError("E10"),
        InfoReply("record", "internal", 41943040),
        InfoReply("stop", "usbrear/VOLUME1", 0),
    ]
    assert SisCodec().feed(stream) == expected
    codec = SisCodec()
    assert [i for n in range(len(stream)) for i in codec.feed(stream[n : n + 1])] == expected


def test_device_error_meaning() -> None:
    assert DeviceError("E13").meaning == "invalid parameter"
    assert DeviceError("E99").meaning == "error"


def test_garbage_and_overlong() -> None:
    items = SisCodec().feed(
        b"#Rc?\x01dr*?\r\n3\r\nChA1*ChB3*7*internal*1*00:00:00*00:00:00\r\n"
        + b"Z" * 300
        + b"\r\n1\r\n"
    )
    assert [i.reason if isinstance(i, Rejected) else i for i in items] == [
        "garbage",
        "garbage",
        "garbage",
        "overlong",
        StatusReply("record"),
    ]


@given(st.binary(max_size=400))
def test_never_raises(data: bytes) -> None:
    codec = SisCodec()
    codec.feed(data)
    assert codec.feed(b"\r\n2\r\n")[-1] == StatusReply("pause")


def test_options() -> None:
    opts = parse_options("r", {"type": "recorder", "port": "tcp://10.1.2.3:23"})
    assert (opts.baudrate, opts.poll_s, opts.report_s) == (9600, 5.0, 60.0)
    with pytest.raises(DriverError, match="poll_s"):
        parse_options("r", {"port": "x", "poll_s": 0})
