"""Each fault against the 50-device district (deploy/scenarios/district-50.toml), shortened.

Every case asserts the accounting: nothing lost, nothing stored twice, and that the fault
really bit (the broker refused, the outbox filled, the backlog was replayed, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import msgspec
import psycopg
import pytest

from simulators.fleet.report import Report
from simulators.fleet.scenario import Fault, Scenario, Tuning, load

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.slow]
SCENARIO = Path(__file__).parents[2] / "deploy" / "scenarios" / "district-50.toml"


def district(*faults: Fault, speed: float = 720.0, end: str = "09:00") -> Scenario:
    """District-50 from 07:30, at ``speed`` (720: 90 simulated minutes in 7.5 s)."""
    base = load(SCENARIO)
    tuning = msgspec.structs.replace(
        Tuning(), keepalive_s=5, puback_timeout_s=5.0, backoff_max_s=1.0
    )
    return msgspec.structs.replace(
        base, faults=list(faults), speed=speed, end=end, tick_s=0.1, tuning=tuning
    )


def fault(action: str, **kw: object) -> Fault:
    return msgspec.convert({"at": "07:50", "action": action, **kw}, Fault)


def check(report: Report) -> None:
    assert report.devices == 50
    assert report.generated > 500, report.table()
    assert report.lost == 0, report.table()
    assert report.publisher_crashes == 0, report.table()
    assert report.duplicates_stored == 0, report.table()
    assert report.unexpected == 0, report.table()
    assert report.gaps == 0, report.table()
    assert report.stored == report.generated == report.acknowledged
    assert len(report.faults) == 1


@pytest.mark.parametrize(
    "action", ["broker_kill", "broker_restart", "db_restart", "db_pause", "ingest_kill"]
)
def test_service_fault_loses_nothing(campus_fleet: Callable[..., Report], action: str) -> None:
    report = campus_fleet(district(fault(action, duration_s=2)))
    check(report)
    assert [f["action"] for f in report.faults] == [action]


@pytest.mark.parametrize(
    ("action", "target"),
    [("network_drop", "n01"), ("network_cut", "n01"), ("network_blackhole", "n02")],
)
def test_network_fault_loses_nothing(
    campus_fleet: Callable[..., Report], action: str, target: str
) -> None:
    report = campus_fleet(district(fault(action, target=target, duration_s=3)))
    check(report)
    if action == "network_drop":
        assert int(report.faults[0]["detail"].split()[0]) >= 25  # n01's 25 devices connected


def test_disk_full_keeps_readings_until_there_is_room(campus_fleet: Callable[..., Report]) -> None:
    report = campus_fleet(district(fault("disk_full", target="n02", duration_s=2.5)))
    check(report)
    assert report.store_errors > 0, report.table()
    assert report.dropped == 0, report.table()  # a transient full disk drops nothing


def test_clock_skew_is_stored_as_the_device_said(
    campus_fleet: Callable[..., Report], campus_db_url: str
) -> None:
    report = campus_fleet(district(fault("clock_skew", target="n01-env-r001-1", skew_s=3600)))
    check(report)
    with psycopg.connect(campus_db_url) as conn:
        row = conn.execute(
            "SELECT min(time - received_at), bool_and(synced) FROM events "
            "WHERE device_id = 'n01-env-r001-1' AND time > received_at"
        ).fetchone()
    assert row is not None
    assert row[0] is not None
    assert row[0] > timedelta(minutes=59)
    assert row[1] is False  # the device did not vouch for a clock it had not synced


def test_malformed_payloads_are_quarantined_and_the_rest_flows(
    campus_fleet: Callable[..., Report],
) -> None:
    report = campus_fleet(district(fault("malformed", count=12)))
    check(report)
    assert report.quarantined >= 12, report.table()


def test_duplicate_storm_is_dropped(campus_fleet: Callable[..., Report]) -> None:
    report = campus_fleet(district(fault("duplicate_storm", target="n01", count=40)))
    check(report)
    assert report.duplicates_dropped is not None
    assert report.duplicates_dropped > 0


def test_backlog_after_an_hour_offline_is_replayed_paced(
    campus_fleet: Callable[..., Report],
) -> None:
    # 600x: the hour the whole district is cut off lasts 6 s, then the backlog replays paced
    cut = fault("network_cut", at="07:36", duration_s=6.0)
    report = campus_fleet(district(cut, speed=600.0, end="08:50"))
    check(report)
    assert report.replayed > 300, report.table()
    assert report.quarantined == 0, report.table()  # no batch over the server's limits
