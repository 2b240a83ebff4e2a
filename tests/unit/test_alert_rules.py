"""The alert rules and their hysteresis, fed synthetic events through the real decoder (no I/O)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ingest_server.alerts.config import RulesConfig, RulesError, load, parse
from ingest_server.alerts.engine import AlertEngine
from ingest_server.alerts.rules import Action, Evaluator
from ingest_server.ingest.batch import EventRow, Inbound, QuarantineRow, StateRow, rows_of
from ingest_server.ingest.writer import WriteResult
from ingest_server.metrics import IngestMetrics
from ingest_server.settings import Settings, SettingsError
from schemas.state import DeviceState
from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch

UID = "ab" * 32
#: A Tuesday, 10:00 in Beijing: within the default school hours.
T0 = datetime(2026, 3, 3, 2, 0, tzinfo=UTC).timestamp()
_seq = iter(range(1, 1_000_000))


def event(kind: str, data: dict[str, Any], at: float, device: str = "dev-1") -> EventRow:
    ev = UplinkEvent(
        seq=next(_seq),
        ts=datetime.fromtimestamp(at, UTC),
        type=kind,
        data=msgspec.Raw(msgspec.json.encode(data)),
    )
    batch = UplinkBatch(
        device_id=device, kind="access_gate", sent_at=datetime.fromtimestamp(at, UTC), events=[ev]
    )
    msg = Inbound(f"campus/v1/s001/{device}/up", encode_batch(batch), 1, 1, datetime.now(UTC))
    (row,) = rows_of(msg)[0].events
    return row


def gate(temp: float, at: float) -> EventRow:
    data = {"uid_hash": UID, "gate": "east", "direction": "in", "result": "granted"}
    return event("access.pass", {**data, "temperature_c": temp}, at)


def co2(ppm: float, at: float) -> EventRow:
    return event("env.reading", {"sensor": "room-101", "co2_ppm": ppm}, at)


def health(at: float, **data: Any) -> EventRow:
    base = {"cpu_pct": 1.0, "rss_mb": 30.0, "outbox_depth": 0, "oldest_unsent_s": 0.0}
    return event("agent.health", {**base, **data}, at)


class Engine:
    """The evaluator with the database's part played by counters: ids handed out in order."""

    def __init__(self, text: str = "") -> None:
        self.ev = Evaluator(parse(text) if text else RulesConfig())
        self.next_id = 1
        self.log: list[tuple[str, str, int]] = []

    def run(self, now: float, *, everything: bool = True) -> list[Action]:
        actions = self.ev.decide(now, everything=everything)
        for a in actions:
            if a.kind == "open":
                alert_id = self.next_id
                self.next_id += 1
            elif a.kind == "reopen":
                alert_id = a.track.resolved_id or 0
            else:
                alert_id = a.track.alert_id or 0
            self.log.append((a.kind, a.track.rule, alert_id))
            self.ev.applied(a, alert_id)
        return actions

    def feed(self, *rows: EventRow, at: float) -> None:
        self.ev.events(list(rows), at)


def test_fever_opens_on_the_first_reading_and_resolves_after_the_hold() -> None:
    e = Engine("[rules.fever]\nclear_hold_s = 60\n")
    e.feed(gate(36.6, T0), at=T0)
    assert e.run(T0) == []
    e.feed(gate(37.3, T0 + 1), at=T0 + 1)  # at the threshold: a fever
    assert [(a.kind, a.track.rule) for a in e.run(T0 + 1)] == [("open", "fever")]
    track = e.ev.tracks[("fever", "dev-1")]
    assert track.detail == {"gate": "east", "temperature_c": 37.3, "uid_hash": UID}
    assert "37.3" in track.message
    e.feed(gate(36.5, T0 + 2), at=T0 + 2)
    assert e.run(T0 + 61) == []  # clear for 59 s: held back
    assert [a.kind for a in e.run(T0 + 62)] == ["resolve"]


