"""EM4100 frames from an RDM6300-style UART reader, sans-I/O (driver: ``device_drivers.em4100``).

Frame, 14 bytes: STX ``0x02``; 10 ASCII hex digits, the 5 data bytes (a version/customer byte,
then the 32-bit card number, big-endian); 2 ASCII hex digits, the XOR of those 5 bytes; ETX
``0x03``. Upper- and lower-case hex are accepted. The UID that is hashed is the 5 data bytes.
Bad frames and line noise come out as :class:`FrameError` with a reason; the parser
resynchronises on the next STX. :class:`Debouncer` turns a held card's repeats into one read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum, auto
from functools import reduce
from operator import xor
from typing import Final, Literal

STX: Final = 0x02


ETX: Final = 0x03


BODY_LEN: Final = 12  # 10 data + 2 checksum hex digits


#: Longest run of noise (or tail of an overlong frame) held before it is reported.
MAX_NOISE: Final = 64


_HEX: Final = frozenset(b"0123456789ABCDEFabcdef")


Reason = Literal["garbage", "short", "overlong", "bad_hex", "bad_checksum"]


@dataclass(frozen=True, slots=True)
class Em4100Frame:
    """A checksum-verified card read."""

    #: The 5 data bytes: version/customer byte, then the card number.
    uid: bytes

    @property
    def version(self) -> int:
        return self.uid[0]

    @property
    def card_number(self) -> int:
        return int.from_bytes(self.uid[1:], "big")


@dataclass(frozen=True, slots=True)
class FrameError:
    """Bytes the parser threw away, and why."""

    reason: Reason
    raw: bytes


class _State(Enum):
    HUNT = auto()  # between frames: anything but STX is noise
    BODY = auto()  # after STX, collecting the 12 hex digits
    OVERLONG = auto()  # the body was full but no ETX came: skip to the next STX or ETX


class Em4100Parser:
    """Sans-I/O: reader bytes in, frames and errors out. Chunking never changes the result."""

    def __init__(self) -> None:
        self._state = _State.HUNT
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Em4100Frame | FrameError]:
        out: list[Em4100Frame | FrameError] = []
        for byte in data:
            self._step(byte, out)
        return out

    def _step(self, byte: int, out: list[Em4100Frame | FrameError]) -> None:
        buf = self._buf
        if byte == STX:
            if self._state is _State.HUNT and buf:
                out.append(FrameError("garbage", bytes(buf)))
            elif self._state is _State.BODY:
                out.append(FrameError("short", bytes(buf)))
            elif self._state is _State.OVERLONG:
                out.append(FrameError("overlong", bytes(buf)))
            buf[:] = b"\x02"
            self._state = _State.BODY
            return
        buf.append(byte)
        if self._state is _State.HUNT:
            if len(buf) >= MAX_NOISE:
                self._emit(out, FrameError("garbage", bytes(buf)), _State.HUNT)
        elif self._state is _State.BODY:
            if byte == ETX:
                complete = len(buf) == BODY_LEN + 2
                item = decode(bytes(buf[1:-1])) if complete else FrameError("short", bytes(buf))
                self._emit(out, item, _State.HUNT)
            elif len(buf) > BODY_LEN + 1:
                self._state = _State.OVERLONG
        elif byte == ETX or len(buf) >= MAX_NOISE:
            self._emit(out, FrameError("overlong", bytes(buf)), _State.HUNT)

    def _emit(
        self, out: list[Em4100Frame | FrameError], item: Em4100Frame | FrameError, then: _State
    ) -> None:
        out.append(item)
        self._buf.clear()
        self._state = then


def decode(body: bytes) -> Em4100Frame | FrameError:
    """Check the 12 hex digits between STX and ETX."""
    raw = b"\x02" + body + b"\x03"
    if len(body) != BODY_LEN or not _HEX.issuperset(body):
        return FrameError("bad_hex", raw)
    data = bytes.fromhex(body[:10].decode())
    if reduce(xor, data) != int(body[10:], 16):
        return FrameError("bad_checksum", raw)
    return Em4100Frame(data)


class Debouncer:
    """One report per presence of a card: again only after it was unseen for over ``hold_s``.

    Remembers at most ``MAX_CARDS`` recent cards; the least recently seen is forgotten first.
    """

    MAX_CARDS = 256

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def accept(self, uid: bytes, now: float) -> bool:
        last = self._seen.pop(uid, None)
        self._seen[uid] = now
        if len(self._seen) > self.MAX_CARDS:
            self._seen.popitem(last=False)
        return last is None or now - last > self.hold_s
