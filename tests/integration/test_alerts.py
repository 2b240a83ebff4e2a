"""Alerts end to end: real edge-agent processes reading simulators through their real protocols,
real Mosquitto, the ingest server and PostgreSQL. A fever at a gate, CO2 above the threshold for
the window, and a SIGKILLed agent (its will: offline) each open an alert, visible in the API and
on the live stream, and each resolves by itself when its condition clears. The server notifies a
webhook receiver and an SMTP server (aiosmtpd, STARTTLS) on 127.0.0.1 of every transition; a
webhook receiver that is down when an alert opens gets it once when it is back."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest_server.alerts.notify import Notifier
from ingest_server.server import IngestServer
from ingest_server.settings import Settings
from simulators.harness import Mosquitto, shared_tmpdir, wait_until
from simulators.harness_pipeline import HASH_KEY_HEX, Proc
from simulators.modbus_sensor import Field, ModbusSensorSim
from simulators.wiegand import WiegandConverter
from tests.alert_receivers import Hook, SmtpSink
from tests.api_client import Api

pytestmark = pytest.mark.integration

WAIT_S = 60
#: Short windows and holds so the test runs in seconds; every rule on, school hours ignored.
RULES = """
[rules.fever]
clear_hold_s = 0
reopen_window_s = 0
[rules.co2_high]
threshold_ppm = 1500
clear_ppm = 1000
for_s = 1
clear_hold_s = 1
reopen_window_s = 0
[rules.device_offline]
for_s = 0
clear_hold_s = 0
reopen_window_s = 0
school_hours_only = false
"""


class AlertStream:
    """``/api/v1/live?type=alert`` read on a thread: the alert events, parsed."""

    def __init__(self, url: str, token: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S * 2)
        self.conn.request(
            "GET", "/api/v1/live?type=alert", headers={"Authorization": f"Bearer {token}"}
        )
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        assert self.resp.readline() == b": connected\n"
        self.alerts: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        kind = None
        try:
            for _ in range(100_000):
                line = self.resp.readline()
                if not line:
                    return
                if line.startswith(b"event: "):
                    kind = line[7:].strip()
                elif line.startswith(b"data: ") and kind == b"alert":
                    with self._lock:
                        self.alerts.append(json.loads(line[6:]))
                elif line == b"\n":
                    kind = None
        except Exception:  # noqa: BLE001 - the stream ends when the test closes it, however it ends
            return

    def seen(self, rule: str, transition: str) -> dict[str, Any] | None:
        with self._lock:
            return next(
                (a for a in self.alerts if a["rule"] == rule and a["transition"] == transition),
                None,
            )

    def close(self) -> None:
        if self.conn.sock is not None:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self._thread.join(10)


#: The fields every webhook notification carries, non-empty (docs/alerts.md, "Receivers").
NOTIFIED_FIELDS = ("rule", "severity", "state", "device_id", "school_id", "opened_at", "message")
#: The alert's state after each transition.
STATE_AFTER = {"opened": "open", "acknowledged": "acknowledged", "resolved": "resolved"}


class Running:
    def __init__(
        self, srv: IngestServer, workdir: Path, broker: Mosquitto, hook: Hook, smtp: SmtpSink
    ) -> None:
        self.srv = srv
        self.workdir = workdir
        self.broker = broker
        self.hook = hook
        self.smtp = smtp
        self.api = Api(srv)
        self.stream = AlertStream(srv.http.url, self.api.token)

    def agent(self, device: str, kind: str, drivers: str) -> Proc:
        d = self.workdir / device
        d.mkdir(parents=True, exist_ok=True)
        (d / "district.key").write_text(HASH_KEY_HEX)
        config = d / "agent.toml"
        config.write_text(
            f'[device]\nid = "{device}"\nschool_id = "s001"\nkind = "{kind}"\n'
            f'[outbox]\npath = "outbox.db"\n'
            f'[mqtt]\nurl = "mqtt://{self.broker.host}:{self.broker.port}"\n'
            "[publish]\nlinger_ms = 20\nbackoff_initial_s = 0.2\nbackoff_max_s = 1\n"
            '[privacy]\nhash_key_file = "district.key"\n' + drivers
        )
        edge_agent = Path(sys.executable).parent / "edge-agent"
        proc = Proc([str(edge_agent), "run", "--config", str(config)], d / "agent.log")
        proc.start()
        return proc

    def alert(self, rule: str, device: str) -> dict[str, Any] | None:
        status, body = self.api("GET", f"/api/v1/alerts?rule={rule}&device={device}")
        assert status == 200, body
        return body["items"][0] if body["items"] else None

    def wait_alert(
        self, rule: str, device: str, state: str, agent: Proc, poke: Any = None
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if poke is not None:
                poke()
            a = self.alert(rule, device)
            return a if a is not None and a["state"] == state else None

        try:
            wait_until(check, WAIT_S, f"{rule} {state} at {device}")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the agent's log:\n{agent.tail()}") from None
        found = check()
        assert found is not None
        return found

    def notified(self, alert: dict[str, Any], transition: str) -> dict[str, Any]:
        """The webhook's notification of this transition of the alert (waited for), checked."""

        def find() -> dict[str, Any] | None:
            return next(
                (
                    b
                    for b in self.hook.bodies()
                    if b["alert_id"] == alert["id"] and b["transition"] == transition
                ),
                None,
            )

        wait_until(find, WAIT_S, f"the webhook told of {alert['rule']} {transition}")
        body = find()
        assert body is not None
        for key in NOTIFIED_FIELDS:
            assert body[key], key
        assert body["rule"] == alert["rule"]
        assert body["severity"] == alert["severity"]
        assert body["device_id"] == alert["device_id"]
        assert body["school_id"] == "s001"
        assert body["state"] == STATE_AFTER[transition]
        assert alert["device_id"] in body["message"]
        return body

    def mailed(self, alert: dict[str, Any], transition: str) -> EmailMessage:
        """The e-mail of this transition of the alert (waited for): its Message-ID names the
        alert, its subject the transition and rule, its body the device."""

        def find() -> EmailMessage | None:
            return next(
                (
                    m
                    for m in self.smtp.messages()
                    if f".alert{alert['id']}.n" in str(m["Message-ID"])
                    and f" {transition}: {alert['rule']}" in str(m["Subject"])
                ),
                None,
            )

        wait_until(find, WAIT_S, f"an e-mail of {alert['rule']} {transition}")
        msg = find()
        assert msg is not None
        assert msg["To"] == "it@s001.example"
        assert "告警" in str(msg["Subject"])
        body = msg.get_body()
        assert body is not None
        assert alert["device_id"] in body.get_content()
        return msg

    def told(self, alert: dict[str, Any], *transitions: str) -> None:
        """Each transition reached the webhook and the mailbox, the webhook's in this order."""
        for t in transitions:
            self.notified(alert, t)
            self.mailed(alert, t)
        seen = [b["transition"] for b in self.hook.bodies() if b["alert_id"] == alert["id"]]
        assert seen == list(transitions)


