"""PC/SC card facts without a card reader: the card technology from the ATR (PC/SC part 3
contactless storage cards, ISO 14443 ATS/ATQB), and GET DATA for the UID; for
``device_drivers.pcsc``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final, Literal

from schemas.events import CardTech

#: Registered application provider id of the PC/SC Workgroup, in storage-card ATRs.
PCSC_RID: Final = bytes.fromhex("A000000306")
_A_STANDARDS: Final = range(0x01, 0x04)  # ISO 14443 A parts 1-3
_B_STANDARDS: Final = range(0x05, 0x08)  # ISO 14443 B parts 1-3
_15693_STANDARDS: Final = range(0x09, 0x0D)  # ISO 15693 parts 1-4
_FELICA_STANDARD: Final = 0x11
#: PC/SC part 3 card names answering MIFARE Classic commands: 1K, 4K, Mini, Plus SL1/SL2.
_CLASSIC_NAMES: Final = frozenset({0x0001, 0x0002, 0x0026, 0x0036, 0x0037, 0x0038, 0x0039})
_FELICA_NAME: Final = 0x003B
#: ISO 7816-4 compact-TLV tags that may appear in historical bytes.
_COMPACT_TAGS: Final = frozenset({*range(0x1, 0x9), 0xF})


def contactless_historical(atr: bytes) -> bytes | None:
    """The historical bytes of a PC/SC part 3 contactless ATR (``3B 8n 80 01 …``), else None."""
    if len(atr) < 4 or atr[0] != 0x3B or atr[1] >> 4 != 0x8 or atr[2:4] != b"\x80\x01":
        return None
    hist = atr[4 : 4 + (atr[1] & 0x0F)]
    return hist if len(hist) == atr[1] & 0x0F else None


def _compact_tlv_fills(data: bytes) -> bool:
    i = 0
    while i < len(data):
        tag, length = data[i] >> 4, data[i] & 0x0F
        if tag not in _COMPACT_TAGS:
            return False
        i += 1 + length
    return i == len(data)


def _looks_like_ats(hist: bytes) -> bool:
    """ISO 7816-4 historical bytes of an ATS, or (a reader quirk) the whole ATS."""
    if hist[0] == 0x80:
        return _compact_tlv_fills(hist[1:])
    if hist[0] == 0x00:
        return len(hist) >= 4 and _compact_tlv_fills(hist[1:-3])
    if hist[0] == 0x10:
        return len(hist) == 2
    t0 = hist[1] if len(hist) > 1 else 0x80
    return hist[0] == len(hist) and not t0 & 0x80 and 2 + (t0 >> 4).bit_count() <= len(hist)


def _looks_like_atqb(hist: bytes) -> bool:
    """ATQB application data (4), protocol info (3), MBLI nibble: PC/SC part 3 for type B."""
    return len(hist) == 8 and hist[5] & 0x0F == 0x01 and hist[7] & 0x0F == 0


def card_tech(atr: bytes) -> CardTech:
    """The contactless technology a PC/SC part 3 reader encodes in the ATR it builds."""
    hist = contactless_historical(atr)
    if hist is None:
        return "unknown"
    if len(hist) >= 11 and hist[:2] == b"\x80\x4f" and hist[3:8] == PCSC_RID:
        standard, name = hist[8], int.from_bytes(hist[9:11], "big")
        if standard == _FELICA_STANDARD or name == _FELICA_NAME:
            return "felica"
        if standard in _A_STANDARDS:
            return "mifare_classic" if name in _CLASSIC_NAMES else "iso14443a"
        if standard in _B_STANDARDS:
            return "iso14443b"
        if standard in _15693_STANDARDS:
            return "iso15693"
        return "unknown"
    if len(hist) == 12 and hist[0] == 0x50:  # some readers pass the whole ATQB
        return "iso14443b"
    if len(hist) != 8:  # a type B ATR always has exactly 8 historical bytes
        return "iso14443a"
    a, b = _looks_like_ats(hist), _looks_like_atqb(hist)
    if a != b:
        return "iso14443a" if a else "iso14443b"
    return "unknown"


MAX_UID: Final = 20


def get_uid_command(le: int = 0) -> bytes:
    """PC/SC part 3 GET DATA with P1 = 00 (UID); Le = 00 asks for the whole UID."""
    return bytes([0xFF, 0xCA, 0x00, 0x00, le])


@dataclass(frozen=True, slots=True)
class UidRead:
    uid: bytes
    #: The reader answered ``6C xx`` first and the command was re-issued with Le = xx.
    retried: bool = False


@dataclass(frozen=True, slots=True)
class WrongLength:
    """``6C xx``: ask again with Le = xx."""

    le: int


@dataclass(frozen=True, slots=True)
class UidFailure:
    #: "failed" (63 00, 6A 81: the reader says it cannot) or "error" (anything else).
    kind: Literal["failed", "error"]
    reason: str


def parse_uid_response(resp: bytes) -> UidRead | WrongLength | UidFailure:
    """Interpret the reader's answer to GET DATA UID."""
    if len(resp) < 2:
        return UidFailure("error", f"the reader's answer to GET UID is too short ({resp.hex()})")
    data, sw = resp[:-2], resp[-2:]
    if sw == b"\x90\x00":
        if not 1 <= len(data) <= MAX_UID:
            return UidFailure("error", f"the reader returned a UID of {len(data)} bytes")
        return UidRead(data)
    if sw[0] == 0x6C and sw[1]:
        return WrongLength(sw[1])
    if sw == b"\x63\x00":
        return UidFailure("failed", "the reader could not read the card (63 00: operation failed)")
    if sw == b"\x6a\x81":
        return UidFailure(
            "failed", "the reader cannot give this card's UID (6A 81: function not supported)"
        )
    return UidFailure("error", f"unexpected status {sw.hex(' ').upper()} to GET UID")


def read_uid(transmit: Callable[[bytes], bytes]) -> UidRead | UidFailure:
    """Send GET UID through ``transmit``, re-issuing it once with the length a 6C asks for."""
    result = parse_uid_response(transmit(get_uid_command()))
    if isinstance(result, WrongLength):
        result = parse_uid_response(transmit(get_uid_command(result.le)))
        if isinstance(result, WrongLength):
            return UidFailure("error", "the reader asked twice for a different UID length")
        if isinstance(result, UidRead):
            return replace(result, retried=True)
    return result