def test_a_retrigger_during_the_clear_hold_keeps_the_alert_open() -> None:
    e = Engine("[rules.fever]\nclear_hold_s = 60\n")
    e.feed(gate(38.0, T0), at=T0)
    e.run(T0)
    for i in range(1, 10):  # flapping around the threshold
        e.feed(gate(36.0 if i % 2 else 38.0, T0 + i * 10), at=T0 + i * 10)
        assert e.run(T0 + i * 10) == []
    assert e.log == [("open", "fever", 1)]


def test_a_retrigger_within_the_window_reopens_the_same_alert_then_a_late_one_opens_anew() -> None:
    e = Engine("[rules.fever]\nclear_hold_s = 0\nreopen_window_s = 300\n")
    e.feed(gate(38.0, T0), at=T0)
    e.run(T0)
    e.feed(gate(36.0, T0 + 1), at=T0 + 1)
    e.run(T0 + 1)
    e.feed(gate(38.1, T0 + 100), at=T0 + 100)
    e.run(T0 + 100)
    e.feed(gate(36.0, T0 + 101), at=T0 + 101)
    e.run(T0 + 101)
    e.feed(gate(38.2, T0 + 1000), at=T0 + 1000)
    e.run(T0 + 1000)
    assert e.log == [
        ("open", "fever", 1),
        ("resolve", "fever", 1),
        ("reopen", "fever", 1),
        ("resolve", "fever", 1),
        ("open", "fever", 2),
    ]


def test_co2_needs_the_window_and_clears_only_below_the_lower_level() -> None:
    e = Engine("[rules.co2_high]\nfor_s = 60\nclear_hold_s = 30\n")  # 1500 up, 1200 down
    e.feed(co2(1600, T0), at=T0)
    assert e.run(T0 + 59) == []
    e.feed(co2(1700, T0 + 59), at=T0 + 59)
    assert [a.kind for a in e.run(T0 + 60)] == ["open"]
    e.feed(co2(1300, T0 + 70), at=T0 + 70)  # below the threshold, above the clear level
    assert e.run(T0 + 200) == []
    e.feed(co2(1100, T0 + 210), at=T0 + 210)
    assert e.run(T0 + 239) == []
    assert [a.kind for a in e.run(T0 + 240)] == ["resolve"]


def test_co2_that_drops_before_the_window_opens_nothing() -> None:
    e = Engine("[rules.co2_high]\nfor_s = 60\n")
    e.feed(co2(1600, T0), at=T0)
    e.feed(co2(900, T0 + 30), at=T0 + 30)
    assert e.run(T0 + 120) == []
    assert e.ev.tracks == {}  # nothing left to remember


def test_offline_by_will_waits_for_grace_and_school_hours_then_clears_on_life() -> None:
    e = Engine("[rules.device_offline]\nfor_s = 10\nclear_hold_s = 0\n")
    state = DeviceState(state="offline", boot=1, agent_version="t", ts=datetime.now(UTC))
    e.ev.states([StateRow("s001", "dev-1", state, datetime.now(UTC))], T0)
    assert e.run(T0 + 9) == []
    assert [a.kind for a in e.run(T0 + 10)] == ["open"]
    e.feed(health(T0 + 20), at=T0 + 20)  # any event is a sign of life
    assert [a.kind for a in e.run(T0 + 20)] == ["resolve"]
    night = datetime(2026, 3, 3, 14, 0, tzinfo=UTC).timestamp()  # 22:00 in Beijing
    e.ev.states([StateRow("s001", "dev-1", state, datetime.now(UTC))], night)
    assert e.run(night + 3600) == []  # out of school hours: pending, not opened


def test_a_silent_device_is_offline_only_past_silent_s() -> None:
    e = Engine("[rules.device_offline]\nsilent_s = 600\nfor_s = 0\n")
    e.ev.silent("s001", "dev-1", T0, T0 + 599)
    assert e.run(T0 + 599) == []
    e.ev.silent("s001", "dev-1", T0, T0 + 600)
    assert [a.kind for a in e.run(T0 + 600)] == ["open"]
    assert e.ev.tracks[("device_offline", "dev-1")].detail["cause"] == "silent"