@pytest.fixture
def running(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path, hooks: list[Hook], smtp_sink: SmtpSink
) -> Iterator[Running]:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    hook = Hook().start()
    hooks.append(hook)
    settings = Settings(
        broker_url=mosquitto.url,
        db_url=db_url,
        http_port=0,
        client_id=f"ingest-alerts-{uuid.uuid4().hex[:8]}",
        admin_token_file=tmp_path / "admin-token",
        rules_file=rules,
        alert_webhooks=(hook.url,),
        alert_smtp=smtp_sink.url("alerts@campus.example", "it@s001.example"),
    )
    # a directory of its own: pytest may prune old basetemps while other sessions run
    workdir = shared_tmpdir("campus-alerts-")
    with IngestServer(settings) as srv:
        wait_until(settings.token_file.exists, WAIT_S, "the bootstrap admin token")
        r = Running(srv, workdir, mosquitto, hook, smtp_sink)
        try:
            yield r
        finally:
            r.stream.close()
    shutil.rmtree(workdir, ignore_errors=True)


def _transitions(api: Api, alert_id: int) -> list[str]:
    status, body = api("GET", f"/api/v1/alerts/{alert_id}")
    assert status == 200, body
    return [e["transition"] for e in body["events"]]


def test_a_fever_at_a_real_gate_opens_an_alert_and_a_normal_reading_resolves_it(
    running: Running, tmp_path: Path
) -> None:
    with (
        ModbusSensorSim({"body": Field(0, dtype="int16", scale=0.1)}, unit=3) as thermo,
        WiegandConverter(tmp_path / "in") as reader,
    ):
        port = thermo.start_tcp()
        drivers = (
            '[[drivers]]\ntype = "gate"\nname = "gate-east"\n'
            f'[[drivers.cards]]\ntype = "wiegand"\nport = "{reader.link}"\ndirection = "in"\n'
            f'[drivers.thermometer]\nhost = "127.0.0.1"\nport = {port}\nunit = 3\n'
            "timeout_s = 0.3\nretries = 0\n"
        )
        agent = running.agent("gate-0001", "access_gate", drivers)
        try:
            thermo.set(body=38.2)
            card = iter(range(0x100, 0x10000))
            fever = running.wait_alert(
                "fever",
                "gate-0001",
                "open",
                agent,
                lambda: reader.present(next(card), facility=0x20),
            )
            assert fever["severity"] == "critical"
            assert fever["detail"]["temperature_c"] == 38.2
            assert len(fever["detail"]["uid_hash"]) == 64  # the student only as the keyed hash
            assert "38.2" in fever["message"]
            wait_until(lambda: running.stream.seen("fever", "opened"), WAIT_S, "the live alert")

            thermo.set(body=36.5)
            done = running.wait_alert(
                "fever",
                "gate-0001",
                "resolved",
                agent,
                lambda: reader.present(next(card), facility=0x20),
            )
            assert done["id"] == fever["id"]
            assert done["resolved_by"] == "auto"
            assert _transitions(running.api, fever["id"]) == ["opened", "resolved"]
            wait_until(lambda: running.stream.seen("fever", "resolved"), WAIT_S, "the live resolve")
            running.told(fever, "opened", "resolved")
        finally:
            agent.terminate()


