"""Bounded log lines: no record longer than a few KB, whatever a device or an error put in it.

:func:`install` sets a log record factory (so every logger and handler is covered, uvicorn's
included) that formats a long message once, cuts it, and marks the cut ``… (N bytes more)``;
a traceback keeps its first and last parts. :func:`short` is for values quoted from devices.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any, Final

#: The longest message a record keeps (characters), and the longest traceback text.
MAX_MESSAGE: Final = 4000
MAX_TRACEBACK: Final = 8000
#: How much of a device's topic or reason a log line quotes.
SHORT: Final = 200

_lock = threading.Lock()
_installed: Callable[..., logging.LogRecord] | None = None


def cut(text: str, limit: int) -> str:
    """``text`` up to ``limit`` characters, then ``… (N bytes more)`` if there was more."""
    if len(text) <= limit:
        return text
    rest = len(text[limit:].encode("utf-8", "backslashreplace"))
    return f"{text[:limit]}… ({rest} bytes more)"


def short(text: str, limit: int = SHORT) -> str:
    """A device-supplied value (topic, reason) as a log line quotes it."""
    return cut(text, limit)


def _cut_middle(text: str, limit: int) -> str:
    """The first and last halves of ``limit``: a traceback's end names the error."""
    if len(text) <= limit:
        return text
    half = limit // 2
    dropped = len(text[half:-half].encode("utf-8", "backslashreplace"))
    return f"{text[:half]}… ({dropped} bytes more) …{text[-half:]}"


def bound(record: logging.LogRecord) -> logging.LogRecord:
    """Cut ``record``'s message and traceback to :data:`MAX_MESSAGE` / :data:`MAX_TRACEBACK`."""
    if record.args or len(str(record.msg)) > MAX_MESSAGE:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: logging reports it later
            return record
        if len(message) > MAX_MESSAGE:
            record.msg, record.args = cut(message, MAX_MESSAGE), None
    if record.exc_info and not record.exc_text:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_text = _cut_middle(text, MAX_TRACEBACK)
    if record.stack_info and len(record.stack_info) > MAX_TRACEBACK:
        record.stack_info = _cut_middle(record.stack_info, MAX_TRACEBACK)
    return record


def install() -> None:
    """Bound every log record of this process from now on (idempotent)."""
    global _installed  # noqa: PLW0603  # one factory per process
    with _lock:
        if _installed is not None:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            return bound(previous(*args, **kwargs))

        logging.setLogRecordFactory(factory)
        _installed = previous


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    global _installed  # noqa: PLW0603
    with _lock:
        if _installed is not None:
            logging.setLogRecordFactory(_installed)
            _installed = None


__all__ = ["MAX_MESSAGE", "MAX_TRACEBACK", "bound", "cut", "install", "short", "uninstall"]
