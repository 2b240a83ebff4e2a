"""Commands on ``cmd``, acks on ``cmd/ack``: a class-signage agent against a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_drivers.base import DriverState
from device_drivers.signage import ScreenLink
from edge_agent.agent import Agent
from edge_agent.config import load_config
from schemas.events import AttendanceCheckin, SignageNoticeShown
from schemas.state import CommandAck, ack_decoder
from schemas.uplink import ValidEvent, decode_uplink
from simulators.em4100 import Em4100Simulator
from simulators.harness import Mosquitto, wait_until
from simulators.signage import Notice, SignageScreen

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_task_left_behind")]
SCHOOL, DEVICE = "s001", "cs-0101"
BASE = f"campus/v1/{SCHOOL}/{DEVICE}"
_ids = itertools.count()


class Server:
    """The server's side of one device: sends commands, collects acks, events and presence."""

    def __init__(self, broker: Mosquitto) -> None:
        self.acks: list[CommandAck] = []
        self.events: list[ValidEvent] = []
        self.online = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        # A persistent session: acks sent while this client reconnects are kept for it.
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"server-{os.getpid()}-{next(_ids)}",
            clean_session=False,
        )
        self.client.on_connect = lambda c, *_: c.subscribe(f"{BASE}/#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # floats work
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 10, "the server's subscription")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.topic == f"{BASE}/cmd/ack":
                self.acks.append(ack_decoder.decode(msg.payload))
            elif msg.topic == f"{BASE}/up":
                self.events.extend(decode_uplink(msg.topic, bytes(msg.payload)).events)
            elif msg.topic == f"{BASE}/state" and json.loads(msg.payload)["state"] == "online":
                self.online += 1

    def send(self, payload: bytes | dict[str, Any]) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(f"{BASE}/cmd", raw, qos=1).wait_for_publish(5)

    def acks_for(self, cmd_id: str) -> list[CommandAck]:
        with self._lock:
            return [a for a in self.acks if a.id == cmd_id]

    def of(self, kind: str) -> list[Any]:
        with self._lock:
            return [e.data for e in self.events if e.type == kind]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def command(cmd_id: str, name: str, expires_in: timedelta | None = None, **args: Any) -> bytes:
    doc: dict[str, Any] = {"id": cmd_id, "name": name, "args": args}
    if expires_in is not None:
        doc["expires_at"] = (datetime.now(UTC) + expires_in).isoformat()
    return json.dumps(doc).encode()


