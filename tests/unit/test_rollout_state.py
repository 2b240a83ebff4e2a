"""The rollout batch state machine (:func:`ingest_server.control.rollouts.decide`) and its
inputs: canary first, a batch only after the last settled and the pause passed, halt on the
failure share, offline devices waiting without holding the rollout up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest_server.control.rollouts import (
    Done,
    Halt,
    Issue,
    MarkSettled,
    Progress,
    Strategy,
    Wait,
    canary_count,
    decide,
)
from ingest_server.control.targets import Target, TargetError, check_tags

NOW = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
S = Strategy(canary=2, batch_size=5, pause_s=30, max_failure_share=0.3, device_timeout_s=60)


def progress(**kw: object) -> Progress:
    base: dict[str, object] = {
        "unissued": 20,
        "ok": 0,
        "failed": 0,
        "open_online": 0,
        "open_offline": 0,
        "batches": 0,
        "settled_at": None,
    }
    return Progress(**{**base, **kw})  # type: ignore[arg-type]


def test_canary_goes_first_then_batches_of_batch_size() -> None:
    assert decide(S, progress(), NOW) == Issue(2)
    after_canary = progress(unissued=18, ok=2, batches=1, settled_at=NOW - timedelta(seconds=31))
    assert decide(S, after_canary, NOW) == Issue(5)
    last = progress(unissued=3, ok=17, batches=4, settled_at=NOW - timedelta(seconds=31))
    assert decide(S, last, NOW) == Issue(3)


def test_no_canary_starts_with_a_batch() -> None:
    assert decide(Strategy(canary=0, batch_size=4), progress(), NOW) == Issue(4)


def test_next_batch_waits_for_the_batch_to_settle_and_the_pause() -> None:
    flying = progress(unissued=18, ok=1, open_online=1, batches=1)
    assert isinstance(decide(S, flying, NOW), Wait)
    settled = progress(unissued=18, ok=2, batches=1)
    assert decide(S, settled, NOW) == MarkSettled()
    pausing = progress(unissued=18, ok=2, batches=1, settled_at=NOW - timedelta(seconds=29))
    assert isinstance(decide(S, pausing, NOW), Wait)
    assert decide(S, pausing, NOW + timedelta(seconds=2)) == Issue(5)


def test_failures_beyond_the_share_halt() -> None:
    half = decide(S, progress(unissued=18, ok=1, failed=1, batches=1), NOW)
    assert isinstance(half, Halt)
    assert "1 of 2 settled devices failed" in half.reason
    # halting wins over waiting for the rest of the batch
    assert isinstance(decide(S, progress(unissued=13, ok=2, failed=3, open_online=2), NOW), Halt)
    # at the share exactly it goes on: only exceeding halts
    edge = Strategy(canary=2, batch_size=5, max_failure_share=0.3)
    ok = progress(unissued=10, ok=7, failed=3, batches=3, settled_at=NOW)
    assert decide(edge, ok, NOW) == Issue(5)
    # a share of 0 halts on the first failure; 1 never halts
    assert isinstance(decide(Strategy(max_failure_share=0), progress(ok=9, failed=1), NOW), Halt)
    never = decide(Strategy(max_failure_share=1), progress(failed=5, batches=1), NOW)
    assert never == MarkSettled()


def test_offline_devices_wait_without_holding_the_next_batch() -> None:
    waiting = progress(unissued=18, ok=1, open_offline=1, batches=1, settled_at=NOW)
    assert decide(S, waiting, NOW + timedelta(seconds=31)) == Issue(5)
    # everything issued, one device still offline: not done, not failed
    tail = progress(unissued=0, ok=19, open_offline=1, batches=5, settled_at=NOW)
    assert isinstance(decide(S, tail, NOW), Wait)
    assert decide(S, progress(unissued=0, ok=20, batches=5, settled_at=NOW), NOW) == Done()


def test_canary_from_count_or_share() -> None:
    assert canary_count(20, 2, None) == 2
    assert canary_count(20, None, 0.05) == 1
    assert canary_count(20, None, 0.11) == 3
    assert canary_count(3, 10, None) == 3
    assert canary_count(20, None, None) == 1


def test_targets_and_tags_are_checked() -> None:
    t = Target.from_dict({"schools": ["s001"], "tags": ["pilot", "pilot"]})
    assert t.to_dict() == {"schools": ["s001"], "tags": ["pilot"]}
    for bad, why in (
        ({}, "at least one"),
        ({"rooms": []}, "target.rooms: an empty list"),
        ({"floors": ["1"]}, r"unknown field\(s\) floors"),
        ({"kinds": [3]}, "target.kinds: expected a list of strings"),
        ({"rooms": [str(i) for i in range(1001)]}, "target.rooms: at most 1000 values"),
    ):
        with pytest.raises(TargetError, match=why):
            Target.from_dict(bad)
    many = Target.from_dict({"devices": [f"d{i}" for i in range(5000)]})
    assert many.devices is not None
    assert len(many.devices) == 5000
    assert check_tags(["b", "a", "b"]) == ["a", "b"]
    with pytest.raises(TargetError, match="'Bad Tag' must match"):
        check_tags(["Bad Tag"])
    with pytest.raises(TargetError, match="at most 32"):
        check_tags([f"t{i}" for i in range(33)])
