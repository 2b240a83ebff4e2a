"""A Wiegand-to-UART converter on a pty: card reads become ``W26:…`` / ``W34:…`` hex lines.

Framing (the converter's, written here independently of the driver): the raw Wiegand bits as
hex, first bit on the wire most significant, zero-padded to 7 or 9 digits, CR LF after each
frame. Bit 1 is even parity over the first half of the payload, the last bit odd parity over
the second half.

    with WiegandConverter(tmp_path / "wiegand") as conv:
        conv.present(0x12ABCD)                  # W26: facility 0x12, card 0xABCD
        conv.present(0xDEADBEEF, bits=34)
        conv.unplug(); conv.replug()            # back under a new /dev/pts name
"""

from __future__ import annotations

import os
from pathlib import Path

from simulators.pty import close_fds, open_pty, point_link


def frame_bits(payload: int, bits: int = 26, *, bad_parity: bool = False) -> int:
    """The raw frame for a payload (24 bits for W26, 32 for W34), parity bits included."""
    n = bits - 2
    if bits not in (26, 34) or not 0 <= payload < 1 << n:
        raise ValueError(f"a W{bits} payload is {n} bits")
    half = n // 2
    high = bin(payload >> half).count("1")
    low = bin(payload & ((1 << half) - 1)).count("1")
    even = high % 2  # makes the first half plus this bit even
    odd = 1 - low % 2  # makes the second half plus this bit odd
    if bad_parity:
        odd ^= 1
    return (even << (bits - 1)) | (payload << 1) | odd


def frame_line(payload: int, bits: int = 26, *, bad_parity: bool = False) -> bytes:
    raw = frame_bits(payload, bits, bad_parity=bad_parity)
    digits = 7 if bits == 26 else 9
    return f"W{bits}:{raw:0{digits}X}\r\n".encode()


def card_bytes(payload: int, bits: int = 26) -> bytes:
    """The bytes a reader reports for this card: what the driver hashes."""
    return payload.to_bytes(3 if bits == 26 else 4, "big")


class WiegandConverter:
    """The device end of a serial Wiegand converter; the driver opens ``link``."""

    def __init__(self, link: str | Path) -> None:
        self.link = Path(link)
        self._fds: tuple[int, int] | None = None
        self.pts_name: str | None = None
        self._last_name: str | None = None
        self.replug()

    def present(
        self, card: int, bits: int = 26, *, facility: int | None = None, bad_parity: bool = False
    ) -> bytes:
        """Send one card read; ``facility`` (W26) goes in front of a 16-bit ``card``.

        Returns the card bytes the driver should hash.
        """
        payload = card if facility is None else (facility << 16) | card
        self.send_raw(frame_line(payload, bits, bad_parity=bad_parity))
        return card_bytes(payload, bits)

    def send_raw(self, data: bytes) -> None:
        if self._fds is None:
            raise RuntimeError("the converter is unplugged")
        os.write(self._fds[0], data)

    def unplug(self) -> None:
        if self._fds is not None:
            close_fds(self._fds)
            self._fds = None
            self.pts_name = None
        self.link.unlink(missing_ok=True)

    def replug(self) -> str:
        """Plug in (again) under a pts name different from the previous one; return it."""
        self.unplug()
        master, slave, name = open_pty(avoid=self._last_name)
        self._fds = (master, slave)
        self.pts_name = self._last_name = name
        point_link(self.link, name)
        return name

    def close(self) -> None:
        self.unplug()

    def __enter__(self) -> WiegandConverter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