def test_co2_above_the_threshold_for_the_window_opens_then_resolves_after_the_hold(
    running: Running,
) -> None:
    with ModbusSensorSim() as sim:
        sim.set(temperature_c=22.0, humidity_pct=40.0, co2_ppm=1900, pm25_ugm3=10, noise_db=40)
        port = sim.start_tcp()
        drivers = (
            f'[[drivers]]\ntype = "modbus_env"\nname = "room-101"\nhost = "127.0.0.1"\n'
            f"port = {port}\npoll_s = 0.2\ntimeout_s = 0.3\nretries = 0\n"
        )
        agent = running.agent("env-0101", "env_sensor", drivers)
        try:
            opened = running.wait_alert("co2_high", "env-0101", "open", agent)
            assert opened["detail"]["co2_ppm"] == 1900
            wait_until(lambda: running.stream.seen("co2_high", "opened"), WAIT_S, "the live alert")
            with psycopg.connect(running.srv.settings.db_url or "") as conn:
                first = conn.execute(
                    "SELECT min(time) FROM events WHERE device_id = 'env-0101'"
                ).fetchone()
            assert first is not None

            sim.set(co2_ppm=600)
            done = running.wait_alert("co2_high", "env-0101", "resolved", agent)
            assert done["id"] == opened["id"]
            assert done["resolved_by"] == "auto"
            assert _transitions(running.api, opened["id"]) == ["opened", "resolved"]
            wait_until(lambda: running.stream.seen("co2_high", "resolved"), WAIT_S, "live resolve")
            running.told(opened, "opened", "resolved")
        finally:
            agent.terminate()


