"""Webhook mapping files: refused with file, line and field; secrets never inline."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest_server.ingest.webhook import MappingFileError, load_mapping, load_mappings

GOOD = """
[source]
name = "acme"
auth = "shared-secret"
header = "X-Acme-Token"
secret_file = "acme.secret"

[[events]]
device_id = "$.sn"
school_id = "s1"
kind = "card_reader"
type = "card.tap"
ts = "$.time"
event_id = "$.id"
"""


def write(tmp_path: Path, text: str, name: str = "acme.toml") -> Path:
    (tmp_path / "acme.secret").write_text("s" * 20)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_file_loads_and_authenticates(tmp_path: Path) -> None:
    mapping = load_mapping(write(tmp_path, GOOD))
    assert mapping.name == "acme"
    assert mapping.authenticate({"x-acme-token": "s" * 20}, b"{}")
    assert not mapping.authenticate({"x-acme-token": "s" * 19}, b"{}")
    assert not mapping.authenticate({}, b"{}")


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (
            ('event_id = "$.id"', 'seq = "$.n"\nevent_id = "$.id"'),
            "events[0]: give exactly one of seq",
        ),
        (('type = "card.tap"', 'type = "card.nope"'), "not a registered event type"),
        (('auth = "shared-secret"', 'auth = "basic"'), ":4: $.source.auth: Invalid enum value"),
        (('ts = "$.time"', 'ts = "$.time"\nsurprise = 1'), "unknown field `surprise`"),
        (("each", "each"), None),
        (
            ('secret_file = "acme.secret"', 'secret_file = "missing"'),
            "source.secret_file: cannot read",
        ),
        (('kind = "card_reader"', "kind = "), "Invalid value"),
        (('ts = "$.time"', 'ts = "$.a[*]"'), "[*] is allowed only in 'each'"),
    ],
)
def test_a_bad_file_is_refused_naming_file_line_field(
    tmp_path: Path, change: tuple[str, str], expect: str | None
) -> None:
    text = GOOD.replace(*change)
    if expect is None:
        load_mapping(write(tmp_path, text))
        return
    with pytest.raises(MappingFileError) as err:
        load_mapping(write(tmp_path, text))
    assert str(err.value).startswith(str(tmp_path / "acme.toml")), err.value
    assert expect in str(err.value), err.value


def test_a_short_secret_and_a_source_mapped_twice_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    (tmp_path / "acme.secret").write_text("short")
    with pytest.raises(MappingFileError, match="at least 16 bytes"):
        load_mapping(path)
    (tmp_path / "acme.secret").write_text("s" * 20)
    write(tmp_path, GOOD, "again.toml")
    with pytest.raises(MappingFileError, match="'acme' is mapped already"):
        load_mappings([tmp_path])
