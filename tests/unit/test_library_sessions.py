"""Loan sessions: a tap opens one, books join within session_s, repeats count once."""

from __future__ import annotations

from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverError, UidHasher
from device_drivers.library import LoanSessions, Refused, build, probe
from schemas.events import LibraryLoan, LibraryReturn

ALICE = "a" * 64
BOB = "b" * 64


def test_books_after_a_tap_are_loans_to_that_student() -> None:
    s = LoanSessions("lib-1", session_s=30)
    session = s.tap(ALICE, now=0)
    assert session is not None
    loan = s.book("T1", "barcode", now=5)
    assert loan == LibraryLoan(
        student_hash=ALICE,
        item_id="T1",
        source="barcode",
        terminal="lib-1",
        session_id=session.session_id,
    )
    assert s.book("T1", "rfid", now=6) is None  # same book again: counted once
    assert isinstance(s.book("T2", "rfid", now=35), LibraryLoan)  # 30 s after the last book


def test_a_session_times_out_then_books_are_returns() -> None:
    s = LoanSessions("lib-1", session_s=30)
    s.tap(ALICE, now=0)
    assert s.book("T1", "barcode", now=31) == LibraryReturn(
        student_hash=None, item_id="T1", source="barcode", terminal="lib-1"
    )
    assert s.book("T1", "barcode", now=40) is None  # returned twice in a row: once
    assert isinstance(s.book("T1", "barcode", now=80), LibraryReturn)


def test_another_student_tapping_starts_a_new_session() -> None:
    s = LoanSessions("lib-1", session_s=30)
    first = s.tap(ALICE, now=0)
    assert first is not None
    second = s.tap(BOB, now=2)
    assert second is not None
    assert second.session_id != first.session_id
    loan = s.book("T1", "rfid", now=3)
    assert isinstance(loan, LibraryLoan)
    assert (loan.student_hash, loan.session_id) == (BOB, second.session_id)


def test_the_same_card_again_finishes_the_session() -> None:
    s = LoanSessions("lib-1", session_s=30)
    assert s.tap(ALICE, now=0) is not None
    assert s.tap(ALICE, now=1) is None
    assert isinstance(s.book("T1", "barcode", now=2), LibraryReturn)
    assert s.tap(ALICE, now=3) is not None  # and a third tap starts a new one


def test_a_session_is_bounded() -> None:
    s = LoanSessions("lib-1", session_s=30, max_items=2)
    s.tap(ALICE, now=0)
    assert isinstance(s.book("T1", "rfid", now=1), LibraryLoan)
    assert isinstance(s.book("T2", "rfid", now=1), LibraryLoan)
    refused = s.book("T3", "rfid", now=1)
    assert isinstance(refused, Refused)
    assert "at most 2" in refused.reason


def test_recent_returns_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LoanSessions, "MAX_RECENT_RETURNS", 3)
    s = LoanSessions("lib-1", session_s=30)
    for i in range(5):
        assert isinstance(s.book(f"T{i}", "barcode", now=i), LibraryReturn)
    assert len(s._returned) == 3
    assert isinstance(s.book("T0", "barcode", now=6), LibraryReturn)  # forgotten at the bound


CTX = DriverContext("lib-0101", UidHasher(b"k" * 32))
CARDS = [{"type": "em4100", "port": "/dev/null"}]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"scanner": {"port": "/dev/null"}}, "cards"),
        ({"cards": CARDS}, "scanner"),
        ({"cards": CARDS, "scanner": {"port": "/dev/null", "item_pattern": "("}}, "item_pattern"),
        ({"cards": CARDS, "scanner": {"port": "/dev/null", "suffix": "tab"}}, "suffix"),
        ({"cards": CARDS, "pad": {}, "session_s": 0}, "session_s"),
    ],
)
def test_bad_configs_are_named(options: dict[str, Any], says: str) -> None:
    with pytest.raises(DriverError, match=says):
        build("lib", options, CTX)


async def test_probe_checks_the_configuration() -> None:
    ok = await probe({"cards": CARDS, "pad": {"reader": "vpcd"}, "session_s": 45})
    assert ok.status == "ok"
    assert "45 s" in ok.message
    bad = await probe({"cards": CARDS, "scanner": {"port": "x", "item_pattern": "["}})
    assert bad.status == "fail"
