"""Device profiles: the shipped ones against the hand-written codecs, checksums, bad files.

Checksum vectors: CRC-16/MODBUS of ASCII "123456789" is 0x4B37 (the catalogue check value in
the CRC RevEng catalogue, "CRC-16/MODBUS"); the Modbus RTU read request 01 03 00 00 00 01 is
sent with CRC bytes 84 0A (Modbus over serial line spec V1.02, CRC low byte first).
MAXHUB V6 power frames: 3A 30 31 53 30 30 30 33 0D is power on (MAXHUB control-code table as
summarised at https://ai4av.net/devices/maxhub/maxhub_maxhub_series).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from device_drivers.base import DriverError
from device_drivers.codecs.panel import (
    CMD_INPUT,
    CMD_POWER,
    OP_REFUSED,
    OP_REPLY,
    MaxhubCodec,
    SmartCodec,
    maxhub_frame,
)
from device_drivers.codecs.profile import (
    Observed,
    ProfileError,
    Refused,
    Rejected,
    checksum,
    load_profile,
    parse_profile,
    shipped,
)
from device_drivers.panel import parse_options


def test_shipped_profiles_load() -> None:
    assert {"smart", "maxhub", "maxhub-v6", "extron-sis"} <= set(shipped())
    for name in shipped():
        assert load_profile(name).name == name


def test_checksums_against_published_vectors() -> None:
    assert checksum("crc16-modbus", b"123456789") == bytes([0x37, 0x4B])
    assert checksum("crc16-modbus", bytes.fromhex("010300000001")) == bytes.fromhex("840A")
    assert checksum("sum8", bytes.fromhex("01024750")) == bytes([0x9A])
    assert checksum("xor8", bytes.fromhex("0102FF")) == bytes([0xFC])


def test_smart_profile_reads_what_the_hand_written_codec_reads() -> None:
    stream = (
        b"powerstate=on\r\n>input=HDMI1\r\n>volume=55\r\n>\r\n>input = OPS\r\n>"
        b"POWERSTATE = READY\r\n>powerstate=powersave\r\n>invalid cmd: getinput\r\n>"
    )
    profile = load_profile("smart")
    assert profile.query("power") == SmartCodec.power_query
    assert profile.query("input") == SmartCodec.input_query
    items = profile.codec().feed(stream)
    got = [(i.event, i.value) for i in items if isinstance(i, Observed)]
    assert got == [
        ("board.power", "on"),
        ("board.input", "hdmi1"),
        ("board.input", "ops"),
        ("board.power", "off"),
        ("board.power", "standby"),
    ]
    assert [i.detail for i in items if isinstance(i, Refused)] == ["invalid cmd: getinput"]
    bad = profile.codec().feed(b"powerstate=sleepy\r\ninput=hdmi 1\r\np\x00w\xfe\r\n")
    assert [i.reason for i in bad if isinstance(i, Rejected)] == [
        "bad_value",
        "garbage",
        "garbage",
    ]


def test_maxhub_profile_frames_match_the_hand_written_codec() -> None:
    for machine in (1, 7, 0xFE):
        profile = load_profile("maxhub").with_variables({"id": machine})
        codec = MaxhubCodec(machine)
        assert profile.query("power") == codec.power_query
        assert profile.query("input") == codec.input_query


def test_maxhub_profile_replies_refusals_and_faults() -> None:
    def reply(cmd: int, value: int, machine: int = 1, op: int = OP_REPLY) -> bytes:
        return maxhub_frame(machine, op, cmd, bytes([value]))

    bad_sum = bytearray(reply(CMD_POWER, 1))
    bad_sum[-2] ^= 0xFF
    stream = (
        reply(CMD_POWER, 1)
        + b"\x00\x01junk"
        + bytes(bad_sum)
        + reply(CMD_INPUT, 2)
        + reply(CMD_INPUT, 0x42)
        + reply(CMD_INPUT, 2, machine=9)
        + reply(CMD_INPUT, 2, op=OP_REFUSED)
    )
    codec = load_profile("maxhub").codec()
    items = [i for n in range(len(stream)) for i in codec.feed(stream[n : n + 1])]
    summary = [
        (i.event, i.value)
        if isinstance(i, Observed)
        else type(i).__name__ + ":" + (i.detail if isinstance(i, Refused) else i.reason)
        for i in items
    ]
    assert summary == [
        ("board.power", "on"),
        "Rejected:junk",
        "Rejected:bad_checksum",
        ("board.input", "hdmi2"),
        ("board.input", "input-0x42"),
        "Rejected:wrong_id",
        "Refused:not available in this power state",
    ]


def test_maxhub_v6_power_frames() -> None:
    profile = load_profile("maxhub-v6")
    assert profile.spec.transport.tcp_port == 4664
    assert profile.query("power") == bytes.fromhex("3A 30 31 47 30 30 30 30 0D")
    items = profile.codec().feed(bytes.fromhex("3A 30 31 72 30 30 30 33 0D"))
    assert items == [Observed("board.power", "state", "on", bytes.fromhex("3A303172303030330D"))]


def test_panel_options_name_a_profile_by_path(tmp_path: Path) -> None:
    own = tmp_path / "own.toml"
    own.write_bytes(_shipped("maxhub").read_bytes())
    s = parse_options("b", {"port": "x", "profile": str(own), "machine_id": 3})
    assert s.profile.query("power")[1] == 3
    assert s.speed == 9600


def _shipped(name: str) -> Path:
    return (
        Path(__file__).resolve().parents[2]
        / "device_drivers"
        / "codecs"
        / "profiles"
        / f"{name}.toml"
    )


# --- bad profiles: refused with file, line and field ----------------------------------------

GOOD = """\
[profile]
name = "acme"

