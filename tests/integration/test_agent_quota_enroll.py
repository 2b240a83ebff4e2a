"""Outbox quota while the broker is away, and ``edge-agent enroll`` → a config that connects."""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.cli import main
from edge_agent.config import load_config
from edge_agent.outbox import Outbox
from schemas.events import AgentOutboxDropped
from simulators.harness import Mosquitto, shared_tmpdir
from tests.agent_server import KEY_HEX, DeviceServer, _Enrolment, until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_task_left_behind")]
SCHOOL, DEVICE = "s001", "cr-0101"
PASSWORD = "s3cret-pw-not-in-logs"


async def test_quota_full_drops_lowest_priority_counts_and_reports(
    tmp_path: Path,
    mosquitto: Mosquitto,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(Agent, "DROP_REPORT_S", 0.5)  # bounded: reports share the top tier
    # The server's persistent session exists before the outage, so nothing the agent sends
    # the moment the broker is back can slip past its subscription.
    server = await asyncio.to_thread(DeviceServer, mosquitto, SCHOOL, DEVICE)
    await asyncio.to_thread(mosquitto.stop)  # the link is down: everything waits in the outbox
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[device]
id = "{DEVICE}"
school_id = "{SCHOOL}"
kind = "card_reader"
[outbox]
path = "outbox.db"
max_events = 200
[mqtt]
url = "{mosquitto.url}"
[privacy]
hash_key_hex = "{KEY_HEX}"
[publish]
backoff_initial_s = 0.1
backoff_max_s = 0.3
[health]
interval_s = 0
[[drivers]]
type = "synthetic"
name = "env"
rate = 400
[[drivers]]
type = "synthetic"
name = "door"
event_type = "card.tap"
rate = 20
""")
    try:
        async with Agent(load_config(config)) as agent:
            await until(lambda: agent.outbox.highest_seq > 800, "the outbox to overflow")
            stats = await agent.outbox.stats()
            assert stats.depth <= 200
            assert stats.dropped["env.reading"] > 0
            assert "card.tap" not in stats.dropped
            await asyncio.to_thread(mosquitto.start)
            door = agent.drivers()[1]
            await agent.reconfigure(replace(agent.config, drivers=()))  # no new events
            taps = getattr(door, "emitted")  # noqa: B009 - a Driver
            assert 10 < taps < 200  # they all fit: only env readings had to go
            await until(lambda: len(server.of("card.tap")) == taps, "every tap", 20)
            reports: list[AgentOutboxDropped] = server.of("agent.outbox_dropped")
            assert reports
            assert {r.reason for r in reports} == {"max_events"}
            assert {t for r in reports for t in r.dropped} == {"env.reading"}
    finally:
        server.close()
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "DROPPED" in out
    assert "env.reading" in out


@pytest.fixture
def enrol_server() -> Iterator[tuple[str, type[_Enrolment]]]:
    handler = type("Handler", (_Enrolment,), {"answers": [], "requests": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def secured_broker() -> Iterator[Mosquitto]:
    """A Mosquitto that wants this device's username and password."""
    workdir = shared_tmpdir("campus-mosq-")
    pwfile = workdir / "passwd"
    subprocess.run(
        ["/usr/bin/mosquitto_passwd", "-c", "-b", str(pwfile), DEVICE, PASSWORD],
        check=True,
        capture_output=True,
    )
    pwfile.chmod(0o644)
    broker = Mosquitto(workdir, extra_conf=f"allow_anonymous false\npassword_file {pwfile}\n")
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


async def test_enroll_writes_a_config_that_connects(
    tmp_path: Path,
    secured_broker: Mosquitto,
    enrol_server: tuple[str, type[_Enrolment]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, handler = enrol_server
    config = tmp_path / "etc" / "agent.toml"
    handler.answers += [
        (404, {"detail": "no such code: ABCD"}),
        (
            201,
            {
                "device_id": DEVICE,
                "school_id": SCHOOL,
                "mqtt_url": secured_broker.url,
                "mqtt_username": DEVICE,
                "mqtt_password": PASSWORD,
                "ca_cert_pem": None,
                "hash_key_hex": KEY_HEX,
                "seq_floor": 5000,
                "config": {
                    "drivers": [
                        {"type": "synthetic", "name": "door", "event_type": "card.tap", "rate": 50}
                    ],
                    "health": {"interval_s": 0},
                    "outbox": {"max_events": 1000},
                },
            },
        ),
    ]
    args = ["enroll", "--server", url, "--config", str(config), "--kind", "card_reader"]
    assert main([*args, "--code", "ABCD"]) == 1
    assert "the enrolment code is not known: no such code: ABCD" in capsys.readouterr().err
    assert not config.exists()

    assert main([*args, "--code", "WXYZ", "--room", "b-204"]) == 0
    said = capsys.readouterr()
    assert f"enrolled as {DEVICE} (school {SCHOOL}); seqs continue above 5000" in said.out
    assert PASSWORD not in said.out + said.err
    sent = handler.requests[-1]
    assert sent["path"] == "/api/v1/enrol"
    assert (sent["code"], sent["kind"], sent["room"]) == ("WXYZ", "card_reader", "b-204")
    assert sent["hardware_ids"]
    assert all(isinstance(v, str) for v in sent["hardware_ids"].values())
    for secret in ("mqtt.password", "hash.key", "agent.toml"):
        assert (config.parent / secret).stat().st_mode & 0o777 == 0o600
    assert PASSWORD not in config.read_text()
    assert KEY_HEX not in config.read_text()

    assert main([*args, "--code", "AGAIN"]) == 1  # no --force: the config stays
    assert "already exists: pass --force" in capsys.readouterr().err

    cfg = load_config(config)
    assert cfg.outbox_quota.max_events == 1000
    assert cfg.hash_key == bytes.fromhex(KEY_HEX)
    assert cfg.clock.reference == url.rstrip("/") + "/healthz"  # the district server's time
    async with Agent(cfg) as agent:
        await until(lambda: agent.publisher.stats.connects >= 1, "the agent to connect")
        await until(lambda: agent.publisher.stats.events >= 5, "taps delivered")
    with Outbox(cfg.outbox_path, readonly=True) as outbox:
        assert outbox.highest_seq() > 5000
