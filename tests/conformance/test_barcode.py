"""EAN-13 / ISBN-13 / ISBN-10 check digits.

Sources:
- [ISBN] International ISBN Agency, "ISBN Users' Manual" (7th international edition), 5.
  "Check digit": ISBN-13 978-0-306-40615-7 (weights 1 and 3, modulus 10); and its ISBN-10
  form 0-306-40615-2 (weights 10..2, modulus 11, 10 written X).
- [GS1] GS1 General Specifications, 7.9 "Check digit calculation" (the modulo 10 algorithm
  for GTIN-13) with its worked example GTIN-13 629104150021 -> check digit 3.
"""

from __future__ import annotations

import pytest

from device_drivers.codecs.barcode import (
    BadCode,
    ItemCode,
    classify,
    ean13_check_digit,
    isbn10_check_digit,
)
from simulators.barcode_scanner import ean13, isbn10


def test_isbn13_users_manual_example() -> None:
    """[ISBN] 978-0-306-40615-7: check digit 7 (driver and simulator)."""
    assert ean13_check_digit("978030640615") == 7
    assert ean13("978030640615") == "9780306406157"
    assert classify("9780306406157", None) == ItemCode("isbn13", "9780306406157")


def test_isbn10_users_manual_example() -> None:
    """[ISBN] 0-306-40615-2: check digit 2 (driver and simulator)."""
    assert isbn10_check_digit("030640615") == "2"
    assert isbn10("030640615") == "0306406152"
    assert classify("0306406152", None) == ItemCode("isbn10", "0306406152")


def test_isbn10_check_x() -> None:
    """[ISBN] a remainder of 10 is written X: 0-8044-2957-X (both sides)."""
    assert isbn10_check_digit("080442957") == "X"
    assert isbn10("080442957") == "080442957X"
    assert classify("080442957x", None) == ItemCode("isbn10", "080442957X")


def test_gs1_gtin13_example() -> None:
    """[GS1] 7.9: 629104150021 -> 3, an EAN-13 that is not an ISBN."""
    assert ean13_check_digit("629104150021") == 3
    assert ean13("629104150021") == "6291041500213"
    assert classify("6291041500213", None) == ItemCode("ean13", "6291041500213")


@pytest.mark.parametrize("code", ["9780306406158", "0306406153", "6291041500214"])
def test_published_codes_with_another_check_digit_are_refused(code: str) -> None:
    """[ISBN]/[GS1] the same codes with the last digit changed."""
    result = classify(code, None)
    assert isinstance(result, BadCode)
    assert result.kind == "bad_check_digit"