[text]
terminator = "\\r"

[commands]
power = { text = "PWR?" }

[[poll]]
command = "power"
expect = "board.power"

[[replies]]
regex = 'PWR=(\\d)'
event = "board.power"
field = "state"
map = { "1" = "on", "0" = "off" }
"""


def refused(text: str) -> ProfileError:
    with pytest.raises(ProfileError) as caught:
        parse_profile(text.encode(), "acme.toml")
    return caught.value


def test_the_good_one_loads() -> None:
    p = parse_profile(GOOD.encode(), "acme.toml")
    assert p.codec().feed(b"PWR=1\r") == [Observed("board.power", "state", "on", b"PWR=1")]


@pytest.mark.parametrize(
    ("change", "line", "field", "words"),
    [
        # a TOML syntax error: tomllib's own line
        (("map = {", "map = {{"), 18, "", "TOML"),
        # a schema type error inside an array of tables
        (('expect = "board.power"', "expect = 5"), 12, "poll[0].expect", "Expected `str`"),
        # an unknown key, located by its own line
        (('field = "state"', 'field = "state"\nfeild = "x"'), 18, "replies[0].feild", "unknown"),
        # an unknown event type (our check, not msgspec's)
        (('event = "board.power"', 'event = "board.pwr"'), 16, "replies[0].event", "board.pwr"),
        # a mapped value the event's schema refuses
        (('"0" = "off"', '"0" = "asleep"'), 18, "replies[0].map.0", "asleep"),
        # a regex that does not compile
        ("regex = 'PWR=(\\d)'", 15, "replies[0].regex", "bad regex"),
        # a poll naming a command that is not there
        (('command = "power"', 'command = "pwr"'), 11, "poll[0].command", "no command"),
        # a missing required section
        (('[profile]\nname = "acme"\n', ""), None, "", "profile"),
    ],
)
def test_bad_profiles_name_file_line_and_field(
    change: tuple[str, str] | str, line: int | None, field: str, words: str
) -> None:
    if isinstance(change, str):
        text = GOOD.replace(change, "regex = 'PWR=(\\d'")
    else:
        assert change[0] in GOOD
        text = GOOD.replace(change[0], change[1], 1)
    err = refused(text)
    assert err.file == "acme.toml"
    assert err.line == line, err
    assert err.field == field, err
    assert words in str(err), err
    assert str(err).startswith(f"acme.toml:{line}:" if line else "acme.toml:")


def test_binary_profile_errors() -> None:
    binary = """\
[profile]
name = "x"

[binary]
start = "AA"
size = 4

[commands]
power = { hex = "AA 0G" }

[[poll]]
command = "power"
expect = "board.power"

[[replies]]
match = { 1 = "01" }
value = { offset = 2 }
event = "board.power"
field = "state"
"""
    err = refused(binary)
    assert (err.line, err.field) == (9, "commands.power.hex")
    assert "'0G' is not a hex byte" in str(err)
    err = refused(binary.replace("AA 0G", "BB 01"))
    assert (err.line, err.field) == (9, "commands.power.hex")
    assert "start bytes" in str(err)


def test_a_panel_driver_with_a_bad_profile_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('event = "board.power"', 'event = "board.pwr"'))
    with pytest.raises(DriverError, match=rf"{bad}:16: replies\[0\]\.event"):
        parse_options("b", {"port": "x", "profile": str(bad)})
    with pytest.raises(DriverError, match="no shipped profile"):
        parse_options("b", {"port": "x", "profile": "lg"})
    with pytest.raises(DriverError, match="cannot read"):
        parse_options("b", {"port": "x", "profile": str(tmp_path / "none.toml")})
