"""Remote config: applied live, rejected or rolled back, acked on config/ack; real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edge_agent.agent import Agent, config_store_path
from edge_agent.config import load_config
from simulators.harness import Mosquitto
from tests.agent_helpers import spawn
from tests.agent_server import DeviceServer, until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_task_left_behind")]
SCHOOL, DEVICE = "s001", "gw-0101"
ENV = {"type": "synthetic", "name": "env", "event_type": "env.reading", "rate": 20}


@pytest.fixture
def server(mosquitto: Mosquitto) -> Iterator[DeviceServer]:
    s = DeviceServer(mosquitto, SCHOOL, DEVICE)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def config(tmp_path: Path, mosquitto: Mosquitto) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[device]
id = "{DEVICE}"
school_id = "{SCHOOL}"
kind = "gateway"
[outbox]
path = "outbox.db"
[mqtt]
url = "{mosquitto.url}"
[privacy]
hash_key_hex = "{"cd" * 16}"
[publish]
backoff_initial_s = 0.1
backoff_max_s = 0.5
[health]
interval_s = 0
[[drivers]]
type = "synthetic"
name = "env"
event_type = "env.reading"
rate = 20
""")
    return path


@contextlib.asynccontextmanager
async def running(config: Path, server: DeviceServer) -> AsyncIterator[Agent]:
    before = len(server.states)
    async with Agent(load_config(config)) as agent:
        await until(
            lambda: any(s.state == "online" for s in server.states[before:]), "online state"
        )
        yield agent


async def test_a_config_is_applied_live_acked_and_kept_across_restarts(
    config: Path, server: DeviceServer
) -> None:
    taps = {"type": "synthetic", "name": "taps", "event_type": "card.tap", "rate": 20}
    async with running(config, server) as agent:
        env_driver = agent.drivers()[0]
        server.send_config(
            1,
            {"drivers": [ENV, taps], "publish": {"linger_ms": 0}, "outbox": {"max_events": 5000}},
        )
        ack = await until(lambda: server.config_ack(1), "the config ack")
        assert (ack.status, ack.detail) == ("applied", None)
        assert agent.drivers()[0] is env_driver  # unchanged table: not restarted
        assert [d.name for d in agent.drivers()] == ["env", "taps"]
        assert agent.config.publish.linger_ms == 0
        assert agent.publisher.publish.linger_ms == 0
        assert agent.config.outbox_quota.max_events == 5000
        await until(lambda: server.of("card.tap"), "taps from the new driver")
        await until(lambda: server.states[-1].config_version == 1, "config_version in state")
        assert config_store_path(agent.config.outbox_path).stat().st_mode & 0o777 == 0o600
    async with running(config, server) as agent:
        # The stored config runs from the start; the retained v1 arriving again is ignored.
        assert agent.config_version == 1
        assert [d.name for d in agent.drivers()] == ["env", "taps"]
        await until(lambda: server.states[-1].config_version == 1, "config_version after restart")
        # Documents are handled in order, so once v2 is acked the retained v1 has been seen.
        server.send_config(2, {"drivers": [ENV]})
        await until(lambda: server.config_ack(2), "the ack of v2")
        assert [d.name for d in agent.drivers()] == ["env"]
    assert [(a.version, a.status) for a in server.config_acks] == [(1, "applied"), (2, "applied")]


