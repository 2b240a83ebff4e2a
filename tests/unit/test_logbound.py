"""No log record longer than a few KB, whatever a device or an error put in it."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from ingest_server import logbound


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("test.logbound")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logbound.install()
    logbound.install()  # idempotent
    try:
        yield out
    finally:
        logbound.uninstall()
        log.removeHandler(handler)
        log.propagate = True


def test_a_huge_argument_is_cut_with_a_marker(captured: io.StringIO) -> None:
    reason = "x" * 20_000_000  # a device's reason of tens of MB
    logging.getLogger("test.logbound").warning("control plane: %s (topic %s)", reason, "t/1")
    line = captured.getvalue()
    assert len(line) < logbound.MAX_MESSAGE + 200
    head = "WARNING test.logbound: control plane: " + "x" * 100
    assert line.startswith(head)
    # what is cut: the rest of the formatted message, in UTF-8 bytes
    rest = len("control plane: ") + 20_000_000 + len(" (topic t/1)") - logbound.MAX_MESSAGE
    assert line.endswith(f"… ({rest} bytes more)\n")


def test_a_short_message_is_untouched(captured: io.StringIO) -> None:
    logging.getLogger("test.logbound").info("command %s on %s: %s", "c-1", "cr-0101", "ok")
    assert captured.getvalue() == "INFO test.logbound: command c-1 on cr-0101: ok\n"


def test_a_huge_exception_keeps_both_ends_of_its_traceback(captured: io.StringIO) -> None:
    try:
        raise ValueError("detail: " + "y" * 5_000_000)
    except ValueError:
        logging.getLogger("test.logbound").exception("writing failed")
    text = captured.getvalue()
    assert len(text) < logbound.MAX_TRACEBACK + 300
    assert text.startswith("ERROR test.logbound: writing failed\nTraceback (most recent call last)")
    assert "bytes more) …" in text
    assert text.rstrip().endswith("y" * 100)


def test_the_factory_is_removed_again() -> None:
    before = logging.getLogRecordFactory()
    logbound.install()
    assert logging.getLogRecordFactory() is not before
    logbound.uninstall()
    assert logging.getLogRecordFactory() is before


@pytest.mark.parametrize(
    ("text", "limit", "want"),
    [
        ("abc", 3, "abc"),
        ("abcd", 3, "abc… (1 bytes more)"),
        ("ab\u00e9\u00e9", 2, "ab… (4 bytes more)"),  # bytes, not characters
    ],
)
def test_cut(text: str, limit: int, want: str) -> None:
    assert logbound.cut(text, limit) == want
    assert logbound.short("t" * 500).endswith("… (300 bytes more)")
