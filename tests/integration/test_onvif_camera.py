"""The onvif driver against the simulated ONVIF camera (SOAP over HTTP on loopback), and the
camera's motion and tamper events through a real edge-agent process, Mosquitto and the ingest
server into PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from device_drivers.base import DriverContext, DriverState
from device_drivers.onvif import OnvifCameraDriver, build, probe
from schemas.events import CameraActivity, CameraEvent, CameraHealth
from simulators.harness import Mosquitto, wait_until
from simulators.harness_pipeline import HASH_KEY_HEX, IngestServer, Proc, _bin
from simulators.onvif_camera import OnvifCamera
from tests.driver_harness import RunningDriver, ctx_fixture, fast_backoff, until

pytestmark = pytest.mark.integration
PASSWORD = "pw-Onvif-7731"

fast = fast_backoff(OnvifCameraDriver)
ctx = ctx_fixture("cam-0101")


@pytest.fixture
def camera() -> Iterator[OnvifCamera]:
    with OnvifCamera(username="campus", password=PASSWORD) as cam:
        yield cam


def driver(ctx: DriverContext, cam: OnvifCamera, **options: Any) -> OnvifCameraDriver:
    base = {"host": "127.0.0.1", "port": cam.port, "username": "campus", "password": PASSWORD,
            "pull_timeout_s": 1, "timeout_s": 5}  # fmt: skip
    return build("gate-cam", {**base, **options}, ctx)


async def test_identity_motion_tamper_and_video_loss(
    camera: OnvifCamera, ctx: DriverContext
) -> None:
    d = driver(ctx, camera)
    async with RunningDriver(d, ready=lambda: camera.subscriptions() == 1, within=15) as out:
        await until(lambda: d.state == DriverState.OK, "the driver up", 10)
        camera.raise_event("motion", True)
        camera.raise_event("tamper", True)
        camera.raise_event("storage", True)  # a topic that is not ours: counted, not sent
        camera.raise_event("video_loss", True)
        camera.raise_event("motion", False)
        await until(lambda: len(out.of_type(CameraEvent)) == 4, "four camera events", 10)
    events = [(e.kind, e.active) for e in out.of_type(CameraEvent)]
    assert events == [("motion", True), ("tamper", True), ("video_loss", True), ("motion", False)]
    assert {e.source for e in out.of_type(CameraEvent)} == {"VideoSource_1"}
    assert [a.motion for a in out.of_type(CameraActivity)] == [1.0, 0.0]
    health = out.of_type(CameraHealth)
    assert health[0].connected
    assert (health[0].model, health[0].firmware) == ("CC-2040", "5.7.3")
    assert (health[0].fps, health[0].brightness) == (None, None)  # no picture is ever read
    assert health[-1].black_frame is True  # the video loss
    assert ctx.counters["onvif.ignored.topic"] == 1
    # device management and events only: never a media, snapshot or streaming call
    assert set(camera.counters.operations) <= {
        "GetServices", "GetDeviceInformation", "GetSystemDateAndTime",
        "CreatePullPointSubscription", "PullMessages", "Renew", "Unsubscribe",
    }  # fmt: skip


async def test_a_new_subscription_hears_the_current_state(
    camera: OnvifCamera, ctx: DriverContext
) -> None:
    camera.raise_event("tamper", True)  # before the driver subscribes
    d = driver(ctx, camera)
    async with RunningDriver(d, ready=lambda: camera.subscriptions() == 1, within=15) as out:
        await until(lambda: out.of_type(CameraEvent), "the initial state", 10)
    assert [(e.kind, e.active) for e in out.of_type(CameraEvent)] == [("tamper", True)]


async def test_wrong_password_is_named_and_never_logged(
    camera: OnvifCamera, ctx: DriverContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    d = driver(ctx, camera, password="not-the-password")
    async with RunningDriver(d, ready=DriverState.DISCONNECTED, within=15) as out:
        await until(lambda: camera.counters.auth_failures >= 1, "a refused request", 10)
    assert "127.0.0.1" in (d.last_error or "")
    assert [h.connected for h in out.of_type(CameraHealth)] == [False]
    assert "not-the-password" not in caplog.text
    assert PASSWORD not in caplog.text
    assert "not-the-password" not in repr(d.options)


async def test_a_camera_that_goes_away_is_reported_once(ctx: DriverContext) -> None:
    cam = OnvifCamera(username="campus", password=PASSWORD).__enter__()
    d = driver(ctx, cam, pull_timeout_s=1, timeout_s=1)
    try:
        async with RunningDriver(d, ready=lambda: cam.subscriptions() == 1, within=15) as out:
            await until(lambda: d.state == DriverState.OK, "the driver up", 10)
            cam.close()
            await until(lambda: d.state == DriverState.DISCONNECTED, "the loss seen", 15)
        assert [h.connected for h in out.of_type(CameraHealth)] == [True, False]
    finally:
        cam.close()


async def test_probe_names_the_camera_or_the_failure(camera: OnvifCamera) -> None:
    opts = {"host": "127.0.0.1", "port": camera.port, "username": "campus", "timeout_s": 5}
    ok = await probe({**opts, "password": PASSWORD})
    assert ok.status == "ok", ok
    assert "CampusCam CC-2040 firmware 5.7.3" in ok.message
    refused = await probe({**opts, "password": "wrong-pw"})
    assert refused.status == "fail", refused
    assert "wrong-pw" not in refused.message


def stored_camera_events(db_url: str) -> list[tuple[str, bool]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT data->>'kind', (data->>'active')::boolean FROM events"
            " WHERE device_id = 'cam-0101' AND type = 'camera.event' ORDER BY seq"
        ).fetchall()
    return [(str(k), bool(a)) for k, a in rows]


def test_motion_and_tamper_reach_the_database_through_a_real_agent(
    tmp_path: Path, mosquitto: Mosquitto, db_url: str, camera: OnvifCamera
) -> None:
    (tmp_path / "district.key").write_text(HASH_KEY_HEX)
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[device]
id = "cam-0101"
school_id = "s001"
kind = "gateway"
[outbox]
path = "outbox.db"
[mqtt]
url = "mqtt://{mosquitto.host}:{mosquitto.port}"
[health]
interval_s = 0
[privacy]
hash_key_file = "district.key"
[[drivers]]
type = "onvif"
name = "gate-cam"
host = "127.0.0.1"
port = {camera.port}
username = "campus"
password = "{PASSWORD}"
pull_timeout_s = 1
""")
    server = IngestServer(tmp_path, mosquitto.url, db_url)
    agent = Proc([_bin("edge-agent"), "run", "--config", str(config)], tmp_path / "agent.log")
    server.start()
    try:
        server.wait_healthy()
        agent.start()
        wait_until(lambda: camera.subscriptions() == 1, 30, "the agent's subscription")
        camera.raise_event("motion", True)
        camera.raise_event("tamper", True)
        camera.raise_event("motion", False)
        expected = [("motion", True), ("tamper", True), ("motion", False)]
        try:
            wait_until(lambda: stored_camera_events(db_url) == expected, 30, "the events stored")
        except TimeoutError as exc:
            got = stored_camera_events(db_url)
            raise AssertionError(f"{exc}: {got}\n{agent.tail()}\n{server.tail()}") from None
        with psycopg.connect(db_url) as conn:
            health = conn.execute(
                "SELECT data->>'model', (data->>'connected')::boolean FROM events"
                " WHERE device_id = 'cam-0101' AND type = 'camera.health'"
            ).fetchall()
            quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()
        assert ("CC-2040", True) in health
        assert quarantined == (0,)
        assert PASSWORD not in agent.text()
    finally:
        agent.terminate()
        server.terminate()