async def test_bad_configs_are_rejected_or_rolled_back_and_the_old_one_keeps_running(
    config: Path, server: DeviceServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Agent, "DRIVER_START_TIMEOUT_S", 1.0)
    recorder = {
        "type": "recorder",
        "name": "rec",
        "port": "/dev/ttyNOSUCH0",
    }  # a node that is not there
    async with running(config, server) as agent:
        env_driver = agent.drivers()[0]
        server.send_config(1, {"mqtt": {"url": "mqtt://elsewhere"}})
        rejected = await until(lambda: server.config_ack(1), "the ack of v1")
        assert rejected.status == "rejected"
        assert rejected.detail is not None
        assert rejected.detail.startswith("config.mqtt: may not be set remotely")

        server.send_config(2, {"drivers": [{**ENV, "rate": "fast"}]})
        bad_option = await until(lambda: server.config_ack(2), "the ack of v2")
        assert bad_option.status == "rejected"
        assert "drivers[0] (env)" in (bad_option.detail or "")
        assert "rate" in (bad_option.detail or "")

        server.send_config(3, {"drivers": [ENV, recorder], "health": {"interval_s": 30}})
        rolled = await until(lambda: server.config_ack(3), "the ack of v3", within=15)
        assert rolled.status == "rolled_back"
        assert "driver rec did not come up in 1 s" in (rolled.detail or "")
        assert "ttyNOSUCH0" in (rolled.detail or "")
        assert [d.name for d in agent.drivers()] == ["env"]
        assert agent.drivers()[0] is env_driver
        assert agent.config.health.interval_s == 0

        server.send_config(4, b'{"version": 4, "config": []}')
        malformed = await until(lambda: server.config_ack(4), "the ack of v4")
        assert malformed.status == "rejected"
        assert (malformed.detail or "").startswith("malformed document")

        seen = len(server.of("env.reading"))
        await until(lambda: len(server.of("env.reading")) > seen + 5, "env readings after all")
        assert agent.config_version is None
        assert not config_store_path(agent.config.outbox_path).exists()
        assert server.states[-1].config_version is None

        server.send_config(5, {"drivers": [{**ENV, "rate": 50}]})  # a good one still applies
        applied = await until(lambda: server.config_ack(5), "the ack of v5")
        assert applied.status == "applied"
        assert agent.drivers()[0] is not env_driver
        server.send_config(4, {"drivers": []})  # older than what runs: ignored
        server.send_config(6, {"drivers": [{**ENV, "rate": 40}]})
        await until(lambda: server.config_ack(6), "the ack of v6")
        assert [a.version for a in server.config_acks] == [1, 2, 3, 4, 5, 6]
        assert [d.name for d in agent.drivers()] == ["env"]


async def test_a_remote_config_may_not_open_urls_files_or_foreign_cameras(
    config: Path, server: DeviceServer, tmp_path: Path
) -> None:
    """A real agent process: what only the local config may set is rejected, the old runs on."""
    with config.open("a") as f:  # the technician's allow-list, in the local file
        f.write('[remote]\ncamera_sources = ["rtsp://cam-203.school.lan/stream1"]\n')
    spied = tmp_path / "spied"
    agent = spawn(config, tmp_path / "agent.log")
    try:

        def running() -> bool:
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()
            return True

        await until(lambda: running() and any(s.state == "online" for s in server.states), "online")
        await until(lambda: len(server.of("env.reading")) >= 3, "env readings")

        door = {"type": "em4100", "name": "door", "port": f"spy:///dev/ttyS0?file={spied}"}
        server.send_config(1, {"drivers": [ENV, door]})
        ack = await until(lambda: running() and server.config_ack(1), "the ack of v1")
        assert ack.status == "rejected"
        detail = ack.detail or ""
        assert detail.startswith("config.drivers[1] (door).port: 'spy:///dev/ttyS0?file=")
        assert "may not be set remotely: a URL: serial ports set remotely are device" in detail

        cam = {"type": "camera", "name": "cam", "source": "rtsp://10.66.0.1/stream"}
        server.send_config(2, {"drivers": [ENV, cam]})
        ack = await until(lambda: running() and server.config_ack(2), "the ack of v2")
        assert ack.status == "rejected"
        assert (ack.detail or "").startswith(
            "config.drivers[1] (cam).source: 'rtsp://10.66.0.1/stream' may not be set remotely: "
            "not in [remote] camera_sources of the local config"
        )

        board = {"type": "board_os", "name": "board", "path": "/etc/shadow"}
        server.send_config(3, {"drivers": [ENV, board], "outbox": {"max_events": 100}})
        ack = await until(lambda: running() and server.config_ack(3), "the ack of v3")
        assert ack.status == "rejected"
        assert "config.drivers[1] (board).path: '/etc/shadow' may not be set remotely" in (
            ack.detail or ""
        )

        # the old config kept running all along: the same driver still produces events
        seen = len(server.of("env.reading"))
        await until(lambda: len(server.of("env.reading")) > seen + 5, "env readings after all")
        assert not spied.exists()
        assert not server.of("card.tap")
        assert server.states[-1].config_version is None

        taps = {"type": "synthetic", "name": "taps", "event_type": "card.tap", "rate": 20}
        server.send_config(4, {"drivers": [ENV, taps]})  # a good config still applies
        ack = await until(lambda: running() and server.config_ack(4), "the ack of v4")
        assert (ack.status, ack.detail) == ("applied", None)
        await until(lambda: server.of("card.tap"), "taps from the new driver")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(agent.wait, 30)
        finally:
            if agent.poll() is None:
                agent.kill()
                await asyncio.to_thread(agent.wait, 30)
    assert agent.returncode == 0, (tmp_path / "agent.log").read_text()
    assert not spied.exists()
