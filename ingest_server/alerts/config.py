"""The alert rules' parameters: built-in defaults, a district-wide TOML file, per-school overrides.

``ingest-server run --rules FILE`` reads the file once at start; a fault stops the start with the
file, line and field at fault (:class:`RulesError`). The format is described in ``docs/alerts.md``.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.topics import ID_PATTERN, ID_RE

SEVERITIES: Final = ("info", "warning", "critical")
#: The largest rules file read (a district's file is a few KiB).
MAX_FILE_BYTES: Final = 1024 * 1024
#: Schools one file may name (each override table costs a little memory per rule).
MAX_SCHOOLS: Final = 10_000
# \Z, not $ (which also matches before a final newline); [0-9], not \d (any script's digits)
_HHMM_RE: Final = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])\Z")
#: Durations and thresholds are bounded so that arithmetic on them stays meaningful.
_MAX_NUMBER: Final = 1e9

#: Parameters every rule has, with the values a rule starts from unless it says otherwise.
COMMON: Final[dict[str, Any]] = {
    "enabled": True,
    "severity": "warning",
    #: the condition must hold this long before an alert opens
    "for_s": 0.0,
    #: the condition must stay clear this long before the alert resolves by itself
    "clear_hold_s": 300.0,
    #: a re-trigger this soon after an automatic resolution reopens the same alert
    "reopen_window_s": 900.0,
    #: open only within the school's hours (a pending condition opens when they begin)
    "school_hours_only": False,
}

#: Each built-in rule's own parameters and its overrides of :data:`COMMON` (docs/alerts.md).
RULES: Final[dict[str, dict[str, Any]]] = {
    "device_offline": {
        "severity": "critical",
        "silent_s": 900.0,  # no event, health or state for this long
        "for_s": 60.0,  # an offline state (the MQTT will) must last this long
        "clear_hold_s": 60.0,
        "school_hours_only": True,
    },
    "driver_error": {"for_s": 300.0, "clear_hold_s": 120.0},
    "outbox_backlog": {"threshold_s": 900.0, "clear_s": 300.0},
    "clock_skew": {"threshold_s": 5.0, "clear_s": 2.0, "clear_hold_s": 600.0},
    "fever": {"severity": "critical", "threshold_c": 37.3},
    "co2_high": {"threshold_ppm": 1500.0, "clear_ppm": 1200.0, "for_s": 600.0},
    "temperature_out_of_range": {
        "min_c": 16.0,
        "max_c": 30.0,
        "margin_c": 1.0,
        "for_s": 900.0,
    },
    "seq_gap": {"severity": "info", "min_missing": 1.0, "quiet_s": 3600.0, "clear_hold_s": 0.0},
    "quarantine_spike": {
        "threshold": 20.0,
        "window_s": 300.0,
        "quiet_s": 900.0,
        "clear_hold_s": 0.0,
    },
    "recorder_fault": {"min_free_mb": 2048.0, "clear_free_mb": 4096.0},
    "camera_black_or_frozen": {"for_s": 120.0, "clear_hold_s": 60.0},
}


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True, slots=True)
class SchoolHours:
    """When a school is in session, in the district's time zone."""

    days: frozenset[int] = frozenset({1, 2, 3, 4, 5})  # ISO weekdays, Monday = 1
    start: time = time(7, 0)
    end: time = time(18, 0)

    def contains(self, when: datetime) -> bool:
        return when.isoweekday() in self.days and self.start <= when.time() < self.end


@dataclass(frozen=True, slots=True)
class RuleParams:
    """One rule's effective parameters for one school."""

    rule: str
    enabled: bool
    severity: str
    for_s: float
    clear_hold_s: float
    reopen_window_s: float
    school_hours_only: bool
    #: the rule's own numbers (thresholds, windows)
    values: Mapping[str, float]

    def __getitem__(self, name: str) -> float:
        return self.values[name]


def _defaults(rule: str) -> dict[str, Any]:
    return {**COMMON, **RULES[rule]}


def _params(rule: str, merged: Mapping[str, Any]) -> RuleParams:
    values = {k: float(v) for k, v in merged.items() if k not in COMMON}
    return RuleParams(
        rule=rule,
        enabled=bool(merged["enabled"]),
        severity=str(merged["severity"]),
        for_s=float(merged["for_s"]),
        clear_hold_s=float(merged["clear_hold_s"]),
        reopen_window_s=float(merged["reopen_window_s"]),
        school_hours_only=bool(merged["school_hours_only"]),
        values=values,
    )


@dataclass(slots=True)
class RulesConfig:
    """Defaults ← the file's ``[rules.X]`` ← its ``[schools.S.rules.X]``; looked up per school."""

    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo("Asia/Shanghai"))
    hours: SchoolHours = field(default_factory=SchoolHours)
    district: dict[str, dict[str, Any]] = field(default_factory=dict)
    schools: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    school_hours: dict[str, SchoolHours] = field(default_factory=dict)
    source: str = "built-in defaults"
    _cache: dict[tuple[str, str], RuleParams] = field(default_factory=dict)

    def params(self, rule: str, school: str) -> RuleParams:
        """The parameters of ``rule`` at ``school`` (cached: called once per event)."""
        key = (rule, school)
        got = self._cache.get(key)
        if got is None:
            own = self.schools.get(school, {}).get(rule, {})
            got = _params(rule, {**_defaults(rule), **self.district.get(rule, {}), **own})
            if len(self._cache) > 100_000:  # bounded: schools outside the file share defaults
                self._cache.clear()
            self._cache[key] = got
        return got

    def in_hours(self, school: str, at: float) -> bool:
        hours = self.school_hours.get(school, self.hours)
        return hours.contains(datetime.fromtimestamp(at, self.timezone))

    def smallest(self, rule: str, name: str) -> float:
        """The smallest value of a parameter over the district and every school named."""
        values = [self.params(rule, "")[name]]
        values += [self.params(rule, s)[name] for s in self.schools]
        return min(values)


