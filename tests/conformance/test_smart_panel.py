"""SMART Board displays' RS-232 control: command syntax, terminator, replies.

Source: [SMART] SMART Technologies, "SMART Board MX series" user's guide, Appendix D "Managing
SMART Board MX series displays using RS-232" (smarttech.com/kb/171555), and the 6000/7000
series guides (kb/171164, kb/171414): 19200 baud 8N1; "Terminate all commands with a carriage
return"; a ``>`` prompt after every response; ``get powerstate`` -> ``powerstate=on|ready|
updateon|updateready``; ``set powerstate=on|ready``; ``get input`` -> ``input=HDMI1`` (OPS,
OPSCC, HDMI1-3, VGA, ANDROID); an unknown command -> ``invalid cmd=<the command>`` then
``>``; no answer at all in a low power state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device_drivers.codecs.panel import InputReply, PowerReply, Refused, SmartCodec
from simulators.panel import SmartPanel


@pytest.fixture
def panel(tmp_path: Path) -> Iterator[SmartPanel]:
    with SmartPanel(tmp_path / "ttyPANEL") as sim:
        yield sim


def ask(panel: SmartPanel, command: bytes) -> bytes:
    """What the simulated display answers to ``command`` (its session, without the pty)."""
    return panel._session()(command)


def test_driver_commands_are_the_documented_ones() -> None:
    """[SMART] the queries, terminated with a carriage return, at 19200 baud."""
    codec = SmartCodec()
    assert codec.power_query == b"get powerstate\r"
    assert codec.input_query == b"get input\r"
    assert codec.default_baudrate == 19200


def test_driver_reads_the_documented_replies() -> None:
    """[SMART] powerstate values on/ready/updateon/updateready, input=HDMI1, invalid cmd=."""
    replies = (
        b">powerstate=on\r\n>powerstate=ready\r\n>powerstate=updateon\r\n"
        b">powerstate=updateready\r\n>input=HDMI1\r\n>invalid cmd=set vol ume=65\r\n>"
    )
    assert SmartCodec().feed(replies) == [
        PowerReply("on"),
        PowerReply("off"),
        PowerReply("on"),
        PowerReply("off"),
        InputReply("hdmi1"),
        Refused("invalid cmd=set vol ume=65"),
    ]


def test_simulator_answers_as_documented(panel: SmartPanel) -> None:
    """[SMART] the simulated display's replies to the documented commands."""
    assert ask(panel, b"get powerstate\r") == b"powerstate=on\r\n>"
    assert ask(panel, b"get input\r") == b"input=HDMI1\r\n>"
    assert ask(panel, b"set powerstate=ready\r") == b"powerstate=ready\r\n>"
    assert ask(panel, b"get powerstate\r") == b"powerstate=ready\r\n>"


def test_simulator_refuses_an_unknown_command_as_documented(panel: SmartPanel) -> None:
    """[SMART] ``set vol ume=65`` -> ``invalid cmd=set vol ume=65``, then the prompt."""
    assert ask(panel, b"set vol ume=65\r") == b"invalid cmd=set vol ume=65\r\n>"


def test_simulator_is_silent_in_a_low_power_state(panel: SmartPanel) -> None:
    """[SMART] "When the screen is in a low power state, it doesn't respond"."""
    panel.set_power("standby")
    assert ask(panel, b"get powerstate\r") == b""
