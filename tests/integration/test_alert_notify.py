"""Alert notifications against real receivers on 127.0.0.1 and a real PostgreSQL.

Alerts and their ``alert_events`` are inserted through SQL as the rule engine would; the
receivers are a plain http.server (answering like a webhook, WeCom or DingTalk) and aiosmtpd
(``tests/alert_receivers.py``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest_server.alerts.channels import mask_url, parse_receiver
from ingest_server.alerts.notify import Notifier, NotifyConfig
from ingest_server.metrics import IngestMetrics
from ingest_server.storage.migrate import migrate
from simulators.harness import Mosquitto, free_port, wait_until
from simulators.harness_pipeline import IngestServer
from tests.alert_receivers import Hook, SmtpSink

pytestmark = pytest.mark.integration

WAIT_S = 30


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True) as c:
        migrate(c)
        yield c


class FastNotifier(Notifier):
    BACKOFF_BASE_S = 0.05
    BACKOFF_MAX_S = 0.3
    POLL_S = 0.05


def open_alert(
    conn: psycopg.Connection[Any],
    device: str,
    severity: str = "warning",
    *,
    school: str = "s001",
    rule: str = "device_offline",
    message: str = "设备离线 device offline for 5 min",
) -> int:
    """As the engine opens an alert: the row and its 'opened' event in one transaction."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO alerts (rule, severity, school_id, device_id, room, message)"
            " VALUES (%s, %s, %s, %s, '101', %s) RETURNING id",
            (rule, severity, school, device, message),
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO alert_events (alert_id, transition) VALUES (%s, 'opened')", (row[0],)
        )
    return int(row[0])


def transition(conn: psycopg.Connection[Any], alert_id: int, what: str, by: str) -> None:
    state = {"acknowledged": "acknowledged", "resolved": "resolved", "reopened": "open"}[what]
    with conn.transaction():
        conn.execute(
            "UPDATE alerts SET state = %s,"
            " acknowledged_by = CASE WHEN %s = 'acknowledged' THEN %s ELSE acknowledged_by END,"
            " acknowledged_at = CASE WHEN %s = 'acknowledged' THEN now() ELSE acknowledged_at END"
            " WHERE id = %s",
            (state, what, by, what, alert_id),
        )
        conn.execute(
            "INSERT INTO alert_events (alert_id, transition, by_whom) VALUES (%s, %s, %s)",
            (alert_id, what, by),
        )


def statuses(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT receiver, alert_id, status, attempts, last_error FROM alert_notifications"
        " ORDER BY id"
    ).fetchall()


def config(urls: dict[str, str]) -> NotifyConfig:
    return NotifyConfig({n: parse_receiver(n, u) for n, u in urls.items()})


def test_webhook_gets_every_transition_as_json(
    conn: psycopg.Connection[Any], db_url: str, hooks: list[Hook]
) -> None:
    hook = Hook().start()
    hooks.append(hook)
    metrics = IngestMetrics()
    notifier = FastNotifier(config({"ops": hook.url}), db_url, metrics).start()
    try:
        a = open_alert(conn, "sb-0101", "critical")
        transition(conn, a, "acknowledged", "teacher-li")
        transition(conn, a, "resolved", "auto")
        wait_until(lambda: len(hook.bodies()) == 3, WAIT_S, "three notifications")
    finally:
        notifier.stop()
    bodies = hook.bodies()
    assert [b["transition"] for b in bodies] == ["opened", "acknowledged", "resolved"]
    assert [b["state"] for b in bodies] == ["open", "acknowledged", "resolved"]
    first = bodies[0]
    for key in ("rule", "severity", "state", "device_id", "school_id", "opened_at", "message"):
        assert first[key], key
    assert first["alert_id"] == a
    assert first["room"] == "101"
    assert first["severity"] == "critical"
    assert "设备离线" in first["message"]
    assert "sb-0101" in first["message"]
    assert bodies[1]["by_whom"] == "teacher-li"
    assert bodies[1]["acknowledged_by"] == "teacher-li"
    ids = [r["headers"]["X-Campus-Notification-Id"] for r in hook.requests]
    assert ids == [str(b["notification_id"]) for b in bodies]
    assert {s[2] for s in statuses(conn)} == {"sent"}
    assert metrics.alert_notifications.value(receiver="ops", outcome="sent") == 3
    assert metrics.alert_notify_leader.value() == 1


