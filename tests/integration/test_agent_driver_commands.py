"""``restart_driver``, ``start_recording`` / ``stop_recording`` and ``set_sample_rate`` through a
real Mosquitto, on a simulated SIS recorder (pty) and a synthetic sensor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device_drivers.base import DriverState
from device_drivers.recorder import RecorderPoller
from edge_agent.agent import Agent
from edge_agent.config import load_config
from schemas.events import RecorderStatus
from schemas.state import CommandAck
from simulators.harness import Mosquitto
from simulators.recorder import SmpRecorder
from tests.agent_server import DeviceServer, until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_task_left_behind")]
SCHOOL, DEVICE = "s001", "ru-0101"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RecorderPoller, "BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(RecorderPoller, "BACKOFF_MAX_S", 0.2)


@pytest.fixture
def server(mosquitto: Mosquitto) -> Iterator[DeviceServer]:
    s = DeviceServer(mosquitto, SCHOOL, DEVICE)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def smp(tmp_path: Path) -> Iterator[SmpRecorder]:
    with SmpRecorder(tmp_path / "ttySMP", free_mb=2048) as sim:
        yield sim


@pytest.fixture
def config(tmp_path: Path, mosquitto: Mosquitto, smp: SmpRecorder) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[device]
id = "{DEVICE}"
school_id = "{SCHOOL}"
kind = "recording_unit"
[outbox]
path = "outbox.db"
[mqtt]
url = "{mosquitto.url}"
[publish]
backoff_initial_s = 0.1
backoff_max_s = 0.5
[health]
interval_s = 0
[[drivers]]
type = "recorder"
name = "rec"
port = "{smp.port}"
poll_s = 0.5
timeout_s = 0.5
report_s = 0
[[drivers]]
type = "synthetic"
name = "env"
rate = 5
[[drivers]]
type = "em4100"
name = "badge"
port = "{tmp_path / "no-reader"}"
""")
    return path


async def ask(server: DeviceServer, cmd_id: str, name: str, /, **args: object) -> CommandAck:
    server.send_command(cmd_id, name, **args)
    ack: CommandAck = await until(lambda: server.ack(cmd_id), f"the ack of {cmd_id}")
    return ack


async def test_driver_commands(config: Path, server: DeviceServer, smp: SmpRecorder) -> None:
    async with Agent(load_config(config)) as agent:
        await until(lambda: agent.drivers()[0].state == DriverState.OK, "the recorder")

        started = await ask(server, "r-1", "start_recording")
        assert started == CommandAck(id="r-1", status="ok", detail={"state": {"rec": "record"}})
        assert smp.state == "record"
        assert b"\x1bY1RCDR" in smp.received
        await until(
            lambda: server.of("recorder.status", lambda d: d.state == "record"),
            "the record state upstream",
        )
        stopped = await ask(server, "r-2", "stop_recording", driver="rec")
        assert (stopped.status, stopped.detail, smp.state) == (
            "ok",
            {"state": {"rec": "stop"}},
            "stop",
        )
        not_a_recorder = await ask(server, "r-3", "stop_recording", driver="env")
        assert not_a_recorder.status == "rejected"
        assert not_a_recorder.detail == "no recorder named 'env' (recorders here: rec)"
        smp.refuse_recording("E14")
        refused = await ask(server, "r-4", "start_recording")
        assert refused.status == "error"
        assert refused.detail == "rec: the recorder refused: E14 (not valid for this configuration)"
        assert smp.state == "stop"

        env = agent.drivers()[1]
        restarted = await ask(server, "d-1", "restart_driver", name="env")
        assert restarted == CommandAck(id="d-1", status="ok", detail={"restarted": "env"})
        assert agent.drivers()[1] is not env
        assert agent.status().drivers[1].restarts == 1
        unknown = await ask(server, "d-2", "restart_driver", name="gate")
        assert unknown.status == "rejected"
        assert unknown.detail == "no driver named 'gate' (drivers here: rec, env, badge)"

        faster = await ask(server, "s-1", "set_sample_rate", driver="env", interval_s=0.02)
        assert faster == CommandAck(id="s-1", status="ok", detail={"driver": "env", "rate": 50.0})
        assert agent.config.drivers[1].options["rate"] == 50.0
        seen = len(server.of("env.reading"))
        await until(lambda: len(server.of("env.reading")) >= seen + 50, "readings at 50/s", 5)
        polls = await ask(server, "s-2", "set_sample_rate", driver="rec", interval_s=0.2)
        assert (polls.status, polls.detail) == ("ok", {"driver": "rec", "poll_s": 0.2})
        await until(lambda: agent.drivers()[0].state == DriverState.OK, "the recorder again")
        assert getattr(agent.drivers()[0], "options").poll_s == 0.2  # noqa: B009 - a Driver

        rejects = {
            "s-3": {"driver": "badge", "interval_s": 1},
            "s-4": {"driver": "env", "interval_s": 0},
            "s-5": {"driver": "nope", "interval_s": 1},
            "s-6": {"driver": "env"},
        }
        for cmd_id, args in rejects.items():
            server.send_command(cmd_id, "set_sample_rate", **args)
        await until(lambda: server.ack("s-6"), "the last rejection")
        details = {i: server.ack(i) for i in rejects}
        assert all(a is not None and a.status == "rejected" for a in details.values())
        assert details["s-3"].detail.startswith("driver 'badge' is a em4100 driver, which has no")  # type: ignore[union-attr]
        assert "interval_s" in details["s-4"].detail  # type: ignore[union-attr]
        assert details["s-5"].detail.startswith("no driver named 'nope'")  # type: ignore[union-attr]
        assert "interval_s" in details["s-6"].detail  # type: ignore[union-attr]
        assert isinstance(server.of("recorder.status")[0], RecorderStatus)
