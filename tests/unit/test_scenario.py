"""Scenario files: typed decoding, errors that name the field and line, the day's rhythm."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.events import DeviceKind
from simulators.fleet.events import MAKERS, keyed_hasher, register_maker
from simulators.fleet.runner import device_specs
from simulators.fleet.scenario import DEFAULT_KINDS, ScenarioError, load, parse, rate_factor

SCENARIOS = sorted((Path(__file__).parents[2] / "deploy" / "scenarios").glob("*.toml"))
GOOD = """
name = "t"
start = "07:30"
end = "08:30"
speed = 60

[[schools]]
id = "s1"
rooms = 2
devices = { card_reader = 1, env_sensor = 2 }
"""


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_shipped_scenarios_load(path: Path) -> None:
    s = load(path)
    assert device_specs(s)
    assert s.wall_seconds > 0


def test_device_counts_and_ids() -> None:
    specs = device_specs(parse(GOOD))
    assert len(specs) == 6
    assert {d.id for d in specs} >= {"s1-cr-r001-1", "s1-env-r002-2"}
    assert parse(GOOD).wall_seconds == 60


def test_sizes_of_the_shipped_districts() -> None:
    by_name = {p.stem: len(device_specs(load(p))) for p in SCENARIOS}
    assert by_name["district-50"] == 50
    assert by_name["district-1000"] == 1000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("rooms = 2", "s.toml:9: schools[0].rooms: Expected `int`"),
        ("rooms = 0", "s.toml:9: schools[0].rooms: Expected `int` >= 1"),
        ("devices = { card_reader = 1, env_sensor = 2 }", "devices"),
        ('end = "08:30"', "s.toml:4: end: Expected `str` matching"),
    ],
)
def test_errors_name_the_field_and_line(change: str, message: str) -> None:
    bad = {
        "rooms = 2": 'rooms = "two"',
        "rooms = 0": "rooms = 0",
        "devices = { card_reader = 1, env_sensor = 2 }": "devices = { toaster = 1 }",
        'end = "08:30"': 'end = "8.30"',
    }[change]
    text = GOOD.replace("rooms = 2" if change == "rooms = 0" else change, bad)
    with pytest.raises(ScenarioError) as err:
        parse(text, "s.toml")
    assert message in str(err.value)


def test_unknown_key_and_bad_toml_are_named() -> None:
    with pytest.raises(ScenarioError, match=r"s.toml:7: schools\[0\]: .*unknown field `speeed`"):
        parse(GOOD + "\nspeeed = 3\n", "s.toml")  # after [[schools]]: belongs to it
    with pytest.raises(ScenarioError, match="not valid TOML"):
        parse("name = ", "s.toml")


def test_semantic_errors() -> None:
    with pytest.raises(ScenarioError, match="end: must be after start"):
        parse(GOOD.replace('end = "08:30"', 'end = "07:00"'), "s.toml")
    with pytest.raises(ScenarioError, match=r"faults\[0\].at: 09:00 is after the scenario ends"):
        parse(GOOD + '[[faults]]\nat = "09:00"\naction = "broker_kill"\n', "s.toml")
    with pytest.raises(ScenarioError, match=r"unknown event type 'no\.such'"):
        parse(GOOD + '[kinds.env_sensor]\nevent_types = ["no.such"]\nper_hour = 1\n', "s.toml")
    with pytest.raises(ScenarioError, match=r"faults\[0\].action"):
        parse(GOOD + '[[faults]]\nat = "08:00"\naction = "unplug_the_sun"\n', "s.toml")


def test_morning_attendance_burst() -> None:
    card = DEFAULT_KINDS[DeviceKind.CARD_READER]
    assert rate_factor(card, 7 * 3600 + 45 * 60) == 40  # 07:45
    assert rate_factor(card, 10 * 3600 + 10 * 60) == 1  # mid-lesson
    assert rate_factor(card, 10 * 3600 + 50 * 60) == 4  # break


def test_every_default_event_type_has_valid_data() -> None:
    from schemas import events

    h = keyed_hasher(b"k" * 16)
    for profile in DEFAULT_KINDS.values():
        for et in profile.event_types:
            data = MAKERS[et](7, "dev-1", h)
            assert isinstance(data, events.get(et).data)  # type: ignore[union-attr]


def test_card_uids_leave_only_hashed() -> None:
    data = MAKERS["card.tap"](1, "dev-1", keyed_hasher(b"k" * 16))
    assert len(data.uid_hash) == 64  # type: ignore[attr-defined]
    assert data.uid is None  # type: ignore[attr-defined]


def test_kind_hook_refuses_silent_replacement() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_maker("library.loan", MAKERS["library.loan"])
    register_maker("library.loan", MAKERS["library.loan"], replace=True)


DISTRICT = Path(__file__).parents[2] / "deploy" / "scenarios" / "district-805.toml"


def test_district_805_is_the_field_mix() -> None:
    """805 schools, 5,553 smart classrooms (four devices each), seven devices per school."""
    s = load(DISTRICT)
    specs = device_specs(s)
    assert len(s.all_schools) == 805
    assert sum(school.rooms for school in s.all_schools) == 5553
    assert len(specs) == 5553 * 4 + 805 * 7 == 27_847
    assert len({d.id for d in specs}) == len(specs)
    assert "s805-lib-r000-1" in {d.id for d in specs}
    assert s.health_s == 30
    assert len(specs) / s.layout.workers < 10_000  # each worker well under 20,000 open files


def test_district_805_morning_rush() -> None:
    """About a million taps at the card readers in 07:30-08:00, peak four times the mean."""
    s = load(DISTRICT)
    prof = s.profile(DeviceKind.CARD_READER)
    assert prof is not None
    readers = sum(d.kind is DeviceKind.CARD_READER for d in device_specs(s))
    start = 7 * 3600 + 30 * 60
    per_min = [prof.per_hour * rate_factor(prof, start + 60 * m + 30) / 60 for m in range(30)]
    taps = readers * sum(per_min)
    assert 950_000 < taps < 1_050_000
    mean = sum(per_min) / len(per_min)
    assert max(per_min) == pytest.approx(4 * mean)


def test_school_groups_expand_and_clash() -> None:
    text = """
name = "g"
[[school_groups]]
prefix = "g"
count = 3
rooms = 2
devices = { env_sensor = 1 }
school_devices = { access_gate = 2 }
"""
    s = parse(text)
    assert [x.id for x in s.all_schools] == ["g001", "g002", "g003"]
    assert len(device_specs(s)) == 3 * (2 + 2)
    clash = text + '\n[[schools]]\nid = "g002"\nrooms = 1\ndevices = { env_sensor = 1 }\n'
    with pytest.raises(ScenarioError, match="school ids must be unique"):
        parse(clash)
    with pytest.raises(ScenarioError, match="at least one school"):
        parse('name = "empty"\n')
    with pytest.raises(ScenarioError, match="health_s"):
        parse(text + "health_s = 0.5\n")
    with pytest.raises(ScenarioError, match=r"layout\.workers"):
        parse(text + "[layout]\nworkers = 0\n")


def test_health_events_are_valid() -> None:
    from schemas import events as ev

    data = MAKERS["agent.health"](3, "d1", keyed_hasher(b"k"))
    et = ev.get("agent.health")
    assert et is not None
    assert isinstance(data, et.data)