def _line_of(text: str, path: tuple[str, ...]) -> int | None:
    """The line (1-based) where the key ``path`` is set, else its table's header line."""
    table: tuple[str, ...] = ()
    header_line = None
    want_table = path[:-1]
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            table = tuple(p.strip().strip("\"'") for p in line.strip("[]").split("."))
            if table[: len(path)] == path and header_line is None:
                header_line = n
            continue
        key = line.split("=", 1)[0].strip().strip("\"'")
        if "=" in line and table == want_table and key == path[-1]:
            return n
    return header_line


class _Reader:
    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text

    def fail(self, path: tuple[str, ...], message: str) -> RulesError:
        line = _line_of(self.text, path) if path else None
        where = f"{self.name}:{line}" if line else self.name
        return RulesError(f"{where}: {'.'.join(path) or '(top level)'}: {message}")

    def table(self, value: object, path: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a table, got {type(value).__name__}")
        return value

    def number(self, value: object, path: tuple[str, ...]) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, f"must be a number, got {value!r}")
        if not math.isfinite(value) or not 0 <= value <= _MAX_NUMBER:
            raise self.fail(path, f"must be between 0 and {_MAX_NUMBER:.0e}, got {value!r}")
        return float(value)

    def rule(self, rule: str, value: object, path: tuple[str, ...]) -> dict[str, Any]:
        given = self.table(value, path)
        allowed = _defaults(rule)
        out: dict[str, Any] = {}
        for key, v in given.items():
            where = (*path, key)
            if key not in allowed:
                raise self.fail(where, f"unknown parameter; {rule} has {', '.join(allowed)}")
            if key in ("enabled", "school_hours_only"):
                if not isinstance(v, bool):
                    raise self.fail(where, f"must be true or false, got {v!r}")
                out[key] = v
            elif key == "severity":
                if v not in SEVERITIES:
                    raise self.fail(where, f"must be one of {', '.join(SEVERITIES)}, got {v!r}")
                out[key] = v
            else:
                out[key] = self.number(v, where)
        return out

    def rules(self, value: object, path: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        out = {}
        for rule, v in self.table(value, path).items():
            if rule not in RULES:
                raise self.fail((*path, rule), f"unknown rule; the rules are {', '.join(RULES)}")
            out[rule] = self.rule(rule, v, (*path, rule))
        return out

    def hours(self, value: object, path: tuple[str, ...], base: SchoolHours) -> SchoolHours:
        given = self.table(value, path)
        days, start, end = base.days, base.start, base.end
        for key, v in given.items():
            where = (*path, key)
            if key == "days":
                ok = isinstance(v, list) and all(
                    isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 7 for d in v
                )
                if not ok:
                    raise self.fail(where, f"must be a list of ISO weekdays 1-7, got {v!r}")
                days = frozenset(v)
            elif key in ("start", "end"):
                m = _HHMM_RE.match(v) if isinstance(v, str) else None
                if m is None:
                    raise self.fail(where, f'must be a time as "HH:MM", got {v!r}')
                t = time(int(m[1]), int(m[2]))
                start, end = (t, end) if key == "start" else (start, t)
            else:
                raise self.fail(where, "unknown key; school_hours has days, start, end")
        if start >= end:
            raise self.fail((*path, "end"), "must be after start")
        return SchoolHours(days, start, end)


def parse(text: str, name: str = "<rules>") -> RulesConfig:
    """A :class:`RulesConfig` from the TOML ``text`` (``name`` is shown in errors)."""
    r = _Reader(name, text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message carries line and column
        raise RulesError(f"{name}: not valid TOML: {exc}") from None
    cfg = RulesConfig(source=name)
    # schools last: their school_hours start from the district's
    for key, value in sorted(doc.items(), key=lambda kv: kv[0] == "schools"):
        if key == "timezone":
            try:
                cfg.timezone = ZoneInfo(value) if isinstance(value, str) else ZoneInfo("")
            except (ZoneInfoNotFoundError, ValueError):
                raise r.fail(("timezone",), f"unknown time zone {value!r}") from None
        elif key == "school_hours":
            cfg.hours = r.hours(value, (key,), SchoolHours())
        elif key == "rules":
            cfg.district = r.rules(value, (key,))
        elif key == "schools":
            schools = r.table(value, (key,))
            if len(schools) > MAX_SCHOOLS:
                raise r.fail((key,), f"at most {MAX_SCHOOLS} schools, got {len(schools)}")
            for school, body in schools.items():
                where = (key, school)
                if not ID_RE.match(school):
                    raise r.fail(where, f"a school id must match {ID_PATTERN}")
                for part, v in r.table(body, where).items():
                    if part == "rules":
                        cfg.schools[school] = r.rules(v, (*where, part))
                    elif part == "school_hours":
                        cfg.school_hours[school] = r.hours(v, (*where, part), cfg.hours)
                    else:
                        raise r.fail(
                            (*where, part), "unknown key; a school has rules, school_hours"
                        )
        else:
            raise r.fail((key,), "unknown key; the file has timezone, school_hours, rules, schools")
    return cfg


def load(path: Path) -> RulesConfig:
    """Read and check a rules file; :class:`RulesError` names what is wrong."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise RulesError(f"--rules {path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise RulesError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RulesError(f"{path}: not UTF-8") from None
    return parse(text, str(path))