async def until(pred: Callable[[], object], what: str, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ScreenLink, "BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(ScreenLink, "BACKOFF_MAX_S", 0.2)


@pytest.fixture
def server(mosquitto: Mosquitto) -> Iterator[Server]:
    s = Server(mosquitto)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
async def screen() -> AsyncIterator[SignageScreen]:
    async with SignageScreen() as s:
        yield s


@pytest.fixture
def card(tmp_path: Path) -> Iterator[Em4100Simulator]:
    sim = Em4100Simulator(tmp_path / "ttyCARD")
    try:
        yield sim
    finally:
        sim.unplug()


@pytest.fixture
def config(
    tmp_path: Path, mosquitto: Mosquitto, screen: SignageScreen, card: Em4100Simulator
) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[device]
id = "{DEVICE}"
school_id = "{SCHOOL}"
kind = "class_signage"
[outbox]
path = "outbox.db"
[mqtt]
url = "{mosquitto.url}"
[privacy]
hash_key_hex = "{"ab" * 16}"
[publish]
backoff_initial_s = 0.1
backoff_max_s = 0.5
[[drivers]]
type = "signage"
name = "{DEVICE}"
class_id = "g7-c3"
screen = "127.0.0.1:{screen.port}"
ack_timeout_s = 1.0
[[drivers.cards]]
type = "em4100"
name = "cs-door"
port = "{card.link}"
""")
    return path


@contextlib.asynccontextmanager
async def running(config: Path, server: Server) -> AsyncIterator[Agent]:
    """An agent whose screen link is up and whose ``cmd`` subscription is in place."""
    online = server.online
    async with Agent(load_config(config)) as agent:
        # The subscription is made before ``online`` is said, so commands sent now arrive.
        await until(lambda: server.online > online, "the agent to come online")
        await until(lambda: agent.status().drivers[0].state == DriverState.OK, "the drivers")
        yield agent


async def test_show_notice_is_shown_once_acked_and_reported(
    config: Path, server: Server, screen: SignageScreen
) -> None:
    show = command(
        "c-1",
        "show_notice",
        timedelta(minutes=5),
        notice_id="n-42",
        title="停水通知",
        body="明天停水",
        duration_s=30,
    )
    async with running(config, server):
        server.send(show)
        await until(lambda: server.acks_for("c-1"), "the ack")
        assert server.acks_for("c-1") == [
            CommandAck(id="c-1", status="ok", detail={"shown_by": [DEVICE]})
        ]
        assert screen.showing == Notice("n-42", "停水通知", "明天停水", 30)
        await until(lambda: server.of("signage.notice_shown"), "the notice_shown event")
        assert server.of("signage.notice_shown") == [
            SignageNoticeShown(notice_id="n-42", title="停水通知", cmd_id="c-1", duration_s=30)
        ]
        server.send(show)  # redelivered: the same ack, not shown again
        await until(lambda: len(server.acks_for("c-1")) == 2, "the second ack")
    async with running(config, server):  # after a restart too
        server.send(show)
        await until(lambda: len(server.acks_for("c-1")) == 3, "the ack after a restart")
        server.send(command("c-2", "ping"))  # handled after c-1: nothing more is coming for it
        await until(lambda: server.acks_for("c-2"), "the ping's ack")
    first, again, after_restart = server.acks_for("c-1")
    assert first == again == after_restart
    assert len(screen.history) == 1
    assert len(server.of("signage.notice_shown")) == 1


async def test_bad_commands_are_rejected_and_the_agent_carries_on(
    config: Path, server: Server, screen: SignageScreen, card: Em4100Simulator
) -> None:
    async with running(config, server):
        server.send(command("c-old", "show_notice", timedelta(seconds=-1), notice_id="n-1"))
        server.send(command("c-x", "reboot_now"))
        server.send(b"{not json")
        server.send(b'{"id": "c-bad", "name": 7}')
        server.send(command("c-args", "show_notice", notice_id=5))
        server.send(command("c-flush", "flush_outbox"))
        server.send(command("c-ping", "ping"))
        await until(lambda: server.acks_for("c-ping"), "the ping's ack")
        await asyncio.to_thread(card.present, bytes.fromhex("0102030405"))
        await until(lambda: server.of("attendance.checkin"), "a check-in after all that")
    [old], [unknown], [bad], [bad_args], [flush] = (
        server.acks_for(i) for i in ("c-old", "c-x", "c-bad", "c-args", "c-flush")
    )
    assert (old.status, old.detail[:11]) == ("rejected", "expired at ")
    assert unknown == CommandAck(
        id="c-x",
        status="rejected",
        detail="unknown command 'reboot_now'; known: flush_outbox, ping, restart_driver, "
        "set_sample_rate, show_notice, start_recording, stop_recording, update_agent",
    )
    assert bad.status == "rejected"
    assert "malformed command" in bad.detail
    assert "`$.name`" in bad.detail
    assert bad_args.status == "rejected"
    assert "notice_id" in bad_args.detail
    assert flush.status == "ok"
    assert isinstance(flush.detail["depth"], int)
    assert [a.id for a in server.acks] == ["c-old", "c-x", "c-bad", "c-args", "c-flush", "c-ping"]
    assert screen.history == []
    assert isinstance(server.of("attendance.checkin")[0], AttendanceCheckin)


async def test_an_ack_due_while_the_link_is_down_goes_after_reconnect(
    config: Path, server: Server, screen: SignageScreen, mosquitto: Mosquitto
) -> None:
    screen.confirm = False  # the command takes ack_timeout_s (1 s), then fails
    async with running(config, server) as agent:
        assert agent.commands is not None
        server.send(command("c-1", "show_notice", notice_id="n-1", title="t"))
        await until(lambda: screen.received, "the notice to reach the screen")
        await asyncio.to_thread(mosquitto.stop)
        await until(lambda: agent.commands and agent.commands.pending_acks == 1, "the ack")
        await asyncio.to_thread(mosquitto.start)
        await until(lambda: server.acks_for("c-1"), "the ack after reconnect")
        await until(lambda: agent.commands and agent.commands.pending_acks == 0, "no ack left")
    assert server.acks_for("c-1") == [
        CommandAck(
            id="c-1", status="error", detail="the screen did not confirm notice 'n-1' in 1 s"
        )
    ]
    assert server.of("signage.notice_shown") == []
