"""A serial-mode barcode scanner (USB-CDC / RS-232) on a pty: each scan is text then a suffix.

Written independently of the driver. Check digits are computed here so tests can make good
and bad symbols::

    with BarcodeScannerSim(tmp_path / "ttySCAN", suffix="crlf") as scanner:
        scanner.scan("9787020002207")           # an ISBN-13
        scanner.scan(ean13("978702000220"))     # the same, check digit computed
        scanner.send_raw(b"\\x00\\xff\\r")        # line noise
        scanner.unplug(); scanner.replug()
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from simulators.pty import close_fds, open_pty, point_link

SUFFIXES = {"cr": b"\r", "lf": b"\n", "crlf": b"\r\n"}


def ean13(first12: str) -> str:
    """An EAN-13 (or ISBN-13) with its check digit appended."""
    if len(first12) != 12 or not first12.isdigit():
        raise ValueError("an EAN-13 body is 12 digits")
    weighted = sum(int(d) * (1, 3)[i % 2] for i, d in enumerate(first12))
    return first12 + str(-weighted % 10)


def isbn10(first9: str) -> str:
    """An ISBN-10 with its mod-11 check character (0-9 or X) appended."""
    if len(first9) != 9 or not first9.isdigit():
        raise ValueError("an ISBN-10 body is 9 digits")
    weighted = sum(int(d) * w for d, w in zip(first9, range(10, 1, -1), strict=True))
    check = -weighted % 11
    return first9 + ("X" if check == 10 else str(check))


def wrong_check_digit(code: str) -> str:
    """The same code with its last digit changed, so its check fails."""
    last = code[-1]
    return code[:-1] + ("1" if last in "0X" else str((int(last) + 1) % 10))


class BarcodeScannerSim:
    """The device end of a serial barcode scanner; the driver opens ``link``."""

    def __init__(self, link: str | Path, *, suffix: str = "cr") -> None:
        self.link = Path(link)
        self.suffix = SUFFIXES[suffix]
        self.scans = 0
        self._fds: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.replug()

    def scan(self, code: str) -> None:
        """One trigger pull on a symbol encoding ``code``."""
        self.send_raw(code.encode("ascii") + self.suffix)
        self.scans += 1

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            if self._fds is None:
                raise RuntimeError("the scanner is unplugged")
            view = memoryview(data)
            while view:  # a scan is short: a full pty buffer means nobody reads, so fail loudly
                view = view[os.write(self._fds[0], view) :]

    def unplug(self) -> None:
        with self._lock:
            if self._fds is not None:
                close_fds(self._fds)
            self._fds = None

    def replug(self) -> str:
        """Plug in on a fresh pty behind the same ``link``; return its /dev/pts name."""
        self.unplug()
        master, slave, name = open_pty()
        point_link(self.link, name)
        with self._lock:
            self._fds = (master, slave)
        return name

    def close(self) -> None:
        self.unplug()
        self.link.unlink(missing_ok=True)

    def __enter__(self) -> BarcodeScannerSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