def test_receiver_down_then_back_loses_nothing(
    conn: psycopg.Connection[Any], db_url: str, hooks: list[Hook]
) -> None:
    """Refused connections, then 500s, then up: every notification once, in order per alert."""
    hook = Hook(script=[(500, {}), (503, {})])  # not listening yet: connections are refused
    hooks.append(hook)
    metrics = IngestMetrics()
    notifier = FastNotifier(config({"ops": hook.url}), db_url, metrics).start()
    try:
        alerts = [open_alert(conn, f"dev-{i}") for i in range(4)]
        for a in alerts[:2]:
            transition(conn, a, "acknowledged", "it-desk")
            transition(conn, a, "resolved", "auto")
        transition(conn, alerts[0], "reopened", "engine")
        wait_until(
            lambda: metrics.alert_notify_retries.value(receiver="ops") >= 3,
            WAIT_S,
            "failed attempts while the receiver is down",
        )
        assert not hook.requests
        hook.start()
        wait_until(lambda: len(hook.bodies()) == 9, WAIT_S, "all nine notifications")
        wait_until(
            lambda: {s[2] for s in statuses(conn)} == {"sent"}, WAIT_S, "every row marked sent"
        )
    finally:
        notifier.stop()
    bodies = hook.bodies()
    assert len({b["notification_id"] for b in bodies}) == 9  # exactly once each
    assert [r["status"] for r in hook.requests[:2]] == [500, 503]
    per_alert: dict[int, list[str]] = {}
    for b in bodies:
        per_alert.setdefault(b["alert_id"], []).append(b["transition"])
    assert per_alert[alerts[0]] == ["opened", "acknowledged", "resolved", "reopened"]
    assert per_alert[alerts[1]] == ["opened", "acknowledged", "resolved"]
    assert per_alert[alerts[2]] == per_alert[alerts[3]] == ["opened"]
    assert max(s[3] for s in statuses(conn)) >= 2  # some were tried more than once


def test_wecom_and_dingtalk_bodies_and_errcodes(
    conn: psycopg.Connection[Any], db_url: str, hooks: list[Hook]
) -> None:
    ok = {"errcode": 0, "errmsg": "ok"}
    wecom = Hook(answer=ok, script=[(200, {"errcode": 45009, "errmsg": "api freq out of limit"})])
    ding = Hook(answer=ok)
    bad = Hook(answer={"errcode": 310000, "errmsg": "sign not match"})
    hooks.extend(h.start() for h in (wecom, ding, bad))
    secret = "SECabc123"  # a test robot's signing secret
    urls = {
        "wecom": f"wecom+http://127.0.0.1:{wecom.port}/cgi-bin/webhook/send?key=K-1",
        "ding": f"dingtalk+http://127.0.0.1:{ding.port}/robot/send?access_token=T1&secret={secret}",
        "ding-text": f"dingtalk+http://127.0.0.1:{bad.port}/robot/send?access_token=T2&msgtype=text",
    }
    metrics = IngestMetrics()
    notifier = FastNotifier(config(urls), db_url, metrics).start()
    try:
        open_alert(conn, "env-0101", "critical", rule="co2_high", message="CO₂ 超过 1500 ppm")
        wait_until(lambda: len(wecom.bodies()) == 1 and ding.bodies(), WAIT_S, "robot messages")
        wait_until(
            lambda: metrics.alert_notifications.value(receiver="ding-text", outcome="failed"),
            WAIT_S,
            "the refused robot counted as failed",
        )
    finally:
        notifier.stop()
    w = wecom.bodies()[0]
    assert w["msgtype"] == "markdown"
    assert set(w) == {"msgtype", "markdown"}
    content = w["markdown"]["content"]
    assert "co2_high" in content
    assert "CO₂ 超过 1500 ppm" in content
    assert "env-0101" in content
    assert '<font color="warning">严重 critical</font>' in content
    assert len(content.encode()) <= 4096
    assert wecom.requests[0]["query"] == {"key": ["K-1"]}
    assert metrics.alert_notify_retries.value(receiver="wecom") == 1  # 45009: tried again
    d = ding.requests[0]
    assert d["body"]["msgtype"] == "markdown"
    assert d["body"]["markdown"]["title"]
    assert "告警" in d["body"]["markdown"]["text"]
    q = d["query"]
    assert set(q) == {"access_token", "timestamp", "sign"}  # the secret itself is never sent
    digest = hmac.new(secret.encode(), f"{q['timestamp'][0]}\n{secret}".encode(), hashlib.sha256)
    assert q["sign"][0] == base64.b64encode(digest.digest()).decode()
    t = bad.requests[0]["body"]
    assert t["msgtype"] == "text"
    assert "co2_high" in t["text"]["content"]
    failed = [s for s in statuses(conn) if s[0] == "ding-text"]
    assert failed[0][2] == "failed"
    assert "errcode 310000" in failed[0][4]
    assert len(bad.requests) == 1  # a refusal that retrying cannot fix is not retried


