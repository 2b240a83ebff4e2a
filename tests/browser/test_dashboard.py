"""The dashboard in a real browser against the real pipeline.

Edge agent processes feed an ingest server process over Mosquitto into PostgreSQL; Debian's
chromium, driven by playwright-core (tests/browser/dashboard.spec.mjs), clicks through every
page in English and Chinese, on a desktop and a tablet viewport, and reports what it saw. This
test checks that against the database. Screenshots go to ``$DASHBOARD_SCREENSHOTS`` (default:
the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest_server.storage.maintenance import maintain
from ingest_server.web.api import auth
from ingest_server.web.headers import DASHBOARD_CSP
from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch
from simulators.api_seed import prepare
from simulators.harness import Mosquitto, wait_until
from simulators.harness_pipeline import Agent, IngestServer
from tests.api_client import call

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "tests" / "browser" / "dashboard.spec.mjs"
CHROMIUM = Path("/usr/bin/chromium")
WAIT_S = 60
SPEC_TIMEOUT_S = 300  # the script bounds each wait itself; this is the backstop
ROOMS = {
    "env-0101": ("101", "c7a"),
    "sb-0101": ("101", "c7a"),
    "sg-0101": ("101", "c7a"),
    "cr-0102": ("102", "c7b"),
}


def _missing_tools() -> str | None:
    if not CHROMIUM.exists():
        return "apt chromium is not installed (./run test installs it)"
    if shutil.which("node") is None or not (ROOT / "node_modules" / "playwright-core").is_dir():
        return "node_modules is missing: npm ci at the repository root (./run test does it)"
    return None


def _publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"dash-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for info in [client.publish(t, p, qos=1) for t, p in messages]:
            info.wait_for_publish(WAIT_S)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def _gappy_batch() -> bytes:
    """Taps with seqs 1, 2 and 5 from a reader that lost 3 and 4 upstream."""
    now = datetime.now(UTC)
    tap = msgspec.json.encode({"uid_hash": "cd" * 32, "tech": "em4100", "reader": "door"})
    events = [
        UplinkEvent(
            seq=s, ts=now - timedelta(seconds=10 - s), type="card.tap", data=msgspec.Raw(tap)
        )
        for s in (1, 2, 5)
    ]
    return encode_batch(
        UplinkBatch(device_id="cr-0102", kind="card_reader", sent_at=now, events=events)
    )


def _rows(conn: psycopg.Connection[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    return conn.execute(query, params).fetchall()


#: (rule, severity, state, device, message) as the rule engine would have opened them (with a
#: school's own severities); the engine itself opens a seq_gap alert for the gappy reader.
ALERTS = [
    ("device_offline", "warning", "open", "sb-0101", "智能白板离线 5 分钟"),
    ("co2_high", "critical", "open", "env-0101", "CO₂ 超过 1500 ppm"),
    ("outbox_backlog", "info", "acknowledged", "sg-0101", "Outbox backlog above 1000"),
    ("quarantine_spike", "warning", "resolved", "cr-0102", "读卡器隔离消息激增"),
]


def _seed_alerts(conn: psycopg.Connection[Any]) -> None:
    for rule, severity, state, device, message in ALERTS:
        (alert_id,) = conn.execute(
            "INSERT INTO alerts (rule, severity, state, school_id, device_id, room, message,"
            " acknowledged_by, resolved_by) VALUES (%s, %s, %s, 's001', %s, '101', %s,"
            " CASE WHEN %s <> 'open' THEN 'it-desk' END,"
            " CASE WHEN %s = 'resolved' THEN 'auto' END) RETURNING id",
            (rule, severity, state, device, message, state, state),
        ).fetchone() or (None,)
        conn.execute(
            "INSERT INTO alert_events (alert_id, transition) VALUES (%s, 'opened')", (alert_id,)
        )


@pytest.fixture
def stack(mosquitto: Mosquitto, db_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A server fed by four agents (one reporting health), a gappy reader and bad payloads; the
    rollups refreshed from what they sent."""
    reason = _missing_tools()
    if reason:
        pytest.skip(reason)
    with psycopg.connect(db_url, autocommit=True) as conn:
        prepare(conn)
    server = IngestServer(tmp_path, mosquitto.url, db_url)
    agents = [
        Agent(tmp_path, "env-0101", mosquitto.url, count=100_000, rate=4),
        Agent(tmp_path, "sb-0101", mosquitto.url, count=100_000, rate=2, event_type="board.power"),
        Agent(tmp_path, "cr-0201", mosquitto.url, count=100_000, rate=2, school_id="s002",
              event_type="card.tap"),
        Agent(tmp_path, "sg-0101", mosquitto.url, count=100_000, rate=4,
              event_type="attendance.checkin"),
    ]  # fmt: skip
    cfg = agents[0].config
    cfg.write_text(cfg.read_text().replace("[health]\ninterval_s = 0", "[health]\ninterval_s = 1"))
    server.start()
    try:
        server.wait_healthy(WAIT_S)
        for agent in agents:
            agent.start()
        _publish(
            mosquitto,
            [
                ("campus/v1/s001/cr-0102/up", _gappy_batch()),
                ("campus/v1/s001/cr-0102/up", b"{not json"),
                ("campus/v1/s001/cr-0102/up", b'{"v": 9, "device_id": "cr-0102"}'),
                ("campus/v1/s001/cr-0102/up", b"{also not json"),
            ],
        )
        with psycopg.connect(db_url, autocommit=True) as conn:

            def ready() -> bool:
                devices = _rows(
                    conn, "SELECT count(*) FROM devices WHERE agent_version IS NOT NULL"
                )
                health = _rows(
                    conn,
                    "SELECT count(*) FROM events WHERE device_id = 'env-0101'"
                    " AND type = 'agent.health'",
                )
                quarantined = _rows(conn, "SELECT count(*) FROM quarantine")
                kinds = _rows(
                    conn,
                    "SELECT count(DISTINCT type) FROM events WHERE type IN"
                    " ('board.power', 'attendance.checkin')",
                )
                co2 = _rows(conn, "SELECT count(*) FROM readings WHERE metric = 'co2_ppm'")
                return (
                    devices[0][0] >= 4
                    and health[0][0] >= 2
                    and quarantined[0][0] >= 3
                    and kinds[0][0] == 2
                    and co2[0][0] >= 5
                )

            wait_until(
                ready, WAIT_S, "agents online, health reported, bad payloads quarantined,"
                " power, check-ins and readings stored",
            )  # fmt: skip
            for device, (room, class_id) in ROOMS.items():
                conn.execute(
                    "UPDATE devices SET room = %s, class_id = %s WHERE device_id = %s",
                    (room, class_id, device),
                )
            # The server's upkeep pass, now rather than in 5 minutes: the rollups the
            # dashboard shows are then fixed until the test reads them back.
            assert maintain(conn).days_refreshed >= 1
            read_token = auth.create_token(conn, "dashboard-test", ["read"])[1]
            _seed_alerts(conn)
            wait_until(
                lambda: _rows(
                    conn,
                    "SELECT 1 FROM alerts WHERE rule = 'seq_gap' AND device_id = 'cr-0102'"
                    " AND state = 'open'",
                ),
                WAIT_S,
                "the rule engine's seq_gap alert for the gappy reader",
            )
        admin = server.token_file.read_text().strip()
        url = f"http://127.0.0.1:{server.http_port}"
        # a rollout that stays open: its canary, cr-0102, has no agent (offline, so pending
        # without holding up the next batch); sg-0101's agent answers the ping
        status, made = call(
            f"{url}/api/v1/rollouts",
            admin,
            "POST",
            {
                "target": {"devices": ["cr-0102", "sg-0101"]},
                "command": {"name": "ping"},
                "strategy": {"canary": 1, "batch_size": 1},
            },
        )
        assert status == 201, made

        def answered() -> bool:
            got = call(f"{url}/api/v1/rollouts/{made['id']}", admin)[1]
            return bool(got["counts"]["ok"] == 1)

        wait_until(answered, WAIT_S, "sg-0101's ping answered in the rollout")
        yield {"url": url, "admin": admin, "read": read_token, "rollout": made["id"]}
    finally:
        for agent in agents:
            agent.terminate()
        server.terminate()


