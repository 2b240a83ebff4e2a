"""Receiver URLs, routes files, quiet hours and routing decisions, without a database."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, quote_plus, urlsplit
from zoneinfo import ZoneInfo

import pytest

from ingest_server.alerts.channels import (
    DingTalkReceiver,
    ReceiverError,
    SmtpReceiver,
    WebhookReceiver,
    WeComReceiver,
    parse_receiver,
)
from ingest_server.alerts.notify import NotifyConfig, NotifyConfigError, QuietHours
from ingest_server.settings import Settings, SettingsError

SH = ZoneInfo("Asia/Shanghai")


def test_receiver_kinds_from_urls() -> None:
    assert isinstance(parse_receiver("a", "https://x.example/h"), WebhookReceiver)
    w = parse_receiver("b", "wecom+https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=K")
    assert isinstance(w, WeComReceiver)
    assert w.msgtype == "markdown"
    d = parse_receiver(
        "c", "dingtalk+https://oapi.dingtalk.com/robot/send?access_token=T&secret=S&msgtype=text"
    )
    assert isinstance(d, DingTalkReceiver)
    assert d.url == "https://oapi.dingtalk.com/robot/send?access_token=T"  # ours stripped
    assert (d.secret, d.msgtype) == ("S", "text")
    m = parse_receiver("d", "smtp://mail.example?from=a@x&to=b@y,c@y")
    assert isinstance(m, SmtpReceiver)
    assert (m.port, m.starttls, m.recipients) == (587, True, ("b@y", "c@y"))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://x/y", "use http"),
        ("wecom+https://q.example/send?key=K&msgtype=card", "msgtype must be markdown or text"),
        ("wecom+https://q.example/send?key=K&secret=S", "not signed"),
        ("smtp://mail.example?to=b@y", "needs .from="),
        ("smtp://u:pw@mail.example?from=a@x&to=b@y&starttls=off", "never sent without TLS"),
        ("smtp://mail.example?from=a@x&to=b@y&bcc=c", "unknown parameters"),
        ("https://x.example:99999/h", "invalid port"),
    ],
)
def test_bad_receiver_urls_are_named_and_masked(url: str, says: str) -> None:
    with pytest.raises(ReceiverError, match=says) as err:
        parse_receiver("r", url)
    assert "pw" not in str(err.value)
    assert "key=K" not in str(err.value)


def test_dingtalk_signature_matches_the_documented_recipe() -> None:
    d = DingTalkReceiver("d", "https://oapi.dingtalk.com/robot/send?access_token=T", secret="SEC1")
    url = d.signed_url(now_ms=1700000000000)
    digest = hmac.new(b"SEC1", b"1700000000000\nSEC1", hashlib.sha256).digest()
    sign = quote_plus(base64.b64encode(digest))
    assert url == (
        f"https://oapi.dingtalk.com/robot/send?access_token=T&timestamp=1700000000000&sign={sign}"
    )
    assert parse_qs(urlsplit(url).query)["sign"] == [base64.b64encode(digest).decode()]


def test_quiet_hours_past_midnight() -> None:
    q = QuietHours.parse("22:00-07:00")
    assert q.ends_after(datetime(2025, 3, 3, 21, 59, tzinfo=SH)) is None
    assert q.ends_after(datetime(2025, 3, 3, 23, 30, tzinfo=SH)) == datetime(
        2025, 3, 4, 7, 0, tzinfo=SH
    )
    assert q.ends_after(datetime(2025, 3, 4, 6, 59, tzinfo=SH)) == datetime(
        2025, 3, 4, 7, 0, tzinfo=SH
    )
    assert q.ends_after(datetime(2025, 3, 4, 7, 0, tzinfo=SH)) is None
    with pytest.raises(NotifyConfigError, match="HH:MM-HH:MM"):
        QuietHours.parse("late")


def _routes(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "routes.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_routes_decide_and_quiet_hours_hold_drop_or_send(tmp_path: Path) -> None:
    cfg = NotifyConfig.build(
        ["https://a.example/h"],
        routes_file=_routes(
            tmp_path,
            """
[receivers.night]
url = "https://n.example/h"
[[routes]]
schools = ["s001"]
receivers = ["night", "webhook-1"]
quiet_hours = "22:00-07:00"
""",
        ),
    )
    assert cfg is not None
    night = datetime(2025, 3, 3, 23, 0, tzinfo=SH).astimezone(UTC)
    morning = datetime(2025, 3, 4, 7, 0, tzinfo=SH).astimezone(UTC)
    held = cfg.plan("s001", "warning", night, SH)
    assert {(d.receiver, d.not_before, d.dropped) for d in held} == {
        ("night", morning, None),
        ("webhook-1", morning, None),
    }
    assert {d.dropped for d in cfg.plan("s001", "info", night, SH)} == {"info during quiet hours"}
    assert {d.not_before for d in cfg.plan("s001", "critical", night, SH)} == {night}
    assert cfg.plan("s002", "critical", night, SH) == []  # no route for that school


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[[routes]]\nreceivers = ['nobody']\n", "unknown \\['nobody'\\]"),
        ("colour = 1\n[[routes]]\nreceivers = ['webhook-1']\n", "unknown keys \\['colour'\\]"),
        ("[[routes]]\nreceivers = ['webhook-1']\nseverities = ['loud']\n", "severities: only"),
        ("[[routes]]\nreceivers = ['webhook-1']\nquiet_hours = '7-8'\n", "HH:MM-HH:MM"),
        ("timezone = 'Mars/Olympus'\n[[routes]]\nreceivers = ['webhook-1']\n", "unknown timezone"),
        ("[receivers.x]\nurl = 'gopher://x'\n[[routes]]\nreceivers = ['x']\n", "receivers.x"),
        ("not toml [", "routes.toml"),
        ("", "at least one \\[\\[routes\\]\\]"),
    ],
)
def test_bad_routes_files_say_what_is_wrong(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(NotifyConfigError, match=says):
        NotifyConfig.build(["https://a.example/h"], routes_file=_routes(tmp_path, text))


def test_settings_refuse_a_bad_receiver_before_starting() -> None:
    with pytest.raises(SettingsError, match="alert receiver"):
        Settings(alert_webhooks=("wecom+ftp://x",))
    assert Settings().notify_config() is None
    cfg = Settings(
        alert_webhooks=("https://a.example/h",), alert_smtp="smtps://m.example?from=a@x&to=b@y"
    ).notify_config()
    assert cfg is not None
    assert sorted(cfg.receivers) == ["smtp", "webhook-1"]
