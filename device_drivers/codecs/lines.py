"""Sans-I/O splitting of a byte stream into CR/LF-ended lines, bounded in length.

Serial devices that speak in text lines (panels, recorders, Wiegand converters) share it: each
codec feeds raw bytes in and parses the lines that come out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Overlong:
    """A line that outgrew the limit: its first ``max_line + 1`` bytes; the rest is skipped."""

    raw: bytes


class LineSplitter:
    """Bytes in, non-empty lines (without CR/LF) out.

    A line longer than ``max_line`` is reported once as :class:`Overlong` and skipped to its end,
    so a device that never sends a line end cannot make the buffer grow.
    """

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | Overlong]:
        out: list[bytes | Overlong] = []
        buf = self._buf
        for byte in data:
            if byte in b"\r\n":
                if not self._skipping and buf:
                    out.append(bytes(buf))
                buf.clear()
                self._skipping = False
            elif not self._skipping:
                buf.append(byte)
                if len(buf) > self.max_line:
                    out.append(Overlong(bytes(buf)))
                    buf.clear()
                    self._skipping = True
        return out
