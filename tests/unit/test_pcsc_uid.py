"""GET DATA UID status words and the pcsc driver's options, without a reader."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.base import DriverContext, DriverError, UidHasher, build_driver
from device_drivers.codecs.pcsc import (
    UidFailure,
    UidRead,
    WrongLength,
    get_uid_command,
    parse_uid_response,
    read_uid,
)
from device_drivers.pcsc import PcscCardReader

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"
UID7 = bytes.fromhex("04A1B2C3D4E5F6")


def scripted(*answers: bytes) -> tuple[Callable[[bytes], bytes], list[bytes]]:
    sent: list[bytes] = []
    replies = list(answers)

    def transmit(apdu: bytes) -> bytes:
        sent.append(apdu)
        return replies.pop(0)

    return transmit, sent


def test_command_bytes() -> None:
    assert get_uid_command() == bytes.fromhex("FF CA 00 00 00")
    assert get_uid_command(7) == bytes.fromhex("FF CA 00 00 07")


def test_success() -> None:
    assert parse_uid_response(UID7 + b"\x90\x00") == UidRead(UID7)


def test_wrong_length_asks_again() -> None:
    assert parse_uid_response(b"\x6c\x07") == WrongLength(7)


@pytest.mark.parametrize(
    ("resp", "kind", "words"),
    [
        (b"\x63\x00", "failed", "63 00: operation failed"),
        (b"\x6a\x81", "failed", "6A 81: function not supported"),
        (b"\x6a\x82", "error", "unexpected status 6A 82"),
        (UID7 + b"\x62\x82", "error", "unexpected status 62 82"),
        (b"\x6c\x00", "error", "unexpected status 6C 00"),
        (b"\x90\x00", "error", "a UID of 0 bytes"),
        (bytes(21) + b"\x90\x00", "error", "a UID of 21 bytes"),
        (b"\x90", "error", "too short"),
        (b"", "error", "too short"),
    ],
)
def test_failures(resp: bytes, kind: str, words: str) -> None:
    result = parse_uid_response(resp)
    assert isinstance(result, UidFailure)
    assert result.kind == kind
    assert words in result.reason


def test_read_uid_plain() -> None:
    transmit, sent = scripted(UID7 + b"\x90\x00")
    assert read_uid(transmit) == UidRead(UID7)
    assert sent == [bytes.fromhex("FFCA000000")]


def test_read_uid_reissues_with_le_from_6c() -> None:
    transmit, sent = scripted(b"\x6c\x07", UID7 + b"\x90\x00")
    assert read_uid(transmit) == UidRead(UID7, retried=True)
    assert sent == [bytes.fromhex("FFCA000000"), bytes.fromhex("FFCA000007")]


def test_read_uid_retries_only_once() -> None:
    transmit, sent = scripted(b"\x6c\x07", b"\x6c\x04")
    result = read_uid(transmit)
    assert isinstance(result, UidFailure)
    assert result.kind == "error"
    assert len(sent) == 2


def test_read_uid_failure_after_retry() -> None:
    transmit, _ = scripted(b"\x6c\x07", b"\x63\x00")
    result = read_uid(transmit)
    assert isinstance(result, UidFailure)
    assert result.kind == "failed"


@given(st.binary(max_size=40))
def test_any_response_is_interpreted(resp: bytes) -> None:
    assert isinstance(parse_uid_response(resp), UidRead | WrongLength | UidFailure)


def ctx() -> DriverContext:
    return DriverContext("cr-0101", UidHasher(b"k" * 32))


def test_options_defaults_and_label() -> None:
    driver = build_driver("pcsc", "door-1", {}, ctx())
    assert isinstance(driver, PcscCardReader)
    assert (driver.options.reader, driver.options.poll_ms, driver.label) == ("", 500, "door-1")
    labelled = build_driver("pcsc", "door-1", {"reader_name": "room-204"}, ctx())
    assert isinstance(labelled, PcscCardReader)
    assert labelled.label == "room-204"


@pytest.mark.parametrize(
    "options", [{"poll_ms": 0}, {"reader": 3}, {"port": "/dev/ttyUSB0"}, {"reader_name": ""}]
)
def test_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(DriverError, match="door-1"):
        build_driver("pcsc", "door-1", options, ctx())


def test_example_config_builds() -> None:
    config = tomllib.loads((EXAMPLES / "card_reader_pcsc.toml").read_text())
    (table,) = config["drivers"]
    driver = build_driver(table["type"], table["name"], table, ctx())
    assert isinstance(driver, PcscCardReader)
    assert driver.label == "room-204-door"
