"""HTTP API and command-channel helpers: ``call``, an admin ``Api`` on a server and a simulated
``Device`` answering commands (shared by the API, control and enrolment tests)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest_server.server import IngestServer
from ingest_server.settings import Settings
from simulators.harness import Mosquitto, wait_until


def call(
    url: str, token: str | None = None, method: str = "GET", body: Any = None
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310  # http://127.0.0.1
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    ctype = "json"
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        ctype = raw.decode()
    return status, ctype


class Device:
    """A paho client playing one device: says ``online``, keeps what arrives on ``cmd`` and
    ``config``, and acks when told. A persistent session, as a real device's broker keeps."""

    def __init__(self, broker: Mosquitto, device_id: str) -> None:
        self.device_id = device_id
        self.base = f"campus/v1/{SCHOOL}/{device_id}"
        self.commands: list[dict[str, Any]] = []
        self.configs: list[tuple[dict[str, Any], bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"dev-{device_id}-{uuid.uuid4().hex[:8]}",
            clean_session=False,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # floats work
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 30, f"{device_id}'s subscriptions")

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe([(f"{self.base}/cmd", 1), (f"{self.base}/config", 1)])
        state = {"state": "online", "boot": 1, "agent_version": "test", "ts": _now()}
        client.publish(f"{self.base}/state", json.dumps(state), qos=1, retain=True)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.topic.endswith("/cmd"):
                self.commands.append(json.loads(msg.payload))
            else:
                self.configs.append((json.loads(msg.payload), bool(msg.retain)))

    def got(self, cmd_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [c for c in self.commands if c["id"] == cmd_id]

    def last_config(self) -> dict[str, Any] | None:
        with self._lock:
            return self.configs[-1][0] if self.configs else None

    def publish(self, channel: str, payload: bytes | dict[str, Any]) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(f"{self.base}/{channel}", raw, qos=1).wait_for_publish(5)

    def ack(self, cmd_id: str, status: str = "ok", detail: Any = None) -> None:
        self.publish("cmd/ack", {"id": cmd_id, "status": status, "detail": detail})

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _settings(mosquitto: Mosquitto, db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        broker_url=mosquitto.url,
        db_url=db_url,
        http_port=0,
        client_id=f"ingest-ctl-{uuid.uuid4().hex[:8]}",
        admin_token_file=tmp_path / "admin-token",
    )


class Api:
    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self.token = server.settings.token_file.read_text().strip()

    def __call__(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return call(self.server.http.url + path, token or self.token, method, body)

    def command(self, cmd_id: str) -> dict[str, Any]:
        status, body = self("GET", f"/api/v1/commands/{cmd_id}")
        assert status == 200, body
        result: dict[str, Any] = body
        return result

    def wait_status(self, cmd_id: str, want: str, timeout: float = 30) -> dict[str, Any]:
        wait_until(lambda: self.command(cmd_id)["status"] == want, timeout, f"{cmd_id} {want}")
        return self.command(cmd_id)


SCHOOL = "s001"


@pytest.fixture
def api_server(mosquitto: Mosquitto, db_url: str, tmp_path: Path) -> Iterator[IngestServer]:
    """An ingest server on a fresh Mosquitto and database, its bootstrap admin token written."""
    cfg = Settings(
        broker_url=mosquitto.url,
        db_url=db_url,
        http_port=0,
        client_id=f"ingest-api-{uuid.uuid4().hex[:8]}",
        admin_token_file=tmp_path / "admin-token",
    )
    with IngestServer(cfg) as srv:
        wait_until(cfg.token_file.exists, 60, "the bootstrap admin token")
        yield srv
