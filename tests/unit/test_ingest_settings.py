"""Broker URLs, masking, --http and settings validation."""

from __future__ import annotations

import pytest

from ingest_server.settings import (
    BrokerUrl,
    Settings,
    SettingsError,
    check_public_url,
    mask,
    parse_http,
)


def test_plain_broker_url_defaults_to_mqtt5() -> None:
    assert BrokerUrl.parse("mqtt://127.0.0.1") == BrokerUrl(host="127.0.0.1", port=1883)


def test_broker_url_with_everything() -> None:
    url = BrokerUrl.parse(
        "mqtts://ingest:p%40ss:w@broker.example:8884?protocol=3.1.1&ca=/etc/ca.pem"
    )
    assert url == BrokerUrl(
        host="broker.example",
        port=8884,
        tls=True,
        username="ingest",
        password="p@ss:w",
        protocol=4,
        ca="/etc/ca.pem",
    )
    assert str(url) == "mqtts://ingest:***@broker.example:8884?protocol=3.1.1&ca=/etc/ca.pem"


@pytest.mark.parametrize(
    ("url", "port", "protocol"),
    [
        ("mqtts://h", 8883, 5),
        ("mqtt://h:1999?protocol=5", 1999, 5),
        ("mqtt://[::1]:1884?protocol=311", 1884, 4),
    ],
)
def test_ports_and_protocols(url: str, port: int, protocol: int) -> None:
    parsed = BrokerUrl.parse(url)
    assert (parsed.port, parsed.protocol) == (port, protocol)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("tcp://h:1883", "must start with mqtt:// or mqtts://"),
        ("mqtt://:1883", "no host"),
        ("mqtt://h:99999", "invalid port"),
        ("mqtt://h?protocol=4", "protocol must be 5 or 3.1.1"),
        ("mqtt://h?qos=2", "unknown parameters"),
    ],
)
def test_bad_broker_urls_say_why(url: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint):
        BrokerUrl.parse(url)


def test_errors_never_show_the_password() -> None:
    with pytest.raises(SettingsError) as err:
        BrokerUrl.parse("tcp://u:hunter2@h:1883")
    assert "hunter2" not in str(err.value)


def test_mask_broker_urls() -> None:
    assert mask("mqtt://u:hunter2@h:1883") == "mqtt://u:***@h:1883"
    assert mask("mqtt://h:1883") == "mqtt://h:1883"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:hunter2@db:5432/campus",
        "host=db password=hunter2 dbname=campus",
        "postgresql://db/campus?password=hunter2",
    ],
)
def test_mask_database_urls(url: str) -> None:
    masked = mask(url)
    assert "hunter2" not in masked
    assert {"password=***", "dbname=campus", "host=db"} <= set(masked.split())


def test_parse_http() -> None:
    assert parse_http("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http("[::1]:0") == ("::1", 0)
    assert parse_http(":9000") == ("127.0.0.1", 9000)
    with pytest.raises(SettingsError, match="HOST:PORT"):
        parse_http("localhost")


def test_settings_validation() -> None:
    assert Settings().broker_url is None
    Settings(broker_url="mqtt://h", share_group="ingest")
    with pytest.raises(SettingsError, match="needs an MQTT 5 broker"):
        Settings(broker_url="mqtt://h?protocol=3.1.1", share_group="ingest")
    with pytest.raises(SettingsError, match="needs an MQTT 5 broker"):
        Settings(share_group="ingest")  # the embedded broker speaks 3.1.1
    with pytest.raises(SettingsError, match="may not contain"):
        Settings(broker_url="mqtt://h", share_group="a/b")
    with pytest.raises(SettingsError, match="batch-events"):
        Settings(batch_events=0)
    with pytest.raises(SettingsError, match="protocol"):
        Settings(broker_url="mqtt://h?protocol=6")


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("https://edge.district.example", "https://edge.district.example"),
        ("https://edge.district.example:8443/campus/", "https://edge.district.example:8443/campus"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ],
)
def test_public_url_is_taken_without_its_trailing_slash(url: str, want: str) -> None:
    assert check_public_url(url) == want
    assert Settings(public_url=url).public_url == url


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("edge.district.example", "got 'edge.district.example'"),
        ("ftp://edge.district.example", "got 'ftp://"),
        ("https://", "got 'https://'"),
        ("https://edge.example/?x=1", "no \\?query"),
        ("https://edge.example/#top", "#fragment"),
        ("https://edge.example:99999", "bad port"),
        ("https://edge.example/a b", "no spaces"),
        ("https://edge.example/" + "a" * 600, "at most 512"),
    ],
)
def test_bad_public_urls_say_why(url: str, complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint):
        Settings(public_url=url)


def test_public_url_errors_never_show_a_password() -> None:
    with pytest.raises(SettingsError, match="without user:password@") as err:
        check_public_url("https://ops:hunter2@edge.example")
    assert "hunter2" not in str(err.value)