def test_email_over_smtp_in_chinese(
    conn: psycopg.Connection[Any], db_url: str, smtp_sink: SmtpSink
) -> None:
    url = smtp_sink.url("alerts@campus.example", "head@s001.example", "it@s001.example")
    notifier = FastNotifier(config({"mail": url}), db_url, IngestMetrics()).start()
    try:
        open_alert(conn, "gate-01", "critical", message="闸机离线，请检查网络")
        wait_until(lambda: smtp_sink.received, WAIT_S, "an e-mail")
    finally:
        notifier.stop()
    sender, rcpts, raw = smtp_sink.received[0]
    assert sender == "alerts@campus.example"
    assert rcpts == ["head@s001.example", "it@s001.example"]
    msg = message_from_bytes(raw, policy=default_policy)
    assert "严重 critical" in str(msg["Subject"])
    assert "告警" in str(msg["Subject"])
    body = msg.get_body().get_content()  # type: ignore[union-attr]
    assert "闸机离线，请检查网络" in body
    assert "gate-01" in body


def test_quiet_hours_hold_warning_drop_info_send_critical(
    conn: psycopg.Connection[Any], db_url: str, hooks: list[Hook], tmp_path: Path
) -> None:
    hook = Hook().start()
    other = Hook().start()
    hooks.extend([hook, other])
    real = datetime.now(UTC)
    start, end = real - timedelta(hours=1), real + timedelta(hours=1)
    routes = tmp_path / "routes.toml"
    routes.write_text(
        f"""
timezone = "UTC"
[receivers.s001-ops]
url = "{hook.url}"
[receivers.s002-ops]
url = "{other.url}"
[[routes]]
schools = ["s001"]
receivers = ["s001-ops"]
quiet_hours = "{start:%H:%M}-{end:%H:%M}"
[[routes]]
schools = ["s002"]
severities = ["critical"]
receivers = ["s002-ops"]
""",
        encoding="utf-8",
    )
    cfg = NotifyConfig.build(routes_file=routes)
    assert cfg is not None
    now = [real]
    metrics = IngestMetrics()
    notifier = FastNotifier(cfg, db_url, metrics, clock=lambda: now[0])
    held = open_alert(conn, "sb-1", "warning")
    open_alert(conn, "sb-2", "info")
    loud = open_alert(conn, "sb-3", "critical")
    open_alert(conn, "cr-9", "warning", school="s002")  # s002 routes only critical: nowhere
    open_alert(conn, "cr-8", "critical", school="s002")
    with psycopg.connect(db_url, autocommit=True) as session:
        notifier.run_once(session)
        assert [b["alert_id"] for b in hook.bodies()] == [loud]
        assert [b["device_id"] for b in other.bodies()] == ["cr-8"]
        rows = {r[1]: r for r in statuses(conn) if r[0] == "s001-ops"}
        assert rows[held][2] == "pending"
        assert rows[held][3] == 0
        assert [r[2] for r in rows.values()].count("dropped") == 1
        assert metrics.alert_notifications.value(receiver="s001-ops", outcome="dropped") == 1
        not_before = conn.execute(
            "SELECT not_before FROM alert_notifications WHERE alert_id = %s", (held,)
        ).fetchone()
        assert not_before is not None
        assert not_before[0] == end.replace(second=0, microsecond=0)
        now[0] = end + timedelta(seconds=1)  # the quiet hours are over
        notifier.run_once(session)
    assert [b["alert_id"] for b in hook.bodies()] == [loud, held]


