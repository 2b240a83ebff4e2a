"""Barcode scans: the serial line decoder and the EAN-13 / ISBN / library-pattern checks."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.codecs.barcode import (
    MAX_SCAN,
    BadCode,
    ItemCode,
    Scan,
    ScanDecoder,
    ScanError,
    classify,
)
from simulators.barcode_scanner import ean13, isbn10, wrong_check_digit

LOCAL = re.compile(r"T\d{7}")


@pytest.mark.parametrize(("suffix", "end"), [("cr", b"\r"), ("lf", b"\n"), ("crlf", b"\r\n")])
def test_lines_split_on_the_configured_suffix(suffix: str, end: bytes) -> None:
    decoder = ScanDecoder(suffix)  # type: ignore[arg-type]
    stream = b"9787020002207" + end + b"T0000123" + end + b"T00"
    out = [item for i in range(len(stream)) for item in decoder.feed(stream[i : i + 1])]
    assert out == [Scan("9787020002207"), Scan("T0000123")]
    assert decoder.feed(b"00456" + end) == [Scan("T0000456")]


def test_a_scanner_sending_crlf_when_set_to_cr_still_works() -> None:
    decoder = ScanDecoder("cr")
    assert decoder.feed(b"T0000001\r\nT0000002\r\n") == [Scan("T0000001"), Scan("T0000002")]


def test_noise_and_overlong_lines_are_errors_and_the_next_scan_is_fine() -> None:
    decoder = ScanDecoder("cr")
    out = decoder.feed(b"\x00\xffab\r" + b"9" * (MAX_SCAN * 3) + b"\rT0000001\r")
    assert [type(i) for i in out] == [ScanError, ScanError, Scan]
    assert [i.kind for i in out if isinstance(i, ScanError)] == ["unreadable", "overlong"]
    assert out[-1] == Scan("T0000001")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9787020002207", ItemCode("isbn13", "9787020002207")),
        ("6901234567892", ItemCode("ean13", "6901234567892")),
        ("080442957x", ItemCode("isbn10", "080442957X")),
        ("7300012345", ItemCode("isbn10", "7300012345")),
        ("T0000123", ItemCode("local", "T0000123")),
    ],
)
def test_good_codes(text: str, expected: ItemCode) -> None:
    assert classify(text, LOCAL) == expected


@pytest.mark.parametrize("text", ["9787020002208", "0804429570", "6901234567890"])
def test_wrong_check_digits_are_refused(text: str) -> None:
    result = classify(text, re.compile(r".*"))  # even a pattern that matches anything
    assert isinstance(result, BadCode)
    assert result.kind == "bad_check_digit"
    assert text.upper() in result.reason


def test_codes_outside_the_pattern_are_refused() -> None:
    result = classify("X123", LOCAL)
    assert isinstance(result, BadCode)
    assert result.kind == "unknown_code"
    assert isinstance(classify("T0000123", None), BadCode)


@given(st.from_regex(r"\d{12}", fullmatch=True))
def test_simulator_check_digits_agree(body: str) -> None:
    assert classify(ean13(body), None) == ItemCode(
        "isbn13" if body[:3] in ("978", "979") else "ean13", ean13(body)
    )
    assert isinstance(classify(wrong_check_digit(ean13(body)), None), BadCode)
    ten = isbn10(body[:9])
    assert classify(ten, None) == ItemCode("isbn10", ten)
    assert isinstance(classify(wrong_check_digit(ten), None), BadCode)


@given(st.binary(max_size=300), st.sampled_from(["cr", "lf", "crlf"]))
def test_arbitrary_bytes_never_raise(data: bytes, suffix: str) -> None:
    decoder = ScanDecoder(suffix)  # type: ignore[arg-type]
    for item in decoder.feed(data) + decoder.feed(data[::-1]):
        if isinstance(item, Scan):
            assert len(item.text) <= MAX_SCAN
            assert isinstance(classify(item.text, LOCAL), ItemCode | BadCode)