def test_driver_error_backlog_and_clock_skew_from_health() -> None:
    text = (
        "[rules.driver_error]\nfor_s = 0\n[rules.outbox_backlog]\nthreshold_s = 60\n"
        "[rules.clock_skew]\nthreshold_s = 5\n"
    )
    e = Engine(text)
    e.feed(
        health(
            T0, drivers={"gate": "failed", "cam": "ok"}, oldest_unsent_s=90.0, clock_offset_s=-7.5
        ),
        at=T0,
    )
    assert sorted(a.track.rule for a in e.run(T0)) == [
        "clock_skew",
        "driver_error",
        "outbox_backlog",
    ]
    assert e.ev.tracks[("driver_error", "dev-1")].detail == {"drivers": {"gate": "failed"}}


def test_camera_recorder_temperature_rules() -> None:
    text = (
        "[rules.camera_black_or_frozen]\nfor_s = 0\n[rules.temperature_out_of_range]\nfor_s = 0\n"
    )
    e = Engine(text)
    cam = {"camera": "c1", "fps": 25.0, "brightness": 2.0, "black_frame": True, "frozen": False}
    rec = {"state": "record", "free_space_mb": 100.0, "recorder": "r1"}
    e.feed(
        event("camera.health", cam, T0),
        event("recorder.status", rec, T0),
        event("env.reading", {"temperature_c": 35.0}, T0),
        at=T0,
    )
    assert sorted(a.track.rule for a in e.run(T0)) == [
        "camera_black_or_frozen",
        "recorder_fault",
        "temperature_out_of_range",
    ]


def test_seq_gap_and_quarantine_spike_clear_after_quiet() -> None:
    e = Engine("[rules.quarantine_spike]\nthreshold = 3\nwindow_s = 60\nquiet_s = 100\n")
    e.ev.gaps([("s001", "dev-1", 4)], T0)
    bad = QuarantineRow(datetime.now(UTC), "campus/v1/s001/dev-2/up", b"x", "bad", "dev-2")
    e.ev.quarantined([bad, bad], T0)
    assert [a.track.rule for a in e.run(T0)] == ["seq_gap"]
    e.ev.quarantined([bad], T0 + 1)
    assert [a.track.rule for a in e.run(T0 + 1)] == ["quarantine_spike"]
    assert [a.track.rule for a in e.run(T0 + 102)] == ["quarantine_spike"]  # quiet: resolved
    assert [a.kind for a in e.run(T0 + 3601)] == ["resolve"]  # the gap, after an hour


def test_stale_replayed_events_change_nothing() -> None:
    e = Engine()
    e.feed(gate(39.0, T0 - 3600), at=T0)
    assert e.run(T0) == []


def test_resolved_by_hand_stays_resolved_until_the_condition_clears() -> None:
    e = Engine("[rules.fever]\nclear_hold_s = 0\nreopen_window_s = 0\n")
    e.feed(gate(38.0, T0), at=T0)
    e.run(T0)
    e.ev.resolved_elsewhere(1, T0 + 1)
    e.feed(gate(38.5, T0 + 2), at=T0 + 2)
    assert e.run(T0 + 2) == []
    e.feed(gate(36.0, T0 + 3), gate(38.0, T0 + 4), at=T0 + 4)
    assert [a.kind for a in e.run(T0 + 4)] == ["open"]