def test_gives_up_after_the_window_and_says_why(conn: psycopg.Connection[Any], db_url: str) -> None:
    port = free_port()  # nothing listens there
    cfg = NotifyConfig({"gone": parse_receiver("gone", f"http://127.0.0.1:{port}/x")}, window_s=60)
    now = [datetime.now(UTC)]
    metrics = IngestMetrics()
    notifier = FastNotifier(cfg, db_url, metrics, clock=lambda: now[0])
    open_alert(conn, "sb-1")
    with psycopg.connect(db_url, autocommit=True) as session:
        notifier.run_once(session)
        [(_, _, status, attempts, error)] = statuses(conn)
        assert (status, attempts) == ("pending", 1)
        assert "cannot reach" in error
        now[0] += timedelta(seconds=61)
        notifier.run_once(session)
    [(_, _, status, _, error)] = statuses(conn)
    assert status == "failed"
    assert error.startswith("not delivered within")
    assert "cannot reach the receiver" in error
    assert metrics.alert_notifications.value(receiver="gone", outcome="failed") == 1


def test_an_event_committed_late_below_a_seen_id_is_not_skipped(
    conn: psycopg.Connection[Any], db_url: str, hooks: list[Hook]
) -> None:
    hook = Hook().start()
    hooks.append(hook)
    notifier = FastNotifier(config({"ops": hook.url}), db_url, IngestMetrics())
    notifier.GAP_LOCK_TIMEOUT = "200ms"
    with psycopg.connect(db_url) as slow, psycopg.connect(db_url, autocommit=True) as session:
        slow.execute(
            "INSERT INTO alerts (rule, severity, school_id, device_id, message)"
            " VALUES ('r', 'warning', 's001', 'slow-1', 'm')"
        )
        slow.execute(
            "INSERT INTO alert_events (alert_id, transition)"
            " SELECT id, 'opened' FROM alerts WHERE device_id = 'slow-1'"
        )  # its id is taken, its transaction still open
        open_alert(conn, "fast-1")  # a higher id, committed first
        assert notifier.run_once(session) is False
        assert hook.bodies() == []  # waited at the gap rather than skip past it
        slow.commit()
        notifier.run_once(session)
    assert sorted(b["device_id"] for b in hook.bodies()) == ["fast-1", "slow-1"]


def test_one_leader_per_database(conn: psycopg.Connection[Any], db_url: str) -> None:
    cfg = config({"ops": "http://127.0.0.1:9/x"})
    a, b = FastNotifier(cfg, db_url, IngestMetrics()), FastNotifier(cfg, db_url, IngestMetrics())
    with (
        psycopg.connect(db_url, autocommit=True) as ca,
        psycopg.connect(db_url, autocommit=True) as cb,
    ):
        a.run_once(ca)
        b.run_once(cb)
        assert (a.leader, b.leader) == (True, False)
        ca.close()  # the leader's session ends (the server lets go a moment later): b takes over
        wait_until(lambda: b.run_once(cb) or b.leader, WAIT_S, "b to lead")
        assert b.leader


def test_secrets_are_masked() -> None:
    url = "dingtalk+https://oapi.dingtalk.com/robot/send?access_token=TOKEN1&secret=SECret2"
    receiver = parse_receiver("d", url)
    for text in (mask_url(url), receiver.label, repr(receiver)):
        assert "TOKEN1" not in text, text
        assert "SECret2" not in text, text
    smtp = parse_receiver("m", "smtps://bob:pa55word@mail.example?from=a@x&to=b@y")
    assert "pa55word" not in smtp.label
    assert "pa55word" not in repr(smtp)


def test_server_sends_from_the_command_line(
    mosquitto: Mosquitto, db_url: str, conn: psycopg.Connection[Any], tmp_path: Path,
    hooks: list[Hook],
) -> None:  # fmt: skip
    hook = Hook().start()
    hooks.append(hook)
    url = f"{hook.url}?key=SECRETKEY1"
    server = IngestServer(tmp_path, mosquitto.url, db_url, "--alert-webhook", url)
    server.start()
    try:
        server.wait_healthy(60)
        a = open_alert(conn, "sb-0101", "critical")
        wait_until(hook.bodies, WAIT_S, "the server's notification")
        assert hook.bodies()[0]["alert_id"] == a
        assert hook.requests[0]["query"] == {"key": ["SECRETKEY1"]}
        wait_until(lambda: server.metric("campus_alert_notifications_total") >= 1, WAIT_S, "metric")
        assert server.metric("campus_alert_notify_leader") == 1
    finally:
        server.terminate()
    log = server.tail()
    assert "receiver webhook-1: webhook http://127.0.0.1" in log  # told where, masked
    assert "SECRETKEY1" not in log