def test_a_killed_agent_goes_offline_by_its_will_and_resolves_when_restarted(
    running: Running,
) -> None:
    drivers = (
        '[[drivers]]\ntype = "synthetic"\nname = "gen"\nevent_type = "env.reading"\nrate = 2\n'
    )
    agent = running.agent("env-0202", "env_sensor", drivers)
    try:

        def online() -> bool:
            status, body = running.api("GET", "/api/v1/devices/env-0202/presence")
            return status == 200 and body["state"] == "online"

        wait_until(online, WAIT_S, "the agent online")
        assert running.alert("device_offline", "env-0202") is None
        agent.kill()  # SIGKILL: no goodbye; the broker publishes its will
        opened = running.wait_alert("device_offline", "env-0202", "open", agent)
        assert opened["detail"]["cause"] == "state"
        assert opened["severity"] == "critical"
        wait_until(lambda: running.stream.seen("device_offline", "opened"), WAIT_S, "live alert")

        status, acked = running.api("POST", f"/api/v1/alerts/{opened['id']}/acknowledge")
        assert status == 200, acked
        assert acked["state"] == "acknowledged"
        assert acked["acknowledged_by"]
        status, again = running.api("POST", f"/api/v1/alerts/{opened['id']}/acknowledge")
        assert status == 409, again

        agent.start()
        done = running.wait_alert("device_offline", "env-0202", "resolved", agent)
        assert done["id"] == opened["id"]
        assert done["resolved_by"] == "auto"
        assert _transitions(running.api, opened["id"]) == ["opened", "acknowledged", "resolved"]
        wait_until(lambda: running.stream.seen("device_offline", "resolved"), WAIT_S, "resolve")
        running.told(opened, "opened", "acknowledged", "resolved")
        told_ack = running.notified(opened, "acknowledged")
        assert told_ack["acknowledged_by"] == acked["acknowledged_by"]
        _, metrics = running.api("GET", "/metrics")
        assert 'campus_alerts_transitions_total{rule="device_offline",transition="opened"} 1' in (
            metrics
        )
    finally:
        agent.terminate()


def test_a_webhook_receiver_down_when_an_alert_opens_gets_it_once_when_back(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the server's own notifier, retrying sooner than its 2 s, 4 s, 8 s ... so the test is short
    monkeypatch.setattr(Notifier, "BACKOFF_BASE_S", 0.2)
    monkeypatch.setattr(Notifier, "BACKOFF_MAX_S", 1.0)
    drivers = (
        '[[drivers]]\ntype = "synthetic"\nname = "gen"\nevent_type = "env.reading"\nrate = 2\n'
    )
    agent = running.agent("env-0303", "env_sensor", drivers)
    metrics = running.srv.metrics
    try:

        def online() -> bool:
            status, body = running.api("GET", "/api/v1/devices/env-0303/presence")
            return status == 200 and body["state"] == "online"

        wait_until(online, WAIT_S, "the agent online")
        running.hook.stop()  # connections to it are refused from now on
        agent.kill()
        opened = running.wait_alert("device_offline", "env-0303", "open", agent)
        running.mailed(opened, "opened")  # the other receiver is not held up by the one down
        wait_until(
            lambda: metrics.alert_notify_retries.value(receiver="webhook-1") >= 2,
            WAIT_S,
            "failed attempts while the webhook receiver is down",
        )
        assert running.hook.requests == []

        running.hook.start()  # back, on the same port
        running.notified(opened, "opened")
        agent.start()
        running.wait_alert("device_offline", "env-0303", "resolved", agent)
        running.told(opened, "opened", "resolved")

        def all_sent() -> bool:
            with psycopg.connect(running.srv.settings.db_url or "") as conn:
                rows = conn.execute(
                    "SELECT status FROM alert_notifications WHERE alert_id = %s", (opened["id"],)
                ).fetchall()
            return len(rows) == 4 and {r[0] for r in rows} == {"sent"}  # 2 transitions x 2

        wait_until(all_sent, WAIT_S, "every notification of the alert marked sent")
    finally:
        agent.terminate()
    bodies = [b for b in running.hook.bodies() if b["alert_id"] == opened["id"]]
    assert [b["transition"] for b in bodies] == ["opened", "resolved"]  # exactly once each
    assert len({b["notification_id"] for b in bodies}) == 2
    assert len(running.hook.requests) == len(running.hook.bodies())  # no failed answer either
    with psycopg.connect(running.srv.settings.db_url or "") as conn:
        attempts = conn.execute(
            "SELECT attempts FROM alert_notifications"
            " WHERE alert_id = %s AND receiver = 'webhook-1' ORDER BY id",
            (opened["id"],),
        ).fetchall()
    assert attempts[0][0] >= 3  # refused at least twice, then delivered
