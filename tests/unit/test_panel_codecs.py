"""The panel profiles' sans-I/O codecs and the change tracker, with bytes alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.base import DriverError
from device_drivers.codecs.panel import (
    CMD_INPUT,
    CMD_POWER,
    OP_REFUSED,
    OP_REPLY,
    BoardTracker,
    InputReply,
    MaxhubCodec,
    PanelItem,
    PowerReply,
    Refused,
    Rejected,
    SmartCodec,
    maxhub_frame,
)
from device_drivers.panel import parse_options
from schemas.events import BoardInput, BoardPower


def feed_bytewise(codec: SmartCodec | MaxhubCodec, data: bytes) -> list[PanelItem]:
    out: list[PanelItem] = []
    for i in range(len(data)):
        out += codec.feed(data[i : i + 1])
    return out


# --- SMART ---------------------------------------------------------------------------------


def test_smart_queries_are_cr_terminated_ascii() -> None:
    codec = SmartCodec()
    assert codec.power_query == b"get powerstate\r"
    assert codec.input_query == b"get input\r"
    assert codec.default_baudrate == 19200


@pytest.mark.parametrize(
    ("reply", "state"),
    [
        (b"powerstate=on", "on"),
        (b"POWERSTATE = ON", "on"),
        (b"powerstate=updateon", "on"),
        (b"powerstate=ready", "off"),
        (b"powerstate=updateready", "off"),
        (b"powerstate=standby", "standby"),
        (b"powerstate=powersave", "standby"),
    ],
)
def test_smart_power_values(reply: bytes, state: str) -> None:
    assert SmartCodec().feed(reply + b"\r\n>") == [PowerReply(state)]  # type: ignore[arg-type]


def test_smart_replies_with_prompts_split_anywhere() -> None:
    stream = b"powerstate=on\r\n>input=HDMI1\r\n>volume=55\r\n>\r\n>input = OPS\r\n>"
    expected = [PowerReply("on"), InputReply("hdmi1"), InputReply("ops")]
    assert SmartCodec().feed(stream) == expected
    assert feed_bytewise(SmartCodec(), stream) == expected


def test_smart_refusals_and_garbage() -> None:
    items = SmartCodec().feed(
        b"invalid cmd: getinput\r\n>p\x00w\xfer#\r\n>powerstate=sleepy\r\n>hello\r\n"
        b"input=hdmi 1\r\n>powerstate=on\r\n"
    )
    assert items == [
        Refused("invalid cmd: getinput"),
        Rejected("garbage", b">p\x00w\xfer#"),
        Rejected("bad_value", b">powerstate=sleepy"),
        Rejected("garbage", b">hello"),
        Rejected("bad_value", b"input=hdmi 1"),
        PowerReply("on"),
    ]


def test_smart_overlong_line_is_rejected_once_and_parsing_resumes() -> None:
    codec = SmartCodec()
    items = codec.feed(b"x" * 500) + codec.feed(b"y" * 50 + b"\r\npowerstate=ready\r\n")
    assert [type(i) for i in items] == [Rejected, PowerReply]
    assert isinstance(items[0], Rejected)
    assert items[0].reason == "overlong"
    assert items[1] == PowerReply("off")


@given(st.binary(max_size=400))
def test_smart_never_raises(data: bytes) -> None:
    codec = SmartCodec()
    codec.feed(data)
    assert codec.feed(b"\r\npowerstate=on\r\n")[-1] == PowerReply("on")


# --- MAXHUB ----------------------------------------------------------------------------------


def test_maxhub_frame_layout() -> None:
    # A6 | id | len | op | cmd | data | sum(id..data) | 0D
    assert maxhub_frame(1, 0x47, 0x50) == bytes([0xA6, 0x01, 0x02, 0x47, 0x50, 0x9A, 0x0D])
    assert MaxhubCodec().power_query == maxhub_frame(1, 0x47, CMD_POWER)
    assert MaxhubCodec(machine_id=7).input_query[1] == 7
    assert MaxhubCodec().default_baudrate == 9600


def reply(cmd: int, value: int, machine_id: int = 1) -> bytes:
    return maxhub_frame(machine_id, OP_REPLY, cmd, bytes([value]))


def test_maxhub_replies() -> None:
    stream = (
        reply(CMD_POWER, 1)
        + reply(CMD_INPUT, 2)
        + reply(CMD_POWER, 0)
        + reply(CMD_POWER, 2)
        + reply(CMD_INPUT, 0x42)
        + maxhub_frame(1, OP_REFUSED, CMD_INPUT, b"\x02")
    )
    expected = [
        PowerReply("on"),
        InputReply("hdmi2"),
        PowerReply("off"),
        PowerReply("standby"),
        InputReply("input-0x42"),
        Refused("not available in this power state"),
    ]
    assert MaxhubCodec().feed(stream) == expected
    assert feed_bytewise(MaxhubCodec(), stream) == expected


def test_maxhub_bad_frames_are_rejected_and_the_next_good_one_parsed() -> None:
    good = reply(CMD_POWER, 1)
    bad_sum = good[:-2] + bytes([good[-2] ^ 0xFF, 0x0D])
    bad_end = good[:-1] + b"\x0a"
    bad_len = bytes([0xA6, 0x01, 0x40])
    items = MaxhubCodec().feed(b"\x00junk" + good + bad_sum + good + bad_end + bad_len + good)
    assert [i.reason if isinstance(i, Rejected) else i for i in items] == [
        "junk",
        PowerReply("on"),
        "bad_checksum",
        PowerReply("on"),
        "bad_end",
        "bad_length",
        PowerReply("on"),
    ]


def test_maxhub_wrong_id_and_unknown_values() -> None:
    items = MaxhubCodec().feed(
        reply(CMD_POWER, 1, machine_id=2)
        + reply(CMD_POWER, 9)
        + maxhub_frame(1, OP_REPLY, 0x33, b"\x01")
        + maxhub_frame(1, OP_REPLY, CMD_POWER, b"\x01\x02")
    )
    assert [i.reason for i in items if isinstance(i, Rejected)] == [
        "wrong_id",
        "bad_value",
        "bad_value",
        "bad_value",
    ]


@given(st.binary(max_size=300), st.binary(max_size=40))
def test_maxhub_never_raises_and_recovers(noise: bytes, more: bytes) -> None:
    codec = MaxhubCodec()
    codec.feed(noise)
    codec.feed(more)
    # a stuck partial frame costs at most a couple of good frames, never more
    items = codec.feed(reply(CMD_POWER, 1) * 3)
    assert PowerReply("on") in items


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2)), max_size=20))
def test_maxhub_keeps_every_good_frame_between_corrupt_ones(frames: list[tuple[bool, int]]) -> None:
    stream = b""
    for corrupt, value in frames:
        f = reply(CMD_POWER, value)
        stream += f[:-2] + bytes([(f[-2] + 1) % 256, 0x0D]) if corrupt else f
    items = MaxhubCodec().feed(stream)
    goods = [i for i in items if isinstance(i, PowerReply)]
    assert len(goods) == sum(not c for c, _ in frames)


# --- change tracking and options -------------------------------------------------------------


def test_tracker_reports_first_observation_and_changes_only() -> None:
    t = BoardTracker()
    assert t.see_power("on") == BoardPower(state="on", previous="unknown")
    assert t.see_power("on") is None
    assert t.see_power("standby") == BoardPower(state="standby", previous="on")
    assert t.see_input("hdmi1") == BoardInput(source="hdmi1", previous=None)
    assert t.see_input("hdmi1") is None
    assert t.see_input("ops") == BoardInput(source="ops", previous="hdmi1")


def test_options_defaults_per_profile() -> None:
    assert parse_options("b", {"port": "/dev/ttyS0"}).speed == 19200
    assert parse_options("b", {"port": "x", "profile": "maxhub"}).speed == 9600
    assert parse_options("b", {"port": "x", "baudrate": 115200}).speed == 115200
    assert parse_options("b", {"type": "panel", "name": "b", "port": "x"}).poll_s == 2.0
    with pytest.raises(DriverError, match="profile"):
        parse_options("b", {"port": "x", "profile": "lg"})
    with pytest.raises(DriverError, match="unknown field"):
        parse_options("b", {"port": "x", "pol_s": 1})