def test_dashboard_in_chromium(stack: dict[str, Any], db_url: str, tmp_path: Path) -> None:
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path / "screenshots")
    env = {
        **os.environ,
        "DASH_URL": stack["url"],
        "ADMIN_TOKEN": stack["admin"],
        "READ_TOKEN": stack["read"],
        "SCREENSHOT_DIR": str(shots),
    }
    proc = subprocess.run(
        ["node", str(SPEC)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=SPEC_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.stdout.strip(), f"no output from the browser script:\n{proc.stderr[-3000:]}"
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, json.dumps(seen["failures"], indent=1)[:6000]
    assert len(seen["screenshots"]) == 21  # 02b: the schools table
    assert all(Path(p).is_file() for p in seen["screenshots"])

    # the whole run was under the strict policy (a violation is one of the failures above)
    assert seen["csp"] == DASHBOARD_CSP
    assert seen["tooltip"] is True

    with psycopg.connect(db_url) as conn:
        # login: the server's own words about a bad token; what each scope allows
        assert "not valid" in seen["badTokenMessage"]
        assert "not valid" in seen["unauthorizedMessage"]
        assert (seen["readScope"], seen["adminScope"]) == ("read", "admin")
        assert "Read only" in seen["readScopeText"]

        # fleet: state, gaps and agent version of every device as the database has them
        devices = {
            d: (s or "unknown", m, v or "")
            for d, s, m, v in _rows(
                conn, "SELECT device_id, state, missing, agent_version FROM devices"
            )
        }
        shown = {r["device"]: (r["state"], int(r["missing"]), r["version"]) for r in seen["fleet"]}
        assert shown == devices
        assert shown["cr-0102"][1] == 2
        assert shown["env-0101"][0] == "online"
        assert {"s001/101", "s001/102", "s002/"} <= set(seen["rooms"])
        env_row = next(r for r in seen["fleet"] if r["device"] == "env-0101")
        assert env_row["backlog"] != ""
        assert int(env_row["backlog"]) >= 0
        # signing in and drawing the fleet: /meta, then one /devices call with the health
        # (and the open alerts' count)
        # (and the per-school summary; the devices are one page of the keyset listing)
        calls = seen["fleetApiCalls"]
        assert calls == [
            "/api/v1/meta",
            "/api/v1/schools/summary",
            "/api/v1/devices",
            "/api/v1/alerts",
        ], calls

        # the schools table: each school's devices, online and offline as the registry has
        # them, attendance and open alerts as the summary API says; sortable; linked
        registry = {
            s: (n, on)
            for s, n, on in _rows(
                conn,
                "SELECT school_id, count(*), count(*) FILTER (WHERE state = 'online')"
                " FROM devices GROUP BY school_id",
            )
        }
        schools = {
            r["school"]: (int(r["devices"]), int(r["online"]), int(r["offline"]))
            for r in seen["schools"]
        }
        assert schools == {s: (n, on, n - on) for s, (n, on) in registry.items()}
        status, summary = call(f"{stack['url']}/api/v1/schools/summary", stack["read"])
        assert status == 200
        later = {r["school_id"]: r for r in summary}
        for r in seen["schools"]:  # the agents tap on: attendance only grows meanwhile
            assert 0 <= int(r["attendance"]) <= later[r["school"]]["attendance_today"], r
            assert int(r["alerts"]) >= 0
        assert sum(int(r["attendance"]) for r in seen["schools"]) > 0
        by_devices = [(r["school"], int(r["devices"])) for r in seen["schoolsByDevices"]]
        assert by_devices == sorted(by_devices, key=lambda r: (-r[1], r[0]))
        assert seen["schoolsSortState"] == "descending"
        by_devices_asc = [(r["school"], int(r["devices"])) for r in seen["schoolsByDevicesAsc"]]
        assert by_devices_asc == sorted(by_devices_asc, key=lambda r: (r[1], r[0]))
        assert seen["schoolHash"] == "#/fleet?school=s002"
        assert {r["device"] for r in seen["schoolFleet"]} == {
            d for (d,) in _rows(conn, "SELECT device_id FROM devices WHERE school_id = 's002'")
        }
        assert seen["schoolTableShown"] is False
        # the device listing walked in pages of two: every device once, pages in (school, id)
        # order (within a page the rows are grouped by room)
        ordered = [
            d for (d,) in _rows(conn, "SELECT device_id FROM devices ORDER BY school_id, device_id")
        ]
        assert len(seen["fleetPages"]) >= 2
        assert [set(p) for p in seen["fleetPages"]] == [
            set(ordered[i : i + 2]) for i in range(0, len(ordered), 2)
        ]
        assert all(len(p) == len(set(p)) for p in seen["fleetPages"])
        assert seen["firstPageLink"] is True
        # the device page lists stored events only
        stored = {s for (s,) in _rows(conn, "SELECT seq FROM events WHERE device_id = 'env-0101'")}
        assert seen["deviceEvents"]
        assert set(seen["deviceEvents"]) <= stored
        assert seen["healthCharts"] >= 3

        # data quality: read-only users get the notice, admins the counts
        assert "admin" in seen["readQuarantineNotice"]
        assert {r["device"]: int(r["missing"]) for r in seen["gaps"]} == {
            d: m for d, (_, m, _) in devices.items() if m > 0
        }
        reasons = dict(_rows(conn, "SELECT reason, count(*) FROM quarantine GROUP BY reason"))
        assert {r["reason"]: int(r["count"]) for r in seen["reasons"]} == reasons
        assert seen["quarantineChart"] >= 1

        # commands: read tokens cannot ping; the admin's ping was answered by the agent
        assert seen["readPingDisabled"] is True
        ok = [c["command"] for c in seen["commands"] if c["status"] == "ok"]
        assert ok
        assert _rows(conn, "SELECT name, status FROM commands WHERE id = %s", ok[0]) == [
            ("ping", "ok")
        ]

        # live: events arrived in the feed, and each is a stored event
        assert len(seen["live"]) >= 5
        for row in seen["live"]:
            assert _rows(
                conn,
                "SELECT 1 FROM events WHERE device_id = %s AND seq = %s",
                row["device"],
                int(row["seq"]),
            ), row

        # today's rollups (district-local day) as the relations hold them
        local_today = "SELECT (now() AT TIME ZONE district_tz)::date FROM storage_config"
        (today,) = _rows(conn, local_today)[0]
        assert seen["attendance"]
        attendance = _rows(
            conn, "SELECT class_id, checkins, late FROM attendance_daily WHERE day = %s", today
        )
        assert {(r["class"], int(r["checkins"]), int(r["late"])) for r in seen["attendance"]} == {
            (c, n, late) for c, n, late in attendance
        }
        (minutes,) = _rows(
            conn,
            "SELECT sum(on_minutes) FROM board_power_daily b JOIN devices d USING (device_id)"
            " WHERE day = %s AND d.room = '101'",
            today,
        )[0]
        assert {r["room"]: float(r["minutes"]) for r in seen["board"]} == {
            "s001 / 101": round(minutes, 1)
        }
        latest = _rows(
            conn,
            "SELECT avg FROM env_5min WHERE device_id = 'env-0101' AND metric = 'co2_ppm'"
            " ORDER BY bucket DESC LIMIT 1",
        )[0][0]
        co2 = {r["room"]: float(r["latest"]) for r in seen["co2"]}
        assert co2 == {"s001 / 101": round(latest, 1)}
        assert seen["rollupCharts"] >= 3

    # rollouts: the list and one rollout's progress; pause, resume and abort by its buttons
    listed = seen["rollouts"]
    assert [(r["rollout"], r["state"]) for r in listed] == [(str(stack["rollout"]), "running")]
    ro = seen["rollout"]
    assert ro["before"] == "running"
    assert ro["devices"] == [
        {"device": "cr-0102", "outcome": "pending"},
        {"device": "sg-0101", "outcome": "ok"},
    ]
    assert ro["after"] == ["paused", "running", "aborted"]
    with psycopg.connect(db_url) as conn:
        assert _rows(conn, "SELECT state FROM rollouts WHERE id = %s", stack["rollout"]) == [
            ("aborted",)
        ]

    # Chinese throughout, and a tablet that fits
    zh = seen["zh"]
    assert zh["nav"] == ["设备总览", "实时事件", "数据质量", "今日统计", "告警", "批量下发"]
    assert zh["fleet"] == "设备总览"
    assert zh["quality"] == "数据质量"
    assert zh["live"] == "实时事件"
    assert zh["rollupsTitle"].startswith("今日")
    assert f"{today}" in zh["rollupsTitle"]
    assert "Asia/Shanghai" in zh["rollupsTitle"]
    assert "管理员" in zh["scope"]
    assert zh["login"] == "使用 API 令牌登录"
    tablet = seen["tablet"]
    assert tablet["loginTitle"] == "使用 API 令牌登录"
    assert tablet["fleetFits"]
    assert tablet["deviceFits"]
    assert tablet["rollupsFits"]
    assert tablet["smallestControl"] >= 44
    assert tablet["alertsFits"]
    print("screenshots:", *seen["screenshots"], sep="\n  ")
    if seen.get("slowShots"):
        print("taken at viewport size after a slow full-page capture:", seen["slowShots"])

    # alerts: the seeded ones and the engine's own, open first by severity, then acknowledged,
    # then resolved; the admin acknowledges the first by its button
    alerts = seen["alerts"]
    assert alerts["available"]
    order = [(c["rule"], c["severity"], c["state"]) for c in alerts["cards"]]
    assert order == [
        ("co2_high", "critical", "open"),
        ("device_offline", "warning", "open"),
        ("seq_gap", "info", "open"),  # opened by the rule engine from the gappy batch
        ("outbox_backlog", "info", "acknowledged"),
        ("quarantine_spike", "warning", "resolved"),
    ]
    assert alerts["summary"] == "3"  # the open alerts, on the fleet page
    assert "null" not in alerts["text"]
    for _, _, _, device, message in ALERTS:
        assert message in alerts["text"]
        assert device in alerts["text"]
    assert [(c["rule"], c["state"]) for c in alerts["after"]][:4] == [
        ("device_offline", "open"),
        ("seq_gap", "open"),
        ("co2_high", "acknowledged"),  # critical first among the acknowledged
        ("outbox_backlog", "acknowledged"),
    ]
    # the listing follows the API's cursor: one alert a page gives what one page of 200 gives
    paging = alerts["paging"]
    assert len(paging["onePage"]) == 2
    assert paging["onePerPage"] == paging["onePage"]
    assert all(h >= 44 for h in tablet["alertButtons"])
    assert len(tablet["alertButtons"]) == 6  # 2 open x (acknowledge, resolve) + 2 acknowledged
    assert zh["alerts"] == "告警"
    zh_texts = ("未处理 (2)", "已确认 (2)", "最近已解决 (1)", "确认", "解决", "智能白板离线 5 分钟")
    for text in zh_texts:
        assert text in zh["alertsText"], text
    assert "null" not in zh["alertsText"]
    acked = int(alerts["acknowledged"])
    with psycopg.connect(db_url) as conn:
        assert _rows(conn, "SELECT state, acknowledged_by FROM alerts WHERE id = %s", acked) == [
            ("acknowledged", "bootstrap (admin-token)")
        ]
        assert _rows(conn, "SELECT rule FROM alerts WHERE id = %s", acked) == [("co2_high",)]
        events = _rows(
            conn,
            "SELECT transition, by_whom FROM alert_events WHERE alert_id = %s ORDER BY id",
            acked,
        )
        assert events == [("opened", None), ("acknowledged", "bootstrap (admin-token)")]