def test_per_school_overrides_and_disabled_rules() -> None:
    cfg = parse(
        "[rules.fever]\nthreshold_c = 37.5\n[schools.s002.rules.fever]\nthreshold_c = 38\n"
        "[schools.s003.rules.fever]\nenabled = false\n"
    )
    assert cfg.params("fever", "s001")["threshold_c"] == 37.5
    assert cfg.params("fever", "s002")["threshold_c"] == 38.0
    assert not cfg.params("fever", "s003").enabled
    assert cfg.params("co2_high", "s002")["threshold_ppm"] == 1500.0  # built-in default


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[rules.fever]\nthreshold_c = 'hot'\n", ":2: rules.fever.threshold_c: must be a number"),
        ("\n[rules.nope]\nx = 1\n", ":2: rules.nope: unknown rule"),
        ("[rules.co2_high]\n\nwindow = 3\n", ":3: rules.co2_high.window: unknown parameter"),
        ("[rules.fever]\nseverity = 'loud'\n", ":2: rules.fever.severity: must be one of"),
        ("[school_hours]\nstart = '9am'\n", ":2: school_hours.start: must be a time"),
        ("timezone = 'Mars/Base'\n", ":1: timezone: unknown time zone"),
        ("[schools.S1.rules.fever]\nenabled = true\n", ":1: schools.S1: a school id must"),
        # a final newline is not the end of a value (Python's `$` let both through)
        ('[school_hours]\nstart = "07:30\\n"\n', ":2: school_hours.start: must be a time"),
        ('[schools."s001\\n".rules.fever]\nenabled = true\n', "a school id must match"),
        ("[rules.fever\n", "not valid TOML"),
    ],
)
def test_a_bad_rules_file_names_file_line_and_field(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(RulesError) as err:
        load(path)
    assert str(err.value).startswith(str(path))
    assert where in str(err.value)


def test_a_bad_rules_file_stops_the_start_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("[rules.co2_high]\nfor_s = -1\n")
    with pytest.raises(SettingsError, match=r"--rules: .*rules.toml:2: rules.co2_high.for_s"):
        Settings(rules_file=path)


def test_the_engine_queue_drops_the_oldest_commit_and_counts_it() -> None:
    metrics = IngestMetrics()
    engine = AlertEngine(RulesConfig(), "postgresql:///unused", metrics)
    engine.QUEUE_COMMITS = 2
    results = [WriteResult([gate(36.0, T0)], 0, [], 0, 0) for _ in range(3)]
    for r in results:
        engine.submit(r, T0)
    engine.submit(WriteResult([], 0, [], 0, 0), T0)  # nothing in it: not queued
    assert metrics.alerts_dropped.value() == 1
    assert [r for r, _ in engine._take(0)] == results[1:]


def test_a_dead_engine_thread_is_reported_stuck() -> None:
    engine = AlertEngine(RulesConfig(), "postgresql:///unused", IngestMetrics())
    assert engine.stuck() == []
    engine._thread = threading.Thread(target=lambda: None)
    engine._thread.start()
    engine._thread.join()
    assert engine.stuck() == ["alerts: thread alert-engine has died"]


def morning_check(temp: float | None, at: float, symptoms: tuple[str, ...] = ()) -> EventRow:
    data = {"student_hash": UID, "class_id": "g7c2", "temperature_c": temp,
            "symptoms": list(symptoms), "station": "gate-check"}  # fmt: skip
    return event("health.check", data, at)


def test_fever_at_a_morning_check_names_the_class_never_the_student() -> None:
    e = Engine("[rules.fever]\nclear_hold_s = 0\n")
    e.feed(morning_check(36.6, T0), at=T0)
    assert e.run(T0) == []
    e.feed(morning_check(37.8, T0 + 1), at=T0 + 1)
    (opened,) = e.run(T0 + 1)
    assert (opened.kind, opened.track.rule) == ("open", "fever")
    assert "class g7c2" in opened.track.message
    assert "37.8" in opened.track.message
    assert UID not in str(opened.track.detail)
    assert UID not in opened.track.message
    # a symptom of fever without a temperature counts too
    e2 = Engine("[rules.fever]\nclear_hold_s = 0\n")
    e2.feed(morning_check(None, T0, ("fever",)), at=T0)
    assert [a.kind for a in e2.run(T0)] == ["open"]
