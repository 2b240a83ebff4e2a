"""Extron SIS control of SMP-style recorders: commands, replies, error responses.

Sources:
- [SMP] Extron SMP 351 user guide, "SIS Configuration and Control": Esc = 0x1B, commands with
  Esc end with CR (``Esc YRCDR CR`` record status -> ``0``/``1``/``2`` stop/record/pause;
  ``Esc Y1RCDR CR`` start -> ``RcdrY1``; ``Esc 0CV CR`` verbose mode 0 -> ``Vrb0``); replies
  end with CR LF.
- [ERR] Extron programmer's guides, "Error Responses" (e.g. CrossPoint/MAV, SMX guides):
  E01 invalid input number, E10 invalid command, E11 invalid preset, E12 invalid output/port,
  E13 invalid value/parameter, E14 invalid command for this configuration, E17 timeout,
  E22 busy, E24 privilege violation, E25 device not present, E26 maximum connections, E28 bad
  filename.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device_drivers.codecs.recorder import (
    ERRORS,
    START_RECORDING,
    STATUS_QUERY,
    STOP_RECORDING,
    TERSE,
    DeviceError,
    SisCodec,
    StatusReply,
    VerboseAck,
)
from simulators.recorder import SmpRecorder


@pytest.fixture
def smp(tmp_path: Path) -> Iterator[SmpRecorder]:
    with SmpRecorder(tmp_path / "ttySMP") as sim:
        yield sim


def ask(smp: SmpRecorder, command: bytes) -> bytes:
    """The simulated unit's answer (its session, without the pty)."""
    return smp._session()(command)


def test_driver_commands_are_the_documented_ones() -> None:
    """[SMP] Esc-prefixed commands, ended with CR."""
    assert TERSE == b"\x1b0CV\r"
    assert STATUS_QUERY == b"\x1bYRCDR\r"
    assert START_RECORDING == b"\x1bY1RCDR\r"
    assert STOP_RECORDING == b"\x1bY0RCDR\r"


def test_driver_reads_the_documented_replies() -> None:
    """[SMP] ``1`` record, ``RcdrY0`` stopped, ``Vrb0``; [ERR] ``E10``, ``E14``."""
    assert SisCodec().feed(b"1\r\nRcdrY0\r\nVrb0\r\nE10\r\nE14\r\n") == [
        StatusReply("record"),
        StatusReply("stop"),
        VerboseAck(0),
        DeviceError("E10"),
        DeviceError("E14"),
    ]


@pytest.mark.parametrize(
    ("code", "meaning"),
    [
        ("E10", "invalid command"),
        ("E13", "invalid parameter"),
        ("E14", "not valid for this configuration"),
        ("E22", "busy"),
        ("E24", "privilege violation"),
        ("E25", "device not present"),
    ],
)
def test_error_meanings(code: str, meaning: str) -> None:
    """[ERR] the meanings the driver logs for each documented code."""
    assert ERRORS[code] == meaning
    assert DeviceError(code).meaning == meaning


def test_simulator_answers_as_documented(smp: SmpRecorder) -> None:
    """[SMP] the simulated unit's replies, each ended with CR LF; [ERR] E10 for nonsense."""
    assert ask(smp, TERSE) == b"Vrb0\r\n"
    assert ask(smp, STATUS_QUERY) == b"0\r\n"
    assert ask(smp, START_RECORDING) == b"RcdrY1\r\n"
    assert ask(smp, STATUS_QUERY) == b"1\r\n"
    assert ask(smp, b"\x1bXYZZY\r") == b"E10\r\n"
    smp.refuse_recording("E14")
    assert ask(smp, STOP_RECORDING) == b"E14\r\n"
