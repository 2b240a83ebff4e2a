"""Barcode scanners in serial mode (USB-CDC or RS-232): each scan is a line of ASCII.

The scanner sends the symbol's text then a suffix, ``cr``, ``lf`` or ``crlf`` (its
programming sheet sets which). :class:`ScanDecoder` turns bytes into scans; :func:`classify`
decides what a scan names:

- 13 digits: an EAN-13 (``978``/``979`` prefix: an ISBN-13), check digit verified;
- 9 digits and a digit or ``X``: an ISBN-10, mod-11 check digit verified;
- otherwise the library's own item barcode, if it fully matches the configured pattern.

Codes of the first two shapes are always check-digit verified, even if the library's pattern
would also match them: a misread must never become someone else's book. :class:`BarcodeScanner`
reads a port (any spec :func:`device_drivers.plumbing.transport.open_transport` takes) and
hands each scan, good or bad, to a callback; it reopens the port with backoff when it goes away.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated

import msgspec
from msgspec import Meta

from device_drivers.base import DriverContext, Emit
from device_drivers.codecs.barcode import (
    BadCode,
    ItemCode,
    ScanDecoder,
    ScanError,
    Suffix,
    classify,
)
from device_drivers.plumbing.link import Link, LinkedDriver
from device_drivers.plumbing.transport import open_transport

log = logging.getLogger(__name__)


class ScannerOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    port: Annotated[str, Meta(min_length=1)]
    baudrate: Annotated[int, Meta(ge=300, le=921_600)] = 9600
    suffix: Suffix = "cr"
    #: A regular expression the library's own item barcodes fully match.
    item_pattern: str | None = None


def compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """The configured item pattern, or ValueError naming what is wrong with it."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"item_pattern {pattern!r} is not a regular expression: {exc}") from exc


OnScan = Callable[[ItemCode | BadCode | ScanError], Awaitable[None]]


class BarcodeScanner(LinkedDriver):
    """A serial barcode scanner: every line it sends, classified, goes to ``on_scan``."""

    counters = "barcode"
    READ_WAIT_S = 1.0

    def __init__(
        self, name: str, options: ScannerOptions, ctx: DriverContext, on_scan: OnScan
    ) -> None:
        opener = partial(open_transport, options.port, baudrate=options.baudrate)
        super().__init__(name, options.port, opener, ctx)
        self.options = options
        self._pattern = compile_pattern(options.item_pattern)
        self._on_scan = on_scan

    async def session(self, link: Link, emit: Emit) -> None:
        # A scanner in serial mode only talks when it scans: an open port is all "up" can mean.
        self.up()
        decoder = ScanDecoder(self.options.suffix)
        while True:
            chunk = await link.read(self.READ_WAIT_S)
            for item in decoder.feed(chunk) if chunk else ():
                result = item if isinstance(item, ScanError) else classify(item.text, self._pattern)
                if isinstance(result, ItemCode):
                    self.count(f"scan_{result.kind}")
                await self._on_scan(result)
