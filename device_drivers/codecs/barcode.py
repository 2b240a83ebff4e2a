"""Barcode scans as a serial-mode scanner sends them, and what a scan names (ISBN-13/EAN-13,
ISBN-10, a local pattern): sans-I/O, for ``device_drivers.barcode``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

Suffix = Literal["cr", "lf", "crlf"]
SUFFIXES: Final[dict[str, bytes]] = {"cr": b"\r", "lf": b"\n", "crlf": b"\r\n"}
#: Longer than any 1D symbol a library uses; a longer "line" is noise or a stuck trigger.
MAX_SCAN: Final = 64
_EAN13: Final = re.compile(r"\d{13}")
_ISBN10: Final = re.compile(r"\d{9}[\dXx]")


@dataclass(frozen=True, slots=True)
class Scan:
    text: str


@dataclass(frozen=True, slots=True)
class ScanError:
    kind: Literal["overlong", "unreadable"]
    reason: str


class ScanDecoder:
    """Sans-I/O: serial bytes in, one :class:`Scan` or :class:`ScanError` per terminated line."""

    def __init__(self, suffix: Suffix = "cr") -> None:
        self._end = SUFFIXES[suffix]
        self._buf = bytearray()
        self._overlong = False

    def feed(self, data: bytes) -> list[Scan | ScanError]:
        self._buf += data
        out: list[Scan | ScanError] = []
        while (end := self._buf.find(self._end)) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[: end + len(self._end)]
            if self._overlong:
                self._overlong = False
                continue  # the tail of a line already reported
            if (item := self._line(line)) is not None:
                out.append(item)
        if len(self._buf) > MAX_SCAN + len(self._end):
            self._buf.clear()
            if not self._overlong:
                self._overlong = True
                out.append(ScanError("overlong", f"a scan longer than {MAX_SCAN} characters"))
        return out

    @staticmethod
    def _line(line: bytes) -> Scan | ScanError | None:
        # A scanner set to CR that also sends LF (or the reverse) leaves the other byte around.
        line = line.strip(b"\r\n")
        if not line:
            return None
        if len(line) > MAX_SCAN:
            return ScanError("overlong", f"a scan longer than {MAX_SCAN} characters")
        if any(not 0x20 <= b < 0x7F for b in line):
            return ScanError("unreadable", "the scan holds characters no barcode has")
        return Scan(line.decode("ascii").strip())


CodeKind = Literal["isbn13", "ean13", "isbn10", "local"]


@dataclass(frozen=True, slots=True)
class ItemCode:
    kind: CodeKind
    item_id: str


@dataclass(frozen=True, slots=True)
class BadCode:
    kind: Literal["bad_check_digit", "unknown_code"]
    reason: str


def ean13_check_digit(first12: str) -> int:
    total = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(first12))
    return (10 - total % 10) % 10


def isbn10_check_digit(first9: str) -> str:
    total = sum(int(d) * (10 - i) for i, d in enumerate(first9))
    check = (11 - total % 11) % 11
    return "X" if check == 10 else str(check)


def classify(text: str, local: re.Pattern[str] | None) -> ItemCode | BadCode:
    """What a scan names, or why it cannot be a book (never raises)."""
    if _EAN13.fullmatch(text):
        if ean13_check_digit(text[:12]) != int(text[12]):
            return BadCode("bad_check_digit", f"{text} has a wrong check digit: scan it again")
        return ItemCode("isbn13" if text[:3] in ("978", "979") else "ean13", text)
    if _ISBN10.fullmatch(text):
        code = text.upper()
        if isbn10_check_digit(code[:9]) != code[9]:
            return BadCode("bad_check_digit", f"{code} has a wrong ISBN check digit: scan it again")
        return ItemCode("isbn10", code)
    if local is not None and local.fullmatch(text):
        return ItemCode("local", text)
    shown = text if len(text) <= 32 else text[:29] + "..."
    return BadCode("unknown_code", f"{shown!r} is not a book barcode of this library")
