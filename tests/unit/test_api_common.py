"""Cursors and ranges: opaque round trips, and clear errors naming the parameter."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import given
from hypothesis import strategies as st

from ingest_server.web.api.common import (
    DEFAULT_SPAN,
    day_range,
    decode_cursor,
    encode_cursor,
    time_range,
)

T = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def loc(exc: pytest.ExceptionInfo[RequestValidationError]) -> tuple[str, str]:
    return tuple(exc.value.errors()[0]["loc"])  # type: ignore[return-value]


@given(
    st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)
    ),
    st.text(),
    st.integers(-(2**63), 2**63 - 1),
)
def test_cursor_round_trip(when: datetime, device: str, seq: int) -> None:
    device = device.replace("\x00", "")
    token = encode_cursor("events", (when, device, seq))
    assert token.isascii()
    assert decode_cursor(token, "events", (datetime, str, int)) == (when, device, seq)


@pytest.mark.parametrize(
    "token",
    ["", "!!!", "bm90IGEgY3Vyc29y", encode_cursor("readings", (T, "d", "m")),
     encode_cursor("events", (T, "d")), encode_cursor("events", (T, "d", "x"))],
)  # fmt: skip
def test_foreign_or_broken_cursors_name_the_parameter(token: str) -> None:
    with pytest.raises(RequestValidationError) as exc:
        decode_cursor(token, "events", (datetime, str, int))
    assert loc(exc) == ("query", "cursor")


def test_time_range_defaults_and_errors() -> None:
    r = time_range(None, T)
    assert (r.start, r.end) == (T - DEFAULT_SPAN, T)
    with pytest.raises(RequestValidationError) as exc:
        time_range(T, T)
    assert loc(exc) == ("query", "from")
    with pytest.raises(RequestValidationError) as exc:
        time_range(None, datetime(2026, 1, 1))  # the naive input under test
    assert loc(exc) == ("query", "to")
    with pytest.raises(RequestValidationError, match="366 days"):
        time_range(T - timedelta(days=400), T)
    with pytest.raises(RequestValidationError):
        time_range(datetime(1, 1, 1, tzinfo=UTC), None)


def test_day_range() -> None:
    d = date(2026, 11, 20)

    def today() -> date:
        return date(2026, 11, 23)

    assert day_range(None, d, today) == (d - timedelta(days=30), d)
    assert day_range(None, None, today) == (date(2026, 10, 24), date(2026, 11, 23))
    with pytest.raises(RequestValidationError):
        day_range(d, d - timedelta(days=1), today)
